"""rnnengine.from_torch against the live PyTorch modules it reads (torch is the oracle here, run
in float64 on the same float32 weights: onnxruntime cannot run nn.LSTM(proj_size), which ONNX
cannot express), whole sequences and streamed chunk by chunk; the gate permutation; the
projected LSTM cell's naive C reference."""
import copy
import json
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="from_torch is checked against torch (pip install torch)")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import rnnengine  # noqa: E402
from rnnengine import _core  # noqa: E402
from rnnengine.frontend import torch_import  # noqa: E402
from rnnengine.frontend.torch_import import GATE_ORDERS, gate_permutation  # noqa: E402

from oracle import max_violation  # noqa: E402

nn = torch.nn
HERE = os.path.dirname(__file__)


def make_module(kind, I, H, layers=1, bidirectional=False, bias=True, batch_first=False, proj=0, seed=0):
    """A module with random weights of scale ~0.6 (uniform +-1/sqrt(H) would keep every gate near 0.5);
    a Relu RNN's scaled by 1/sqrt(fan-in) so that its unbounded outputs stay of order 1."""
    torch.manual_seed(seed)
    kw = dict(num_layers=layers, bidirectional=bidirectional, bias=bias, batch_first=batch_first)
    if kind == "LSTM":
        m = nn.LSTM(I, H, proj_size=proj, **kw)
    elif kind == "GRU":
        m = nn.GRU(I, H, **kw)
    else:
        m = nn.RNN(I, H, nonlinearity=kind.split("_")[1].lower(), **kw)
    std = 0.6 if kind != "RNN_RELU" else 0.6 / np.sqrt(max(I, H) * (2 if bidirectional else 1))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, std)
    return m.eval()


def run_float64(m, x, hx=None):
    """The module's forward in float64 on the same float32 weights and inputs: the exact answer
    both float32 implementations approximate (torch's own float32 forward rounds differently)."""
    ref = copy.deepcopy(m).double()
    if hx is not None:
        hx = tuple(a.double() for a in hx) if isinstance(hx, tuple) else hx.double()
    with torch.no_grad():
        y, hn = ref(torch.from_numpy(np.asarray(x)).double(), hx)
    return y, hn


def torch_state(kind, L, D, B, H, proj, rng):
    h = torch.from_numpy(rng.standard_normal((L * D, B, proj or H)).astype(np.float32))
    if kind != "LSTM":
        return h
    return h, torch.from_numpy(rng.standard_normal((L * D, B, H)).astype(np.float32))


def flat(hx):
    return [x.numpy() if hasattr(x, "numpy") else x for x in (hx if isinstance(hx, tuple) else (hx,))]


def check_close(got, want, what):
    v = max_violation(got, want)
    assert v <= 1.0, f"{what}: {v:.3g} x the float32 tolerance (max abs {np.max(np.abs(got - want)):.3g})"


# --- the gate permutation ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(GATE_ORDERS))
@pytest.mark.parametrize("H", [1, 2, 5])
def test_gate_permutation_inverse_is_the_reverse_direction(kind, H):
    convs = list(GATE_ORDERS[kind])
    G = len(GATE_ORDERS[kind]["onnx"])
    for a in convs:
        for b in convs:
            ab, ba = gate_permutation(kind, H, a, b), gate_permutation(kind, H, b, a)
            assert sorted(ab.tolist()) == list(range(G * H))  # a permutation of the rows
            np.testing.assert_array_equal(ab[ba], np.arange(G * H))
            np.testing.assert_array_equal(np.argsort(ab), ba)


def test_gate_permutation_values():
    # PyTorch i, f, g, o -> ONNX i, o, f, c; PyTorch r, z, n -> ONNX z, r, h
    assert gate_permutation("LSTM", 1).tolist() == [0, 3, 1, 2]
    assert gate_permutation("GRU", 1).tolist() == [1, 0, 2]
    assert gate_permutation("LSTM", 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    assert gate_permutation("RNN", 3).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="kind"):
        gate_permutation("LSTMP", 2)
    with pytest.raises(ValueError, match="source"):
        gate_permutation("GRU", 2, source="keras")


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_weights_without_the_permutation_are_detected_as_wrong(kind, monkeypatch):
    """The comparison below would fail if from_torch kept PyTorch's gate order."""
    m = make_module(kind, 3, 5, seed=1)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((6, 2, 3)).astype(np.float32))
    want = run_float64(m, x.numpy())[0].numpy()
    check_close(rnnengine.from_torch(m).run(x.numpy())[0], want, "with the permutation")
    monkeypatch.setattr(torch_import, "gate_permutation", lambda k, H, *a: np.arange(
        len(GATE_ORDERS[k]["onnx"]) * H))
    assert max_violation(rnnengine.from_torch(m).run(x.numpy())[0], want) > 100


# --- whole sequences and streams against the module -------------------------------------------------
@st.composite
def configs(draw):
    kind = draw(st.sampled_from(["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]))
    H = draw(st.integers(1, 9))
    proj = draw(st.integers(0, H - 1)) if kind == "LSTM" and H > 1 else 0
    return dict(kind=kind, I=draw(st.integers(1, 7)), H=H, proj=proj, layers=draw(st.integers(1, 3)),
                bidirectional=draw(st.booleans()), bias=draw(st.booleans()), batch_first=draw(st.booleans()),
                T=draw(st.integers(1, 9)), B=draw(st.integers(1, 4)), with_state=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 16)))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), st.data())
def test_from_torch_matches_the_module_whole_and_streamed(cfg, data):
    kind, I, H, proj, L = cfg["kind"], cfg["I"], cfg["H"], cfg["proj"], cfg["layers"]
    D, B, T, bf = 2 if cfg["bidirectional"] else 1, cfg["B"], cfg["T"], cfg["batch_first"]
    m = make_module(kind, I, H, L, cfg["bidirectional"], cfg["bias"], bf, proj, cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    x = rng.standard_normal((B, T, I) if bf else (T, B, I)).astype(np.float32)
    hx = torch_state(kind, L, D, B, H, proj, rng) if cfg["with_state"] else None
    y, hn = run_float64(m, x, hx)
    model = rnnengine.from_torch(m)
    state = model.from_torch_state(hx) if hx is not None else None
    Y, final = model.run(x, state=state)
    assert Y.shape == tuple(y.shape)
    check_close(Y, y.numpy(), "output")
    for got, want, nm in zip(flat(model.to_torch_state(final)), flat(hn), ("h_n", "c_n")):
        assert got.shape == want.shape
        check_close(got, want, nm)
    if D == 2:
        with pytest.raises(ValueError, match="direction 'forward'"):
            model.stream(B)
        return
    # streamed in random chunks (a step for chunks of one) == the whole sequence == the module
    stream = model.stream(B, state=state)
    t0, parts = 0, []
    while t0 < T:
        n = data.draw(st.integers(1, T - t0))
        chunk = x[:, t0:t0 + n] if bf else x[t0:t0 + n]
        if n == 1 and data.draw(st.booleans()):  # one step: x (B, I) -> (B, features)
            y1 = stream.step(chunk[:, 0] if bf else chunk[0])
            parts.append(y1[:, None] if bf else y1[None])
        else:
            parts.append(stream.feed(chunk))
        t0 += n
    Ys = np.concatenate(parts, axis=1 if bf else 0)
    check_close(Ys, Y, "streamed vs whole")
    check_close(Ys, y.numpy(), "streamed vs module")
    for got, want, nm in zip(flat(model.to_torch_state(stream.get_state())), flat(hn), ("h_n", "c_n")):
        check_close(got, want, f"streamed {nm}")


@pytest.mark.parametrize("level", sorted({0, _core.kernel_level_max()}))
@pytest.mark.parametrize("weight_dtype", ["float32", "float16"])
def test_projected_lstm_at_every_kernel_level_and_float16(level, weight_dtype):
    """Kernel level 0 runs the plain reference products. float16 weights: the result equals a
    float32 model whose weights were rounded to float16 (steps read every weight packed)."""
    m = make_module("LSTM", 6, 24, layers=2, proj=7, seed=3)
    x = np.random.default_rng(3).standard_normal((5, 3, 6)).astype(np.float32)
    y = run_float64(m, x)[0].numpy()
    try:
        _core.kernel_level(level)
        if weight_dtype == "float32":
            model = rnnengine.from_torch(m)
            check_close(model.run(x)[0], y, f"level {level}")
            s = model.stream(3)
            check_close(np.stack([s.step(x[t]) for t in range(5)]), y, f"level {level} stepped")
        else:
            half = make_module("LSTM", 6, 24, layers=2, proj=7, seed=3)
            with torch.no_grad():
                for name, p in half.named_parameters():  # biases stay float32 in both
                    if name.startswith("weight"):
                        p.copy_(p.half().float())
            ref = rnnengine.from_torch(half)
            s16, s32 = rnnengine.from_torch(m, weight_dtype="float16").stream(3), ref.stream(3)
            got = np.stack([s16.step(x[t]) for t in range(5)])
            check_close(got, np.stack([s32.step(x[t]) for t in range(5)]), f"level {level} float16")
            assert max_violation(got, y) > 1  # the rounding is visible: this compares something
    finally:
        _core.kernel_level(_core.kernel_level_max())


def test_naive_c_reference_of_the_projected_cell_matches_torch_and_the_engine():
    I, H, P, T = 5, 8, 3, 6
    m = make_module("LSTM", I, H, proj=P, seed=4)
    layer = rnnengine.from_torch(m).layers[0]
    x = np.random.default_rng(4).standard_normal((T, 1, I)).astype(np.float32)
    y = run_float64(m, x)[0].numpy()
    h, c = np.zeros(P, np.float32), np.zeros(H, np.float32)
    ref = []
    for t in range(T):
        _core.lstmp_step_reference(x[t, 0], layer.W[0], layer.R[0], layer.B[0], layer.projection[0], h, c)
        ref.append(h.copy())
    check_close(np.array(ref)[:, None], y, "reference vs torch")
    Y = layer(x)[0]  # the layer alone, ONNX shapes: (T, D, B, proj_size)
    assert Y.shape == (T, 1, 1, P)
    check_close(Y[:, 0], np.array(ref)[:, None], "engine vs reference")


@pytest.mark.parametrize("bidirectional", [False, True])
def test_sequence_lengths_with_projection_match_packed_sequences(bidirectional):
    """Model.run(lengths=) on a projected stack against torch's pack_padded_sequence: outputs
    past a row's length are 0, final states are at each row's last step, and a reverse
    direction starts at each row's own end."""
    m = make_module("LSTM", 4, 7, layers=2, bidirectional=bidirectional, proj=3, seed=12)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((9, 4, 4)).astype(np.float32)
    lens = np.array([9, 3, 6, 1], np.int64)
    packed = nn.utils.rnn.pack_padded_sequence(torch.from_numpy(x).double(), torch.from_numpy(lens),
                                               enforce_sorted=False)
    with torch.no_grad():
        out, (h, c) = copy.deepcopy(m).double()(packed)  # float64: see run_float64
    y, _ = nn.utils.rnn.pad_packed_sequence(out, total_length=9)
    model = rnnengine.from_torch(m)
    Y, final = model.run(x, lengths=lens)
    check_close(Y, y.numpy(), "output")
    hn, cn = model.to_torch_state(final)
    check_close(hn, h.numpy(), "h_n")
    check_close(cn, c.numpy(), "c_n")


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_identity_projection_equals_the_unprojected_onnx_cell(direction):
    """Every ONNX attribute the projected cell shares with the plain one (peepholes, clip,
    input_forget, activations, lengths, directions): with Whr = I (proj_size = hidden_size) it
    must give what the unprojected cell gives (itself checked against onnxruntime)."""
    rng = np.random.default_rng(13)
    D, H, I, T, B = 2 if direction == "bidirectional" else 1, 5, 3, 7, 3
    W = rng.standard_normal((D, 4 * H, I)).astype(np.float32)
    R = rng.standard_normal((D, 4 * H, H)).astype(np.float32)
    Bb = rng.standard_normal((D, 8 * H)).astype(np.float32)
    P = rng.standard_normal((D, 3 * H)).astype(np.float32)
    attrs = dict(direction=direction, clip=1.5, input_forget=1, activations=["HardSigmoid", "Softsign", "Elu"] * D,
                 activation_alpha=[0.3, 0.8] * D, activation_beta=[0.4] * D)
    plain = rnnengine.LSTM(W, R, Bb, P, **attrs)
    proj = rnnengine.LSTM(W, R, Bb, P, projection=np.broadcast_to(np.eye(H, dtype=np.float32), (D, H, H)), **attrs)
    assert proj.proj_size == H
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    lens = np.array([7, 2, 5], np.int32)
    h0, c0 = rng.standard_normal((2, D, B, H)).astype(np.float32)
    for got, want in zip(proj(x, lens, h0, c0), plain(x, lens, h0, c0)):
        check_close(got, want, direction)


def test_step_streams_batches_projected_streams():
    """gather/scatter of states whose h (proj_size) and c (hidden_size) differ in size."""
    m = make_module("LSTM", 4, 6, layers=2, proj=2, seed=5)
    model = rnnengine.from_torch(m)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 3, 4)).astype(np.float32)
    hx = torch_state("LSTM", 2, 1, 3, 6, 2, rng)
    y, (h, c) = run_float64(m, x, hx)
    per_row = model.from_torch_state(hx)
    streams = [model.stream(1, state={"layers": {k: (a[:, b:b + 1], cc[:, b:b + 1])
                                                 for k, (a, cc) in per_row["layers"].items()}})
               for b in range(3)]
    out = np.stack([rnnengine.step_streams(streams, x[t]) for t in range(7)])
    check_close(out, y.numpy(), "step_streams")
    for b, s in enumerate(streams):
        hb, cb = model.to_torch_state(s.get_state())
        check_close(hb[:, 0], h.numpy()[:, b], "h_n")
        check_close(cb[:, 0], c.numpy()[:, b], "c_n")


def test_model_threads_and_int8_run_projected_layers():
    m = make_module("LSTM", 4, 10, layers=2, proj=3, batch_first=True, seed=6)
    x = np.random.default_rng(6).standard_normal((8, 5, 4)).astype(np.float32)
    y = run_float64(m, x)[0].numpy()
    check_close(rnnengine.from_torch(m, threads=2).run(x)[0], y, "threads=2")
    one = make_module("LSTM", 4, 10, proj=3, batch_first=True, seed=6)
    Y, Y_h, Y_c = rnnengine.from_torch(one).layers[0](x)  # a layer alone, ONNX layout 1: (B, T, D, P)
    want, (h, c) = run_float64(one, x)
    check_close(Y[:, :, 0], want.numpy(), "layer alone, batch first")
    check_close(Y_h[:, 0], h.numpy()[0], "Y_h (B, D, P)")
    check_close(Y_c[:, 0], c.numpy()[0], "Y_c (B, D, H)")
    q = rnnengine.from_torch(m, weight_dtype="int8").stream(8)
    got = q.feed(x)
    assert got.shape == y.shape and np.all(np.isfinite(got))
    assert 0 < np.max(np.abs(got - y)) < 0.2  # int8 rounding: visible but bounded at this scale


# --- containers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("container", ["ModuleList", "Sequential"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_a_container_of_modules_runs_them_in_order(container, batch_first):
    mods = [make_module("LSTM", 3, 6, 2, proj=4, batch_first=batch_first, seed=7),
            make_module("GRU", 4, 5, 1, bidirectional=True, batch_first=batch_first, seed=8),
            make_module("RNN_RELU", 10, 3, 2, bias=False, batch_first=batch_first, seed=9)]
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 6, 3) if batch_first else (6, 2, 3)).astype(np.float32)
    hxs = [torch_state("LSTM", 2, 1, 2, 6, 4, rng), torch_state("GRU", 1, 2, 2, 5, 0, rng),
           torch_state("RNN", 2, 1, 2, 3, 0, rng)]
    out, finals = x, []
    for mod, hx in zip(mods, hxs):
        out, hn = run_float64(mod, out, hx)
        out = out.numpy()
        finals.append(hn)
    out = torch.from_numpy(out)
    box = nn.ModuleList(mods) if container == "ModuleList" else nn.Sequential(*mods)
    model = rnnengine.from_torch(box)
    assert len(model.layers) == 5 and model.batch_first == batch_first
    Y, final = model.run(x, state=model.from_torch_state(hxs))
    check_close(Y, out.numpy(), "output")
    for got, want in zip(model.to_torch_state(final), finals):
        for g, w in zip(flat(got), flat(want)):
            check_close(g, w, "final state")


# --- what is refused -----------------------------------------------------------------------------
def test_unsupported_modules_are_refused_by_name():
    with pytest.raises(TypeError, match=r"the module \(nn.LSTMCell\) is not an nn.LSTM.*one-layer nn.LSTM"):
        rnnengine.from_torch(nn.LSTMCell(3, 4))
    with pytest.raises(TypeError, match=r"sequential\[1\] \(nn.Linear\) is not an nn.LSTM"):
        rnnengine.from_torch(nn.Sequential(nn.GRU(3, 4), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match=r"modulelist\[1\] has batch_first=True"):
        rnnengine.from_torch(nn.ModuleList([nn.GRU(3, 4), nn.GRU(4, 4, batch_first=True)]))
    with pytest.raises(ValueError, match=r"modulelist\[1\] takes input_size 5, but the module before it gives 4"):
        rnnengine.from_torch(nn.ModuleList([nn.GRU(3, 4), nn.GRU(5, 4)]))
    with pytest.raises(TypeError, match=r"the module: weight_ih_l0 is torch.float64.*module.float\(\)"):
        rnnengine.from_torch(nn.LSTM(3, 4).double())
    with pytest.raises(ValueError, match="sequential is an empty Sequential"):
        rnnengine.from_torch(nn.Sequential())
    with pytest.raises(TypeError, match=r"modulelist\[1\]\[0\] \(nn.Linear\) is not an nn.LSTM"):
        rnnengine.from_torch(nn.ModuleList([nn.GRU(3, 4), nn.Sequential(nn.Linear(4, 2))]))


def test_modules_with_another_forward_are_refused():
    class Normed(nn.LSTM):
        def forward(self, x, hx=None):
            y, state = super().forward(x, hx)
            return y / (1 + y.abs()), state
    with pytest.raises(TypeError, match=r"the module \(.*Normed\) overrides forward\(\) of nn.LSTM"):
        rnnengine.from_torch(Normed(3, 4))
    m = nn.GRU(3, 4)
    m.register_forward_hook(lambda mod, inp, out: (out[0] * 2, out[1]))
    with pytest.raises(TypeError, match=r"sequential\[0\] \(nn.GRU\) has forward hooks \(_forward_hooks\)"):
        rnnengine.from_torch(nn.Sequential(m))

    class Named(nn.LSTM):  # a subclass that only adds things keeps torch's forward: accepted
        pass
    n = Named(3, 4)
    x = np.random.default_rng(16).standard_normal((4, 1, 3)).astype(np.float32)
    check_close(rnnengine.from_torch(n).run(x)[0], run_float64(n, x)[0].numpy(), "subclass")


def test_nested_and_one_item_containers():
    """Nested containers are flattened; a container's states are lists even of one module."""
    gru, rnn = make_module("GRU", 3, 4, seed=14), make_module("RNN_TANH", 4, 2, layers=2, seed=15)
    x = np.random.default_rng(14).standard_normal((5, 2, 3)).astype(np.float32)
    y1, h1 = run_float64(gru, x)
    y2, h2 = run_float64(rnn, y1.numpy())
    model = rnnengine.from_torch(nn.Sequential(nn.ModuleList([gru]), nn.Sequential(rnn)))
    Y, final = model.run(x)
    check_close(Y, y2.numpy(), "output")
    got = model.to_torch_state(final)
    assert isinstance(got, list) and len(got) == 2
    check_close(got[0], h1.numpy(), "h_n of the GRU")
    check_close(got[1], h2.numpy(), "h_n of the RNN")
    one = rnnengine.from_torch(nn.Sequential(gru))
    h0 = np.random.default_rng(15).standard_normal((1, 2, 4)).astype(np.float32)
    Y1, f1 = one.run(x, state=one.from_torch_state([h0]))
    check_close(Y1, run_float64(gru, x, torch.from_numpy(h0))[0].numpy(), "one-item Sequential")
    assert isinstance(one.to_torch_state(f1), list)


def test_training_mode_dropout_warns_and_computes_eval_mode():
    m = make_module("GRU", 3, 4, layers=2, seed=10)
    m.dropout = 0.5
    m.train()
    x = np.random.default_rng(10).standard_normal((5, 2, 3)).astype(np.float32)
    with pytest.warns(UserWarning, match="training mode with dropout=0.5"):
        model = rnnengine.from_torch(m)
    y = run_float64(m.eval(), x)[0].numpy()
    check_close(model.run(x)[0], y, "eval-mode result")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rnnengine.from_torch(m)  # eval mode: no warning


def test_projected_state_shapes_are_checked():
    model = rnnengine.from_torch(make_module("LSTM", 3, 6, proj=2, seed=11))
    s = model.stream(2)
    h, c = s.get_state()["layers"]["layer0"]
    assert h.shape == (1, 2, 2) and c.shape == (1, 2, 6)
    with pytest.raises(ValueError, match=r"state\['layers'\]\['layer0'\] h must have shape \(1, 2, 2\) "
                                         r"\(directions, batch, proj_size\)"):
        s.set_state({"layers": {"layer0": (c, c)}})
    with pytest.raises(ValueError, match="projection exists only for LSTM"):
        rnnengine.GRU(np.zeros((1, 6, 2)), np.zeros((1, 6, 2)), projection=np.zeros((1, 1, 2)))


def test_onnx_export_of_proj_size_is_refused_pointing_to_from_torch():
    with open(os.path.join(HERE, "data", "corpus", "manifest.json")) as f:
        entries = [e for e in json.load(f)["models"] if e.get("pattern") == "lstm_proj_size"
                   and e.get("convert", {}).get("expect") == "refuse"]
    assert entries
    from rnnengine.frontend.converter import ConversionError
    for e in entries:
        with pytest.raises(ConversionError, match=r"node '.+'.*rnnengine\.from_torch\(module\)"):
            rnnengine.convert(os.path.join(HERE, "data", "corpus", e["file"]))
