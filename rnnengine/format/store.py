"""store.py - a converted model to and from the weight file (rnnengine.format.weightfile).

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

from typing import Any

import numpy as np

from rnnengine.format import weightfile as fileformat
from rnnengine.format.panels import PanelCache
from rnnengine.frontend import opsets
from rnnengine.frontend.opsets import OpsetError, check_structure, repeated
from rnnengine.errors import UnsupportedError
from rnnengine.limits import resolve
from rnnengine.ops import KERAS_LOOP, OPS, ROWS_VIEW, STATELESS, STEP_MASK, rows_view_errors
from rnnengine.runtime.compact import configure
from rnnengine.runtime.graph import GraphModel

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


def save(model: Any, path: str, dtype: str = "float32") -> None:
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


_ATTR_TYPES = {}


def _attr_types(op, opset):
    """{attribute: ONNX attribute type name} of op at opset (onnx.defs), cached; rnnengine's
    own converter attributes are integers."""
    key = (op, opset)
    hit = _ATTR_TYPES.get(key)
    if hit is None:
        schema = opsets.schema(op, opset)  # None: an op or opset onnx does not define (refused by name later)
        hit = {} if schema is None else {a: str(t.type).rsplit(".", 1)[-1] for a, t in schema.attributes.items()}
        hit.update({STATELESS: "INT", STEP_MASK: "INT", KERAS_LOOP: "INT", ROWS_VIEW: "INT"})
        _ATTR_TYPES[key] = hit
    return hit


def check_graph(graph, tensor_names, where="graph", opset=None):
    """Validates the structure of a stored graph before anything uses it (a damaged or
    hand-made file must fail here with a FormatError naming the field, not later)."""

    def fail(msg):
        raise fileformat.FormatError(f"{where}: {msg}")

    def strings(v, what):
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            fail(f"{what} must be a list of strings")

    def check_arity(n, what):
        """Inputs an op requires are named (not ""), their count is one the op takes, its
        required attributes are there (rnnengine.frontend.opsets.check_structure, as the converter)."""
        attrs = n.get("attrs") if isinstance(n.get("attrs"), dict) else {}
        # the converter writes the engine's 8 recurrent slots, and a fused Keras cell's step
        # mask as input 8 of LSTM/GRU/RNN
        recurrent = n["op"] in ("LSTM", "GRU", "RNN")
        masked = recurrent and attrs.get(STEP_MASK)
        try:
            check_structure(n["op"], opset, n["inputs"], n["outputs"], attrs, what, extra_inputs=(8,) if masked else (),
                            slots=9 if recurrent else 0, variadic_full=n["op"] in OPS)
        except OpsetError as e:
            fail(str(e))

    def check_attr_type(op, name, v, what):
        """The JSON type of an attribute against its ONNX type (so handlers never see, say, a
        string among a Transpose's perm)."""
        kind = _attr_types(op, opset).get(name)
        if kind is None:
            return  # unknown attributes are refused by the op's handler, by name (check_attrs)
        ok = {"INT": lambda x: isinstance(x, int),  # bools are ints in JSON writers too
              "FLOAT": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
              "STRING": lambda x: isinstance(x, str),
              "TENSOR": lambda x: isinstance(x, dict) and set(x) == {"tensor"},
              "GRAPH": lambda x: isinstance(x, dict) and set(x) == {"graph"}}
        base = kind[:-1] if kind.endswith("S") and kind[:-1] in ok else kind
        if base not in ok:
            return
        if base != kind:  # a list attribute
            if not isinstance(v, list) or not all(ok[base](x) for x in v):
                fail(f"{what} must be a list of {base.lower()}s, got {v!r}"[:300])
        elif not ok[base](v):
            fail(f"{what} must be a {base.lower()}, got {v!r}"[:300])

    def check_attr(v, what):
        """An attribute value as _encode writes it: a number, string, bool or null, a list of
        them, {"tensor": name of a table entry} or {"graph": subgraph}, at any list depth."""
        if isinstance(v, list):
            for x in v:
                check_attr(x, what)
        elif isinstance(v, dict):
            if set(v) == {"tensor"}:
                if not isinstance(v["tensor"], str) or v["tensor"] not in tensor_names:
                    fail(f"{what} names a missing tensor {v['tensor']!r}")
            elif set(v) == {"graph"}:
                check_graph(v["graph"], tensor_names, f"{where}: {what}", opset)
            else:
                fail(f"{what} is an object with keys {sorted(map(str, v))}; expected a tensor or a graph")
        elif not (v is None or isinstance(v, (bool, int, float, str))):
            fail(f"{what} has a value of type {type(v).__name__}")
        elif isinstance(v, int) and not isinstance(v, bool) and not -(1 << 63) <= v < (1 << 63):
            fail(f"{what} holds {v}, outside the 64-bit integers of ONNX attributes")
    if not isinstance(graph, dict):
        fail("must be an object")
    if where == "graph":
        if not isinstance(graph.get("opset"), int) or not opsets.MIN_OPSET <= graph["opset"] <= 100:
            # (the converter's range: older ops differ, e.g. Concat-1's axis defaulted to 1)
            fail(f"opset must be an integer from {opsets.MIN_OPSET}, the oldest rnnengine converts, "
                 f"got {graph.get('opset')!r}")
        opset = graph["opset"]
        for key in ("inputs", "outputs"):
            items = graph.get(key)
            if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str)
                                                      for i in items):
                fail(f"{key} must be a list of objects with a name")
        for i in graph["inputs"] + graph["outputs"]:
            if "shape" not in i or "dtype" not in i:
                fail(f"input/output {i['name']!r} needs 'dtype' and 'shape' (null when unknown)")
        twice = repeated([i["name"] for i in graph["inputs"]])
        if twice:  # one declaration per name: which shape would a feed be checked against? (an output
            fail(f"inputs declare {twice} more than once")  # listed twice is allowed, as in ONNX)
        for i in graph["inputs"]:
            if i.get("dtype") not in ("float32", "int64", "int32", "bool", "uint8"):
                fail(f"input {i['name']!r} has an unsupported dtype {i.get('dtype')!r}")
            if i.get("shape") is not None and (not isinstance(i["shape"], list) or len(i["shape"]) > fileformat.MAX_NDIM
                                               or not all(d is None or isinstance(d, str) or
                                                          (type(d) is int and 0 <= d <= fileformat.MAX_DIM)
                                                          for d in i["shape"])):
                fail(f"input {i['name']!r} has an invalid shape {str(i.get('shape'))[:80]} (at most "
                     f"{fileformat.MAX_NDIM} dimensions, each a name, null or an integer in [0, 2**40])")
        pairs = graph.get("state_pairs", [])
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and
                                                  all(isinstance(x, str) for x in p) for p in pairs):
            fail("state_pairs must be a list of [input, output] pairs")
        names_in = {i["name"] for i in graph["inputs"]}
        names_out = {o["name"] for o in graph["outputs"]}
        for p in pairs:
            if p[0] not in names_in or p[1] not in names_out:
                fail(f"state pair {p!r}: the first must name a graph input and the second an output")
        for k, what in ((0, "input"), (1, "output")):
            twice = repeated([p[k] for p in pairs])
            if twice:  # one carried state per input, fed back from one output each
                fail(f"state_pairs name the {what}(s) {twice} more than once")
    else:
        strings(graph.get("outputs"), "outputs")
        strings(graph.get("inputs", []), "inputs")
    nodes = graph.get("nodes")
    if not isinstance(nodes, list):
        fail("nodes must be a list")
    for k, n in enumerate(nodes):
        if not isinstance(n, dict) or not isinstance(n.get("op"), str):
            fail(f"node {k} must be an object with an op")
        if n["op"] not in OPS:
            fail(f"node {k} ({n.get('name')!r}) has op {n['op']!r}, which rnnengine does not run")
        strings(n.get("inputs"), f"node {k} inputs")
        strings(n.get("outputs"), f"node {k} outputs")
        if not isinstance(n.get("attrs", {}), dict):
            fail(f"node {k} attrs must be an object")
        check_arity(n, f"node {k} ({n.get('name')!r})")
        try:  # the attributes the op's handler implements and its ONNX schema at the opset defines
            OPS[n["op"]](n, opset).check_attrs(stored=True)
        except UnsupportedError as e:
            fail(str(e))
        for name, v in n.get("attrs", {}).items():
            check_attr(v, f"node {k} attribute {name!r}")
            check_attr_type(n["op"], name, v, f"node {k} ({n.get('name')!r}) attribute {name!r}")


CHECKPOINT_KIND = "rnnengine-checkpoint"


def load_checkpoint_model(wf, path):
    """A training checkpoint (written by rnnengine.train, graph {"kind": "rnnengine-checkpoint"})
    as a runnable model of its network: the graph ``Network.to_onnx()`` exports (without
    state I/O, so streams keep every layer's state), converted. The model's metadata holds
    the converter's and the checkpoint's ("train.*": config, optimizer, step, vocabulary)."""

    def fail(msg):
        raise fileformat.FormatError(f"{path}: training checkpoint: {msg}")
    cfg = wf.metadata.get("train.config")
    if not isinstance(cfg, dict):
        fail("metadata 'train.config' (the network's configuration) is missing")
    if "params" not in wf.names:
        fail("tensor 'params' is missing")
    params = wf.tensor("params")
    if params.ndim != 1 or params.dtype != np.float32:
        fail(f"tensor 'params' is {params.dtype} {params.shape}; a checkpoint's parameters are one float32 vector")
    try:  # sizes checked against the stored parameters before anything is laid out or allocated
        from rnnengine.train.fit import Network  # a training checkpoint only (imports onnx for export)
        net = Network.from_config(cfg, params.size)
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        fail(f"metadata 'train.config' does not describe a network of the stored 'params' ({e})")
    net.params[:] = params
    proto = net.to_onnx()
    from rnnengine.frontend.converter import convert_model  # (imports onnx)
    graph, tensors, meta = convert_model(proto)
    meta.update({k: v for k, v in wf.metadata.items() if k.startswith("train.")})
    meta["source.file"] = None
    meta["source.checkpoint"] = str(path)
    model = GraphModel(graph, tensors, meta)
    model.file = wf
    model.network = net
    model.onnx_source = proto.SerializeToString()  # for comparisons with onnxruntime (bench)
    return model


def load(path: str, verify: bool = True, limits: Any = None, mmap: bool = False, weight_dtype: str | None = None,
         threads: int = 1, shared: bool | str = False) -> GraphModel:
    """Loads a weight file as a GraphModel. The file is read into private memory (64-byte
    aligned; float32 weights are views of it, not further copies), so nothing that happens to
    the file afterwards can affect the model; with mmap=True it is memory-mapped instead
    (shared with other processes through the page cache) and every run() and stream()
    first checks that it was not truncated or replaced (docs/FORMAT.md, "Reading while the
    file changes"). A training checkpoint loads as its network (see load_checkpoint_model).
    limits: a rnnengine.Limits for the reading and the model's planning. weight_dtype: the
    storage the recurrent kernels read, None for as the file stores it (float16 / int8 weights
    then reach the kernels exactly as stored; rnnengine/runtime/compact.py); threads: how many
    threads run() may split the batch over (rnnengine/runtime/split.py). shared: True (the
    cache at path + ".panels") or a cache path: the file is mapped and the recurrent stacks
    read their packed panels from the panel cache (rnnengine/format/panels.py)."""
    if not isinstance(shared, (bool, str)):
        raise TypeError(f"shared must be True, False or the panel cache's path, got {type(shared).__name__}")
    cache = str(path) + ".panels" if shared is True else shared or None
    return configure(_load(path, verify, limits, mmap or bool(shared), cache), weight_dtype, threads)


def _load(path, verify, limits, mmap, cache_path=None):
    lim = resolve(limits) if limits is not None else None
    wf = fileformat.read(path, verify=verify, mmap=mmap, limits=lim)
    if isinstance(wf.graph, dict) and wf.graph.get("kind") == CHECKPOINT_KIND:
        model = load_checkpoint_model(wf, path)
        model.limits = lim
        if wf.mapped:
            model.mapped_file = wf
        return model
    check_graph(wf.graph, set(wf.names))
    cache = PanelCache(cache_path, wf) if cache_path else None  # not for checkpoints: their weights are new arrays
    most = wf.limits.max_tensor_elements
    for i in wf.graph["inputs"]:
        n = 1
        for d in i["shape"] or ():
            n *= d if isinstance(d, int) else 1
        if n > most:  # a stream's example inputs have the declared shape: refused before allocating them
            raise fileformat.FormatError(
                f"{path}: graph input {i['name']!r} declares shape {i['shape']}, {n} elements, more than the "
                f"limit max_tensor_elements={most}; if the file is trusted, raise it with "
                "rnnengine.load(..., limits=rnnengine.Limits(max_tensor_elements=...))")
    # float16 / int8 tensors widened to float32: from the panel cache when shared (one copy
    # for all processes), else private arrays
    widened = cache.tensors() if cache is not None else {}
    tensors = {name: widened[name] if name in widened else wf.tensor(name) for name in wf.names}
    graph = dict(wf.graph)
    graph["nodes"] = [_decode_node(n, tensors) for n in graph["nodes"]]
    marks = rows_view_errors(graph["nodes"], tensors)
    if marks:  # (a mark elsewhere would pass a Reshape's input on unchanged)
        raise fileformat.FormatError(f"{path}: {marks[0]}")
    model = GraphModel(graph, {k: v for k, v in tensors.items() if not k.startswith("attr:")}, wf.metadata)
    model.file = wf
    model.compact_file = wf  # its float16 / int8 recurrent weights reach the kernels as stored
    model.limits = lim
    if cache is not None:
        model.panel_cache = cache
        wf.derived_checks.append(cache.check_unchanged)  # its stacks read the cache's map
    if wf.mapped:
        model.mapped_file = wf
    return model
