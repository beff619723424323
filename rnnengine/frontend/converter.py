"""converter.py - ONNX file -> rnnengine graph (the content of a weight file).

Steps, each refusing loudly what it cannot do faithfully:
  1. read the ONNX model; check the opset (default domain, 7 to the newest the installed
     onnx defines), that every op has a handler in rnnengine.ops.handlers.OPS (or is If / Loop / a
     sequence op), that the op's version at that opset is one rnnengine implements
     (rnnengine/opsets.py), and that every attribute is one the handler knows; other
     domains (e.g. com.microsoft::DynamicQuantizeLSTM) are refused by name;
  2. turn nodes into plain dicts (attributes as Python values, subgraphs recursively,
     tensors into the tensor table); Constant nodes become tensors;
  3. fold every node whose inputs are all constants with the handlers' NumPy evaluation
     (gate re-ordering written as Slice/Concat on weights ends up here), choose the branch
     of every If whose condition is then known, drop nodes nothing uses;
  4. pair explicit state inputs with outputs (h0 -> hn) from the graph's structure, through
     the Ifs left for planning (cells written op by op inside them are fused first).
The result is run by rnnengine.runtime.graph.GraphModel and stored by rnnengine.format.weightfile.
"""
from __future__ import annotations

import hashlib
import os

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from rnnengine import limits
from rnnengine._version import __version__
from rnnengine.errors import ConversionError, UnsupportedError, where
from rnnengine.frontend.fuse import fuse_gru_cells, fuse_keras_loops, fuse_lstm_cells
from rnnengine.codes import GATES, ONNX_DTYPE, RECURRENT_INPUTS, RECURRENT_OPS, SLOT_INITIAL_C, SLOT_INITIAL_H
from rnnengine.frontend.opsets import MIN_OPSET, OpsetError, check_node, check_structure, max_opset, repeated
from rnnengine.ops import ONNX_DTYPE, OPS, ROWS_VIEW, EnvHandler, Recurrent
CONVERTER_VERSION = "1"


def _to_array(tensor, what):
    """An ONNX tensor as a NumPy array; a damaged tensor is a ConversionError naming it."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        # onnx.load(path) has read a file's external data already; a ModelProto or bytes has no
        # directory to find it in, and numpy_helper would read it from the working directory
        raise ConversionError(f"{what}: its data is in an external file; convert the model from its path "
                              "(the directory that holds that file)")
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
        if not MIN_OPSET <= self.opset <= max_opset():
            raise ConversionError(f"opset {self.opset} is not supported (supported: {MIN_OPSET} to {max_opset()}, "
                                  f"the newest the installed onnx {onnx.__version__} defines)")
        self.tensors = {}
        self.fixed = {k: np.asarray(v) for k, v in (fixed_inputs or {}).items()}
        self._anon = 0
        self.budget = limits.Budget()  # the limits in force (rnnengine/limits.py) for the folding

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
        if n.op_type not in OPS:
            raise ConversionError(f"{where(node)}: op {n.op_type!r} is not supported. Supported ops: "
                                  f"{', '.join(sorted(OPS))}")
        try:
            check_node(n.op_type, self.opset, where(node))
            check_structure(n.op_type, self.opset, node["inputs"], node["outputs"], {a.name for a in n.attribute},
                            where(node), attr_types={a.name: onnx.AttributeProto.AttributeType.Name(a.type)
                                                     for a in n.attribute},
                            variadic_full=not issubclass(OPS[n.op_type], EnvHandler))
        except OpsetError as e:
            raise ConversionError(str(e)) from None
        node["attrs"] = {a.name: self.attr_value(node, a) for a in n.attribute}
        try:
            OPS[n.op_type](node, self.opset).check_attrs()
        except UnsupportedError as e:
            raise ConversionError(str(e)) from None
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
            self.budget.tick(node)
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
                        elif src == dst:
                            pass  # the branch's own nodes produce the If's output name already
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
            if op in OPS and op not in RECURRENT_OPS and all((not n) or n in consts for n in ins):
                if op == "Range" and any(n and np.asarray(consts[n]).dtype == np.float16 for n in ins):
                    # Range-27 accumulates float16 in float32 (stash_type); NumPy's float16
                    # arange does not, and earlier versions do not take float16 at all
                    raise ConversionError(f"{where(node)}: Range on float16 is not supported")
                h = OPS[op](node, self.opset)
                xs = [consts[n] if n else None for n in ins]
                self.budget.before_eval(node, xs)  # an output too large is refused before NumPy
                try:
                    with np.errstate(all="ignore"):
                        vals = h.eval(xs)
                except UnsupportedError:
                    raise
                except Exception as e:
                    raise ConversionError(f"{where(node)}: folding failed: {e}") from None
                self.budget.after_eval(node, [np.asarray(v) for v in vals])
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
        twice = repeated([i["name"] for i in inputs])
        if twice:  # (onnxruntime: "Duplicate definition-site")
            raise ConversionError(f"the graph declares the input(s) {twice} more than once")
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
        _check_state_shapes(nodes, consts, {v.name: _value_info(v)["shape"]
                                            for v in list(g.input) + list(g.value_info) + list(g.output)})
        outputs = [_value_info(o) for o in g.output]
        # values read inside If / Loop subgraphs must survive the rewrite like graph outputs
        keep = [o["name"] for o in outputs] + [x for n in nodes for x in _outer_reads(n)]
        nodes, self.fused_loops = fuse_keras_loops(nodes, consts, keep, self.opset,
                                                   {i["name"] for i in inputs if i["dtype"] == "bool"}, inputs)
        nodes, self.fused = fuse_lstm_cells(nodes, consts, keep)
        nodes, self.fused_gru = fuse_gru_cells(nodes, consts, keep)
        self._fuse_in_branches(nodes, consts)
        self.unflattened = _unflatten_matmuls(nodes, consts, keep)
        if self.fused or self.fused_gru or self.fused_loops:
            nodes = _toposort(nodes, set(consts) | {i["name"] for i in inputs})
        nodes, used = _prune(nodes, [o["name"] for o in outputs])
        tensors = {k: v for k, v in consts.items() if k in used or k in {o["name"] for o in outputs}}
        out_names = {o["name"] for o in outputs}
        for t in list(tensors):
            if tensors[t].dtype == np.float64:
                if t in out_names:  # (a float64 result computed at conversion: rounding it is not it)
                    raise ConversionError(f"graph output {t!r} is a float64 constant; rnnengine computes and "
                                          "returns float32, int64, int32, uint8 and bool")
                tensors[t] = tensors[t].astype(np.float32)
        graph = {"opset": self.opset, "inputs": inputs, "outputs": outputs, "nodes": nodes}
        _hoist_subgraph_tensors(graph["nodes"], tensors)
        graph["state_pairs"] = pair_states(graph)
        return graph, tensors


    def _fuse_in_branches(self, nodes, consts):
        """Fuses the cells written op by op inside If branches left undecided (e.g. silero-vad's
        16 kHz and 8 kHz models when the sample rate is an input), so that their state is a
        recurrent layer's state that pair_states can see. Each branch keeps its own names."""
        for n in nodes:
            if n["op"] != "If":
                continue
            for key in ("then_branch", "else_branch"):
                b = n["attrs"][key]
                tensors = dict(consts)
                tensors.update(b["tensors"])
                keep = list(b["outputs"]) + [x for m in b["nodes"] for x in _outer_reads(m)]
                prefix = f"{n['name'] or n['outputs'][0]}/{key}/"
                bnodes, k1 = fuse_lstm_cells(b["nodes"], tensors, keep, prefix)
                bnodes, k2 = fuse_gru_cells(bnodes, tensors, keep, prefix)
                if k1 or k2:
                    produced = {o for m in bnodes for o in m["outputs"] if o}
                    outer = {x for m in bnodes for x in [y for y in m["inputs"] if y] + _outer_reads(m)} - produced
                    bnodes = _toposort(bnodes, set(tensors) | outer)
                    b["tensors"].update({t: v for t, v in tensors.items() if t not in consts and t not in b["tensors"]})
                    self.fused += k1
                    self.fused_gru += k2
                b["nodes"] = bnodes
                self._fuse_in_branches(bnodes, {**consts, **b["tensors"]})


def _check_state_shapes(nodes, consts, declared):
    """Refuses a recurrent node whose state shapes contradict its hidden_size: the invalid
    graph the PyTorch dynamo exporter writes for nn.LSTM(proj_size=P) (ONNX LSTM has no
    projection, so initial_h / Y_h of size P cannot match hidden_size H). `declared` maps
    tensor names to the shapes the file declares (graph inputs, value_info, outputs)."""
    for n in nodes:
        if n["op"] not in RECURRENT_OPS:
            continue
        slots = dict(zip(RECURRENT_INPUTS, n["inputs"]))
        R = consts.get(slots.get("R") or "")
        H = n.get("attrs", {}).get("hidden_size", R.shape[-1] if R is not None and R.ndim == 3 else None)
        if H is None:
            continue
        named = [(slot, slots.get(slot)) for slot in ("R", "initial_h", "initial_c")]
        named += [(slot, o) for slot, o in zip(("Y_h", "Y_c"), n["outputs"][1:])]
        for slot, name in named:
            shape = tuple(consts[name].shape) if name in consts else declared.get(name) if name else None
            if not shape or not isinstance(shape[-1], int) or shape[-1] == H:
                continue
            shown = "(" + ", ".join(str(d) for d in shape) + ")"
            raise ConversionError(
                f"{where(n)}: hidden_size is {H} but {slot} {name!r} has shape {shown} (last dimension "
                f"{shape[-1]}, expected {H}): the state shapes contradict hidden_size. This is the invalid "
                "graph the PyTorch dynamo exporter writes for nn.LSTM(proj_size=...): ONNX LSTM has no "
                "output projection, so such a layer cannot be expressed in ONNX; build it from the live module "
                "with rnnengine.from_torch(module), which runs proj_size")


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


def _unflatten_matmuls(nodes, consts, keep):
    """A Dense layer on a sequence as tf2onnx writes it (Keras' Tensordot):
    Reshape(X, [-1, K] or [prod(X.shape[:-1]), X.shape[-1]] computed from Shape(X)) -> MatMul(W
    of shape (K, N)) -> Reshape(S). The first Reshape is marked ROWS_VIEW 1: when planned it
    checks that its target makes rows of X's last axis (refused, naming it, otherwise) and
    passes X on unchanged, so the MatMul computes X.shape[:-1] + (N,), the same rows in the
    same order as the (rows, N) it replaces, each with the same chain of sums
    (src_c/pack.c). The second is marked ROWS_VIEW 2: it gets the same data, and refuses a
    target S that would resolve differently against the new shape than against (rows, N)
    (a 0 copies a dimension of its input); so the result is the original's wherever the
    marked graph runs. Without the
    flattening the time axis stays an axis of its own, and a stream goes through the Dense
    (merging time with the batch is refused). Returns how many were marked."""
    readers: dict = {}
    for n in nodes:
        for k, x in enumerate(n["inputs"]):
            if x:
                readers.setdefault(x, []).append((n, k))
        for x in _outer_reads(n):
            readers.setdefault(x, []).append((n, -1))
    producer = {o: n for n in nodes for o in n["outputs"] if o}
    kept = set(keep)
    count = 0
    for m in nodes:
        if m["op"] != "MatMul" or len(m["inputs"]) != 2 or not m["outputs"] or not m["outputs"][0]:
            continue
        flat, w = m["inputs"]
        r1 = producer.get(flat)
        W = consts.get(w)
        out = m["outputs"][0]
        after = readers.get(out, [])
        if r1 is None or r1["op"] != "Reshape" or len(r1["inputs"]) != 2 or r1.get("attrs", {}).get("allowzero"):
            continue
        if W is None or np.ndim(W) != 2 or flat in kept or out in kept:
            continue
        target = consts.get(r1["inputs"][1])
        if target is not None and (np.ndim(target) != 1 or np.size(target) != 2):
            continue  # (a constant target that is not rows: left as it is)
        if len(readers.get(flat, [])) != 1 or len(after) != 1 or after[0][0]["op"] != "Reshape" or after[0][1] != 0:
            continue
        r2 = after[0][0]
        if r1.get("attrs", {}).get(ROWS_VIEW) or r2.get("attrs", {}).get(ROWS_VIEW):
            continue  # (a Reshape between two Dense layers: one mark each)
        r1.setdefault("attrs", {})[ROWS_VIEW] = 1
        r2.setdefault("attrs", {})[ROWS_VIEW] = 2
        count += 1
    return count


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


MAX_ALTERNATIVES = 256  # per tensor; beyond this the pairing gives up (no pair, never a wrong one)


def pair_states(graph):
    """Pairs explicit state inputs with outputs from the graph's structure: input i pairs
    with output o when the recurrent slots i feeds (initial_h / initial_c of some layers)
    are exactly the slots o is computed from (Y_h / Y_c of the same layers).

    The analysis sees through If nodes whose condition is not known at conversion (it
    depends on input shapes, or on an input such as a sample rate). A tensor's dependencies
    are a set of alternatives, one per combination of branches that can produce it; each is
    (choices, slots) where choices are (condition, branch) pairs. Ifs reading the same
    condition (through Cast / Identity / Not) choose together. Input i pairs with output o
    when, in every alternative of o, o is computed from exactly the slots i feeds among the
    layers that run under those choices, or (a fresh start, e.g. silero-vad's branch for an
    empty state) i feeds no layer that runs and o comes only from layers no input feeds;
    at least one alternative must be of the first kind."""
    inputs = [i["name"] for i in graph["inputs"] if i["dtype"] == "float32"]
    producer = {}
    _index_producers(graph["nodes"], producer)
    feeds_of = {i: set() for i in inputs}   # input -> {(layer, 'h'|'c')} it feeds
    path_of = {}                            # layer -> frozenset of choices under which it runs
    reach = {i: {i} for i in inputs}        # input -> tensors whose data depends on it
    deps = {}                               # tensor -> frozenset of (choices, slots), None: unknown
    none = frozenset([(frozenset(), frozenset())])
    counter = [0]

    def alts(names):
        """Alternatives of a value computed from all of ``names`` (compatible combinations)."""
        acc = {(frozenset(), frozenset())}
        for x in names:
            d = deps.get(x, none)
            if d is None:
                return None
            if d == none:
                continue
            nxt = set()
            for c1, s1 in acc:
                for c2, s2 in d:
                    c = c1 | c2
                    if len({k for k, _ in c}) == len(c):  # no condition taken both ways
                        nxt.add((c, s1 | s2))
            if len(nxt) > MAX_ALTERNATIVES:
                return None
            acc = nxt
        return frozenset(acc)

    def walk(nodes, path):
        for n in nodes:
            ins = [x for x in n["inputs"] if x]
            op = n["op"]
            if op == "If":
                cond, polarity = _condition_key(n["inputs"][0], producer)
                branches = []
                for key, taken in (("then_branch", polarity), ("else_branch", not polarity)):
                    b = n["attrs"][key]
                    choice = (cond, taken)
                    walk(b["nodes"], path | {choice})
                    branches.append((b["outputs"], choice))
                for k, o in enumerate(n["outputs"]):
                    if not o:
                        continue
                    res = set()
                    for outs, choice in branches:
                        d = deps.get(outs[k], none)
                        if d is None:
                            res = None
                            break
                        res.update((c | {choice}, s) for c, s in d if (choice[0], not choice[1]) not in c)
                    deps[o] = None if res is None or len(res) > MAX_ALTERNATIVES else frozenset(res)
                    for r in reach.values():
                        if any(outs[k] in r for outs, _ in branches):
                            r.add(o)
                continue
            ins = ins + _outer_reads(n)
            if op in RECURRENT_OPS:
                key = n["outputs"][0] or n["name"] or f"#{counter[0]}"
                counter[0] += 1
                path_of[key] = frozenset(path)
                slots = dict(zip(RECURRENT_INPUTS, n["inputs"] + [""] * 8))
                for inp, r in reach.items():
                    for slot, tag in (("initial_h", "h"), ("initial_c", "c")):
                        if slots.get(slot) and slots[slot] in r:
                            feeds_of[inp].add((key, tag))
                outs = n["outputs"] + ["", "", ""]
                if outs[1]:
                    deps[outs[1]] = frozenset([(frozenset(), frozenset([(key, "h")]))])
                if outs[2]:
                    deps[outs[2]] = frozenset([(frozenset(), frozenset([(key, "c")]))])
                if outs[0]:
                    d = alts(ins)
                    deps[outs[0]] = None if d is None else frozenset((c, s | {"Y"}) for c, s in d)
            else:
                d = alts(ins)
                for o in n["outputs"]:
                    if o:
                        deps[o] = d
            if op in ("Shape", "Size"):
                continue  # only the shape flows on: a state's data does not
            for r in reach.values():
                if any(x in r for x in ins):
                    r.update(o for o in n["outputs"] if o)

    walk(graph["nodes"], frozenset())
    fed = set().union(*feeds_of.values()) if feeds_of else set()
    pairs = []
    shapes = {i["name"]: i["shape"] for i in graph["inputs"]}
    for inp, slots in feeds_of.items():
        if not slots:
            continue
        cands = []
        for o in graph["outputs"]:
            d = deps.get(o["name"])
            if not d or d == none:
                continue
            if o["shape"] is not None and shapes[inp] is not None and len(o["shape"]) != len(shapes[inp]):
                continue
            fed_alt = 0
            for choices, s in d:
                running = {t for t in slots if path_of[t[0]] <= choices}
                if not s or "Y" in s:
                    break
                if running and s == running:
                    fed_alt += 1
                elif running or s & fed:
                    break
            else:
                if fed_alt:
                    cands.append(o["name"])
        if len(cands) == 1:
            pairs.append([inp, cands[0]])
    return pairs


def _index_producers(nodes, producer):
    for n in nodes:
        for o in n["outputs"]:
            if o:
                producer[o] = n
        for v in n.get("attrs", {}).values():
            if isinstance(v, dict) and "nodes" in v:
                _index_producers(v["nodes"], producer)


def _condition_key(name, producer):
    """(source tensor, polarity) of an If condition, seen through Cast to bool, Identity and
    Not, so that Ifs testing the same thing are known to take the same branch. (Only steps
    that keep the truth value: a Cast to an integer type would not, e.g. 0.5 -> 0.)"""
    polarity = True
    seen = 0
    while name in producer and producer[name]["op"] in ("Cast", "Identity", "Not") and seen < 100:
        n = producer[name]
        if n["op"] == "Cast" and n["attrs"].get("to") != 9:
            break
        if n["op"] == "Not":
            polarity = not polarity
        name = n["inputs"][0]
        seen += 1
    return name, polarity


def _check_text(model: onnx.ModelProto) -> None:
    """Refuses a model whose names are not text: protobuf hands back a string field that is
    not valid UTF-8 as bytes (fuzz: an attribute named b'linear_b\\xdafore_reset' was a
    TypeError while sorting attribute names). Checked: opset domains, and in every graph and
    subgraph the names of inputs, outputs, value_info, initializers and symbolic dimensions,
    and each node's name, op type, domain, inputs, outputs and attribute names."""
    def text(v: Any, what: str) -> None:
        if not isinstance(v, str):
            raise ConversionError(f"{what} is not valid UTF-8 text: {v!r}")

    for o in model.opset_import:
        text(o.domain, "an opset domain")

    def graph(g: Any) -> None:
        for coll, what in ((g.input, "graph input"), (g.output, "graph output"), (g.value_info, "value_info"),
                           (g.initializer, "initializer")):
            for v in coll:
                text(v.name, f"the name of a {what}")
                if what != "initializer" and v.type.HasField("tensor_type"):
                    for d in v.type.tensor_type.shape.dim:
                        text(d.dim_param, f"a symbolic dimension of {what} {v.name!r}")
        for n in g.node:
            text(n.name, "a node name")
            label = f"node {n.name or '(unnamed)'!r}"
            text(n.op_type, f"the op type of {label}")
            text(n.domain, f"the domain of {label}")
            for k, v in enumerate(n.input):
                text(v, f"input {k} of {label}")
            for k, v in enumerate(n.output):
                text(v, f"output {k} of {label}")
            for a in n.attribute:
                text(a.name, f"an attribute name of {label}")
                if a.type == onnx.AttributeProto.GRAPH:
                    graph(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        graph(sub)
    graph(model.graph)


def convert_model(source: Any, fixed_inputs: dict[str, Any] | None = None,
                  state_pairs: list[tuple[str, str]] | None = None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """ONNX file path, ModelProto or serialized model (bytes) -> (graph dict, tensors dict,
    metadata dict)."""
    if isinstance(source, onnx.ModelProto):
        model, raw = source, source.SerializeToString()
        path = None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        raw, path = bytes(source), None
        model = onnx.ModelProto()
        try:
            model.ParseFromString(raw)
        except Exception as e:
            raise ConversionError(f"the bytes given ({len(raw)}) are not a serialized ONNX model "
                                  f"({type(e).__name__}: {e})") from None
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
    _check_text(model)
    conv = _Converter(model, fixed_inputs)
    graph, tensors = conv.convert(model)
    if state_pairs is not None:
        ins = {i["name"] for i in graph["inputs"]}
        outs = {o["name"] for o in graph["outputs"]}
        for a, b in state_pairs:
            if a not in ins or b not in outs:
                raise ConversionError(f"state pair {a}={b}: {a!r} must be a graph input and {b!r} an output")
        for k, what in ((0, "input"), (1, "output")):
            twice = repeated([p[k] for p in state_pairs])
            if twice:
                raise ConversionError(f"state_pairs name the {what}(s) {twice} more than once: each state input "
                                      "is fed back from one output of its own")
        graph["state_pairs"] = [list(p) for p in state_pairs]
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
