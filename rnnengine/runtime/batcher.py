"""Many live streams served together: a session batcher.

A service opens one session per user (a microphone, a chat) on one model; each session is
a stream with its own state. Sessions submit steps from any thread (``session.step(x)``
blocks) or asyncio task (``await session.astep(x)``); the steps that are waiting are run as
one batched call, and each session gets its own output.

Two engines behind one API:

- **A layer-stack model** (``rnnengine.Model(layers)``, a weight file of one): served by the
  C core (src_c/batch.c). Each session is a slot whose state lives in the batcher's pooled
  memory; ``step`` hands the C scheduler a pointer to its row and sleeps in the kernel (the
  GIL released) until its batch has run; the scheduler is a C thread that never takes the
  GIL: it gathers the waiting rows and states, runs one batched step (split over
  ``threads`` by gate rows), scatters the states and outputs back and wakes each caller.
  ``astep`` submits without blocking; after a batch the scheduler writes one byte to a pipe
  each event loop in use watches, and the loop collects the batch's results itself (one
  wake-up per batch, no thread in between; a loop that cannot watch a pipe is served by a
  notifier thread). Chunks (``feed``) and state calls run in the caller's
  own thread on the session's slot (the scheduler goes on with the others meanwhile).
- **A converted graph**: one Python scheduler thread. Steps are batched when its streams
  carry their state only as explicit graph inputs (silero-vad's ``state``, a token model's
  ``h0``/``c0``): the sessions' inputs and states are joined along their batch axes, the
  graph runs once, and the outputs and next states are split back. That is done only when
  rnnengine/runtime/split.py proves every output row depends on its own input row, and the
  first batched call of each shape is checked against the same sessions stepped one by one
  (``graph_batching`` says whether it is on, and why not). Batching must also pay: the first
  batch is timed against the same steps alone, and a model whose batch does not cost well
  under its rows alone (silero-vad's convolutions; the demo char LM, whose Python join and
  split cost more than batching saves) is not batched (``batch_graphs`` overrides). Whenever graph
  steps are not batched, a session's calls run in the caller's own thread (the GIL released
  in C, so sessions use every core); a call made while the same session has one running
  queues behind it, and the scheduler runs it next, in order. Otherwise chunks and state
  calls run one by one in the scheduler: a long chunk delays the other sessions' steps
  while it runs, so a service should feed long audio in chunks of moderate size.

Guarantees (both engines):
- a session's calls run in the order they were made (one at a time: a second call on the
  same session waits for the first); sessions never see each other's state;
- a bad input raises in the session that sent it (checked before it is queued); the others
  go on; a batched call that fails leaves every state as it was and raises in each of its
  sessions;
- at most ``max_queue`` calls wait or run at a time: a caller beyond that waits for room
  (back-pressure) rather than growing memory; at most ``max_sessions`` sessions are open;
- a session unused for ``idle_timeout`` seconds is closed and its state freed (its next
  call raises SessionClosedError).

Knobs: ``max_batch`` (sessions per batched call), ``max_wait_us`` (how long the first
waiting step may wait for others to join; a batch runs at once when every open session has
a step waiting), ``threads`` (threads of each batched call: a layer stack's products are
split by gate rows; a converted graph's batch of more than 2 * threads rows by rows).
"""
from __future__ import annotations

import asyncio
import collections
import os
import threading
import weakref
import time
from asyncio import get_running_loop as _running_loop
from time import monotonic as _monotonic
from typing import Any, Callable

import numpy as np

from rnnengine import _core
from rnnengine.codes import BATCH_FULL, BATCH_MAX_SLOTS
from rnnengine.errors import SessionClosedError
from rnnengine.runtime import split
from rnnengine.runtime.base import Model, Stream
from rnnengine.runtime.graph import GraphModel, GraphStream, _length_inputs
from rnnengine.runtime.model import LayerModel
from rnnengine.runtime.roles import axis_roles

__all__ = ["Batcher", "Session", "SessionClosedError"]


class _Call:
    """One submitted call: a step (batchable), or a function run on the session's stream."""
    __slots__ = ("session", "x", "fn", "done", "result", "error", "loop", "future")

    def __init__(self, session: _QueuedSession, x: np.ndarray | None, fn: Callable[[Stream], Any] | None) -> None:
        self.session = session
        self.x = x
        self.fn = fn
        self.done = _Done()
        self.result: Any = None
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.future: asyncio.Future[Any] | None = None

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        if self.done.is_set():
            return
        self.result, self.error = result, error
        self.done.set()
        if self.future is not None and self.loop is not None:
            pending = getattr(_settling, "by_loop", None)
            if pending is not None:  # inside a batch: one wake-up per event loop when it ends
                pending.setdefault(self.loop, []).append((self.future, result, error))
                return
            try:
                self.loop.call_soon_threadsafe(_settle, self.future, result, error)
            except RuntimeError:  # the caller's event loop is closed: nobody waits for this result
                pass


class _Done:
    """A one-shot signal, cheaper than threading.Event: a lock created held, released once."""
    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._set = False

    def set(self) -> None:
        self._set = True
        self._lock.release()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        if self._lock.acquire(timeout=-1 if timeout is None else timeout):
            self._lock.release()  # later waits return at once
            return True
        return False


_settling = threading.local()  # the scheduler thread's asyncio results of the current batch, by loop


def _settle_all(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, result, error in items:
        _settle(fut, result, error)


def _flush_settling() -> None:
    """Hands each event loop the results of the batch that just ran, in one wake-up."""
    pending = getattr(_settling, "by_loop", None)
    _settling.by_loop = None
    for loop, items in (pending or {}).items():
        try:
            loop.call_soon_threadsafe(_settle_all, items)
        except RuntimeError:  # that caller's event loop is closed
            pass


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class Session:
    """One stream served by a :class:`Batcher`. ``step(x)`` (blocking) and ``await astep(x)``
    advance it one step: for a layer stack, x is one row of input (input_size,) and the
    result one row of output; for a converted graph, x is what its stream's step() takes
    with batch 1 (a dict or the one array) and the result what it returns. ``feed``/
    ``afeed`` take a chunk, ``get_state``/``set_state``/``reset``/``fork`` work as on a
    stream; all run in the order they were made. Made by :meth:`Batcher.open`."""

    last_used: float  # time.monotonic() of the end of its last call (idle_timeout counts from it)

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    def step(self, x: Any, timeout: float | None = None) -> Any:
        """One step; ``timeout`` (seconds): a call that has not started by then is withdrawn
        (not applied) and TimeoutError raised; one already running is waited for."""
        raise NotImplementedError

    def feed(self, xs: Any, timeout: float | None = None) -> Any:
        """A chunk of steps, as the model's stream.feed() takes it."""
        raise NotImplementedError

    def get_state(self) -> Any:
        raise NotImplementedError

    def set_state(self, state: Any) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def fork(self) -> Session:
        """A new session of the same batcher starting from a copy of this one's state."""
        raise NotImplementedError

    def close(self) -> None:
        """Frees the session's state; a call already made still runs."""
        raise NotImplementedError

    async def astep(self, x: Any) -> Any:
        """step() for asyncio: never blocks the event loop."""
        raise NotImplementedError

    async def afeed(self, xs: Any) -> Any:
        """feed() for asyncio: never blocks the event loop."""
        raise NotImplementedError

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SlotSession(Session):
    """A layer-stack model's session: a slot of the C batcher (src_c/batch.c). Its calls take
    turns on ``_turn`` (one in flight: the C side holds one row per slot); an asynchronous
    step's turn is given back by the notifier thread when the step is done."""

    def __init__(self, batcher: Batcher, slot: int) -> None:
        assert batcher._core is not None
        self._batcher = batcher
        self._core: _core.BatchCore = batcher._core
        self._slot: int | None = slot
        self._turn = threading.Lock()
        self._closing = False  # close() called while a call was running: freed when it ends
        self.last_used = time.monotonic()

    @property
    def closed(self) -> bool:
        return self._slot is None or self._closing

    def _closed_error(self) -> SessionClosedError:
        return SessionClosedError("this batcher is closed" if self._batcher._closed else
                                  "this session is closed (by close(), or after idle_timeout)")

    def _take(self, timeout: float | None = None) -> int:
        """Waits for this session's turn; its slot."""
        if self.closed:
            raise self._closed_error()
        if not self._turn.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError(f"another call of this session was still running after {timeout} s; "
                               "this one was not made (not applied)")
        slot = self._slot
        if slot is None or self._closing:
            self._turn.release()
            raise self._closed_error()
        return slot

    def _give(self) -> None:
        """Ends a call: frees the slot if close() came meanwhile, and passes the turn on."""
        self.last_used = time.monotonic()
        if self._closing:
            self._free()
        self._turn.release()

    def _free(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            self._batcher._forget(self)
            if not self._batcher._closed:
                self._core.close_slot(slot)

    def step(self, x: Any, timeout: float | None = None) -> Any:
        graph_io = self._batcher._graph_io
        given = x
        if graph_io:
            x = self._batcher._graph_row(x)
        elif type(x) is dict:
            x = _only_x(x)
        if timeout is None:  # the common call, inlined (_take / _give): a few µs of GIL per step less
            turn = self._turn
            if self._closing or self._slot is None:
                raise self._closed_error()
            turn.acquire()
            try:
                slot = self._slot
                if slot is None or self._closing:
                    raise self._closed_error()
                y = self._core.step(slot, x)
            finally:
                self.last_used = _monotonic()
                if self._closing:
                    self._free()
                turn.release()
        else:
            deadline = time.monotonic() + timeout
            slot = self._take(timeout)
            try:
                y = self._core.step(slot, x, max(0.0, deadline - time.monotonic()))
            finally:
                self._give()
        return self._batcher._graph_out(given, y[None]) if graph_io else y

    def feed(self, xs: Any, timeout: float | None = None) -> Any:
        """A chunk (T, input_size), or (T, 1, input_size) (batch_first: (1, T, input_size)),
        run in this thread on the session's state; the outputs in the same layout."""
        rows, finish = self._feed_args(xs)
        slot = self._take(timeout)
        try:
            return finish(self._core.feed(slot, rows))
        finally:
            self._give()

    def _feed_args(self, xs: Any) -> tuple[Any, Callable[[np.ndarray], Any]]:
        """feed()'s rows for the C side, and what makes its outputs (T, output_size) the caller's layout."""
        given = xs
        if type(xs) is dict:
            xs = _only_x(xs)
        arr = np.asarray(xs)
        graph_io = self._batcher._graph_io
        if graph_io and (arr.ndim != 3 or arr.shape[1] != 1):
            raise ValueError(f"input 'X' of feed() must have shape (T, 1, {self._core.input_size}) (time, a batch "
                             f"of one, features), got {arr.shape}")
        first = bool(getattr(self._batcher.model, "batch_first", False))
        rows = arr[0] if arr.ndim == 3 and first else arr

        def finish(ys: np.ndarray) -> Any:
            if arr.ndim == 3:
                ys = ys[None] if first else ys[:, None, :]
            return self._batcher._graph_out(given, ys) if graph_io else ys
        return rows, finish

    def get_state(self) -> Any:
        slot = self._take()
        try:
            vec = self._core.get_state(slot)
        finally:
            self._give()
        return self._batcher._stack_model.unpack_state(vec, 1)

    def set_state(self, state: Any) -> None:
        packed = np.ascontiguousarray(self._batcher._stack_model._pack_state(state, 1), np.float32)
        self._set_vector(packed)

    def _set_vector(self, vec: np.ndarray) -> None:
        slot = self._take()
        try:
            self._core.set_state(slot, vec)
        finally:
            self._give()

    def reset(self) -> None:
        self._set_vector(self._batcher._initial)

    def fork(self) -> Session:
        slot = self._take()
        try:
            vec = self._core.get_state(slot)
        finally:
            self._give()
        return self._batcher._open_slot(vec)

    def close(self) -> None:
        if self._slot is None:
            return
        if self._turn.acquire(blocking=False):
            try:
                self._free()
            finally:
                self._turn.release()
        else:
            self._closing = True  # the call running now frees the slot when it ends

    async def astep(self, x: Any) -> Any:
        batcher = self._batcher
        graph_io = batcher._graph_io
        row = self._core.check_row(batcher._graph_row(x) if graph_io else _only_x(x) if type(x) is dict else x)
        if self._slot is None or self._closing:
            raise self._closed_error()
        if not self._turn.acquire(blocking=False):  # another call of this session runs
            await _backoff_until(lambda: self._turn.acquire(blocking=False))
        submitted = False
        slot = self._slot
        try:
            if slot is None or self._closing:
                raise self._closed_error()
            loop = _running_loop()
            if loop is not batcher._last_loop:
                batcher._watch(loop)
            fut: asyncio.Future[Any] = loop.create_future()
            y = np.empty(self._core.output_size, np.float32)
            batcher._inflight[slot] = (self, fut, loop, row, y)
            if self._core.submit(slot, row, y) == BATCH_FULL:  # back-pressure without blocking the loop
                await _backoff_until(lambda: self._core.submit(slot, row, y) != BATCH_FULL)
            submitted = True
        finally:
            if not submitted:  # nothing queued: nobody else gives the turn back
                if slot is not None:
                    batcher._inflight.pop(slot, None)
                self._give()
        try:
            y = await fut
        except asyncio.CancelledError:
            if self._core.withdraw(slot):  # not started: never applied, and never handed out
                batcher._inflight.pop(slot, None)
                self._give()
            else:  # it runs, and its result gives the turn back: this loop may be gone by then
                batcher._start_notifier()  # (asyncio.run ending cancels its tasks, then closes)
            raise
        return batcher._graph_out(x, y[None]) if graph_io else y

    async def afeed(self, xs: Any) -> Any:
        """The chunk runs in a worker thread of the loop's executor; the session's turn is taken
        here first, in the loop's thread (as astep takes it), so calls keep their order."""
        rows, finish = self._feed_args(xs)
        if self.closed:
            raise self._closed_error()
        if not self._turn.acquire(blocking=False):  # another call of this session runs
            await _backoff_until(lambda: self._turn.acquire(blocking=False))
        slot = self._slot
        if slot is None or self._closing:
            self._give()
            raise self._closed_error()

        def run() -> Any:  # the turn is given back when the chunk is done, even if the caller is cancelled
            try:
                return finish(self._core.feed(slot, rows))
            finally:
                self._give()
        try:
            fut = asyncio.get_running_loop().run_in_executor(None, run)
        except BaseException:  # not submitted: nothing else gives the turn back
            self._give()
            raise
        return await fut


async def _backoff_until(ready: Callable[[], bool]) -> None:
    """Awaits until ready() (which may take what it waits for) is true, sleeping 0.2 ms, then
    twice as long each time up to 5 ms: a turn or queue room without blocking the event loop.
    The hot paths call ready() once themselves first and come here only to wait."""
    pause = 0.0002
    while not ready():
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.005)


def _only_x(x: dict[str, Any]) -> Any:
    if set(x) != {"X"}:
        raise ValueError(f"step(): a layer-stack model takes the input 'X' only, got {sorted(map(str, x))}")
    return x["X"]


class _QueuedSession(Session):
    """A converted graph's session: its calls queue in the Python scheduler, which runs them
    on the session's own stream (see the module doc)."""

    def __init__(self, batcher: Batcher, stream: Stream) -> None:
        self._batcher = batcher
        self._stream: Stream | None = stream
        self._pending: collections.deque[_Call] = collections.deque()
        self._closing = False  # close() called while calls were still waiting
        self._running = 0  # calls of this session taken by the scheduler and not finished
        self._steps_run = 0  # its asynchronous steps run directly so far (in the loop or its executor)
        self.last_used = time.monotonic()

    @property
    def closed(self) -> bool:
        return self._stream is None or self._closing

    # --- blocking -------------------------------------------------------------------------
    def _do(self, x: Any, fn: Callable[[Stream], Any] | None, timeout: float | None = None) -> Any:
        """A step (fn None) or fn(stream): in this thread when the batcher runs graph calls in
        their callers' threads and this session is idle, else queued for the scheduler."""
        b = self._batcher
        if b._direct:
            stream = b._claim(self)
            if stream is not None:
                return b._run_claimed(self, stream, x, fn)
        return self._wait(b._submit(self, x, fn, timeout), timeout)

    def step(self, x: Any, timeout: float | None = None) -> Any:
        """One step; ``timeout`` (seconds): a call that has not started by then is withdrawn
        (not applied) and TimeoutError raised; one already running is waited for."""
        return self._do(self._batcher._check_step(x), None, timeout)

    def feed(self, xs: Any, timeout: float | None = None) -> Any:
        return self._do(None, _feed_of(xs), timeout)

    def get_state(self) -> Any:
        return self._do(None, lambda s: s.get_state())

    def set_state(self, state: Any) -> None:
        self._do(None, lambda s: s.set_state(state))

    def reset(self) -> None:
        self._do(None, lambda s: s.reset())

    def fork(self) -> Session:
        """A new session of the same batcher starting from a copy of this one's state."""
        return self._batcher._adopt(self._do(None, lambda s: s.fork()))

    def close(self) -> None:
        """Frees the session's state; calls already submitted still run."""
        self._batcher._close_session(self)

    # --- asyncio --------------------------------------------------------------------------
    async def astep(self, x: Any) -> Any:
        return await self._acall(self._batcher._check_step(x), None)

    async def afeed(self, xs: Any) -> Any:
        return await self._acall(None, _feed_of(xs))

    async def _acall(self, x: Any, fn: Callable[[Stream], Any] | None) -> Any:
        b = self._batcher
        if b._direct:
            # claimed here, in the loop's thread, so that calls keep the order they were made in
            stream = b._claim(self)
            if stream is not None:
                # a stream's first steps plan and bind its program: never timed, never a probe
                warm = fn is None and self._steps_run > 2
                if fn is None:
                    self._steps_run += 1
                if fn is None and (b._inline_steps or (warm and b._inline_probe_due())):  # a short step: in
                    # the loop, cheaper than a hand-off (or, now and then, a timed probe whether steps are short again)
                    t0 = time.perf_counter()
                    try:
                        return b._run_claimed(self, stream, x, None)
                    finally:
                        if warm:
                            b._timed_inline(time.perf_counter() - t0)
                # else a worker thread of the loop's executor runs it (claimed: nothing overtakes it)
                return await asyncio.get_running_loop().run_in_executor(None, b._run_claimed, self, stream, x, fn)
        return await b._submit_async(self, x, fn)

    def _wait(self, call: _Call, timeout: float | None) -> Any:
        if not call.done.wait(timeout):
            if self._batcher._withdraw(call):
                raise TimeoutError(f"the call did not run within {timeout} s; it was withdrawn (not applied)")
            call.done.wait()  # already running: it will be applied, so wait for it rather than lose it
        if call.error is not None:
            raise call.error
        return call.result



# Graph steps stay batched (Batcher(batch_graphs=None)) when a batch's run costs at most this
# share of the same steps run alone (measured once, on the first batch of each shape). Well
# below 1: the Python scheduler also joins and splits every batch on one thread, while steps
# not batched run in their callers' threads on every core. Measured on 2 cores (64 client
# threads, benchmarks/bench_batcher.py): the demo char LM's batch of 8 runs in ~0.5 of its
# steps alone, yet batched it gave 0.3-0.5x the steps/s of the same sessions not batched.
_BATCH_PAYS = 0.3
_PROBE_ROWS = 8  # rows of the batch that decides it before sessions come together (Batcher._probe)

# A direct asynchronous step (graph steps not batched) runs inside the event loop while steps
# take at most this long (s); after a longer one, in the loop's executor (a thread hand-off
# costs ~50-100 µs: more than a short step itself).
_INLINE_MAX = 0.0005
# While they run in the executor, one step in this many runs in the loop, timed (the gap
# doubles after each probe that finds a long step, up to the max; a short one resets it).
_INLINE_PROBE_GAP, _INLINE_PROBE_GAP_MAX = 32, 4096


def _best_of(n: int, fn: Callable[[], Any]) -> float:
    """The shortest of n timed calls of fn (seconds)."""
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _feed_of(xs: Any) -> Callable[[Stream], Any]:
    return lambda s: s.feed(xs)


_STACK_ATTRS = {"hidden_size", "direction", "activations", "activation_alpha", "activation_beta", "clip",
                "input_forget", "linear_before_reset"}


def layer_stack_of(model: Model) -> LayerModel | None:
    """The layer-stack model a converted graph is, when it is exactly what rnnengine.save
    writes for one (rnnengine/frontend/layer_export.py): input X (T, batch, I); per layer a
    forward LSTM / GRU / RNN with no initial state or lengths, a Transpose (0, 2, 1, 3) and a
    Reshape to (T, batch, H); output Y; float32 kernels. Else None. Its weights are copies
    (a memory-mapped file changing later cannot reach them). The batcher serves such a
    weight file with its C engine; the caller checks a few steps of both agree."""
    import rnnengine as _rnne
    if not isinstance(model, GraphModel) or getattr(model, "weight_dtype", None) != "float32":
        return None
    nodes, tensors = model.graph.get("nodes") or [], model.tensors
    if [i["name"] for i in model.inputs] != ["X"] or list(model.outputs) != ["Y"] or model.state_pairs \
            or not nodes or len(nodes) % 3:
        return None
    x, layers = "X", []
    for k in range(len(nodes) // 3):
        rec, tr, rs = nodes[3 * k:3 * k + 3]
        attrs = dict(rec.get("attrs") or {})
        ins = list(rec.get("inputs") or [])
        if rec.get("op") not in ("LSTM", "GRU", "RNN") or len(ins) not in (3, 4) or ins[0] != x \
                or not set(attrs) <= _STACK_ATTRS or attrs.get("direction", "forward") != "forward" \
                or len(rec.get("outputs") or []) != 1 or any(n and n not in tensors for n in ins[1:]):
            return None
        p = rec["outputs"][0]
        H = attrs.get("hidden_size")
        rs_in = list(rs.get("inputs") or [])
        merge = tensors.get(rs_in[1]) if len(rs_in) == 2 else None
        if tr.get("op") != "Transpose" or tr.get("inputs") != [p] or (tr.get("attrs") or {}).get("perm") != [0, 2, 1, 3] \
                or rs.get("op") != "Reshape" or merge is None or rs_in[0] != (tr.get("outputs") or [None])[0] \
                or [int(v) for v in np.asarray(merge).reshape(-1)] != [0, 0, H] or (rs.get("attrs") or {}):
            return None
        W, R = (np.array(tensors[n], np.float32) for n in ins[1:3])
        B = np.array(tensors[ins[3]], np.float32) if len(ins) == 4 and ins[3] else None
        attrs.pop("hidden_size", None)
        try:
            layers.append(getattr(_rnne, rec["op"])(W, R, B, **attrs))
        except Exception:  # anything the layer classes do not take: not a plain stack
            return None
        x = rs["outputs"][0]
    if x != "Y":
        return None
    try:
        stack = LayerModel(layers, threads=int(getattr(model, "threads", 1) or 1))
    except Exception:
        return None
    return stack if stack.input_size == model.inputs[0]["shape"][-1] else None


class Batcher:
    """Serves many sessions of one model, gathering their steps into batched calls (see the
    module doc). Use as a context manager, or call close().

    max_batch: sessions per batched call. max_wait_us: how long the first waiting step may
    wait for others to join (a batch runs at once when every open session has a step
    waiting). threads: threads of each batched call of a layer-stack model (its products
    split by gate rows; a converted graph runs with its model's own threads). idle_timeout:
    seconds after which an unused session is closed. max_queue: calls waiting or running at
    most (more callers wait). max_sessions: sessions open at most (open() beyond raises).
    batch_graphs (a converted graph whose steps can be batched): None, batched while that
    pays (the first batch of each shape is timed against its steps alone; when it costs more
    than 0.3 of them, the sessions go on in their callers' threads); True, always batched;
    False, never: each session's calls run in the thread that makes them, on every core
    (asyncio: a step in the event loop while steps take under 0.5 ms, else in its executor;
    a chunk in its executor)."""

    def __init__(self, model: Model, max_batch: int = 64, max_wait_us: float = 200.0, threads: int = 1,
                 idle_timeout: float | None = None, max_queue: int = 4096, max_sessions: int = 65536,
                 batch_graphs: bool | None = None) -> None:
        if not isinstance(model, Model):
            raise TypeError(f"model must be a rnnengine.Model, got {type(model).__name__}")
        for name, v, lo, hi in (("max_batch", max_batch, 1, 1 << 20), ("threads", threads, 1, 1024),
                                ("max_queue", max_queue, 1, 1 << 30),
                                ("max_sessions", max_sessions, 1, BATCH_MAX_SLOTS)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
        if not 0 <= max_wait_us <= 10_000_000:
            raise ValueError(f"max_wait_us must lie in [0, 1e7] (10 s), got {max_wait_us!r}")
        if idle_timeout is not None and not 0 < idle_timeout < 1e9:
            raise ValueError(f"idle_timeout must be positive seconds or None, got {idle_timeout!r}")
        if batch_graphs not in (None, True, False):
            raise ValueError(f"batch_graphs must be None (measure), True or False, got {batch_graphs!r}")
        self.model = model
        self.batch_graphs = batch_graphs
        self.max_batch, self.threads, self.max_queue = int(max_batch), int(threads), int(max_queue)
        self.max_sessions = int(max_sessions)
        self.max_wait = float(max_wait_us) * 1e-6
        self.idle_timeout = idle_timeout
        probe = model.stream(batch_size=1)  # a model that cannot stream is refused here, naming why
        # converted graphs: batched when their state is explicit graph I/O (decided per shapes)
        self.graph_batching: str | None = None if isinstance(model, GraphModel) else "not a converted graph"
        self._lock = threading.RLock()
        self._sessions: set[Session] = set()
        self._closed = False
        self._counts = {"steps": 0, "batches": 0, "calls": 0, "largest_batch": 0, "most_queued": 0,
                        "sessions_opened": 0, "sessions_timed_out": 0}
        self._core: _core.BatchCore | None = None
        # a layer stack (or a converted graph that is exactly one, e.g. a saved layer stack):
        # the C slots and scheduler (module doc); sessions of such a graph keep its calling
        # convention (a step takes (1, input_size) and gives (1, output_size), a dict gives a dict)
        stack_model = model if isinstance(model, LayerModel) else self._stack_of_graph(model)
        self._graph_io = stack_model is not None and stack_model is not model
        stack = getattr(stack_model, "_stack", None)
        if stack_model is not None and stack is not None and stack.input_size == stack_model.input_size:
            self._stack_model: LayerModel = stack_model
            self.graph_batching = None
            self._initial = np.ascontiguousarray(stack_model.stream().get_state_vector(), np.float32)  # type: ignore[attr-defined]
            self._core = _core.BatchCore(stack, self.max_batch, float(max_wait_us), self.max_queue,
                                         self.max_sessions, self.threads)
            self._inflight: dict[int, tuple[_SlotSession, asyncio.Future[Any], asyncio.AbstractEventLoop,
                                            np.ndarray, np.ndarray]] = {}
            self._notifier: threading.Thread | None = None
            self._pipe: tuple[int, int] | None = None  # the scheduler's wake-up byte for event loops (_watch)
            self._watched: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, bool] = weakref.WeakKeyDictionary()
            self._last_loop: asyncio.AbstractEventLoop | None = None  # the last loop _watch saw (a fast check)
            self._stopping = threading.Event()
            self._sweeper: threading.Thread | None = None
            if idle_timeout is not None:
                self._sweeper = threading.Thread(target=self._sweep_slots, name="rnnengine-batcher-idle", daemon=True)
                self._sweeper.start()
            del probe
            return
        del probe
        # a converted graph's calls run in their callers' threads (_QueuedSession._direct) when its
        # steps are not batched: never slower than the scheduler running them one by one
        self._direct = False
        self._direct_running = 0  # calls running in their callers' threads (_claim)
        self._probed = False  # the lone-session batching probe ran (_probe)
        self._inline_steps = True  # direct asynchronous steps run in the event loop while they are short
        self._inline_mean = 0.0  # their decaying mean duration (s)
        self._inline_probe_in = 0  # (steps in the executor) steps until the next one runs in the loop, timed
        self._inline_probe_gap = _INLINE_PROBE_GAP
        if batch_graphs is False:
            self._no_batching("batch_graphs=False: sessions run in their callers' threads")
        elif batch_graphs is None and self.max_batch < 2:
            self._no_batching("max_batch=1: nothing to batch, so sessions run in their callers' threads")
        self._graph_plans: dict[Any, Any] = {}
        self._graph_ctx: dict[int, Any] = {}
        self._feeds_ok: set[Any] = set()
        self._cond = threading.Condition(self._lock)  # the scheduler waits on it for work
        self._ready: collections.OrderedDict[_QueuedSession, None] = collections.OrderedDict()  # sessions with work
        self._room = threading.Condition(self._lock)  # callers wait on it for a queue slot
        self._queued = 0
        self._first_wait: float | None = None
        self._last_sweep = 0.0
        self._thread = threading.Thread(target=self._run, name="rnnengine-batcher", daemon=True)
        self._thread.start()

    @staticmethod
    def _stack_of_graph(model: Model) -> LayerModel | None:
        """layer_stack_of(model), used only when a few random steps of both agree within
        BATCHED_ATOL-sized rounding (1e-6): a graph the match misreads is never served by it."""
        stack = layer_stack_of(model)
        if stack is None:
            return None
        rng = np.random.default_rng(13)
        xs = rng.standard_normal((4, stack.input_size)).astype(np.float32)
        graph_stream, stack_stream = model.stream(), stack.stream()
        for x in xs:
            want = np.asarray(graph_stream.step(x[None]))
            got = stack_stream.step(x)[None]
            if want.shape != got.shape or not np.allclose(got, want, rtol=0, atol=1e-6):
                return None
        return stack

    def _graph_row(self, x: Any) -> Any:
        """A converted graph's step input ({"X": (1, input_size)} or the array) as one row."""
        a = _only_x(x) if type(x) is dict else x
        shape = np.shape(a)
        if len(shape) != 2 or shape[0] != 1:
            raise ValueError(f"input 'X' of a step must have shape (1, {self._stack_model.input_size}) (a batch "
                             f"of one row of features), got {shape}")
        return np.asarray(a)[0]

    @staticmethod
    def _graph_out(x: Any, y: np.ndarray) -> Any:
        return {"Y": y} if type(x) is dict else y

    @property
    def counters(self) -> dict[str, int]:
        """steps (stepped in batches), batches, calls (every call run), largest_batch,
        most_queued (calls waiting or running at once, at most), sessions_opened,
        sessions_timed_out."""
        with self._lock:
            out = dict(self._counts)
        if self._core is not None:
            c = self._core.counters
            out.update(steps=c["steps"], batches=c["batches"], largest_batch=c["largest_batch"],
                       most_queued=c["most_queued"], calls=c["steps"] + out["calls"])
        return out

    # --- sessions -------------------------------------------------------------------------
    def open(self, state: Any = None) -> Session:
        """A new session (its own stream of one row), from the model's initial state or from
        ``state`` (a stream's get_state() structure)."""
        if self._core is not None:
            vec = self._initial if state is None else \
                np.ascontiguousarray(self._stack_model._pack_state(state, 1), np.float32)
            return self._open_slot(vec)
        stream = self.model.stream(batch_size=1)
        if state is not None:
            stream.set_state(state)
        return self._adopt(stream)

    def _add(self, make: Callable[[], Session]) -> Session:
        """A new session from make(), counted, when the batcher is open and has room."""
        with self._lock:
            if self._closed:
                raise SessionClosedError("this batcher is closed")
            if len(self._sessions) >= self.max_sessions:
                raise RuntimeError(f"max_sessions ({self.max_sessions}) sessions are open; close some or raise "
                                   "Batcher(max_sessions=)")
            s = make()
            self._sessions.add(s)
            self._counts["sessions_opened"] += 1
            return s

    def _open_slot(self, vec: np.ndarray) -> Session:
        core = self._core
        assert core is not None
        return self._add(lambda: _SlotSession(self, core.open(vec)))

    def _forget(self, s: Session) -> None:
        with self._lock:
            self._sessions.discard(s)

    def _adopt(self, stream: Stream) -> Session:
        return self._add(lambda: _QueuedSession(self, stream))

    def _close_session(self, s: _QueuedSession) -> None:
        with self._cond:
            self._sessions.discard(s)
            if s._pending:
                s._closing = True  # its stream is dropped once the calls it submitted ran
            else:
                s._stream = None

    def _claim(self, s: _QueuedSession) -> Stream | None:
        """Direct mode: the session's stream, marked running, when it has no call waiting or
        running (its calls keep their order); None when it has (the call is queued instead)."""
        with self._lock:
            if self._closed:
                raise SessionClosedError("this batcher is closed")
            if s._stream is None or s._closing or s not in self._sessions:
                raise SessionClosedError("this session is closed (by close(), or after idle_timeout)")
            if s._pending or s._running:
                return None
            s._running += 1
            s.last_used = time.monotonic()
            self._direct_running += 1
            return s._stream

    def _timed_inline(self, seconds: float) -> None:
        """An asynchronous step run inside the event loop took this long. Once steps take
        longer than _INLINE_MAX on average, they go to the loop's executor (the loop must not
        be held up by long steps); once the probes (_inline_probe_due) bring the average under
        half of it, they come back (a probe weighs 0.5: three or four short ones). The average
        decays (0.9 per step) and each step counts for at most 4 x _INLINE_MAX, so a lone slow step (a pause of the machine, a collection)
        does not move them: it took a 5 ms pause to send a service's 40 µs steps to the
        executor for good, where a thread hand-off per step cost more than the step."""
        w = 0.1 if self._inline_steps else 0.5  # (a probe is one step in many: it weighs more)
        mean = self._inline_mean = (1 - w) * self._inline_mean + w * min(seconds, 4 * _INLINE_MAX)
        if self._inline_steps:
            if mean > _INLINE_MAX:
                self._inline_steps = False
                self._inline_probe_in = self._inline_probe_gap = _INLINE_PROBE_GAP
        else:
            # the next probe: soon while steps are short, ever later while they are long
            self._inline_probe_gap = _INLINE_PROBE_GAP if seconds <= _INLINE_MAX else \
                min(2 * self._inline_probe_gap, _INLINE_PROBE_GAP_MAX)
            self._inline_probe_in = self._inline_probe_gap
            if mean <= _INLINE_MAX / 2:
                self._inline_steps = True

    def _inline_probe_due(self) -> bool:
        """Steps in the executor: True for the one in every _inline_probe_gap that runs in the
        loop again, timed (_timed_inline), so the choice follows the steps' cost."""
        self._inline_probe_in -= 1
        return self._inline_probe_in <= 0

    def _run_claimed(self, s: _QueuedSession, stream: Stream, x: Any, fn: Callable[[Stream], Any] | None) -> Any:
        """Runs a claimed session's call in this thread (the GIL released in C)."""
        try:
            return stream.step(x) if fn is None else fn(stream)
        finally:
            with self._cond:
                s._running -= 1
                self._direct_running -= 1
                s.last_used = time.monotonic()
                self._counts["calls"] += 1
                if self._closed and not self._direct_running:
                    self._cond.notify_all()  # close() waits for the calls running in callers' threads
                if s._closing and not s._pending:
                    s._stream = None
                if s._pending:  # a call queued meanwhile (another thread of this session): the scheduler's
                    self._cond.notify()

    @property
    def sessions(self) -> int:
        """Open sessions."""
        with self._lock:
            return len(self._sessions)

    # --- handing asynchronous steps their results -------------------------------------------
    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Makes ``loop`` collect this batcher's finished asynchronous steps itself: after a
        batch, the C scheduler writes one byte to a pipe the loop watches, and the loop's reader
        (_collect) takes the results, one wake-up per batch and no thread in between. A loop that
        cannot watch file descriptors (Windows' proactor loop) is served by the notifier thread."""
        if loop in self._watched:
            self._last_loop = loop
            return
        assert self._core is not None
        with self._lock:
            if loop in self._watched or self._closed:
                return  # (a closed batcher refuses the submit that follows)
            if self._pipe is None:
                r, w = os.pipe()
                os.set_blocking(r, False)
                os.set_blocking(w, False)  # the scheduler must never block on a full pipe
                self._pipe = (r, w)
                self._core.set_notify_fd(w)
            try:
                loop.add_reader(self._pipe[0], self._collect, loop)
                self._watched[loop] = True
                self._last_loop = loop
            except NotImplementedError:
                self._watched[loop] = False
                self._start_notifier()

    def _collect(self, here: asyncio.AbstractEventLoop | None = None) -> None:
        """The event loop's reader: hands out every finished asynchronous step."""
        core, pipe = self._core, self._pipe
        if core is None or pipe is None:
            return
        try:
            os.read(pipe[0], 4096)  # first: a batch finishing after completions() writes anew
        except OSError:  # (BlockingIOError: another watching loop took the byte)
            pass
        while True:
            done = core.completions(0.0)
            if not done:
                return
            self._hand_out(done, here)

    def _hand_out(self, done: list[tuple[int, BaseException | None]],
                  here: asyncio.AbstractEventLoop | None = None) -> None:
        """Gives each finished step's session its turn back and settles its future: at once for
        ``here`` (the loop running this), else in one call_soon_threadsafe per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
        for slot, err in done:
            entry = self._inflight.pop(slot, None)
            if entry is None:
                continue
            session, fut, loop, _row, y = entry
            session._give()  # the step is done: the session's next call may start
            by_loop.setdefault(loop, []).append((fut, y if err is None else None, err))
        for loop, items in by_loop.items():
            if loop is here:
                _settle_all(items)
                continue
            try:
                loop.call_soon_threadsafe(_settle_all, items)
            except RuntimeError:  # that caller's event loop is closed: nobody waits
                pass

    def _unwatch(self) -> None:
        """After the scheduler has stopped: hands out what is left, takes the reader off every
        watching loop and closes the pipe once no loop can read it."""
        assert self._core is not None
        with self._lock:
            pipe, self._pipe = self._pipe, None  # a second close() finds nothing to close
        if pipe is None:
            return
        while True:  # the rows run by stop(): their callers still wait
            done = self._core.completions(0.0)
            if not done:
                break
            self._hand_out(done)
        self._core.set_notify_fd(-1)
        r, w = pipe
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        later = [loop for loop, reads in list(self._watched.items()) if reads and not loop.is_closed()]
        self._watched.clear()
        self._last_loop = None
        left = [len(later)]

        def release(loop: asyncio.AbstractEventLoop | None) -> None:
            if loop is not None:
                loop.remove_reader(r)
            left[0] -= 1
            if left[0] <= 0:
                os.close(r)
                os.close(w)
        if not later:
            left[0] = 1
            release(None)
        for loop in later:
            if loop is running:
                release(loop)
                continue
            try:  # remove_reader belongs to the loop's own thread
                loop.call_soon_threadsafe(release, loop)
            except RuntimeError:  # closed meanwhile
                release(None)

    # --- the C engine's helper threads ------------------------------------------------------
    def _start_notifier(self) -> None:
        if self._notifier is None:
            with self._lock:
                if self._notifier is None:
                    self._notifier = threading.Thread(target=self._notify, name="rnnengine-batcher-async",
                                                      daemon=True)
                    self._notifier.start()

    def _notify(self) -> None:
        """Hands asynchronous steps their results: one wake-up per event loop per batch."""
        core = self._core
        assert core is not None
        while True:
            done = core.completions(0.5)
            if done is None:
                return
            self._hand_out(done)

    def _sweep_slots(self) -> None:
        """Closes sessions unused for idle_timeout (a scan at most every second)."""
        assert self.idle_timeout is not None
        while not self._stopping.wait(min(1.0, self.idle_timeout / 2)):
            now = time.monotonic()
            with self._lock:
                idle = [s for s in self._sessions if now - s.last_used > self.idle_timeout]
            for s in idle:
                assert isinstance(s, _SlotSession)
                if s._turn.acquire(blocking=False):  # not in a call now
                    try:
                        if s._slot is not None and time.monotonic() - s.last_used > self.idle_timeout:
                            s._free()
                            with self._lock:
                                self._counts["sessions_timed_out"] += 1
                    finally:
                        s._turn.release()

    # --- submitting (converted graphs) ------------------------------------------------------
    def _check_step(self, x: Any) -> Any:
        return x  # a graph step: checked by the stream when it runs

    def _enqueue(self, call: _Call, timeout: float | None = None, block: bool = True) -> bool:
        """Queues a call once a slot is free (back-pressure: at most max_queue calls wait or
        run); False when ``block`` is False and no slot is free."""
        s = call.session
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._queued >= self.max_queue and not self._closed:
                if not block:
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no room in the queue (max_queue={self.max_queue}) within {timeout} s; "
                                       "the call was not submitted")
                self._room.wait(left)
            if self._closed:
                raise SessionClosedError("this batcher is closed")
            if s._stream is None or s._closing or s not in self._sessions:
                raise SessionClosedError("this session is closed (by close(), or after idle_timeout)")
            s.last_used = time.monotonic()
            s._pending.append(call)
            self._queued += 1
            self._counts["most_queued"] = max(self._counts["most_queued"], self._queued)
            self._mark_ready(s)
            return True

    def _release(self, n: int) -> None:
        """n calls left the queue (ran, failed or were withdrawn): their slots are free."""
        with self._lock:
            self._queued -= n
            self._room.notify(n)

    def _withdraw(self, call: _Call) -> bool:
        """Takes a call back if the scheduler has not taken it yet (True), else False."""
        s = call.session
        with self._lock:
            try:
                s._pending.remove(call)
            except ValueError:
                return False
            if not s._pending:
                self._ready.pop(s, None)
                if s._closing:
                    s._stream = None
            self._queued -= 1
            self._room.notify()
            return True

    def _mark_ready(self, s: _QueuedSession) -> None:
        if s not in self._ready:
            self._ready[s] = None
            if self._first_wait is None:
                self._first_wait = time.monotonic()
        self._cond.notify()

    def _submit(self, s: _QueuedSession, x: np.ndarray | None, fn: Callable[[Stream], Any] | None,
                timeout: float | None = None) -> _Call:
        call = _Call(s, x, fn)
        self._enqueue(call, timeout)
        return call

    async def _submit_async(self, s: _QueuedSession, x: np.ndarray | None, fn: Callable[[Stream], Any] | None) -> Any:
        loop = asyncio.get_running_loop()
        call = _Call(s, x, fn)
        call.loop, call.future = loop, loop.create_future()
        # back-pressure without blocking the event loop (nothing is reserved while waiting: a
        # cancel leaks nothing)
        await _backoff_until(lambda: self._enqueue(call, block=False))
        try:
            return await call.future
        except asyncio.CancelledError:
            self._withdraw(call)  # not yet taken: never applied; already running: it is applied
            raise

    # --- the scheduler --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch: list[_Call] | None = []
            try:
                with self._cond:
                    batch = self._take()
                    if batch is None:
                        return
                if batch:
                    _settling.by_loop = {}
                    try:
                        self._execute(batch)
                    finally:
                        _flush_settling()
            except BaseException as e:  # never leave a caller waiting: the batch's calls get the error
                for c in batch or ():
                    c.finish(None, e)  # (a no-op for calls already finished)
                with self._lock:
                    for c in batch or ():
                        c.session._running -= 1
                self._release(len(batch or ()))

    def _take(self) -> list[_Call] | None:
        """Waits for work; returns up to max_batch calls (the head call of each ready session),
        or None once closed and drained. Called with the lock held."""
        while True:
            if self.idle_timeout is not None:
                self._sweep_idle()
            takeable = [s for s in self._ready if not s._running]  # (a direct call runs: later)
            if not takeable:
                if self._closed and not self._ready:
                    return None
                self._cond.wait(timeout=None if self.idle_timeout is None else min(self.idle_timeout, 1.0))
                continue
            waited = time.monotonic() - (self._first_wait or 0.0)
            everyone = len(takeable) >= min(self.max_batch, max(len(self._sessions), 1))
            if self._closed or everyone or waited >= self.max_wait:
                break
            self._cond.wait(timeout=self.max_wait - waited)
        calls = []
        for s in takeable[:self.max_batch]:
            calls.append(s._pending.popleft())
            s._running += 1
            del self._ready[s]
            if s._pending:  # more work: back in line, behind the others (fairness)
                self._ready[s] = None
        self._first_wait = time.monotonic() if self._ready else None
        return calls

    def _sweep_idle(self) -> None:
        """Closes sessions unused for idle_timeout (at most one scan a second: a scan visits
        every open session)."""
        now = time.monotonic()
        assert self.idle_timeout is not None
        if now - self._last_sweep < min(1.0, self.idle_timeout / 2):
            return
        self._last_sweep = now
        for s in [s for s in self._sessions if isinstance(s, _QueuedSession)
                  and not s._pending and not s._running and now - s.last_used > self.idle_timeout]:
            self._sessions.discard(s)
            s._stream = None
            self._counts["sessions_timed_out"] += 1

    def _execute(self, calls: list[_Call]) -> None:
        steps = [c for c in calls if c.fn is None and c.x is not None]
        others = [c for c in calls if not (c.fn is None and c.x is not None)]
        if len(steps) == 1 and self.batch_graphs is None and not self._probed and self.graph_batching is None:
            self._probe(steps[0])  # (a lone session: does batching pay? if not, it goes on in its thread)
        if len(steps) > 1 and self.graph_batching is None:
            others = self._run_graph_steps(steps) + others
        else:
            others = steps + others
        for c in others:
            stream = c.session._stream
            try:
                if stream is None:
                    raise SessionClosedError("this session is closed")
                elif c.fn is None:
                    c.finish(stream.step(c.x))
                else:
                    c.finish(c.fn(stream))
            except Exception as e:  # the error belongs to the session that sent the call
                c.finish(None, e)
        now = time.monotonic()
        with self._lock:
            self._counts["calls"] += len(calls)
            for c in calls:
                c.session._running -= 1
                c.session.last_used = now  # a long call does not count as idle time
                if c.session._closing and not c.session._pending:
                    c.session._stream = None
        self._release(len(calls))

    def _probe(self, call: _Call) -> None:
        """Decides whether batching pays (batch_graphs=None) before sessions come together: a
        batch of _PROBE_ROWS forks of this call's session, stepped with its input, is checked
        and timed like a first batch (_run_graph_steps). Not counted in the counters."""
        stream = call.session._stream
        if not isinstance(stream, GraphStream) or stream._taxes is None or \
                not all(a in stream._carried for a in stream._carried_names):
            return  # a session's first step decides its time axes and makes its state: the next one probes
        self._probed = True
        try:
            self._run_graph_steps([_Call(_QueuedSession(self, stream.fork()), call.x, None)
                                   for _ in range(_PROBE_ROWS)], probe=True)
        except Exception:  # the probe only informs the decision: the call itself runs as usual
            pass

    def _run_graph_steps(self, steps: list[_Call], probe: bool = False) -> list[_Call]:
        """Single steps of a converted graph's sessions as one run (see the module doc);
        returns the calls it could not batch, which then run one by one. probe (_probe): the
        batch is not counted, and its check does not stand for the shape's first batch (its
        rows are one session's forks, alike: a graph mixing rows could pass it)."""
        m = self.model
        assert isinstance(m, GraphModel)
        ready, rest = [], []
        for c in steps:
            s = c.session._stream
            if isinstance(s, GraphStream) and s._taxes is not None and not s._layer_state and not s._aux \
                    and not s._finished and all(a in s._carried for a in s._carried_names):
                ready.append(c)
            else:
                rest.append(c)  # a first step (decides the time axes), or state beyond explicit inputs
        if len(ready) < 2:
            return rest + ready
        first = ready[0].session._stream
        assert isinstance(first, GraphStream)
        taxes = first._taxes or {}
        names = m.feed_names
        try:
            per = []
            for c in ready:
                x = c.x if isinstance(c.x, dict) else {names[0]: c.x} if len(names) == 1 else None
                if x is None or set(x) != set(names):
                    return rest + ready
                feeds = {n: np.expand_dims(np.asarray(v), taxes[n]) if n in taxes else np.asarray(v)
                         for n, v in x.items()}
                s = c.session._stream
                assert isinstance(s, GraphStream)
                feeds.update({a: s._carried[a] for a in s._carried_names})
                key = tuple((n, a.shape, a.dtype.str, a.flags.c_contiguous) for n, a in sorted(feeds.items()))
                if key in self._feeds_ok:  # these shapes and dtypes passed the model's checks unchanged
                    per.append(feeds)
                    continue
                checked = m._check_feeds(feeds)
                if all(checked[n].dtype == a.dtype and checked[n].shape == a.shape and a.flags.c_contiguous
                       for n, a in feeds.items()):
                    self._feeds_ok.add(key)
                per.append(checked)
            sig = tuple((n, a.shape, a.dtype.str) for n, a in sorted(per[0].items()))
            if any(tuple((n, a.shape, a.dtype.str) for n, a in sorted(f.items())) != sig for f in per):
                return rest + ready  # sessions with other shapes: one by one
            plan = self._graph_plan(sig, per[0], len(per))
            if plan is None:
                return rest + ready
            axes, out_axes = plan
            joined = {n: np.concatenate([f[n] for f in per], axis=axes[n]) for n in per[0]}
            if m.mapped_file is not None:  # a memory-mapped weight file: checked before every run
                m.mapped_file.check_unchanged()
            run_plan = m.plan(joined)
            ctx = self._graph_ctx.get(id(run_plan))
            if ctx is None or ctx[0] is not run_plan:  # buffers reused from batch to batch, as a stream's
                if len(self._graph_ctx) >= 8:
                    self._graph_ctx.clear()
                ctx = self._graph_ctx[id(run_plan)] = (run_plan, run_plan.context())
            out = run_plan.execute(ctx[1], joined, {})  # (copies of the outputs)
        except Exception:  # anything unexpected: the sessions go one by one (their errors stay theirs)
            return rest + ready
        results = []
        for i, c in enumerate(ready):
            s = c.session._stream
            assert isinstance(s, GraphStream)
            res = {o: v[(slice(None),) * out_axes[o] + (slice(i, i + 1),)] for o, v in out.items()}
            # the next state as arrays the stream owns: contiguous copies, never views of the joined
            # output (a stream writes its next state into the buffer it carried the call before,
            # double-buffered: a view of a row of `out` made it write over memory it does not own)
            carried = {a: np.array(res[o], order="C", copy=True) for a, o in m.state_pairs}
            for o, tax in s.output_axes.items():
                v = res.get(o)
                if tax is not None and v is not None and tax < v.ndim and v.shape[tax] == 1:
                    res[o] = np.squeeze(v, axis=tax)
            results.append((c, s, res, carried))
        # checked once per shapes and per number of rows joined (a graph whose rows interact,
        # say through its batch size used as a value, can agree at one row count only)
        if ("checked", sig, len(ready)) not in self._graph_plans:
            # the first batch of these shapes: every session also stepped alone (on a fork) and
            # compared; any difference turns graph batching off for good (every kernel computes a
            # row with the same sums whatever rows share the call, src_c/pack.c, so rows that are
            # independent give the same bits batched as alone; a difference means they interact)
            t_alone = 0.0  # one session's step alone (warm, best of 3) times the batch's rows
            for c, s, res, carried in results:
                alone = s.fork()
                x = c.x if isinstance(c.x, dict) else {names[0]: c.x}
                want = alone.step(x)
                pairs = [(res[o], want[o]) for o in want] + [(carried[a], alone._carried[a]) for a in carried]
                if not all(g.shape == w.shape and g.dtype == w.dtype and np.array_equal(g, w, equal_nan=True)
                           for g, w in pairs):
                    self._no_batching("a batched step differed from the same step alone; steps run one by one")
                    return rest + ready
                if self.batch_graphs is None and not t_alone:  # warm: the fork's next steps
                    t_alone = len(results) * _best_of(3, lambda: alone.step(x))
            if not probe:
                self._graph_plans[("checked", sig, len(ready))] = True
            if self.batch_graphs is None:
                # batching pays when a batch costs clearly less than its rows alone (an LSTM's
                # products: yes; convolutions, whose cost per row does not drop: no). When it
                # does not, the rows are better run alone in their callers' threads, on both cores.
                t_batch = _best_of(2, lambda: run_plan.execute(ctx[1], {n: np.concatenate([f[n] for f in per],
                                                                                           axis=axes[n])
                                                                        for n in per[0]}, {}))
                if t_batch > _BATCH_PAYS * t_alone:
                    self._no_batching(f"a batch of {len(ready)} steps took {t_batch * 1e6:.0f} µs, the same steps "
                                      f"alone {t_alone * 1e6:.0f} µs: batching does not pay for this model, so "
                                      "sessions run in their callers' threads")
        if not probe:
            self._counts["steps"] += len(ready)
            self._counts["batches"] += 1
            self._counts["largest_batch"] = max(self._counts["largest_batch"], len(ready))
        for c, s, res, carried in results:
            s._carried.update(carried)
            s._fast = None
            c.finish(m._as_returned(c.x, res))
        return rest

    def _no_batching(self, reason: str) -> None:
        """Graph steps are not batched from now on (``graph_batching`` says why): each session's
        calls then run in its caller's thread (_QueuedSession._direct), the GIL released in C,
        rather than one after another in the scheduler thread."""
        self.graph_batching = reason
        self._direct = True

    def _graph_plan(self, sig: Any, feeds: dict[str, np.ndarray], n: int) -> tuple[dict[str, int], dict[str, int]] | None:
        """(input batch axes, output batch axes) for joining n sessions of these shapes, or None
        (and graph_batching says why) when it cannot be proven exact. Cached per shapes."""
        key = (sig, n > 1)
        if key in self._graph_plans:
            return self._graph_plans[key]  # type: ignore[no-any-return]
        m = self.model
        assert isinstance(m, GraphModel)
        plan = None
        roles = axis_roles(m)
        declared = {i["name"]: i["shape"] for i in m.inputs}

        def batch_axis(name: str) -> int | None:
            known = next((k for k, r in roles.get(name, {}).items() if r == "batch"), None)
            if known is not None:
                return known
            # else the one axis of size 1 the declaration leaves open (analyse() then proves it)
            shape = declared.get(name)
            open_ones = [k for k in range(feeds[name].ndim) if feeds[name].shape[k] == 1
                         and (shape is None or k >= len(shape) or not isinstance(shape[k], int))]
            return open_ones[0] if len(open_ones) == 1 else None
        axes = {name: batch_axis(name) for name in feeds}
        if _length_inputs(m):
            self._no_batching("the graph takes sequence lengths, which streams count per chunk")
        elif any(a is None or feeds[name].shape[a] != 1 for name, a in axes.items()):
            self._no_batching("an input's batch axis is not known (or a session has more than one row)")
        else:
            joined = {name: np.concatenate([a, a], axis=axes[name]) for name, a in feeds.items()}
            try:
                out_axes = split.analyse(m, joined, axes)  # type: ignore[arg-type]
                plan = (axes, out_axes)
            except split.NotSplittable as e:
                self._no_batching(f"the rows of a batch are not provably independent: {e}")
        self._graph_plans[key] = plan
        return plan  # type: ignore[return-value]

    # --- shutdown -------------------------------------------------------------------------
    def close(self) -> None:
        """Runs the calls already submitted, then stops; every session is closed."""
        with self._lock:
            self._closed = True
        if self._core is not None:
            self._core.stop()  # the rows already queued run first
            if self._notifier is not None:
                self._notifier.join()
            self._unwatch()
            self._stopping.set()
            if self._sweeper is not None:
                self._sweeper.join()
            with self._lock:
                for s in self._sessions:
                    assert isinstance(s, _SlotSession)
                    s._closing = True
                self._sessions.clear()
            return
        with self._cond:
            self._cond.notify_all()
        self._thread.join()
        with self._cond:
            while self._direct_running:  # calls running in their callers' threads finish first
                self._cond.wait()
            for s in self._sessions:
                assert isinstance(s, _QueuedSession)
                s._stream = None
            self._sessions.clear()

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
