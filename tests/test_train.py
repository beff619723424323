"""The training path: C gradients against central finite differences of an independent
float64 forward (tests/train_reference.py), optimisers, a memory task, checkpoint resume,
and the export round trip through onnxruntime and the converter.

Tolerance, stated once: the C code computes in float32, the reference in float64, so every
C gradient must lie within GRAD_TOL of the float64 finite differences, relative to the
largest gradient of that tensor (float32 rounding over a few time steps, observed <= 5e-7).
"""
import numpy as np
import onnxruntime as ort
import pytest

import rnnengine
from rnnengine import _core
from rnnengine.train import Network, evaluate, fit, load_checkpoint, loss_and_grad
from train_reference import cell_forward, numeric_grad

GRAD_TOL = 1e-5

CELLS = [("LSTM", {}), ("LSTM", {"clip": 1.5, "peep": True}), ("GRU", {}), ("GRU", {"lbr": 1, "clip": 1.0}),
         ("GRU", {"clip": 0.8}), ("RNN", {}), ("RNN", {"relu": 1, "clip": 2.0})]


def rel_err(got, want):
    return float(np.abs(got - want).max() / (np.abs(want).max() + 1e-12))


@pytest.mark.parametrize("kind,opts", CELLS, ids=[f"{k}-{'-'.join(f'{a}{b}' for a, b in o.items()) or 'plain'}"
                                                  for k, o in CELLS])
def test_cell_gradients_match_finite_differences(kind, opts):
    rng = np.random.default_rng(len(kind) * 7 + len(opts))
    T, B, I, H = 5, 3, 4, 5
    G = {"RNN": 1, "GRU": 3, "LSTM": 4}[kind]
    spec = dict(kind=kind, I=I, H=H, clip=opts.get("clip"), linear_before_reset=opts.get("lbr", 0),
                relu=opts.get("relu", 0),
                W=(rng.standard_normal((G * H, I)) * 0.6).astype("f4"),
                R=(rng.standard_normal((G * H, H)) * 0.6).astype("f4"),
                B=(rng.standard_normal(2 * G * H) * 0.3).astype("f4"),
                P=(rng.standard_normal(3 * H) * 0.5).astype("f4") if opts.get("peep") else None)
    X = rng.standard_normal((T, B, I)).astype("f4")
    h0 = (rng.standard_normal((B, H)) * 0.5).astype("f4")
    c0 = (rng.standard_normal((B, H)) * 0.5).astype("f4") if kind == "LSTM" else None
    gY, gh, gc = rng.standard_normal((T, B, H)), rng.standard_normal((B, H)), rng.standard_normal((B, H))
    S, Wk = _core.train_sizes(spec, T, B)
    Y, hT = np.zeros((T, B, H), "f4"), np.zeros((B, H), "f4")
    cT = np.zeros((B, H), "f4") if kind == "LSTM" else None
    saved, work = np.zeros(S, "f4"), np.zeros(Wk, "f4")
    _core.train_forward(spec, X, h0, c0, Y, hT, cT, saved, work)
    Yr, hr, cr = cell_forward(spec, X, h0, c0)
    assert np.abs(Y - Yr).max() <= 1e-5 and np.abs(hT - hr).max() <= 1e-5
    dW, dR = np.zeros_like(spec["W"]), np.zeros_like(spec["R"])
    dB = np.zeros(2 * G * H, "f4")
    dP = np.zeros(3 * H, "f4") if opts.get("peep") else None
    dX, dh0 = np.zeros_like(X), np.zeros_like(h0)
    dc0 = np.zeros((B, H), "f4") if kind == "LSTM" else None
    _core.train_backward(spec, X, h0, c0, Y, saved, gY.astype("f4"), gh.astype("f4"),
                         gc.astype("f4") if kind == "LSTM" else None, dX, dW, dR, dB, dP, dh0, dc0, work)
    s64 = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v) for k, v in spec.items()}
    X64, h064 = X.astype(np.float64), h0.astype(np.float64)
    c064 = None if c0 is None else c0.astype(np.float64)

    def loss():
        Y_, h_, c_ = cell_forward(s64, X64, h064, c064)
        return (Y_ * gY).sum() + (h_ * gh).sum() + ((c_ * gc).sum() if kind == "LSTM" else 0.0)
    checks = [("W", dW, s64["W"]), ("R", dR, s64["R"]), ("B", dB, s64["B"]), ("X", dX, X64), ("h0", dh0, h064)]
    if opts.get("peep"):
        checks.append(("P", dP, s64["P"]))
    if kind == "LSTM":
        checks.append(("c0", dc0, c064))
    for name, got, arr in checks:
        err = rel_err(got, numeric_grad(loss, arr))
        assert err <= GRAD_TOL, (name, err)


def _cell_case(kind, opts, T, B, I, H, seed):
    rng = np.random.default_rng(seed)
    G = {"RNN": 1, "GRU": 3, "LSTM": 4}[kind]
    spec = dict(kind=kind, I=I, H=H, clip=opts.get("clip"), linear_before_reset=opts.get("lbr", 0),
                relu=opts.get("relu", 0),
                W=(rng.standard_normal((G * H, I)) * 0.4).astype("f4"),
                R=(rng.standard_normal((G * H, H)) * 0.4).astype("f4"),
                B=(rng.standard_normal(2 * G * H) * 0.3).astype("f4"),
                P=(rng.standard_normal(3 * H) * 0.5).astype("f4") if opts.get("peep") else None)
    X = rng.standard_normal((T, B, I)).astype("f4")
    h0 = (rng.standard_normal((B, H)) * 0.5).astype("f4")
    c0 = (rng.standard_normal((B, H)) * 0.5).astype("f4") if kind == "LSTM" else None
    dY = rng.standard_normal((T, B, H)).astype("f4")
    return spec, X, h0, c0, dY


def _forward_backward(spec, X, h0, c0, dY):
    """Every output of train_forward and train_backward (dhT, dcT given) as a dict."""
    T, B, H, kind = X.shape[0], X.shape[1], spec["H"], spec["kind"]
    S, Wk = _core.train_sizes(spec, T, B)
    out = {"Y": np.zeros((T, B, H), "f4"), "hT": np.zeros((B, H), "f4"), "saved": np.zeros(S, "f4"),
           "cT": np.zeros((B, H), "f4") if kind == "LSTM" else None}
    _core.train_forward(spec, X, h0, c0, out["Y"], out["hT"], out["cT"], out["saved"], np.zeros(Wk, "f4"))
    g = {"dW": np.zeros_like(spec["W"]), "dR": np.zeros_like(spec["R"]), "dB": np.zeros_like(spec["B"]),
         "dP": np.zeros(3 * H, "f4") if spec["P"] is not None else None, "dX": np.zeros_like(X),
         "dh0": np.zeros_like(h0), "dc0": np.zeros((B, H), "f4") if kind == "LSTM" else None}
    dhT = np.linspace(-1, 1, B * H, dtype="f4").reshape(B, H)
    _core.train_backward(spec, X, h0, c0, out["Y"], out["saved"], dY, dhT, dhT[::-1].copy() if kind == "LSTM"
                         else None, g["dX"], g["dW"], g["dR"], g["dB"], g["dP"], g["dh0"], g["dc0"],
                         np.zeros(Wk, "f4"))
    out.update(g)
    return {k: v for k, v in out.items() if v is not None}


@pytest.mark.parametrize("H", [8, 37])
@pytest.mark.parametrize("kind,opts", CELLS, ids=[f"{k}-{'-'.join(f'{a}{b}' for a, b in o.items()) or 'plain'}"
                                                  for k, o in CELLS])
def test_vector_training_kernels_match_the_plain_reference(kind, opts, H):
    """The vectorised element-wise loops of forward and backward (kernel level >= 1) against
    the plain reference loops (level 0), at widths that are and are not multiples of the
    vector width, with NaN and Inf in the incoming gradient: same NaN/Inf positions, finite
    values within GRAD_TOL (the two differ only in rounding: FMA and the products' order)."""
    if _core.kernel_level_max() < 1:
        pytest.skip("no vector kernels on this CPU")
    spec, X, h0, c0, dY = _cell_case(kind, opts, T=6, B=3, I=11, H=H, seed=H)
    bad = dY.copy()
    bad[2, 1, 3] = np.nan
    bad[4, 0, H - 1] = np.inf
    top = _core.kernel_level()
    for grad in (dY, bad):
        try:
            _core.kernel_level(0)
            want = _forward_backward(spec, X, h0, c0, grad)
        finally:
            _core.kernel_level(top)
        got = _forward_backward(spec, X, h0, c0, grad)
        for name, w in want.items():
            g = got[name]
            assert np.array_equal(np.isnan(g), np.isnan(w)), name
            assert np.array_equal(np.isinf(g), np.isinf(w)) and np.array_equal(g[np.isinf(g)], w[np.isinf(w)]), name
            fin = np.isfinite(w)
            if grad is dY:  # the clean case: everything finite, and compared everywhere
                assert fin.all() and np.abs(w).max() > 0, name
            if fin.any():
                assert rel_err(g[fin], w[fin].astype(np.float64)) <= GRAD_TOL, name


def np_network_loss(net, params64, inputs, targets, task, last_only=False):
    """The whole network in float64 NumPy (reference cells, embedding, head, losses);
    last_only: regression of the last step only (targets (B, O))."""
    c = net.config
    P = {name: params64[off:off + int(np.prod(shape))].reshape(shape) for name, (off, shape) in net.slots.items()}
    X = P["embedding"][inputs] if c["embedding"] else inputs.astype(np.float64)
    for l in range(net.L):
        outs = []
        for d in range(net.D):
            spec = {"kind": net.kind, "H": net.H, "W": P[f"layer{l}.W"][d], "R": P[f"layer{l}.R"][d],
                    "B": P[f"layer{l}.B"][d], "P": P[f"layer{l}.P"][d] if c["peepholes"] else None,
                    "clip": c["clip"], "linear_before_reset": c["linear_before_reset"], "relu": c["relu"]}
            Y, _, _ = cell_forward(spec, X if d == 0 else X[::-1])
            outs.append(Y if d == 0 else Y[::-1])
        X = np.concatenate(outs, axis=2)
    z = X @ P["head.W"].T + P["head.b"]
    if last_only:
        z = z[-1]
    if task == "lm":
        z = z - z.max(axis=2, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=2, keepdims=True))
        return -np.take_along_axis(logp, targets[..., None], axis=2).mean()
    return ((z - targets) ** 2).mean()


@pytest.mark.parametrize("kind,task,extra,B", [("LSTM", "lm", {"embedding": 4, "peepholes": True, "clip": 2.0}, 2),
                                               ("LSTM", "lm", {"embedding": 4, "peepholes": True, "clip": 2.0}, 4),
                                               ("GRU", "lm", {"embedding": 3, "linear_before_reset": 1}, 2),
                                               ("GRU", "lm", {"embedding": 3, "linear_before_reset": 1}, 4),
                                               ("RNN", "lm", {"embedding": 2}, 4),
                                               ("RNN", "regress", {}, 2), ("GRU", "regress", {"clip": 1.0}, 2)])
@pytest.mark.parametrize("threads", [1, 2])
def test_network_gradients_match_finite_differences(kind, task, extra, B, threads):
    """Embedding, a 2-layer bidirectional stack, the dense head and both losses, end to end
    (with threads=2 each batch row runs on its own thread). With 16 tokens (B = 4) against a
    vocabulary of 6 the embedding goes through the first layer's tables, with 8 it does not
    (Network._folds_embedding, asserted here)."""
    rng = np.random.default_rng(3)
    T = 4
    vocab_or_in = 6 if "embedding" in extra else 3
    net = Network(kind, vocab_or_in, 4, 3 if task == "regress" else vocab_or_in, num_layers=2, bidirectional=True,
                  seed=2, threads=threads, **extra)
    net.params[:] = (rng.standard_normal(net.size) * 0.5).astype("f4")
    assert net._folds_embedding(T * B) == (task == "lm" and B == 4)
    if task == "lm":
        inputs = rng.integers(0, vocab_or_in, (T, B))
        targets = rng.integers(0, vocab_or_in, (T, B))
    else:
        inputs = rng.standard_normal((T, B, 3)).astype("f4")
        targets = rng.standard_normal((T, B, 3))
    net.grads[:] = 0
    logits, _ = net.forward(inputs)
    loss, d = loss_and_grad(task, logits, targets)
    net.backward(d)
    p64 = net.params.astype(np.float64)
    assert abs(loss - np_network_loss(net, p64, inputs, targets, task)) <= 1e-5
    want = numeric_grad(lambda: np_network_loss(net, p64, inputs, targets, task), p64)
    for name, (off, shape) in net.slots.items():
        n = int(np.prod(shape))
        assert rel_err(net.grads[off:off + n], want[off:off + n]) <= GRAD_TOL, name


@pytest.mark.parametrize("kind,extra,threads,B", [("LSTM", {"embedding": 5, "peepholes": True}, 2, 7),
                                                  ("GRU", {"bidirectional": True}, 3, 8),
                                                  ("LSTM", {"num_layers": 2}, 2, 9), ("RNN", {}, 4, 5)])
def test_threads_split_the_batch_and_give_one_threads_results(kind, extra, threads, B):
    """threads=N runs blocks of rows on N threads: logits, final state, the input gradient
    and every parameter gradient equal one thread's, with uneven blocks and a carried state
    (up to float32 rounding: the kernels group rows differently for fewer rows, and the
    parameter gradients are summed over blocks)."""
    rng = np.random.default_rng(B)
    T, I = 6, 5
    emb = extra.get("embedding")
    kw = {k: v for k, v in extra.items()}
    nets = [Network(kind, I, 19, 4, seed=1, threads=t, **kw) for t in (1, threads)]
    inputs = rng.integers(0, I, (T, B)) if emb else rng.standard_normal((T, B, I)).astype("f4")
    state = [(s[0] + 0.3, s[1] - 0.2) if kind == "LSTM" else s + 0.3 for s in nets[0].zero_state(B)]
    outs = []
    for net in nets:
        net.grads[:] = 0
        logits, new_state = net.forward(inputs, state)
        d = np.sin(np.arange(logits.size, dtype="f4")).reshape(logits.shape)
        dX = net.backward(d, input_grad=True)
        outs.append((logits, new_state, dX, net.grads.copy()))
    (l1, s1, x1, g1), (l2, s2, x2, g2) = outs
    assert rel_err(l2, l1.astype(np.float64)) <= 1e-6
    for a, b in zip(s1, s2):
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert u.shape == v.shape and rel_err(v, u.astype(np.float64)) <= 1e-6
    if emb:
        assert x1 is None and x2 is None
    else:
        assert x1.shape == inputs.shape and rel_err(x2, x1.astype(np.float64)) <= 1e-6
    assert np.abs(g1).max() > 0 and rel_err(g2, g1.astype(np.float64)) <= 1e-6
    assert nets[1].backward(d) is None  # no input gradient unless asked for
    with pytest.raises(ValueError, match="threads"):
        Network(kind, I, 4, 4, threads=0)


@pytest.mark.parametrize("kind,extra,threads", [("LSTM", {"embedding": 5, "num_layers": 2}, 1),
                                                ("LSTM", {"embedding": 5, "num_layers": 2}, 2),
                                                ("GRU", {"bidirectional": True, "num_layers": 2}, 2),
                                                ("RNN", {}, 1)])
def test_passes_reusing_internal_buffers_equal_a_fresh_network(kind, extra, threads):
    """A network keeps its internal buffers (saved activations, work, layer outputs) between
    passes. Passes of other data and other lengths in between change nothing: each pass
    equals the same pass of a network given a new buffer at every use, bit for bit; arrays returned earlier (logits,
    states, input gradients) are never written by a later pass."""
    rng = np.random.default_rng(3)
    I, B = 5, 6
    emb = extra.get("embedding")

    def data(T):
        return rng.integers(0, I, (T, B)) if emb else rng.standard_normal((T, B, I)).astype("f4")

    def pass_(net, x):
        net.grads[:] = 0
        logits, state = net.forward(x)
        d = np.cos(np.arange(logits.size, dtype="f4")).reshape(logits.shape)
        dx = net.backward(d, input_grad=True)
        return logits, state, dx, net.grads.copy()

    def flat(res):
        logits, state, dx, g = res
        parts = [logits, g] + ([] if dx is None else [dx])
        for s in state:
            parts += list(s) if isinstance(s, tuple) else [s]
        return [p.copy() for p in parts], parts

    reused = Network(kind, I, 11, 4, seed=2, threads=threads, **extra)
    fresh = Network(kind, I, 11, 4, seed=2, threads=threads, **extra)
    fresh._scratch = lambda key, shape: np.full(shape, np.nan, np.float32)  # a new buffer for every use
    xs = [data(7), data(3), data(7), data(9)]
    kept = []
    for x in xs:
        got_copy, got_live = flat(pass_(reused, x))
        want, _ = flat(pass_(fresh, x))
        for a, b in zip(got_copy, want):
            assert np.array_equal(a, b)
        kept.append((got_copy, got_live))
    for copies, live in kept:  # what earlier passes returned is unchanged
        for a, b in zip(copies[:1] + copies[2:], live[:1] + live[2:]):  # (grads is the network's own)
            assert np.array_equal(a, b)


@pytest.mark.parametrize("kind,extra,threads", [("LSTM", {"num_layers": 2}, 1),
                                                ("GRU", {"bidirectional": True, "linear_before_reset": 1}, 2),
                                                ("RNN", {"bidirectional": True, "num_layers": 2}, 1),
                                                ("LSTM", {"peepholes": True, "clip": 1.5}, 2)])
def test_embedding_through_tables_equals_the_embedding_rows(kind, extra, threads):
    """The first layer's input product taken as rows of the tables E @ W^T (when the vocabulary
    is small against the tokens) gives the logits, final state and every gradient of the
    product with the embedding rows, up to float32 rounding (the same sums regrouped)."""
    rng = np.random.default_rng(11)
    T, B, V = 9, 6, 7
    ids, targets = rng.integers(0, V, (T, B)), rng.integers(0, V, (T, B))
    params = None
    state_of = {}
    for fold in (False, True):
        net = Network(kind, V, 13, V, embedding=5, seed=4, threads=threads, **extra)
        if params is None:
            params = (rng.standard_normal(net.size) * 0.4).astype("f4")
        net.params[:] = params
        assert net._folds_embedding(T * B)  # 2 x 7 <= 54 tokens: the tables by default
        net._folds_embedding = lambda tokens, fold=fold: fold
        net.grads[:] = 0
        logits, state = net.forward(ids)
        net.backward(loss_and_grad("lm", logits, targets)[1])
        state_of[fold] = (logits, state, net.grads.copy())
    (l0, s0, g0), (l1, s1, g1) = state_of[False], state_of[True]
    assert rel_err(l1, l0.astype(np.float64)) <= 1e-6
    for a, b in zip(s0, s1):
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert rel_err(v, u.astype(np.float64)) <= 1e-6
    assert np.abs(g0).max() > 0 and rel_err(g1, g0.astype(np.float64)) <= 1e-5


@pytest.mark.parametrize("where", ["unused embedding row", "layer0.W"])
def test_embedding_tables_propagate_nan_like_the_embedding_rows(where):
    """A NaN in an embedding row no token of the batch uses leaves every gradient as the
    embedding rows' products leave it (finite); a NaN in W spreads the same way on both
    paths (review finding: the tables' products over the whole vocabulary made 0 x NaN)."""
    rng = np.random.default_rng(5)
    T, B, V = 6, 4, 7
    ids, targets = rng.integers(0, V - 1, (T, B)), rng.integers(0, V, (T, B))  # token V-1 unused
    grads = {}
    for fold in (False, True):
        net = Network("LSTM", V, 9, V, embedding=4, seed=3)
        if where == "layer0.W":
            net.tensor("layer0.W")[0, 3, 2] = np.nan
        else:
            net.tensor("embedding")[V - 1] = np.nan
        net._folds_embedding = lambda tokens, fold=fold: fold
        logits, _ = net.forward(ids)
        net.backward(loss_and_grad("lm", logits, targets)[1])
        grads[fold] = net.grads.copy()
    assert np.array_equal(np.isnan(grads[True]), np.isnan(grads[False]))
    if where != "layer0.W":
        assert np.isfinite(grads[True]).all()


def test_internal_buffers_stay_bounded_over_batch_sizes():
    """Buffers are kept per block of rows by the block's index: batches of changing sizes
    over two threads replace them, never add new sets (review finding: keyed by the block's
    first row, every batch size kept a set for good)."""
    net = Network("LSTM", 5, 8, 3, num_layers=2, seed=0, threads=2)
    rng = np.random.default_rng(0)
    sizes = []
    for B in (8, 7, 6, 5, 9, 8):
        logits, _ = net.forward(rng.standard_normal((4, B, 5)).astype("f4"))
        net.backward(np.ones_like(logits))
        sizes.append(len(net._scratch_bufs))
    assert len(set(sizes)) == 1, sizes


def test_fit_with_threads_follows_one_thread():
    """A language model (carried state, embedding, 2 layers) trained 6 steps with threads=2
    follows the one-thread run: the same losses and weights up to float32 rounding."""
    rng = np.random.default_rng(5)
    text = rng.integers(0, 7, 3000).astype(np.int32)
    runs = []
    for threads in (1, 2):
        net = Network("LSTM", 7, 12, 7, num_layers=2, embedding=4, seed=3)
        hist = fit(net, text, None, "lm", steps=6, batch_size=6, seq_len=9, lr=1e-2, threads=threads)
        assert net.threads == threads
        runs.append((np.array([h[1] for h in hist]), net.params.copy()))
    (l1, p1), (l2, p2) = runs
    assert np.abs(l2 - l1).max() <= 1e-5 * np.abs(l1).max()
    assert rel_err(p2, p1.astype(np.float64)) <= 1e-5 and not np.array_equal(p1, Network("LSTM", 7, 12, 7, num_layers=2,
                                                                                        embedding=4, seed=3).params)


def test_optimisers_follow_their_formulas():
    rng = np.random.default_rng(4)
    w, g = rng.standard_normal(50).astype("f4"), rng.standard_normal(50).astype("f4")
    m, v = np.zeros(50, "f4"), np.zeros(50, "f4")
    w0 = w.astype(np.float64).copy()
    mm, vv = np.zeros(50), np.zeros(50)
    for t in range(1, 4):
        _core.adam_step(w, g, m, v, t, 0.01, 0.9, 0.999, 1e-8, 0.1)
        mm = 0.9 * mm + 0.1 * g
        vv = 0.999 * vv + 0.001 * g.astype(np.float64) ** 2
        w0 = w0 - 0.01 * (mm / (1 - 0.9 ** t)) / (np.sqrt(vv / (1 - 0.999 ** t)) + 1e-8) - 0.01 * 0.1 * w0
    assert np.abs(w - w0).max() <= 1e-5
    w, vel = rng.standard_normal(20).astype("f4"), np.zeros(20, "f4")
    w1, vel1 = w.astype(np.float64), np.zeros(20)
    for _ in range(3):
        _core.sgd_step(w, g[:20], vel, 0.1, 0.9, 0.01)
        vel1 = 0.9 * vel1 + g[:20] + 0.01 * w1
        w1 = w1 - 0.1 * vel1
    assert np.abs(w - w1).max() <= 1e-5
    gg = np.full(4, 3.0, "f4")
    assert abs(_core.clip_grad_norm(gg, 1.0) - 6.0) < 1e-6 and abs(np.linalg.norm(gg) - 1.0) < 1e-5


def memory_task(seed=0, N=2000, T=15):
    """The label (0/1) is shown once, at the first step, among noise; the model must keep it
    for T-1 steps to classify at the end."""
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((N, T, 2)) * 0.5).astype("f4")
    y = rng.integers(0, 2, N)
    X[:, 0, 0] = y * 2 - 1
    X[:, 0, 1] = 1.0
    return X, y


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_memory_task_is_learned_deterministically(kind):
    """Stated threshold: mean loss of the last 20 of 300 Adam steps below 0.05 (chance: 0.69),
    and the same losses on a second run with the same seed."""
    X, y = memory_task()
    runs = []
    for _ in range(2):
        net = Network(kind, 2, 16, 2, seed=3)
        runs.append([l for _, l, _ in fit(net, X, y, "classify", steps=300, batch_size=32, lr=1e-2, seed=1)])
    assert runs[0] == runs[1]
    assert np.mean(runs[0][-20:]) < 0.05
    Xv, yv = memory_task(seed=9, N=200)
    assert evaluate(net, "classify", Xv, yv) < 0.1


def test_checkpoint_resume_continues_exactly(tmp_path):
    rng = np.random.default_rng(5)
    text = rng.integers(0, 9, 3000)
    ck = str(tmp_path / "ck.rnne")
    a = Network("LSTM", 9, 8, 9, embedding=4, seed=1)
    full = fit(a, text, None, "lm", steps=20, batch_size=4, seq_len=8, seed=2)
    b = Network("LSTM", 9, 8, 9, embedding=4, seed=1)
    fit(b, text, None, "lm", steps=10, batch_size=4, seq_len=8, seed=2, checkpoint=ck)
    b2, state = load_checkpoint(ck)
    assert state["optimizer"].t == 10 and state["pos"] == 80
    rest = fit(b2, text, None, "lm", steps=10, batch_size=4, seq_len=8, seed=2, state=state)
    assert [s for s, _, _ in rest] == list(range(11, 21))
    assert [l for _, l, _ in rest] == [l for _, l, _ in full[10:]]
    np.testing.assert_array_equal(b2.params, a.params)


@pytest.mark.parametrize("kind,extra", [("LSTM", {"peepholes": True, "clip": 3.0}), ("GRU", {"linear_before_reset": 1}),
                                        ("RNN", {"relu": True})])
def test_export_round_trip_onnxruntime_and_stream(kind, extra, tmp_path):
    rng = np.random.default_rng(6)
    net = Network(kind, 7, 8, 7, num_layers=2, embedding=5, seed=1, **extra)
    fit(net, rng.integers(0, 7, 2000), None, "lm", steps=20, batch_size=4, seq_len=16, lr=3e-3)
    path = str(tmp_path / "m.onnx")
    net.to_onnx(path, state_io=True)
    ids = rng.integers(0, 7, (9, 2))
    want, _ = net.forward(ids)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {"tokens": ids.astype(np.int64)}
    for i in sess.get_inputs()[1:]:
        feeds[i.name] = np.zeros((1, 2, 8), np.float32)
    got = sess.run(None, feeds)[0]
    assert np.abs(got - want).max() <= 1e-5
    gm = rnnengine.convert(path)
    s = gm.stream()
    steps = np.concatenate([s({"tokens": ids[t:t + 1].astype(np.int64)})["logits"] for t in range(9)])
    assert np.abs(steps - got).max() <= 1e-5


def test_pytorch_gradients_at_step_zero():
    """When PyTorch is installed: the same weights give the same gradients as autograd."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    T, B, I, H = 6, 3, 4, 5
    net = Network("LSTM", I, H, 2, seed=1)
    X = rng.standard_normal((T, B, I)).astype("f4")
    y = rng.integers(0, 2, B)
    net.grads[:] = 0
    logits, _ = net.forward(X)
    _, d = loss_and_grad("classify", logits, y)
    net.backward(d)
    lstm, head = torch.nn.LSTM(I, H), torch.nn.Linear(H, 2)
    # ONNX gate order i, o, f, c -> PyTorch i, f, g (= c), o
    to_torch = np.concatenate([np.arange(0, H), np.arange(2 * H, 3 * H), np.arange(3 * H, 4 * H), np.arange(H, 2 * H)])
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.from_numpy(net.tensor("layer0.W")[0][to_torch]))
        lstm.weight_hh_l0.copy_(torch.from_numpy(net.tensor("layer0.R")[0][to_torch]))
        b = net.tensor("layer0.B")[0]
        lstm.bias_ih_l0.copy_(torch.from_numpy(b[:4 * H][to_torch]))
        lstm.bias_hh_l0.copy_(torch.from_numpy(b[4 * H:][to_torch]))
        head.weight.copy_(torch.from_numpy(net.tensor("head.W")))
        head.bias.copy_(torch.from_numpy(net.tensor("head.b")))
    out, _ = lstm(torch.from_numpy(X))
    loss = torch.nn.functional.cross_entropy(head(out[-1]), torch.from_numpy(y))
    loss.backward()
    assert rel_err(net.tensor("layer0.W", True)[0][to_torch], lstm.weight_ih_l0.grad.numpy()) <= 1e-5
    assert rel_err(net.tensor("layer0.R", True)[0][to_torch], lstm.weight_hh_l0.grad.numpy()) <= 1e-5
    assert rel_err(net.tensor("head.W", True), head.weight.grad.numpy()) <= 1e-5


# --- per-sequence regression, forget-gate bias --------------------------------------------

@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_per_sequence_regression_gradients_match_finite_differences(kind):
    """One target per sequence (B, O): the loss of the last step, end to end through a
    2-layer bidirectional stack, against the float64 reference's finite differences."""
    rng = np.random.default_rng(11)
    T, B = 4, 3
    net = Network(kind, 3, 4, 2, num_layers=2, bidirectional=True, seed=5)
    net.params[:] = (rng.standard_normal(net.size) * 0.5).astype("f4")
    inputs = rng.standard_normal((T, B, 3)).astype("f4")
    targets = rng.standard_normal((B, 2))
    net.grads[:] = 0
    logits, _ = net.forward(inputs)
    loss, d = loss_and_grad("regress", logits, targets, last_only=True)
    assert not d[:-1].any()  # only the last step is scored
    net.backward(d)
    p64 = net.params.astype(np.float64)
    ref = lambda: np_network_loss(net, p64, inputs, targets, "regress", last_only=True)  # noqa: E731
    assert abs(loss - ref()) <= 1e-5
    want = numeric_grad(ref, p64)
    for name, (off, shape) in net.slots.items():
        n = int(np.prod(shape))
        assert rel_err(net.grads[off:off + n], want[off:off + n]) <= GRAD_TOL, name


def test_fit_takes_one_regression_target_per_sequence():
    """targets (N, O) train the last step (as last_only=True), (N,) when O = 1; the loss
    fit reports equals the NumPy reference's on the same minibatch."""
    rng = np.random.default_rng(12)
    X = rng.standard_normal((40, 6, 3)).astype("f4")
    Y = X[:, :, :2].sum(axis=1)  # (N, 2): a per-sequence sum to learn
    a, b = Network("GRU", 3, 8, 2, seed=1), Network("GRU", 3, 8, 2, seed=1)
    ha = fit(a, X, Y, "regress", steps=5, batch_size=8, seed=3)
    hb = fit(b, X, Y, "regress", steps=5, batch_size=8, seed=3, last_only=True)
    assert ha == hb and np.array_equal(a.params, b.params)
    pick = np.random.default_rng(3).integers(0, 40, 8)
    c = Network("GRU", 3, 8, 2, seed=1)
    want = np_network_loss(c, c.params.astype(np.float64), np.swapaxes(X[pick], 0, 1), Y[pick], "regress",
                           last_only=True)
    assert abs(ha[0][1] - want) <= 1e-5
    assert evaluate(a, "regress", X, Y) < ha[0][1]
    one = Network("LSTM", 3, 8, 1, seed=1)
    fit(one, X, Y[:, 0], "regress", steps=2, batch_size=8)
    with pytest.raises(ValueError, match=r"last_only=True takes one target per sequence"):
        fit(one, X, Y[:, :, None][:, :1].repeat(6, axis=1)[:, :, :1], "regress", steps=1, last_only=True)
    with pytest.raises(ValueError, match=r"regress targets must be \(40, 2\) .* got \(40, 3\)"):
        fit(a, X, np.zeros((40, 3)), "regress", steps=1)


def test_forget_bias_initialises_the_lstm_forget_gate():
    plain = Network("LSTM", 3, 5, 2, num_layers=2, bidirectional=True, seed=4)
    net = Network("LSTM", 3, 5, 2, num_layers=2, bidirectional=True, seed=4, forget_bias=1.0)
    H = 5
    for l in range(2):
        b, b0 = net.tensor(f"layer{l}.B"), plain.tensor(f"layer{l}.B")
        assert (b[:, 2 * H:3 * H] == 1.0).all() and (b[:, 6 * H:7 * H] == 0.0).all()
        keep = np.r_[0:2 * H, 3 * H:6 * H, 7 * H:8 * H]
        np.testing.assert_array_equal(b[:, keep], b0[:, keep])
    # the forget gate of a zero input and state is sigmoid(1): the cell keeps ~73% of c0
    X = np.zeros((1, 1, 3), np.float32)
    net.params[net.slots["layer0.W"][0]:net.slots["layer0.B"][0]] = 0.0
    net.tensor("layer0.B")[:, [*range(0, 2 * H), *range(3 * H, 8 * H)]] = 0.0  # all but Wb_f
    c0 = np.ones((2, 1, H), np.float32)
    state = [(np.zeros((2, 1, H), np.float32), c0)] + [net.zero_state(1)[1]]
    _, st = net.forward(X, state)
    np.testing.assert_allclose(st[0][1][0], 1 / (1 + np.exp(-1.0)) + 0.5 * np.tanh(0.0), rtol=1e-6)
    for kind in ("GRU", "RNN"):
        with pytest.raises(ValueError, match="forget_bias exists only for LSTM"):
            Network(kind, 3, 5, 2, forget_bias=1.0)


# --- training refuses what would silently train something else ---------------------------

def classify_data(seed=0, N=60, T=5):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, T, 3)).astype("f4")
    return X, (X[:, 0, 0] > 0).astype(np.int64) + (X[:, 0, 1] > 0)


RESUME = [("lm", {"optimizer": "adam", "lr": 3e-3, "weight_decay": 0.05, "betas": (0.8, 0.99), "eps": 1e-6}),
          ("classify", {"optimizer": "adam", "lr": 1e-2, "weight_decay": 0.1, "betas": (0.85, 0.95), "eps": 1e-7}),
          ("classify", {"optimizer": "sgd", "lr": 0.05, "momentum": 0.5, "weight_decay": 0.01}),
          ("regress", {"optimizer": "adam", "weight_decay": 0.02, "betas": (0.7, 0.9)}),
          ("regress-seq", {"optimizer": "sgd", "lr": 0.02, "momentum": 0.8})]


@pytest.mark.parametrize("task,opts", RESUME, ids=[f"{t}-{o['optimizer']}" for t, o in RESUME])
def test_resume_equals_an_uninterrupted_run_for_every_task(task, opts, tmp_path):
    """10 steps, checkpoint, resume for 10 more == 20 steps straight: the same losses and
    bit-identical weights (the checkpoint holds the minibatch generator and every optimiser
    hyperparameter)."""
    rng = np.random.default_rng(9)
    if task == "lm":
        data, targets = rng.integers(0, 7, 3000), None
        make = lambda: Network("GRU", 7, 8, 7, embedding=4, seed=1)  # noqa: E731
        kw = dict(batch_size=4, seq_len=8)
    elif task == "classify":
        data, targets = classify_data()
        make = lambda: Network("LSTM", 3, 8, 3, seed=1)  # noqa: E731
        kw = dict(batch_size=8)
    else:
        data = rng.standard_normal((50, 6, 3)).astype("f4")
        targets = data.cumsum(axis=1)[:, :, :2] if task == "regress" else data.sum(axis=1)[:, :2]
        task = "regress"
        make = lambda: Network("RNN", 3, 8, 2, seed=1)  # noqa: E731
        kw = dict(batch_size=8)
    ck = str(tmp_path / "ck.rnne")
    a = make()
    full = fit(a, data, targets, task, steps=20, seed=2, **kw, **opts)
    fit(make(), data, targets, task, steps=10, seed=2, checkpoint=ck, **kw, **opts)
    b, state = load_checkpoint(ck)
    assert state["optimizer"].t == 10 and state["task"] == task
    rest = fit(b, data, targets, task, steps=10, seed=12345, state=state, **kw)  # the seed is the checkpoint's
    assert [s for s, _, _ in rest] == list(range(11, 21))
    assert [l for _, l, _ in rest] == [l for _, l, _ in full[10:]]
    np.testing.assert_array_equal(b.params, a.params)


def test_resume_refuses_options_that_differ_from_the_checkpoint(tmp_path):
    X, y = classify_data()
    ck = str(tmp_path / "ck.rnne")
    fit(Network("GRU", 3, 6, 3), X, y, "classify", steps=2, lr=1e-2, weight_decay=0.1, checkpoint=ck)
    for bad, msg in [({"lr": 1e-3}, "lr=0.01"), ({"optimizer": "sgd"}, "optimizer='adam'"),
                     ({"weight_decay": 0.0}, "weight_decay=0.1"), ({"betas": (0.5, 0.9)}, "betas")]:
        net, state = load_checkpoint(ck)
        with pytest.raises(ValueError, match=msg):
            fit(net, X, y, "classify", steps=1, state=state, **bad)
    net, state = load_checkpoint(ck)
    fit(net, X, y, "classify", steps=1, state=state, lr=1e-2, optimizer="adam")  # the same values are fine
    net, state = load_checkpoint(ck)
    with pytest.raises(ValueError, match="trained on task 'classify', not 'regress'"):
        fit(net, X, np.zeros((60, 3)), "regress", steps=1, state=state)


def test_unknown_options_and_invalid_setups_are_refused():
    X, y = classify_data()
    net = Network("LSTM", 3, 6, 3)
    with pytest.raises(ValueError, match="optimizer must be one of adam, sgd, got 'adamw'"):
        fit(net, X, y, "classify", steps=1, optimizer="adamw")
    with pytest.raises(ValueError, match="momentum is an option of optimizer 'sgd'"):
        fit(net, X, y, "classify", steps=1, momentum=0.9)
    with pytest.raises(ValueError, match="betas and eps are options of optimizer 'adam'"):
        fit(net, X, y, "classify", steps=1, optimizer="sgd", betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="task must be one of lm, classify, regress, got 'clasify'"):
        fit(net, X, y, "clasify", steps=1)
    with pytest.raises(TypeError, match="learning_rate"):
        fit(net, X, y, "classify", steps=1, learning_rate=0.1)
    lm = Network("LSTM", 9, 8, 9, embedding=4, bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional network cannot be trained as a language model"):
        fit(lm, np.arange(900) % 9, None, "lm", steps=1, batch_size=2, seq_len=8)
    assert np.array_equal(net.params, Network("LSTM", 3, 6, 3).params)  # nothing was trained


def test_non_finite_or_invalid_data_is_refused_by_name_and_index():
    X, y = classify_data()
    net = Network("LSTM", 3, 6, 3)
    bad = X.copy()
    bad[7, 2, 1] = np.nan
    with pytest.raises(ValueError, match=r"inputs holds a non-finite value \(nan\) at index \[7, 2, 1\]"):
        fit(net, bad, y, "classify", steps=1)
    with pytest.raises(ValueError, match=r"val inputs holds a non-finite value \(inf\) at index \[0, 0, 0\]"):
        v = X[:5].copy()
        v[0, 0, 0] = np.inf
        fit(net, X, y, "classify", steps=1, val=(v, y[:5]), val_every=1)
    reg = Network("GRU", 3, 6, 2)
    t = np.zeros((60, 5, 2), np.float32)
    t[3, 4, 1] = -np.inf
    with pytest.raises(ValueError, match=r"targets holds a non-finite value \(-inf\) at index \[3, 4, 1\]"):
        fit(reg, X, t, "regress", steps=1)
    for labels, msg in [(y + 0.5, r"targets must be whole numbers; targets\[0\] = "),
                        (np.where(np.arange(60) == 4, -1, y), r"targets\[4\] = -1 is outside 0..2"),
                        (np.where(np.arange(60) == 9, 3, y), r"targets\[9\] = 3 is outside 0..2 \(classes 3\)")]:
        with pytest.raises(ValueError, match=msg):
            fit(net, X, labels, "classify", steps=1)
    lm = Network("LSTM", 9, 8, 9, embedding=4)
    ids = np.arange(900) % 9
    ids[123] = 9
    with pytest.raises(ValueError, match=r"inputs\[123\] = 9 is outside 0..8 \(vocabulary size 9\)"):
        fit(lm, ids, None, "lm", steps=1, batch_size=2, seq_len=8)
    # whole-number float labels are the same labels
    a, b = Network("LSTM", 3, 6, 3, seed=2), Network("LSTM", 3, 6, 3, seed=2)
    assert fit(a, X, y, "classify", steps=3) == fit(b, X, y.astype(np.float32), "classify", steps=3)


def test_a_non_finite_loss_stops_training_naming_the_step():
    X, y = classify_data()
    net = Network("LSTM", 3, 6, 3, seed=1)
    net.tensor("head.b")[0] = np.inf  # the first forward already overflows
    before = net.params.copy()
    with pytest.raises(FloatingPointError, match="loss became nan at step 1"):
        fit(net, X, y, "classify", steps=5)
    np.testing.assert_array_equal(net.params, before)
    # a weight turning NaN after step 3 (here by hand, in the log callback) stops step 4
    net = Network("RNN", 3, 6, 3, seed=1)
    seen = []

    def poison(step, loss, vloss):
        seen.append(step)
        if step == 3:
            net.params[5] = np.nan
    with pytest.raises(FloatingPointError, match="loss became nan at step 4; the weights are left as after step 3"):
        fit(net, X, y, "classify", steps=10, log=poison)
    assert seen == [1, 2, 3]


# --- the command line ----------------------------------------------------------------------

def test_cli_trains_per_sequence_regression_and_forget_bias(tmp_path):
    from rnnengine import cli
    rng = np.random.default_rng(13)
    X = rng.standard_normal((40, 5, 3)).astype("f4")
    np.savez(tmp_path / "r.npz", inputs=X, targets=X.sum(axis=1)[:, :2])
    ck = str(tmp_path / "r.rnne")
    args = ["train", str(tmp_path / "r.npz"), "-o", ck, "--task", "regress", "--hidden", "8", "--batch", "4",
            "--quiet", "--val-every", "2"]
    assert cli.main(args + ["--steps", "4", "--forget-bias", "1.0"]) == 0
    net, state = load_checkpoint(ck)
    assert net.config["forget_bias"] == 1.0 and net.config["output_size"] == 2
    np.savez(tmp_path / "r1.npz", inputs=X, targets=X.sum(axis=(1, 2)))
    assert cli.main(["train", str(tmp_path / "r1.npz"), "-o", str(tmp_path / "r1.rnne"), "--task", "regress",
                     "--hidden", "4", "--steps", "2", "--quiet", "--threads", "2"]) == 0


def test_cli_resume_equals_an_uninterrupted_run(tmp_path):
    from rnnengine import cli
    from rnnengine.format.weightfile import read
    X, y = classify_data(N=80)
    np.savez(tmp_path / "c.npz", inputs=X, targets=y)
    base = ["train", str(tmp_path / "c.npz"), "--hidden", "8", "--batch", "4", "--quiet", "--lr", "0.01",
            "--optimizer", "sgd", "--weight-decay", "0.01"]
    assert cli.main(base + ["-o", str(tmp_path / "full.rnne"), "--steps", "8"]) == 0
    assert cli.main(base + ["-o", str(tmp_path / "half.rnne"), "--steps", "4"]) == 0
    assert cli.main(["train", str(tmp_path / "c.npz"), "--quiet", "--batch", "4", "-o", str(tmp_path / "rest.rnne"),
                     "--steps", "4", "--resume", str(tmp_path / "half.rnne")]) == 0
    with read(str(tmp_path / "full.rnne")) as f, read(str(tmp_path / "rest.rnne")) as g:
        np.testing.assert_array_equal(f.tensor("params"), g.tensor("params"))


def test_cli_refuses_stray_labels_and_changed_options(tmp_path, capsys):
    from rnnengine import cli
    X, y = classify_data()
    y = y.copy()
    y[5] = 99
    np.savez(tmp_path / "c.npz", inputs=X, targets=y)
    assert cli.main(["train", str(tmp_path / "c.npz"), "-o", str(tmp_path / "c.rnne"), "--steps", "1",
                     "--quiet"]) == 2
    assert "targets[5] = 99 but 96 classes below it never occur" in capsys.readouterr().err
    y[5] = 1
    np.savez(tmp_path / "c.npz", inputs=X, targets=y)
    assert cli.main(["train", str(tmp_path / "c.npz"), "-o", str(tmp_path / "c.rnne"), "--steps", "1",
                     "--quiet", "--hidden", "4"]) == 0
    assert cli.main(["train", str(tmp_path / "c.npz"), "-o", str(tmp_path / "d.rnne"), "--steps", "1", "--quiet",
                     "--resume", str(tmp_path / "c.rnne"), "--lr", "0.5"]) == 2
    assert "resuming a checkpoint trained with lr=0.002" in capsys.readouterr().err


def test_misshapen_states_gradients_and_ids_are_refused_not_run():
    # found by a red-team review of the training path: each of these ran and gave a result
    # (a (1, B, 5) h for H = 4 was read as is; rows 4-7 of a batch-8 state were memory; a
    # dlogits of another T gave head gradients of the wrong size; ids >= 2**31 wrapped)
    from rnnengine.train import Network, loss_and_grad
    net = Network("GRU", 5, 4, 6, seed=0)
    x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    with pytest.raises(ValueError, match=r"state\[0\] h must be float \(1, 4, 4\)"):
        net.forward(x, [np.zeros((1, 4, 5), np.float32)])
    with pytest.raises(ValueError, match=r"state\[0\] h must be float \(1, 4, 4\)"):
        net.forward(x, [np.zeros((1, 8, 4), np.float32)])
    with pytest.raises(ValueError, match=r"state must be a list of 1 layer state"):
        net.forward(x, [])
    with pytest.raises(ValueError, match=r"at least one time step and one row"):
        net.forward(x[:0])
    logits, _ = net.forward(x)
    with pytest.raises(ValueError, match=r"dlogits must have the shape of forward\(\)'s logits \(3, 4, 6\)"):
        net.backward(np.zeros((6, 4, 6), np.float32))
    lm = Network("LSTM", 5, 4, 5, embedding=3, seed=0)
    for bad in ([[2**32 + 1]], [[1.7]], [[-1]]):
        with pytest.raises(ValueError, match=r"inputs"):
            lm.forward(np.array(bad))
    out, _ = lm.forward(np.array([[1]]))
    for tg in (np.array([[2**32 + 2]]), np.array([[-5]]), np.array([[5]])):
        with pytest.raises(ValueError, match=r"target .* is outside 0..4"):
            loss_and_grad("lm", out, tg)
    assert loss_and_grad("lm", out, np.array([[-1]]))[0] == 0.0  # -1: ignored


def test_a_resume_keeps_batch_size_seq_len_and_clip_norm(tmp_path):
    # the review: resumed with batch_size 4 (trained with 8) ran on the first 4 carried rows;
    # resumed without clip_norm (trained with 0.01) clipped at 1.0: both differed silently
    from rnnengine.train import Network, fit, load_checkpoint
    ids = np.random.default_rng(1).integers(0, 6, 4000)
    path = str(tmp_path / "c.rnne")

    def run(steps, **kw):
        net = Network("LSTM", 6, 8, 6, embedding=4, seed=0)
        fit(net, ids, None, "lm", steps, batch_size=8, seq_len=10, clip_norm=0.01, checkpoint=path, **kw)
        return net
    whole = run(6)
    run(3)
    net, state = load_checkpoint(path)
    assert state["options"] == {"batch_size": 8, "seq_len": 10, "clip_norm": 0.01}
    with pytest.raises(ValueError, match=r"trained with batch_size=8, but batch_size=4 was given"):
        fit(net, ids, None, "lm", 3, batch_size=4, state=state)
    with pytest.raises(ValueError, match=r"trained with clip_norm=0.01, but clip_norm=1.0 was given"):
        fit(net, ids, None, "lm", 3, clip_norm=1.0, state=state)
    net, state = load_checkpoint(path)
    fit(net, ids, None, "lm", 3, state=state)  # the checkpoint's options
    np.testing.assert_array_equal(net.params, whole.params)


def test_softmax_xent_in_place_gives_the_loss_of_separate_buffers():
    # dlogits may be the logits' own buffer (the review of the fifteenth session: the target's
    # logit was read after the buffer was overwritten, a wrong loss)
    rng = np.random.default_rng(11)
    z = (rng.standard_normal((7, 13)) * 3).astype(np.float32)
    t = rng.integers(-1, 13, 7).astype(np.int32)
    d = np.empty_like(z)
    loss = _core.softmax_xent(z, t, d)
    zz = z.copy()
    assert _core.softmax_xent(zz, t, zz) == loss
    assert np.array_equal(zz, d)
    want = np.mean([np.log(np.exp(z[i].astype(np.float64)).sum()) - z[i, t[i]] for i in range(7) if t[i] >= 0])
    assert abs(loss - want) <= 1e-6
