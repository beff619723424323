"""converter.py - ONNX file -> rnnengine graph (the content of a weight file).

Steps, each refusing loudly what it cannot do faithfully:
  1. read the ONNX model; check opsets (default domain 7..21) and that every op has a
     handler in rnnengine.ops.OPS (or is If), and that every attribute is one the handler
     knows; other domains (e.g. com.microsoft::DynamicQuantizeLSTM) are refused by name;
  2. turn nodes into plain dicts (attributes as Python values, subgraphs recursively,
     tensors into the tensor table); Constant nodes become tensors;
  3. fold every node whose inputs are all constants with the handlers' NumPy evaluation
     (gate re-ordering written as Slice/Concat on weights ends up here), choose the branch
     of every If whose condition is then known, drop nodes nothing uses;
  4. pair explicit state inputs with outputs (h0 -> hn) from the graph's structure.
The result is run by rnnengine.graph.GraphModel and stored by rnnengine.fileformat.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
from onnx import numpy_helper

from .ops import ONNX_DTYPE, OPS, Recurrent, UnsupportedError, where

MIN_OPSET, MAX_OPSET = 7, 21
CONVERTER_VERSION = "1"


class ConversionError(UnsupportedError):
    """The ONNX model cannot be converted faithfully; the message names the node."""


def _to_array(tensor, what):
    """An ONNX tensor as a NumPy array; a damaged tensor is a ConversionError naming it."""
    try:
        return numpy_helper.to_array(tensor)
    except Exception as e:
        raise ConversionError(f"{what}: unreadable tensor ({type(e).__name__}: {e})") from None


def _dtype_name(elem_type):
    if elem_type not in ONNX_DTYPE:
        return None
    return np.dtype(ONNX_DTYPE[elem_type]).name


def _value_info(vi):
    t = vi.type.tensor_type
    shape = None
    if t.HasField("shape"):
        shape = []
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                shape.append(int(d.dim_value))
            elif d.dim_param:
                shape.append(d.dim_param)
            else:
                shape.append(None)
    return {"name": vi.name, "dtype": _dtype_name(t.elem_type) or f"onnx-type-{t.elem_type}",
            "shape": shape}


class _Converter:
    def __init__(self, model, fixed_inputs):
        self.opset = None
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                self.opset = imp.version
        if self.opset is None:
            raise ConversionError("the model imports no default-domain ONNX opset")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ConversionError(f"opset {self.opset} is not supported (supported: {MIN_OPSET} to {MAX_OPSET})")
        self.tensors = {}
        self.fixed = {k: np.asarray(v) for k, v in (fixed_inputs or {}).items()}
        self._anon = 0

    # -- step 2: ONNX protos -> dicts
    def attr_value(self, node, a):
        from onnx import AttributeProto as A
        if a.type == A.TENSOR:
            return _to_array(a.t, f"{where(node)}: attribute {a.name!r}")
        if a.type == A.GRAPH:
            return self.subgraph(a.g, node)
        if a.type in (A.GRAPHS, A.SPARSE_TENSOR, A.SPARSE_TENSORS, A.TENSORS, A.TYPE_PROTO, A.TYPE_PROTOS):
            raise ConversionError(f"{where(node)}: attribute {a.name!r} of type {A.AttributeType.Name(a.type)} "
                                  "is not supported")
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            return v.decode("utf-8", "replace")
        if isinstance(v, list):
            return [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in v]
        return v

    def node_dict(self, n):
        node = {"op": n.op_type, "name": n.name, "inputs": list(n.input), "outputs": list(n.output)}
        if n.domain not in ("", "ai.onnx"):
            raise ConversionError(
                f"{n.domain}::{n.op_type} node {n.name or '(unnamed)'!r} is not supported: rnnengine runs "
                "default-domain ONNX ops only (quantized contrib ops such as "
                "com.microsoft::DynamicQuantizeLSTM must be exported unquantized; rnnengine can "
                "store weights as int8 itself: convert --dtype int8)")
        from .graph import SEQUENCE_ATTRS, SEQUENCE_OPS
        if n.op_type not in OPS and n.op_type not in ("If", "Loop") + SEQUENCE_OPS:
            raise ConversionError(f"{where(node)}: op {n.op_type!r} is not supported. Supported ops: "
                                  f"{', '.join(sorted(set(OPS) | {'If', 'Loop'} | set(SEQUENCE_OPS)))}")
        node["attrs"] = {a.name: self.attr_value(node, a) for a in n.attribute}
        if n.op_type in ("If", "Loop") + SEQUENCE_OPS:
            allowed = SEQUENCE_ATTRS.get(n.op_type, set()) | ({"then_branch", "else_branch", "body"}
                                                              if n.op_type in ("If", "Loop") else set())
            extra = set(node["attrs"]) - allowed
            if extra:
                raise ConversionError(f"{where(node)}: attribute(s) {sorted(extra)} not supported")
        else:
            OPS[n.op_type](node, self.opset).check_attrs()
        return node

    def subgraph(self, g, parent):
        nodes = [self.node_dict(n) for n in g.node]
        tensors = {t.name: _to_array(t, f"{where(parent)}: subgraph initializer {t.name!r}") for t in g.initializer}
        inputs = [i.name for i in g.input]
        if inputs and parent["op"] != "Loop":
            raise ConversionError(f"{where(parent)}: a subgraph with inputs is only supported as a Loop body")
        return {"nodes": nodes, "outputs": [o.name for o in g.output], "tensors": tensors, "inputs": inputs}

    # -- step 3: folding
    def fold(self, nodes, consts):
        """Folds constant nodes and decided Ifs; returns the remaining nodes."""
        out = []
        for node in nodes:
            op = node["op"]
            ins = node["inputs"]
            if op == "If":
                cond = consts.get(ins[0])
                if cond is not None:
                    branch = node["attrs"]["then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch"]
                    sub = dict(consts)
                    sub.update(branch["tensors"])
                    for k, v in branch["tensors"].items():
                        consts[k] = v
                    kept = self.fold(branch["nodes"], sub)
                    consts.update({k: v for k, v in sub.items() if k not in consts})
                    out.extend(kept)
                    for src, dst in zip(branch["outputs"], node["outputs"]):
                        if src in sub:
                            consts[dst] = sub[src]
                        else:
                            out.append({"op": "Identity", "name": f"{node['name']}/{dst}", "inputs": [src],
                                        "outputs": [dst], "attrs": {}})
                    continue
                for key in ("then_branch", "else_branch"):
                    b = node["attrs"][key]
                    sub = dict(consts)
                    sub.update(b["tensors"])
                    b["nodes"] = self.fold(b["nodes"], sub)
                    b["tensors"].update({k: v for k, v in sub.items() if k not in consts})
                out.append(node)
                continue
            if op == "Loop":
                b = node["attrs"]["body"]
                sub = {k: v for k, v in consts.items() if k not in b["inputs"]}
                sub.update(b["tensors"])
                b["nodes"] = self.fold(b["nodes"], sub)
                b["tensors"].update({k: v for k, v in sub.items() if k not in consts})
                out.append(node)
                continue
            if op == "Constant":
                consts[node["outputs"][0]] = OPS["Constant"](node, self.opset).eval([])[0]
                continue
            if op in OPS and op not in ("LSTM", "GRU", "RNN") and all((not n) or n in consts for n in ins):
                h = OPS[op](node, self.opset)
                try:
                    with np.errstate(all="ignore"):
                        vals = h.eval([consts[n] if n else None for n in ins])
                except UnsupportedError:
                    raise
                except Exception as e:
                    raise ConversionError(f"{where(node)}: folding failed: {e}") from None
                for name, v in zip(node["outputs"], vals):
                    if name:
                        consts[name] = np.asarray(v)
                continue
            if op in OPS:
                OPS[op](node, self.opset).validate([consts.get(n) if n else None for n in ins])
            out.append(node)
        return out

    def convert(self, model):
        g = model.graph
        consts = {t.name: _to_array(t, f"initializer {t.name!r}") for t in g.initializer}
        inputs = [_value_info(i) for i in g.input if i.name not in consts]
        for name, v in self.fixed.items():
            if name not in {i["name"] for i in inputs}:
                raise ConversionError(f"--input {name}: the model has no input {name!r} "
                                      f"(inputs: {[i['name'] for i in inputs]})")
            consts[name] = v
        inputs = [i for i in inputs if i["name"] not in self.fixed]
        for i in inputs:
            if i["dtype"] not in ("float32", "int64", "int32", "bool", "uint8"):
                raise ConversionError(f"graph input {i['name']!r} has element type {i['dtype']}; "
                                      "supported: float32, int64, int32, bool")
        nodes = [self.node_dict(n) for n in g.node]
        nodes = _toposort(nodes, set(consts) | {i["name"] for i in inputs})
        nodes = self.fold(nodes, consts)
        outputs = [_value_info(o) for o in g.output]
        from .fuse import fuse_gru_cells, fuse_keras_loops, fuse_lstm_cells
        nodes, self.fused_loops = fuse_keras_loops(nodes, consts, [o["name"] for o in outputs], self.opset)
        nodes, self.fused = fuse_lstm_cells(nodes, consts, [o["name"] for o in outputs])
        nodes, self.fused_gru = fuse_gru_cells(nodes, consts, [o["name"] for o in outputs])
        if self.fused or self.fused_gru or self.fused_loops:
            nodes = _toposort(nodes, set(consts) | {i["name"] for i in inputs})
        nodes, used = _prune(nodes, [o["name"] for o in outputs])
        tensors = {k: v for k, v in consts.items() if k in used or k in {o["name"] for o in outputs}}
        for t in list(tensors):
            if tensors[t].dtype == np.float64:
                tensors[t] = tensors[t].astype(np.float32)
        graph = {"opset": self.opset, "inputs": inputs, "outputs": outputs, "nodes": nodes}
        _hoist_subgraph_tensors(graph["nodes"], tensors)
        graph["state_pairs"] = pair_states(graph)
        return graph, tensors


def _toposort(nodes, available):
    """Nodes in an order where each runs after what it reads; a cycle is an error."""
    produced = set(available)
    order, pending = [], list(nodes)
    while pending:
        progress = False
        rest = []
        for n in pending:
            needs = [x for x in n["inputs"] if x] + _outer_reads(n)
            if all(x in produced for x in needs):
                order.append(n)
                produced.update(o for o in n["outputs"] if o)
                progress = True
            else:
                rest.append(n)
        if not progress:
            n = rest[0]
            missing = [x for x in n["inputs"] if x and x not in produced]
            raise ConversionError(f"{where(n)} reads {missing}, which no node produces before it: the graph "
                                  "has a cycle or reads undefined tensors")
        pending = rest
    return order


def _outer_reads(node):
    """Names a node's subgraphs read from the enclosing scope."""
    reads = []
    for v in node.get("attrs", {}).values():
        if isinstance(v, dict) and "nodes" in v:
            local = set(v["tensors"]) | set(v.get("inputs", []))
            for n in v["nodes"]:
                for x in [x for x in n["inputs"] if x] + _outer_reads(n):
                    if x not in local:
                        reads.append(x)
                local.update(n["outputs"])
    return reads


def _prune(nodes, outputs):
    """Drops nodes no output depends on; returns (nodes, names read)."""
    needed = set(outputs)
    kept = []
    for n in reversed(nodes):
        if any(o in needed for o in n["outputs"] if o):
            kept.append(n)
            needed.update(x for x in n["inputs"] if x)
            needed.update(_outer_reads(n))
    return list(reversed(kept)), needed


def _hoist_subgraph_tensors(nodes, tensors):
    """Moves the constants of undecided If branches into the one tensor table (ONNX names
    are unique across a model and its subgraphs)."""
    for n in nodes:
        for v in n.get("attrs", {}).values():
            if isinstance(v, dict) and "nodes" in v:
                for name, arr in v.pop("tensors").items():
                    if name in tensors and tensors[name] is not arr:
                        raise ConversionError(f"{where(n)}: a branch redefines tensor {name!r}")
                    tensors[name] = arr
                v["tensors"] = {}
                _hoist_subgraph_tensors(v["nodes"], tensors)


def pair_states(graph):
    """Pairs explicit state inputs with outputs from the graph's structure: input i pairs
    with output o when the recurrent slots i feeds (initial_h / initial_c of some layers)
    are exactly the slots o is computed from (Y_h / Y_c of the same layers)."""
    nodes = graph["nodes"]
    feeds_of = {i["name"]: set() for i in graph["inputs"] if i["dtype"] == "float32"}
    deps = {}  # tensor -> set of (layer, slot) it is computed from (Y_h -> 'h', Y_c -> 'c'), or 'Y'
    reach = {i: {i} for i in feeds_of}  # input -> tensors depending on it
    for n in nodes:
        ins = [x for x in n["inputs"] if x] + _outer_reads(n)
        if n["op"] in ("LSTM", "GRU", "RNN"):
            key = n["outputs"][0] or n["name"]
            slots = dict(zip(Recurrent.SLOTS, n["inputs"] + [""] * 8))
            for inp, r in reach.items():
                for slot, tag in (("initial_h", "h"), ("initial_c", "c")):
                    if slots.get(slot) and slots[slot] in r:
                        feeds_of[inp].add((key, tag))
            outs = n["outputs"] + ["", "", ""]
            if outs[1]:
                deps[outs[1]] = {(key, "h")}
            if outs[2]:
                deps[outs[2]] = {(key, "c")}
            if outs[0]:
                deps[outs[0]] = {"Y"} | set().union(*(deps.get(x, set()) for x in ins))
        else:
            d = set().union(*(deps.get(x, set()) for x in ins)) if ins else set()
            for o in n["outputs"]:
                if o:
                    deps[o] = d
        if n["op"] in ("Shape", "Size"):
            continue  # only the shape flows on: a state's data does not
        for inp, r in reach.items():
            if any(x in r for x in ins):
                r.update(o for o in n["outputs"] if o)
    pairs = []
    shapes = {i["name"]: i["shape"] for i in graph["inputs"]}
    for inp, slots in feeds_of.items():
        if not slots:
            continue
        cands = [o["name"] for o in graph["outputs"] if deps.get(o["name"]) == slots
                 and (o["shape"] is None or shapes[inp] is None or len(o["shape"]) == len(shapes[inp]))]
        if len(cands) == 1:
            pairs.append([inp, cands[0]])
    return pairs


def convert_model(source, fixed_inputs=None, state_pairs=None):
    """ONNX file path or ModelProto -> (graph dict, tensors dict, metadata dict)."""
    if isinstance(source, onnx.ModelProto):
        model, raw = source, source.SerializeToString()
        path = None
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such ONNX file: {path}")
        with open(path, "rb") as f:
            raw = f.read()
        try:
            # onnx.load also reads weights kept in external data files beside the model
            model = onnx.load(path)
        except Exception as e:
            raise ConversionError(f"{path}: not a readable ONNX file ({type(e).__name__}: {e})") from None
    conv = _Converter(model, fixed_inputs)
    graph, tensors = conv.convert(model)
    if state_pairs is not None:
        ins = {i["name"] for i in graph["inputs"]}
        outs = {o["name"] for o in graph["outputs"]}
        for a, b in state_pairs:
            if a not in ins or b not in outs:
                raise ConversionError(f"state pair {a}={b}: {a!r} must be a graph input and {b!r} an output")
        graph["state_pairs"] = [list(p) for p in state_pairs]
    from . import __version__
    metadata = {
        "general.converter_version": CONVERTER_VERSION,
        "general.rnnengine_version": __version__,
        "source.producer": f"{model.producer_name} {model.producer_version}".strip(),
        "source.opset": conv.opset,
        "source.ir_version": int(model.ir_version),
        "source.sha256": hashlib.sha256(raw).hexdigest(),
        "source.file": os.path.basename(path) if path else None,
        "source.fixed_inputs": {k: np.asarray(v).tolist() for k, v in (fixed_inputs or {}).items()},
        "converter.fused_lstm_cells": conv.fused,
        "converter.fused_gru_cells": conv.fused_gru,
        "converter.fused_keras_loops": conv.fused_loops,
    }
    return graph, tensors, metadata
