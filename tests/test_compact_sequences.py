"""float16 / int8 weights in whole sequences (issue 12, part 3): run() reads the compact R
(and W) that streaming steps read, so a sequence equals the same steps streamed one by one,
bit for bit, in every direction, with threads, with lengths, at every batch size on the AVX2
and AVX-512 kernels; only on the portable kernels (no AVX2) 128 rows or more go through float32
BLAS and the result is within the compact-weight bound of the streamed steps instead
(src_c/internal.h, RNN_BLAS_MIN_ROWS). The
multi-row compact kernels behind this (src_c/pack.c) equal the one-row kernel per row and the
plain reference."""
import numpy as np
import pytest

import rnnengine
from rnnengine import _core
from rnnengine.codes import GATES
from oracle import WEIGHT_DTYPE_ATOL, run_ort

LEVELS = [lv for lv in (0, 1, 2) if lv <= _core.kernel_level_max()]
BLAS_MIN_ROWS = 128  # RNN_BLAS_MIN_ROWS in src_c/internal.h (the portable kernels only)


@pytest.fixture
def level(request):
    _core.kernel_level(request.param)
    yield request.param
    _core.kernel_level(_core.kernel_level_max())


def same_bits(a, b, what=""):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape, what
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"{what}: max diff {np.nanmax(np.abs(a - b))}"


def weights(kind, I, H, D=1, seed=0):
    rng = np.random.default_rng(seed)
    G = GATES[kind]
    # scaled as trained layers are (1/sqrt(fan-in)): the compact-weight bounds of
    # tests/oracle.py are stated for such models (docs/FORMAT.md)
    W = (rng.standard_normal((D, G * H, I)) / np.sqrt(I)).astype(np.float32)
    R = (rng.standard_normal((D, G * H, H)) / np.sqrt(H)).astype(np.float32)
    B = (rng.standard_normal((D, 2 * G * H)) * 0.3).astype(np.float32)
    return W, R, B


def make_layer(kind, W, R, B, direction="forward", lbr=0, P=None):
    if kind == "LSTM":
        return rnnengine.LSTM(W, R, B, P, direction=direction)
    if kind == "GRU":
        return rnnengine.GRU(W, R, B, linear_before_reset=lbr, direction=direction)
    return rnnengine.RNN(W, R, B, direction=direction)


CASES = [("LSTM", 0, False), ("LSTM", 0, True), ("GRU", 0, False), ("GRU", 1, False), ("RNN", 0, False)]


# --- the kernels -------------------------------------------------------------------------

@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_multi_row_compact_kernel_equals_each_row_alone_and_the_reference(level, dtype):
    """Rows in groups of 8 / 4 / 2 / 1 (AVX-512) or 4 / 2 / 1 (AVX2) against panels widened
    once per group, and from 8 rows on AVX2 against panels widened once per call, 256 values
    of k at a time (K = 300, 513: the sums carried over chunks), in blocks of rows (300 rows)
    give each row the bits of the one-row kernel; odd sizes, sizes that are not multiples of
    16, with and without accumulation; within float32 rounding of the plain reference."""
    rng = np.random.default_rng(level * 10 + len(dtype))
    for M in (2, 3, 4, 5, 7, 8, 9, 13, 16, 23, 300):
        for N, K in ((1, 1), (17, 3), (33, 7), (47, 19), (100, 65), (21, 300), (18, 513)):
            A = rng.standard_normal((M, K)).astype(np.float32)
            B = rng.standard_normal((N, K)).astype(np.float32)
            for C0 in (None, rng.standard_normal((M, N)).astype(np.float32)):
                got = _core.gemm_packed(A, B, None if C0 is None else C0.copy(), dtype=dtype)
                rows = np.concatenate([_core.gemm_packed(A[m:m + 1].copy(), B, None if C0 is None else C0[m:m + 1].copy(),
                                                         dtype=dtype) for m in range(M)])
                same_bits(got, rows, f"M={M} N={N} K={K} accumulate={C0 is not None}")
                ref = _core.gemm_packed(A, B, None if C0 is None else C0.copy(), dtype=dtype, reference=True)
                bound = 1e-5 * np.sqrt(K) * (1 + np.abs(ref)) * np.abs(B).max()
                assert np.all(np.abs(got - ref) <= bound)


@pytest.mark.skipif(_core.kernel_level_max() < 2, reason="this CPU has no AVX-512F")
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_avx512_compact_kernels_give_the_avx2_bits(dtype):
    """The AVX-512 compact kernels (one row: eight panels at once; several rows) give the
    AVX2 kernels' bits, so streaming steps keep their results on either CPU."""
    rng = np.random.default_rng(21)
    for M in (1, 2, 5, 8, 11):
        for N, K in ((5, 3), (130, 33), (257, 64), (16 * 9, 40)):
            A = rng.standard_normal((M, K)).astype(np.float32)
            B = rng.standard_normal((N, K)).astype(np.float32)
            C0 = rng.standard_normal((M, N)).astype(np.float32)
            out = {}
            try:
                for lv in (1, 2):
                    _core.kernel_level(lv)
                    out[lv] = (_core.gemm_packed(A, B, dtype=dtype), _core.gemm_packed(A, B, C0.copy(), dtype=dtype))
            finally:
                _core.kernel_level(_core.kernel_level_max())
            for a, b in zip(out[1], out[2]):
                same_bits(a, b, f"M={M} N={N} K={K}")


@pytest.mark.parametrize("level", [lv for lv in LEVELS if lv > 0], indirect=True)
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_multi_row_compact_kernel_propagates_nan_and_inf(level, dtype):
    """A NaN or Inf in a row of A reaches that row's outputs only (rows stay independent)."""
    rng = np.random.default_rng(3)
    A = rng.standard_normal((9, 21)).astype(np.float32)
    B = rng.standard_normal((37, 21)).astype(np.float32)
    A[2, 5] = np.nan
    A[6, 0] = np.inf
    got = _core.gemm_packed(A, B, dtype=dtype)
    assert np.isnan(got[2]).all()
    assert (~np.isfinite(got[6])).all()
    rest = [0, 1, 3, 4, 5, 7, 8]
    assert np.isfinite(got[rest]).all()
    same_bits(got[rest], _core.gemm_packed(A[rest].copy(), B, dtype=dtype))


# --- whole sequences against the same steps streamed ----------------------------------

def rounded_as_packed(M, dtype):
    """M (D, N, K) rounded as the packer stores it (float16, or int8 with one symmetric scale
    per row), back in float32 (exact for float16; int8 codes times scale, rounded once)."""
    if dtype == "float16":
        return M.astype(np.float16).astype(np.float32)
    amax = np.abs(M).max(axis=2, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    return (np.clip(np.rint(M / scale), -127, 127) * scale).astype(np.float32)


def streamed(model, X):
    """X (T, B, I) fed one step at a time through one stream of batch B."""
    s = model.stream(batch_size=X.shape[1])
    return np.stack([s.step(X[t]) for t in range(X.shape[0])]), s.get_state()


def state_arrays(state):
    out = []
    for k in sorted(state["layers"]):
        e = state["layers"][k]
        out.extend(e if isinstance(e, tuple) else [e])
    return out


@pytest.mark.parametrize("level", [lv for lv in LEVELS if lv > 0], indirect=True)
@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("kind, lbr, peep", CASES)
def test_sequence_equals_streamed_steps_bit_for_bit(kind, lbr, peep, dtype, level):
    """run() over T steps (T*B >= 128 rows: before 2026-12-02, below AVX-512 above batch 2, the
    float32 BLAS projection) equals the same steps streamed with the same weight_dtype,
    outputs and final state, bit for bit, at every batch size; a two-layer stack too."""
    I, H = 19, 37
    W, R, B = weights(kind, I, H)
    P = (np.random.default_rng(4).standard_normal((1, 3 * H)) * 0.3).astype(np.float32) if peep else None
    W2, R2, B2 = weights(kind, H, 21, seed=5)
    layers = [make_layer(kind, W, R, B, lbr=lbr, P=P), make_layer(kind, W2, R2, B2, lbr=lbr)]
    model = rnnengine.Model(layers, weight_dtype=dtype)
    batches = (1, 2, 5, 9, 33)
    for batch in batches:
        T = max(8, -(-160 // batch))
        X = np.random.default_rng(batch).standard_normal((T, batch, I)).astype(np.float32)
        Y, st = model.run(X)
        Ys, sts = streamed(model, X)
        same_bits(Y, Ys, f"Y batch {batch}")
        for a, b in zip(state_arrays(st), state_arrays(sts)):
            same_bits(a, b, f"state batch {batch}")
        # and the compact weights are what ran: the float32 model differs, within the bound
        Y32 = rnnengine.Model(layers).run(X)[0]
        assert 0 < np.abs(Y - Y32).max() <= WEIGHT_DTYPE_ATOL[dtype]


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_portable_kernels_take_the_float32_projection_for_many_rows_within_the_bound(dtype):
    """On the portable kernels (kernel level 0: no AVX2), an input projection of
    RNN_BLAS_MIN_ROWS rows or more is float32 BLAS (the reference loops are far slower): the
    sequence differs from the streamed steps by W's rounding only, within the compact-weight
    bound of tests/oracle.py, and the recurrence still reads the compact R."""
    kind, I, H = "LSTM", 24, 40
    W, R, B = weights(kind, I, H)
    model = rnnengine.Model([make_layer(kind, W, R, B)], weight_dtype=dtype)
    _core.kernel_level(0)
    try:
        for batch in (5, 1):
            X = np.random.default_rng(9).standard_normal((max(40, -(-BLAS_MIN_ROWS // batch)), batch, I)).astype(np.float32)
            Y = model.run(X)[0]
            Ys = streamed(model, X)[0]
            assert 0 < np.abs(Y - Ys).max() <= WEIGHT_DTYPE_ATOL[dtype]
            Y32 = rnnengine.Model([make_layer(kind, W, R, B)]).run(X)[0]
            assert 0 < np.abs(Y - Y32).max() <= WEIGHT_DTYPE_ATOL[dtype]
            # float32 W, compact R: the model with only R rounded to the compact storage
            Rq = rounded_as_packed(R, dtype)
            Ymix = rnnengine.Model([make_layer(kind, W, Rq, B)]).run(X)[0]
            assert np.abs(Y - Ymix).max() <= 1e-4
    finally:
        _core.kernel_level(_core.kernel_level_max())


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("kind, lbr, peep", CASES)
def test_reverse_and_bidirectional_sequences_use_the_compact_weights(kind, lbr, peep, dtype):
    """A reverse layer equals the forward layer with the same weights on the time-reversed
    input, and each direction of a bidirectional layer equals its own one-direction layer,
    bit for bit (lengths included: a reverse row starts at its own end); all within the
    compact-weight bound of onnxruntime's float32 operator."""
    I, H, T, batch = 13, 29, 70, 2
    W, R, B = weights(kind, I, H, D=2, seed=7)
    P = (np.random.default_rng(8).standard_normal((2, 3 * H)) * 0.3).astype(np.float32) if peep else None
    X = np.random.default_rng(10).standard_normal((T, batch, I)).astype(np.float32)
    lens = np.array([T, T - 23], np.int32)

    def one(d, direction):
        return make_layer(kind, W[d:d + 1], R[d:d + 1], B[d:d + 1], direction, lbr,
                          None if P is None else P[d:d + 1])
    fwd = rnnengine.Model([one(0, "forward")], weight_dtype=dtype)
    rev = rnnengine.Model([one(1, "reverse")], weight_dtype=dtype)
    bi = rnnengine.Model([make_layer(kind, W, R, B, "bidirectional", lbr, P)], weight_dtype=dtype)
    Yb = bi.run(X, lengths=lens)[0]  # (T, B, 2H)
    Yf = fwd.run(X, lengths=lens)[0]
    Yr = rev.run(X, lengths=lens)[0]
    same_bits(Yb[..., :H], Yf, "forward half")
    same_bits(Yb[..., H:], Yr, "reverse half")
    fwd1 = rnnengine.Model([one(1, "forward")], weight_dtype=dtype)
    for b in range(batch):
        n = int(lens[b])
        Yrb = fwd1.run(X[:n, b:b + 1][::-1].copy())[0][::-1]
        same_bits(Yr[:n, b:b + 1], Yrb, f"reverse row {b}")
    attrs = {"hidden_size": H, "direction": "bidirectional"}
    if kind == "GRU":
        attrs["linear_before_reset"] = lbr
    inputs = {"X": X, "W": W, "R": R, "B": B, "sequence_lens": lens}
    if kind == "LSTM":
        inputs.update({"initial_h": None, "initial_c": None, "P": P})
    want = run_ort(kind, attrs, inputs)[0]  # (T, 2, B, H)
    got = np.stack([Yb[..., :H], Yb[..., H:]], axis=1)
    assert np.abs(got - want).max() <= WEIGHT_DTYPE_ATOL[dtype]


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_rows_of_a_batch_with_lengths_equal_each_row_alone(dtype):
    """Multi-row compact products keep rows independent: each row of a batch with lengths
    equals that row run alone over its own length, bit for bit."""
    I, H, T = 11, 45, 50
    W, R, B = weights("GRU", I, H, seed=2)
    model = rnnengine.Model([make_layer("GRU", W, R, B)], weight_dtype=dtype)
    batch = 7
    X = np.random.default_rng(12).standard_normal((T, batch, I)).astype(np.float32)
    lens = np.linspace(T, 3, batch).astype(np.int32)
    Y, st = model.run(X, lengths=lens)
    for b in range(batch):
        n = int(lens[b])
        Yb, stb = model.run(X[:n, b:b + 1].copy())
        same_bits(Y[:n, b:b + 1], Yb, f"row {b}")
        assert not Y[n:, b].any()
        same_bits(st["layers"]["layer0"][:, b:b + 1], stb["layers"]["layer0"], f"state row {b}")


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_threads_split_compact_sequences_bit_for_bit(kind, dtype):
    """threads=2 at batch 1 (each step's compact products split by gate rows) and at batch 4
    (rows split over threads) give the one-thread bits."""
    old = _core.threads_limit()
    _core.set_threads_limit(2)
    _core.set_threads_min_macs(0)
    adaptive = _core.set_threads_adaptive(False)
    try:
        I, H, T = 17, 70, 90
        W, R, B = weights(kind, I, H, seed=4)
        one = rnnengine.Model([make_layer(kind, W, R, B)], weight_dtype=dtype)
        two = rnnengine.Model([make_layer(kind, W, R, B)], weight_dtype=dtype, threads=2)
        for batch in (1, 4):
            X = np.random.default_rng(batch).standard_normal((T, batch, I)).astype(np.float32)
            same_bits(two.run(X)[0], one.run(X)[0], f"batch {batch}")
    finally:
        _core.set_threads_adaptive(adaptive)
        _core.set_threads_min_macs(-1)
        _core.set_threads_limit(old)


@pytest.mark.parametrize("level", [lv for lv in LEVELS if lv > 0], indirect=True)
@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_weight_file_stored_compact_runs_sequences_as_its_steps(tmp_path, kind, dtype, level):
    """A weight file stored as float16 / int8, loaded as stored (a converted graph): its
    whole-sequence run equals its stream fed one step at a time, bit for bit (before, the
    sequence's input projection was float32 BLAS over the widened stored values)."""
    I, H, T = 12, 33, 150
    W, R, B = weights(kind, I, H, seed=6)
    path = str(tmp_path / "m.rnne")
    rnnengine.save(rnnengine.Model([make_layer(kind, W, R, B)]), path, dtype=dtype)
    model = rnnengine.load(path)
    X = np.random.default_rng(13).standard_normal((T, 1, I)).astype(np.float32)
    whole = model.run({"X": X})["Y"]
    stream = model.stream()
    steps = np.concatenate([stream({"X": X[t:t + 1]})["Y"] for t in range(T)], axis=0)
    same_bits(whole, steps, "Y")
    Y32 = rnnengine.Model([make_layer(kind, W, R, B)]).run(X)[0]
    assert 0 < np.abs(whole - Y32).max() <= WEIGHT_DTYPE_ATOL[dtype]


def test_compact_sequences_run_on_a_small_thread_stack(tmp_path):
    """A Python thread may have as little as 32 KiB of stack (threading.stack_size): the
    compact many-row kernel's buffers (src_c/pack.c, gemm_compact_wide_avx2) took 32 KB of it
    and crashed (SIGSEGV) a float16 LSTM's run() of 8 rows there; in a subprocess, so that a
    crash fails this test instead of ending the run."""
    import subprocess
    import sys
    code = """
import threading, numpy as np, rnnengine
from rnnengine import _core
rng = np.random.default_rng(0)
W = (rng.standard_normal((1, 128, 32)) / 6).astype(np.float32)
R = (rng.standard_normal((1, 128, 32)) / 6).astype(np.float32)
out = []
def work():
    for dt in ("float16", "int8"):
        m = rnnengine.Model([rnnengine.LSTM(W, R, np.zeros((1, 256), np.float32))], weight_dtype=dt)
        out.append(m.run(rng.standard_normal((300, 1, 32)).astype(np.float32))[0].shape)
        A, B = rng.standard_normal((300, 513)).astype(np.float32), rng.standard_normal((40, 513)).astype(np.float32)
        out.append(_core.gemm_packed(A, B, dtype=dt).shape)
threading.stack_size(32768)
t = threading.Thread(target=work)
t.start()
t.join()
print(out)
"""
    # (run from an empty folder: from the checkout, `import rnnengine` would find its source
    # tree, which has no compiled core when the package is installed rather than in place)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.strip() == "[(300, 1, 32), (300, 40), (300, 1, 32), (300, 40)]"
