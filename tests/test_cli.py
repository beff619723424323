"""The rnnengine command: demo on the bundled model, help texts."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rnnengine
from rnnengine import cli
from rnnengine.train.fit import Network


def test_bundled_demo_model_is_the_committed_generator_output():
    """tools/make_demo_model.py rebuilds exactly the bundled weights."""
    import importlib.util
    import os
    import onnx
    from onnx import numpy_helper

    path = os.path.join(os.path.dirname(__file__), "..", "tools", "make_demo_model.py")
    spec = importlib.util.spec_from_file_location("make_demo_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    built = {t.name: numpy_helper.to_array(t) for t in mod.build().graph.initializer}
    shipped = {t.name: numpy_helper.to_array(t) for t in onnx.load(cli.DEMO_MODEL).graph.initializer}
    assert built.keys() == shipped.keys()
    for k in built:
        np.testing.assert_array_equal(built[k], shipped[k])


def test_demo_runs_and_agrees_with_onnxruntime(capsys):
    assert cli.main(["demo", "--steps", "50", "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime" in out and "OK" in out and "per-character time" in out


def test_demo_model_loads_with_state_inputs():
    m = rnnengine.convert(cli.DEMO_MODEL)
    assert len(m.state_pairs) == 4  # h and c of two layers, carried by streams
    assert isinstance(m.stream(), rnnengine.Stream)


def test_console_help(tmp_path):
    # run outside the source tree, so the installed package is the one imported
    r = subprocess.run([sys.executable, "-m", "rnnengine.cli", "demo", "--help"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 0 and "--steps" in r.stdout
    r = subprocess.run([sys.executable, "-m", "rnnengine.cli"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "demo" in r.stdout


CORPUS = __import__("os").path.join(__import__("os").path.dirname(__file__), "data", "corpus")


def corpus(name):
    return __import__("os").path.join(CORPUS, name)


def test_every_subcommand_has_help(tmp_path):
    for sub in ("demo", "convert", "inspect", "verify", "run", "bench"):
        r = subprocess.run([sys.executable, "-m", "rnnengine.cli", sub, "--help"], capture_output=True, text=True,
                           cwd=tmp_path)
        assert r.returncode == 0 and "usage: rnnengine " + sub in r.stdout, sub


def test_convert_inspect_verify_run_on_a_token_model(tmp_path, capsys):
    src = corpus("torch_legacy_token_lstm_logsoftmax_op14.onnx")
    out = str(tmp_path / "tok.rnne")
    assert cli.main(["convert", src, "-o", out]) == 0
    assert "done" in capsys.readouterr().out
    assert cli.main(["inspect", out]) == 0
    text = capsys.readouterr().out
    assert "LSTM" in text and "parameters:" in text and "source.sha256" in text and "ids" in text
    assert cli.main(["verify", src, "--dim", "batch=3", "--dim", "time=6"]) == 0
    text = capsys.readouterr().out
    assert "streamed" in text and "OK" in text and "max abs" in text
    ids = np.random.default_rng(0).integers(0, 20, size=(2, 9)).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    assert cli.main(["run", out, "--input", str(tmp_path / "ids.npy"), "-o", str(tmp_path / "y.npy")]) == 0
    assert cli.main(["run", out, "--input", f"ids={tmp_path / 'ids.npy'}", "-o", str(tmp_path / "ys.npy"),
                     "--stream", "2"]) == 0
    whole, streamed = np.load(tmp_path / "y.npy"), np.load(tmp_path / "ys.npy")
    assert whole.shape == (2, 9, 20) and np.abs(whole - streamed).max() <= 1e-5
    want = rnnengine.convert(src).run({"ids": ids})["logp"]
    assert np.array_equal(whole, want)


def test_verify_quantized_files_against_float32(tmp_path, capsys):
    src = corpus("torch_legacy_lstm_2layer_batchfirst_op14.onnx")
    for dtype in ("float16", "int8"):
        out = str(tmp_path / f"m.{dtype}.rnne")
        assert cli.main(["convert", src, "-o", out, "--dtype", dtype]) == 0
        assert cli.main(["verify", src, "--model", out]) == 0
        text = capsys.readouterr().out
        assert "vs float32 file" in text and f"({dtype})" in text


def test_verify_fails_above_tolerance_and_errors_are_clear(tmp_path, capsys):
    src = corpus("torch_legacy_gru_1layer_op14.onnx")
    assert cli.main(["verify", src, "--tolerance", "1e-12"]) == 1
    assert "FAILED" in capsys.readouterr().out
    assert cli.main(["inspect", str(tmp_path / "missing.rnne")]) == 2
    (tmp_path / "bad.rnne").write_bytes(b"RNNE" + b"\0" * 100)
    assert cli.main(["inspect", str(tmp_path / "bad.rnne")]) == 2
    assert "rnnengine: error:" in capsys.readouterr().err


def test_convert_fixes_inputs_and_bench_runs(tmp_path, capsys):
    src = corpus("torch_legacy_audio_vad_stateful_op14.onnx")
    out = str(tmp_path / "vad.rnne")
    assert cli.main(["convert", src, "-o", out]) == 0
    assert "state pairs: [['state', 'stateN']]" in capsys.readouterr().out
    assert cli.main(["bench", out, "--onnx", src, "--steps", "5", "--repeats", "1", "--seq", "8"]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime" in text and "rnnengine is" in text


def test_train_on_text_resume_export_and_demo(tmp_path, capsys):
    """rnnengine train: a character LM on a text file, resumed from its checkpoint, exported,
    and the export streamed by the demo beside onnxruntime."""
    words = "the quick brown fox jumps over the lazy dog while the cat sleeps in the sun "
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(words.split()) + " " for _ in range(2000))
    (tmp_path / "t.txt").write_text(text)
    ck, onnx_out = str(tmp_path / "ck.rnne"), str(tmp_path / "m.onnx")
    assert cli.main(["train", str(tmp_path / "t.txt"), "-o", ck, "--steps", "30", "--hidden", "16", "--batch", "8",
                     "--seq-len", "16", "--quiet", "--val-every", "10"]) == 0
    out = capsys.readouterr()
    assert "final loss" in out.out and "validation" in out.out
    assert cli.main(["train", str(tmp_path / "t.txt"), "-o", ck, "--resume", ck, "--steps", "10", "--quiet",
                     "--batch", "8", "--seq-len", "16", "--export", onnx_out]) == 0
    assert "resuming" in capsys.readouterr().err
    from rnnengine.train import load_checkpoint
    net, state = load_checkpoint(ck)
    assert state["optimizer"].t == 40 and state["extra"]["vocab"]
    assert cli.main(["demo", "--model", onnx_out, "--steps", "20", "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "per-character time" in out


def test_train_classification_from_npz(tmp_path, capsys):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((200, 6, 3)).astype(np.float32)
    y = (X[:, 0, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", inputs=X, targets=y)
    assert cli.main(["train", str(tmp_path / "d.npz"), "-o", str(tmp_path / "c.rnne"), "--steps", "20",
                     "--hidden", "8", "--quiet"]) == 0
    assert "classify" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", X)
    assert cli.main(["train", str(tmp_path / "x.npy"), "-o", str(tmp_path / "c.rnne")]) == 2  # floats: refused
    np.save(tmp_path / "ids.npy", rng.integers(0, 7, 3000))
    assert cli.main(["train", str(tmp_path / "ids.npy"), "-o", str(tmp_path / "lm.rnne"), "--steps", "5",
                     "--hidden", "8", "--batch", "4", "--seq-len", "8", "--quiet"]) == 0


# --- verify never prints a traceback; run --stream carries state -----------------------------
def _lm_with_state_io(path, H=8, V=11):
    """README's lm.onnx: a trained token LSTM exported with its state as graph I/O."""
    from rnnengine.train import Network, fit
    rng = np.random.default_rng(3)
    net = Network("LSTM", input_size=V, hidden_size=H, output_size=V, embedding=4, seed=1)
    fit(net, rng.integers(0, V, 2000).astype(np.int32), None, task="lm", steps=3, batch_size=4, seq_len=8)
    net.to_onnx(str(path), state_io=True)
    return net


def test_verify_reports_onnxruntime_refusal_in_one_line(tmp_path, capsys):
    """A model onnxruntime fails to run (a Reshape with the export's T baked in) and one it
    refuses at session creation (an IR version it does not know): one line naming
    onnxruntime's reason, exit 2, no traceback."""
    import subprocess
    bad = corpus("torch_dynamo_lstm_1layer_bidir_op18.onnx")  # its Reshape bakes T=7 in: (5, 5) inputs fail
    assert cli.main(["verify", bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnxruntime cannot run the model" in err and "Reshape" in err
    assert "--dim NAME=SIZE for s27, s77" in err
    assert "Traceback" not in err
    r = subprocess.run([sys.executable, "-m", "rnnengine.cli", "verify", bad], capture_output=True, text=True,
                       cwd=tmp_path)  # not the repository root, whose rnnengine/ has no compiled core
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    # refused when the session is created
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 99  # onnxruntime refuses IR versions it does not know; rnnengine converts
    import onnx
    onnx.save(m, str(tmp_path / "ir99.onnx"))
    assert cli.main(["verify", str(tmp_path / "ir99.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnengine verify: cannot compare, onnxruntime cannot load the model:")
    assert err.count("\n") == 1


def test_verify_conversion_error_is_one_line_exit_2(tmp_path, capsys):
    from onnx import TensorProto, helper
    import onnx
    g = helper.make_graph([helper.make_node("Unique", ["x"], ["y"], name="u")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    onnx.save(m, str(tmp_path / "u.onnx"))
    assert cli.main(["verify", str(tmp_path / "u.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Unique node 'u'" in err


def test_verify_says_not_streamable_and_still_checks_whole_sequences(capsys):
    src = corpus("torch_legacy_lstm_1layer_bidir_op14.onnx")
    assert cli.main(["verify", src]) == 0
    out = capsys.readouterr().out
    assert "streamed: not streamable: LSTM node '/m/LSTM': direction 'bidirectional' runs backwards in time" in out
    assert "whole sequence:" in out and "OK" in out


def test_run_stream_refuses_bidirectional_by_name(tmp_path, capsys):
    src = corpus("torch_legacy_lstm_1layer_bidir_op14.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((5, 2, 6)).astype(np.float32))
    assert cli.main(["run", src, "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"),
                     "--stream", "2"]) == 2
    assert capsys.readouterr().err.startswith("not streamable: LSTM node '/m/LSTM': direction 'bidirectional' runs backwards in time")


def _run_both(tmp_path, src, x, chunk):
    np.save(tmp_path / "x.npy", x)
    assert cli.main(["run", src, "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "w.npz")]) == 0
    assert cli.main(["run", src, "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "s.npz"),
                     "--stream", str(chunk)]) == 0
    return dict(np.load(tmp_path / "w.npz")), dict(np.load(tmp_path / "s.npz"))


def test_run_stream_on_readme_lm_with_state_io(tmp_path, capsys):
    """README: net.to_onnx("lm.onnx", state_io=True); `run --stream` feeds only the tokens and
    equals the whole-sequence run (onnxruntime with zero state), final state included."""
    import onnxruntime as ort
    path = tmp_path / "lm.onnx"
    _lm_with_state_io(path)
    tok = np.random.default_rng(1).integers(0, 11, size=(9, 3)).astype(np.int64)  # (T, B)
    for chunk in (1, 2, 4):
        whole, streamed = _run_both(tmp_path, str(path), tok, chunk)
        assert whole.keys() == streamed.keys() == {"logits", "hN_0", "cN_0"}
        for k in whole:
            assert whole[k].shape == streamed[k].shape
            assert np.abs(whole[k] - streamed[k]).max() <= 1e-5, k
    z = np.zeros((1, 3, 8), np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"tokens": tok, "h0_0": z, "c0_0": z})
    for k, w in zip(("logits", "hN_0", "cN_0"), want):
        assert np.abs(streamed[k] - w).max() <= 1e-5, k
    assert "streamed in chunks of 4" in capsys.readouterr().out


def test_run_stream_on_tf2onnx_state_io_sizes_the_state_itself(tmp_path):
    """keras tf2onnx names the batch of x and of h0/c0 with unrelated symbols: the state's
    size comes from the data; the result equals onnxruntime's with zero state."""
    import onnxruntime as ort
    src = corpus("keras2_tf2onnx_lstm_state_io_op17.onnx")
    x = np.random.default_rng(2).standard_normal((2, 7, 6)).astype(np.float32)
    whole, streamed = _run_both(tmp_path, src, x, 3)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    z = np.zeros((2, 8), np.float32)
    want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x, "h0": z, "c0": z})))
    for k, w in want.items():
        assert np.abs(whole[k] - w).max() <= 1e-5 and np.abs(streamed[k] - w).max() <= 1e-5, k


@pytest.mark.parametrize("name", ["torch_legacy_audio_vad_stateful_op14.onnx",
                                  "torch_dynamo_audio_vad_stateful_op18.onnx"])
def test_run_stream_on_chunk_per_call_model(tmp_path, capsys, name):
    """A VAD taking one chunk of audio per call, state as graph I/O: `run --stream 1` with the
    chunks stacked on a leading axis equals onnxruntime fed its own state back."""
    import onnxruntime as ort
    src = corpus(name)
    xs = np.random.default_rng(4).standard_normal((4, 2, 128)).astype(np.float32)
    np.save(tmp_path / "x.npy", xs)
    assert cli.main(["run", src, "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "s.npz"),
                     "--stream", "1"]) == 0
    got = np.load(tmp_path / "s.npz")
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 2, 16), np.float32)
    for k in range(4):
        prob, state = sess.run(None, {"x": xs[k], "state": state})
        assert np.abs(got["prob"][k] - prob).max() <= 1e-5
    assert np.abs(got["stateN"] - state).max() <= 1e-5
    assert cli.main(["run", src, "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "s.npz"),
                     "--stream", "2"]) == 2
    assert "one chunk" in capsys.readouterr().err


# --- training checkpoints open like converted models ------------------------------------------
def _checkpoint(tmp_path, kind="GRU", embedding=None):
    from rnnengine.train import Adam, Network, fit, save_checkpoint
    rng = np.random.default_rng(5)
    if embedding:
        net = Network(kind, 9, 6, 9, num_layers=2, embedding=embedding, seed=2)
        fit(net, rng.integers(0, 9, 500).astype(np.int32), None, task="lm", steps=3, batch_size=2, seq_len=6)
    else:
        net = Network(kind, 3, 6, 2, num_layers=2, seed=2)
        X = rng.standard_normal((20, 5, 3)).astype(np.float32)
        fit(net, X, rng.integers(0, 2, 20), task="classify", steps=3, batch_size=4)
    path = str(tmp_path / "ck.rnne")
    save_checkpoint(path, net, Adam(net.size, 1e-3), pos=7, extra={"note": "x"})
    return net, path


@pytest.mark.parametrize("kind, embedding", [("GRU", None), ("LSTM", 4)])
def test_checkpoint_loads_runs_streams_and_matches_the_network(tmp_path, kind, embedding):
    """rnnengine.load(checkpoint) is the trained network: its run equals Network.forward and
    onnxruntime on Network.to_onnx(); a stream in chunks equals the whole run."""
    import onnxruntime as ort
    net, path = _checkpoint(tmp_path, kind, embedding)
    model = rnnengine.load(path)
    rng = np.random.default_rng(6)
    x = rng.integers(0, 9, (7, 3)).astype(np.int64) if embedding else rng.standard_normal((7, 3, 3)).astype(np.float32)
    name = "tokens" if embedding else "X"
    got = model.run({name: x})["logits"]
    want_net = net.forward(x)[0]
    want_ort = ort.InferenceSession(net.to_onnx().SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    assert np.abs(got - want_ort).max() <= 1e-5 and np.abs(got - want_net).max() <= 1e-5
    s = model.stream()
    parts = [s({name: x[t:t + 2]})["logits"] for t in range(0, 7, 2)]
    assert np.abs(np.concatenate(parts) - got).max() <= 1e-5
    assert model.metadata["train.pos"] == 7 and model.metadata["train.config"]["kind"] == kind


def test_checkpoint_inspect_run_bench_from_the_command_line(tmp_path, capsys):
    net, path = _checkpoint(tmp_path, "LSTM", 4)
    assert cli.main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "training checkpoint" in out and "LSTM 2x6" in out and "train.pos = 7" in out
    assert f"parameters: {net.size:,};" in out
    tok = np.random.default_rng(0).integers(0, 9, (8, 2)).astype(np.int64)
    np.save(tmp_path / "t.npy", tok)
    assert cli.main(["run", path, "--input", str(tmp_path / "t.npy"), "-o", str(tmp_path / "y.npy")]) == 0
    assert np.abs(np.load(tmp_path / "y.npy") - net.forward(tok)[0]).max() <= 1e-5
    assert cli.main(["bench", path, "--steps", "3", "--repeats", "1", "--seq", "4"]) == 0
    assert "onnxruntime" in capsys.readouterr().out
    assert cli.main(["verify", path]) == 0  # against onnxruntime on the network's ONNX graph
    out = capsys.readouterr().out
    assert "streamed (time axis {'tokens': 0}" in out and "OK" in out


def test_damaged_checkpoint_is_a_format_error(tmp_path):
    from rnnengine.format import weightfile as fileformat
    fileformat.write(str(tmp_path / "bad.rnne"), {"kind": "rnnengine-checkpoint"},
                     {"params": np.zeros(3, np.float32)}, quantize=set(),
                     metadata={"train.config": {"kind": "LSTM", "input_size": 2, "hidden_size": 2,
                                                "output_size": 2}})
    with pytest.raises(fileformat.FormatError, match="the config needs 54 parameters, the checkpoint holds 3"):
        rnnengine.load(str(tmp_path / "bad.rnne"))
    assert cli.main(["inspect", str(tmp_path / "bad.rnne")]) == 2


@pytest.mark.parametrize("change, message", [
    ({"num_layers": 10 ** 9}, "num_layers must be an integer from 1 to 54"),  # once looped for minutes
    ({"hidden_size": 10 ** 12}, "hidden_size must be an integer"),  # once allocated terabytes
    ({"num_layers": 2}, "the config needs 102 parameters, the checkpoint holds 54"),
    ({"input_size": 2.5}, "input_size must be an integer"),
    ({"output_size": True}, "output_size must be an integer"),
    ({"kind": "LSTMX"}, "kind must be one of"),
    ({"threads": 2}, "unknown config field"),
    ({"hidden_size": None}, "hidden_size must be an integer"),
    ({"clip": 10 ** 400}, "clip must be a finite number > 0"),  # float() overflowed (OverflowError)
    ({"forget_bias": 10 ** 400}, "forget_bias must be a finite number"),
    ({"clip": -1.0}, "clip must be a finite number > 0"),  # loaded, then failed at run()
    ({"kind": "GRU", "linear_before_reset": 7}, "linear_before_reset must be 0 or 1"),
    ({"bidirectional": "yes"}, "bidirectional must be true or false"),
    ({"seed": -3}, "seed must be a non-negative integer"),
])
def test_hostile_checkpoint_config_is_refused_before_layout(tmp_path, change, message):
    """A checkpoint's train.config is untrusted: its sizes are checked against the stored
    parameters (exact count, closed form) before the network is laid out or allocated."""
    from rnnengine.format import weightfile as fileformat
    cfg = {"kind": "LSTM", "input_size": 2, "hidden_size": 2, "output_size": 2}
    assert Network.parameter_count(cfg) == 54 == Network(**cfg).size
    if change.get("kind") == "GRU":
        cfg = {**cfg, "kind": "GRU"}
        change = {k: v for k, v in change.items() if k != "kind"}
        n = Network.parameter_count(cfg)
        fileformat.write(str(tmp_path / "bad.rnne"), {"kind": "rnnengine-checkpoint"},
                         {"params": np.zeros(n, np.float32)}, quantize=set(),
                         metadata={"train.config": {**cfg, **change}})
        with pytest.raises(fileformat.FormatError, match=message):
            rnnengine.load(str(tmp_path / "bad.rnne"))
        return
    fileformat.write(str(tmp_path / "bad.rnne"), {"kind": "rnnengine-checkpoint"},
                     {"params": np.zeros(54, np.float32)}, quantize=set(), metadata={"train.config": {**cfg, **change}})
    t0 = time.perf_counter()
    with pytest.raises(fileformat.FormatError, match=message):
        rnnengine.load(str(tmp_path / "bad.rnne"))
    assert time.perf_counter() - t0 < 5


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["LSTM", "GRU", "RNN"]), I=st.integers(1, 6), H=st.integers(1, 6), O=st.integers(1, 4),
       L=st.integers(1, 3), bi=st.booleans(), emb=st.one_of(st.none(), st.integers(1, 4)), peep=st.booleans())
def test_parameter_count_closed_form_equals_the_layout(kind, I, H, O, L, bi, emb, peep):
    cfg = dict(kind=kind, input_size=I, hidden_size=H, output_size=O, num_layers=L, bidirectional=bi,
               embedding=emb, peepholes=peep and kind == "LSTM")
    net = Network(**cfg)
    assert Network.parameter_count(net.config) == net.size == sum(int(np.prod(s)) for _, s in net.slots.values())
    assert Network.from_config(net.config, net.size).size == net.size


def test_verify_and_run_report_not_streamable_raised_by_the_stream(tmp_path, capsys, monkeypatch):
    """When model.stream() (or its first call) raises NotStreamableError, verify prints its
    message as the streamed result and still compares whole sequences; run --stream prints it
    and exits 2."""
    from rnnengine.runtime.graph import GraphModel
    from rnnengine.ops.handlers import NotStreamableError

    def refuse(self):
        raise NotStreamableError({"op": "Softmax", "name": "/attn/Softmax"}, "it mixes time steps (axis 1)")
    monkeypatch.setattr(GraphModel, "stream", refuse)
    src = corpus("torch_legacy_lstm_2layer_batchfirst_op14.onnx")
    assert cli.main(["verify", src]) == 0
    out = capsys.readouterr().out
    assert "streamed: not streamable: Softmax node '/attn/Softmax': it mixes time steps (axis 1)" in out
    assert "whole sequence:" in out and "max abs" in out
    np.save(tmp_path / "x.npy", np.zeros((2, 5, 6), np.float32))
    assert cli.main(["run", src, "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"),
                     "--stream", "2"]) == 2
    assert capsys.readouterr().err == "not streamable: Softmax node '/attn/Softmax': it mixes time steps (axis 1)\n"


def test_the_cli_from_a_source_tree_without_the_core_helps_and_then_says_what_to_do(tmp_path):
    """From a checkout where the extension is not built (the repository root after `pip install .`),
    `python -m rnnengine --help` works and a command that needs the core names the fix."""
    import shutil
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rnnengine")
    shutil.copytree(src, tmp_path / "rnnengine", ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    open(tmp_path / "setup.py", "w").close()  # looks like the repository root
    r = subprocess.run([sys.executable, "-m", "rnnengine", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "COMMAND" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "rnnengine", "demo", "--steps", "2"], capture_output=True, text=True,
                       cwd=tmp_path)
    # (an editable install's import hook may still find the built core: then the demo just runs)
    assert r.returncode == 0 or ("pip install" in r.stderr and "Traceback" not in r.stderr), r.stderr


def test_a_checkpoint_of_more_layers_than_a_stored_network_may_have_is_refused_quickly(tmp_path):
    """RNN layers of H=1 cost 4 parameters each: 1001 of them fit in 16 KB, and loading built
    the exported graph layer by layer (20,000 layers: 12.7 s, 481 MB)."""
    from rnnengine.format import weightfile as fileformat
    from rnnengine.train.fit import MAX_STORED_LAYERS
    cfg = {"kind": "RNN", "input_size": 1, "hidden_size": 1, "output_size": 1, "num_layers": MAX_STORED_LAYERS + 1}
    n = Network.parameter_count(cfg)
    fileformat.write(str(tmp_path / "deep.rnne"), {"kind": "rnnengine-checkpoint"},
                     {"params": np.zeros(n, np.float32)}, quantize=set(), metadata={"train.config": cfg})
    t0 = time.perf_counter()
    with pytest.raises(fileformat.FormatError, match="num_layers 1001 is more than a stored network may have"):
        rnnengine.load(str(tmp_path / "deep.rnne"))
    assert time.perf_counter() - t0 < 5


def test_train_resume_takes_the_checkpoints_batch_and_clip(tmp_path, capsys):
    # --batch / --seq-len / --clip-norm default to the checkpoint's on --resume, and other values
    # are refused; a checkpoint written before it kept them (no train.options) resumes with the
    # CLI's defaults as it did (the review of this change: it fell back to fit's 16 and failed)
    from rnnengine.train.fit import load_checkpoint, save_checkpoint
    ids = (np.arange(4000) * 7 % 11).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    ck = str(tmp_path / "ck.rnne")
    assert cli.main(["train", str(tmp_path / "ids.npy"), "-o", ck, "--steps", "2", "--hidden", "8", "--quiet",
                     "--seq-len", "16", "--batch", "8", "--clip-norm", "0.5"]) == 0
    net, st = load_checkpoint(ck)
    assert st["options"] == {"batch_size": 8, "seq_len": 16, "clip_norm": 0.5}
    assert cli.main(["train", str(tmp_path / "ids.npy"), "-o", ck, "--resume", ck, "--steps", "2", "--quiet"]) == 0
    assert "2 steps of 8 x 16" in capsys.readouterr().err
    assert cli.main(["train", str(tmp_path / "ids.npy"), "-o", ck, "--resume", ck, "--steps", "2", "--quiet",
                     "--batch", "4"]) != 0
    assert "trained with batch_size=8, but batch_size=4" in capsys.readouterr().err
    net, st = load_checkpoint(ck)
    old = str(tmp_path / "old.rnne")  # as written before train.options (its batch was the CLI's 32)
    rng = np.random.default_rng()
    rng.bit_generator.state = st["rng"]
    save_checkpoint(old, net, st["optimizer"], pos=st["pos"], extra=st["extra"], carry=None, rng=rng, task="lm")
    assert load_checkpoint(old)[1]["options"] == {}
    assert cli.main(["train", str(tmp_path / "ids.npy"), "-o", old, "--resume", old, "--steps", "1", "--quiet",
                     "--seq-len", "16"]) == 0
    assert "1 steps of 32 x 16" in capsys.readouterr().err
