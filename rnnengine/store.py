"""store.py - a converted model to and from the weight file (rnnengine.fileformat).

The graph is stored as JSON (docs/FORMAT.md, key "graph"): nodes with ONNX op types and
attributes. Attribute values that are tensors (Constant values, ConstantOfShape fill
values) move into the tensor table under "attr:<node output>:<attribute>" and are
replaced by {"tensor": name}; If branches are nested graphs.

Which tensors are stored in float16 / int8 when asked: the weight matrices, i.e. the
W and R inputs of recurrent layers, the constant right-hand side of MatMul/Gemm, Conv
weights, embedding tables read by Gather, and matrices handed to Loop bodies. Biases, peepholes and everything else stay
float32, so the accuracy cost stays in the matrix products.
"""
from __future__ import annotations

import numpy as np

from . import fileformat
from .graph import GraphModel

WEIGHT_SLOTS = {"LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2), "MatMul": (1,), "Gemm": (1,), "Conv": (1,),
                "Gather": (0,)}


def _encode(obj, tensors, where):
    if isinstance(obj, np.ndarray):
        name = f"attr:{where}"
        tensors[name] = obj
        return {"tensor": name}
    if isinstance(obj, dict) and "nodes" in obj:
        return {"graph": {"nodes": [_encode_node(n, tensors) for n in obj["nodes"]], "outputs": obj["outputs"],
                          "inputs": obj.get("inputs", [])}}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, tensors, f"{where}:{k}") for k, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _encode_node(node, tensors):
    key = next((o for o in node["outputs"] if o), node.get("name", "node"))
    return {"op": node["op"], "name": node.get("name", ""), "inputs": node["inputs"], "outputs": node["outputs"],
            "attrs": {k: _encode(v, tensors, f"{key}:{k}") for k, v in node.get("attrs", {}).items()}}


def _decode(obj, tensors):
    if isinstance(obj, dict) and set(obj) == {"tensor"}:
        return tensors[obj["tensor"]]
    if isinstance(obj, dict) and set(obj) == {"graph"}:
        g = obj["graph"]
        return {"nodes": [_decode_node(n, tensors) for n in g["nodes"]], "outputs": g["outputs"], "tensors": {},
                "inputs": g.get("inputs", [])}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _decode_node(node, tensors):
    return dict(node, attrs={k: _decode(v, tensors) for k, v in node.get("attrs", {}).items()})


def weight_names(graph, tensors):
    names = set()

    def visit(nodes):
        for n in nodes:
            for k in WEIGHT_SLOTS.get(n["op"], ()):
                if k < len(n["inputs"]) and n["inputs"][k] in tensors:
                    names.add(n["inputs"][k])
            if n["op"] == "Loop":  # weights handed to a loop body as loop-carried values (tf2onnx)
                names.update(x for x in n["inputs"][2:] if x in tensors)
            for v in n.get("attrs", {}).values():
                if isinstance(v, dict) and "nodes" in v:
                    visit(v["nodes"])
    visit(graph["nodes"])
    return {n for n in names if tensors[n].dtype.kind == "f" and tensors[n].ndim >= 2}


def save(model, path, dtype="float32"):
    """Writes a GraphModel to a weight file; weight matrices stored as `dtype`."""
    if dtype not in ("float32", "float16", "int8"):
        raise ValueError(f"dtype must be float32, float16 or int8, got {dtype!r}")
    tensors = dict(model.tensors)
    graph = {k: v for k, v in model.graph.items() if k != "nodes"}
    graph["nodes"] = [_encode_node(n, tensors) for n in model.graph["nodes"]]
    quantize = weight_names(model.graph, model.tensors)
    meta = dict(model.metadata)
    meta["general.weight_dtype"] = dtype
    fileformat.write(path, graph, tensors, dtype=dtype, quantize=quantize, metadata=meta)


def load(path, verify=True):
    """Loads a weight file as a GraphModel (float32 weights memory-mapped, not copied)."""
    wf = fileformat.read(path, verify=verify)
    tensors = {name: wf.tensor(name) for name in wf.names}
    graph = dict(wf.graph)
    graph["nodes"] = [_decode_node(n, tensors) for n in graph["nodes"]]
    model = GraphModel(graph, {k: v for k, v in tensors.items() if not k.startswith("attr:")}, wf.metadata)
    model.file = wf
    return model
