"""`rnnengine serve`: WebSocket sessions (binary and JSON frames), whole runs over HTTP,
health and Prometheus metrics; every answer compared with the model run in process."""
import asyncio
import os
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

import rnnengine  # noqa: E402
from oracle import max_violation  # noqa: E402
from rnnengine.frontend.layer_export import layers_to_onnx  # noqa: E402
from rnnengine.server import FrameError, Server, decode_frame, encode_frame  # noqa: E402

rng = np.random.default_rng(5)
I, H = 6, 8


def f32(*shape, scale=0.5):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    return rnnengine.Model([rnnengine.LSTM(f32(1, 4 * H, I), f32(1, 4 * H, H), f32(1, 8 * H))])


def with_client(model, body, **kw):
    async def main():
        server = Server(model, max_wait_us=1000, **kw)
        async with TestClient(TestServer(server.app)) as client:
            return await body(client, server)
    return asyncio.run(main())


def own_stream(model, xs):
    s = model.stream()
    return np.stack([s.step(x) for x in xs])


def test_frames_round_trip_and_hostile_frames_are_refused():
    for a in (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, -2], np.int64), np.zeros((0, 4), np.int32)):
        kind, b = decode_frame(encode_frame(a, kind=0))
        assert kind == 0 and b.dtype == a.dtype and np.array_equal(a, b)
    good = encode_frame(np.ones(3, np.float32), kind=0)
    bad = [b"", b"XXXX" + good[4:], good[:4] + bytes([9]) + good[5:], good[:5] + bytes([7]) + good[6:],
           good[:6] + bytes([200]) + good[7:], good[:-1], good + b"\0",
           b"RNS1" + struct.pack("<BBBB", 0, 0, 2, 0) + struct.pack("<2I", 2**31, 2**31)]  # 2^62 floats announced
    for frame in bad:
        with pytest.raises(FrameError):
            decode_frame(frame)


def test_frame_headers_follow_each_array():
    """encode_frame keeps the headers it built by (kind, dtype, shape): every variant, in turn
    and repeated, still round-trips exactly (the header read back independently with struct)."""
    base = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5
    variants = [base, base.T, base[:, ::2], base.astype(">f4"), base.astype(np.float64),
                base.astype(np.int64), base.astype(">i8"), base.astype(np.int32), base[0], np.float32(2.5),
                base.reshape(1, 12), base.reshape(12), base.astype(np.float16)]
    for _ in range(2):  # the second pass reads the kept headers
        for kind in (0, 1, 2):
            for a in variants:
                frame = encode_frame(a, kind=kind)
                magic, k, code, ndim, reserved = struct.unpack_from("<4sBBBB", frame)
                dims = struct.unpack_from(f"<{ndim}I", frame, 8)
                assert (magic, k, reserved, dims) == (b"RNS1", kind, 0, np.shape(a))
                _, b = decode_frame(frame, kinds=(kind,))
                want = np.asarray(a)
                want = want.astype(np.float32) if want.dtype.kind == "f" else want
                assert b.dtype == want.dtype.newbyteorder("=") and np.array_equal(b, want)
                b[...] = 0  # decoded arrays are the caller's own (writable, not views of the frame)
    for kind in (2.0, 3, -1, True, "2"):  # refused whether or not a header for kind 2 is kept
        with pytest.raises(FrameError, match="frame kind"):
            encode_frame(base, kind=kind)


def test_websocket_sessions_match_their_own_streams(model):
    xs = f32(3, 12, I, scale=1.0)

    async def body(client, server):
        return await step_connections(client, xs)
    got = with_client(model, body)
    for i in range(3):
        assert max_violation(got[i], own_stream(model, xs[i])) <= 1


async def step_connections(client, seqs):
    """One WebSocket connection per sequence, all at once, each stepping its sequence in
    binary frames; the outputs of each."""
    async def one(seq):
        ws = await client.ws_connect("/stream")
        ys = []
        for x in seq:
            await ws.send_bytes(encode_frame(x, kind=0))
            ys.append(decode_frame_reply(await ws.receive_bytes())[1])
        await ws.close()
        return np.stack(ys)
    return await asyncio.gather(*(one(seq) for seq in seqs))


def decode_frame_reply(data):
    """A server->client frame (kind 2) decoded."""
    from rnnengine.server import KIND_OUTPUT
    return decode_frame(data, kinds=(KIND_OUTPUT,))


def test_json_frames_reset_and_errors_keep_the_connection(model):
    xs = f32(4, I, scale=1.0)
    want = own_stream(model, xs)

    async def body(client, server):
        ws = await client.ws_connect("/stream")
        replies = []
        for frame in ["not json", json.dumps([1, 2]), json.dumps({"op": "jump"}), json.dumps({"op": "step"}),
                      json.dumps({"op": "step", "x": [1.0, 2.0]})]:
            await ws.send_str(frame)
            replies.append(json.loads(await ws.receive_str()))
        await ws.send_bytes(b"garbage")
        replies.append(json.loads(await ws.receive_str()))
        assert all("error" in r for r in replies), replies
        outs = []
        for x in xs[:2]:
            await ws.send_str(json.dumps({"op": "step", "x": x.tolist()}))
            outs.append(json.loads(await ws.receive_str())["outputs"]["Y"])
        await ws.send_str(json.dumps({"op": "reset"}))
        assert json.loads(await ws.receive_str()) == {"ok": True}
        await ws.send_str(json.dumps({"op": "feed", "inputs": {"X": xs[:, None, :].tolist()}}))
        fed = json.loads(await ws.receive_str())["outputs"]["Y"]
        await ws.close()
        return replies, outs, fed
    replies, outs, fed = with_client(model, body)
    assert "shape" in replies[4]["error"]
    assert max_violation(np.array(outs, np.float32), want[:2]) <= 1
    assert max_violation(np.array(fed, np.float32)[:, 0], want) <= 1  # from the reset (initial) state


def test_a_closed_connection_frees_its_session_and_metrics_count(model):
    async def body(client, server):
        ws = await client.ws_connect("/stream")
        await ws.send_bytes(encode_frame(f32(I), kind=0))
        await ws.receive_bytes()
        during = (await (await client.get("/health")).json())["sessions"]
        await ws.close()
        for _ in range(100):
            after = (await (await client.get("/health")).json())["sessions"]
            if after == 0:
                break
            await asyncio.sleep(0.02)
        metrics = await (await client.get("/metrics")).text()
        return during, after, metrics
    during, after, metrics = with_client(model, body)
    assert during == 1 and after == 0
    values = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line and not line.startswith("#"))
    assert float(values["rnnengine_steps_total"]) == 1
    assert float(values["rnnengine_sessions_open"]) == 0
    assert float(values['rnnengine_step_latency_seconds{quantile="0.5"}']) > 0


def test_http_run_matches_the_model_and_refuses_bad_bodies(model):
    x = f32(5, 2, I, scale=1.0)

    async def body(client, server):
        ok = await (await client.post("/run", json={"x": x.tolist()})).json()
        bad = await client.post("/run", json={"x": [[1.0]]})
        return ok, bad.status, await bad.json()
    ok, status, err = with_client(model, body)
    Y, _ = model.run(x)
    assert max_violation(np.array(ok["outputs"]["Y"], np.float32), Y) <= 1
    assert status == 400 and "error" in err


def test_a_converted_graph_is_served_with_its_step_convention(model):
    graph = rnnengine.convert(layers_to_onnx(model))
    xs = f32(6, 1, I, scale=1.0)  # a graph stream's step takes the batch axis

    async def body(client, server):
        return (await step_connections(client, [xs]))[0]
    got = with_client(graph, body)
    assert max_violation(got[:, 0], own_stream(model, xs[:, 0])) <= 1


@pytest.mark.parametrize("batch_graphs", [True, False])
def test_a_token_model_is_served_batched_or_in_the_loop(batch_graphs):
    """Concurrent connections to a graph with explicit state (the demo char LM): batched
    (batch_graphs=True) or each session's steps run alone (False: inside the event loop);
    each connection gets what its own stream gives."""
    graph = rnnengine.convert(os.path.join(os.path.dirname(rnnengine.__file__), "data", "demo_charlm.onnx"))
    toks = rng.integers(0, 60, size=(4, 8, 1)).astype(np.int64)

    async def body(client, server):
        return await step_connections(client, toks), server.batcher.graph_batching
    got, reason = with_client(graph, body, batch_graphs=batch_graphs)
    assert (reason is None) is batch_graphs
    for i in range(len(toks)):
        s = graph.stream()
        want = np.stack([s.step({"tokens": x})["logits"] for x in toks[i]])
        assert max_violation(got[i], want) <= 1, i


def test_serve_has_help():
    r = subprocess.run([sys.executable, "-m", "rnnengine.cli", "serve", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "/stream" in r.stdout and "--port" in r.stdout


def serve_command(path, cwd, *args):
    """`rnnengine serve PATH [args]` on a free localhost port, once it answers /health: (process, port)."""
    import socket
    import time
    import urllib.request
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "rnnengine.cli", "serve", path, "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(cwd))
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    return proc, port


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_command_serves_and_shuts_down_gracefully(model, tmp_path, loop):
    """On either event loop (--loop): a session's steps over WebSocket match its own stream,
    and SIGTERM with that session still open closes its connection (GOING_AWAY) and ends the
    server cleanly."""
    import signal
    import urllib.request

    from rnnengine.server import KIND_STEP
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    path = str(tmp_path / "m.rnne")
    rnnengine.save(model, path)
    proc, port = serve_command(path, tmp_path, "--loop", loop)
    xs = rng.standard_normal((5, I)).astype(np.float32)
    ref = model.stream()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            health = json.loads(r.read())
        assert health["status"] == "ok" and health["sessions"] == 0

        async def client():
            async with aiohttp.ClientSession() as http:
                ws = await http.ws_connect(f"http://127.0.0.1:{port}/stream")
                for x in xs:
                    await ws.send_bytes(encode_frame(x[None], KIND_STEP))  # a saved model steps (1, I)
                    _, y = decode_frame_reply(await ws.receive_bytes())
                    assert max_violation(y.reshape(-1), ref.step(x)) <= 1
                proc.send_signal(signal.SIGTERM)  # the session is still open
                msg = await ws.receive()  # closed by the server at once, not after aiohttp's shutdown_timeout
                assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.GOING_AWAY,
                                                           "server shutdown")
        asyncio.run(client())
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert proc.returncode == 0, out
    assert f"event loop: {loop}" in out
    assert os.path.exists(path)

def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_share_the_port_restart_and_shut_down(model, tmp_path):
    """--workers 2: two server processes accept on one port; sessions on either match their
    own streams; a worker killed is started again; SIGTERM ends them all cleanly."""
    import signal
    import time
    import urllib.request

    from rnnengine.server import KIND_STEP
    path = str(tmp_path / "m.rnne")
    rnnengine.save(model, path)
    proc, port = serve_command(path, tmp_path, "--workers", "2", "--loop", "asyncio")
    xs = rng.standard_normal((6, 4, I)).astype(np.float32)

    def workers(n, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            kids = _children(proc.pid)
            if len(kids) == n:
                return kids
            time.sleep(0.1)
        raise AssertionError(f"{_children(proc.pid)} workers, wanted {n}")

    def health():
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    return json.loads(r.read())
            except OSError:
                time.sleep(0.1)
        raise AssertionError("no /health")

    async def sessions():
        async with aiohttp.ClientSession() as http:
            async def one(seq):
                ws = await http.ws_connect(f"http://127.0.0.1:{port}/stream")
                ref, got = model.stream(), []
                for x in seq:
                    await ws.send_bytes(encode_frame(x[None], KIND_STEP))
                    got.append(decode_frame_reply(await ws.receive_bytes())[1].reshape(-1))
                await ws.close()
                return max(max_violation(g, ref.step(x)) for g, x in zip(got, seq))
            return await asyncio.gather(*(one(seq) for seq in xs))
    try:
        first = workers(2)
        assert health()["pid"] in first
        assert max(asyncio.run(sessions())) <= 1
        os.kill(first[0], signal.SIGKILL)
        time.sleep(0.5)
        again = workers(2)
        assert first[0] not in again and first[1] in again
        health()
        assert max(asyncio.run(sessions())) <= 1
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert proc.returncode == 0, out
    assert "with 2 worker processes" in out and f"worker {first[0]} exited" in out
    for pid in again:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_frames_that_would_cost_too_much_are_refused_and_the_connection_stays(model):
    async def body(client, server):
        ws = await client.ws_connect("/stream")
        replies = []
        await ws.send_bytes(encode_frame(np.zeros((2000, 1, I), np.float32), kind=1))  # 2000 x H outputs
        replies.append(json.loads(await ws.receive_str()))
        await ws.send_str(json.dumps({"op": "step", "x": [0.0] * I, "pad": "y" * 3000}))
        replies.append(json.loads(await ws.receive_str()))
        await ws.send_bytes(encode_frame(np.zeros(I, np.float32), kind=0))
        ok = decode_frame_reply(await ws.receive_bytes())[1]
        await ws.close()
        return replies, ok
    replies, ok = with_client(model, body, max_elements=14000, max_text_bytes=2000)  # in 12000, out 16000
    assert "steps" in replies[0]["error"] and "text frame" in replies[1]["error"]
    assert ok.shape == (H,)


def test_json_integers_are_not_truncated():
    """A token model's ids written as 1.9 are refused, not read as 1."""
    path = os.path.join(os.path.dirname(rnnengine.__file__), "data", "demo_charlm.onnx")
    graph = rnnengine.convert(path)

    async def body(client, server):
        ws = await client.ws_connect("/stream")
        await ws.send_str(json.dumps({"op": "step", "inputs": {"tokens": [1.9]}}))
        bad = json.loads(await ws.receive_str())
        await ws.send_str(json.dumps({"op": "step", "inputs": {"tokens": [1]}}))
        good = json.loads(await ws.receive_str())
        await ws.close()
        return bad, good
    bad, good = with_client(graph, body)
    assert "integers" in bad["error"] and "logits" in good["outputs"]


def test_the_readme_client_snippet_runs_against_rnnengine_serve(tmp_path):
    """README's client example, run as written against `rnnengine serve` of a saved layer stack
    of input size 16 (only the port and the last print changed): the binary and the JSON step
    give what the model's own stream gives."""
    import re
    import signal
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read()
    code = re.search(r"A client \(here with aiohttp.*?```python\n(.*?)```", readme, re.S).group(1)
    last = 'print(y, (await ws.receive_json())["outputs"])'
    assert last in code
    code = code.replace("127.0.0.1:8000", "127.0.0.1:{port}").replace(
        last, 'import json; print(json.dumps([y.tolist(), (await ws.receive_json())["outputs"]]))')
    rng = np.random.default_rng(5)
    stack = rnnengine.Model([rnnengine.LSTM((rng.standard_normal((1, 48, 16)) * 0.3).astype(np.float32),
                                            (rng.standard_normal((1, 48, 12)) * 0.3).astype(np.float32))])
    path = str(tmp_path / "model.rnne")
    rnnengine.save(stack, path)
    proc, port = serve_command(path, tmp_path)
    try:
        client = tmp_path / "client.py"
        client.write_text(code.replace("{port}", str(port)))
        out = subprocess.run([sys.executable, str(client)], capture_output=True, text=True, timeout=120,
                             cwd=str(tmp_path))
        assert out.returncode == 0, out.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    got_bin, got_json = json.loads(out.stdout)
    xs = np.random.default_rng(0).standard_normal((10, 1, 16), np.float32)
    s = stack.stream()
    want = [s.step(x[0]) for x in xs]
    np.testing.assert_allclose(np.asarray(got_bin).reshape(-1), want[-1], rtol=0, atol=1e-6)
    (name, value), = got_json.items()
    np.testing.assert_allclose(np.asarray(value).reshape(-1), s.step(xs[-1][0]), rtol=0, atol=1e-6)


def test_a_call_in_flight_at_shutdown_sends_its_reply_then_the_connection_closes(model, caplog):
    """Shutdown lets a call in flight finish and send its reply (not a reply written to a
    closed socket, counted as a bad frame and logged as a handler error), then closes the
    connection with GOING_AWAY; no new call starts meanwhile."""
    import logging

    from aiohttp import web

    from rnnengine.server import KIND_STEP
    x = f32(1, I)

    async def main():
        server = Server(model, max_wait_us=1000)
        call = server._call

        async def slow(session, kind, arr):  # the result in hand, not sent yet, when shutdown starts
            res = await call(session, kind, arr)
            await asyncio.sleep(0.3)
            return res
        server._call = slow
        runner = web.AppRunner(server.app, shutdown_timeout=10.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"http://127.0.0.1:{port}/stream")
            await ws.send_bytes(encode_frame(x, KIND_STEP))
            await asyncio.sleep(0.1)
            cleanup = asyncio.create_task(runner.cleanup())
            reply = await ws.receive()
            closing = await ws.receive()
            await cleanup
        return server, reply, closing
    with caplog.at_level(logging.ERROR, logger="aiohttp"):
        server, reply, closing = asyncio.run(main())
    assert reply.type == aiohttp.WSMsgType.BINARY
    assert max_violation(decode_frame_reply(reply.data)[1], model.stream().step(x[0])) <= 1
    assert (closing.type, closing.data, closing.extra) == (aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.GOING_AWAY,
                                                           "server shutdown")
    assert server.counters["bad_frames"] == 0 and server._calls == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_serve_refuses_an_unknown_or_missing_event_loop_before_loading_the_model(tmp_path, monkeypatch, capsys):
    """--loop auto runs on uvloop when it is installed, else the standard loop; an unknown
    name, or uvloop asked for where it is missing, is refused by name (the CLI does so before
    it loads the model)."""
    import builtins

    from rnnengine import cli
    from rnnengine.server import loop_kind
    assert loop_kind("asyncio") == "asyncio"
    try:
        import uvloop  # noqa: F401
        assert loop_kind("auto") == loop_kind("uvloop") == "uvloop"
    except ImportError:
        assert loop_kind("auto") == "asyncio"
    with pytest.raises(ValueError, match="must be auto, uvloop or asyncio, not 'tokio'"):
        loop_kind("tokio")
    real_import = builtins.__import__

    def no_uvloop(name, *a, **kw):
        if name == "uvloop":
            raise ImportError("No module named 'uvloop'")
        return real_import(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    assert loop_kind("auto") == "asyncio"
    with pytest.raises(ValueError, match=r"needs uvloop: pip install 'rnnengine\[server\]'"):
        loop_kind("uvloop")
    missing = str(tmp_path / "no-such-model.rnne")  # not read: the loop is refused first
    assert cli.main(["serve", missing, "--loop", "uvloop"]) != 0
    assert "needs uvloop" in capsys.readouterr().err
