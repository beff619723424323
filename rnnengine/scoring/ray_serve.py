"""Streams on Ray Serve: a deployment whose replicas hold sessions (one stream each), sessions
pinned to a replica, and a client session that moves to another replica, exactly, when its
replica goes away.

    from ray import serve
    from rnnengine.scoring.ray_serve import StreamDeployment, RemoteSession

    handle = serve.run(StreamDeployment.options(num_replicas=2).bind("model.rnne"))
    session = RemoteSession(handle)          # a new session id; its stream lives on one replica
    y = session.step(x)                      # one time step (as Stream.step); feed(xs) for a chunk
    session.close()

Pinning: every call of a session carries its id as Ray Serve's ``multiplexed_model_id``, so
Serve routes it to the replica that already holds the session (the replica "loads" a session
the first time it sees its id; ``max_sessions`` per replica, least recently used evicted).

Moving: after each call the replica returns the session's state as bytes
(``rnnengine.state_to_bytes``: model fingerprint, checksum) with the number of calls the
session has taken. When a call reaches a replica that does not hold the session with that
count (the replica restarted, the session was evicted or routed elsewhere), the replica
refuses it rather than start from a fresh state, and ``RemoteSession`` restores the last
bytes there and repeats the call: the stream continues exactly, never silently from zeros.
``checkpoint=False`` skips the bytes (less traffic): a call that reaches a replica not
holding the session is tried again a few times (routing is best effort until Serve's routers
learn where the session is), and a session lost with its replica raises ``SessionLostError``.
"""
from __future__ import annotations

import threading
import time
import uuid
import weakref
from typing import Any, Optional

import ray.exceptions
from ray import serve

from rnnengine.errors import RnnEngineError
from rnnengine.runtime.portable import state_from_bytes, state_to_bytes
from rnnengine.scoring import load_model

__all__ = ["StreamDeployment", "RemoteSession", "SessionLostError", "MAX_SESSIONS"]

MISROUTE_TRIES = 12  # a call of a session without checkpoints refused by a live replica: tried again (~0.8 s)

MAX_SESSIONS = 4096  # sessions one replica holds (least recently used evicted: restored on return)


class SessionLostError(RnnEngineError, RuntimeError):
    """The replica holding a session went away and the session has no state to restore from."""


# errors of a call whose replica died or is being replaced
_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class _Held:
    """A session on a replica: its stream and the calls it has taken."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.calls = 0
        self.lock = threading.Lock()  # a replica may run a session's calls on several threads


@serve.deployment
class StreamDeployment:
    """A Ray Serve deployment holding streams of one model (loaded once per replica).

    Every method takes the session's call count as the caller knows it (``calls``) and
    refuses, with ``{"lost": reason}``, a call this replica cannot continue exactly; results
    are ``{"out": outputs, "calls": n, "state": bytes | None}``."""

    def __init__(self, model_path: str) -> None:
        self.model = load_model(model_path)
        # the sessions this replica holds now (Serve's cache owns them; evicted ones drop out)
        self._sessions: weakref.WeakValueDictionary[str, _Held] = weakref.WeakValueDictionary()

    # The sessions are held by Serve's multiplexing cache: it routes a session's calls to the
    # replica holding it and evicts the least recently used beyond MAX_SESSIONS per replica.
    @serve.multiplexed(max_num_models_per_replica=MAX_SESSIONS)  # type: ignore[untyped-decorator]
    async def _open(self, session_id: str) -> _Held:
        """Serve calls this the first time this replica sees ``session_id``: a new stream."""
        held = self._sessions[session_id] = _Held(self.model.stream())
        return held

    async def _held(self) -> tuple[str, _Held]:
        sid = serve.get_multiplexed_model_id()
        if not sid:
            raise ValueError("a session call needs its session id as multiplexed_model_id (use RemoteSession)")
        return sid, await self._open(sid)

    def _answer(self, held: _Held, out: Any, checkpoint: bool) -> dict[str, Any]:
        held.calls += 1
        return {"out": out, "calls": held.calls, "state": state_to_bytes(held.stream) if checkpoint else None}

    async def call(self, method: str, x: Any, calls: int, checkpoint: bool = True) -> dict[str, Any]:
        """``method`` ("step" or "feed") of the session's stream on ``x``, if this replica holds
        the session after exactly ``calls`` calls."""
        if method not in ("step", "feed"):
            raise ValueError(f"method must be 'step' or 'feed', got {method!r}")
        sid, held = await self._held()
        with held.lock:
            if held.calls != calls:
                return {"lost": f"session {sid} is at call {held.calls} on this replica, the caller at {calls}"}
            return self._answer(held, getattr(held.stream, method)(x), checkpoint)

    async def restore(self, state: bytes, calls: int) -> dict[str, Any]:
        """Puts the session's state (``state_to_bytes`` of its stream) on this replica."""
        sid, held = await self._held()
        with held.lock:
            state_from_bytes(held.stream, state)
            held.calls = calls
        return {"calls": calls}

    async def reset(self, calls: int, checkpoint: bool = True) -> dict[str, Any]:
        """Returns the session to the model's initial state. A reset counts as a call (the
        count only grows), so a stale copy of the session elsewhere never matches again."""
        sid, held = await self._held()
        with held.lock:
            held.stream.reset()
            held.calls = calls
            return self._answer(held, None, checkpoint)

    async def restore_initial(self, calls: int) -> dict[str, Any]:
        """Puts the session at the model's initial state with the caller's count (a session
        that has made no call yet)."""
        sid, held = await self._held()
        with held.lock:
            held.stream.reset()
            held.calls = calls
        return {"calls": calls}

    async def get_state(self, calls: int) -> dict[str, Any]:
        sid, held = await self._held()
        with held.lock:
            if held.calls != calls:
                return {"lost": f"session {sid} is at call {held.calls} on this replica, the caller at {calls}"}
            return {"state": state_to_bytes(held.stream), "calls": held.calls}

    async def where(self) -> dict[str, Any]:
        """The replica this call reached (its Serve replica id), whether it holds the session
        and at which call (without opening the session there)."""
        held = self._sessions.get(serve.get_multiplexed_model_id())
        return {"replica": serve.get_replica_context().replica_id.unique_id, "held": held is not None,
                "calls": None if held is None else held.calls}


class RemoteSession:
    """One stream on a :class:`StreamDeployment`, pinned to a replica; moves exactly when the
    replica goes away (module doc). Used from one thread at a time, as a stream."""

    def __init__(self, handle: Any, session_id: Optional[str] = None, checkpoint: bool = True,
                 retry_seconds: float = 60.0) -> None:
        self.session_id = session_id or uuid.uuid4().hex
        self.checkpoint = checkpoint
        self.retry_seconds = retry_seconds  # how long a moving session waits for a replica
        self.calls = 0
        self.state: Optional[bytes] = None  # the bytes after the last call (checkpoint=True)
        self.moves = 0  # times the session was restored on another replica
        self._handle = handle.options(multiplexed_model_id=self.session_id)

    def _remote(self, method: str, *args: Any) -> Any:
        return getattr(self._handle, method).remote(*args).result()

    def _call(self, method: str, x: Any) -> Any:
        deadline = time.monotonic() + self.retry_seconds
        misrouted = 0
        while True:
            try:
                r = self._remote("call", method, x, self.calls, self.checkpoint)
                if "lost" not in r:
                    self.calls, self.state = r["calls"], r["state"]
                    return r["out"]
                why = r["lost"]
            except _GONE as e:  # the replica died during the call: what it did is gone with it
                why = f"its replica went away ({type(e).__name__})"
            else:
                # a live replica that does not hold the session: Serve's routers learn where a
                # session is held a moment after its first call (on a loaded machine, seconds),
                # and route at random until then. With no state to move, the call is tried
                # again (MISROUTE_TRIES times), so that it can reach the replica holding it.
                if self.state is None and self.calls and misrouted < MISROUTE_TRIES:
                    misrouted += 1
                    time.sleep(0.01 * misrouted)
                    continue
            if self.state is None and self.calls:
                raise SessionLostError(f"session {self.session_id}: {why}; no state to restore it from"
                                       f"{' (checkpoint=False)' if not self.checkpoint else ''}")
            if time.monotonic() > deadline:
                raise SessionLostError(f"session {self.session_id}: {why}; restoring it failed for "
                                       f"{self.retry_seconds} s")
            # put the session, as the last answer left it, on the replica the call reaches now
            try:
                if self.state is None:  # no call yet: a fresh stream is the right start
                    self._remote("restore_initial", self.calls)
                else:
                    self._remote("restore", self.state, self.calls)
                self.moves += 1
            except _GONE:
                time.sleep(0.2)  # Serve has not replaced the replica yet

    def step(self, x: Any) -> Any:
        """One time step of the session's stream (``Stream.step``)."""
        return self._call("step", x)

    def feed(self, xs: Any) -> Any:
        """A chunk of steps (``Stream.feed``)."""
        return self._call("feed", xs)

    def reset(self) -> None:
        """Returns the session to the model's initial state (wherever it is now)."""
        r = self._remote("reset", self.calls, self.checkpoint)
        self.calls, self.state = r["calls"], r["state"]

    def where(self) -> Optional[str]:
        """The id of the replica the session's calls reach now, if it holds the session at
        this session's call count (else None)."""
        r = self._remote("where")
        return str(r["replica"]) if r["held"] and r["calls"] == self.calls else None

    def close(self) -> None:
        """Forgets the session here (the replica evicts it when it needs the room)."""
        self.state = None
