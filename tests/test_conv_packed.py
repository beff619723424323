"""The packed-filter Conv1d (src_c/conv.c, RNN_OP_CONV1D_PACKED) against its reference
(RNN_OP_CONV1D: im2col + GEMM) and an exact float64 convolution on odd sizes (filters not a
multiple of the 16-filter panel, lengths past the 64-position block, one channel read in
place, groups, dilation, padding, NaN and Inf), with its fused Relu / LeakyRelu, an unaligned
filter buffer (the plain reference kernel), Conv models against onnxruntime with the fusion
the planner makes, and the lowering helpers next to it (Pow by 2, merged copy axes)."""
import numpy as np
import pytest
from onnx import helper

import rnnengine
from rnnengine import _core
from rnnengine.codes import ACT_LEAKY_RELU, ACT_RELU, OP_CONV1D, OP_CONV1D_PACKED, OP_UNARY
from rnnengine.ops.handlers import conv_work_floats, merge_axes, pack_conv_filters
from oracle import max_violation
from test_graph_ops import check, model_of

F32 = 0
rng = np.random.default_rng(77)

# N, C, L, M, K, stride, dilation, pad_left, group
GEOMETRIES = [
    (1, 1, 640, 258, 256, 128, 1, 0, 1),   # silero-vad's STFT: one channel, read in place
    (1, 129, 4, 128, 3, 1, 1, 1, 1),       # its first encoder conv
    (2, 5, 53, 19, 7, 2, 1, 3, 1),         # odd everything
    (3, 6, 150, 33, 3, 1, 2, 2, 3),        # groups, dilation, > 64 positions (blocks)
    (1, 4, 9, 4, 1, 1, 1, 0, 4),           # depthwise 1x1
    (2, 1, 200, 17, 5, 3, 1, 0, 1),        # one channel with a stride
    (1, 3, 7, 40, 4, 1, 3, 5, 1),          # windows mostly in the padding
    (1, 7, 1, 5, 1, 1, 1, 0, 1),           # one position (a MatMul shape)
    (1, 16, 66, 48, 2, 1, 1, 0, 2),        # 48 / 2 = 24 filters per group: a partial panel
    (1, 129, 2, 128, 3, 1, 1, 1, 1),       # silero-vad's encoder streamed at 8 kHz: one frame
    (1, 128, 2, 64, 3, 2, 1, 1, 1),        # a tap in the padding and a stride: one position
    (2, 64, 3, 64, 3, 1, 1, 1, 1),         # three positions: fewer than a block of four rows
    (1, 130, 12, 36, 3, 2, 1, 1, 2),       # 195 taps in four parts of 48-49, two groups of two panels
]


def lout_of(N, C, L, M, K, s, d, pl, g, pr=0):
    return (L + pl + pr - d * (K - 1) - 1) // s + 1


def conv64(x, W, b, s, d, pl, g, Lout):
    """The exact convolution (float64) and, per output, the sum of |w x| over its taps (the
    scale of its rounding error)."""
    N, C, L = x.shape
    M, Cg, K = W.shape
    xp = np.zeros((N, C, L + pl + d * K + s * Lout), np.float64)
    xp[:, :, pl:pl + L] = x
    out = np.zeros((N, M, Lout))
    mag = np.zeros((N, M, Lout))
    Mg = M // g
    with np.errstate(invalid="ignore", over="ignore"):
        for gi in range(g):
            for k in range(K):
                cols = xp[:, gi * Cg:(gi + 1) * Cg, k * d: k * d + s * (Lout - 1) + 1: s]
                w = W[gi * Mg:(gi + 1) * Mg, :, k].astype(np.float64)
                out[:, gi * Mg:(gi + 1) * Mg] += np.einsum("mc,ncl->nml", w, cols)
                mag[:, gi * Mg:(gi + 1) * Mg] += np.einsum("mc,ncl->nml", np.abs(w), np.abs(cols))
    return out + b.reshape(1, M, 1), mag


def run_conv(op, geo, x, Wbuf, b, act=-1, alpha=0.0):
    """One instruction over its own tensors: out (N, M, Lout)."""
    N, C, L, M, K, s, d, pl, g = geo
    Lout = lout_of(*geo)
    out = np.full(N * M * Lout, np.nan, np.float32)
    ip = [N, C, L, M, K, Lout, s, d, pl, g] + ([act] if op == OP_CONV1D_PACKED else [])
    fp = [alpha] if op == OP_CONV1D_PACKED else []
    word = [op, 0, 1, 2, -1, 3, -1, -1, -1, 0, len(ip), 0, len(fp)] + [0] * (_core.INSTR_WORDS - 13)
    work = max(16, Lout * (C // g) * K, conv_work_floats(N, Lout, C // g, K, M // g))
    arrs = [x.reshape(-1), Wbuf, b, out]
    prog = _core.Program(np.array([word], np.int64), np.array(ip, np.int64), np.array(fp or [0.0], np.float32), [],
                         None, tensor_dtypes=[F32] * 4, tensor_counts=[a.size for a in arrs], work_floats=work)
    prog.run(np.array([_core.address(a) for a in arrs], np.int64), np.zeros(work, np.float32))
    return out.reshape(N, M, Lout)


def packed_for(W, geo):
    """W packed for the sums the op takes at this geometry (1 part, or 4 for a call of 1-3
    positions of 64 taps or more: src_c/conv.c, "Order of the sums")."""
    N, C, L, M, K, s, d, pl, g = geo
    return pack_conv_filters(W, g, _core.conv_parts((C // g) * K, lout_of(*geo)))


def within_rounding(got, exact, mag):
    """|got - exact| within float32 rounding of a sum of that magnitude (NaN where exact is,
    the same infinities)."""
    nan, inf = np.isnan(exact), np.isinf(exact)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[inf], exact[inf])
    ok = np.isfinite(exact)
    err = np.abs(got[ok] - exact[ok])
    assert np.all(err <= 1e-6 * (1.0 + mag[ok])), float(np.max(err / (1.0 + mag[ok])))


LEVELS = [lv for lv in (2, 1, 0) if lv <= _core.kernel_level_max()]


@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("level", LEVELS)
def test_packed_conv_equals_reference_and_exact(geo, level):
    N, C, L, M, K, s, d, pl, g = geo
    Lout = lout_of(*geo)
    x = rng.standard_normal((N, C, L)).astype(np.float32)
    W = rng.standard_normal((M, C // g, K)).astype(np.float32)
    b = rng.standard_normal(M).astype(np.float32)
    exact, mag = conv64(x, W, b, s, d, pl, g, Lout)
    before = _core.kernel_level()
    try:
        _core.kernel_level(level)
        fast = run_conv(OP_CONV1D_PACKED, geo, x, packed_for(W, geo), b)
    finally:
        _core.kernel_level(before)
    ref = run_conv(OP_CONV1D, geo, x, W.reshape(-1), b)
    within_rounding(fast, exact, mag)
    within_rounding(ref, exact, mag)
    # the packing is what the layout says (src_c/conv.c): per group, the Cg*K taps in four
    # parts [i*CK//4, (i+1)*CK//4) for 1-3 positions of 64 taps or more (else one), each part
    # P panels of (its taps, 16), filter m of the group at panel m // 16, lane m % 16, lanes
    # past the group's filters zero
    packed = packed_for(W, geo)
    Mg, P, CK = M // g, -(-(M // g) // 16), (C // g) * K
    assert packed.size == g * P * 16 * CK and packed.ctypes.data % 64 == 0
    want = []
    for gi in range(g):
        Wg = np.zeros((P * 16, CK), np.float32)
        Wg[:Mg] = W[gi * Mg:(gi + 1) * Mg].reshape(Mg, CK)
        parts = 4 if CK >= 64 and Lout < 4 else 1
        assert _core.conv_parts(CK, Lout) == parts
        for i in range(parts):
            part = Wg[:, i * CK // parts:(i + 1) * CK // parts]                       # (P*16, n)
            want.append(part.reshape(P, 16, -1).transpose(0, 2, 1).reshape(-1))  # (P, n, 16)
    assert np.array_equal(packed, np.concatenate(want))


@pytest.mark.parametrize("geo", [GEOMETRIES[0], GEOMETRIES[2], GEOMETRIES[3]])
def test_nan_and_inf_propagate_as_in_the_reference(geo):
    N, C, L, M, K, s, d, pl, g = geo
    Lout = lout_of(*geo)
    x = rng.standard_normal((N, C, L)).astype(np.float32)
    x.reshape(-1)[[3, x.size - 2]] = [np.nan, np.inf]
    W = rng.standard_normal((M, C // g, K)).astype(np.float32)
    W[M // 2, 0, K - 1] = -np.inf
    b = rng.standard_normal(M).astype(np.float32)
    exact, mag = conv64(x, W, b, s, d, pl, g, Lout)
    fast = run_conv(OP_CONV1D_PACKED, geo, x, packed_for(W, geo), b)
    ref = run_conv(OP_CONV1D, geo, x, W.reshape(-1), b)
    assert np.isnan(exact).any() and np.isinf(exact).any()
    assert np.array_equal(np.isnan(fast), np.isnan(ref))
    assert np.array_equal(np.isinf(fast), np.isinf(ref)) and np.array_equal(fast[np.isinf(fast)], ref[np.isinf(ref)])
    within_rounding(fast, exact, np.nan_to_num(mag, posinf=0.0))


@pytest.mark.parametrize("act,alpha", [(ACT_RELU, 0.0), (ACT_LEAKY_RELU, 0.1)])
def test_fused_activation_is_the_activation_of_the_conv_bit_for_bit(act, alpha):
    geo = GEOMETRIES[2]
    N, C, L, M, K, s, d, pl, g = geo
    x = rng.standard_normal((N, C, L)).astype(np.float32)
    x[0, 0, 5] = np.nan
    W = rng.standard_normal((M, C // g, K)).astype(np.float32)
    b = rng.standard_normal(M).astype(np.float32)
    Wp = packed_for(W, geo)
    plain = run_conv(OP_CONV1D_PACKED, geo, x, Wp, b)
    fused = run_conv(OP_CONV1D_PACKED, geo, x, Wp, b, act, alpha)
    with np.errstate(invalid="ignore"):
        want = np.where(plain < 0, 0.0, plain) if act == ACT_RELU else np.where(plain >= 0, plain, np.float32(alpha) * plain)
    assert np.isnan(fused).any()
    np.testing.assert_array_equal(fused, want.astype(np.float32))


@pytest.mark.parametrize("geo", [GEOMETRIES[2], GEOMETRIES[9]])  # one part; four (1 position, 387 taps)
def test_unaligned_filters_take_the_reference_kernel_with_the_same_sums(geo):
    N, C, L, M, K, s, d, pl, g = geo
    x = rng.standard_normal((N, C, L)).astype(np.float32)
    W = rng.standard_normal((M, C // g, K)).astype(np.float32)
    b = rng.standard_normal(M).astype(np.float32)
    Wp = packed_for(W, geo)
    buf = np.empty(Wp.size + 1, np.float32)
    unaligned = buf[1:] if buf[1:].ctypes.data % 64 else buf[:-1]  # 4 bytes off a 64-byte boundary...
    if unaligned.ctypes.data % 64 == 0:
        unaligned = np.empty(Wp.size + 2, np.float32)[1:-1]
    assert unaligned.ctypes.data % 64 != 0
    unaligned[...] = Wp
    exact, mag = conv64(x, W, b, s, d, pl, g, lout_of(*geo))
    within_rounding(run_conv(OP_CONV1D_PACKED, geo, x, unaligned, b), exact, mag)


def _plan_ops(gm, feeds):
    plan = gm.plan(feeds)
    prog = plan.program.program
    return [int(op) for op in prog[:, 0]], prog, plan.program.iparams


@pytest.mark.parametrize("stride,dil,pads,group,act", [(1, 1, [1, 1], 1, "Relu"), (2, 2, [3, 0], 1, "LeakyRelu"),
                                                       (1, 1, [0, 2], 3, "Relu"), (3, 1, [0, 0], 1, None)])
def test_conv_models_match_onnxruntime_with_the_activation_fused(stride, dil, pads, group, act):
    x = rand_f32(2, 6, 61)
    w = rand_f32(21, 6 // group, 5)
    b = rand_f32(21)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c" if act else "y"], strides=[stride], dilations=[dil],
                              pads=pads, group=group, kernel_shape=[5])]
    if act:
        nodes.append(helper.make_node(act, ["c"], ["y"], **({"alpha": 0.2} if act == "LeakyRelu" else {})))
    gm, _ = check(model_of(nodes, [("x", x)], ["y"], [("w", w), ("b", b)]), {"x": x})
    ops, prog, ip = _plan_ops(gm, {"x": x})
    assert OP_CONV1D_PACKED in ops and OP_UNARY not in ops  # the activation went into the conv
    k = ops.index(OP_CONV1D_PACKED)
    assert ip[prog[k, 9] + 10] == {"Relu": ACT_RELU, "LeakyRelu": ACT_LEAKY_RELU, None: -1}[act]


def test_an_activation_whose_input_is_also_read_elsewhere_is_not_fused():
    x = rand_f32(1, 3, 40)
    w = rand_f32(8, 3, 3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3]),
             helper.make_node("Relu", ["c"], ["y"]), helper.make_node("Add", ["c", "y"], ["z"])]
    gm, _ = check(model_of(nodes, [("x", x)], ["y", "z", "c"], [("w", w)]), {"x": x})
    ops, prog, ip = _plan_ops(gm, {"x": x})
    assert OP_UNARY in ops and ip[prog[ops.index(OP_CONV1D_PACKED), 9] + 10] == -1


def test_pow_by_two_is_the_square_like_onnxruntime():
    x = rand_f32(3, 5, 7) * 1e19  # squares overflow to inf
    x[0, 0, :3] = [np.nan, np.inf, -np.inf]
    node = helper.make_node("Pow", ["x", "e"], ["y"])
    for e in (np.array(2.0, np.float32), np.full((5, 1), 2.0, np.float32)):
        gm, got = check(model_of([node], [("x", x)], ["y"], [("e", e)]), {"x": x})
        np.testing.assert_array_equal(got["y"], x * x)


def test_merge_axes_keeps_the_walk():
    # (1, 129, 4) rows of a (1, 258, 4) tensor into a (1, 129, 4) one: one run of 516
    assert merge_axes([1, 129, 4], [1032, 4, 1], [516, 4, 1]) == ([516], [[1], [1]])
    # a transpose does not merge
    assert merge_axes([3, 4], [1, 3], [4, 1]) == ([3, 4], [[1, 3], [4, 1]])
    # broadcast along the outer axis: stride 0 merges only with stride 0
    assert merge_axes([2, 3, 4], [0, 4, 1], [12, 4, 1]) == ([2, 12], [[0, 1], [12, 1]])
    # empty tensors are left alone
    assert merge_axes([2, 0, 4], [0, 4, 1]) == ([2, 0, 4], [[0, 4, 1]])


def rand_f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_constant_filters_go_through_the_panels_at_every_length():
    # however few output positions (a streamed chunk of one frame), a Conv with constant
    # filters is RNN_OP_CONV1D_PACKED: filters packed once at planning. Until 2026-12-03 fewer
    # than 4 positions went to BLAS (RNN_OP_CONV1D), which re-packed them at every call.
    x = rand_f32(1, 4, 6)
    w = rand_f32(16, 4, 3)
    for L in (6, 4, 3, 1):
        xx = x[:, :, :L].copy()
        node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3], pads=[1, 1])
        gm, _ = check(model_of([node], [("x", xx)], ["y"], [("w", w)]), {"x": xx})
        ops = _plan_ops(gm, {"x": xx})[0]
        assert OP_CONV1D_PACKED in ops and OP_CONV1D not in ops, (L, ops)
        assert isinstance(gm, rnnengine.Model)


@pytest.mark.parametrize("C,K,stride,pads", [(40, 3, 1, [1, 1]), (70, 5, 1, [2, 1]), (8, 3, 1, [1, 1])])
def test_stream_equals_the_whole_run_bit_for_bit_below_64_taps(C, K, stride, pads):
    # an output is one chain over its taps whatever the call's positions, except in a call of
    # 1-3 positions of 64 taps or more, which sums in four parts (src_c/conv.c, "Order of the
    # sums"): a stream of a 24-tap conv gives the whole run's bits at any chunking; of 120 and
    # 350 taps, where its first and last calls or small chunks have 1-3 positions, it stays
    # within the tolerance of the whole run
    x = rand_f32(2, C, 23)
    w = rand_f32(32, C, K)
    b = rand_f32(32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[K], strides=[stride], pads=pads)
    m = model_of([node], [("x", x)], ["y"], [("w", w), ("b", b)])
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_param, dims[2].dim_param = "B", "T"  # batch and time symbolic: a stream
    gm, whole = check(m, {"x": x})
    big = C * K >= 64
    for sizes in ([4], [5], [6, 4, 7], [1], [2, 3], [3, 1, 4]):
        s = gm.stream()
        parts, t, k = [], 0, 0
        while t < x.shape[2]:
            n = sizes[k % len(sizes)]
            parts.append(s({"x": x[:, :, t:t + n]})["y"])
            t, k = t + n, k + 1
        tail = s.finish()
        if tail:
            parts.append(tail["y"])
        got = np.concatenate(parts, axis=2)
        if big:
            assert max_violation(got, whole["y"]) <= 1, sizes
        else:
            assert np.array_equal(got, whole["y"]), sizes
