"""A layer-stack model (rnnengine.Model built from LSTM/GRU/RNN layers) as an ONNX graph of
standard operators, so that it can be converted, saved to a weight file and checked with
onnxruntime like any other model:

    X (T, B, I)  [batch_first: X (B, T, I) -> Transpose -> (T, B, I)]
      -> per layer: LSTM/GRU/RNN (the layer's weights and attributes as they are, ONNX order)
                    -> Transpose (T, D, B, H) -> (T, B, D, H) -> Reshape (T, B, D*H)
      -> Y (T, B, D*H)  [batch_first: -> Transpose -> (B, T, D*H)]

(Layers run in layout 0 with a Transpose around the graph for batch_first, rather than with
layout=1, which onnxruntime's CPU kernels refuse: the graph stays checkable by onnxruntime.)
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rnnengine.errors import ConversionError
from rnnengine.runtime.layers import ACTIVATIONS, layer_key

_ACTIVATION_NAMES = {spec[0]: name for name, spec in ACTIVATIONS.items()}  # C code -> ONNX name


def layers_to_onnx(model: Any, opset: int = 14) -> onnx.ModelProto:
    """The ONNX graph of a layer-stack model. Refuses (ConversionError) what ONNX cannot
    express: an LSTM output projection (PyTorch's proj_size) and a model-defined initial
    state (the graph would carry it as constants the stream never resets to)."""
    layers = model.layers
    for k, layer in enumerate(layers):
        if layer.proj_size:
            raise ConversionError(f"layer {k} ({layer!r}) has an output projection (proj_size), which no ONNX "
                                  "operator expresses, so it cannot be written as ONNX or saved to a weight file")
    if getattr(model, "_default", None) is not None:
        raise ConversionError("this model has an initial_state; ONNX and weight files carry none for a layer "
                              "stack: pass the state to run()/stream() instead")
    layout = 1 if model.batch_first else 0
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name
    dims: list[Any] = ["batch", "T"] if layout else ["T", "batch"]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, dims + [model.input_size])]
    # the merged feature size is written out (not -1), so a sequence of 0 steps reshapes too
    x = "X"
    if layout:
        nodes.append(helper.make_node("Transpose", ["X"], ["X.t"], perm=[1, 0, 2], name="batch_first.in"))
        x = "X.t"
    for k, layer in enumerate(layers):
        p = layer_key(k)
        ins = [x, const(f"{p}.W", layer.W), const(f"{p}.R", layer.R),
               const(f"{p}.B", layer.B) if layer.B is not None else ""]
        if layer.P is not None:
            ins += ["", "", "", const(f"{p}.P", layer.P)]
        attrs: dict[str, Any] = {"hidden_size": layer.hidden_size, "direction": layer.direction}
        if layer.activations is not None:  # written out in full: every function, alpha and beta
            names, alphas, betas = [], [], []
            for acts in layer._acts:
                for code, a, b in acts[:layer.n_activations]:
                    name = _ACTIVATION_NAMES[code]
                    _, has_a, has_b, _, _ = ACTIVATIONS[name]
                    names.append(name)
                    alphas += [a] if has_a else []
                    betas += [b] if has_b else []
            attrs["activations"] = names
            if alphas:
                attrs["activation_alpha"] = alphas
            if betas:
                attrs["activation_beta"] = betas
        if layer.clip is not None:
            attrs["clip"] = float(layer.clip)
        if layer.kind == "LSTM" and layer.input_forget:
            attrs["input_forget"] = 1
        if layer.kind == "GRU":
            attrs["linear_before_reset"] = layer.linear_before_reset
        # the output is named like the layer (layer_key): the saved graph's stream state keeps the keys
        nodes.append(helper.make_node(layer.kind, ins, [p], name=p, **attrs))
        # (T, D, B, H) -> (T, B, D, H) -> (T, B, D*H)
        nodes.append(helper.make_node("Transpose", [p], [f"{p}.yt"], perm=[0, 2, 1, 3], name=f"{p}.t"))
        out = "Y" if k == len(layers) - 1 and not layout else f"{p}.out"
        merged = const(f"{p}.merge", np.array([0, 0, layer.output_size], np.int64))
        nodes.append(helper.make_node("Reshape", [f"{p}.yt", merged], [out], name=f"{p}.r"))
        x = out
    if layout:
        nodes.append(helper.make_node("Transpose", [x], ["Y"], perm=[1, 0, 2], name="batch_first.out"))
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, dims + [model.output_size])]
    graph = helper.make_graph(nodes, "rnnengine_layers", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="rnnengine")
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return proto
