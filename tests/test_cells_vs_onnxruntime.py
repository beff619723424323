"""Every cell kind and ONNX attribute, compared with onnxruntime on random non-symmetric weights.

Hypothesis draws the configuration (sizes, batch, lengths, direction, activations with
alpha/beta, clip, peepholes, input_forget, linear_before_reset, optional B / initial
states, opset 7 or 14). layout=1 is compared with the NumPy reference in oracle.py
because onnxruntime's CPU kernels refuse it (see test_layout1_*).
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import rnnengine
from oracle import max_violation, np_reference, run_ort

ALL_ACTIVATIONS = ["Relu", "Tanh", "Sigmoid", "Affine", "LeakyRelu", "ThresholdedRelu",
                   "ScaledTanh", "HardSigmoid", "Elu", "Softsign", "Softplus"]
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
N_ACT = {"LSTM": 3, "GRU": 2, "RNN": 1}
EXAMPLES = 300  # per cell kind and CI run
MAX_SEEN = {}  # kind -> (max abs error where |want| <= 1, max tolerance ratio), printed at the end


@st.composite
def configs(draw, kind, allow_layout1=False):
    T = draw(st.integers(1, 7))
    Bsz = draw(st.integers(1, 4))
    I = draw(st.integers(1, 6))
    H = draw(st.integers(1, 7))
    direction = draw(st.sampled_from(["forward", "reverse", "bidirectional"]))
    D = 2 if direction == "bidirectional" else 1
    G = GATES[kind]
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    attrs = {"hidden_size": H, "direction": direction}
    opset = draw(st.sampled_from([7, 14]))
    layout = 1 if allow_layout1 else 0
    if layout:
        opset = 14
        attrs["layout"] = 1
    alphas, betas = [], []
    if draw(st.booleans()):
        n = N_ACT[kind] * (D if draw(st.booleans()) or D == 1 else 1)
        names = [draw(st.sampled_from(ALL_ACTIVATIONS)) for _ in range(n)]
        if D == 2 and len(names) == N_ACT[kind]:
            names = names * 2  # onnxruntime requires the full list for both directions
        attrs["activations"] = names
        for nm in names:
            if nm in ("Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh", "HardSigmoid", "Elu"):
                alphas.append(round(draw(st.floats(0.1, 1.5)), 3))
            if nm in ("Affine", "ScaledTanh", "HardSigmoid"):
                betas.append(round(draw(st.floats(-0.5, 1.5)), 3))
        if alphas:
            attrs["activation_alpha"] = alphas
        if betas:
            attrs["activation_beta"] = betas
    if draw(st.booleans()):
        attrs["clip"] = round(draw(st.floats(0.2, 3.0)), 3)
    if kind == "LSTM" and draw(st.booleans()):
        attrs["input_forget"] = 1
    if kind == "GRU":
        attrs["linear_before_reset"] = draw(st.sampled_from([0, 1]))

    def rand(*shape, scale=0.6):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    xshape = (Bsz, T, I) if layout else (T, Bsz, I)
    sshape = (Bsz, D, H) if layout else (D, Bsz, H)
    # Weight scales keep the recurrence near-contractive, as trained models are: with
    # unbounded gate activations (Relu, Affine...) an expanding random recurrence amplifies
    # float32 rounding exponentially and no two correct engines would agree to 1e-5.
    inputs = {"X": rand(*xshape, scale=1.0), "W": rand(D, G * H, I, scale=1 / np.sqrt(I)),
              "R": rand(D, G * H, H, scale=0.8 / np.sqrt(H))}
    if draw(st.booleans()):
        inputs["B"] = rand(D, 2 * G * H, scale=0.5)
    if draw(st.booleans()):
        inputs["sequence_lens"] = rng.integers(0, T + 1, Bsz).astype(np.int32)
    if draw(st.booleans()):
        inputs["initial_h"] = rand(*sshape, scale=1.0)
    if kind == "LSTM":
        if draw(st.booleans()):
            inputs["initial_c"] = rand(*sshape, scale=1.0)
        if draw(st.booleans()):
            inputs["P"] = rand(D, 3 * H)
    return attrs, inputs, opset


def run_engine(kind, attrs, inputs):
    kw = {k: v for k, v in attrs.items()}
    cls = getattr(rnnengine, kind)
    weights = [inputs["W"], inputs["R"], inputs.get("B")]
    if kind == "LSTM":
        weights.append(inputs.get("P"))
    layer = cls(*weights, **kw)
    args = [inputs["X"], inputs.get("sequence_lens"), inputs.get("initial_h")]
    if kind == "LSTM":
        args.append(inputs.get("initial_c"))
    return layer(*args)


def compare(kind, got, want):
    assert len(got) == len(want)
    abs_err, ratio = MAX_SEEN.get(kind, (0.0, 0.0))
    for name, g, w in zip(["Y", "Y_h", "Y_c"], got, want):
        assert g.shape == w.shape, f"{name}: shape {g.shape} != {w.shape}"
        r = max_violation(g, w)
        if r > 1.0:
            bad = np.argwhere(~np.isclose(g, w, rtol=1e-5, atol=1e-5, equal_nan=True))[:5]
            pairs = [(tuple(int(i) for i in ix), float(g[tuple(ix)]), float(w[tuple(ix)])) for ix in bad]
            pytest.fail(f"{name}: error is {r:.2f}x the tolerance; (index, got, want): {pairs}")
        small = np.abs(w) <= 1.0
        if np.any(small):
            abs_err = max(abs_err, float(np.max(np.abs(g.astype(np.float64) - w)[small])))
        ratio = max(ratio, r)
    MAX_SEEN[kind] = (abs_err, ratio)


def bounded(outputs):
    """Unbounded activations (Relu, Affine, Softplus...) can make a random recurrence grow
    exponentially until float32 overflows; onnxruntime then returns inf/NaN where our
    overflow-safe Softplus stays finite. Such runs say nothing about the cell's math and
    are discarded; every run whose outputs stay below 1e6 is compared."""
    return all(np.all(np.isfinite(o)) and np.max(np.abs(o), initial=0.0) < 1e6 for o in outputs)


COUNTS = {}  # run counts per kind: compared, discarded as ill-conditioned


def well_conditioned(kind, want, exact):
    """A configuration is well-conditioned when onnxruntime itself lands within half the
    tolerance of the exact (float64) answer. Where it does not, the recurrence amplifies
    float32 rounding (e.g. Affine/Relu gates above 1 make it expand), so two correct
    float32 engines cannot agree to 1e-5 either; such runs are counted and discarded
    (the counts are printed by test_report_max_errors)."""
    ok = bounded(want) and all(max_violation(w, e) <= 0.5 for w, e in zip(want, exact))
    key = kind + (" compared" if ok else " discarded (ill-conditioned)")
    COUNTS[key] = COUNTS.get(key, 0) + 1
    return ok


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_cell_matches_onnxruntime_on_random_configurations(kind):
    @SETTINGS
    @given(configs(kind))
    def check(cfg):
        attrs, inputs, opset = cfg
        want = run_ort(kind, attrs, inputs, opset)
        assume(well_conditioned(kind, want, np_reference(kind, attrs, **inputs)))
        got = run_engine(kind, attrs, inputs)
        compare(kind, got, want)

    check()


def to_layout0(attrs, inputs):
    """The same problem in layout 0 (X and the states transposed)."""
    a0 = dict(attrs, layout=0)
    i0 = dict(inputs, X=inputs["X"].transpose(1, 0, 2).copy())
    for k in ("initial_h", "initial_c"):
        if inputs.get(k) is not None:
            i0[k] = inputs[k].transpose(1, 0, 2).copy()
    return a0, i0


def outputs_to_layout1(outs):
    return [outs[0].transpose(2, 0, 1, 3)] + [o.transpose(1, 0, 2) for o in outs[1:]]


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_layout1_matches_numpy_reference_and_layout0(kind):
    """onnxruntime refuses layout=1 (test_onnxruntime_refuses_layout1), so layout 1 is
    compared with the NumPy reference of the spec, which runs layout 1 directly. It is
    also checked to equal, bit for bit, our own layout-0 run on transposed data."""
    @settings(max_examples=100, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(configs(kind, allow_layout1=True))
    def check(cfg):
        attrs, inputs, _ = cfg
        assume(attrs.get("layout") == 1)
        want = np_reference(kind, attrs, **inputs)
        a0, i0 = to_layout0(attrs, inputs)
        ort = outputs_to_layout1(run_ort(kind, a0, i0))
        assume(well_conditioned(kind + " layout", ort, want))
        got = run_engine(kind, attrs, inputs)
        compare(kind + " layout", got, want)
        ref0 = outputs_to_layout1(run_engine(kind, a0, i0))
        for g, r in zip(got, ref0):
            np.testing.assert_array_equal(g, r)

    check()


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_numpy_reference_agrees_with_onnxruntime(kind):
    """The NumPy reference used for layout=1 is itself checked against onnxruntime."""
    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(configs(kind))
    def check(cfg):
        attrs, inputs, opset = cfg
        want = run_ort(kind, attrs, inputs, opset)
        ref = np_reference(kind, attrs, **inputs)
        assume(bounded(want))
        # the reference is right when it agrees in well-conditioned runs (most of them)
        ok = all(max_violation(w, r) <= 1.0 for w, r in zip(want, ref))
        COUNTS[kind + " ref"] = COUNTS.get(kind + " ref", 0) + 1
        if not ok:
            COUNTS[kind + " ref disagrees"] = COUNTS.get(kind + " ref disagrees", 0) + 1
        assert COUNTS.get(kind + " ref disagrees", 0) <= max(2, COUNTS[kind + " ref"] // 10)

    check()


def test_onnxruntime_refuses_layout1():
    """Documents why layout=1 is compared with the NumPy reference instead."""
    rng = np.random.default_rng(0)
    inputs = {"X": rng.standard_normal((2, 3, 4)).astype(np.float32),
              "W": rng.standard_normal((1, 8, 4)).astype(np.float32),
              "R": rng.standard_normal((1, 8, 2)).astype(np.float32)}
    with pytest.raises(Exception):
        run_ort("LSTM", {"hidden_size": 2, "layout": 1}, inputs)


def test_report_max_errors(capsys):
    with capsys.disabled():
        for k, (a, r) in sorted(MAX_SEEN.items()):
            print(f"\n{k}: max abs error (|value| <= 1) {a:.2e}; worst error / tolerance {r:.3f}", end="")
        print("\nruns:", COUNTS)
