"""The weight file (docs/FORMAT.md): round trips at each storage dtype, zero-copy memory
mapping, alignment, the documented quantization bounds, the documented byte layout, and
hostile files built byte by byte, each of which must raise FormatError naming the problem
within a second."""
import json
import os
import re
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import rnnengine
from rnnengine.format import weightfile as fileformat
from rnnengine.format.weightfile import HEADER, FormatError

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "FORMAT.md")


def sample_tensors():
    rng = np.random.default_rng(7)  # the same tensors on every call
    return {"W": rng.standard_normal((2, 12, 5)).astype(np.float32),
            "R": rng.standard_normal((12, 3)).astype(np.float32) * 4,
            "bias": rng.standard_normal(12).astype(np.float32),
            "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
            "lens": np.array([3, 1], np.int32), "flag": np.array([True, False]),
            "codes": np.array([-128, -1, 0, 127], np.int8), "bytes": np.array([0, 255], np.uint8),
            "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 4), np.float32),
            "zeros": np.zeros((3, 4), np.float32)}


def write(tmp_path, dtype="float32", **kw):
    path = tmp_path / f"m.{dtype}.rnne"
    fileformat.write(str(path), {"nodes": [{"op": "Relu"}]}, sample_tensors(), dtype=dtype,
                     metadata={"source.producer": "test"}, **kw)
    return path


def mmap_base(a):
    """The object at the end of an array's .base chain."""
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a.obj if isinstance(a, memoryview) else a


# --- round trips -----------------------------------------------------------------------------

def test_float32_round_trip_is_exact_zero_copy_and_aligned(tmp_path):
    path = write(tmp_path)
    data_offset = HEADER.unpack_from(path.read_bytes())[6]
    with fileformat.read(str(path)) as wf:
        assert wf.version == fileformat.FORMAT_VERSION
        assert wf.names == list(sample_tensors())
        for name, want in sample_tensors().items():
            got = wf.tensor(name)
            assert got.dtype == (np.float32 if want.dtype.kind == "f" else want.dtype), name
            assert got.shape == want.shape and np.array_equal(got, want), name
            assert got.tobytes() == want.astype(got.dtype).tobytes(), name  # bitwise
            assert not got.flags.writeable, name
            info = wf.info(name)
            assert (data_offset + info["offset"]) % 64 == 0 and info["quantized"] is False
            assert info["nbytes"] == want.nbytes and info["shape"] == want.shape
        W = wf.tensor("W")
        assert type(mmap_base(W)).__name__ == "mmap"  # a view of the map, not a copy
        assert W.ctypes.data % 64 == 0  # aligned in memory too
        assert wf.raw("W")[1] is None and wf.raw("codes")[1] is None
    assert np.array_equal(W, sample_tensors()["W"])  # views stay valid after close()


def test_metadata_defaults_and_graph_survive(tmp_path):
    path = str(tmp_path / "m.rnne")
    graph = {"nodes": [{"op": "LSTM", "attrs": {"activations": ["Sigmoid", "Tanh", "Tanh"], "clip": 1.5}}],
             "naïve": "ünïcode ✓", "nested": [[1, [2, None]], {"a": True}]}
    meta = {"source.producer": "pytorch 2.3.0", "source.opset": 17, "source.sha256": "ab" * 32,
            "general.converter_version": "7", "train.extra": {"x": [1, 2]}}
    fileformat.write(path, graph, {"ŵ": np.ones((2, 2), np.float32)}, dtype="int8", metadata=meta)
    with fileformat.read(path) as wf:
        assert wf.graph == graph
        assert wf.metadata == dict(meta, **{"general.weight_dtype": "int8"})  # caller keys win
        assert wf.names == ["ŵ"]
    fileformat.write(path, {}, {})
    with fileformat.read(path) as wf:
        assert wf.metadata == {"general.weight_dtype": "float32", "general.converter_version": rnnengine.__version__}
        assert wf.graph == {} and wf.names == []


def check_bounds(got, want, dtype):
    """Every element within the documented bound of quantization_error_bound(dtype)."""
    bound = fileformat.quantization_error_bound(dtype)
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    if dtype == "float16":
        limit = np.where(np.abs(want) >= 2.0 ** -14, bound * np.abs(want), 2.0 ** -25)
    elif dtype == "int8":
        K = want.shape[-1] if want.ndim else 1
        rows = np.abs(want).reshape(-1, K).max(axis=1) if want.size else np.zeros(0)
        limit = (np.repeat(rows, K) * bound).reshape(want.shape) * (1 + 2e-7)  # float32 scale rounding
    else:
        limit = np.zeros(want.shape)
    assert np.all(err <= limit), (dtype, float((err - limit).max()))


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_quantized_storage_within_documented_bounds(tmp_path, dtype):
    path = write(tmp_path, dtype)
    t = sample_tensors()
    with fileformat.read(str(path)) as wf:
        for name in ("W", "R", "zeros", "empty"):
            got = wf.tensor(name)
            assert wf.info(name)["dtype"] == dtype and wf.info(name)["quantized"], name
            assert got.dtype == np.float32 and got.shape == t[name].shape
            check_bounds(got, t[name], dtype)
        # 1-D and 0-d float tensors and all integer tensors are not quantized by default
        for name in ("bias", "scalar"):
            assert wf.info(name)["dtype"] == "float32" and np.array_equal(wf.tensor(name), t[name])
        for name in ("ids", "lens", "flag", "codes", "bytes"):
            assert wf.info(name)["dtype"] == t[name].dtype.name and np.array_equal(wf.tensor(name), t[name])
        if dtype == "int8":
            q, scales = wf.raw("W")
            assert q.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == (24,)  # rows of (2, 12, 5)
            np.testing.assert_array_equal(scales, np.abs(t["W"]).reshape(24, 5).max(axis=1) / np.float32(127))
            assert np.abs(q).max() == 127 and q.min() >= -127
            np.testing.assert_array_equal(wf.raw("zeros")[1], np.ones(3, np.float32))  # all-zero rows: scale 1
            assert not wf.tensor("zeros").any()
            assert wf.raw("empty")[1].shape == (0,)


def test_error_bounds_hold_over_the_whole_range(tmp_path):
    rng = np.random.default_rng(1)
    sign = rng.choice([-1.0, 1.0], (64, 257))
    wide = (sign * 2.0 ** rng.uniform(-26, 15.99, (64, 257))).astype(np.float32)  # subnormal to 65504
    wide[0, :4] = [65504.0, -65504.0, 2.0 ** -24, 0.0]
    hard = rng.standard_normal((64, 257)).astype(np.float32)
    hard[:, 0] *= 1000  # an outlier per row: every other value lands in a few steps
    hard[1] = -np.arange(257, dtype=np.float32) / 2  # max|row| at a negative value, half steps
    hard[2] = 0
    for dtype, t in (("float16", wide), ("int8", hard), ("int8", wide)):
        path = str(tmp_path / "b.rnne")
        fileformat.write(path, {}, {"w": t}, dtype=dtype)
        with fileformat.read(path) as wf:
            check_bounds(wf.tensor("w"), t, dtype)
    assert fileformat.quantization_error_bound("float32") == 0.0
    assert fileformat.quantization_error_bound("float16") == 2.0 ** -11
    assert fileformat.quantization_error_bound("int8") == 1 / 254
    with pytest.raises(ValueError, match="dtype must be"):
        fileformat.quantization_error_bound("int4")


def test_empty_and_scalar_tensors_at_every_storage(tmp_path):
    tensors = {"s": np.array(-3.0, np.float32), "e0": np.zeros((0, 4), np.float32),
               "e1": np.zeros((4, 0), np.float32), "e2": np.zeros((2, 0, 3), np.float32),
               "v": np.array([1.5, -2.0], np.float32), "ie": np.zeros((0,), np.int64), "ib": np.array(True)}
    for dtype in ("float32", "float16", "int8"):
        path = str(tmp_path / f"e.{dtype}.rnne")
        fileformat.write(path, {}, tensors, dtype=dtype, quantize={"s", "e0", "e1", "e2", "v"})
        with fileformat.read(path) as wf:
            for name, want in tensors.items():
                got = wf.tensor(name)
                assert got.shape == want.shape and got.dtype == (np.float32 if want.dtype.kind == "f" else want.dtype)
                check_bounds(got, want, dtype if want.dtype.kind == "f" else "float32")
            if dtype == "int8":
                assert wf.raw("s")[1].shape == (1,) and wf.raw("e1")[1].shape == (4,)


def test_many_tensors_each_aligned_and_disjoint(tmp_path):
    rng = np.random.default_rng(3)
    tensors = {f"t{k}": rng.standard_normal((k % 7 + 1, k % 5)).astype(np.float32) for k in range(500)}
    path = tmp_path / "many.rnne"
    fileformat.write(str(path), {}, tensors, dtype="int8")
    _, fields, doc = parts(path)
    spans = []
    for e in doc["tensors"]:
        assert e["offset"] % 64 == 0 and e["scale_offset"] % 64 == 0
        spans += [(e["offset"], e["offset"] + e["nbytes"]), (e["scale_offset"], e["scale_offset"] + e["scale_nbytes"])]
    spans = sorted(s for s in spans if s[0] < s[1])
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert fields[6] % 64 == 0 and fields[6] + spans[-1][1] <= fields[7] == path.stat().st_size
    with fileformat.read(str(path)) as wf:
        assert len(wf.names) == 500
        for name, want in tensors.items():
            check_bounds(wf.tensor(name), want, "int8")


def test_quantize_selects_names(tmp_path):
    path = tmp_path / "q.rnne"
    fileformat.write(str(path), {}, sample_tensors(), dtype="int8", quantize={"R", "bias"})
    with fileformat.read(str(path)) as wf:
        assert [n for n in wf.names if wf.info(n)["quantized"]] == ["R", "bias"]
        assert wf.info("W")["dtype"] == "float32"
    with pytest.raises(ValueError, match="not given: nope"):
        fileformat.write(str(path), {}, sample_tensors(), dtype="int8", quantize={"nope"})
    with pytest.raises(ValueError, match="'ids' is int64; only float tensors"):
        fileformat.write(str(path), {}, sample_tensors(), dtype="int8", quantize={"ids"})


def test_without_mmap_and_without_verify_the_same_arrays(tmp_path):
    path = str(write(tmp_path, "int8"))
    with fileformat.read(path) as a, fileformat.read(path, mmap=False, verify=False) as b:
        assert a.names == b.names and a.metadata == b.metadata
        for name in a.names:
            assert np.array_equal(a.tensor(name), b.tensor(name)) and not b.tensor(name).flags.writeable
        assert type(mmap_base(b.raw("ids")[0])) is bytes


def test_closed_file_refuses_reads_clearly(tmp_path):
    wf = fileformat.read(str(write(tmp_path)))
    wf.close()
    wf.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        wf.tensor("W")
    with fileformat.read(str(write(tmp_path))) as wf:
        with pytest.raises(KeyError, match="no tensor 'nope'"):
            wf.raw("nope")


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.lists(st.integers(0, 5), max_size=4),
                          st.sampled_from(["float32", "float64", "int64", "int32", "int8", "uint8", "bool"]),
                          st.floats(1e-3, 1e3)), min_size=1, max_size=6),
       st.sampled_from(["float32", "float16", "int8"]), st.integers(0, 2 ** 32 - 1))
def test_random_round_trips(tmp_path_factory, specs, dtype, seed):
    rng = np.random.default_rng(seed)
    tensors = {}
    for k, (shape, dt, scale) in enumerate(specs):
        a = rng.standard_normal(shape) * scale
        tensors[f"t{k}"] = (a > 0) if dt == "bool" else a.astype(dt)
    path = tmp_path_factory.mktemp("rt") / "x.rnne"
    fileformat.write(str(path), {"k": 1}, tensors, dtype=dtype)
    size = path.stat().st_size
    with fileformat.read(str(path)) as wf:
        assert wf.graph == {"k": 1}
        for name, want in tensors.items():
            got, info = wf.tensor(name), wf.info(name)
            assert got.shape == want.shape and info["offset"] % 64 == 0 and info["offset"] + info["nbytes"] <= size
            if want.dtype.kind != "f":
                assert got.dtype == want.dtype and np.array_equal(got, want)
            else:
                assert got.dtype == np.float32
                stored = dtype if want.ndim >= 2 else "float32"
                assert info["dtype"] == stored
                check_bounds(got, want.astype(np.float32), stored)


def test_writer_refuses_bad_input(tmp_path):
    p = str(tmp_path / "a.rnne")
    with pytest.raises(ValueError, match="'W' holds 1e\\+06, beyond the float16 range"):
        fileformat.write(p, {}, {"W": np.full((2, 2), 1e6, np.float32)}, dtype="float16")
    for dtype in ("float16", "int8"):
        with pytest.raises(ValueError, match="non-finite"):
            fileformat.write(p, {}, {"W": np.array([[1, np.nan]], np.float32)}, dtype=dtype)
    with pytest.raises(ValueError, match="beyond the float32 range"):
        fileformat.write(p, {}, {"W": np.array([1e300])})
    with pytest.raises(TypeError, match="complex"):
        fileformat.write(p, {}, {"W": np.zeros(2, np.complex64)})
    with pytest.raises(TypeError, match="int16"):
        fileformat.write(p, {}, {"W": np.zeros(2, np.int16)})
    with pytest.raises(TypeError, match="names must be non-empty strings"):
        fileformat.write(p, {}, {3: np.zeros(2, np.float32)})
    with pytest.raises(TypeError, match="names must be non-empty strings"):
        fileformat.write(p, {}, {"": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="dtype must be"):
        fileformat.write(p, {}, {}, dtype="bfloat16")
    with pytest.raises(TypeError, match="graph must be a dict"):
        fileformat.write(p, [], {})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        fileformat.write(p, {"x": object()}, {})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        fileformat.write(p, {"x": float("nan")}, {})
    with pytest.raises(ValueError, match="namespaced"):
        fileformat.write(p, {}, {}, metadata={"producer": "x"})
    with pytest.raises(ValueError, match="at most 16"):
        fileformat.write(p, {}, {"W": np.zeros((1,) * 17, np.float32)})
    assert os.listdir(tmp_path) == []  # nothing written, no temporary left behind


def test_a_refused_write_leaves_the_old_file(tmp_path):
    path = write(tmp_path)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        fileformat.write(str(path), {"x": object()}, sample_tensors())
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]


# --- the documented layout -------------------------------------------------------------------

def test_header_bytes_are_as_documented(tmp_path):
    path = write(tmp_path, "int8")
    data = path.read_bytes()
    assert data[:4] == b"\x52\x4e\x4e\x45"
    (version, flags, alignment), = [struct.unpack_from("<III", data, 4)]
    json_size, n_tensors, data_offset, file_size = struct.unpack_from("<QQQQ", data, 16)
    crc, = struct.unpack_from("<I", data, 48)
    assert (version, flags, alignment) == (fileformat.FORMAT_VERSION, 1, 64)
    assert n_tensors == len(sample_tensors()) and file_size == len(data)
    assert data_offset % 64 == 0 and 64 + json_size <= data_offset and data[52:64] == bytes(12)
    assert crc == zlib.crc32(data[:48] + data[64:64 + json_size])
    assert data[64 + json_size:data_offset] == bytes(data_offset - 64 - json_size)
    doc = json.loads(zlib.decompress(data[64:64 + json_size]).decode("utf-8"))
    assert set(doc) == {"metadata", "graph", "tensors"}
    e = next(e for e in doc["tensors"] if e["name"] == "W")
    assert set(e) == {"name", "dtype", "shape", "offset", "nbytes", "crc32", "scale_offset", "scale_nbytes",
                      "scale_crc32"}
    start = data_offset + e["offset"]
    assert e["crc32"] == zlib.crc32(data[start:start + e["nbytes"]])
    assert "scale_offset" not in next(e for e in doc["tensors"] if e["name"] == "codes")


def test_the_plain_python_example_in_the_doc_reads_a_file(tmp_path):
    code = re.search(r"## Reading a file with plain Python.*?```python\n(.*?)```", open(DOC).read(), re.S).group(1)
    path = write(tmp_path, "int8")
    env = {"path": str(path)}
    exec(code, env)
    with fileformat.read(str(path)) as wf:
        assert list(env["arrays"]) == wf.names
        for name in wf.names:
            assert np.array_equal(env["arrays"][name], wf.tensor(name)), name


def test_uncompressed_json_block_is_read(tmp_path):
    path = write(tmp_path)
    data, fields, doc = parts(path)
    fields[2] = 0
    rebuild(path, data, fields, doc, compress=False)
    with fileformat.read(str(path)) as wf:
        assert wf.graph == doc["graph"] and np.array_equal(wf.tensor("W"), sample_tensors()["W"])


# --- hostile files -------------------------------------------------------------------------

def parts(path):
    data = bytearray(open(path, "rb").read())
    fields = list(HEADER.unpack_from(data, 0))
    doc = json.loads(zlib.decompress(bytes(data[64:64 + fields[4]])))
    return data, fields, doc


def rebuild(path, data, fields, doc=None, fix_crc=True, block=None, compress=True):
    """Writes the file back with header `fields` and, when `doc` or `block` is given, a new
    JSON block (the data section moved along); recomputes the header checksum unless told not."""
    if doc is not None or block is not None:
        if block is None:
            text = json.dumps(doc).encode()
            block = zlib.compress(text) if compress else text
        payload = bytes(data[fields[6]:])
        new_off = (64 + len(block) + 63) // 64 * 64
        fields[4], fields[6], fields[7] = len(block), new_off, new_off + len(payload)
        data = bytearray(64) + block + bytes(new_off - 64 - len(block)) + payload
    if fix_crc:
        fields[8] = zlib.crc32(bytes(HEADER.pack(*fields)[:48]) + bytes(data[64:64 + fields[4]]))
    data[:64] = HEADER.pack(*fields)
    open(path, "wb").write(data)


def expect(path, match):
    t0 = time.perf_counter()
    with pytest.raises(FormatError, match=match) as info:
        fileformat.read(str(path))
    assert time.perf_counter() - t0 < 1.0  # refused quickly, nothing huge allocated
    assert str(path) in str(info.value)  # the message names the file


def edit_entry(tmp_path, name, change, dtype="float32"):
    path = write(tmp_path, dtype)
    data, fields, doc = parts(path)
    change(next(e for e in doc["tensors"] if e["name"] == name), doc)
    rebuild(path, data, fields, doc)
    return path


def test_truncated_files_are_refused_at_every_cut(tmp_path):
    """Cuts in the header, the JSON block, the padding, each tensor and each scale vector;
    refused by the size check, and still refused when the header is patched to agree."""
    path = write(tmp_path, "int8")
    data, fields, doc = parts(path)
    json_end, data_off = 64 + fields[4], fields[6]
    cuts = set(range(0, 65)) | {json_end // 2, json_end - 1, json_end, json_end + 1, data_off - 1, data_off}
    ends = []
    for e in doc["tensors"]:
        for off, n in ((e["offset"], e["nbytes"]), (e.get("scale_offset"), e.get("scale_nbytes"))):
            if off is not None and n:
                cuts |= {data_off + off, data_off + off + n // 2, data_off + off + n - 1}
                ends.append(data_off + off + n)
    cut = tmp_path / "cut.rnne"
    for n in sorted(cuts):
        cut.write_bytes(data[:n])
        expect(cut, "shorter than the 64-byte header|the header says the file has")
        if 64 <= n < max(ends):  # the same cut with file_size patched to match: deeper checks refuse it
            fields2 = list(fields)
            fields2[7] = n
            rebuild(cut, bytearray(data[:n]), fields2)
            expect(cut, "JSON block size|data offset|past the end")


def test_wrong_magic_version_flags_alignment(tmp_path):
    for index, value, match in [
            (0, b"GGUF", "wrong magic b'GGUF' \\(expected b'RNNE'\\)"),
            (1, fileformat.FORMAT_VERSION + 1,
             f"file is version {fileformat.FORMAT_VERSION + 1}, this rnnengine reads up to version "
             f"{fileformat.FORMAT_VERSION}"),
            (1, 2 ** 32 - 1, "file is version 4294967295"),
            (1, 0, "invalid version 0"),
            (2, 0x81, "unknown flags 0x81"),
            (3, 32, "alignment is 32, expected 64")]:
        path = write(tmp_path)
        data, fields, _ = parts(path)
        fields[index] = value
        rebuild(path, data, fields)
        expect(path, match)


@pytest.mark.parametrize("index,value,match", [
    (4, 0, "JSON block size 0"), (4, 1 << 62, "JSON block size"), (4, 2 ** 64 - 1, "JSON block size"),
    (6, 0, "data offset 0"), (6, 8, "data offset"), (6, 2 ** 64 - 64, "data offset"),
    (7, 2 ** 64 - 1, "header says the file has"), (5, 2 ** 64 - 1, "header counts"), (5, 0, "header counts")])
def test_header_sizes_and_counts(tmp_path, index, value, match):
    path = write(tmp_path)
    data, fields, _ = parts(path)
    fields[index] = value
    rebuild(path, data, fields)
    expect(path, match)


def test_damaged_header_or_json_fails_the_checksum(tmp_path):
    for pos in (24, 30, 48, 64, 70):  # n_tensors (passes the size checks), the CRC itself, JSON bytes
        path = write(tmp_path)
        data = bytearray(path.read_bytes())
        data[pos] ^= 0x01
        path.write_bytes(data)
        expect(path, "header/JSON checksum mismatch")
    path = write(tmp_path)  # appended bytes
    path.write_bytes(path.read_bytes() + bytes(64))
    expect(path, "header says the file has")


@pytest.mark.parametrize("block,match", [
    (b"\x78\x9c not zlib", "not a valid zlib stream"),
    (zlib.compress(b'{"metadata": {}, "gra'), "not valid JSON"),
    (zlib.compress(b'{"metadata": {}}')[:-3], "incomplete"),
    (zlib.compress(b'{"metadata": {}}') + b"junk", "followed by other bytes"),
    (zlib.compress(b"\xff\xfe{}"), "not valid UTF-8"),
    (zlib.compress(b"[1, 2]"), "must be an object"),
    (zlib.compress(b'{"metadata": {}, "graph": {}, "tensors": {}}'), "'tensors' \\(a list\\)"),
    (zlib.compress(b'{"metadata": [], "graph": {}, "tensors": []}'), "must be an object"),
    (zlib.compress(b"[" * 200000), "not valid JSON"),
    (zlib.compress(b'{"metadata": {"a.b": ' + b"9" * 5000 + b'}, "graph": {}, "tensors": []}'),
     "not valid JSON"),
])
def test_bad_json_blocks(tmp_path, block, match):
    path = write(tmp_path)
    data, fields, _ = parts(path)
    rebuild(path, data, fields, block=block)
    expect(path, match)


def test_zip_bomb_json_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(fileformat, "MAX_JSON", 1 << 16)
    from rnnengine import limits  # the bound the reader applies is Limits.max_metadata_bytes
    monkeypatch.setattr(limits, "_defaults", limits.Limits(max_metadata_bytes=fileformat.MAX_JSON))
    path = tmp_path / "big.rnne"
    fileformat.write(str(path), {"pad": "x" * (1 << 17)}, {})
    expect(path, "expands past 65536 bytes")
    path = write(tmp_path)  # the real limit: 80 MiB of zeros in an 80 kB block
    data, fields, _ = parts(path)
    z = zlib.compressobj(9)
    bomb = b"".join([z.compress(bytes(1 << 24)) for _ in range(5)]) + z.flush()
    rebuild(path, data, fields, block=bomb)
    expect(path, f"expands past {fileformat.MAX_JSON} bytes")


def test_corrupted_weights_name_the_tensor(tmp_path):
    path = write(tmp_path)
    data, fields, doc = parts(path)
    entry = next(e for e in doc["tensors"] if e["name"] == "R")
    data[fields[6] + entry["offset"] + 5] ^= 0x01
    path.write_bytes(data)
    expect(path, "tensor 'R': checksum mismatch")
    with fileformat.read(str(path), verify=False) as wf:  # readable when asked not to check
        assert wf.tensor("R").shape == (12, 3)
    path = write(tmp_path, "int8")
    data, fields, doc = parts(path)
    e = next(e for e in doc["tensors"] if e["name"] == "W")
    data[fields[6] + e["scale_offset"]] ^= 0x10
    path.write_bytes(data)
    expect(path, "tensor 'W': checksum mismatch in its int8 scales")


def W_like(shape):
    return lambda e, doc: e.update(shape=shape)


@pytest.mark.parametrize("change,match", [
    (W_like([1 << 62, 4]), "invalid shape \\[4611686018427387904, 4\\]"),
    (W_like([1 << 40, 1 << 40, 1 << 40]), "overflows a 64-bit size"),
    (W_like([-3, 4]), "invalid shape"),
    (W_like("(2,3)"), "invalid shape"),
    (W_like([2, 3.0]), "invalid shape"),
    (W_like([True, 60]), "invalid shape"),
    (W_like([1] * 17), "at most 16"),
    (W_like({"a": 1}), "invalid shape"),
    (lambda e, doc: e.update(shape=[1 << 40, 1 << 20], nbytes=4 << 60), "past the end of the data section"),
    (lambda e, doc: e.update(offset=e["offset"] + 4), "offset \\d+ is not a multiple of 64"),
    (lambda e, doc: e.update(offset=1 << 40), "past the end"),
    (lambda e, doc: e.update(offset=-64), "'offset' must be an integer in \\[0, 2\\*\\*64\\)"),
    (lambda e, doc: e.update(offset=1 << 64), "'offset' must be an integer"),
    (lambda e, doc: e.update(offset="0"), "'offset' must be an integer"),
    (lambda e, doc: e.update(nbytes=e["nbytes"] + 4), "needs 480 bytes, the table says 484"),
    (lambda e, doc: e.update(nbytes=-1), "'nbytes' must be an integer"),
    (lambda e, doc: e.pop("nbytes"), "'nbytes' must be an integer"),
    (lambda e, doc: e.update(crc32=1 << 32), "'crc32' must be an integer in \\[0, 2\\*\\*32\\)"),
    (lambda e, doc: e.update(dtype="complex64"), "unknown dtype 'complex64'"),
    (lambda e, doc: e.update(dtype=["float32"]), "unknown dtype"),
    (lambda e, doc: e.update(dtype="float64"), "unknown dtype"),
    (lambda e, doc: e.update(name=None), "entry 0 has no name"),
    (lambda e, doc: e.update(name=""), "entry 0 has no name"),
    (lambda e, doc: e.update(scale_offset=0), "must be all present"),
    (lambda e, doc: e.update(scale_offset=0, scale_nbytes=4, scale_crc32=0), "must be all present .* dtype float32"),
    (lambda e, doc: doc["tensors"].__setitem__(0, [1, 2]), "entry 0 is not an object"),
])
def test_bad_tensor_table_entries(tmp_path, change, match):
    expect(edit_entry(tmp_path, "W", change), match)


@pytest.mark.parametrize("change,match", [
    (lambda e, doc: e.update(scale_nbytes=e["scale_nbytes"] + 4), "24 rows need 96 bytes of int8 scales"),
    (lambda e, doc: e.pop("scale_crc32"), "must be all present"),
    (lambda e, doc: e.update(scale_offset=e["scale_offset"] + 4), "W \\(scales\\)'.* not a multiple of 64"),
    (lambda e, doc: e.update(scale_offset=1 << 50), "W \\(scales\\)'.* past the end"),
    (lambda e, doc: e.update(scale_offset=e["offset"]), "tensors 'W( \\(scales\\))?' and 'W( \\(scales\\))?' overlap"),
    (lambda e, doc: e.update(scale_crc32=-1), "'scale_crc32' must be an integer"),
])
def test_bad_int8_scale_fields(tmp_path, change, match):
    expect(edit_entry(tmp_path, "W", change, "int8"), match)


def test_overlapping_duplicate_and_miscounted_tensors(tmp_path):
    def overlap(e, doc):
        w = next(x for x in doc["tensors"] if x["name"] == "W")
        e["offset"] = w["offset"] + 64  # R starts inside W
    expect(edit_entry(tmp_path, "R", overlap), "tensors 'W' and 'R' overlap")

    def empty_inside(e, doc):  # an empty tensor inside another one's bytes occupies nothing: allowed
        e["offset"] = next(x for x in doc["tensors"] if x["name"] == "W")["offset"]
    with fileformat.read(str(edit_entry(tmp_path, "empty", empty_inside))) as wf:
        assert wf.tensor("empty").shape == (0, 4)

    path = write(tmp_path)
    data, fields, doc = parts(path)
    doc["tensors"].append(dict(doc["tensors"][0]))
    fields[5] += 1
    rebuild(path, data, fields, doc)
    expect(path, "tensor 'W' appears twice")


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
    for verify in (True, False):
        try:
            with fileformat.read(str(bad), verify=verify) as wf:
                for name in wf.names:
                    wf.tensor(name)
        except FormatError:
            pass


def test_hand_made_graphs_in_a_valid_file_are_refused_clearly(tmp_path):
    """The graph JSON of a weight file is checked before use (rnnengine.format.store): unknown ops,
    missing fields, wrong types and dangling tensor references raise FormatError naming them."""
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


def test_damaged_graph_structures_raise_the_formats_own_error(tmp_path):
    """The stored graph's JSON damaged field by field (keys deleted, values swapped for other
    JSON types, tensor attributes naming missing entries, subgraphs without nodes, at any list
    depth) and re-checksummed, as a hostile writer would: loading and running raises
    FormatError or another ValueError naming the problem, never TypeError / KeyError (found:
    5 of 3000 before attributes were checked recursively)."""
    import copy
    import json
    import random
    import zlib

    import rnnengine
    from rnnengine.format.store import load, save
    src = os.path.join(os.path.dirname(__file__), "data", "corpus", "torch_legacy_token_lstm_logsoftmax_op14.onnx")
    base = tmp_path / "m.rnne"
    save(rnnengine.convert(src), str(base), "int8")
    raw = base.read_bytes()
    hdr = fileformat.HEADER.unpack_from(raw, 0)
    doc = json.loads(zlib.decompress(raw[64:64 + hdr[4]]))
    values = [None, 0, -1, 1.5, "x", "", [], {}, [1, 2], {"a": 1}, True, 2 ** 70, "float32", [[1]],
              {"tensor": "nope"}, {"tensor": {"a": 1}}, {"graph": {}}, [{"graph": {"outputs": []}}]]

    def paths(o, pre=()):
        yield pre
        items = o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, list) else ()
        for k, v in items:
            yield from paths(v, pre + (k,))
    every = list(paths(doc))[1:]
    rng = random.Random(7)
    data = raw[hdr[6]:]
    for _ in range(400):
        d = copy.deepcopy(doc)
        for _ in range(rng.randint(1, 3)):
            o = d
            path = rng.choice(every)
            try:
                for k in path[:-1]:
                    o = o[k]
                if rng.random() < 0.25 and isinstance(o, dict):
                    del o[path[-1]]
                else:
                    o[path[-1]] = rng.choice(values)
            except (KeyError, IndexError, TypeError):
                pass
        block = zlib.compress(json.dumps(d).encode())
        off = (64 + len(block) + 63) // 64 * 64
        n_t = len(d["tensors"]) if isinstance(d.get("tensors"), list) else hdr[5]
        fields = [hdr[0], hdr[1], hdr[2], hdr[3], len(block), n_t, off, off + len(data)]
        crc = zlib.crc32(block, zlib.crc32(fileformat.HEADER.pack(*fields, 0, bytes(12))[:48]))
        p = tmp_path / "f.rnne"
        p.write_bytes(fileformat.HEADER.pack(*fields, crc, bytes(12)) + block + bytes(off - 64 - len(block)) + data)
        try:
            m = load(str(p))
            feeds = m.example_feeds(time=3, batch=1)
            if feeds is not None:
                m.run(feeds)
        except ValueError:  # FormatError, UnsupportedError, GraphRunError: errors that name the problem
            pass
