"""`rnnengine serve MODEL`: a streaming server over the session batcher (extra `[server]`).

Network part: aiohttp (one well-kept library that serves HTTP and WebSocket from one asyncio
event loop, with graceful shutdown built in; the engine work runs in the batcher's scheduler
thread and in executor threads, so the event loop never blocks on compute).

Endpoints:
- ``GET /stream`` (WebSocket): one connection is one session of the model (its own state).
  Binary frames carry one array (the header below); the reply is the session's first output
  that is not fed back as state. Text frames carry JSON: ``{"op": "step"|"feed", "x": [...]}``
  or ``{"op": "step"|"feed", "inputs": {name: [...]}}`` -> ``{"outputs": {name: [...]}}``;
  ``{"op": "reset"}`` -> ``{"ok": true}``. A malformed frame gets ``{"error": "..."}`` and the
  connection stays usable; closing the connection frees the session.
- ``POST /run``: a whole-sequence run, JSON ``{"inputs": {name: [...]}}`` (or ``{"x": [...]}``)
  -> ``{"outputs": {name: [...]}}``.
- ``GET /health``: ``{"status": "ok", "sessions": n, ...}``.
- ``GET /metrics``: counters in the Prometheus text format (sessions open, steps, batches,
  largest batch, step latency quantiles).

Binary frame (all integers little-endian)::

    offset  size     field
    0       4        magic b"RNS1"
    4       1        kind: 0 = step, 1 = feed (client -> server); 2 = output (server -> client)
    5       1        dtype: 0 = float32, 1 = int64, 2 = int32
    6       1        ndim, 0..8
    7       1        reserved, 0
    8       4*ndim   dims, uint32 each
    8+4*ndim         the data, C order (exactly prod(dims) * itemsize bytes)
"""
from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import socket
import struct
import sys
import time
from typing import Any

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from rnnengine.errors import SessionClosedError
from rnnengine.runtime.base import Model
from rnnengine.runtime.batcher import Batcher, Session

MAGIC = b"RNS1"
KIND_STEP, KIND_FEED, KIND_OUTPUT = 0, 1, 2
DTYPES: dict[int, np.dtype[Any]] = {0: np.dtype("<f4"), 1: np.dtype("<i8"), 2: np.dtype("<i4")}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
MAX_NDIM = 8


class FrameError(ValueError):
    """A binary frame that does not follow the format above."""


_HEAD = struct.Struct("<4sBBBB")  # magic, kind, dtype, ndim, reserved
_DIMS = [struct.Struct(f"<{n}I") for n in range(MAX_NDIM + 1)]
_LITTLE = sys.byteorder == "little"
# encode_frame's headers by (kind, dtype, shape): a session's replies all have one shape, and
# building the header costs more than the data's bytes; bounded (cleared when full)
_HEADERS: dict[tuple[int, np.dtype[Any], tuple[int, ...]], bytes] = {}
_HEADERS_MAX = 256


def encode_frame(arr: np.ndarray, kind: int = KIND_OUTPUT) -> bytes:
    """One array as a binary frame."""
    if type(kind) is not int or kind not in (KIND_STEP, KIND_FEED, KIND_OUTPUT):
        raise FrameError(f"frame kind {kind!r}: 0 (step), 1 (feed) or 2 (output)")
    a = arr if type(arr) is np.ndarray else np.asarray(arr)
    key = (kind, a.dtype, a.shape)
    head = _HEADERS.get(key)
    if head is not None:  # a dtype the frame carries as it is (tobytes() writes C order)
        return head + a.tobytes()
    code = DTYPE_CODES.get(a.dtype.newbyteorder("<"))
    if code is None:  # any other dtype travels as float32
        code = 0
    as_is = a.dtype == DTYPES[code]  # only then may the header be reused for this key
    a = a.astype(DTYPES[code], copy=False)  # (tobytes() below writes C order; a 0-d array stays 0-d)
    if a.ndim > MAX_NDIM:
        raise FrameError(f"an array of {a.ndim} dimensions; frames carry at most {MAX_NDIM}")
    head = _HEAD.pack(MAGIC, kind, code, a.ndim, 0) + _DIMS[a.ndim].pack(*a.shape)
    if as_is:
        if len(_HEADERS) >= _HEADERS_MAX:
            _HEADERS.clear()
        _HEADERS[key] = head
    return head + a.tobytes()


def decode_frame(data: bytes, max_bytes: int = 64 << 20,
                 kinds: tuple[int, ...] = (KIND_STEP, KIND_FEED)) -> tuple[int, np.ndarray]:
    """A binary frame -> (kind, array); FrameError names what is wrong. ``kinds``: the kinds
    accepted (the server takes a client's step and feed frames; a client reading the
    server's replies passes ``kinds=(KIND_OUTPUT,)``)."""
    if len(data) < 8:
        raise FrameError("a binary frame starts with the 4 bytes 'RNS1' and an 8-byte header")
    magic, kind, code, ndim, reserved = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise FrameError("a binary frame starts with the 4 bytes 'RNS1' and an 8-byte header")
    if reserved:
        raise FrameError("header byte 7 is reserved and must be 0")
    if kind not in kinds:
        raise FrameError(f"frame kind {kind}: expected {' or '.join(map(str, kinds))} "
                         "(a client sends 0 (step) or 1 (feed); the server replies 2 (output))")
    dtype = DTYPES.get(code)
    if dtype is None:
        raise FrameError(f"dtype code {code}: 0 (float32), 1 (int64) or 2 (int32)")
    if ndim > MAX_NDIM:
        raise FrameError(f"ndim {ndim}: at most {MAX_NDIM}")
    if len(data) < 8 + 4 * ndim:
        raise FrameError(f"the header announces {ndim} dims but the frame has {len(data)} bytes")
    dims = _DIMS[ndim].unpack_from(data, 8)
    n = math.prod(dims)
    need = n * dtype.itemsize
    body = len(data) - 8 - 4 * ndim
    if need > max_bytes:
        raise FrameError(f"an array of {need} bytes, more than the server takes ({max_bytes})")
    if body != need:
        raise FrameError(f"dims {list(dims)} of {dtype} need {need} bytes of data, the frame has {body}")
    arr = np.frombuffer(data, dtype, count=n, offset=8 + 4 * ndim)
    # a writable copy in the machine's byte order
    arr = arr.copy() if _LITTLE else arr.astype(dtype.newbyteorder("="))
    return kind, arr.reshape(dims)


def _tolist(v: Any) -> Any:
    return np.asarray(v).tolist()


class Server:
    """The application: one model, one batcher, the endpoints above."""

    def __init__(self, model: Model, max_batch: int = 64, max_wait_us: float = 200.0, threads: int = 1,
                 idle_timeout: float | None = 600.0, max_queue: int = 4096, max_elements: int = 1 << 22,
                 max_text_bytes: int = 4 << 20, batch_graphs: bool | None = None) -> None:
        self.model = model
        # per frame: at most max_elements input and output elements (float32: 16 MiB each by
        # default), and JSON text frames of at most max_text_bytes (JSON parsing costs ~20x)
        self.max_elements, self.max_text_bytes = int(max_elements), int(max_text_bytes)
        self.batcher = Batcher(model, max_batch=max_batch, max_wait_us=max_wait_us, threads=threads,
                               idle_timeout=idle_timeout, max_queue=max_queue, batch_graphs=batch_graphs)
        carried = {o for _, o in getattr(model, "state_pairs", [])}
        self.main_output = next((o for o in model.outputs if o not in carried), model.outputs[0])
        self.latencies: collections.deque[float] = collections.deque(maxlen=10000)
        self.counters = {"connections": 0, "frames": 0, "bad_frames": 0, "runs": 0}
        self._sockets: set[web.WebSocketResponse] = set()  # open /stream connections
        self._closing = False  # set by _shutdown: no new calls
        self._calls = 0  # frames being answered
        self.drain_seconds = 5.0  # how long shutdown waits for the calls in flight
        self.started = time.time()
        self.app = web.Application(client_max_size=64 << 20)
        self.app.add_routes([web.get("/stream", self.stream), web.post("/run", self.run),
                             web.get("/health", self.health), web.get("/metrics", self.metrics)])
        self.app.on_shutdown.append(self._shutdown)

    async def _shutdown(self, app: web.Application) -> None:
        """Graceful shutdown: no new calls start; the calls in flight finish and send their
        replies (for up to drain_seconds); then each open WebSocket is closed (GOING_AWAY,
        "server shutdown"; its handler frees its session) and the batcher stops. Without
        closing them aiohttp would wait its shutdown_timeout for handlers that only end when
        their clients leave."""
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_seconds
        while self._calls and loop.time() < deadline:
            await asyncio.sleep(0.005)
        await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
                               for ws in list(self._sockets)), return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, self.batcher.close)

    # --- one call of a session ---------------------------------------------------------------
    def _as_returned(self, res: Any) -> dict[str, Any]:
        if isinstance(res, dict):
            return res
        if isinstance(res, tuple):
            return dict(zip(self.model.outputs, res))
        return {self.main_output if len(self.model.outputs) > 1 else self.model.outputs[0]: res}

    async def _call(self, session: Session, kind: int, x: Any) -> dict[str, Any]:
        self._check_size(kind, x)
        t0 = time.perf_counter()
        res = await (session.astep(x) if kind == KIND_STEP else session.afeed(x))
        self.latencies.append(time.perf_counter() - t0)
        return self._as_returned(res)

    def _check_size(self, kind: int, x: Any) -> None:
        """Refuses a frame whose input, or (for a layer stack, known in advance) output, would
        exceed max_elements: a small frame must not make the server build a huge reply."""
        if type(x) is np.ndarray:
            n_in = x.size
        else:
            arrays = list(x.values()) if isinstance(x, dict) else [x]
            n_in = sum(int(np.asarray(a).size) for a in arrays)
        if n_in > self.max_elements:
            raise FrameError(f"{n_in} input elements in one frame, more than the server takes ({self.max_elements})")
        size_out = getattr(self.model, "output_size", None)
        size_in = getattr(self.model, "input_size", None)
        if kind == KIND_FEED and size_out and size_in:  # a layer stack: steps x outputs per step
            steps = max(1, n_in // size_in)
            if steps * size_out > self.max_elements:
                raise FrameError(f"{steps} steps of {size_out} outputs in one frame, more than the server "
                                 f"returns ({self.max_elements} elements); send smaller chunks")

    async def stream(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=64 << 20)
        self._sockets.add(ws)  # before prepare(): a shutdown starting meanwhile closes it too
        try:
            await ws.prepare(request)
            if self._closing:
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
                return ws
            session = self.batcher.open()
            self.counters["connections"] += 1
            try:
                async for msg in ws:
                    if self._closing:  # shutting down: no new calls (_shutdown closes this connection)
                        break
                    self._calls += 1  # a call in flight: _shutdown lets it send its reply first
                    try:
                        if not await self._answer(ws, session, msg):
                            break
                    except ConnectionResetError:  # the peer left (or the connection closed) mid-reply
                        break
                    finally:
                        self._calls -= 1
            finally:
                session.close()
        finally:
            self._sockets.discard(ws)
        return ws

    async def _answer(self, ws: web.WebSocketResponse, session: Session, msg: Any) -> bool:
        """Answers one frame; False when the connection is over."""
        self.counters["frames"] += 1
        try:
            if msg.type == WSMsgType.BINARY:
                kind, x = decode_frame(msg.data)
                out = await self._call(session, kind, x)
                await ws.send_bytes(encode_frame(out[self.main_output]))
            elif msg.type == WSMsgType.TEXT:
                if len(msg.data) > self.max_text_bytes:
                    raise FrameError(f"a text frame of {len(msg.data)} bytes, more than the server takes "
                                     f"({self.max_text_bytes}); use binary frames for large arrays")
                await ws.send_str(json.dumps(await self._json_call(session, msg.data)))
            elif msg.type == WSMsgType.ERROR:
                return False
        except ConnectionResetError:  # the connection is gone: nobody to answer (not a bad frame)
            raise
        except SessionClosedError as e:  # idle timeout: this connection is over
            await ws.send_str(json.dumps({"error": f"{type(e).__name__}: {e}"}))
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"session closed")
            return False
        except Exception as e:  # the frame's error goes back to its sender; the connection stays
            self.counters["bad_frames"] += 1
            await ws.send_str(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return True

    async def _json_call(self, session: Session, text: str) -> dict[str, Any]:
        try:
            req = json.loads(text)
        except json.JSONDecodeError as e:
            raise FrameError(f"a text frame must be JSON: {e}") from None
        if not isinstance(req, dict):
            raise FrameError("a text frame is a JSON object with 'op'")
        op = req.get("op")
        if op == "reset":
            await asyncio.get_running_loop().run_in_executor(None, session.reset)
            return {"ok": True}
        if op not in ("step", "feed"):
            raise FrameError(f"unknown op {op!r}: 'step', 'feed' or 'reset'")
        x = self._json_inputs(req)
        out = await self._call(session, KIND_STEP if op == "step" else KIND_FEED, x)
        return {"outputs": {k: _tolist(v) for k, v in out.items()}}

    def _json_inputs(self, req: dict[str, Any]) -> Any:
        specs = {i["name"]: i for i in getattr(self.model, "inputs", [])
                 if isinstance(i, dict) and "dtype" in i}
        if "inputs" in req:
            if not isinstance(req["inputs"], dict):
                raise FrameError("'inputs' must be an object {name: array}")
            return {k: self._json_array(v, specs[k]["dtype"] if k in specs else "float32", k)
                    for k, v in req["inputs"].items()}
        if "x" in req:
            names = self.model.input_names
            dt = specs[names[0]]["dtype"] if len(names) == 1 and names[0] in specs else "float32"
            return self._json_array(req["x"], dt, names[0] if names else "x")
        raise FrameError("give the input as 'x' (the one input) or 'inputs' ({name: array})")

    def _json_array(self, v: Any, dtype: str, name: str) -> np.ndarray:
        """A JSON value as an array of the input's dtype; integers (token ids, lengths) must be
        written as integers: 1.9 or true for an integer input is refused, not truncated."""
        arr = np.asarray(v)
        if arr.dtype == object:
            raise FrameError(f"input {name!r}: a ragged or non-numeric JSON array")
        want = np.dtype(dtype)
        if want.kind in "iu" and arr.dtype.kind not in "iu" and arr.size:
            raise FrameError(f"input {name!r} takes integers ({want}), got {arr.dtype} values")
        if want.kind == "f" and arr.dtype.kind not in "iuf" and arr.size:
            raise FrameError(f"input {name!r} takes numbers, got {arr.dtype} values")
        if arr.size > self.max_elements:
            raise FrameError(f"input {name!r} has {arr.size} elements, more than the server takes "
                             f"({self.max_elements})")
        return arr.astype(want)

    # --- HTTP --------------------------------------------------------------------------------
    async def run(self, request: web.Request) -> web.Response:
        try:
            req = await request.json()
            if not isinstance(req, dict):
                raise FrameError("the body is a JSON object with 'x' or 'inputs'")
            x = self._json_inputs(req)
            res = await asyncio.get_running_loop().run_in_executor(None, self.model.run, x)
        except Exception as e:
            return web.json_response({"error": f"{type(e).__name__}: {e}"}, status=400)
        self.counters["runs"] += 1
        out = res if isinstance(res, dict) else self._as_returned(res)
        # arrays only: a layer stack's "state" output (rnnengine.State) stays on the server
        return web.json_response({"outputs": {k: _tolist(v) for k, v in out.items() if isinstance(v, np.ndarray)}})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "sessions": self.batcher.sessions, "pid": os.getpid(),
                                  "outputs": self.model.outputs, "inputs": self.model.input_names,
                                  "uptime_s": round(time.time() - self.started, 3)})

    async def metrics(self, request: web.Request) -> web.Response:
        c = self.batcher.counters
        lat = np.array(self.latencies) if self.latencies else np.zeros(0)
        lines = [
            "# HELP rnnengine_sessions_open Sessions (WebSocket connections) open now.",
            "# TYPE rnnengine_sessions_open gauge", f"rnnengine_sessions_open {self.batcher.sessions}",
            "# HELP rnnengine_steps_total Steps run in batched calls.",
            "# TYPE rnnengine_steps_total counter", f"rnnengine_steps_total {c['steps']}",
            "# HELP rnnengine_calls_total Session calls run (steps, chunks, state calls).",
            "# TYPE rnnengine_calls_total counter", f"rnnengine_calls_total {c['calls']}",
            "# HELP rnnengine_batches_total Batched calls into the engine.",
            "# TYPE rnnengine_batches_total counter", f"rnnengine_batches_total {c['batches']}",
            "# HELP rnnengine_batch_size_max The largest batch so far.",
            "# TYPE rnnengine_batch_size_max gauge", f"rnnengine_batch_size_max {c['largest_batch']}",
            "# HELP rnnengine_sessions_timed_out_total Sessions closed after idle_timeout.",
            "# TYPE rnnengine_sessions_timed_out_total counter",
            f"rnnengine_sessions_timed_out_total {c['sessions_timed_out']}",
            "# HELP rnnengine_bad_frames_total Frames answered with an error.",
            "# TYPE rnnengine_bad_frames_total counter", f"rnnengine_bad_frames_total {self.counters['bad_frames']}",
            "# HELP rnnengine_runs_total Whole-sequence runs (POST /run).",
            "# TYPE rnnengine_runs_total counter", f"rnnengine_runs_total {self.counters['runs']}",
            "# HELP rnnengine_step_latency_seconds Session call latency over the last 10000 calls.",
            "# TYPE rnnengine_step_latency_seconds summary",
        ]
        for q in (0.5, 0.9, 0.99):
            v = float(np.quantile(lat, q)) if lat.size else 0.0
            lines.append(f'rnnengine_step_latency_seconds{{quantile="{q}"}} {v:.9f}')
        lines += [f"rnnengine_step_latency_seconds_sum {float(lat.sum()):.9f}",
                  f"rnnengine_step_latency_seconds_count {lat.size}"]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")


def loop_kind(kind: str = "auto") -> str:
    """The event loop `serve` runs on, "uvloop" or "asyncio", for a request of "uvloop"
    (libuv's loop, installed with the [server] extra where it exists: not on Windows),
    "asyncio" (the standard one) or "auto" (uvloop when it is installed). uvloop cuts the
    event loop's per-frame cost (BENCHMARKS.md, the server rows)."""
    if kind not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"the event loop must be auto, uvloop or asyncio, not {kind!r}")
    if kind == "asyncio":
        return kind
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if kind == "uvloop":
            raise ValueError("the uvloop event loop needs uvloop: pip install 'rnnengine[server]' "
                             "(uvloop does not exist on Windows)") from None
        return "asyncio"
    return "uvloop"


def serve(model: Model, host: str = "127.0.0.1", port: int = 8000, loop: str = "auto",
          sock: socket.socket | None = None, **batcher: Any) -> None:
    """Runs the server until interrupted (SIGINT/SIGTERM: the calls in flight send their
    replies, open connections are closed, then the batcher stops). loop: "auto", "uvloop" or
    "asyncio" (loop_kind()). sock: a listening socket to accept on instead of host:port (a
    worker of run_workers)."""
    kind = loop_kind(loop)
    server = Server(model, **batcher)
    ev: asyncio.AbstractEventLoop | None = None
    if kind == "uvloop":
        import uvloop
        ev = uvloop.new_event_loop()
    print(f"event loop: {kind}", flush=True)
    where: dict[str, Any] = {"sock": sock} if sock is not None else {"host": host, "port": port}
    web.run_app(server.app, print=lambda *a: print(*a, flush=True), shutdown_timeout=10.0, loop=ev, **where)


def run_workers(worker_command: list[str], host: str, port: int, workers: int, restarts: int = 5) -> int:
    """`rnnengine serve --workers N`: one listening socket on host:port, and N worker
    processes (``worker_command`` + ``--worker-fd FD``), each a whole server (its own model,
    batcher and event loop) accepting connections from that socket. One event loop runs on
    one core: its Python per frame (WebSocket framing, socket writes) and the steps it runs
    inline bound a single process, so a machine with more cores serves more sessions with
    more workers. A connection (a session) stays with the worker that accepted it. /health
    and /metrics answer for that worker (its pid is in /health).

    SIGTERM or SIGINT: each worker shuts down gracefully (its calls in flight answered, its
    connections closed), then this process returns 0. A worker that exits unexpectedly is
    started again, at most ``restarts`` times in a row when it dies within 10 s of its start
    (then every worker is stopped and this returns 1)."""
    import signal
    import subprocess
    sock = socket.create_server((host, port), backlog=1024)
    sock.set_inheritable(True)
    fd = sock.fileno()
    print(f"listening on http://{host}:{sock.getsockname()[1]} with {workers} worker processes", flush=True)
    stopping: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        stopping.append(signum)
    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def start() -> tuple[subprocess.Popen[bytes], float]:
        return subprocess.Popen([*worker_command, "--worker-fd", str(fd)], pass_fds=(fd,)), time.monotonic()
    procs = [start() for _ in range(workers)]
    failures, code = 0, 0
    try:
        while not stopping:
            time.sleep(0.1)
            for k, (proc, started) in enumerate(procs):
                if proc.poll() is None or stopping:
                    continue
                failures = failures + 1 if time.monotonic() - started < 10 else 0
                if failures > restarts:
                    print(f"rnnengine serve: a worker exited {failures} times in a row within 10 s of its "
                          f"start (last exit code {proc.returncode}); stopping", flush=True)
                    stopping.append(0)
                    code = 1
                    break
                print(f"rnnengine serve: worker {proc.pid} exited with code {proc.returncode}; starting another",
                      flush=True)
                procs[k] = start()
    finally:
        if stopping and stopping[0] == signal.SIGINT:
            # (Ctrl-C reaches the whole process group: the workers are shutting down already;
            # a second signal would cut their graceful shutdown short)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and any(p.poll() is None for p, _ in procs):
                time.sleep(0.05)
        for proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc, _ in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        sock.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return code
