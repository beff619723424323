#!/usr/bin/env python3
"""atheris fuzz target: hostile weight files (docs/FORMAT.md) through rnnengine.load, then a run and a stream.

Usage (see tools/fuzz/README.md):  python tools/fuzz/fuzz_weights.py [libFuzzer flags] [CORPUS_DIR ...]
Without a corpus directory, weight files are made from the committed ONNX models (float32,
float16 and int8 storage, and a training checkpoint) into a temporary one as seeds.
Mutations: libFuzzer's byte-level ones (which mostly meet the checksums), and (custom
mutator) edits of the parsed file that are then written back with valid checksums so they
reach the checks behind them: header fields, any JSON value (metadata, graph nodes, their
attributes and wiring, tensor-table entries: names, dtypes, shapes, offsets, sizes),
tensor data (checksums recomputed), and truncation.
"""
import contextlib
import json
import os
import random
import struct
import sys
import zlib

try:
    import atheris
except ImportError:  # the mutator and parser are usable without it (minimize.py, tests); fuzzing is not
    atheris = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

with atheris.instrument_imports(include=["rnnengine"]) if atheris else contextlib.nullcontext():
    import rnnengine
    import rnnengine.frontend.converter  # noqa: F401 - training checkpoints are converted at load
    import rnnengine.format.weightfile
    import rnnengine.runtime.graph  # noqa: F401
    import rnnengine.format.store  # noqa: F401

HEADER = struct.Struct("<4sIIIQQQQI12s")
CRC_SPAN = 48

INTS = [0, 1, -1, 2, 3, 7, 8, 16, 23, 63, 64, 65, 127, 128, 255, 4096, 65535, 2**31 - 1, -2**31, 2**32,
        2**40, 2**40 + 1, 2**53, 2**62, 2**63 - 1, 2**63, 2**64, -2**63]
DTYPES = ["float32", "float16", "int8", "int64", "int32", "uint8", "bool", "float64", "complex64", "str", "",
          "object", "V8"]
OPS = ["LSTM", "GRU", "RNN", "Loop", "If", "MatMul", "Gemm", "Conv", "Gather", "Reshape", "Transpose", "Slice",
       "Concat", "Squeeze", "Unsqueeze", "Expand", "Tile", "ConstantOfShape", "Range", "Shape", "Cast", "Where",
       "ReverseSequence", "Split", "Pad", "ReduceMean", "Softmax", "Add", "Identity", "SequenceAt", "Constant"]


def parse(data):
    """(header fields list, JSON doc, data section bytes) or None."""
    if len(data) < HEADER.size:
        return None
    fields = list(HEADER.unpack_from(data, 0))
    jsize, data_off = fields[4], fields[6]
    if not 0 < jsize <= len(data) - HEADER.size or not HEADER.size + jsize <= data_off <= len(data):
        return None
    block = data[HEADER.size:HEADER.size + jsize]
    try:
        text = zlib.decompress(block) if fields[2] & 1 else block
        doc = json.loads(text)
    except Exception:  # noqa: BLE001
        return None
    if not isinstance(doc, dict):
        return None
    return fields, doc, bytearray(data[data_off:])


def serialize(fields, doc, section, fix_counts=True, fix_crc=True, compress=True):
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    block = zlib.compress(text, 1) if compress else text
    data_off = -(-(HEADER.size + len(block)) // 64) * 64
    fields = list(fields)
    fields[2] = (fields[2] | 1) if compress else (fields[2] & ~1)
    if fix_counts:
        fields[4], fields[6], fields[7] = len(block), data_off, data_off + len(section)
        if isinstance(doc.get("tensors"), list):
            fields[5] = len(doc["tensors"])
    fields = [f & ((1 << 64) - 1) if isinstance(f, int) else f for f in fields]
    fields[1:4] = [f & 0xFFFFFFFF for f in fields[1:4]]
    fields[8] &= 0xFFFFFFFF
    head = HEADER.pack(*fields[:8], 0, bytes(12))
    if fix_crc:
        fields[8] = zlib.crc32(block, zlib.crc32(head[:CRC_SPAN]))
    out = HEADER.pack(*fields[:10]) + block
    out += bytes(max(0, data_off - len(out))) if fix_counts else b""
    return out + bytes(section)


def fix_tensor_crcs(doc, section):
    """Recomputes every entry's crc32 / scale_crc32 whose range lies inside the data section
    (the tensor table may have been mutated into any JSON value: only a list has entries)."""
    tensors = doc.get("tensors")
    if not isinstance(tensors, list):
        return
    for e in tensors:
        if not isinstance(e, dict):
            continue
        for off, n, c in (("offset", "nbytes", "crc32"), ("scale_offset", "scale_nbytes", "scale_crc32")):
            o, k = e.get(off), e.get(n)
            if isinstance(o, int) and isinstance(k, int) and 0 <= o and 0 <= k and o + k <= len(section):
                e[c] = zlib.crc32(bytes(section[o:o + k]))


def containers(obj, path=()):
    """Every (path, container) pair in a JSON value."""
    if isinstance(obj, (dict, list)):
        yield path, obj
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for k, v in items:
            yield from containers(v, path + (k,))


def random_value(r, old):
    k = r.random()
    if isinstance(old, bool) or k < 0.1:
        return r.choice([True, False, None])
    if isinstance(old, int) and k < 0.7:
        return r.choice(INTS) if r.random() < 0.6 else old + r.choice([-64, -1, 1, 64])
    if isinstance(old, float) and k < 0.7:
        return r.choice([0.0, -1.0, 1e308, float("nan"), float("inf"), 1e-320])
    if isinstance(old, str) and k < 0.7:
        return r.choice(DTYPES + OPS + ["", "x", old + "_", "attr:" + old, "\udcff", "batch", "time"])
    if isinstance(old, list) and k < 0.7:
        new = list(old)
        j = r.random()
        if j < 0.3 and new:
            del new[r.randrange(len(new))]
        elif j < 0.6 and new:
            new.append(new[r.randrange(len(new))])
        elif new:
            r.shuffle(new)
        return new
    return r.choice([0, -1, 2**63, "", "x", [], {}, [1, 2], {"tensor": "x"}, {"graph": {}}, 1.5, None,
                     [[1]], {"nodes": []}])


def mut_json(doc, section, r):
    """Replace, delete or add one value anywhere in the document."""
    conts = list(containers(doc))
    path, c = r.choice(conts)
    if isinstance(c, dict):
        if c and r.random() < 0.85:
            key = r.choice(list(c))
            if r.random() < 0.15:
                del c[key]
            else:
                c[key] = random_value(r, c[key])
        else:
            c[r.choice(["op", "name", "inputs", "outputs", "attrs", "shape", "dtype", "offset", "nbytes",
                        "scale_offset", "scale_nbytes", "scale_crc32", "state_pairs", "opset", "kind", "fuzz"])] = \
                random_value(r, 0)
    elif c:
        i = r.randrange(len(c))
        if r.random() < 0.15:
            del c[i]
        else:
            c[i] = random_value(r, c[i])
    return True


def mut_node(doc, section, r):
    """Graph-aware edits of a node (possibly inside an If/Loop body)."""
    g = doc.get("graph")
    nodes = [c for _, c in containers(g) if isinstance(c, dict) and "op" in c]
    if not nodes:
        return False
    n = r.choice(nodes)
    pool = [t.get("name") for t in doc.get("tensors") or () if isinstance(t, dict)]
    for m in nodes:
        pool += [o for o in m.get("outputs") or () if isinstance(o, str)]
    pool = pool or ["x"]
    k = r.random()
    ins, outs = n.get("inputs"), n.get("outputs")
    if k < 0.15:
        n["op"] = r.choice(OPS)
    elif k < 0.35 and isinstance(ins, list) and ins:
        ins[r.randrange(len(ins))] = r.choice(pool + [""])
    elif k < 0.45 and isinstance(ins, list) and len(ins) >= 2:
        i, j = r.sample(range(len(ins)), 2)
        ins[i], ins[j] = ins[j], ins[i]
    elif k < 0.55 and isinstance(outs, list) and outs:
        outs[r.randrange(len(outs))] = r.choice(pool + ["", "fuzz_new"])
    elif k < 0.85 and isinstance(n.get("attrs"), dict):
        a = n["attrs"]
        if a and r.random() < 0.8:
            key = r.choice(list(a))
            a[key] = random_value(r, a[key])
        else:
            a[r.choice(["hidden_size", "direction", "axis", "layout", "clip", "activations", "perm", "axes",
                        "linear_before_reset", "rnnengine_stateless", "value", "to", "fuzz"])] = random_value(r, 1)
    else:
        host = next((c for _, c in containers(g) if isinstance(c, list) and n in c), None)
        if host is not None:
            if r.random() < 0.5:
                host.remove(n)
            else:
                host.append(json.loads(json.dumps(n)))
    return True


def mut_entry(doc, section, r):
    """A tensor-table entry: shape, dtype, offset, sizes, name."""
    ents = [e for e in doc.get("tensors") or () if isinstance(e, dict)]
    if not ents:
        return False
    e = r.choice(ents)
    k = r.random()
    if k < 0.3 and isinstance(e.get("shape"), list):
        sh = e["shape"]
        j = r.random()
        if sh and j < 0.6:
            sh[r.randrange(len(sh))] = r.choice(INTS[:12]) if r.random() < 0.7 else r.choice(INTS)
        elif j < 0.8:
            sh.append(r.choice([0, 1, 2]))
        elif sh:
            sh.pop()
        if r.random() < 0.5:  # keep nbytes consistent so the shape reaches the engine
            size = 1
            for d in sh:
                size *= d if isinstance(d, int) else 1
            item = {"float32": 4, "float16": 2, "int8": 1, "int64": 8, "int32": 4, "uint8": 1, "bool": 1}
            e["nbytes"] = size * item.get(e.get("dtype"), 4)
    elif k < 0.45:
        e["dtype"] = r.choice(DTYPES)
    elif k < 0.65:
        key = r.choice(["offset", "nbytes", "scale_offset", "scale_nbytes"])
        e[key] = random_value(r, e.get(key, 0))
    elif k < 0.75:
        other = r.choice(ents)
        e["name"], other["name"] = other.get("name"), e.get("name")
    elif k < 0.85:
        for key in ("scale_offset", "scale_nbytes", "scale_crc32"):
            e.pop(key, None)
    else:
        doc["tensors"].remove(e)
    return True


def mut_data(doc, section, r):
    """Tensor bytes (checksums recomputed afterwards): special float values, random bytes."""
    if not section:
        return False
    for _ in range(r.randrange(1, 9)):
        i = r.randrange(len(section))
        pat = r.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\xff\xff", b"\x00\x00\x00\x80",
                        bytes([r.randrange(256)]), b"\x7f", b"\x80"])
        section[i:i + len(pat)] = pat[:len(section) - i]
    return True


def mut_graph_io(doc, section, r):
    g = doc.get("graph")
    if not isinstance(g, dict):
        return False
    k = r.random()
    specs = [s for s in (g.get("inputs") or []) + (g.get("outputs") or []) if isinstance(s, dict)]
    if k < 0.5 and specs:
        s = r.choice(specs)
        if isinstance(s.get("shape"), list) and s["shape"] and r.random() < 0.7:
            s["shape"][r.randrange(len(s["shape"]))] = r.choice(INTS[:12] + ["batch", "time", "", None])
        else:
            s["dtype"] = r.choice(DTYPES + ["onnx-type-8"])
    elif k < 0.75:
        ins = [s.get("name") for s in g.get("inputs") or () if isinstance(s, dict)]
        outs = [s.get("name") for s in g.get("outputs") or () if isinstance(s, dict)]
        if ins and outs:
            sp = g.setdefault("state_pairs", [])
            if isinstance(sp, list):
                sp.append([r.choice(ins), r.choice(outs)])
    else:
        g["opset"] = r.choice([1, 6, 7, 14, 17, 18, 25, 99, -1, "17", None, 2**63])
    return True


DOC_MUTATIONS = [mut_json, mut_json, mut_node, mut_node, mut_node, mut_entry, mut_entry, mut_data, mut_graph_io]


def structure_mutate(data, max_size, seed):
    r = random.Random(seed)
    parsed = parse(data)
    if parsed is None:
        return None
    fields, doc, section = parsed
    k = r.random()
    if k < 0.1:  # a header field (the checksum fixed half the time)
        i = r.choice([1, 2, 3, 4, 5, 6, 7])
        fields[i] = r.choice(INTS) & ((1 << 64) - 1) if r.random() < 0.7 else fields[i] + r.choice([-64, -1, 1, 64])
        return serialize(fields, doc, section, fix_counts=False, fix_crc=r.random() < 0.5)
    if k < 0.15:  # truncated or extended data section, header made consistent
        if section and r.random() < 0.7:
            del section[r.randrange(len(section)):]
        else:
            section += bytes(r.choice([1, 63, 64, 4096]))
        return serialize(fields, doc, section)
    for _ in range(r.choice([1, 1, 2, 3])):
        for _ in range(5):
            try:
                if r.choice(DOC_MUTATIONS)(doc, section, r):
                    break
            except (ValueError, TypeError, IndexError, KeyError, AttributeError):
                continue
    if r.random() < 0.9:
        fix_tensor_crcs(doc, section)
    try:
        return serialize(fields, doc, section, compress=r.random() < 0.95)
    except (ValueError, TypeError, OverflowError, struct.error, UnicodeEncodeError):
        return None


def custom_mutator(data, max_size, seed):
    # four in five, with valid checksums: structure level; else bytes
    return common.structure_or_bytes(data, max_size, seed, 5, lambda: structure_mutate(data, max_size, seed),
                                     atheris.Mutate)


def main():
    common.fuzz_main(common.one_weights, common.make_weight_seeds, custom_mutator)


if __name__ == "__main__":
    main()
