"""The STFT front end by FFT (src_c/stft.c, RNN_OP_STFT): a Conv1d whose filters are a windowed
DFT basis (rnnengine/ops/handlers.py, dft_basis) computed without its filters.

- which filters are recognised (silero-vad's, synthetic bases of every power-of-two length,
  both signs, any window), and which are not (one value off by more than rounding, other
  shapes, a bias, several channels): those stay Conv;
- the op against an exact float64 convolution with the stored filters, within the rounding of
  a float32 sum, on every kernel level (AVX-512, AVX2 and the portable one, bit for bit
  alike), with padding, batches, strides and many frames; NaN and Inf exactly where the
  direct product (RNN_OP_CONV1D) has them;
- models against onnxruntime (an STFT magnitude as audio front ends compute it), silero-vad
  planned with the op;
- the C verifier refusing hostile instructions of the op.
"""
import os

import numpy as np
import onnx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from rnnengine import _core
from rnnengine.codes import OP_CONV1D, OP_CONV1D_PACKED, OP_STFT
from rnnengine.ops.handlers import dft_basis
import rnnengine
from test_conv_packed import conv64, lout_of, run_conv
from test_graph_ops import check, model_of
from test_stream_rule import close, ort_session, stream_in_chunks

F32 = 0
rng = np.random.default_rng(2026)
EPS = 2.0 ** -23


def basis(K, window, sign=-1):
    """The (K + 2, 1, K) float32 filters of a windowed DFT, as exporters store them."""
    n = np.arange(K)
    f = np.arange(K // 2 + 1)[:, None]
    a = 2 * np.pi * f * n / K
    return np.concatenate([window * np.cos(a), sign * window * np.sin(a)]).astype(np.float32)[:, None, :]


def hann(K):
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(K) / K)


WINDOWS = {"hann": hann, "hamming": lambda K: 0.54 - 0.46 * np.cos(2 * np.pi * np.arange(K) / K),
           "rect": lambda K: np.ones(K), "random": lambda K: rng.uniform(0.1, 2.0, K)}


def run_stft(geo, x, W, level=None):
    """One RNN_OP_STFT over its own tensors (geo as CONV1D's: N, C=1, L, M, K, s, d=1, pl, g=1)."""
    N, C, L, M, K, s, d, pl, g = geo
    Lout = lout_of(*geo)
    table, sign = dft_basis(W)
    out = np.full(N * M * Lout, np.nan, np.float32)
    ip = [N, L, Lout, K, s, pl, sign]
    word = [OP_STFT, 0, 1, 2, -1, 3, -1, -1, -1, 0, len(ip), 0, 0] + [0] * (_core.INSTR_WORDS - 13)
    work = _core.stft_sizes(K)[1]
    arrs = [np.ascontiguousarray(x.reshape(-1)), W.reshape(-1), table, out]
    prog = _core.Program(np.array([word], np.int64), np.array(ip, np.int64), np.zeros(1, np.float32), [], None,
                         tensor_dtypes=[F32] * 4, tensor_counts=[a.size for a in arrs], work_floats=work)
    before = _core.kernel_level()
    try:
        if level is not None:
            _core.kernel_level(level)
        prog.run(np.array([_core.address(a) for a in arrs], np.int64), np.zeros(work, np.float32))
    finally:
        _core.kernel_level(before)
    return out.reshape(N, M, Lout)


def within_fft_rounding(got, exact, frame_mag):
    """|got - exact| within float32 rounding of the frame's sum of |w x| (what both an FFT and
    the direct product round at), per output."""
    err = np.abs(got.astype(np.float64) - exact)
    bound = 1e-6 * (1.0 + frame_mag)
    assert np.all(err <= bound), float(np.max(err / bound))


def frame_magnitudes(x, window, geo):
    """(N, 1, Lout): sum over each frame of |w[n] x[p]| (padding counts as 0)."""
    N, C, L, M, K, s, d, pl, g = geo
    ones = np.abs(window).astype(np.float32)[None, None, :]
    return conv64(np.abs(x), ones, np.zeros(1, np.float32), s, 1, pl, 1, lout_of(*geo))[0]


# --- which filters are a DFT basis ------------------------------------------------------------

def _silero_bases():
    import importlib.util
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("silero-vad is not installed (pip install --no-deps silero-vad)")
    m = onnx.load(os.path.join(list(spec.submodule_search_locations)[0], "data", "silero_vad.onnx"))
    found = []

    def walk(graph):
        for node in graph.node:
            if node.op_type == "Constant" and "forward_basis" in node.output[0]:
                found.append(numpy_helper.to_array(node.attribute[0].t))
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
    walk(m.graph)
    return found


def test_silero_vad_filters_are_recognised_with_their_window():
    bases = _silero_bases()
    assert sorted(W.shape for W in bases) == [(130, 1, 128), (258, 1, 256)]  # 8 kHz and 16 kHz
    for W in bases:
        table, sign = dft_basis(W)
        K = W.shape[2]
        assert sign == -1
        np.testing.assert_array_equal(table[:K], W[0, 0])  # the window is the stored cosine row 0
        assert np.abs(W[0, 0] - hann(K)).max() < 1e-7


@pytest.mark.parametrize("K", [4, 8, 16, 32, 64, 128, 256, 512, 1024])
@pytest.mark.parametrize("window", sorted(WINDOWS))
@pytest.mark.parametrize("sign", [1, -1])
def test_synthetic_bases_are_recognised(K, window, sign):
    W = basis(K, WINDOWS[window](K), sign)
    table, got = dft_basis(W)
    assert got == sign and table.size == _core.stft_sizes(K)[0]


def test_what_is_not_a_dft_basis_is_left_to_conv():
    W = basis(64, hann(64))
    assert dft_basis(W) is not None
    off = W.copy()
    off[7, 0, 20] += 16 * EPS * np.abs(hann(64)).max()  # beyond rounding in one value
    assert dft_basis(off) is None
    assert dft_basis(W[:-1]) is None  # M != K + 2
    assert dft_basis(basis(48, hann(48))) is None  # K not a power of two
    assert dft_basis(np.concatenate([W, W], axis=1)) is None  # two channels
    assert dft_basis(W.astype(np.float64)) is None
    assert dft_basis(np.zeros_like(W)) is None
    assert dft_basis(rng.standard_normal(W.shape).astype(np.float32)) is None
    swapped = W.copy()
    swapped[33:] = -swapped[33:]
    swapped[40] = -swapped[40]  # sines of both signs
    assert dft_basis(swapped) is None
    nan = W.copy()
    nan[3, 0, 3] = np.nan
    assert dft_basis(nan) is None


# --- the op against the exact convolution ---------------------------------------------------

# N, C, L, M, K, stride, dilation, pad_left, group (C = 1, d = 1, g = 1, M = K + 2)
GEOMETRIES = [
    (1, 1, 640, 258, 256, 128, 1, 0, 1),    # silero-vad 16 kHz, one chunk
    (1, 1, 320, 130, 128, 64, 1, 0, 1),     # silero-vad 8 kHz
    (3, 1, 1000, 66, 64, 16, 1, 0, 1),      # a batch, 58 frames, the AVX-512 stages' smallest h (32)
    (2, 1, 300, 34, 32, 7, 1, 20, 1),       # h = 16 (AVX2's smallest; portable below AVX2), frames into the padding
    (1, 1, 100, 18, 16, 4, 1, 2, 1),        # h = 8: the portable stages at every level
    (1, 1, 9, 6, 4, 1, 1, 3, 1),            # the smallest K, padded on both sides
    (1, 1, 5000, 514, 512, 160, 1, 256, 1), # a speech front end: K 512, hop 160, centred frames
]


LEVELS = [lv for lv in (2, 1, 0) if lv <= _core.kernel_level_max()]


@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("window", ["hann", "random"])
@pytest.mark.parametrize("level", LEVELS)
def test_fft_equals_the_exact_convolution_within_rounding(geo, window, level):
    N, C, L, M, K, s, d, pl, g = geo
    w = WINDOWS[window](K)
    W = basis(K, w, sign=1 if window == "random" else -1)
    x = (rng.standard_normal((N, 1, L)) * 3).astype(np.float32)
    exact, _ = conv64(x, W, np.zeros(M, np.float32), s, 1, pl, 1, lout_of(*geo))
    got = run_stft(geo, x, W, level)
    assert got.shape == exact.shape
    within_fft_rounding(got, exact, frame_magnitudes(x, W[0, 0], geo))
    # the AVX-512, AVX2 and portable stages do the same operations in the same order
    assert np.array_equal(got, run_stft(geo, x, W, 0))
    # the direct product (the Conv it replaces) is within the same rounding
    direct = run_conv(OP_CONV1D, geo, x, W.reshape(-1), np.zeros(M, np.float32))
    within_fft_rounding(direct, exact, frame_magnitudes(x, W[0, 0], geo))


@pytest.mark.parametrize("level", LEVELS)
def test_nan_and_inf_where_the_direct_product_has_them(level):
    geo = (2, 1, 700, 130, 128, 50, 1, 10, 1)
    W = basis(128, hann(128))
    x = rng.standard_normal((2, 1, 700)).astype(np.float32)
    x[0, 0, 3] = np.nan        # the first frame (padded) and no other
    x[0, 0, 300] = np.inf      # frames 4-6 of row 0
    x[1, 0, 520] = -np.inf     # row 1
    x[1, 0, 100] = 3e38        # finite, but products overflow
    got = run_stft(geo, x, W, level)
    ref = run_conv(OP_CONV1D, geo, x, W.reshape(-1), np.zeros(130, np.float32))
    assert np.isnan(ref).any() and np.isinf(ref).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
    np.testing.assert_array_equal(got[np.isinf(got)], ref[np.isinf(ref)])
    ok = np.isfinite(ref)
    exact, _ = conv64(np.nan_to_num(x, nan=0, posinf=0, neginf=0), W, np.zeros(130, np.float32), 50, 1, 10, 1,
                      lout_of(*geo))
    frames_ok = np.isfinite(ref).all(axis=1, keepdims=True) & np.isfinite(got).all(axis=1, keepdims=True)
    clean = np.broadcast_to(frames_ok, ref.shape) & ok
    mag = np.broadcast_to(frame_magnitudes(np.nan_to_num(x, posinf=0, neginf=0), W[0, 0], geo), ref.shape)
    within_fft_rounding(got[clean], exact[clean], mag[clean])


# --- models ---------------------------------------------------------------------------------

def _plan_ops(gm, feeds):
    return [int(op) for op in gm.plan(feeds).program.program[:, 0]]


@pytest.mark.parametrize("K,hop", [(256, 128), (64, 16), (512, 160)])
def test_stft_magnitude_model_matches_onnxruntime(K, hop):
    """Pad (reflect) -> Conv with the DFT basis -> real/imaginary halves -> sqrt(re^2 + im^2),
    as silero-vad's front end."""
    F = K // 2 + 1
    W = basis(K, hann(K))
    x = (rng.standard_normal((2, 4 * hop + K)) * 0.5).astype(np.float32)
    nodes = [helper.make_node("Unsqueeze", ["x", "one"], ["x3"]),
             helper.make_node("Pad", ["x3", "pads"], ["xp"], mode="reflect"),
             helper.make_node("Conv", ["xp", "w"], ["spec"], strides=[hop], kernel_shape=[K]),
             helper.make_node("Slice", ["spec", "s0", "s1", "ax"], ["re"]),
             helper.make_node("Slice", ["spec", "s1", "s2", "ax"], ["im"]),
             helper.make_node("Mul", ["re", "re"], ["re2"]), helper.make_node("Mul", ["im", "im"], ["im2"]),
             helper.make_node("Add", ["re2", "im2"], ["p"]), helper.make_node("Sqrt", ["p"], ["y"])]
    inits = [("w", W), ("one", np.array([1], np.int64)), ("pads", np.array([0, 0, K // 4, 0, 0, K // 4], np.int64)),
             ("s0", np.array([0], np.int64)), ("s1", np.array([F], np.int64)), ("s2", np.array([2 * F], np.int64)),
             ("ax", np.array([1], np.int64))]
    gm, _ = check(model_of(nodes, [("x", x)], ["y", "spec"], inits), {"x": x})
    ops = _plan_ops(gm, {"x": x})
    assert OP_STFT in ops and OP_CONV1D_PACKED not in ops and OP_CONV1D not in ops


def test_a_near_basis_or_a_bias_stays_a_conv_and_matches_onnxruntime():
    K = 64
    x = rng.standard_normal((1, 1, 400)).astype(np.float32)
    W = basis(K, hann(K))
    off = W.copy()
    off[5, 0, 9] += 1e-3
    for w, b in ((off, None), (W, np.full(K + 2, 0.5, np.float32))):
        inputs = ["x", "w"] + (["b"] if b is not None else [])
        node = helper.make_node("Conv", inputs, ["y"], strides=[16], kernel_shape=[K])
        inits = [("w", w)] + ([("b", b)] if b is not None else [])
        gm, _ = check(model_of([node], [("x", x)], ["y"], inits), {"x": x})
        ops = _plan_ops(gm, {"x": x})
        assert OP_STFT not in ops and OP_CONV1D_PACKED in ops


def test_silero_vad_is_planned_with_the_fft():
    import importlib.util
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("silero-vad is not installed (pip install --no-deps silero-vad)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "silero_vad.onnx")
    for sr, n in ((16000, 576), (8000, 288)):
        gm = rnnengine.convert(path, fixed_inputs={"sr": sr})
        feeds = {"input": np.zeros((1, n), np.float32), "state": np.zeros((2, 1, 128), np.float32)}
        ops = _plan_ops(gm, feeds)
        assert ops.count(OP_STFT) == 1, sr


# --- the C verifier -------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"K": 48}, "not a power of two"),
    ({"sign": 0}, "sign 0"),
    ({"stride": 0}, "stride 0"),
    ({"table": -1}, "table has"),
    ({"out": -1}, "output has"),
    ({"x": -1}, "input has"),
    ({"Lout": 2 ** 40}, "output has 1452 elements, the instruction writes"),
    ({"work": -1}, "workspace"),
])
def test_verifier_refuses_hostile_stft_instructions(change, message):
    K, L, Lout, s = 64, 400, 22, 16
    W = basis(K, hann(K))
    table, sign = dft_basis(W)
    ip = dict(N=1, L=L, Lout=Lout, K=K, stride=s, pad=0, sign=sign)
    ip.update({k: v for k, v in change.items() if k in ip})
    sizes = {"x": L, "W": W.size, "table": table.size, "out": (K + 2) * Lout}
    for k in ("x", "table", "out"):
        if change.get(k) == -1:
            sizes[k] -= 1
    work = _core.stft_sizes(K)[1] - (1 if change.get("work") == -1 else 0)
    word = [OP_STFT, 0, 1, 2, -1, 3, -1, -1, -1, 0, 7, 0, 0] + [0] * (_core.INSTR_WORDS - 13)
    with pytest.raises(ValueError, match=message):
        _core.Program(np.array([word], np.int64), np.array(list(ip.values()), np.int64), np.zeros(1, np.float32), [],
                      None, tensor_dtypes=[F32] * 4, tensor_counts=list(sizes.values()), work_floats=work)


def test_recognising_a_large_basis_keeps_its_temporaries_small():
    """dft_basis checks the filters a block of rows at a time: a frame of 4096 samples (67 MB
    of filters) needs temporaries of tens of MB, not the (K/2) x K float64 arrays (hundreds of
    MB; a K of 16384 would have taken gigabytes while planning)."""
    import tracemalloc
    K = 4096
    W = basis(K, hann(K))
    tracemalloc.start()
    try:
        found = dft_basis(W)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found is not None and found[1] == -1
    assert peak < 64 * 2 ** 20, peak


# --- streams ----------------------------------------------------------------------------------

def stft_front_end(K, hop, pads, H=6):
    """x (B, 1, T) -> Conv with a DFT basis (the STFT) -> |X|^2 -> (frames, B, F) -> GRU -> y,
    plus the spectrum itself: a spectrogram model fed along time."""
    F = K // 2 + 1
    rng = np.random.default_rng(K + hop)
    inits = [("w", basis(K, hann(K))), ("s0", np.array([0], np.int64)), ("s1", np.array([F], np.int64)),
             ("s2", np.array([2 * F], np.int64)), ("ax", np.array([1], np.int64)), ("ax1", np.array([1], np.int64)),
             ("W", (rng.standard_normal((1, 3 * H, F)) * 0.05).astype(np.float32)),
             ("R", (rng.standard_normal((1, 3 * H, H)) * 0.3).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["spec"], strides=[hop], kernel_shape=[K], pads=list(pads)),
             helper.make_node("Slice", ["spec", "s0", "s1", "ax"], ["re"]),
             helper.make_node("Slice", ["spec", "s1", "s2", "ax"], ["im"]),
             helper.make_node("Mul", ["re", "re"], ["re2"]), helper.make_node("Mul", ["im", "im"], ["im2"]),
             helper.make_node("Add", ["re2", "im2"], ["p"]),
             helper.make_node("Transpose", ["p"], ["pt"], perm=[2, 0, 1]),
             helper.make_node("GRU", ["pt", "W", "R"], ["Y"], hidden_size=H),
             helper.make_node("Squeeze", ["Y", "ax1"], ["y"])]
    g = helper.make_graph(nodes, "stft", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 1, "T"])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("y", "spec")],
                          [numpy_helper.from_array(a, n) for n, a in inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


# Found by this test: a first chunk of 1-7 samples before a Conv of 64 taps and hop 64 plans
# no frame, or one frame whatever 32 more samples add, so the stream took the input for one
# without a time axis and ran every chunk as a sequence of its own (no frames, or a frame per
# chunk: a silent wrong answer). GraphModel.time_axes now also tries much longer inputs.
@example(K=64, hop_div=1, pad="valid", chunks=[1], frames=3, seed=0)
@example(K=64, hop_div=1, pad="causal", chunks=[1], frames=3, seed=0)
@example(K=64, hop_div=1, pad="causal", chunks=[7], frames=3, seed=0)
@example(K=64, hop_div=2, pad="valid", chunks=[1], frames=3, seed=0)
@settings(max_examples=40, deadline=None)
@given(K=st.sampled_from([16, 64, 128]), hop_div=st.sampled_from([1, 2, 4]),
       pad=st.sampled_from(["valid", "causal", "centred"]), chunks=st.lists(st.integers(1, 90), min_size=1, max_size=4),
       frames=st.integers(3, 9), seed=st.integers(0, 99))
def test_a_spectrogram_model_streams_exactly_in_any_chunks(K, hop_div, pad, chunks, frames, seed):
    """Fed along time in chunks of any size, the stream's spectrum and GRU output equal the
    whole run's, which equals onnxruntime's (the Conv's carried tail feeds the FFT as it fed
    the direct product)."""
    hop = K // hop_div
    pads = {"valid": (0, 0), "causal": (K - 1, 0), "centred": (K // 2, K // 2)}[pad]
    m = stft_front_end(K, hop, pads)
    x = (np.random.default_rng(seed).standard_normal((2, 1, K + hop * frames)) * 0.5).astype(np.float32)
    gm = rnnengine.convert(m)
    whole = gm.run({"x": x})
    assert OP_STFT in _plan_ops(gm, {"x": x})
    want = ort_session(m).run(None, {"x": x})
    close(whole["y"], want[0])
    close(whole["spec"], want[1])
    s, parts = stream_in_chunks(gm, {"x": x}, 2, chunks)
    close(np.concatenate([p["spec"] for p in parts], axis=2), whole["spec"])
    close(np.concatenate([p["y"] for p in parts], axis=0), whole["y"])


# --- found by review ----------------------------------------------------------------------------

def test_taps_where_the_window_is_zero_must_be_zero_too():
    """The tolerance is per tap (2 eps |w[n]|): a basis whose filters hold 2e-7 where the Hann
    window is 0 (tap 0) was accepted by a tolerance on the window's largest value, and an
    impulse there gave 0 where onnxruntime gives 2e-4 (20x the tolerance)."""
    K = 64
    W = basis(K, hann(K))
    off = W.copy()
    off[1:, 0, 0] = 2e-7 * np.where(np.arange(1, K + 2) % 2, 1, -1)
    assert dft_basis(W) is not None and dft_basis(off) is None
    x = np.zeros((1, 1, 4 * K), np.float32)
    x[0, 0, ::K] = 1000.0
    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=[K], kernel_shape=[K])
    gm, _ = check(model_of([node], [("x", x)], ["y"], [("w", off)]), {"x": x})
    assert OP_STFT not in _plan_ops(gm, {"x": x})


def test_a_zero_bias_of_the_wrong_length_is_refused_as_for_any_conv():
    K = 64
    x = rng.standard_normal((1, 1, 300)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[16], kernel_shape=[K])
    gm = rnnengine.convert(model_of([node], [("x", x)], ["y"], [("w", basis(K, hann(K))), ("b", np.zeros(3, np.float32))]))
    with pytest.raises(ValueError, match="bias"):
        gm.run({"x": x})


@pytest.mark.parametrize("op", ["stft", "conv"])
def test_verifier_bounds_the_padding_with_the_stride(op):
    """A stride of 2^62 - K with a padding of -2^62 passed the verifier (the padding was not
    counted in the reach), and the window test p0 + K <= L wrapped around: the frames read the
    K floats before the input."""
    K, L, Lout, s, pad = 4, 8, 2, 2 ** 62 - 4, -(2 ** 62)
    if op == "stft":
        W = basis(K, hann(K))
        table, sign = dft_basis(W)
        ip = [1, L, Lout, K, s, pad, sign]
        counts = [L, W.size, table.size, (K + 2) * Lout]
        work = _core.stft_sizes(K)[1]
        opcode = OP_STFT
    else:
        ip = [1, 1, L, 2, K, Lout, s, 1, pad, 1]
        counts = [L, 2 * K, 2, 2 * Lout]
        work = 64
        opcode = OP_CONV1D
    word = [opcode, 0, 1, 2, -1, 3, -1, -1, -1, 0, len(ip), 0, 0] + [0] * (_core.INSTR_WORDS - 13)
    with pytest.raises(ValueError, match="padding reach beyond any input"):
        _core.Program(np.array([word], np.int64), np.array(ip, np.int64), np.zeros(1, np.float32), [], None,
                      tensor_dtypes=[F32] * 4, tensor_counts=counts, work_floats=work)


def test_a_plan_that_failed_for_want_of_memory_is_not_kept_as_a_refusal(monkeypatch):
    """Plan refusals are cached by shapes, but a constant fold that ran out of memory (reported
    as UnsupportedError by the planner) may succeed on the next call."""
    from rnnengine.ops import handlers
    x = np.ones((2, 3), np.float32)
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Expand", ["c", "shape"], ["e"]),
             helper.make_node("Add", ["x", "e"], ["y"])]
    gm = rnnengine.convert(model_of(nodes, [("x", x)], ["y"], [("c", np.ones((1, 3), np.float32))]))
    orig, calls = handlers.Expand.eval, []

    def flaky(self, xs):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("Unable to allocate 24 B for an array")
        return orig(self, xs)
    monkeypatch.setattr(handlers.Expand, "eval", flaky)
    with pytest.raises(Exception):
        gm.run({"x": x})
    np.testing.assert_array_equal(gm.run({"x": x})["y"], x + 1)
    assert len(calls) == 2
