"""Many live streams (issue 13's load benchmark): N concurrent clients each stepping one
session of one model, engines side by side in one run (alternated, medians of repeats):

- "batcher": rnnengine.Batcher, one session per client (client threads calling step());
- "batcher, asyncio tasks": the same, the clients being asyncio tasks in one event loop
  (``await session.astep(x)``), as in an asyncio service; "batcher, uvloop tasks": the same
  on uvloop's event loop (what aiohttp and uvicorn services commonly run on), when uvloop
  is installed and --loop is not asyncio;
- "own streams": each client steps its own rnnengine stream (no batching; the GIL is
  released in C, so they use both cores);
- "onnxruntime per client": an onnxruntime session per client, state passed out and back in
  by hand (onnxruntime is stateless);
- with --server: `rnnengine serve` started as a subprocess on a free localhost port, each
  client a WebSocket connection (aiohttp, one client process) sending binary step frames
  (rnnengine/server.py); the client process runs the event loop --loop chooses (default
  auto: uvloop when installed), the server each of --server-loops (one server and one row each).

For a layer stack, two "bound" rows give what no batcher of these clients can beat on this
machine: all the clients' rows of a step in batched calls of up to 64 rows, back to back from
one thread (no scheduling, no Python per client), on one and two threads.

Models: an LSTM I=H=256 (--model lstm), silero-vad as shipped (--model silero: the PyPI
package's ONNX file, converted; 576-sample chunks at 16 kHz) or the bundled char LM
(--model charlm). Reports steps/s and the median / p99 latency of one step per client.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_batcher.py --clients 1,8,64,256 [--model lstm] [--server]
        [--steps 100] [--repeats 2] [--compare-wake] [--plot out.png] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

import rnnengine
from rnnengine.runtime.batcher import Batcher

HERE = os.path.dirname(os.path.abspath(__file__))
# the first steps of each client are not timed, for every engine alike: planning, buffers,
# threads and the batcher's one-off decisions (the first batch of a graph is checked and
# timed against its steps alone) happen in them; the table is the steady state
WARMUP = 3


def run_threads(n, steps, body):
    """n threads, each calling body(i, k) for k in range(steps); returns (steps/s, latencies s)."""
    lat = [[] for _ in range(n)]
    spans = [(0.0, 0.0)] * n
    barrier = threading.Barrier(n)

    def work(i):
        for k in range(WARMUP):  # untimed: plans, buffers, threads and decisions made before the clock starts
            body(i, k)
        barrier.wait()
        start = time.perf_counter()
        for k in range(WARMUP, steps):
            t0 = time.perf_counter()
            body(i, k)
            lat[i].append(time.perf_counter() - t0)
        spans[i] = (start, time.perf_counter())
    th = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    # the clients' own clocks, from the first to start to the last to finish (a clock in this
    # thread started after the barrier could start late: 64 client threads hold the GIL first,
    # and one such run reported 238k steps/s for own streams that make 60-70k)
    elapsed = max(e for _, e in spans) - min(s for s, _ in spans)
    return n * (steps - WARMUP) / elapsed, np.concatenate([np.array(x) for x in lat])


async def timed_tasks(n, steps, body):
    """n asyncio tasks, each awaiting body(i, k) for k in range(steps), the first WARMUP steps
    of each untimed; returns (steps/s, latencies s)."""
    lat = [[] for _ in range(n)]
    ready = [0]
    start, warm = asyncio.Event(), asyncio.Event()

    async def one(i):
        for k in range(WARMUP):  # untimed, as in run_threads
            await body(i, k)
        ready[0] += 1
        if ready[0] == n:
            warm.set()
        await start.wait()
        for k in range(WARMUP, steps):
            t0 = time.perf_counter()
            await body(i, k)
            lat[i].append(time.perf_counter() - t0)
    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await warm.wait()  # every client's warm-up steps done: the clock starts
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    return n * (steps - WARMUP) / (time.perf_counter() - t0), np.concatenate([np.array(x) for x in lat])


def new_loop(kind):
    """A fresh event loop: "asyncio" (the standard one) or "uvloop"."""
    if kind == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def has_uvloop():
    try:
        import uvloop  # noqa: F401
        return True
    except ImportError:
        return False


def run_loop(kind, coro):
    """coro run to its end in a fresh event loop of the given kind."""
    with asyncio.Runner(loop_factory=lambda: new_loop(kind)) as r:
        return r.run(coro)


def run_tasks(n, steps, body, kind="asyncio"):
    """timed_tasks in an event loop of its own."""
    return run_loop(kind, timed_tasks(n, steps, body))


# --- models -----------------------------------------------------------------------------------

class Case:
    """A model, its per-client inputs, how a step's input is given to each engine, and an
    onnxruntime stepper factory (None when onnxruntime is missing)."""

    def __init__(self, name, model, xs, as_feed, ort_factory, path_for_server, frame=lambda x: x):
        self.name, self.model, self.xs, self.as_feed = name, model, xs, as_feed
        self.ort_factory, self.path_for_server, self.frame = ort_factory, path_for_server, frame
        self.bound_models = {}  # threads -> the same layer stack, for the "bound" rows


def lstm_case(n, steps, H, tmp):
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((1, 4 * H, H)) * 0.05).astype(np.float32)
    R = (rng.standard_normal((1, 4 * H, H)) * 0.05).astype(np.float32)
    model = rnnengine.Model([rnnengine.LSTM(W, R)])
    path = os.path.join(tmp, "lstm.rnne")
    rnnengine.save(model, path)
    xs = rng.standard_normal((n, steps, H)).astype(np.float32)
    # the server serves the saved file: a converted graph, whose step takes (1, I)
    case = Case(f"LSTM I=H={H}", model, xs, lambda x: x, lstm_ort(W, R, H), path, frame=lambda x: x[None])
    case.bound_models = {1: model, 2: rnnengine.Model([rnnengine.LSTM(W, R)], threads=2)}
    return case


def lstm_ort(W, R, H):
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    I = W.shape[2]
    ins = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 1, I]),
           helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 1, H]),
           helper.make_tensor_value_info("c0", TensorProto.FLOAT, [1, 1, H])]
    node = helper.make_node("LSTM", ["X", "W", "R", "", "", "h0", "c0"], ["Y", "Y_h", "Y_c"], hidden_size=H)
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("Y", "Y_h", "Y_c")]
    g = helper.make_graph([node], "b", ins, outs, [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    data = m.SerializeToString()

    def make():
        sess = ort_session(ort, data)
        st = {"h0": np.zeros((1, 1, H), np.float32), "c0": np.zeros((1, 1, H), np.float32)}

        def step(x):
            y, st["h0"], st["c0"] = sess.run(None, {"X": x.reshape(1, 1, I), **st})
            return y
        return step
    return make


def ort_session(ort, model):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.inter_op_num_threads = 1
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, o, providers=["CPUExecutionProvider"])


def silero_case(n, steps):
    import importlib.util
    spec = importlib.util.find_spec("silero_vad")
    if spec is None:
        sys.exit("--model silero needs the silero-vad package (pip install --no-deps silero-vad)")
    path = os.path.join(spec.submodule_search_locations[0], "data", "silero_vad.onnx")
    model = rnnengine.convert(path, fixed_inputs={"sr": 16000})
    rng = np.random.default_rng(0)
    xs = (rng.standard_normal((n, steps, 1, 576)) * 0.1).astype(np.float32)
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None

    def make():
        sess = ort_session(ort, path)
        st = {"state": np.zeros((2, 1, 128), np.float32)}
        sr = np.array(16000, np.int64)

        def step(x):
            y, st["state"] = sess.run(None, {"input": x, "sr": sr, **st})
            return y
        return step
    return Case("silero-vad (576-sample chunks)", model, xs, lambda x: {"input": x},
                make if ort is not None else None, path)


def charlm_case(n, steps):
    path = os.path.join(os.path.dirname(rnnengine.__file__), "data", "demo_charlm.onnx")
    model = rnnengine.convert(path)
    rng = np.random.default_rng(0)
    xs = rng.integers(0, 60, size=(n, steps, 1)).astype(np.int64)
    return Case("demo char LM (2x LSTM 192)", model, xs, lambda x: {"tokens": x}, None, path)


# --- the server ---------------------------------------------------------------------------------

class Server:
    """`rnnengine serve PATH` in a subprocess on a free localhost port."""

    def __init__(self, path, extra=()):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        args = [sys.executable, "-m", "rnnengine.cli", "serve", path, "--port", str(self.port), *extra]
        if path.endswith(".onnx") and "silero" in path:
            args += ["--input", "sr=16000"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=tempfile.gettempdir())
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    sys.exit(f"rnnengine serve failed:\n{self.proc.stdout.read()}")
                time.sleep(0.1)
        sys.exit("rnnengine serve did not answer /health in 60 s")

    def close(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_ws_clients(port, xs, frame, kind):
    """len(xs) WebSocket clients in one asyncio loop, each stepping its own session through
    binary frames; returns (steps/s, latencies s)."""
    import aiohttp

    from rnnengine.server import KIND_STEP, encode_frame
    n, steps = xs.shape[0], xs.shape[1]

    async def main():
        # limit=0: no cap on open connections (aiohttp's default of 100 would hold the 101st client back)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            conns = [await http.ws_connect(f"http://127.0.0.1:{port}/stream", max_msg_size=1 << 24)
                     for _ in range(n)]

            async def body(i, k):
                await conns[i].send_bytes(encode_frame(frame(xs[i, k]), KIND_STEP))
                msg = await conns[i].receive()
                if msg.type != aiohttp.WSMsgType.BINARY:
                    raise RuntimeError(f"server replied {msg.type}: {msg.data!r}")
                if msg.data[4] != 2:
                    raise RuntimeError(f"server replied with frame kind {msg.data[4]}")
            res = await timed_tasks(n, steps, body)
            for ws in conns:
                await ws.close()
            return res
    return run_loop(kind, main())


def run_bound(model, xs, steps):
    """What any batcher of these clients could reach: every client's row of a step in batched
    calls of at most 64 rows (the batcher's max_batch), called back to back from one thread,
    with no scheduling, no Python per client and no waiting. Returns (steps/s, the latency of
    one whole step of all clients)."""
    n = xs.shape[0]
    by_step = np.ascontiguousarray(xs.transpose(1, 0, 2))  # (steps, clients, I), not timed
    groups = [(lo, min(n, lo + 64)) for lo in range(0, n, 64)]
    streams = [model.stream(batch_size=hi - lo) for lo, hi in groups]
    lat = []
    for k in range(steps):
        t0 = time.perf_counter()
        for s, (lo, hi) in zip(streams, groups):
            s.step(by_step[k, lo:hi])
        if k >= WARMUP:
            lat.append(time.perf_counter() - t0)
    return n * len(lat) / sum(lat), np.array(lat)


# --- one measurement ------------------------------------------------------------------------

def measure(case, n, a, server):
    model, xs, feed = case.model, case.xs[:n], case.as_feed
    engines = {}

    def own():
        streams = [model.stream() for _ in range(n)]
        return run_threads(n, a.steps, lambda i, k: streams[i].step(feed(xs[i][k])))

    def batcher():
        with Batcher(model, max_batch=64, max_wait_us=a.max_wait_us, batch_graphs=a.batch_graphs, threads=a.threads) as b:
            sessions = [b.open() for _ in range(n)]
            res = run_threads(n, a.steps, lambda i, k: sessions[i].step(feed(xs[i][k])))
            c = b.counters
        return res + (c["steps"] / max(c["batches"], 1),)
    def batcher_tasks(kind):
        with Batcher(model, max_batch=64, max_wait_us=a.max_wait_us, batch_graphs=a.batch_graphs, threads=a.threads) as b:
            sessions = [b.open() for _ in range(n)]

            async def body(i, k):
                return await sessions[i].astep(feed(xs[i][k]))
            return run_tasks(n, a.steps, body, kind)
    engines["own streams"] = own
    engines["batcher"] = batcher
    engines["batcher, asyncio tasks"] = lambda: batcher_tasks("asyncio")
    if a.loop == "uvloop":
        engines["batcher, uvloop tasks"] = lambda: batcher_tasks("uvloop")
    if a.compare_wake:
        def burst():  # the C engine waking a batch's callers all at once (src_c/batch.c, `chain`)
            os.environ["RNNE_BATCH_BURST"] = "1"
            try:
                return batcher()
            finally:
                del os.environ["RNNE_BATCH_BURST"]
        engines["batcher, callers woken at once"] = burst
    if case.ort_factory is not None:
        def ort_clients():
            steppers = [case.ort_factory() for _ in range(n)]
            return run_threads(n, a.steps, lambda i, k: steppers[i](xs[i][k]))
        engines["onnxruntime per client"] = ort_clients
    for t, m in case.bound_models.items():
        engines[f"bound: all rows in batched calls, {t} thread{'s' if t > 1 else ''}"] = \
            lambda m=m: run_bound(m, xs, a.steps)
    for kind, srv in (server or {}).items():  # one `rnnengine serve` per event loop
        engines[f"server (WebSocket, {kind})"] = lambda srv=srv: run_ws_clients(srv.port, xs, case.frame, a.loop)
    rates = {k: [] for k in engines}
    lats = {k: [] for k in engines}
    per_batch = []
    for _ in range(a.repeats):
        for k, fn in engines.items():
            res = fn()
            rates[k].append(res[0])
            lats[k].append(res[1])
            if len(res) > 2:
                per_batch.append(res[2])
    rows = []
    for k in engines:
        lat = np.concatenate(lats[k]) * 1e6
        rows.append({"clients": n, "engine": k, "steps_per_s": float(np.median(rates[k])),
                     "p50_us": float(np.median(lat)), "p99_us": float(np.percentile(lat, 99))})
    return rows, float(np.mean(per_batch)) if per_batch else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,8,64,256", help="comma-separated client counts")
    ap.add_argument("--model", choices=["lstm", "silero", "charlm"], default="lstm")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-wait-us", type=float, default=200.0)
    ap.add_argument("--threads", type=int, default=1,
                    help="Batcher(threads=N): the threads a batched call of a layer stack splits its rows over")
    ap.add_argument("--batch-graphs", choices=["auto", "on", "off"], default="auto",
                    help="Batcher(batch_graphs=None / True / False) for a converted graph")
    ap.add_argument("--server", action="store_true", help="also through `rnnengine serve` on localhost")
    ap.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                    help="event loop of the WebSocket clients (and of the server unless --server-loops), and "
                         "whether the uvloop-tasks row is run (auto: uvloop when installed)")
    ap.add_argument("--server-loops", help="comma-separated event loops to serve on, one server and one row each "
                                           "(e.g. uvloop,asyncio; default: --loop's); LOOP:N serves with "
                                           "--workers N (e.g. uvloop:2)")
    ap.add_argument("--compare-wake", action="store_true",
                    help="also the C batcher waking a batch's callers all at once (RNNE_BATCH_BURST=1)")
    ap.add_argument("--plot", help="write a plot (throughput and p99 latency vs clients) here")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    a.batch_graphs = {"auto": None, "on": True, "off": False}[a.batch_graphs]
    if a.loop == "auto":
        a.loop = "uvloop" if has_uvloop() else "asyncio"
    clients = [int(c) for c in a.clients.split(",")]
    n_max = max(clients)
    with tempfile.TemporaryDirectory() as tmp:
        case = lstm_case(n_max, a.steps, a.hidden, tmp) if a.model == "lstm" else \
            silero_case(n_max, a.steps) if a.model == "silero" else charlm_case(n_max, a.steps)
        server = None
        if a.server:  # one server per entry: LOOP or LOOP:WORKERS (rnnengine serve --workers)
            server = {}
            for item in (a.server_loops or a.loop).split(","):
                kind, _, workers = item.partition(":")
                extra = ["--max-wait-us", str(a.max_wait_us), "--loop", kind] + (["--workers", workers] if workers else [])
                server[kind + (f", {workers} workers" if workers else "")] = Server(case.path_for_server, extra)
        print(f"{case.name}: {a.steps} steps per client, {os.cpu_count()} cores, medians of {a.repeats} "
              f"alternating repeats; WebSocket clients on {a.loop}")
        rows = []
        print("\n| clients | engine | steps/s | p50 latency µs | p99 latency µs | vs own streams | vs onnxruntime |")
        print("|---:|---|---:|---:|---:|---:|---:|", flush=True)
        try:
            for n in clients:  # each client count's rows printed as soon as measured
                got, per_batch = measure(case, n, a, server)
                base = next(r["steps_per_s"] for r in got if r["engine"] == "own streams")
                ort = next((r["steps_per_s"] for r in got if r["engine"] == "onnxruntime per client"), None)
                for r in got:
                    r["vs_own"] = r["steps_per_s"] / base
                    r["vs_ort"] = r["steps_per_s"] / ort if ort else None
                    if r["engine"] == "batcher":
                        r["steps_per_batch"] = per_batch
                    vo = "" if r["vs_ort"] is None else f"{r['vs_ort']:.2f}x"
                    print(f"| {r['clients']} | {r['engine']} | {r['steps_per_s']:,.0f} | {r['p50_us']:.0f} | "
                          f"{r['p99_us']:.0f} | {r['vs_own']:.2f}x | {vo} |", flush=True)
                rows += got
        finally:
            for srv in (server or {}).values():
                srv.close()
    print(f"\n({case.name}; batcher steps per batched call: "
          + ", ".join(f"{r['clients']} clients {r['steps_per_batch']:.1f}" for r in rows if "steps_per_batch" in r) + ")")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": case.name, "rows": rows}, f, indent=1)
    if a.plot:
        plot(rows, case.name, a.plot)


def plot(rows, title, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for engine in dict.fromkeys(r["engine"] for r in rows):
        rs = [r for r in rows if r["engine"] == engine]
        ax1.plot([r["clients"] for r in rs], [r["steps_per_s"] for r in rs], "o-", label=engine)
        ax2.plot([r["clients"] for r in rs], [r["p99_us"] / 1000 for r in rs], "o-", label=engine)
    for ax, yl in ((ax1, "steps/s (all clients)"), (ax2, "p99 latency of one step (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
