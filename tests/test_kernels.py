"""Kernels against NumPy: the BLAS GEMM and its naive reference, and every activation."""
import numpy as np
import pytest

import rnnengine
from rnnengine import _core
from rnnengine.runtime.layers import ACTIVATIONS
from oracle import np_activation


def test_blas_is_installed_from_scipy():
    assert _core.blas_available()


def _fresh(code):
    """Runs code in a fresh interpreter, outside the source tree (an installed package's
    compiled core, not the checkout's sources); its stdout split."""
    import subprocess
    import sys
    import tempfile
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir())
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_the_core_takes_scipy_blas_without_importing_scipy_linalg():
    """_core loads scipy.linalg.cython_blas alone (scipy.linalg's import costs ~0.3 s of every
    process start), leaves it out of sys.modules, and a later import of it by anyone goes
    through the import system as usual: the same module, set on scipy.linalg, BLAS working."""
    got = _fresh(
        "import sys, numpy as np\n"
        "from rnnengine import _core\n"
        "print('scipy.linalg' in sys.modules, 'scipy.linalg.cython_blas' in sys.modules)\n"
        "A = np.arange(12, dtype=np.float32).reshape(3, 4)\n"
        "print(np.array_equal(_core.gemm_nt(A, A, True), A @ A.T))\n"
        "import scipy.linalg.cython_blas\n"
        "import scipy.linalg, scipy.linalg.blas\n"
        "print(scipy.linalg.cython_blas is _core._blas_module, hasattr(scipy.linalg, 'cython_blas'))\n"
        "print(np.array_equal(scipy.linalg.blas.sgemm(1.0, A, A.T), A @ A.T))\n")
    assert got == ["False", "False", "True", "True", "True", "True"]


def test_the_core_uses_scipy_linalg_when_it_is_imported_first():
    got = _fresh("import scipy.linalg.cython_blas as cb\n"
                 "from rnnengine import _core\n"
                 "print(_core._blas_module is cb, _core.blas_available())\n")
    assert got == ["True", "True"]


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (3, 17, 5), (17, 3, 255), (1, 1023, 17), (64, 40, 1)])
@pytest.mark.parametrize("use_blas", [True, False])
def test_gemm_nt_matches_numpy(M, N, K, use_blas):
    rng = np.random.default_rng(M * 1000 + N + K)
    A = rng.standard_normal((M, K)).astype(np.float32)
    B = rng.standard_normal((N, K)).astype(np.float32)
    want = A.astype(np.float64) @ B.T.astype(np.float64)
    got = _core.gemm_nt(A, B, use_blas)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(K))


def test_gemm_nt_blas_equals_naive_reference():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((9, 33)).astype(np.float32)
    B = rng.standard_normal((21, 33)).astype(np.float32)
    np.testing.assert_allclose(_core.gemm_nt(A, B, True), _core.gemm_nt(A, B, False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_matches_numpy(name):
    kind, has_a, has_b, da, db = ACTIVATIONS[name]
    rng = np.random.default_rng(kind)
    x = np.concatenate([rng.standard_normal(200) * 4, [-30.0, -1.0, 0.0, 1.0, 30.0]]).astype(np.float32)
    # (defaults None: no agreed default, the value must be given; 1.0 stands in for it here)
    for alpha, beta in [(1.0 if da is None else da, 1.0 if db is None else db), (0.7, -0.3), (1.6, 0.9)]:
        got = _core.apply_activation(kind, alpha, beta, x)
        want = np_activation(name, alpha, beta)(x.astype(np.float64))
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-7, err_msg=f"{name}({alpha}, {beta})")


def test_sigmoid_and_softplus_do_not_overflow():
    x = np.array([-1000.0, -100.0, 100.0, 1000.0], np.float32)
    sig = _core.apply_activation(ACTIVATIONS["Sigmoid"][0], 0, 0, x)
    assert np.all(np.isfinite(sig))
    np.testing.assert_allclose(sig, [0.0, 0.0, 1.0, 1.0], atol=1e-30)
    sp = _core.apply_activation(ACTIVATIONS["Softplus"][0], 0, 0, x)
    np.testing.assert_allclose(sp, [0.0, 0.0, 100.0, 1000.0], atol=1e-30)


@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize("name, bound", [("Sigmoid", 1e-7), ("Tanh", 2e-7)])
def test_vectorised_sigmoid_tanh_error_bounds(name, bound, level):
    """The documented max abs error of both kernels (src_c/vmath.c), odd lengths included."""
    if level > _core.kernel_level_max():
        pytest.skip("this CPU has no AVX2+FMA kernels")
    x = np.linspace(-20, 20, 2_000_003).astype(np.float32)
    try:
        _core.kernel_level(level)
        got = _core.apply_activation(ACTIVATIONS[name][0], 0, 0, x)
    finally:
        _core.kernel_level(_core.kernel_level_max())
    want = np_activation(name, 0, 0)(x.astype(np.float64))
    assert np.max(np.abs(got - want)) <= bound


@pytest.mark.parametrize("level", [0, 1])
def test_tanh_is_accurate_relative_to_small_values(level):
    """tanh near 0 to 4 ulps of its value (src_c/vmath.c computes exp(2x) - 1 without
    cancellation): (e - 1) / (e + 1) gave tanh(2.68e-4) 5e-5 off, relative, and a mutated
    Keras cell that divided by it 5x the tolerance off onnxruntime (the differential fuzzer,
    eleventh session). Odd: tanh(-x) = -tanh(x)."""
    if level > _core.kernel_level_max():
        pytest.skip("this CPU has no AVX2+FMA kernels")
    x = np.concatenate([np.geomspace(1e-30, 0.55, 200_001), [2.6777806e-4]]).astype(np.float32)
    x = np.concatenate([x, -x])
    try:
        _core.kernel_level(level)
        got = _core.apply_activation(ACTIVATIONS["Tanh"][0], 0, 0, x)
    finally:
        _core.kernel_level(_core.kernel_level_max())
    want = np.tanh(x.astype(np.float64))
    ulps = np.abs(got - want) / np.spacing(np.abs(want).astype(np.float32))
    assert ulps.max() <= 4, (float(ulps.max()), float(x[np.argmax(ulps)]))
    np.testing.assert_array_equal(got[: x.size // 2], -got[x.size // 2:])


ODD = [1, 3, 17, 255, 1023]


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 17])
@pytest.mark.parametrize("N", ODD)
@pytest.mark.parametrize("K", [1, 3, 17, 255])
def test_packed_gemm_matches_numpy_and_reference(M, N, K):
    rng = np.random.default_rng(M * 7 + N * 11 + K)
    A = rng.standard_normal((M, K)).astype(np.float32)
    B = rng.standard_normal((N, K)).astype(np.float32)
    want = A.astype(np.float64) @ B.T.astype(np.float64)
    fast = _core.gemm_packed(A, B)
    ref = _core.gemm_packed(A, B, reference=True)
    tol = 1e-5 * np.sqrt(K) * (1 + np.abs(want))
    assert np.all(np.abs(fast - want) <= tol)
    assert np.all(np.abs(ref - want) <= tol)
    # accumulate mode adds to C
    C0 = rng.standard_normal((M, N)).astype(np.float32)
    acc = _core.gemm_packed(A, B, C0.copy())
    assert np.all(np.abs(acc - (want + C0)) <= tol)


def test_packed_gemm_row_results_do_not_depend_on_batch_size():
    """Row r of a batched product equals the same row computed alone, bit for bit (so a
    batch of streams equals the streams stepped one by one)."""
    rng = np.random.default_rng(5)
    A = rng.standard_normal((7, 300)).astype(np.float32)
    B = rng.standard_normal((100, 300)).astype(np.float32)
    full = _core.gemm_packed(A, B)
    for r in range(7):
        np.testing.assert_array_equal(_core.gemm_packed(A[r:r + 1].copy(), B)[0], full[r])


@pytest.mark.skipif(_core.kernel_level_max() == 0, reason="this CPU has no AVX2+FMA kernels")
def test_reference_kernels_give_the_same_cells():
    """Whole cells on the portable kernels agree with the AVX2 ones."""
    import rnnengine
    rng = np.random.default_rng(8)
    W = rng.standard_normal((2, 4 * 33, 20)).astype(np.float32) * 0.3
    R = rng.standard_normal((2, 4 * 33, 33)).astype(np.float32) * 0.3
    X = rng.standard_normal((9, 5, 20)).astype(np.float32)
    layer = rnnengine.LSTM(W, R, direction="bidirectional")
    fast = layer(X)
    try:
        _core.kernel_level(0)
        ref = layer(X)
    finally:
        _core.kernel_level(_core.kernel_level_max())
    for a, b in zip(fast, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def dequantized(B, dtype):
    """NumPy model of the compact packed weights: float16 rounding, or int8 with one
    symmetric scale per output row."""
    if dtype == "float16":
        return B.astype(np.float16).astype(np.float64)
    amax = np.abs(B).max(axis=1)
    scale = np.where(amax > 0, amax / 127, 1.0).astype(np.float32)
    return np.clip(np.rint(B / scale[:, None]), -127, 127) * scale[:, None].astype(np.float64)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 3, 17), (1, 17, 3), (1, 255, 1023), (1, 1023, 255),
                                   (3, 17, 255), (5, 33, 1)])
def test_compact_packed_gemm_matches_numpy_and_reference(dtype, M, N, K):
    rng = np.random.default_rng(M * 7919 + N * 31 + K)
    A = rng.standard_normal((M, K)).astype(np.float32)
    B = rng.standard_normal((N, K)).astype(np.float32)
    want = A.astype(np.float64) @ dequantized(B, dtype).T
    tol = 1e-5 * np.sqrt(K) * (1 + np.abs(want))
    fast = _core.gemm_packed(A, B, dtype=dtype)
    ref = _core.gemm_packed(A, B, dtype=dtype, reference=True)
    assert np.all(np.abs(fast - want) <= tol)
    assert np.all(np.abs(ref - want) <= tol)
    C0 = rng.standard_normal((M, N)).astype(np.float32)
    acc = _core.gemm_packed(A, B, C0.copy(), dtype=dtype)
    assert np.all(np.abs(acc - (want + C0)) <= tol)


@pytest.mark.parametrize("offset", [1, 2, 3])
def test_packed_gemm_with_unaligned_operands(offset):
    """A and C need no alignment: rows that start anywhere give the same products."""
    rng = np.random.default_rng(offset)
    K, N = 37, 50
    buf = rng.standard_normal(offset + 3 * K).astype(np.float32)
    A = buf[offset:].reshape(3, K)
    assert A.ctypes.data % 32
    B = rng.standard_normal((N, K)).astype(np.float32)
    want = A.astype(np.float64) @ B.T.astype(np.float64)
    for dtype in ("float32", "float16", "int8"):
        got = _core.gemm_packed(A, B, dtype=dtype)
        w = want if dtype == "float32" else A.astype(np.float64) @ dequantized(B, dtype).T
        assert np.all(np.abs(got - w) <= 1e-5 * np.sqrt(K) * (1 + np.abs(w)))


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_cells_with_compact_weights_equal_the_dequantized_model(dtype):
    """A stream over float16 / int8 packed weights computes the ONNX cell exactly on the
    dequantized weights (the only error is the weights' rounding, documented in FORMAT.md)."""
    import rnnengine
    rng = np.random.default_rng(11)
    I, H = 20, 48
    W = rng.standard_normal((1, 3 * H, I)).astype(np.float32) * 0.3
    R = rng.standard_normal((1, 3 * H, H)).astype(np.float32) * 0.3
    Bb = rng.standard_normal((1, 6 * H)).astype(np.float32) * 0.1
    X = rng.standard_normal((12, 2, I)).astype(np.float32)
    Wq = dequantized(W[0], dtype).astype(np.float32)[None]
    Rq = dequantized(R[0], dtype).astype(np.float32)[None]
    want = rnnengine.Model([rnnengine.GRU(Wq, Rq, Bb, linear_before_reset=1)]).run(X)[0]
    s = rnnengine.Model([rnnengine.GRU(W, R, Bb, linear_before_reset=1)], weight_dtype=dtype).stream(batch_size=2)
    got = np.stack([s.step(X[t]) for t in range(12)])
    assert np.abs(got - want).max() <= 1e-5
    full = rnnengine.Model([rnnengine.GRU(W, R, Bb, linear_before_reset=1)]).run(X)[0]
    assert np.abs(got - full).max() <= {"float16": 5e-3, "int8": 5e-2}[dtype]


@pytest.mark.skipif(_core.kernel_level_max() < 2, reason="this CPU has no AVX-512F")
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 3, 17), (1, 255, 1023), (3, 17, 255), (4, 33, 3), (9, 1023, 17),
                                   (64, 1024, 256)])
def test_avx512_kernels_equal_avx2_bit_for_bit(M, N, K):
    """The AVX-512 float32 kernels do the same FMAs in the same order as the AVX2 ones."""
    rng = np.random.default_rng(M + N + K)
    A = rng.standard_normal((M, K)).astype(np.float32)
    B = rng.standard_normal((N, K)).astype(np.float32)
    C0 = rng.standard_normal((M, N)).astype(np.float32)
    try:
        _core.kernel_level(1)
        avx2, avx2_acc = _core.gemm_packed(A, B), _core.gemm_packed(A, B, C0.copy())
        _core.kernel_level(2)
        avx512, avx512_acc = _core.gemm_packed(A, B), _core.gemm_packed(A, B, C0.copy())
    finally:
        _core.kernel_level(_core.kernel_level_max())
    np.testing.assert_array_equal(avx2, avx512)
    np.testing.assert_array_equal(avx2_acc, avx512_acc)
    want = A.astype(np.float64) @ B.T.astype(np.float64)
    assert np.all(np.abs(avx512 - want) <= 1e-5 * np.sqrt(K) * (1 + np.abs(want)))


@pytest.mark.parametrize("I,H", [(21, 13), (512, 512), (8, 4), (7, 16)])
def test_float32_panels_hold_the_documented_layout_at_every_kernel_level(I, H):
    """The float32 packer (AVX2: 8 x 8 register transposes over full panels, the scalar loop
    for the last K % 8 and a partial last panel) writes data[(p*K + k)*16 + j] = B[p*16 + j][k],
    zero past N, built here independently with NumPy, at every kernel level; large panels
    (on 2 MB pages) included."""
    rng = np.random.default_rng(I * 1000 + H)
    W = rng.standard_normal((1, 4 * H, I)).astype(np.float32)
    R = rng.standard_normal((1, 4 * H, H)).astype(np.float32)
    w = _core.panel_width()
    for level in range(_core.kernel_level_max() + 1):
        _core.kernel_level(level)
        try:
            stack = rnnengine.Model([rnnengine.LSTM(W, R)])._stack
            for which, M in ((0, W[0]), (1, R[0])):
                data, scales, N, K, dtype = stack.panel_raw(0, 0, which)
                assert (N, K, dtype, scales) == (M.shape[0], M.shape[1], "float32", None)
                P = -(-N // w)
                padded = np.zeros((P * w, K), np.float32)
                padded[:N] = M
                want = padded.reshape(P, w, K).transpose(0, 2, 1).reshape(-1)  # (p, k, j)
                assert np.array_equal(data.view(np.float32), want), (level, which)
        finally:
            _core.kernel_level(_core.kernel_level_max())
