"""Damaged weight files: thousands of seeded mutations of real weight files (corpus models
converted at float32, float16 and int8) either raise the format's own error, FormatError,
or load into a model that runs or refuses cleanly (UnsupportedError / GraphRunError, the
engine's refusals); never TypeError, KeyError, IndexError, OverflowError, MemoryError or a
ValueError of another kind, and never a crash."""
import json
import os
import random
import traceback
import zlib

import pytest

import rnnengine
from rnnengine import _core
from rnnengine.format import weightfile as fileformat
from rnnengine.ops.handlers import UnsupportedError

CORPUS = os.path.join(os.path.dirname(__file__), "data", "corpus")
MODELS = ["torch_legacy_rnn_1layer_op14.onnx", "keras2_tf2onnx_masking_lstm_op17.onnx",
          "torch_legacy_grucell_loop_op14.onnx", "keras3_tf2onnx_conv1d_causal_lstm_op17.onnx"]
MUTATIONS = 2400


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("bases")
    out = []
    for name in MODELS:
        model = rnnengine.convert(os.path.join(CORPUS, name))
        for dtype in ("float32", "float16", "int8"):
            path = str(d / f"{name}.{dtype}.rnne")
            rnnengine.save(model, path, dtype)
            with open(path, "rb") as f:
                out.append(f.read())
    return out


def header(data):
    return list(fileformat.HEADER.unpack_from(data, 0))


def with_crc(data):
    """The header/JSON checksum recomputed, so the damage reaches the checks behind it."""
    h = header(data)
    block = bytes(data[64:64 + h[4]])
    h[8] = zlib.crc32(block, zlib.crc32(fileformat.HEADER.pack(*h)[:fileformat.CRC_SPAN]))
    data[:64] = fileformat.HEADER.pack(*h)
    return data


def doc_of(data):
    return json.loads(zlib.decompress(bytes(data[64:64 + header(data)[4]])))


def with_doc(data, doc):
    """The file with another JSON document, every header field consistent with it."""
    h = header(data)
    block = zlib.compress(json.dumps(doc).encode())
    off = (64 + len(block) + 63) // 64 * 64
    out = bytearray(64) + block + bytes(off - 64 - len(block)) + data[h[6]:]
    h[4], h[6], h[7] = len(block), off, len(out)
    out[:64] = fileformat.HEADER.pack(*h)
    return with_crc(out)


# values a JSON edit puts in place of another: other types, sizes and offsets past any limit,
# names of other things, subgraphs that are empty or malformed
VALUES = [None, True, False, 0, -1, 1, 2, 3, 7, 64, 2 ** 31, 2 ** 63, 2 ** 64, -2 ** 63, 1.5, 1e308, "", "x",
          "float32", "int8", "bool", [], [0], [1, 2], [-1], [2 ** 40, 2 ** 40], [[1]], ["a"], {}, {"tensor": "W"},
          {"tensor": 3}, {"graph": {}}, {"graph": {"nodes": [], "outputs": []}}, "LSTM", "Loop", "If", "Add"]


def paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for k, v in enumerate(obj):
            yield from paths(v, prefix + (k,))


def get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def edit_json(rng, doc):
    """1-3 edits that keep the JSON valid: a value replaced (another type, size, offset), a
    key or list item removed, a number shifted, a string changed, a list grown or shrunk,
    a value copied from elsewhere (names, shapes, nodes), a name swapped for another."""
    for _ in range(rng.randint(1, 3)):
        ps = list(paths(doc))[1:]
        p = rng.choice(ps)
        parent, key, v = get(doc, p[:-1]), p[-1], get(doc, p)
        r = rng.random()
        if r < 0.5:
            parent[key] = json.loads(json.dumps(rng.choice(VALUES)))
        elif r < 0.65:
            del parent[key]
        elif r < 0.8:
            if isinstance(v, bool) or v is None:
                parent[key] = not v
            elif isinstance(v, (int, float)):
                parent[key] = v + rng.choice([-64, -1, 1, 64, 2 ** 32])
            elif isinstance(v, str):
                parent[key] = rng.choice([v + "x", v[:-1], ""])
            elif isinstance(v, list) and v:
                parent[key] = v[:-1] if rng.random() < 0.5 else v + [v[0]]
        elif r < 0.9:
            parent[key] = json.loads(json.dumps(get(doc, rng.choice(ps))))
        else:
            names = [q for q in ps if isinstance(get(doc, q), str)]
            if names:
                parent[key] = get(doc, rng.choice(names))
    return doc


def mutate(rng, base):
    """One damaged file: (bytes, kind)."""
    data = bytearray(base)
    kind = rng.choice(["flip", "truncate", "insert", "header", "json-flip", "json", "json", "json"])
    if kind == "flip":  # anywhere: header, JSON block, padding, tensors (caught by the CRCs)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        data = data[:rng.randrange(len(data))]
    elif kind == "insert":
        i = rng.randrange(len(data))
        data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 70)))
    elif kind == "header":  # one field set to an edge value, the checksum usually fixed
        h = header(data)
        k = rng.randrange(1, 8)
        h[k] = rng.choice([0, 1, 2, 63, 64, 65, h[k] + 64, max(0, h[k] - 64), len(data),
                           2 ** 32 - 1 if k < 4 else 2 ** 64 - 1])
        data[:64] = fileformat.HEADER.pack(*h)
        if rng.random() < 0.8:
            data = with_crc(data)
    elif kind == "json-flip":  # the compressed block damaged behind a valid checksum
        i = 64 + rng.randrange(header(data)[4])
        data[i] ^= 1 << rng.randrange(8)
        data = with_crc(data)
    else:
        data = with_doc(data, edit_json(rng, doc_of(data)))
    return bytes(data), kind


CLEAN = (fileformat.FormatError, UnsupportedError, _core.GraphRunError)


def outcome(path, verify):
    """'format' (FormatError at load), 'ran', 'refused' (a clean refusal when run), or the
    traceback of anything else."""
    try:
        model = rnnengine.load(path, verify=verify)
    except fileformat.FormatError:
        return "format"
    except Exception:
        return "load: " + traceback.format_exc(limit=-3)
    try:
        feeds = model.example_feeds(time=3, batch=2)
        if feeds is not None:
            model.run(feeds)
        return "ran"
    except CLEAN:
        return "refused"
    except Exception:
        return "run: " + traceback.format_exc(limit=-3)


def test_damaged_weight_files_raise_the_format_error(bases, tmp_path):
    rng = random.Random(20261201)
    path = str(tmp_path / "damaged.rnne")
    seen, bad = {}, []
    for k in range(MUTATIONS):
        data, kind = mutate(rng, rng.choice(bases))
        with open(path, "wb") as f:
            f.write(data)
        r = outcome(path, verify=rng.random() < 0.7)
        if r not in ("format", "ran", "refused"):
            bad.append(f"mutation {k} ({kind}):\n{r}")
        else:
            seen[kind, r] = seen.get((kind, r), 0) + 1
    assert not bad, f"{len(bad)} of {MUTATIONS} damaged files escaped the format's error:\n" + "\n".join(bad[:3])
    # the mutations reach every stage: refused by the format, loaded and run, loaded and refused
    assert sum(v for (kind, r), v in seen.items() if r == "format") > MUTATIONS // 2
    assert seen.get(("json", "ran"), 0) > 20 and seen.get(("json", "refused"), 0) > 20, seen
    assert all(seen.get((kind, "format"), 0) > 20 for kind in ("flip", "truncate", "insert", "header", "json-flip",
                                                                 "json")), seen


def test_every_truncation_of_a_weight_file_is_refused(bases, tmp_path):
    path = str(tmp_path / "short.rnne")
    base = bases[2]  # int8: scales too
    for n in range(0, len(base), 7):
        with open(path, "wb") as f:
            f.write(base[:n])
        with pytest.raises(fileformat.FormatError):
            rnnengine.load(path)


@pytest.mark.parametrize("node, match", [
    ({"op": "Concat", "name": "cat", "inputs": ["x", "x"], "outputs": ["y"], "attrs": {}},
     "Concat needs its attribute 'axis'"),
    ({"op": "Concat", "name": "cat", "inputs": ["x", ""], "outputs": ["y"], "attrs": {"axis": 0}},
     "Concat input 1 .* is empty"),
    ({"op": "Relu", "name": "r", "inputs": ["x"], "outputs": [], "attrs": {}}, "Relu has 0 outputs"),
    ({"op": "Relu", "name": "r", "inputs": ["x"], "outputs": [""], "attrs": {}}, "at least one of them named"),
    ({"op": "Relu", "name": "r", "inputs": ["x"], "outputs": ["y", "z"], "attrs": {}}, "it writes 1 to 1"),
])
def test_nodes_missing_what_their_op_requires_are_format_errors(tmp_path, node, match):
    """Found by the mutation test: a required attribute or every output removed failed later
    with TypeError / IndexError when the model was planned."""
    graph = {"opset": 17, "inputs": [{"name": "x", "dtype": "float32", "shape": [2, 3]}],
             "outputs": [{"name": "y", "dtype": "float32", "shape": None}], "nodes": [node]}
    path = str(tmp_path / "n.rnne")
    fileformat.write(path, graph, {})
    with pytest.raises(fileformat.FormatError, match=match):
        rnnengine.load(path)


def test_declared_input_shapes_are_bounded(tmp_path):
    """A stream makes example inputs of the declared shape: a damaged declaration is refused
    at load, before anything of that size is allocated."""
    graph = {"opset": 17, "inputs": [{"name": "x", "dtype": "float32", "shape": [2 ** 20, 2 ** 20]}],
             "outputs": [{"name": "y", "dtype": "float32", "shape": None}],
             "nodes": [{"op": "Relu", "name": "r", "inputs": ["x"], "outputs": ["y"], "attrs": {}}]}
    path = str(tmp_path / "s.rnne")
    fileformat.write(path, graph, {})
    with pytest.raises(fileformat.FormatError, match=r"declares shape \[1048576, 1048576\], 1099511627776 "
                                                     r"elements, more than the limit max_tensor_elements"):
        rnnengine.load(path)
    graph["inputs"][0]["shape"] = [2 ** 41]
    fileformat.write(path, graph, {})
    with pytest.raises(fileformat.FormatError, match="invalid shape"):
        rnnengine.load(path)
