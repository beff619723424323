"""Oracles for the numeric tests: onnxruntime on one-node ONNX models, and an independent
NumPy reference of the ONNX LSTM/GRU/RNN equations (for cases onnxruntime refuses)."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

# Tolerances per dtype, in one place (max abs error against the oracle).
TOLERANCE = {np.float32: 1e-5}


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
