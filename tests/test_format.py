"""The weight file (docs/FORMAT.md): round trips at each storage dtype, zero-copy memory
mapping, alignment, the documented quantization bounds, and hostile files built byte by
byte, each of which must raise FormatError with a message naming the problem."""
import json
import time
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rnnengine import fileformat
from rnnengine.fileformat import HEADER, FormatError

rng = np.random.default_rng(7)


def sample_tensors():
    rng = np.random.default_rng(7)  # the same tensors on every call
    return {"W": rng.standard_normal((2, 12, 5)).astype(np.float32),
            "R": rng.standard_normal((12, 3)).astype(np.float32) * 4,
            "bias": rng.standard_normal(12).astype(np.float32),
            "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
            "lens": np.array([3, 1], np.int32), "flag": np.array([True, False]),
            "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 4), np.float32),
            "zeros": np.zeros((3, 4), np.float32)}


def write(tmp_path, dtype="float32", **kw):
    path = tmp_path / f"m.{dtype}.rnne"
    fileformat.write(str(path), {"nodes": [{"op": "Relu"}]}, sample_tensors(), dtype=dtype,
                     metadata={"source.producer": "test"}, **kw)
    return path


def test_float32_round_trip_is_exact_zero_copy_and_aligned(tmp_path):
    path = write(tmp_path)
    with fileformat.read(str(path)) as wf:
        assert wf.version == fileformat.FORMAT_VERSION
        assert wf.metadata["source.producer"] == "test"
        assert wf.graph == {"nodes": [{"op": "Relu"}]}
        for name, want in sample_tensors().items():
            got = wf.tensor(name)
            assert got.dtype == (np.float32 if want.dtype.kind == "f" else want.dtype)
            assert got.shape == want.shape and np.array_equal(got, want), name
            assert wf.info(name)["offset"] % 64 == 0
        W = wf.tensor("W")
        assert not W.flags.writeable  # a read-only view of the map ...
        base = W
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        if isinstance(base, memoryview):
            base = base.obj
        assert type(base).__name__ == "mmap"  # ... not a copy


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_quantized_storage_within_documented_bounds(tmp_path, dtype):
    path = write(tmp_path, dtype)
    t = sample_tensors()
    with fileformat.read(str(path)) as wf:
        for name in ("W", "R", "zeros"):
            got, want = wf.tensor(name), t[name]
            assert wf.info(name)["dtype"] == dtype
            if dtype == "float16":
                # relative 2**-11 for normal values, absolute 2**-25 below 2**-14
                bound = np.maximum(np.abs(want) * 2.0 ** -11, 2.0 ** -25)
            else:
                rows = np.abs(want).reshape(-1, want.shape[-1]).max(axis=1)
                bound = np.repeat(rows / 254, want.shape[-1]).reshape(want.shape) * (1 + 1e-6)
            assert np.all(np.abs(got - want) <= bound), name
        assert wf.tensor("empty").shape == (0, 4)
        # 1-D and integer tensors are never quantized
        assert wf.info("bias")["dtype"] == "float32" and np.array_equal(wf.tensor("bias"), t["bias"])
        assert wf.info("ids")["dtype"] == "int64"
        if dtype == "int8":
            q, scales = wf.raw("W")
            assert q.dtype == np.int8 and scales.shape == (24,)  # one scale per row of (2, 12, 5)


def test_quantize_selects_names(tmp_path):
    path = tmp_path / "q.rnne"
    fileformat.write(str(path), {}, sample_tensors(), dtype="int8", quantize={"R"})
    with fileformat.read(str(path)) as wf:
        assert wf.info("R")["dtype"] == "int8" and wf.info("W")["dtype"] == "float32"


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.lists(st.integers(0, 5), max_size=3),
                          st.sampled_from(["float32", "int64", "int32", "bool"])), min_size=1, max_size=6),
       st.sampled_from(["float32", "float16", "int8"]))
def test_random_round_trips(tmp_path_factory, specs, dtype):
    tensors = {}
    for k, (shape, dt) in enumerate(specs):
        a = rng.standard_normal(shape) * 3
        tensors[f"t{k}"] = a.astype(np.float32) if dt == "float32" else (a > 0 if dt == "bool" else a.astype(dt))
    path = tmp_path_factory.mktemp("rt") / "x.rnne"
    fileformat.write(str(path), {"k": 1}, tensors, dtype=dtype)
    with fileformat.read(str(path)) as wf:
        for name, want in tensors.items():
            got = wf.tensor(name)
            assert got.shape == want.shape
            if want.dtype.kind != "f" or wf.info(name)["dtype"] == "float32":
                assert np.array_equal(got, want)
            else:
                assert np.allclose(got, want, rtol=1e-2, atol=np.abs(want).max() / 100 + 1e-6)


def test_writer_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="beyond the float16 range"):
        fileformat.write(str(tmp_path / "a"), {}, {"W": np.full((2, 2), 1e6, np.float32)}, dtype="float16")
    with pytest.raises(ValueError, match="non-finite"):
        fileformat.write(str(tmp_path / "a"), {}, {"W": np.full((2, 2), np.inf, np.float32)}, dtype="int8")
    with pytest.raises(TypeError, match="complex"):
        fileformat.write(str(tmp_path / "a"), {}, {"W": np.zeros(2, np.complex64)})
    with pytest.raises(TypeError, match="names must be strings"):
        fileformat.write(str(tmp_path / "a"), {}, {3: np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="dtype must be"):
        fileformat.write(str(tmp_path / "a"), {}, {}, dtype="bfloat16")


# --- hostile files -------------------------------------------------------------------------

def parts(path):
    data = bytearray(open(path, "rb").read())
    fields = list(HEADER.unpack_from(data, 0))
    block = bytes(data[64:64 + fields[4]])
    doc = json.loads(zlib.decompress(block))
    return data, fields, doc


def rebuild(path, data, fields, doc=None, fix_crc=True):
    """Writes the file back with a new JSON block (when doc is given), keeping the data."""
    if doc is not None:
        block = zlib.compress(json.dumps(doc).encode())
        old_data_off = fields[6]
        payload = bytes(data[old_data_off:])
        new_off = (64 + len(block) + 63) // 64 * 64
        fields[4], fields[6], fields[7] = len(block), new_off, new_off + len(payload)
        data = bytearray(64) + block + b"\0" * (new_off - 64 - len(block)) + payload
    else:
        block = bytes(data[64:64 + fields[4]])
    if fix_crc:
        head = HEADER.pack(*fields[:8], 0, b"\0" * 12)
        fields[8] = zlib.crc32(head[:48] + block)
    data[:64] = HEADER.pack(*fields)
    open(path, "wb").write(data)


def expect(path, match):
    t0 = time.perf_counter()
    with pytest.raises(FormatError, match=match):
        fileformat.read(str(path))
    assert time.perf_counter() - t0 < 1.0  # refused quickly, nothing huge allocated


def test_truncated_files_are_refused_at_every_cut(tmp_path):
    path = write(tmp_path, "int8")
    data = open(path, "rb").read()
    cut = tmp_path / "cut.rnne"
    for n in sorted({0, 3, 10, 63, 64, 80, len(data) // 3, len(data) // 2, len(data) - 65, len(data) - 1}):
        cut.write_bytes(data[:n])
        expect(cut, "shorter than|truncated|says")


def test_wrong_magic_and_newer_version(tmp_path):
    path = write(tmp_path)
    data, fields, doc = parts(path)
    fields[0] = b"GGUF"
    rebuild(path, data, fields)
    expect(path, "wrong magic")
    path = write(tmp_path)
    data, fields, doc = parts(path)
    fields[1] = fileformat.FORMAT_VERSION + 1
    rebuild(path, data, fields)
    expect(path, f"version {fileformat.FORMAT_VERSION + 1}, this rnnengine reads up to version")


def test_header_and_json_corruption(tmp_path):
    path = write(tmp_path)
    data, fields, doc = parts(path)
    data[70] ^= 0xFF  # a byte of the JSON block
    open(path, "wb").write(data)
    expect(path, "checksum mismatch")
    path = write(tmp_path)
    data, fields, doc = parts(path)
    fields[2] = 0x80
    rebuild(path, data, fields)
    expect(path, "unknown flags")
    path = write(tmp_path)
    data, fields, doc = parts(path)
    bad = zlib.compress(b"{not json")
    data = bytearray(64) + bad + b"\0" * (fields[6] - 64 - len(bad)) + data[fields[6]:]
    fields[4] = len(bad)
    rebuild(path, data, fields)
    expect(path, "JSON block cannot be read")
    for jsize in (0, 1 << 62):
        path = write(tmp_path)
        data, fields, doc = parts(path)
        fields[4] = jsize
        rebuild(path, data, fields, fix_crc=False)
        expect(path, "JSON block size")


def test_corrupted_weights_name_the_tensor(tmp_path):
    path = write(tmp_path)
    data, fields, doc = parts(path)
    entry = next(e for e in doc["tensors"] if e["name"] == "R")
    data[fields[6] + entry["offset"] + 5] ^= 0x01
    open(path, "wb").write(data)
    expect(path, "tensor 'R': checksum mismatch")
    assert fileformat.read(str(path), verify=False).tensor("R").shape == (12, 3)  # readable when asked not to check


@pytest.mark.parametrize("change,match", [
    (lambda e: e.update(shape=[1 << 62, 4]), "invalid shape"),
    (lambda e: e.update(shape=[1 << 40, 1 << 40, 1 << 40]), "needs|invalid shape"),
    (lambda e: e.update(shape=[-3, 4]), "invalid shape"),
    (lambda e: e.update(shape="(2,3)"), "invalid shape"),
    (lambda e: e.update(offset=e["offset"] + 4), "not a multiple of 64"),
    (lambda e: e.update(offset=1 << 40), "past the end"),
    (lambda e: e.update(nbytes=e["nbytes"] + 4), "needs .* bytes"),
    (lambda e: e.update(nbytes=-1), "non-negative"),
    (lambda e: e.update(dtype="complex64"), "unknown dtype"),
    (lambda e: e.update(name=None), "no string name"),
])
def test_bad_tensor_table_entries(tmp_path, change, match):
    path = write(tmp_path)
    data, fields, doc = parts(path)
    change(next(e for e in doc["tensors"] if e["name"] == "W"))
    rebuild(path, data, fields, doc)
    expect(path, match)


def test_overlapping_duplicate_and_miscounted_tensors(tmp_path):
    path = write(tmp_path)
    data, fields, doc = parts(path)
    w = next(e for e in doc["tensors"] if e["name"] == "W")
    r = next(e for e in doc["tensors"] if e["name"] == "R")
    r["offset"] = w["offset"]
    rebuild(path, data, fields, doc)
    expect(path, "overlap")
    path = write(tmp_path)
    data, fields, doc = parts(path)
    doc["tensors"].append(dict(doc["tensors"][0]))
    fields[5] += 1
    rebuild(path, data, fields, doc)
    expect(path, "appears twice")
    path = write(tmp_path)
    data, fields, doc = parts(path)
    fields[5] += 7
    rebuild(path, data, fields, doc)
    expect(path, "counts")


def test_int8_scales_are_checked(tmp_path):
    path = write(tmp_path, "int8")
    data, fields, doc = parts(path)
    e = next(e for e in doc["tensors"] if e["dtype"] == "int8")
    e["scale_nbytes"] += 4
    rebuild(path, data, fields, doc)
    expect(path, "scales")
    path = write(tmp_path, "int8")
    data, fields, doc = parts(path)
    e = next(e for e in doc["tensors"] if e["dtype"] == "int8")
    data[fields[6] + e["scale_offset"]] ^= 0x10
    open(path, "wb").write(data)
    expect(path, "checksum mismatch in its int8 scales")


def test_misaligned_data_offset_and_file_size(tmp_path):
    path = write(tmp_path)
    data, fields, doc = parts(path)
    fields[6] += 8
    rebuild(path, data, fields)
    expect(path, "data offset")
    path = write(tmp_path)
    data = open(path, "rb").read() + b"\0" * 64
    open(path, "wb").write(data)
    expect(path, "header says")


def test_zip_bomb_json_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(fileformat, "MAX_JSON", 1 << 16)
    path = tmp_path / "big.rnne"
    fileformat.write(str(path), {"pad": "x" * (1 << 17)}, {})
    expect(path, "expands past|JSON block size")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, 10 ** 6))
def test_random_corruption_never_escapes_as_anything_but_format_error(tmp_path_factory, flips, cut):
    """Random byte changes and truncations of a valid file: reading it either succeeds or
    raises FormatError (never another exception, never a crash)."""
    base = tmp_path_factory.mktemp("fz")
    good = base / "good.rnne"
    fileformat.write(str(good), {"nodes": []}, sample_tensors(), dtype="int8")
    data = bytearray(good.read_bytes())
    for pos, val in flips:
        data[pos % len(data)] = val
    data = data[: max(1, cut % (len(data) + 1))] if cut % 3 == 0 else data
    bad = base / "bad.rnne"
    bad.write_bytes(bytes(data))
    try:
        with fileformat.read(str(bad)) as wf:
            for name in wf.names:
                wf.tensor(name)
    except FormatError:
        pass


def test_hand_made_graphs_in_a_valid_file_are_refused_clearly(tmp_path):
    """The graph JSON of a weight file is checked before use: unknown ops, missing fields,
    wrong types and dangling tensor references raise FormatError naming them."""
    import rnnengine
    good = {"opset": 17, "inputs": [{"name": "x", "dtype": "float32", "shape": [2, 3]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": None}], "state_pairs": [],
            "nodes": [{"op": "Relu", "name": "r", "inputs": ["x"], "outputs": ["y"], "attrs": {}}]}
    path = str(tmp_path / "g.rnne")
    fileformat.write(path, good, {})
    m = rnnengine.load(path)
    x = np.array([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]], np.float32)
    np.testing.assert_array_equal(m.run({"x": x})["y"], np.maximum(x, 0))
    bad_cases = [
        ({"nodes": [{"op": "Einsum", "inputs": ["x"], "outputs": ["y"]}]}, "does not run"),
        ({"opset": "17"}, "opset"),
        ({"inputs": [{"name": "x", "dtype": "complex64", "shape": [2]}]}, "dtype"),
        ({"inputs": [{"name": "x", "dtype": "float32", "shape": [-4]}]}, "shape"),
        ({"nodes": [{"op": "Relu", "inputs": "x", "outputs": ["y"]}]}, "inputs must be a list"),
        ({"nodes": [{"op": "Constant", "inputs": [], "outputs": ["y"], "attrs": {"value": {"tensor": "nope"}}}]},
         "missing tensor"),
        ({"state_pairs": [["x"]]}, "state_pairs"),
        ({"nodes": "all of them"}, "nodes must be a list"),
    ]
    for change, match in bad_cases:
        g = dict(good, **change)
        fileformat.write(path, g, {})
        with pytest.raises(FormatError, match=match):
            rnnengine.load(path)
