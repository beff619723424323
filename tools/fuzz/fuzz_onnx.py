#!/usr/bin/env python3
"""atheris fuzz target: hostile ONNX files through rnnengine.convert, then a run and a stream of the result.

Usage (see tools/fuzz/README.md):  python tools/fuzz/fuzz_onnx.py [libFuzzer flags] [CORPUS_DIR ...]
Without a corpus directory the committed models are copied into a temporary one as seeds.
Mutations: libFuzzer's byte-level ones, and (custom mutator) edits of the parsed ModelProto:
dims, elem/data types, attributes, initializer shapes and raw_data lengths, integer
initializers (shapes, axes, indices, Loop trip counts), node wiring, op types, opsets.
A finding is any exception that common.classify() does not call a clean refusal, a crash,
a sanitizer report, a hang (-timeout) or a memory blow-up (-rss_limit_mb).
"""
import contextlib
import os
import random
import sys

try:
    import atheris
except ImportError:  # the mutator and parser are usable without it (minimize.py, tests); fuzzing is not
    atheris = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

with atheris.instrument_imports(include=["rnnengine"]) if atheris else contextlib.nullcontext():
    import rnnengine  # noqa: F401
    import rnnengine.frontend.converter  # noqa: F401
    import rnnengine.runtime.graph  # noqa: F401
    import rnnengine.format.store  # noqa: F401

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import AttributeProto, TensorProto  # noqa: E402


INTS = [0, 1, -1, 2, -2, 3, 4, 7, 8, 16, 23, 64, 127, 128, 255, 256, 1023, 65535, 65536, 2**31 - 1, -2**31,
        2**32, 2**40, 2**62, 2**63 - 1, -2**63]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e38, 3.4e38, 1e300, float("inf"), float("-inf"), float("nan")]
STRINGS = [b"", b"forward", b"reverse", b"bidirectional", b"Sigmoid", b"Tanh", b"Relu", b"HardSigmoid",
           b"Affine", b"LeakyRelu", b"ThresholdedRelu", b"ScaledTanh", b"Elu", b"Softsign", b"Softplus",
           b"NOTSET", b"SAME_UPPER", b"SAME_LOWER", b"VALID", b"constant", b"reflect", b"edge", b"x" * 300,
           b"\xff\xfe", b"linear", b"nearest"]
OPS = ["LSTM", "GRU", "RNN", "Loop", "If", "Scan", "MatMul", "Gemm", "Conv", "Gather", "Reshape", "Transpose",
       "Slice", "Concat", "Squeeze", "Unsqueeze", "Expand", "Tile", "ConstantOfShape", "Range", "Shape",
       "Cast", "Where", "ReverseSequence", "Split", "Pad", "ReduceMean", "Softmax", "Add", "Mul", "Identity",
       "SequenceAt", "SequenceInsert", "SplitToSequence", "ConcatFromSequence", "NonZero", "TopK", "Resize",
       "Constant", "Sigmoid", "Tanh", "Relu", "Not", "Equal", "Less", "Greater", "CumSum", "Einsum",
       "LayerNormalization", "BatchNormalization", "Gelu", "Erf", "PRelu", "Selu", "GlobalAveragePool",
       "MaxPool", "AveragePool"]


def _edit_list(r, values, pool, k):
    """Replaces (k < 0.5), appends (k < 0.8) or deletes one element of a repeated field."""
    if values and k < 0.5:
        values[r.randrange(len(values))] = r.choice(pool)
    elif k < 0.8:
        values.append(r.choice(pool))
    elif values:
        del values[r.randrange(len(values))]


def graphs(g):
    """The graph and every subgraph (If branches, Loop/Scan bodies)."""
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == AttributeProto.GRAPH:
                yield from graphs(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for s in a.graphs:
                    yield from graphs(s)


def all_nodes(m):
    return [(g, n) for g in graphs(m.graph) for n in g.node]


def value_infos(m):
    return [v for g in graphs(m.graph) for v in list(g.input) + list(g.output) + list(g.value_info)]


def tensors(m):
    """Initializers and tensor attributes (Constant values, ConstantOfShape fills)."""
    out = [t for g in graphs(m.graph) for t in g.initializer]
    for _, n in all_nodes(m):
        for a in n.attribute:
            if a.type == AttributeProto.TENSOR:
                out.append(a.t)
    return out


def names(m):
    s = set()
    for g in graphs(m.graph):
        s.update(i.name for i in g.input)
        s.update(i.name for i in g.initializer)
        for n in g.node:
            s.update(n.output)
    return sorted(s)


# --- structure-level mutations: each edits m in place; returns False when it found nothing to edit


def mut_dim(m, r):
    vis = [v for v in value_infos(m) if v.type.tensor_type.shape.dim]
    if not vis:
        return False
    v = r.choice(vis)
    dims = v.type.tensor_type.shape.dim
    d = r.choice(dims)
    k = r.random()
    if k < 0.6:
        d.dim_value = r.choice(INTS[:18]) if r.random() < 0.8 else r.choice(INTS)
    elif k < 0.8:
        d.dim_param = r.choice(["batch", "time", "N", "seq", "", "b"])
    elif k < 0.9:
        dims.add().dim_value = r.choice([1, 2, 3])
    else:
        del dims[r.randrange(len(dims))]
    return True


def mut_elem_type(m, r):
    vis = value_infos(m)
    if not vis:
        return False
    r.choice(vis).type.tensor_type.elem_type = r.randrange(0, 26)
    return True


def mut_tensor_dtype(m, r):
    ts = tensors(m)
    if not ts:
        return False
    r.choice(ts).data_type = r.choice([1, 2, 3, 5, 6, 7, 9, 10, 11, 16, 0, 8, 12, 13, 17, 25])
    return True


def mut_tensor_shape(m, r):
    ts = tensors(m)
    if not ts:
        return False
    t = r.choice(ts)
    k = r.random()
    if t.dims and k < 0.5:
        t.dims[r.randrange(len(t.dims))] = r.choice(INTS[:16]) if r.random() < 0.8 else r.choice(INTS)
    elif k < 0.65:
        t.dims.append(r.choice([0, 1, 2, 3]))
    elif t.dims and k < 0.8:
        del t.dims[r.randrange(len(t.dims))]
    elif t.raw_data:
        raw = bytearray(t.raw_data)
        j = r.random()
        if j < 0.4:
            del raw[r.randrange(len(raw)):]
        elif j < 0.7:
            raw += bytes(r.randrange(1, 64))
        else:
            for _ in range(r.randrange(1, 8)):
                raw[r.randrange(len(raw))] = r.randrange(256)
        t.raw_data = bytes(raw)
    else:
        t.dims[:] = [r.choice([0, 1, 2, 5])]
    return True


def pick_int_tensor(m, r, max_size=None):
    """(tensor, a copy of its values) of a random integer initializer or constant (int32 /
    int64, readable, not empty, at most max_size elements), or None."""
    ts = [t for t in tensors(m) if t.data_type in (TensorProto.INT64, TensorProto.INT32)]
    if not ts:
        return None
    t = r.choice(ts)
    try:
        arr = onnx.numpy_helper.to_array(t).copy()
    except Exception:  # noqa: BLE001
        return None
    if arr.size == 0 or (max_size is not None and arr.size > max_size):
        return None
    return t, arr


def mut_int_tensor(m, r):
    """An element of an integer initializer or constant: shapes, axes, starts/ends, indices,
    Loop trip counts and the like."""
    picked = pick_int_tensor(m, r)
    if picked is None:
        return False
    t, arr = picked
    flat = arr.reshape(-1)
    info = np.iinfo(arr.dtype)
    v = r.choice(INTS) if r.random() < 0.7 else int(flat[r.randrange(flat.size)]) + r.choice([-1, 1])
    flat[r.randrange(flat.size)] = max(info.min, min(info.max, v))
    new = onnx.numpy_helper.from_array(arr, t.name)
    t.ClearField("int64_data")
    t.ClearField("int32_data")
    t.raw_data = new.raw_data
    return True


def mut_loop_trip(m, r):
    """The trip count (input 0) or condition (input 1) of a Loop, replaced by a new constant."""
    loops = [(g, n) for g, n in all_nodes(m) if n.op_type == "Loop"]
    if not loops:
        return False
    g, n = r.choice(loops)
    while len(n.input) < 2:
        n.input.append("")
    k = 0 if r.random() < 0.7 else 1
    name = f"fuzz_loop_{r.randrange(1 << 30)}"
    if k == 0:
        val = np.array(r.choice([0, 1, 2, 5, -1, 2**31, 2**40, 2**63 - 1]), np.int64)
    else:
        val = np.array(r.random() < 0.5)
    if r.random() < 0.3:
        val = val.reshape(1)
    g.initializer.append(onnx.numpy_helper.from_array(val, name))
    n.input[k] = name if r.random() < 0.9 else ""
    return True


def mut_attr(m, r):
    nodes = [(g, n) for g, n in all_nodes(m) if n.attribute]
    if not nodes:
        return False
    _, n = r.choice(nodes)
    a = r.choice(n.attribute)
    k = r.random()
    if a.type == AttributeProto.INT:
        a.i = r.choice(INTS)
    elif a.type == AttributeProto.FLOAT:
        a.f = r.choice(FLOATS)
    elif a.type == AttributeProto.STRING:
        a.s = r.choice(STRINGS)
    elif a.type == AttributeProto.INTS:
        if k < 0.4 and a.ints:
            a.ints[r.randrange(len(a.ints))] = r.choice(INTS)
        elif k < 0.7:
            a.ints.append(r.choice(INTS[:12]))
        elif a.ints:
            del a.ints[r.randrange(len(a.ints))]
    elif a.type == AttributeProto.FLOATS:
        _edit_list(r, a.floats, FLOATS, k)
    elif a.type == AttributeProto.STRINGS:
        _edit_list(r, a.strings, STRINGS, k)
    elif a.type == AttributeProto.TENSOR:
        if a.t.dims:
            a.t.dims[r.randrange(len(a.t.dims))] = r.choice(INTS[:16])
        else:
            a.t.dims.append(r.choice([0, 2, 3]))
    if r.random() < 0.1:  # the attribute's declared type no longer matches its value
        a.type = r.choice([1, 2, 3, 4, 5, 6, 7, 8])
    if r.random() < 0.05:
        n.attribute.append(a)  # a duplicate
    if r.random() < 0.05:
        b = n.attribute.add()
        b.name = r.choice(["hidden_size", "direction", "axis", "layout", "clip", "linear_before_reset",
                           "activations", "input_forget", "perm", "axes", "keepdims", "fuzz"])
        b.type = AttributeProto.INT
        b.i = r.choice(INTS[:10])
    return True


def mut_wiring(m, r):
    gn = all_nodes(m)
    if not gn:
        return False
    g, n = r.choice(gn)
    pool = names(m)
    k = r.random()
    if k < 0.2 and len(n.input) >= 2:
        i, j = r.sample(range(len(n.input)), 2)
        n.input[i], n.input[j] = n.input[j], n.input[i]
    elif k < 0.35 and n.input:
        n.input[r.randrange(len(n.input))] = r.choice(pool + [""])
    elif k < 0.45 and n.output:
        n.output[r.randrange(len(n.output))] = r.choice(pool + ["fuzz_new", ""])
    elif k < 0.55 and n.input and n.output:
        i, j = r.randrange(len(n.input)), r.randrange(len(n.output))
        n.input[i], n.output[j] = n.output[j], n.input[i]
    elif k < 0.65:
        n.input.append(r.choice(pool + [""]))
    elif k < 0.7 and n.input:
        del n.input[-1]
    elif k < 0.75 and n.output:
        del n.output[-1]
    elif k < 0.85:
        nodes = list(g.node)
        del g.node[nodes.index(n)]
    elif k < 0.92:
        g.node.append(n)  # duplicated (same outputs written twice)
    else:
        nodes = list(g.node)
        r.shuffle(nodes)
        del g.node[:]
        g.node.extend(nodes)
    return True


def mut_op_type(m, r):
    gn = all_nodes(m)
    if not gn:
        return False
    _, n = r.choice(gn)
    n.op_type = r.choice(OPS)
    if r.random() < 0.1:
        n.domain = r.choice(["com.microsoft", "ai.onnx", "fuzz"])
    return True


def mut_graph_io(m, r):
    g = r.choice(list(graphs(m.graph)))
    k = r.random()
    if k < 0.3 and g.output:
        del g.output[r.randrange(len(g.output))]
    elif k < 0.5 and g.input:
        del g.input[r.randrange(len(g.input))]
    elif k < 0.7 and g.output:
        g.output[r.randrange(len(g.output))].name = r.choice(names(m) + [""])
    elif k < 0.85 and g.initializer:
        del g.initializer[r.randrange(len(g.initializer))]
    elif g.input:
        g.output.append(g.input[r.randrange(len(g.input))])
    return True


def mut_opset(m, r):
    k = r.random()
    if k < 0.6 and m.opset_import:
        m.opset_import[r.randrange(len(m.opset_import))].version = r.choice([1, 6, 7, 9, 11, 13, 14, 17, 18, 21, 22,
                                                                            23, 25, 26, 99, -1, 2**62])
    elif k < 0.75:
        o = m.opset_import.add()
        o.domain = r.choice(["", "ai.onnx", "com.microsoft"])
        o.version = r.choice([7, 14, 18])
    elif k < 0.85 and m.opset_import:
        del m.opset_import[r.randrange(len(m.opset_import))]
    else:
        m.ir_version = r.choice([0, 1, 3, 7, 8, 9, 10, 11, 99])
    return True


MUTATIONS = [mut_dim, mut_elem_type, mut_tensor_dtype, mut_tensor_shape, mut_int_tensor, mut_int_tensor,
             mut_loop_trip, mut_attr, mut_attr, mut_wiring, mut_wiring, mut_op_type, mut_graph_io, mut_opset]


def structure_mutate(data, seed):
    """One to three structure-level edits of the model in `data`; None when it does not parse."""
    r = random.Random(seed)
    m = onnx.ModelProto()
    try:
        m.ParseFromString(data)
    except Exception:  # noqa: BLE001
        return None
    if not m.graph.node:
        return None
    for _ in range(r.choice([1, 1, 1, 2, 3])):
        for _ in range(5):
            try:
                if r.choice(MUTATIONS)(m, r):
                    break
            except (ValueError, TypeError, IndexError):
                continue
    try:
        return m.SerializeToString()
    except Exception:  # noqa: BLE001
        return None


def custom_mutator(data, max_size, seed):
    # three in four: structure level; else bytes
    return common.structure_or_bytes(data, max_size, seed, 4, lambda: structure_mutate(data, seed),
                                     atheris.Mutate)


def main():
    common.fuzz_main(common.one_onnx, common.make_onnx_seeds, custom_mutator)


if __name__ == "__main__":
    main()
