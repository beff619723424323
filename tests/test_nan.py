"""NaN and +-Inf through every cell kind, activation, clip, kernel level and weight dtype.

The oracle is `ieee_reference`: the ONNX LSTM/GRU/RNN equations in float64 NumPy where every
operation follows IEEE arithmetic (NaN in -> NaN out, clip and Relu keep NaN, sigmoid(-Inf)
= 0, tanh(+-Inf) = +-1, Softsign(+-Inf) = Inf/Inf = NaN as its formula gives). The engine
must give NaN exactly where the reference does, the same infinities, and finite values within
the float32 tolerance of tests/oracle.py.

onnxruntime is not the NaN oracle for LSTM and GRU because, in the installed version, it drops
NaN there: its vectorised sigmoid/tanh clamp with min/max that return the bound for NaN, and
its clip-with-bias maps NaN to +clip, so a NaN input yields finite, plausible outputs
(test_onnxruntime_drops_nan_in_lstm_and_gru records this; PyTorch returns NaN). Where
onnxruntime does propagate (the RNN cell) the engine is compared with it NaN for NaN
(test_rnn_nan_masks_equal_onnxruntime), and every output that both engines compute as finite
is compared with onnxruntime in all cases (test_finite_outputs_match_onnxruntime).
"""
import numpy as np
import pytest

import rnnengine
from rnnengine import _core
from oracle import max_violation, run_ort, stack_state

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
N_ACT = {"LSTM": 3, "GRU": 2, "RNN": 1}
ACTIVATIONS = ["Relu", "Tanh", "Sigmoid", "Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh", "HardSigmoid",
               "Elu", "Softsign", "Softplus"]
# alpha, beta of the functions that take them (non-default values, spelled out for both engines)
ALPHA_BETA = {"Affine": (0.7, 0.2), "LeakyRelu": (0.3, None), "ThresholdedRelu": (0.4, None),
              "ScaledTanh": (0.9, 0.8), "HardSigmoid": (0.3, 0.4), "Elu": (0.8, None)}
LEVELS = list(range(_core.kernel_level_max() + 1))  # 0 portable, 1 AVX2+FMA, 2 AVX-512F
VALUES = [np.nan, np.inf, -np.inf]


# --- the IEEE float64 reference ------------------------------------------------------------
def ieee_activation(name, a, b):
    def sigmoid(x):
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-x))
    return {
        "relu": lambda x: np.where(x < 0, 0.0, x),
        "tanh": np.tanh,
        "sigmoid": sigmoid,
        "affine": lambda x: a * x + b,
        "leakyrelu": lambda x: np.where(x >= 0, x, a * x),
        "thresholdedrelu": lambda x: np.where(x <= a, 0.0, x),
        "scaledtanh": lambda x: a * np.tanh(b * x),
        "hardsigmoid": lambda x: np.clip(a * x + b, 0.0, 1.0),
        "elu": lambda x: np.where(x >= 0, x, a * np.expm1(x)),
        "softsign": lambda x: x / (1.0 + np.abs(x)),
        "softplus": lambda x: np.logaddexp(0.0, x),
    }[name.lower()]


def ieee_reference(kind, attrs, X, W, R, B=None, initial_h=None, initial_c=None, P=None):
    """One direction, layout 0, every row the full length; float64, IEEE NaN/Inf semantics."""
    with np.errstate(invalid="ignore", over="ignore"):
        X = X.astype(np.float64)
        T, Bsz, _ = X.shape
        H = R.shape[2]
        names = attrs.get("activations") or {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"],
                                             "RNN": ["Tanh"]}[kind]
        alphas, betas = list(attrs.get("activation_alpha", [])), list(attrs.get("activation_beta", []))
        f = []
        for nm in names:
            a = alphas.pop(0) if nm in ALPHA_BETA else 0.0
            b = betas.pop(0) if nm in ALPHA_BETA and ALPHA_BETA[nm][1] is not None else 0.0
            f.append(ieee_activation(nm, a, b))
        clip = attrs.get("clip")
        cl = (lambda v: np.clip(v, -clip, clip)) if clip is not None else (lambda v: v)
        W, R = W[0].astype(np.float64), R[0].astype(np.float64)
        GH = W.shape[0]
        Bd = np.zeros(2 * GH) if B is None else B[0].astype(np.float64)
        Wb, Rb = Bd[:GH], Bd[GH:]
        h = np.zeros((Bsz, H)) if initial_h is None else initial_h[0].astype(np.float64)
        c = np.zeros((Bsz, H)) if initial_c is None else initial_c[0].astype(np.float64)
        Y = np.zeros((T, 1, Bsz, H))
        for t in range(T):
            x = X[t]
            if kind == "RNN":
                h = f[0](cl(x @ W.T + h @ R.T + Wb + Rb))
            elif kind == "GRU":
                xw = x @ W.T + Wb
                z = f[0](cl(xw[:, :H] + h @ R[:H].T + Rb[:H]))
                r = f[0](cl(xw[:, H:2 * H] + h @ R[H:2 * H].T + Rb[H:2 * H]))
                if attrs.get("linear_before_reset", 0):
                    n = f[1](cl(xw[:, 2 * H:] + r * (h @ R[2 * H:].T + Rb[2 * H:])))
                else:
                    n = f[1](cl(xw[:, 2 * H:] + (r * h) @ R[2 * H:].T + Rb[2 * H:]))
                h = (1 - z) * n + z * h
            else:
                g = x @ W.T + h @ R.T + Wb + Rb
                gi, go, gf, gc = g[:, :H], g[:, H:2 * H], g[:, 2 * H:3 * H], g[:, 3 * H:]
                if P is not None:  # peephole terms only when P is given (0 * Inf would be NaN)
                    gi, gf = gi + P[0, :H] * c, gf + P[0, 2 * H:] * c
                i = f[0](cl(gi))
                fg = 1 - i if attrs.get("input_forget", 0) else f[0](cl(gf))
                c = fg * c + i * f[1](cl(gc))
                if P is not None:
                    go = go + P[0, H:2 * H] * c
                h = f[0](cl(go)) * f[2](c)
            Y[t, 0] = h
        return [Y, h[None]] + ([c[None]] if kind == "LSTM" else [])


# --- problems --------------------------------------------------------------------------------
def make_case(kind, acts=None, clip=None, lbr=0, peepholes=False, input_forget=False, T=4, Bsz=3, I=5, H=4,
              seed=0):
    rng = np.random.default_rng(seed)
    G = GATES[kind]
    inputs = {"X": rng.standard_normal((T, Bsz, I)).astype("f4"),
              "W": (rng.standard_normal((1, G * H, I)) * 0.4).astype("f4"),
              "R": (rng.standard_normal((1, G * H, H)) * 0.4).astype("f4"),
              "B": (rng.standard_normal((1, 2 * G * H)) * 0.3).astype("f4"),
              "initial_h": rng.standard_normal((1, Bsz, H)).astype("f4")}
    if kind == "LSTM":
        inputs["initial_c"] = rng.standard_normal((1, Bsz, H)).astype("f4")
        if peepholes:
            inputs["P"] = (rng.standard_normal((1, 3 * H)) * 0.3).astype("f4")
    attrs = {"hidden_size": H}
    if acts:
        attrs["activations"] = list(acts)
        al = [ALPHA_BETA[a][0] for a in acts if a in ALPHA_BETA]
        be = [ALPHA_BETA[a][1] for a in acts if a in ALPHA_BETA and ALPHA_BETA[a][1] is not None]
        if al:
            attrs["activation_alpha"] = al
        if be:
            attrs["activation_beta"] = be
    if clip is not None:
        attrs["clip"] = clip
    if kind == "GRU":
        attrs["linear_before_reset"] = lbr
    if input_forget:
        attrs["input_forget"] = 1
    return attrs, inputs


def places(kind, inputs):
    """One element of each input array to poison: X at step 1 (row 0), a state entry, and
    a weight / bias / peephole entry."""
    out = [("X", (1, 0, 2)), ("initial_h", (0, 1, 1)), ("W", (0, 2, 1)), ("R", (0, 1, 2)), ("B", (0, 3))]
    if kind == "LSTM":
        out.append(("initial_c", (0, 2, 0)))
    if "P" in inputs:
        out.append(("P", (0, 1)))
    return out


def poisoned(inputs, where, value):
    out = {k: v.copy() for k, v in inputs.items()}
    out[where[0]][where[1]] = value
    return out


def layer_of(kind, attrs, inputs):
    w = [inputs["W"], inputs["R"], inputs.get("B")] + ([inputs.get("P")] if kind == "LSTM" else [])
    return getattr(rnnengine, kind)(*w, **attrs)


def run_engine(kind, attrs, inputs, level=None, weight_dtype=None):
    """The layer called as the ONNX operator; or, with weight_dtype, a Model([layer]) run
    (outputs [Y (T, B, H)])."""
    args = [inputs["X"], None, inputs["initial_h"]] + ([inputs["initial_c"]] if kind == "LSTM" else [])
    if level is not None:
        _core.kernel_level(level)
    try:
        if weight_dtype is None:
            return layer_of(kind, attrs, inputs)(*args)
        model = rnnengine.Model([layer_of(kind, attrs, inputs)], weight_dtype=weight_dtype)
        state = [(inputs["initial_h"], inputs["initial_c"])] if kind == "LSTM" else [inputs["initial_h"]]
        Y, st = model.run(inputs["X"], state=stack_state(state))
        return [Y]
    finally:
        _core.kernel_level(_core.kernel_level_max())


def describe(got, want):
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    diff = np.argwhere(~((g == w) | (np.isnan(g) & np.isnan(w)) | np.isclose(g, w, rtol=1e-5, atol=1e-5)))[:4]
    return [(tuple(int(i) for i in ix), float(g[tuple(ix)]), float(w[tuple(ix)])) for ix in diff]


def check_against_reference(kind, attrs, inputs, failures, label, level):
    got = run_engine(kind, attrs, inputs, level)
    want = ieee_reference(kind, attrs, **inputs)
    for name, g, w in zip(["Y", "Y_h", "Y_c"], got, want):
        if max_violation(g, w) > 1.0:
            failures.append(f"{label} level {level} {name}: (index, got, want) {describe(g, w)}")


ACT_SETS = [None] + [[a] * 3 for a in ACTIVATIONS]


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("acts", ACT_SETS, ids=["default"] + ACTIVATIONS)
def test_nan_and_inf_propagate_like_the_ieee_reference(kind, acts):
    """NaN / +Inf / -Inf in X, the initial state, W, R, B (and P), with and without clip, on
    every kernel level: NaN masks, infinities and finite values as the reference."""
    acts = None if acts is None else acts[:N_ACT[kind]]
    failures, runs = [], 0
    variants = [dict(clip=None), dict(clip=1.5)]
    if kind == "GRU":
        variants += [dict(clip=None, lbr=1), dict(clip=1.5, lbr=1)]
    if kind == "LSTM":
        variants += [dict(clip=None, peepholes=True), dict(clip=2.0, input_forget=True)]
    for opts in variants:
        attrs, inputs = make_case(kind, acts, **opts)
        for where in places(kind, inputs):
            for value in VALUES:
                for level in LEVELS:
                    check_against_reference(kind, attrs, poisoned(inputs, where, value), failures,
                                            f"{opts} {where[0]}{where[1]}={value}", level)
                    runs += 1
    assert not failures, f"{len(failures)} of {runs} runs differ:\n" + "\n".join(failures[:20])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_nan_in_a_long_sequence_through_blas(kind):
    """T * batch >= 128 rows take the input projection through BLAS sgemm instead of the
    packed kernel: NaN at one (t, b) poisons exactly that row from t on."""
    attrs, inputs = make_case(kind, T=40, Bsz=4)
    for value in VALUES:
        for level in LEVELS:
            failures = []
            check_against_reference(kind, attrs, poisoned(inputs, ("X", (17, 2, 0)), value), failures,
                                    f"X[17, 2, 0]={value}", level)
            assert not failures, failures
    got = run_engine(kind, attrs, poisoned(inputs, ("X", (17, 2, 0)), np.nan))[0]
    assert np.isnan(got[17:, 0, 2]).all() and not np.isnan(got[:17]).any()
    assert not np.isnan(got[:, 0, [0, 1, 3]]).any()


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_stream_steps_propagate_nan_like_the_whole_sequence(kind):
    """A stream fed step by step gives the whole-sequence NaN pattern (and values)."""
    attrs, inputs = make_case(kind, Bsz=2)
    x = poisoned(inputs, ("X", (2, 1, 0)), np.nan)["X"]
    model = rnnengine.Model([layer_of(kind, attrs, inputs)])
    whole, _ = model.run(x)
    for level in LEVELS:
        _core.kernel_level(level)
        try:
            s = model.stream(batch_size=2)
            steps = np.stack([s.step(x[t]) for t in range(len(x))])
        finally:
            _core.kernel_level(_core.kernel_level_max())
        np.testing.assert_array_equal(np.isnan(steps), np.isnan(whole))
        assert np.isnan(steps[2:, 1]).all() and not np.isnan(steps[:, 0]).any()
        assert max_violation(steps, whole) <= 1.0


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_finite_outputs_match_onnxruntime(kind):
    """Wherever both engines give finite numbers they agree to the tolerance, for every
    poisoned input and activation; and the engine is never finite where onnxruntime gives NaN
    (onnxruntime only ever drops NaN, never invents it)."""
    failures = []
    for acts in ACT_SETS:
        attrs, inputs = make_case(kind, None if acts is None else acts[:N_ACT[kind]])
        for where in places(kind, inputs):
            for value in VALUES:
                p = poisoned(inputs, where, value)
                want = run_ort(kind, attrs, p)
                got = run_engine(kind, attrs, p)
                for name, g, w in zip(["Y", "Y_h", "Y_c"], got, want):
                    both = np.isfinite(g) & np.isfinite(w)
                    if max_violation(g[both], w[both]) > 1.0 or (np.isnan(w) & ~np.isnan(g)).any():
                        failures.append(f"{acts and acts[0]} {where}={value} {name}: {describe(g, w)}")
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("acts", [None] + [[a] for a in ACTIVATIONS], ids=["default"] + ACTIVATIONS)
def test_rnn_nan_masks_equal_onnxruntime(acts):
    """The RNN cell, where onnxruntime propagates NaN: NaN in X, h0, W, R or B gives NaN in
    the same outputs in both engines (and the same finite values elsewhere)."""
    attrs, inputs = make_case("RNN", acts)
    for where in places("RNN", inputs):
        p = poisoned(inputs, where, np.nan)
        want = run_ort("RNN", attrs, p)
        got = run_engine("RNN", attrs, p)
        for g, w in zip(got, want):
            if acts and acts[0] in ("Relu", "ThresholdedRelu", "HardSigmoid"):
                # onnxruntime's comparisons map NaN to 0 (or the bound) in these; ours keep it
                assert (np.isnan(g) | ~np.isnan(w)).all()
                continue
            np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
            assert max_violation(g, w) <= 1.0


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_onnxruntime_drops_nan_in_lstm_and_gru(kind):
    """Why the IEEE reference is the NaN oracle: onnxruntime returns finite outputs for a NaN
    input of an LSTM / GRU (where the reference, PyTorch and this engine give NaN). If a
    future onnxruntime propagates NaN this test fails and onnxruntime can become the oracle."""
    attrs, inputs = make_case(kind)
    p = poisoned(inputs, ("X", (1, 0, 2)), np.nan)
    want = run_ort(kind, attrs, p)[0]
    assert np.isfinite(want[1:, 0, 0]).all()
    ref = ieee_reference(kind, attrs, **p)[0]
    assert np.isnan(ref[1:, 0, 0]).all()
    assert np.isnan(run_engine(kind, attrs, p)[0][1:, 0, 0]).all()


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("level", LEVELS)
def test_each_activation_on_nan_and_inf(name, level):
    """The activation kernels alone (portable and vectorised): NaN -> NaN, and the IEEE limits
    at +-Inf, including the vectorised sigmoid / tanh tails (odd lengths)."""
    a, b = ALPHA_BETA.get(name, (0.0, 0.0))
    b = b or 0.0
    from rnnengine.runtime.layers import ACTIVATIONS as KINDS
    x = np.array([np.nan, np.inf, -np.inf, 0.5, -0.5, np.nan, 3.0, -np.inf, np.inf, np.nan, 1.0], np.float32)
    try:
        _core.kernel_level(level)
        got = _core.apply_activation(KINDS[name][0], a, b, x)
    finally:
        _core.kernel_level(_core.kernel_level_max())
    with np.errstate(invalid="ignore", over="ignore"):
        want = ieee_activation(name, a, b)(x.astype(np.float64))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    fin = ~np.isnan(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("weight_dtype", ["float16", "int8"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_compact_weights_propagate_nan(kind, weight_dtype):
    """float16 / int8 packed weights: NaN in X, the state, W or R (a column holding a NaN
    weight is NaN, as in float32) gives the float32 engine's NaN mask on every level."""
    attrs, inputs = make_case(kind, T=3, Bsz=3)
    for where in places(kind, inputs):
        if where[0] in ("B", "P"):
            continue  # biases and peepholes stay float32
        p = poisoned(inputs, where, np.nan)
        want = run_engine(kind, attrs, p, weight_dtype="float32")[0]
        for level in LEVELS:
            got = run_engine(kind, attrs, p, level, weight_dtype)[0]
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{where} level {level}")
            fin = np.isfinite(want)
            assert np.abs(got[fin] - want[fin]).max() <= 5e-2


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_float16_weights_keep_infinities(kind):
    """float16 holds +-Inf exactly, so Inf in X, W or the state gives float32's outputs."""
    attrs, inputs = make_case(kind, T=3, Bsz=3)
    for where in places(kind, inputs):
        for value in (np.inf, -np.inf):
            p = poisoned(inputs, where, value)
            want = run_engine(kind, attrs, p, weight_dtype="float32")[0]
            for level in LEVELS:
                got = run_engine(kind, attrs, p, level, "float16")[0]
                np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{where} level {level}")
                np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
                fin = np.isfinite(want)
                assert np.abs(got[fin] - want[fin]).max() <= 5e-3


def test_compact_weights_refuse_what_they_cannot_hold():
    attrs, inputs = make_case("GRU")
    with pytest.raises(ValueError, match=r"layers\[0\] \(GRU\): R\[0, 4, 1\] = inf .*int8"):
        rnnengine.Model([layer_of("GRU", attrs, poisoned(inputs, ("R", (0, 4, 1)), np.inf))], weight_dtype="int8")
    with pytest.raises(ValueError, match=r"W\[0, 2, 1\] = 70000.0 exceeds the float16 range"):
        rnnengine.Model([layer_of("GRU", attrs, poisoned(inputs, ("W", (0, 2, 1)), 7e4))], weight_dtype="float16")
    # what they can hold is accepted: NaN in int8, Inf in float16
    rnnengine.Model([layer_of("GRU", attrs, poisoned(inputs, ("R", (0, 4, 1)), np.nan))], weight_dtype="int8")
    rnnengine.Model([layer_of("GRU", attrs, poisoned(inputs, ("R", (0, 4, 1)), np.inf))], weight_dtype="float16")
