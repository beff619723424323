"""Writes rnnengine/data/demo_lstm.onnx, the small model `rnnengine demo` streams.

A 2-layer LSTM (input 16, hidden 32) with seeded random weights, whose recurrent state is
an explicit graph input and output (h0/c0 per layer -> hN/cN), as streaming models carry
it, so onnxruntime can be stepped too. Run: python tools/make_demo_model.py
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

I, H, LAYERS, SEED = 16, 32, 2, 1234
OUT = os.path.join(os.path.dirname(__file__), "..", "rnnengine", "data", "demo_lstm.onnx")


def build():
    rng = np.random.default_rng(SEED)
    scale = 1.0 / np.sqrt(H)
    inits, nodes, inputs, outputs = [], [], [], []
    inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 1, I]))
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    x = "x"
    for k in range(LAYERS):
        n_in = I if k == 0 else H
        for nm, shape in (("W", (1, 4 * H, n_in)), ("R", (1, 4 * H, H)), ("B", (1, 8 * H))):
            w = rng.uniform(-scale, scale, shape).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"{nm}{k}"))
        for s in ("h", "c"):
            inputs.append(helper.make_tensor_value_info(f"{s}0_{k}", TensorProto.FLOAT, [1, 1, H]))
            outputs.append(helper.make_tensor_value_info(f"{s}N_{k}", TensorProto.FLOAT, [1, 1, H]))
        nodes.append(helper.make_node(
            "LSTM", [x, f"W{k}", f"R{k}", f"B{k}", "", f"h0_{k}", f"c0_{k}"],
            [f"Y{k}", f"hN_{k}", f"cN_{k}"], name=f"lstm{k}", hidden_size=H))
        nodes.append(helper.make_node("Squeeze", [f"Y{k}", "axis1"], [f"y{k}"], name=f"squeeze{k}"))
        x = f"y{k}"
    outputs.insert(0, helper.make_tensor_value_info(x, TensorProto.FLOAT, ["T", 1, H]))
    graph = helper.make_graph(nodes, "demo_lstm", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)],
                              producer_name="rnnengine/tools/make_demo_model.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


if __name__ == "__main__":
    onnx.save(build(), OUT)
    print(f"wrote {os.path.normpath(OUT)}")
