"""fuse.py - recognise recurrent cells written out op by op and map them to engine cells
(LSTMCell steps here; GRUCell steps in fuse_gru_cells below).

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


def fuse_lstm_cells(nodes, tensors, outputs, prefix=""):
    """Returns nodes with every recognised LSTMCell step replaced by an LSTM node (new names
    start with ``prefix``, which keeps the cells of different If branches apart)."""
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
            base = f"{prefix}fused_lstm_cell{len(shared)}"
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
                and split_i["outputs"][2] == i_n and split_h["outputs"][2] == h_n):
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
                Wh.shape[1] != Wh.shape[0] // 3:
            continue
        H = Wh.shape[1]
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
            perm = np.concatenate([np.arange(H, 2 * H), np.arange(0, H), np.arange(2 * H, 3 * H)])

            def bias(name):
                if not name:
                    return np.zeros(3 * H, np.float32)
                return np.broadcast_to(np.asarray(tensors[name], np.float32).reshape(-1), (3 * H,))[perm]
            base = f"{prefix}fused_gru_cell{len(shared)}"
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
    out = []
    for n in nodes:
        if id(n) in replace:
            out.extend(replace[id(n)])
        elif id(n) not in remove:
            out.append(n)
    return out, count
