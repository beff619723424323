"""fuse.py - recognise recurrent cells written out op by op and map them to engine cells
(LSTMCell steps here; GRUCell steps in fuse_gru_cells below; the Loops tf2onnx writes for
Keras LSTM / GRU / SimpleRNN layers, masked or not, in fuse_keras_loops at the end).

Exporters write a loop over ``nn.LSTMCell`` as, per time step:

    gates = Gemm(x_t, W_ih, b_ih, transB=1) + Gemm(h, W_hh, b_hh, transB=1)
    i, f, g, o = Split(gates, 4, axis=1)             # PyTorch gate order i, f, g, o
    c' = Sigmoid(f) * c + Sigmoid(i) * Tanh(g)
    h' = Sigmoid(o) * Tanh(c')

Each such step becomes one single-step ONNX LSTM node (gates re-ordered to ONNX's i, o, f, c
once, shared by every step) with initial_h = h, initial_c = c, whose Y_h / Y_c replace h' / c'.
The rewrite only fires when the pattern is exact (the same activations, the intermediate
values used nowhere else, constant weights); anything else is left to run op by op, which
is just as correct, only slower.
"""
from __future__ import annotations

import math

import numpy as np

from rnnengine.limits import check_eval
from rnnengine.codes import NP_DTYPES, RECURRENT_OPS
from rnnengine.frontend.torch_import import gate_permutation
from rnnengine.ops.handlers import KERAS_LOOP, OPS, STATELESS, STEP_MASK  # noqa: F401 (STATELESS, STEP_MASK re-exported)




def _splice(nodes, replace, remove):
    """The node list with each node in ``replace`` (by id) swapped for its new nodes and the
    nodes in ``remove`` dropped."""
    out = []
    for n in nodes:
        if id(n) in replace:
            out.extend(replace[id(n)])
        elif id(n) not in remove:
            out.append(n)
    return out

def _index(nodes):
    producer, users = {}, {}
    for n in nodes:
        for o in n["outputs"]:
            if o:
                producer[o] = n
        for x in n["inputs"]:
            if x:
                users.setdefault(x, []).append(n)
    return producer, users


def _gemm_ok(n, tensors):
    a = n.get("attrs", {})
    return (n["op"] == "Gemm" and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0
            and not a.get("transA", 0) and len(n["inputs"]) >= 2 and n["inputs"][1] in tensors
            and np.asarray(tensors[n["inputs"][1]]).dtype.kind == "f"
            and (len(n["inputs"]) < 3 or not n["inputs"][2] or n["inputs"][2] in tensors))


def _bias_fits(tensors, name, n):
    """A Gemm's C that is one float per output column, the same for every row (absent, a
    scalar, (n,) or (1, n)): what a cell's bias is. Anything else (a bias per row, a wrong
    length) is not a cell step, and the ops stay as they are (their handlers check them)."""
    if not name:
        return True
    b = np.asarray(tensors[name])
    return b.dtype.kind == "f" and (b.size == 1 and b.ndim <= 2 or b.shape in ((n,), (1, n)))


def _names_in_use(nodes, tensors, outputs):
    """Every value name the graph holds: the new names of a rewrite must be none of them."""
    names = set(tensors) | set(outputs)
    for n in nodes:
        names.update(n["inputs"])
        names.update(n["outputs"])
    return names


def _free_base(stem, taken):
    """stem + the first number k such that no name in use is stem+k or starts with
    stem+k+'.' (the rewrite's names all do): a model's own tensor named like ours
    ('fused_lstm_cell0.B', review) is never overwritten. Adds the base to taken."""
    k = 0
    while True:
        base = f"{stem}{k}"
        if base not in taken and not any(t.startswith(base + ".") for t in taken):
            taken.add(base)
            return base
        k += 1


def _even_split(split, tensors, axis_ok=(1, -1), width=None):
    """A Split along the gates' axis into equal parts (no sizes given, or all sizes equal and,
    with `width`, adding up to it: [1, 1, 1, 1] of an 8-wide gate row is an invalid model
    that onnxruntime refuses, not a cell)."""
    if split.get("attrs", {}).get("axis", 0) not in axis_ok:
        return False
    sizes = split.get("attrs", {}).get("split")
    if sizes is None and len(split["inputs"]) > 1 and split["inputs"][1]:
        if split["inputs"][1] not in tensors:
            return False
        given = np.asarray(tensors[split["inputs"][1]])
        if given.dtype.kind not in "iu":  # float sizes (a NaN: a ValueError before; fuzz) are no Split to fuse
            return False
        sizes = given.reshape(-1).tolist()
    if sizes is None:
        return True
    sizes = [int(v) for v in sizes]
    return len(set(sizes)) == 1 and (width is None or sum(sizes) == width)


def fuse_lstm_cells(nodes, tensors, outputs, prefix=""):
    """Returns nodes with every recognised LSTMCell step replaced by an LSTM node (new names
    start with ``prefix``, which keeps the cells of different If branches apart)."""
    producer, users = _index(nodes)
    keep_names = set(outputs)
    replace = {}   # id(node) -> list of nodes to put in its place (at the position of the last op)
    remove = set()
    shared = {}
    count = 0
    taken = _names_in_use(nodes, tensors, outputs)

    def only_users(name, allowed):
        us = users.get(name, [])
        return name not in keep_names and all(id(u) in allowed for u in us)

    for split in nodes:
        if split["op"] != "Split" or len(split["outputs"]) != 4:
            continue
        add = producer.get(split["inputs"][0])
        if add is None or add["op"] != "Add" or not _even_split(split, tensors):
            continue
        g1, g2 = (producer.get(x) for x in add["inputs"])
        if g1 is None or g2 is None or not (_gemm_ok(g1, tensors) and _gemm_ok(g2, tensors)):
            continue
        acts = []
        for o in split["outputs"]:
            us = users.get(o, [])
            if len(us) != 1 or us[0]["op"] not in ("Sigmoid", "Tanh") or o in keep_names:
                break
            acts.append(us[0])
        if [a["op"] for a in acts] != ["Sigmoid", "Sigmoid", "Tanh", "Sigmoid"]:
            continue
        ai, af, ag, ao = (a["outputs"][0] for a in acts)

        def single_user(name, op):
            us = users.get(name, [])
            return us[0] if len(us) == 1 and us[0]["op"] == op else None
        m_f = single_user(af, "Mul")
        m_i = single_user(ai, "Mul")
        if m_f is None or m_i is None or ag not in m_i["inputs"]:
            continue
        c_prev = [x for x in m_f["inputs"] if x != af]
        if len(c_prev) != 1:
            continue
        c_prev = c_prev[0]
        add_c = single_user(m_f["outputs"][0], "Add")
        if add_c is None or set(add_c["inputs"]) != {m_f["outputs"][0], m_i["outputs"][0]}:
            continue
        c_new = add_c["outputs"][0]
        tanh_c = [u for u in users.get(c_new, []) if u["op"] == "Tanh"]
        if len(tanh_c) != 1:
            continue
        m_h = single_user(tanh_c[0]["outputs"][0], "Mul")
        if m_h is None or set(m_h["inputs"]) != {ao, tanh_c[0]["outputs"][0]}:
            continue
        h_new = m_h["outputs"][0]
        ao_users = users.get(ao, [])
        if len(ao_users) != 1:
            continue
        # which Gemm reads the hidden state: the one whose weight has H columns (either works
        # when input and hidden sizes agree: the gate sum is the same)
        W1, W2 = tensors[g1["inputs"][1]], tensors[g2["inputs"][1]]
        if W1.ndim != 2 or W2.ndim != 2 or W1.shape[0] != W2.shape[0] or W1.shape[0] % 4:
            continue
        H = W1.shape[0] // 4
        if not (g1["attrs"].get("transB", 0) and g2["attrs"].get("transB", 0)) or \
                not _even_split(split, tensors, width=4 * H):
            continue
        gx, gh = (g2, g1) if W1.shape[1] == H else (g1, g2)
        if tensors[gh["inputs"][1]].shape[1] != H:
            continue
        if not all(_bias_fits(tensors, g["inputs"][2] if len(g["inputs"]) > 2 else "", 4 * H) for g in (gx, gh)):
            continue
        inner = [add, g1, g2, split] + acts + [m_f, m_i, add_c, tanh_c[0], m_h]
        ids = {id(n) for n in inner}
        interm = [g1["outputs"][0], g2["outputs"][0], add["outputs"][0]] + split["outputs"] + [ai, af, ag, ao] \
            + [m_f["outputs"][0], m_i["outputs"][0], tanh_c[0]["outputs"][0]]
        if not all(only_users(x, ids) for x in interm):
            continue
        if c_prev in set(interm) | {c_new, h_new}:
            continue  # the "previous cell state" is one of the step's own values: not an LSTM cell
        # the weights in ONNX order (i, o, f, c) from PyTorch's (i, f, g, o), made once per weight set
        key = (gx["inputs"][1], gh["inputs"][1], gx["inputs"][2] if len(gx["inputs"]) > 2 else "",
               gh["inputs"][2] if len(gh["inputs"]) > 2 else "")
        if key not in shared:
            perm = gate_permutation("LSTM", H, "torch", "onnx")
            Wx = np.asarray(tensors[key[0]], np.float32)[perm][None]
            Rh = np.asarray(tensors[key[1]], np.float32)[perm][None]

            def bias(name):
                if not name:
                    return np.zeros(4 * H, np.float32)
                return np.broadcast_to(np.asarray(tensors[name], np.float32).reshape(-1), (4 * H,))[perm]
            Bb = np.concatenate([bias(key[2]), bias(key[3])])[None]
            base = _free_base(f"{prefix}fused_lstm_cell", taken)
            tensors[base + ".W"], tensors[base + ".R"], tensors[base + ".B"] = Wx, Rh, np.ascontiguousarray(Bb)
            tensors[base + ".axis0"] = np.array([0], np.int64)
            shared[key] = base
        base = shared[key]
        tag = f"{base}.step{count}"
        count += 1
        x_name, h_name = gx["inputs"][0], gh["inputs"][0]
        new = [
            {"op": "Unsqueeze", "name": tag + ".x", "inputs": [x_name, base + ".axis0"], "outputs": [tag + ".X"], "attrs": {}},
            {"op": "Unsqueeze", "name": tag + ".h", "inputs": [h_name, base + ".axis0"], "outputs": [tag + ".h0"], "attrs": {}},
            {"op": "Unsqueeze", "name": tag + ".c", "inputs": [c_prev, base + ".axis0"], "outputs": [tag + ".c0"], "attrs": {}},
            {"op": "LSTM", "name": tag, "inputs": [tag + ".X", base + ".W", base + ".R", base + ".B", "", tag + ".h0", tag + ".c0"],
             "outputs": [tag + ".Y", tag + ".Yh", tag + ".Yc"], "attrs": {"hidden_size": H, STATELESS: 1}},
            {"op": "Squeeze", "name": tag + ".hn", "inputs": [tag + ".Yh", base + ".axis0"], "outputs": [h_new], "attrs": {}},
            {"op": "Squeeze", "name": tag + ".cn", "inputs": [tag + ".Yc", base + ".axis0"], "outputs": [c_new], "attrs": {}},
        ]
        last = max(inner, key=lambda n: nodes.index(n))
        replace[id(last)] = new
        remove.update(ids - {id(last)})
    if not replace:
        return nodes, 0
    return _splice(nodes, replace, remove), count


def fuse_gru_cells(nodes, tensors, outputs, prefix=""):
    """Maps nn.GRUCell steps written out op by op, as exporters write them:

        i_r, i_z, i_n = Split(Gemm(x, W_ih, b_ih, transB=1), 3)   # PyTorch gate order r, z, n
        h_r, h_z, h_n = Split(Gemm(h, W_hh, b_hh, transB=1), 3)
        r = Sigmoid(h_r + i_r);  z = Sigmoid(h_z + i_z)
        n = Tanh(i_n + h_n * r)
        h' = (h - n) * z + n

    to single-step ONNX GRU nodes with linear_before_reset = 1 (gates re-ordered to z, r, h
    once, shared by every step). Only exact matches whose intermediates are used nowhere
    else are rewritten; anything else runs op by op."""
    producer, users = _index(nodes)
    keep_names = set(outputs)
    replace, remove, shared = {}, set(), {}
    count = 0
    taken = _names_in_use(nodes, tensors, outputs)

    def sole(name, op):
        us = users.get(name, [])
        return us[0] if len(us) == 1 and us[0]["op"] == op and name not in keep_names else None

    def other(node, name):
        rest = [x for x in node["inputs"] if x != name]
        return rest[0] if len(rest) == 1 else None

    for tanh in nodes:
        if tanh["op"] != "Tanh":
            continue
        add_n = producer.get(tanh["inputs"][0])
        if add_n is None or add_n["op"] != "Add":
            continue
        mul = next((producer.get(x) for x in add_n["inputs"] if producer.get(x) and producer[x]["op"] == "Mul"), None)
        if mul is None:
            continue
        i_n = other(add_n, mul["outputs"][0])
        sig_r = next((producer.get(x) for x in mul["inputs"] if producer.get(x) and producer[x]["op"] == "Sigmoid"), None)
        if sig_r is None or i_n is None:
            continue
        h_n = other(mul, sig_r["outputs"][0])
        split_i, split_h = producer.get(i_n), producer.get(h_n)
        if not (split_i and split_h and split_i["op"] == split_h["op"] == "Split"
                and len(split_i["outputs"]) == len(split_h["outputs"]) == 3
                and split_i["outputs"][2] == i_n and split_h["outputs"][2] == h_n
                and _even_split(split_i, tensors) and _even_split(split_h, tensors)):
            continue
        add_r = producer.get(sig_r["inputs"][0])
        if add_r is None or add_r["op"] != "Add" or set(add_r["inputs"]) != {split_i["outputs"][0], split_h["outputs"][0]}:
            continue
        add_z = sole(split_i["outputs"][1], "Add")
        if add_z is None or set(add_z["inputs"]) != {split_i["outputs"][1], split_h["outputs"][1]}:
            continue
        sig_z = sole(add_z["outputs"][0], "Sigmoid")
        gx, gh = producer.get(split_i["inputs"][0]), producer.get(split_h["inputs"][0])
        if sig_z is None or not (gx and gh and _gemm_ok(gx, tensors) and _gemm_ok(gh, tensors)):
            continue
        if not (gx["attrs"].get("transB", 0) and gh["attrs"].get("transB", 0)):
            continue
        h_prev, n_name = gh["inputs"][0], tanh["outputs"][0]
        # h' = (h - n) * z + n
        sub = next((u for u in users.get(n_name, []) if u["op"] == "Sub" and u["inputs"] == [h_prev, n_name]), None)
        if sub is None:
            continue
        mul_z = sole(sub["outputs"][0], "Mul")
        if mul_z is None or set(mul_z["inputs"]) != {sub["outputs"][0], sig_z["outputs"][0]}:
            continue
        add_h = sole(mul_z["outputs"][0], "Add")
        if add_h is None or set(add_h["inputs"]) != {mul_z["outputs"][0], n_name}:
            continue
        Wx, Wh = tensors[gx["inputs"][1]], tensors[gh["inputs"][1]]
        if Wx.ndim != 2 or Wh.ndim != 2 or Wx.shape[0] != Wh.shape[0] or Wx.shape[0] % 3 or \
                Wh.shape[1] != Wh.shape[0] // 3 or not _even_split(split_i, tensors, width=Wx.shape[0]) or \
                not _even_split(split_h, tensors, width=Wx.shape[0]):
            continue
        H = Wh.shape[1]
        if not all(_bias_fits(tensors, g["inputs"][2] if len(g["inputs"]) > 2 else "", 3 * H) for g in (gx, gh)):
            continue
        inner = [gx, gh, split_i, split_h, add_r, sig_r, add_z, sig_z, mul, add_n, tanh, sub, mul_z, add_h]
        ids = {id(n) for n in inner}
        interm = ([gx["outputs"][0], gh["outputs"][0]] + split_i["outputs"] + split_h["outputs"]
                  + [n["outputs"][0] for n in inner[4:13]])
        if any(x in keep_names or any(id(u) not in ids for u in users.get(x, [])) for x in interm):
            continue
        key = (gx["inputs"][1], gh["inputs"][1], gx["inputs"][2] if len(gx["inputs"]) > 2 else "",
               gh["inputs"][2] if len(gh["inputs"]) > 2 else "")
        if key not in shared:
            # PyTorch r, z, n -> ONNX z, r, h
            perm = gate_permutation("GRU", H, "torch", "onnx")

            def bias(name):
                if not name:
                    return np.zeros(3 * H, np.float32)
                return np.broadcast_to(np.asarray(tensors[name], np.float32).reshape(-1), (3 * H,))[perm]
            base = _free_base(f"{prefix}fused_gru_cell", taken)
            tensors[base + ".W"] = np.asarray(Wx, np.float32)[perm][None]
            tensors[base + ".R"] = np.asarray(Wh, np.float32)[perm][None]
            tensors[base + ".B"] = np.ascontiguousarray(np.concatenate([bias(key[2]), bias(key[3])])[None])
            tensors[base + ".axis0"] = np.array([0], np.int64)
            shared[key] = base
        base = shared[key]
        tag = f"{base}.step{count}"
        count += 1
        new = [
            {"op": "Unsqueeze", "name": tag + ".x", "inputs": [gx["inputs"][0], base + ".axis0"], "outputs": [tag + ".X"], "attrs": {}},
            {"op": "Unsqueeze", "name": tag + ".h", "inputs": [h_prev, base + ".axis0"], "outputs": [tag + ".h0"], "attrs": {}},
            {"op": "GRU", "name": tag, "inputs": [tag + ".X", base + ".W", base + ".R", base + ".B", "", tag + ".h0"],
             "outputs": [tag + ".Y", tag + ".Yh"], "attrs": {"hidden_size": H, "linear_before_reset": 1, STATELESS: 1}},
            {"op": "Squeeze", "name": tag + ".hn", "inputs": [tag + ".Yh", base + ".axis0"], "outputs": [add_h["outputs"][0]], "attrs": {}},
        ]
        replace[id(add_h)] = new
        remove.update(ids - {id(add_h)})
    if not replace:
        return nodes, 0
    return _splice(nodes, replace, remove), count


# --- Keras recurrent loops (tf2onnx) -------------------------------------------------------

class _NoFuse(Exception):
    """The loop is not one this fusion can prove equal to an engine cell: left as it is."""


def _eval_nodes(nodes, env, opset, wanted=None):
    """Evaluates nodes in order with the op handlers' NumPy code; env maps name -> array.
    With ``wanted``, only the nodes those names depend on run (a missing input: _NoFuse)."""
    if wanted is not None:
        producer = {o: n for n in nodes for o in n["outputs"] if o}
        need, stack = set(), list(wanted)
        while stack:
            name = stack.pop()
            n = producer.get(name)
            if n is None or id(n) in need:
                continue
            need.add(id(n))
            stack.extend(x for x in n["inputs"] if x and x not in env)
        nodes = [n for n in nodes if id(n) in need]
    for n in nodes:
        if n["op"] not in OPS or n["op"] in RECURRENT_OPS or n["op"] in ("Loop", "If", "Scan"):
            raise _NoFuse(f"{n['op']} {n.get('name')!r} is not evaluated here")
        xs = []
        for x in n["inputs"]:
            if x and x not in env:
                raise _NoFuse(f"{x} unknown")
            xs.append(env[x] if x else None)
        check_eval(n, xs)  # rnnengine/limits.py: refused before NumPy allocates
        with np.errstate(all="ignore"):
            vals = OPS[n["op"]](n, opset).eval(xs)
        for o, v in zip(n["outputs"], vals):
            if o:
                env[o] = np.asarray(v)
    return env


SHAPE_KEEPING = ("Identity", "Cast", "Not", "Neg", "ReverseSequence")


def _shape_root(name, producer):
    """The tensor name's shape is that of the returned one (followed through ops that keep
    the shape of their first input, e.g. the ReverseSequence of a backward layer)."""
    seen = set()
    while name in producer and producer[name]["op"] in SHAPE_KEEPING and producer[name]["inputs"] and \
            name not in seen:
        seen.add(name)  # a node writing its own input (x -> x) would loop forever
        name = producer[name]["inputs"][0]
    return name


def _outer_eval(names, producer, tensors, shape_of, opset):
    """Values of outer tensors computed from constants and Shape(x) of the one tensor whose
    shape is given (shape_of = (name, shape)); anything else read: _NoFuse."""
    env, order, seen = {}, [], set()

    def visit(name):
        if name in env or name in seen or not name:
            return
        if name in tensors:
            env[name] = np.asarray(tensors[name])
            return
        n = producer.get(name)
        if n is None:
            raise _NoFuse(f"{name} is not computed from shapes")
        seen.add(name)
        if n["op"] == "Shape" and _shape_root(n["inputs"][0], producer) == _shape_root(shape_of[0], producer):
            order.append(("shape", n))
            return
        if n["op"] in ("Loop", "If", "LSTM", "GRU", "RNN") or n["op"] == "Shape":
            raise _NoFuse(f"{name} is not computed from shapes")
        for x in n["inputs"]:
            visit(x)
        order.append(("node", n))
    for name in names:
        visit(name)
    for kind, n in order:
        if kind == "shape":
            vals = OPS["Shape"](n, opset).eval([np.zeros(shape_of[1], np.float32)])
        else:
            xs = [env[x] if x else None for x in n["inputs"]]
            check_eval(n, xs)
            with np.errstate(all="ignore"):
                vals = OPS[n["op"]](n, opset).eval(xs)
        for o, v in zip(n["outputs"], vals):
            if o:
                env[o] = np.asarray(v)
    return [env[n] for n in names]


def _is_zeros(name, producer, tensors):
    """True when the tensor is all zeros whatever the input: a zero constant, Expand of one,
    or ConstantOfShape with value 0."""
    if name in tensors:
        return not np.any(np.asarray(tensors[name]))
    n = producer.get(name)
    if n is None:
        return False
    if n["op"] == "ConstantOfShape":
        v = n.get("attrs", {}).get("value")
        return v is None or not np.any(np.asarray(v))
    if n["op"] in ("Expand", "Identity", "Cast"):
        return _is_zeros(n["inputs"][0], producer, tensors)
    return False


def _ref_cell(kind, x, h, c, W, R, B, lbr, act):
    """One step of the ONNX cell (float64, default gate activations): W (G*H, I), R (G*H, H),
    B (2*G*H) in ONNX gate order. Returns (h', c')."""
    x, h = x.astype(np.float64), h.astype(np.float64)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    H = R.shape[1]
    Wb, Rb = B[:B.size // 2], B[B.size // 2:]
    if kind == "LSTM":
        g = x @ W.T + h @ R.T + Wb + Rb
        i, o, f, cc = (g[:, k * H:(k + 1) * H] for k in range(4))
        c2 = sig(f) * c + sig(i) * np.tanh(cc)
        return sig(o) * np.tanh(c2), c2
    if kind == "GRU":
        gx, gh = x @ W.T + Wb, h @ R[:2 * H].T + Rb[:2 * H]
        z, r = sig(gx[:, :H] + gh[:, :H]), sig(gx[:, H:2 * H] + gh[:, H:2 * H])
        if lbr:
            n = np.tanh(gx[:, 2 * H:] + r * (h @ R[2 * H:].T + Rb[2 * H:]))
        else:
            n = np.tanh(gx[:, 2 * H:] + (r * h) @ R[2 * H:].T + Rb[2 * H:])
        return (1 - z) * n + z * h, None
    a = {"Tanh": np.tanh, "Relu": lambda v: np.maximum(v, 0), "Sigmoid": sig}[act]
    return a(x @ W.T + h @ R.T + Wb + Rb), None


# the ops of the loop bodies tf2onnx writes for Keras LSTM / GRU / SimpleRNN layers (Keras 2
# and 3, masked or not; tests/data/corpus and tests/data/masking), and Relu for SimpleRNN(
# activation='relu'): no op that clips, selects or compares values beyond the step counter
_KERAS_BODY_OPS = frozenset({"Add", "And", "Cast", "Gather", "Identity", "Less", "MatMul", "Mul", "Not",
                             "Relu", "Sigmoid", "Slice", "Split", "Squeeze", "Sub", "Tanh", "Unsqueeze"})


_WIDENING_CASTS = (1, 6, 7, 10, 11, 16)   # to float, int32, int64, float16, double, bfloat16


def _check_monotone_condition(body, cond_out, steps, carried, const_of):
    """(carried: the loop-carried values that change; steps: the step and its counters.)
    _NoFuse unless the body's condition is an And of loop-invariant values and Less(a, b)
    with a = a step counter (`steps`) + constants >= 0 (through Identity and widening Casts) and
    b loop-invariant; and no Less, And feeds anything but the condition (a Less of the state
    would be a threshold the numeric trials cannot see)."""
    bprod = {o: n for n in body["nodes"] for o in n["outputs"] if o}
    varying, grew = set(steps) | set(carried), True
    while grew:   # values that change from step to step (to a fixed point: any node order)
        grew = False
        for n in body["nodes"]:
            if any(x in varying for x in n["inputs"] if x) and not all(o in varying for o in n["outputs"] if o):
                varying.update(o for o in n["outputs"] if o)
                grew = True
    cond_nodes = set()

    def increasing(x, depth=0):
        if depth > 64:
            return False
        if x in steps:
            return True
        n = bprod.get(x)
        if n is None:
            return False
        cond_nodes.add(id(n))
        if n["op"] == "Identity" or (n["op"] == "Cast" and n.get("attrs", {}).get("to") in _WIDENING_CASTS):
            return increasing(n["inputs"][0], depth + 1)
        if n["op"] == "Add" and len(n["inputs"]) == 2:
            for a, c in (n["inputs"], n["inputs"][::-1]):
                v = const_of(c)
                if v is not None and v.size == 1 and v.dtype.kind in "iuf" and float(v.reshape(-1)[0]) >= 0 \
                        and increasing(a, depth + 1):
                    return True
        return False

    def monotone(x, depth=0):
        if x not in varying:
            return True
        n = bprod.get(x)
        if n is None or depth > 64:
            return False
        cond_nodes.add(id(n))
        if n["op"] == "Identity":
            return monotone(n["inputs"][0], depth + 1)
        if n["op"] == "And":
            return all(monotone(y, depth + 1) for y in n["inputs"])
        if n["op"] == "Less" and len(n["inputs"]) == 2:
            return increasing(n["inputs"][0]) and n["inputs"][1] not in varying
        return False
    if not monotone(cond_out):
        raise _NoFuse("the loop condition is not a monotone test of the step")
    cond_names = {o for n in body["nodes"] if id(n) in cond_nodes for o in n["outputs"]} | {cond_out}
    for n in body["nodes"]:
        if id(n) in cond_nodes:
            continue
        if n["op"] in ("Less", "And"):
            raise _NoFuse(f"a {n['op']} outside the loop condition")
        if any(x in cond_names and bprod.get(x) is not None and bprod[x]["op"] in ("Less", "And")
               for x in n["inputs"] if x):
            raise _NoFuse("the loop condition feeds the step")


def _loop_cell(node, producer, users, tensors, keep, opset, bool_inputs=()):
    """The engine cell a Keras recurrent Loop computes, or _NoFuse. Returns the nodes that
    replace the Loop."""
    body = node["attrs"]["body"]
    bin_, bout = body["inputs"], body["outputs"]
    ins = node["inputs"] + [""] * 2
    n_car = len(node["inputs"]) - 2
    if len(bout) - 1 - n_car != 1 or n_car < 2:
        raise _NoFuse("not one scan output")
    other = sorted({n["op"] for n in body["nodes"]} - _KERAS_BODY_OPS)
    if other:
        # the numeric trials below see values of moderate size only: an op that is the
        # identity there and not beyond (a custom cell's Clip or Min of its state at 50, review)
        # must not be in a body taken for a plain cell. (Where: it selects, so a NaN computed at
        # a masked step is dropped, where the C blend multiplies, m * new + (1 - m) * old.)
        raise _NoFuse(f"{other} in the body")
    btensors = body.get("tensors", {})
    bprod = {o: n for n in body["nodes"] for o in n["outputs"] if o}

    def through(name):
        seen = set()
        while name in bprod and bprod[name]["op"] == "Identity" and bprod[name]["inputs"] and name not in seen:
            seen.add(name)  # an Identity writing its own input (x -> x) would loop forever
            name = bprod[name]["inputs"][0]
        return name
    init = node["inputs"][2:]
    carried = bin_[2:2 + n_car]
    passthrough, counters, states = {}, [], []
    for k in range(n_car):
        out = through(bout[1 + k])
        if out == carried[k]:
            passthrough[carried[k]] = init[k]
            continue
        p = bprod.get(out)
        if p is not None and p["op"] == "Add" and carried[k] in p["inputs"]:
            other = [x for x in p["inputs"] if x != carried[k]]
            one = btensors.get(other[0], tensors.get(other[0])) if len(other) == 1 else None
            if one is not None and np.asarray(one).size == 1 and np.asarray(one).item() == 1 \
                    and init[k] in tensors and np.asarray(tensors[init[k]]).item() == 0:
                counters.append(k)
                continue
        states.append(k)
    if not counters or len(states) not in (1, 2, 3):
        raise _NoFuse("no time counter or not 1-3 states")
    counter_names = {carried[k] for k in counters}
    # what the body reads from outside: constants, and Gathers along time by the counter
    local = set(bin_) | set(btensors) | set(bprod)
    scans, outer_reads = {}, set()
    for n in body["nodes"]:
        for x in n["inputs"]:
            if not x or x in local or x in tensors:
                continue
            if n["op"] == "Gather" and n["inputs"][0] == x and through(n["inputs"][1]) in counter_names \
                    and n.get("attrs", {}).get("axis", 0) == 0:
                scans[x] = n
            else:
                outer_reads.add(x)  # must be computed from shapes (the step count): checked below
    # run-time values the body reads besides the sequences: evaluated from X's shape
    shape_vals = [v for v in passthrough.values() if v not in tensors] + sorted(outer_reads)
    # zeros made from some other tensor's shape (Keras' zeros_like of the output, the masked
    # steps' output when zero_output_for_mask): (B, H) zeros in the checks below
    zero_vals = [v for v in shape_vals if _is_zeros(v, producer, tensors)]
    shape_vals = [v for v in shape_vals if v not in zero_vals]
    # weights: MatMuls of a constant with the input row or a state
    # the body's constants: its initializers, invariant inputs that are constants, and what
    # nodes compute from them alone (e.g. a kernel sliced inside the body)
    bconst = dict(btensors)
    for car, v in passthrough.items():
        if v in tensors:
            bconst[car] = np.asarray(tensors[v])
    for n in body["nodes"]:
        if n["op"] in OPS and n["op"] not in RECURRENT_OPS and n["inputs"] and \
                all(not x or x in bconst or x in tensors for x in n["inputs"]):
            xs = [None if not x else bconst.get(x, tensors.get(x)) for x in n["inputs"]]
            try:
                check_eval(n, xs)
                with np.errstate(all="ignore"):
                    vals = OPS[n["op"]](n, opset).eval(xs)
            except Exception:
                continue
            for o, v in zip(n["outputs"], vals):
                if o:
                    bconst[o] = np.asarray(v)

    def const_of(name):
        name = through(name)
        if name in bconst:
            return bconst[name]
        if name in tensors:
            return np.asarray(tensors[name])
        return None
    xs_names = {n["outputs"][0]: x for x, n in scans.items()}
    # kernels: the product of the input row (W), the other products (R: a GRU with
    # reset_after=False applies its last H columns to r * h, so its parts join in order)
    W, rec = None, []
    mm_x, mm_h = set(), set()   # outputs of the input / recurrent products
    for n in body["nodes"]:
        if n["op"] == "MatMul":
            a, w = n["inputs"]
            wv = const_of(w)
            if wv is None or wv.ndim != 2:
                raise _NoFuse("MatMul without constant weights")
            if through(a) in xs_names:
                if W is not None and W is not wv:
                    raise _NoFuse("two input kernels")
                W = wv
                mm_x.add(n["outputs"][0])
            else:
                rec.append(wv)
                mm_h.add(n["outputs"][0])
    if W is None or not rec or len({r.shape[0] for r in rec}) != 1:
        raise _NoFuse("no kernels")
    R = np.concatenate(rec, axis=1)
    # biases: added to the input product (bx), to the recurrent one (bh), or to their sum (bx)
    bx = bh = None
    for n in body["nodes"]:
        if n["op"] != "Add":
            continue
        for j, x in enumerate(n["inputs"]):
            v = const_of(x)
            if v is None or v.dtype.kind != "f" or v.size <= 1:
                continue
            other = through(n["inputs"][1 - j]) if len(n["inputs"]) == 2 else None
            if other in mm_h:
                if bh is not None:
                    raise _NoFuse("biases")
                bh = v
            else:
                if bx is not None:
                    raise _NoFuse("biases")
                bx = v
    H = R.shape[0]
    GH = R.shape[1]
    if W.shape[1] != GH or GH % H:
        raise _NoFuse("kernel shapes")
    G = GH // H
    kind = {4: "LSTM", 3: "GRU", 1: "RNN"}.get(G)
    # states: h (and c), with or without the previous output carried beside them
    n_cell = 2 if kind == "LSTM" else 1
    if kind is None or len(states) not in (n_cell, n_cell + 1):
        raise _NoFuse("cell kind")
    carries_out = len(states) == n_cell + 1
    I = W.shape[0]
    # which scan read is the input sequence, which the mask: decided by the MatMul reading it
    x_seq = [x for x in scans if scans[x]["outputs"][0] in {through(n["inputs"][0]) for n in body["nodes"]
                                                               if n["op"] == "MatMul"}]
    if len(x_seq) != 1:
        raise _NoFuse("input sequence")
    x_seq = x_seq[0]
    masks = [x for x in scans if x != x_seq]
    if len(masks) > 1:
        raise _NoFuse("more than one mask")
    mask_seq = masks[0] if masks else None
    if mask_seq is not None and not _boolean_valued(mask_seq, producer, tensors, bool_inputs):
        # the step mask keeps or updates whole rows: a mask of other values (a float graph
        # input, say) blends them, which only the Loop itself computes
        raise _NoFuse("a mask not proven to hold only 0 and 1")
    # every state starts from zeros (so the repeated output equals the kept state)
    for k in states:
        if not _is_zeros(init[k], producer, tensors):
            raise _NoFuse("a state does not start from zeros")
    # the step's results may depend on the step number and on the sequence length (values
    # from the shapes) only through the Gathers that read step i of a sequence: an engine cell
    # computes every step alike. (The numeric trials below run a few steps of short sequences;
    # a body that resets its state from step 5 on, or scales it by T < 7, passed them.)
    tainted = {bin_[0], bin_[1]} | {carried[k] for k in counters} | \
        {car for car, v in passthrough.items() if v not in tensors and v not in zero_vals} | \
        {x for x in outer_reads if x not in zero_vals}
    gathers = {n["outputs"][0] for n in scans.values()}
    for n in body["nodes"]:
        if any(o in gathers for o in n["outputs"]):
            continue
        if any(x in tainted for x in n["inputs"] if x):
            tainted.update(o for o in n["outputs"] if o)
    for k in list(states) + [n_car]:
        if through(bout[1 + k]) in tainted:
            raise _NoFuse("the step's result depends on the step number or the sequence length")
    def body_env(i, vals):
        env = {bin_[0]: np.array(i, np.int64), bin_[1]: np.array(True)}
        env.update(btensors)
        for car, v in passthrough.items():
            env[car] = zero_state if v in zero_vals else np.asarray(tensors[v]) if v in tensors else vals[v]
        for x in outer_reads:
            env[x] = zero_state if x in zero_vals else vals[x]
        for k in counters:
            env[carried[k]] = np.asarray(i, np.asarray(tensors[init[k]]).dtype)
        return env

    # the loop runs exactly T = X_seq.shape[0] times: trip count and condition evaluated
    # from the shapes for several T
    cond_in = ins[1]
    cond_out = bout[0]
    # The condition the body computes must be monotone in the step i: an And of loop-invariant
    # booleans and Less(a, b), a the step (or the counter) plus a constant >= 0 through widening
    # Casts, b loop-invariant. It is then true up to some step and false from it on, so the
    # loop runs exactly T times iff it is true at step T - 2 and false at T - 1 (or the trip
    # count, at least T - 1 steps true, is T). Checked at T from 1 to 2**20; sampling the
    # steps without the structure missed a cap at 299 (review: And(cond, i < 299)).
    _check_monotone_condition(body, cond_out, {bin_[0]} | counter_names, set(carried) - set(passthrough), const_of)
    for T, B in ((1, 1), (2, 3), (3, 2), (6, 3), (17, 2), (257, 1), (1 << 20, 1)):
        zero_state = None
        outer = ([ins[0]] if ins[0] else []) + ([cond_in] if cond_in else []) + shape_vals
        vals = dict(zip(outer, _outer_eval(outer, producer, tensors, (x_seq, (T, B, I)), opset)))
        trips = int(np.asarray(vals[ins[0]]).reshape(-1)[0]) if ins[0] else None
        if cond_in and not bool(np.asarray(vals[cond_in]).reshape(-1)[0]):
            raise _NoFuse(f"the loop does not run T = {T} times")   # no step at all

        def cond_at(i):
            env = _eval_nodes(body["nodes"], body_env(i, vals), opset, wanted=[cond_out])
            return bool(np.asarray(env[cond_out]).reshape(-1)[0])
        if T >= 2 and not cond_at(T - 2):
            raise _NoFuse(f"the loop does not run T = {T} times")   # stops before step T - 1
        if trips is not None and trips < T or (trips != T and cond_at(T - 1)):
            raise _NoFuse(f"the loop does not run T = {T} times")   # fewer, or more than T
    # hypotheses of the engine cell, checked numerically against the body itself
    def vec(b):
        return np.zeros(GH) if b is None else np.asarray(b, np.float64).reshape(-1)
    if bx is not None and bx.size == 2 * GH and bh is None:   # one (2, G*H) bias: input, recurrent
        bx, bh = bx.reshape(-1)[:GH], bx.reshape(-1)[GH:]
    if vec(bx).size != GH or vec(bh).size != GH:
        raise _NoFuse("bias shapes")
    bias = np.concatenate([vec(bx), vec(bh)])
    hyps = []
    if kind == "LSTM":   # Keras gates i, f, c, o -> ONNX i, o, f, c
        perm = np.concatenate([np.arange(0, H), np.arange(3 * H, 4 * H), np.arange(H, 2 * H), np.arange(2 * H, 3 * H)])
        hyps.append(({"hidden_size": H}, W.T[perm], R.T[perm], np.concatenate([bias[:GH][perm], bias[GH:][perm]]),
                     0, None))
    elif kind == "GRU":   # Keras GRU gates z, r, h = ONNX's order
        for lbr in (1, 0):
            hyps.append(({"hidden_size": H, "linear_before_reset": lbr}, W.T, R.T, bias, lbr, None))
    else:
        for act in ("Tanh", "Relu", "Sigmoid"):
            hyps.append(({"hidden_size": H, "activations": [act]}, W.T, R.T, bias, 0, act))
    import itertools
    # roles: (out, h[, c]) -> index in states; out None when the output is not carried
    if carries_out:
        roles = list(itertools.permutations(range(len(states))))
    else:
        roles = [(None,) + r for r in itertools.permutations(range(len(states)))]
    modes = [1, 2] if mask_seq else [0]   # masked output: 1 the kept state, 2 zeros
    rng = np.random.default_rng(0)
    trials = []
    for trial in range(8):
        T, B = 4, 5
        # small and large inputs and states: an extra op that is the identity on small values
        # (a Clip of the cell state) must show
        scale = (1.0, 8.0, 0.1, 30.0)[trial % 4]
        xv = (rng.standard_normal((T, B, I)) * scale).astype(np.float32)
        mv = rng.random((T, B, 1)) < 0.5 if mask_seq else None
        sv = [rng.uniform(-scale, scale, (B, H)).astype(np.float32) for _ in states]
        i = trial % T
        zero_state = np.zeros((B, H), np.float32)
        vals = dict(zip(shape_vals, _outer_eval(shape_vals, producer, tensors, (x_seq, (T, B, I)), opset)))
        env = body_env(i, vals)
        for k, v in zip(states, sv):
            env[carried[k]] = v
        env[x_seq] = xv
        if mask_seq:
            env[mask_seq] = mv
        try:
            env = _eval_nodes(body["nodes"], env, opset)
        except _NoFuse:
            raise
        except Exception as e:  # a handler refusing these values: not a body we can prove
            raise _NoFuse(f"body evaluation: {e}") from None
        got = [env[bout[1 + k]] for k in states] + [env[bout[1 + n_car]]]
        trials.append((xv[i], None if mv is None else mv[i].astype(np.float64), sv, got))
    chosen = None
    for (attrs, Wo, Ro, Bo, lbr, act), role, mode in itertools.product(hyps, roles, modes):
        if mode == 1 and role[0] is None:
            continue   # a repeated output is carried by the loop
        if True:
            ok = True
            for x, m, sv, got in trials:
                out0, h0 = (None if role[0] is None else sv[role[0]]), sv[role[1]]
                c0 = sv[role[2]] if kind == "LSTM" else None
                hraw, cn = _ref_cell(kind, x, h0, None if c0 is None else c0.astype(np.float64), Wo, Ro, Bo, lbr, act)
                if m is not None:
                    hn = m * hraw + (1 - m) * h0
                    cn = None if cn is None else m * cn + (1 - m) * c0
                    # the body blends its own previous output (mode 1) or zeros (mode 2)
                    outn = m * hraw + (1 - m) * (out0 if mode == 1 else 0.0)
                else:
                    hn = outn = hraw
                want = [None] * len(states)
                if role[0] is not None:
                    want[role[0]] = outn   # carried as it is written (mode 2: not h)
                want[role[1]] = hn
                if kind == "LSTM":
                    want[role[2]] = cn
                for g, w in zip(got[:-1] + [got[-1]], want + [outn]):
                    if g.shape != w.shape or not np.allclose(g, w, rtol=1e-4, atol=1e-5):
                        ok = False
                        break
                if not ok:
                    break
            if ok:
                chosen = (attrs, Wo, Ro, Bo, role, mode)
                break
    if chosen is None:
        raise _NoFuse("no engine cell computes this body")
    zeros = [init[k] for k in states] + zero_vals
    return kind, chosen, x_seq, mask_seq, states, counters, passthrough, zeros


# sizes given to the symbolic dimensions of the graph inputs when the shapes of a loop's
# outer values are computed (distinct sizes within a trial, so B and T never match; batch
# and time 1 and 2 in the last two, where shape arithmetic could special-case them)
_TRIAL_SIZES = ((3, 5, 7, 11, 13, 17, 19), (4, 6, 8, 10, 12, 14, 16), (1, 2, 3, 4, 5, 6, 7),
                (2, 1, 3, 4, 5, 6, 7))
_TRIAL_MAX_ELEMENTS = 1 << 22   # all trial inputs together (their declared fixed dims count)


def _trial_inputs(inputs, sizes):
    """Zero arrays of the graph inputs' declared shapes, symbolic dimensions given `sizes`
    (the same name the same size); None when an input's rank is unknown."""
    named, env, total = {}, {}, 0
    for spec in inputs:
        if spec.get("shape") is None or spec.get("dtype") not in NP_DTYPES:
            return None
        shape = []
        for j, d in enumerate(spec["shape"]):
            if isinstance(d, int) and d >= 0:
                shape.append(d)
                continue
            key = d if isinstance(d, str) and d else (spec["name"], j)
            if key not in named:
                k = len(named)
                named[key] = sizes[k] if k < len(sizes) else sizes[-1] + 2 * (k - len(sizes) + 1)
            shape.append(named[key])
        total += math.prod(max(d, 1) for d in shape)   # (0, 2**63 - 1) counts too
        if total > _TRIAL_MAX_ELEMENTS:
            return None   # inputs declared this large: no trial, the loop stays a Loop
        env[spec["name"]] = np.zeros(shape, NP_DTYPES[spec["dtype"]])
    return env


def _check_outer_shapes(nodes, trial_envs, opset, x_seq, zeros, I, H, shape_dep):
    """The fused cell takes every state as (B, H) zeros, where X is (T, B, I). Proven here
    for the tensors the loop starts from (Keras' zeros and zeros_like(output), computed from the
    inputs' shapes: a peeled step, an Expand of the batch size) by computing them on zero inputs
    of several sets of sizes, where their shapes depend on the inputs' shapes only (shape_dep,
    _taint): any other shape (a (2, B, H) state makes onnxruntime's body compute
    (2, B, H) steps), or a chain that cannot be computed (an invalid MatMul inside it, which
    onnxruntime refuses), keeps the Loop (fuzz, eleventh session: a zeros_like chain whose
    MatMul had its inputs swapped was dropped with the loop, and the invalid model answered)."""
    if not trial_envs:
        raise _NoFuse("no trial inputs")
    for env in trial_envs:
        if env is None:
            raise _NoFuse("a graph input of unknown rank")
        wanted = [x_seq] + zeros
        try:
            _eval_nodes(nodes, env, opset, wanted=wanted)   # (a fused loop's outputs are in env)
        except _NoFuse:
            raise
        except Exception as e:  # noqa: BLE001 - a chain onnxruntime would refuse too
            raise _NoFuse(f"the outer values do not compute: {e}") from None
        xs = env[x_seq].shape
        if len(xs) != 3 or xs[2] != I:
            raise _NoFuse(f"X is {xs}, not (T, B, {I})")
        for z in zeros:
            if z in shape_dep:
                # (B + max(ids), H) zeros are (B, H) on the trial's zero inputs only
                raise _NoFuse(f"the shape of the zeros {z!r} depends on the values fed")
            if env[z].shape != (xs[1], H):
                raise _NoFuse(f"a state starts from {env[z].shape} zeros, not (B, H) = {(xs[1], H)}")


# ops whose output shape follows from their inputs' shapes and attributes alone, and, for
# the rest that the converter reads, the inputs whose values decide the output shape; any
# other op: every input (Loop, If, NonZero-like and sequence ops)
_SHAPE_FREE = frozenset({
    "Abs", "Add", "And", "ArgMax", "ArgMin", "Cast", "Ceil", "Clip", "Concat", "Conv", "CumSum", "Div",
    "Dropout", "Elu", "Equal", "Exp", "Flatten", "Floor", "Gather", "Gemm", "Greater", "GreaterOrEqual",
    "HardSigmoid", "Identity", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "MatMul", "Max",
    "Min", "Mod", "Mul", "Neg", "Not", "Or", "Pow", "Reciprocal", "Relu", "ReverseSequence", "Scatter",
    "ScatterElements", "Shape", "Sigmoid", "Size", "Softmax", "Softplus", "Softsign", "Sqrt", "Sub", "Tanh",
    "ThresholdedRelu", "Transpose", "Where", "Xor"})
_SHAPE_INPUTS_FROM = {"ConstantOfShape": 0, "Reshape": 1, "Expand": 1, "Tile": 1, "Slice": 1, "Pad": 1,
                      "Squeeze": 1, "Unsqueeze": 1, "Split": 1, "TopK": 1, "ReduceMax": 1, "ReduceMean": 1,
                      "ReduceMin": 1, "ReduceProd": 1, "ReduceSum": 1}


def _taint(node, value_dep, shape_dep):
    """Marks node's outputs in value_dep (their values may depend on the values fed to the
    graph) and shape_dep (their shapes may): Shape and Size give values from shapes only,
    ConstantOfShape a value from its attribute."""
    ins = node["inputs"]
    op = node["op"]
    if op in _SHAPE_FREE:
        sizing = []
    elif op in _SHAPE_INPUTS_FROM:
        sizing = ins[_SHAPE_INPUTS_FROM[op]:]
    else:
        sizing = ins
    shaped = any(x in shape_dep for x in ins if x) or any(x in value_dep for x in sizing if x)
    if op in ("Shape", "Size"):
        valued = bool(ins) and ins[0] in shape_dep
    elif op == "ConstantOfShape":
        valued = False
    else:
        valued = any(x in value_dep for x in ins if x) or op in ("Loop", "If", "Scan")
    for o in node["outputs"]:
        if o:
            (value_dep.add if valued else value_dep.discard)(o)
            (shape_dep.add if shaped else shape_dep.discard)(o)


BOOLEAN_OPS = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor",
               "IsNaN", "IsInf"}


def _boolean_valued(name, producer, tensors, bool_inputs, depth=0):
    """True when tensor `name` can only hold 0 and 1: a bool graph input, a constant of 0s and
    1s, made by a comparison or logic op, a Cast of such a value, or data movement of one."""
    if name in bool_inputs:
        return True
    if name in tensors:
        v = np.asarray(tensors[name])
        return v.dtype == np.bool_ or bool(np.isin(v, (0, 1)).all())
    node = producer.get(name)
    if node is None or depth > 32:
        return False
    op = node["op"]
    if op in BOOLEAN_OPS:
        return True
    if op == "Cast" and node.get("attrs", {}).get("to") == 9:  # to bool
        return True
    if op in ("Cast", "Transpose", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Expand", "Flatten",
              "ReverseSequence", "Slice", "Gather"):  # data movement: the values stay those of input 0
        return _boolean_valued(node["inputs"][0], producer, tensors, bool_inputs, depth + 1)
    return False


def fuse_keras_loops(nodes, tensors, outputs, opset, bool_inputs=(), inputs=None):
    """Maps the Loops tf2onnx writes for Keras LSTM / GRU / SimpleRNN layers (masked by
    Embedding(mask_zero=True) or Masking, or not masked) to one engine cell each.

    The body of such a loop reads row t of the input sequence X (T, B, I) and of the mask
    (T, B, 1) by a time counter, computes the cell op by op, and blends every state and its
    output with the mask: new * m + old * (1 - m), the output starting from zeros. When every
    state starts from zeros, the repeated output equals the kept state, so the loop is an ONNX
    cell whose rows skip masked steps: the C sequence driver's step mask (rnnengine.h; mode 2
    when masked steps output zeros instead, as in Bidirectional). A backward layer's loop
    reads reversed sequences (ReverseSequence before and after it) and maps the same way. The
    rewrite fires only when it is proven: the trip count and condition give exactly T steps
    (evaluated from shapes for several T), the states start from zeros, and the body, run on
    random data, gives what the engine cell gives for one hypothesis of cell kind, gate order,
    roles of the carried values and bias layout, and the states start from (B, H) zeros,
    computed from zero inputs (`inputs`: the graph inputs as the converter lists them) of
    several sets of sizes, from the inputs' shapes only. Anything else is left to run as a
    Loop."""
    producer, users = _index(nodes)
    # outer values computed on trial inputs, shared by the loops (a fused loop's outputs are
    # set to zeros of its output shapes, for the layer stacked on it)
    trial_envs = []
    for sizes in _TRIAL_SIZES if any(n["op"] == "Loop" for n in nodes) else ():
        env = _trial_inputs(inputs or [], sizes) if inputs is not None else None
        if env is not None:
            env.update((k, np.asarray(v)) for k, v in tensors.items())
        trial_envs.append(env)
    keep = set(outputs)
    out, count = [], 0
    value_dep, shape_dep = {i["name"] for i in inputs or []}, set()   # _taint, in node order
    taken = None
    for node in nodes:
        if node["op"] != "Loop":
            out.append(node)
            _taint(node, value_dep, shape_dep)
            continue
        _taint(node, value_dep, shape_dep)   # (refined below when the loop is fused)
        try:
            kind, (attrs, Wo, Ro, Bo, role, mode), x_seq, mask_seq, states, counters, passthrough, zeros = \
                _loop_cell(node, producer, users, tensors, keep, opset, set(bool_inputs))
            H = Ro.shape[-1]
            _check_outer_shapes(nodes, trial_envs, opset, x_seq, zeros, Wo.shape[-1], H, shape_dep)
        except Exception:  # noqa: BLE001 - _NoFuse, or a loop of a shape this matcher never met:
            out.append(node)  # either way it stays a Loop, which runs exactly (only slower)
            continue
        n_car = len(node["inputs"]) - 2
        louts = node["outputs"] + [""] * (n_car + 1 - len(node["outputs"]))
        finals = {role[1]}
        if role[0] is not None and mode != 2:
            finals.add(role[0])
        if kind == "LSTM":
            finals.add(role[2])
        used = [o for k, o in enumerate(louts[:n_car]) if o and (o in keep or users.get(o))
                and (k not in states or states.index(k) not in finals)]
        if used:
            out.append(node)  # a counter or an invariant is read after the loop: keep it
            continue
        if taken is None:
            taken = _names_in_use(nodes, tensors, outputs)
        base = _free_base(f"fused_keras_{kind.lower()}", taken)
        count += 1
        tensors[base + ".W"] = np.ascontiguousarray(Wo[None], np.float32)
        tensors[base + ".R"] = np.ascontiguousarray(Ro[None], np.float32)
        tensors[base + ".B"] = np.ascontiguousarray(Bo[None], np.float32)
        tensors[base + ".axis0"] = np.array([0], np.int64)
        tensors[base + ".axis1"] = np.array([1], np.int64)
        a = dict(attrs)
        a[KERAS_LOOP] = 1
        rec_ins = [x_seq, base + ".W", base + ".R", base + ".B", "", "", "", ""]
        if mask_seq:
            a[STEP_MASK] = mode
            rec_ins.append(mask_seq)
        name = node.get("name") or base
        rec_outs = [base + ".Y", base + ".Yh"] + ([base + ".Yc"] if kind == "LSTM" else [])
        new = [{"op": kind, "name": name, "inputs": rec_ins, "outputs": rec_outs, "attrs": a}]
        scan = louts[n_car]
        if scan:
            new.append({"op": "Squeeze", "name": name + "/Y", "inputs": [base + ".Y", base + ".axis1"],
                        "outputs": [scan], "attrs": {}})
        # final values: the output and h are both Y_h (equal, as shown above); c is Y_c
        finals = {role[1]: base + ".Yh"}
        if role[0] is not None and mode != 2:
            finals[role[0]] = base + ".Yh"
        if kind == "LSTM":
            finals[role[2]] = base + ".Yc"
        for j, k in enumerate(states):
            o = louts[k]
            if o and j in finals:
                new.append({"op": "Squeeze", "name": f"{name}/state{j}", "inputs": [finals[j], base + ".axis0"],
                            "outputs": [o], "attrs": {}})
        out.extend(new)
        for o in louts:   # the fused cell's output shapes follow X's
            if o:
                (shape_dep.add if x_seq in shape_dep else shape_dep.discard)(o)
        for env in trial_envs:   # zeros of the fused cell's output shapes, for a layer stacked on it
            T, B = env[x_seq].shape[:2]
            if scan:
                env[scan] = np.zeros((T, B, H), np.float32)
            for j, k in enumerate(states):
                if louts[k] and j in finals:
                    env[louts[k]] = np.zeros((B, H), np.float32)
    return out, count
