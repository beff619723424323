"""Oracles for the numeric tests: onnxruntime on one-node ONNX models, and an independent
NumPy reference of the ONNX LSTM/GRU/RNN equations (for cases onnxruntime refuses)."""
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

# Tolerances per dtype, in one place: |got - want| <= atol + rtol * |want| elementwise.
# atol is the bound on the max abs error for outputs of magnitude <= 1 (every bounded
# activation); rtol only matters where unbounded activations (Relu, Affine, Softplus...)
# let values grow past 1, where float32 rounding is relative.
TOLERANCE = {np.float32: {"atol": 1e-5, "rtol": 1e-5}}
# Max abs error of a model whose recurrent weights are stored / computed as float16 or int8,
# against the float32 model (docs/FORMAT.md, "Quantization and its error bounds"; the
# bounds `rnnengine verify` applies).
WEIGHT_DTYPE_ATOL = {"float16": 5e-3, "int8": 5e-2}
# Max difference of a session stepped in a batch by rnnengine.Batcher from the same session
# stepped alone (issue 13 asks for <= 1e-6): none. Every kernel computes a row of a batch with
# the same chain of sums whatever other rows share the call (the packed products of
# src_c/pack.c, MatMul included; per-row convolutions, reductions and softmax), so a batched
# session gets the bits it gets alone. Until 2026-12-02 a MatMul went to BLAS (sgemv for one
# row, sgemm for several: the demo char LM's logits were up to 1.9e-6 relative off), and below
# AVX-512 an input projection of 128 rows or more too.
BATCHED_ATOL = 0.0


def max_violation(got, want, dtype=np.float32):
    """Largest |got - want| / (atol + rtol |want|); <= 1 means within tolerance."""
    tol = TOLERANCE[dtype]
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.size == 0:
        return 0.0
    same = (got == want) | (np.isnan(got) & np.isnan(want))  # equal infinities / NaNs agree
    with np.errstate(invalid="ignore"):
        ratio = np.abs(got - want) / (tol["atol"] + tol["rtol"] * np.abs(want))
    ratio = np.where(same, 0.0, ratio)
    return float(np.max(np.nan_to_num(ratio, nan=np.inf)))


def make_rnn_model(kind, attrs, inputs, opset=14):
    """A one-node ONNX model of op `kind` whose inputs are graph inputs with the given
    arrays' shapes (None = omitted optional input). Outputs Y, Y_h (, Y_c)."""
    names = ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"][: {"LSTM": 8, "GRU": 6, "RNN": 6}[kind]]
    node_inputs, graph_inputs = [], []
    for nm in names:
        arr = inputs.get(nm)
        if arr is None:
            node_inputs.append("")
            continue
        node_inputs.append(nm)
        et = TensorProto.INT32 if nm == "sequence_lens" else TensorProto.FLOAT
        graph_inputs.append(helper.make_tensor_value_info(nm, et, list(arr.shape)))
    while node_inputs and node_inputs[-1] == "":
        node_inputs.pop()
    outs = ["Y", "Y_h"] + (["Y_c"] if kind == "LSTM" else [])
    node = helper.make_node(kind, node_inputs, outs, **attrs)
    graph = helper.make_graph([node], "g", graph_inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def run_ort(kind, attrs, inputs, opset=14):
    model = make_rnn_model(kind, attrs, inputs, opset)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {k: v for k, v in inputs.items() if v is not None}
    return sess.run(None, feeds)


# --- independent NumPy reference (float64) of the ONNX equations -------------------------
_DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
_TAKES = {"affine": (1, 1), "leakyrelu": (1, 0), "thresholdedrelu": (1, 0), "scaledtanh": (1, 1),
          "hardsigmoid": (1, 1), "elu": (1, 0)}
_DEFAULTS = {"affine": (1.0, 0.0), "leakyrelu": (0.01, 0.0), "thresholdedrelu": (1.0, 0.0),
             "scaledtanh": (1.0, 1.0), "hardsigmoid": (0.2, 0.5), "elu": (1.0, 0.0)}


def np_activation(name, a, b):
    n = name.lower()
    return {
        "relu": lambda x: np.maximum(x, 0),
        "tanh": np.tanh,
        "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
        "affine": lambda x: a * x + b,
        "leakyrelu": lambda x: np.where(x >= 0, x, a * x),
        "thresholdedrelu": lambda x: np.where(x > a, x, 0),
        "scaledtanh": lambda x: a * np.tanh(b * x),
        "hardsigmoid": lambda x: np.clip(a * x + b, 0, 1),
        "elu": lambda x: np.where(x >= 0, x, a * (np.exp(x) - 1)),
        "softsign": lambda x: x / (1 + np.abs(x)),
        "softplus": lambda x: np.log1p(np.exp(x)),
    }[n]


def np_reference(kind, attrs, X, W, R, B=None, sequence_lens=None, initial_h=None, initial_c=None, P=None):
    """ONNX LSTM/GRU/RNN written straight from the operator spec, in float64, for any layout."""
    with np.errstate(over="ignore", invalid="ignore"):
        return _np_reference(kind, attrs, X, W, R, B, sequence_lens, initial_h, initial_c, P)


def _np_reference(kind, attrs, X, W, R, B, sequence_lens, initial_h, initial_c, P):
    layout = attrs.get("layout", 0)
    if layout:  # work in layout 0
        X = X.transpose(1, 0, 2)
        initial_h = None if initial_h is None else initial_h.transpose(1, 0, 2)
        initial_c = None if initial_c is None else initial_c.transpose(1, 0, 2)
    X = X.astype(np.float64)
    T, Bsz, _ = X.shape
    D, GH, _ = W.shape
    H = R.shape[2]
    direction = attrs.get("direction", "forward")
    n_act = len(_DEFAULT_ACTS[kind])
    names = list(attrs.get("activations") or _DEFAULT_ACTS[kind] * D)
    if len(names) == n_act and D == 2:
        names = names * 2
    alphas = list(attrs.get("activation_alpha") or [])
    betas = list(attrs.get("activation_beta") or [])
    acts = []
    for nm in names:
        ta, tb = _TAKES.get(nm.lower(), (0, 0))
        a, b = _DEFAULTS.get(nm.lower(), (0.0, 0.0))
        if ta and alphas:
            a = alphas.pop(0)
        if tb and betas:
            b = betas.pop(0)
        acts.append(np_activation(nm, a, b))
    clip = attrs.get("clip")
    cl = (lambda v: np.clip(v, -clip, clip)) if clip is not None else (lambda v: v)
    lens = np.full(Bsz, T) if sequence_lens is None else np.asarray(sequence_lens)
    Y = np.zeros((T, D, Bsz, H))
    Yh = np.zeros((D, Bsz, H))
    Yc = np.zeros((D, Bsz, H))
    for d in range(D):
        f = acts[d * n_act: (d + 1) * n_act]
        Wd, Rd = W[d].astype(np.float64), R[d].astype(np.float64)
        Bd = np.zeros(2 * GH) if B is None else B[d].astype(np.float64)
        Wb, Rb = Bd[:GH], Bd[GH:]
        Pd = np.zeros(3 * H) if P is None else P[d].astype(np.float64)
        reverse = direction == "reverse" or d == 1
        for b in range(Bsz):
            h = np.zeros(H) if initial_h is None else initial_h[d, b].astype(np.float64)
            c = np.zeros(H) if initial_c is None else initial_c[d, b].astype(np.float64)
            L = int(lens[b])
            order = range(L - 1, -1, -1) if reverse else range(L)
            for t in order:
                x = X[t, b]
                if kind == "RNN":
                    h = f[0](cl(x @ Wd.T + h @ Rd.T + Wb + Rb))
                elif kind == "GRU":
                    xw = x @ Wd.T + Wb
                    z = f[0](cl(xw[:H] + h @ Rd[:H].T + Rb[:H]))
                    r = f[0](cl(xw[H:2 * H] + h @ Rd[H:2 * H].T + Rb[H:2 * H]))
                    if attrs.get("linear_before_reset", 0):
                        n = f[1](cl(xw[2 * H:] + r * (h @ Rd[2 * H:].T + Rb[2 * H:])))
                    else:
                        n = f[1](cl(xw[2 * H:] + (r * h) @ Rd[2 * H:].T + Rb[2 * H:]))
                    h = (1 - z) * n + z * h
                else:
                    g = x @ Wd.T + h @ Rd.T + Wb + Rb
                    i = f[0](cl(g[:H] + Pd[:H] * c))
                    if attrs.get("input_forget", 0):
                        fg = 1 - i
                    else:
                        fg = f[0](cl(g[2 * H:3 * H] + Pd[2 * H:] * c))
                    cc = f[1](cl(g[3 * H:]))
                    c = fg * c + i * cc
                    o = f[0](cl(g[H:2 * H] + Pd[H:2 * H] * c))
                    h = o * f[2](c)
                Y[t, d, b] = h
            if L > 0:
                Yh[d, b] = h
                Yc[d, b] = c
    outs = [Y, Yh] + ([Yc] if kind == "LSTM" else [])
    if layout:
        outs = [outs[0].transpose(2, 0, 1, 3)] + [o.transpose(1, 0, 2) for o in outs[1:]]
    return outs


def stack_state(entries):
    """A layer stack's state (rnnengine.State) from its per-layer entries in order ((h, c) for
    an LSTM layer, h otherwise)."""
    return {"layers": {f"layer{k}": e for k, e in enumerate(entries)}, "inputs": {}, "context": {}}


def state_entries(state):
    """The per-layer entries of a layer stack's state, in layer order."""
    assert set(state) == {"layers", "inputs", "context"} and not state["inputs"] and not state["context"]
    keys = sorted(state["layers"], key=lambda k: int(k[len("layer"):]))
    assert keys == [f"layer{k}" for k in range(len(keys))], keys
    return [state["layers"][k] for k in keys]


# --- float64 evaluation of a whole ONNX graph -------------------------------------------
def float64_evaluator(model):
    """The ONNX reference evaluator (onnx.reference, NumPy) on a copy of `model` computed in
    float64: float32 initializers, Constant tensors, Cast targets and value types (subgraphs
    included) become float64. Feed it float64 arrays. For models where onnxruntime's own
    float32 rounding is a sizeable part of the tolerance (an ill-conditioned graph: small
    moves of an intermediate amplified downstream), this is the exact answer both engines
    are judged against."""
    import copy

    from onnx import AttributeProto, numpy_helper
    from onnx.reference import ReferenceEvaluator
    m = copy.deepcopy(model)

    def to64(g):
        for i, t in enumerate(g.initializer):
            if t.data_type == TensorProto.FLOAT:
                g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
        for node in g.node:
            for a in node.attribute:
                if a.name == "to" and node.op_type == "Cast" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.DOUBLE
                elif a.type == AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
                elif a.type == AttributeProto.GRAPH:
                    to64(a.g)
        for v in list(g.input) + list(g.output) + list(g.value_info):
            if v.type.tensor_type.elem_type == TensorProto.FLOAT:
                v.type.tensor_type.elem_type = TensorProto.DOUBLE
    to64(m.graph)
    return ReferenceEvaluator(m)
