"""fuse.py - recognise recurrent cells written out op by op and map them to engine cells.

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

import numpy as np

STATELESS = "rnnengine_stateless"  # converter-made cells start from their given state every call


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
            and (len(n["inputs"]) < 3 or not n["inputs"][2] or n["inputs"][2] in tensors))


def fuse_lstm_cells(nodes, tensors, outputs):
    """Returns nodes with every recognised LSTMCell step replaced by an LSTM node."""
    producer, users = _index(nodes)
    keep_names = set(outputs)
    replace = {}   # id(node) -> list of nodes to put in its place (at the position of the last op)
    remove = set()
    shared = {}
    count = 0

    def only_users(name, allowed):
        us = users.get(name, [])
        return name not in keep_names and all(id(u) in allowed for u in us)

    for split in nodes:
        if split["op"] != "Split" or len(split["outputs"]) != 4:
            continue
        add = producer.get(split["inputs"][0])
        if add is None or add["op"] != "Add" or split.get("attrs", {}).get("axis", 0) not in (1, -1):
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
        if not (g1["attrs"].get("transB", 0) and g2["attrs"].get("transB", 0)):
            continue
        gx, gh = (g2, g1) if W1.shape[1] == H else (g1, g2)
        if tensors[gh["inputs"][1]].shape[1] != H:
            continue
        inner = [add, g1, g2, split] + acts + [m_f, m_i, add_c, tanh_c[0], m_h]
        ids = {id(n) for n in inner}
        interm = [g1["outputs"][0], g2["outputs"][0], add["outputs"][0]] + split["outputs"] + [ai, af, ag, ao] \
            + [m_f["outputs"][0], m_i["outputs"][0], tanh_c[0]["outputs"][0]]
        if not all(only_users(x, ids) for x in interm):
            continue
        # the weights in ONNX order (i, o, f, c) from PyTorch's (i, f, g, o), made once per weight set
        key = (gx["inputs"][1], gh["inputs"][1], gx["inputs"][2] if len(gx["inputs"]) > 2 else "",
               gh["inputs"][2] if len(gh["inputs"]) > 2 else "")
        if key not in shared:
            perm = np.concatenate([np.arange(0, H), np.arange(3 * H, 4 * H), np.arange(H, 2 * H),
                                   np.arange(2 * H, 3 * H)])
            Wx = np.asarray(tensors[key[0]], np.float32)[perm][None]
            Rh = np.asarray(tensors[key[1]], np.float32)[perm][None]

            def bias(name):
                if not name:
                    return np.zeros(4 * H, np.float32)
                return np.broadcast_to(np.asarray(tensors[name], np.float32).reshape(-1), (4 * H,))[perm]
            Bb = np.concatenate([bias(key[2]), bias(key[3])])[None]
            base = f"fused_lstm_cell{len(shared)}"
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
    out = []
    for n in nodes:
        if id(n) in replace:
            out.extend(replace[id(n)])
        elif id(n) not in remove:
            out.append(n)
    return out, count
