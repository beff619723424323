"""Load an ONNX graph that is one LSTM/GRU/RNN node or a plain stack of them.

Between two recurrent nodes only layout glue is accepted (Squeeze, Unsqueeze, Transpose,
Reshape, Identity), and only when it turns the ONNX Y (T, D, B, H) into the next node's
X (T, B, D*H) (layout 1: (B, T, D, H) -> (B, T, D*H)). That is checked by running the
glue on a probe array, not guessed from op names. Anything else raises, naming the node.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import numpy_helper

from rnnengine.runtime.layers import GRU, LSTM, RNN, layer_from_onnx
from rnnengine.runtime.model import Model
from rnnengine.frontend.opsets import MIN_OPSET, OpsetError, check_node, max_opset
from rnnengine.errors import OnnxImportError
from rnnengine.ops.codes import RECURRENT_INPUTS, RECURRENT_N_INPUTS, recurrent_attrs

RECURRENT = {"LSTM": LSTM, "GRU": GRU, "RNN": RNN}
GLUE = ("Squeeze", "Unsqueeze", "Transpose", "Reshape", "Identity")


def _where(node):
    return f"{node.op_type} node {node.name or '(unnamed)'!r}"


def _opset(model):
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise OnnxImportError("the model imports no default-domain ONNX opset")


class _Graph:
    def __init__(self, model):
        self.opset = _opset(model)
        if not MIN_OPSET <= self.opset <= max_opset():
            raise OnnxImportError(f"opset {self.opset} is not supported (supported: {MIN_OPSET} to {max_opset()})")
        g = model.graph
        self.consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.inputs = {i.name: i for i in g.input if i.name not in self.consts}
        self.outputs = [o.name for o in g.output]
        self.producer = {}
        self.consumers = {}
        self.nodes = []
        for node in g.node:
            if node.domain not in ("", "ai.onnx"):
                raise OnnxImportError(f"{_where(node)} is in domain {node.domain!r}; load_onnx supports "
                                      "only default-domain LSTM, GRU, RNN and layout glue")
            if node.op_type == "Constant":
                self.consts[node.output[0]] = self._constant_value(node)
                continue
            if node.op_type not in RECURRENT and node.op_type not in GLUE:
                raise OnnxImportError(
                    f"{_where(node)} is not supported by load_onnx, which takes one LSTM/GRU/RNN node "
                    f"or a plain stack joined by {', '.join(GLUE)}")
            try:  # the op's version at this opset must be one rnnengine implements (rnnengine/opsets.py)
                check_node(node.op_type, self.opset, _where(node))
            except OpsetError as e:
                raise OnnxImportError(str(e)) from None
            for name in node.input:
                if name and name not in self.consts and name not in self.inputs and name not in self.producer:
                    raise OnnxImportError(f"{_where(node)} reads {name!r}, which nothing before it produces "
                                          "(the graph is not in topological order or has a cycle)")
                self.consumers.setdefault(name, []).append(node)
            for name in node.output:
                if name:
                    self.producer[name] = node
            self.nodes.append(node)

    @staticmethod
    def _constant_value(node):
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
        raise OnnxImportError(f"{_where(node)}: only Constant nodes with a 'value' tensor are supported")

    def const(self, name, node, what):
        if name not in self.consts:
            raise OnnxImportError(f"{_where(node)}: input {what} ({name!r}) must be a constant initializer")
        return self.consts[name]


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _apply_glue(graph, node, x):
    """Runs one glue node on a NumPy array (to check what the glue does)."""
    at = _attrs(node)
    op = node.op_type
    if op == "Identity":
        return x
    if op == "Transpose":
        return np.transpose(x, at.get("perm", list(range(x.ndim))[::-1]))
    if op in ("Squeeze", "Unsqueeze"):
        if len(node.input) > 1 and node.input[1]:
            axes = [int(a) for a in graph.const(node.input[1], node, "axes")]
        else:
            axes = at.get("axes")
        if op == "Squeeze":
            if axes is None:
                return np.squeeze(x)
            return np.squeeze(x, axis=tuple(a % x.ndim for a in axes))
        nd = x.ndim + len(axes)
        for a in sorted(a % nd for a in axes):
            x = np.expand_dims(x, a)
        return x
    if op == "Reshape":
        shape = [int(s) for s in graph.const(node.input[1], node, "shape")]
        if at.get("allowzero", 0):
            raise OnnxImportError(f"{_where(node)}: Reshape with allowzero=1 is not supported")
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        try:
            return x.reshape(shape)
        except ValueError as e:
            raise OnnxImportError(f"{_where(node)}: cannot reshape {x.shape} to {shape}: {e}") from None
    raise AssertionError(op)


def _follow_glue(graph, name):
    """Follows a single-consumer chain of glue nodes from tensor `name`; returns the glue
    nodes and the name of the tensor at the end of the chain."""
    chain = []
    while True:
        users = graph.consumers.get(name, [])
        if name in graph.outputs or len(users) != 1 or users[0].op_type not in GLUE:
            if len(users) > 1:
                raise OnnxImportError(f"tensor {name!r} feeds {len(users)} nodes; load_onnx takes a plain "
                                      "chain of recurrent layers")
            return chain, name
        chain.append(users[0])
        name = users[0].output[0]


def _layer_from_node(graph, node):
    kind = node.op_type
    at = _attrs(node)
    allowed = recurrent_attrs(kind)
    if graph.opset < 14:
        allowed = allowed - {"layout"}
    for a in at:
        if a not in allowed:
            raise OnnxImportError(f"{_where(node)}: attribute {a!r} is not an attribute of {kind} "
                                  f"at opset {graph.opset} (known: {', '.join(sorted(allowed))})")
    slots = dict(zip(RECURRENT_INPUTS[:RECURRENT_N_INPUTS[kind]], list(node.input) + [""] * 8))
    weights = {}
    for w in ("W", "R", "B", "P"):
        if slots.get(w):
            weights[w] = graph.const(slots[w], node, w)
    if "W" not in weights or "R" not in weights:
        raise OnnxImportError(f"{_where(node)}: the weights W and R are required")
    try:
        layer = layer_from_onnx(kind, at, weights["W"], weights["R"], weights.get("B"), weights.get("P"),
                                name=node.name or None)
    except (ValueError, TypeError) as e:
        raise OnnxImportError(f"{_where(node)}: {e}") from None
    return layer, slots


def _probe_dims(graph, x_name, layout):
    dims = [3, 2]  # T, B when unknown
    info = graph.inputs.get(x_name)
    if info is not None:
        shape = info.type.tensor_type.shape.dim
        if len(shape) == 3:
            t_dim, b_dim = (shape[1], shape[0]) if layout else (shape[0], shape[1])
            dims = [t_dim.dim_value or 3, b_dim.dim_value or 2]
    return dims


def load_stack(source):
    """See rnnengine.load_onnx."""
    if isinstance(source, onnx.ModelProto):
        model = source
    else:
        if not os.path.exists(source):
            raise FileNotFoundError(f"no such ONNX file: {source}")
        try:
            model = onnx.load(source)
        except Exception as e:  # protobuf raises several types for damaged files
            raise OnnxImportError(f"{source}: not a readable ONNX file ({e})") from None
    graph = _Graph(model)
    rec = [n for n in graph.nodes if n.op_type in RECURRENT]
    if not rec:
        raise OnnxImportError("the graph has no LSTM, GRU or RNN node")

    layers, info = [], {"state_inputs": [], "initial_state": [], "lengths_input": None}
    current = None
    for k, node in enumerate(rec):
        layer, slots = _layer_from_node(graph, node)
        if k == 0:
            if slots["X"] not in graph.inputs:
                raise OnnxImportError(f"{_where(node)}: X ({slots['X']!r}) must be a graph input")
            info["input"] = slots["X"]
            layout = layer.layout
        elif slots["X"] != current:
            raise OnnxImportError(f"{_where(node)}: X comes from {slots['X']!r}, not from the previous "
                                  "recurrent layer's output")
        if layer.layout != layout:
            raise OnnxImportError(f"{_where(node)}: layout {layer.layout} differs from the first layer's")
        lens = slots.get("sequence_lens")
        if lens:
            if lens not in graph.inputs:
                raise OnnxImportError(f"{_where(node)}: sequence_lens must be a graph input")
            if info["lengths_input"] not in (None, lens):
                raise OnnxImportError(f"{_where(node)}: layers read different sequence_lens inputs")
            info["lengths_input"] = lens
        elif info["lengths_input"] is not None:
            raise OnnxImportError(f"{_where(node)}: has no sequence_lens but an earlier layer has")
        init = []
        for slot in ("initial_h", "initial_c") if layer.kind == "LSTM" else ("initial_h",):
            name = slots.get(slot)
            if not name:
                init.append(None)
            elif name in graph.consts:
                v = np.asarray(graph.consts[name], np.float32)
                if layout:
                    v = v.transpose(1, 0, 2)
                if v.shape != (layer.num_directions, 1, layer.hidden_size):
                    raise OnnxImportError(f"{_where(node)}: constant {slot} must have batch size 1 "
                                          f"to serve as a default state, got shape {v.shape}")
                init.append(v)
            else:
                info["state_inputs"].append((k, slot, name))
                init.append(None)
        info["initial_state"].append(init)
        layers.append(layer)

        y_name = node.output[0] if node.output else ""
        if not y_name:
            raise OnnxImportError(f"{_where(node)}: output Y is not produced")
        chain, end = _follow_glue(graph, y_name)
        T, B = _probe_dims(graph, info["input"], layout)
        D, H = layer.num_directions, layer.hidden_size
        probe = np.arange(T * B * D * H, dtype=np.float32)
        probe = probe.reshape((B, T, D, H) if layout else (T, D, B, H))
        want = probe.reshape(B, T, D * H) if layout else probe.transpose(0, 2, 1, 3).reshape(T, B, D * H)
        got = probe
        for g in chain:
            got = _apply_glue(graph, g, got)
        is_stack = got.shape == want.shape and np.array_equal(got, want)
        last = k == len(rec) - 1
        if not last:
            if not is_stack:
                raise OnnxImportError(f"{_where(node)}: the glue after it ({', '.join(_where(g) for g in chain) or 'none'}) "
                                      f"does not turn Y into the next layer's (T, B, D*H) input")
            current = end
        else:
            if end not in graph.outputs:
                raise OnnxImportError(f"{_where(node)}: its output does not reach a graph output")
            if is_stack:
                info["output_form"] = "stacked"
            elif got.shape == probe.shape and np.array_equal(got, probe):
                info["output_form"] = "onnx_y"
            else:
                raise OnnxImportError(f"the glue after {_where(node)} reshapes Y in a way load_onnx "
                                      "does not support")
            info["output"] = end

    default = None
    if any(v is not None for init in info["initial_state"] for v in init):
        default = []
        for layer, init in zip(layers, info["initial_state"]):
            z = np.zeros((layer.num_directions, 1, layer.hidden_size), np.float32)
            vals = [z if v is None else v for v in init]
            default.append(tuple(vals) if layer.kind == "LSTM" else vals[0])
    m = Model(layers, batch_first=bool(layout), initial_state=default)
    m.onnx_info = info
    return m
