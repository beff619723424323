"""Kernels against NumPy: the BLAS GEMM and its naive reference, and every activation."""
import numpy as np
import pytest

from rnnengine import _core
from rnnengine.layers import ACTIVATIONS
from oracle import np_activation


def test_blas_is_installed_from_scipy():
    assert _core.blas_available()


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
    for alpha, beta in [(da, db), (0.7, -0.3), (1.6, 0.9)]:
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


@pytest.mark.parametrize("name, bound", [("Sigmoid", 1.2e-7), ("Tanh", 2e-7)])
def test_vectorised_sigmoid_tanh_error_bounds(name, bound):
    """The documented max abs error of the vectorised kernels (src_c/vmath.c)."""
    x = np.linspace(-20, 20, 2_000_001).astype(np.float32)
    got = _core.apply_activation(ACTIVATIONS[name][0], 0, 0, x)
    want = np_activation(name, 0, 0)(x.astype(np.float64))
    assert np.max(np.abs(got - want)) <= bound
