"""export.py - a trained rnnengine.train.Network as an ONNX model of standard operators.

    tokens (T, B) int64 -> Gather(embedding)          (or X (T, B, I) float)
      -> per layer: LSTM/GRU/RNN (ONNX gate order, the weights as initializers)
                    -> Transpose (T, D, B, H) -> (T, B, D, H) -> Reshape (T, B, D*H)
      -> MatMul(head.W^T) + Add(head.b) -> logits (T, B, O)

With state_io, layer l's initial state is an input h0_l (and c0_l) of shape (D, B, H) and its
final state an output hN_l (and cN_l), so onnxruntime can be stepped with the state passed
around and rnnengine's converter pairs them for streams.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rnnengine.codes import SLOT_P


def network_to_onnx(net, state_io=False, opset=14):
    c = net.config
    kind, H, D, L = net.kind, net.H, net.D, net.L
    inits, nodes, inputs, outputs = [], [], [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name
    if c["embedding"]:
        inputs.append(helper.make_tensor_value_info("tokens", TensorProto.INT64, ["T", "B"]))
        nodes.append(helper.make_node("Gather", [const("embedding", net.tensor("embedding")), "tokens"], ["x0"],
                                      axis=0, name="embedding"))
    else:
        inputs.append(helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "B", c["input_size"]]))
        nodes.append(helper.make_node("Identity", ["X"], ["x0"], name="input"))
    const("perm_shape", np.array([0, 0, -1], np.int64))
    x = "x0"
    for l in range(L):
        ins = [x, const(f"layer{l}.W", net.tensor(f"layer{l}.W")), const(f"layer{l}.R", net.tensor(f"layer{l}.R")),
               const(f"layer{l}.B", net.tensor(f"layer{l}.B")), ""]
        if state_io:
            ins.append(f"h0_{l}")
            inputs.append(helper.make_tensor_value_info(f"h0_{l}", TensorProto.FLOAT, [D, "B", H]))
            if kind == "LSTM":
                ins.append(f"c0_{l}")
                inputs.append(helper.make_tensor_value_info(f"c0_{l}", TensorProto.FLOAT, [D, "B", H]))
        if c["peepholes"]:
            while len(ins) < SLOT_P:  # P is the 8th input
                ins.append("")
            ins.append(const(f"layer{l}.P", net.tensor(f"layer{l}.P")))
        outs = [f"y{l}", f"hN_{l}"] + ([f"cN_{l}"] if kind == "LSTM" else [])
        attrs = {"hidden_size": H, "direction": "bidirectional" if D == 2 else "forward"}
        if c["clip"] is not None:
            attrs["clip"] = c["clip"]
        if kind == "GRU":
            attrs["linear_before_reset"] = c["linear_before_reset"]
        if kind == "RNN":
            attrs["activations"] = ["Relu" if c["relu"] else "Tanh"] * D
        nodes.append(helper.make_node(kind, ins, outs, name=f"layer{l}", **attrs))
        nodes.append(helper.make_node("Transpose", [f"y{l}"], [f"yt{l}"], perm=[0, 2, 1, 3], name=f"layer{l}.t"))
        nodes.append(helper.make_node("Reshape", [f"yt{l}", "perm_shape"], [f"x{l + 1}"], name=f"layer{l}.r"))
        x = f"x{l + 1}"
        if state_io:
            outputs += [helper.make_tensor_value_info(o, TensorProto.FLOAT, [D, "B", H]) for o in outs[1:]]
    nodes.append(helper.make_node("MatMul", [x, const("head.WT", net.tensor("head.W").T)], ["z"], name="head"))
    nodes.append(helper.make_node("Add", ["z", const("head.b", net.tensor("head.b"))], ["logits"], name="head.b"))
    outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["T", "B", c["output_size"]]))
    graph = helper.make_graph(nodes, "rnnengine_network", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="rnnengine")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
