"""fileformat.py - the rnnengine weight file: reader and writer in plain Python (NumPy and
the standard library only), so tools and tests need no compiled code. The layout is
specified byte by byte in docs/FORMAT.md; this module follows it section by section.

    header (64 bytes) | JSON block (zlib) | zero padding to 64 | tensor data, each 64-aligned

Every field of an untrusted file is checked before it is used; a malformed file raises
FormatError naming the field and what was expected.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import zlib

import numpy as np

MAGIC = b"RNNE"
FORMAT_VERSION = 1
ALIGNMENT = 64
HEADER = struct.Struct("<4sIIIQQQQI12s")  # see docs/FORMAT.md, "Header"
assert HEADER.size == 64
FLAG_JSON_ZLIB = 1  # the JSON block is zlib-compressed (always set by this writer)
KNOWN_FLAGS = FLAG_JSON_ZLIB
MAX_JSON = 1 << 30         # 1 GiB of JSON is more than any graph needs
MAX_DIM = 1 << 40
MAX_NDIM = 16

# stored dtype name -> NumPy dtype of the stored elements
STORED = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "int64": np.int64,
          "int32": np.int32, "uint8": np.uint8, "bool": np.bool_}


class FormatError(ValueError):
    """The file is not a valid rnnengine weight file (the message says what is wrong)."""


def quantization_error_bound(dtype):
    """Per-element error of storing a float32 weight as `dtype` (docs/FORMAT.md):
    float16: relative 2**-11 for |w| >= 2**-14 (absolute 2**-25 below); int8: absolute
    max|row| / 254 (half a quantization step)."""
    return {"float32": "exact", "float16": "relative 2**-11 (absolute 2**-25 below 2**-14)",
            "int8": "absolute max|row|/254"}[dtype]


def _align(n, a=ALIGNMENT):
    return (n + a - 1) // a * a


def _rows(shape):
    """int8 scales: one per row, a row being the last axis."""
    if len(shape) == 0:
        return 1
    n = 1
    for d in shape[:-1]:
        n *= d
    return n


def quantize_int8(a):
    a = np.asarray(a, np.float32)
    rows = a.reshape(_rows(a.shape), -1) if a.size else a.reshape(_rows(a.shape), 0)
    amax = np.abs(rows).max(axis=1) if rows.shape[1] else np.zeros(rows.shape[0], np.float32)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8)
    return q.reshape(a.shape), scale


def write(path, graph, tensors, *, dtype="float32", quantize=None, metadata=None):
    """Writes a weight file. ``tensors``: name -> array; float tensors are stored as float32,
    except the names in ``quantize`` (None: every float tensor of 2 or more dimensions),
    which are stored as ``dtype`` ("float32", "float16" or "int8" with one scale per row)."""
    if dtype not in ("float32", "float16", "int8"):
        raise ValueError(f"dtype must be float32, float16 or int8, got {dtype!r}")
    meta = {"general.format_version": FORMAT_VERSION}
    try:
        from . import __version__
        meta["general.converter_version"] = __version__
    except ImportError:  # pragma: no cover
        pass
    meta.update(metadata or {})
    entries, blobs = [], []
    offset = 0
    for name, arr in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {name!r}")
        arr = np.asarray(arr)
        kind = arr.dtype.kind
        if kind == "f":
            wanted = dtype if (quantize is None and arr.ndim >= 2) or (quantize is not None and name in quantize) \
                else "float32"
            if not np.all(np.isfinite(arr)) and wanted != "float32":
                raise ValueError(f"tensor {name!r} holds non-finite values; it cannot be stored as {wanted}")
            if wanted == "float16":
                big = np.abs(arr).max() if arr.size else 0.0
                if big > np.finfo(np.float16).max:
                    raise ValueError(f"tensor {name!r} holds {big:g}, beyond the float16 range "
                                     f"(max {np.finfo(np.float16).max:g}); store it as float32 or int8")
                data, scales = arr.astype(np.float16), None
            elif wanted == "int8":
                data, scales = quantize_int8(arr)
            else:
                data, scales = arr.astype(np.float32), None
        elif arr.dtype == np.bool_ or arr.dtype.name in STORED:
            wanted, data, scales = arr.dtype.name, arr, None
        else:
            raise TypeError(f"tensor {name!r} has dtype {arr.dtype}, which the weight file cannot store "
                            f"(supported: float, {', '.join(k for k in STORED if k not in ('float16', 'int8'))})")
        raw = np.ascontiguousarray(data).tobytes()
        entry = {"name": name, "dtype": wanted, "shape": [int(d) for d in arr.shape], "offset": offset,
                 "nbytes": len(raw), "crc32": zlib.crc32(raw)}
        blobs.append((offset, raw))
        offset = _align(offset + len(raw))
        if scales is not None:
            sraw = scales.astype("<f4").tobytes()
            entry.update(scale_offset=offset, scale_nbytes=len(sraw), scale_crc32=zlib.crc32(sraw))
            blobs.append((offset, sraw))
            offset = _align(offset + len(sraw))
        entries.append(entry)
    doc = {"metadata": meta, "graph": graph, "tensors": entries}
    try:
        text = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise TypeError(f"graph and metadata must be JSON-serialisable: {e}") from None
    block = zlib.compress(text, 9)
    data_offset = _align(HEADER.size + len(block))
    file_size = data_offset + offset
    head = HEADER.pack(MAGIC, FORMAT_VERSION, FLAG_JSON_ZLIB, ALIGNMENT, len(block), len(entries), data_offset,
                       file_size, 0, b"\0" * 12)
    crc = zlib.crc32(head[:48] + block)
    head = HEADER.pack(MAGIC, FORMAT_VERSION, FLAG_JSON_ZLIB, ALIGNMENT, len(block), len(entries), data_offset,
                       file_size, crc, b"\0" * 12)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(head)
        f.write(block)
        f.write(b"\0" * (data_offset - HEADER.size - len(block)))
        pos = 0
        for off, raw in blobs:
            f.write(b"\0" * (off - pos))
            f.write(raw)
            pos = off + len(raw)
        f.write(b"\0" * (offset - pos))
    os.replace(tmp, path)  # never leave a half-written file under the final name


class WeightFile:
    """An open weight file: metadata, graph and tensors (views into a read-only memory map)."""

    def __init__(self, path, verify=True, use_mmap=True):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < HEADER.size:
                raise FormatError(f"{self.path}: {size} bytes is shorter than the {HEADER.size}-byte header "
                                  "(truncated or not an rnnengine weight file)")
            if use_mmap:
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            else:
                self._buf = f.read()
        try:
            self._parse(size, verify)
        except BaseException:
            self.close()
            raise

    def _fail(self, msg):
        raise FormatError(f"{self.path}: {msg}")

    def _parse(self, size, verify):
        buf = self._buf
        magic, version, flags, align, jsize, ntens, data_off, fsize, crc, _ = HEADER.unpack_from(buf, 0)
        if magic != MAGIC:
            self._fail(f"wrong magic {magic!r} (expected {MAGIC!r}): not an rnnengine weight file")
        if version > FORMAT_VERSION:
            self._fail(f"file is version {version}, this rnnengine reads up to version {FORMAT_VERSION}: "
                       "upgrade rnnengine")
        if version < 1:
            self._fail(f"invalid version {version}")
        if flags & ~KNOWN_FLAGS:
            self._fail(f"unknown flags {flags:#x} (known: {KNOWN_FLAGS:#x})")
        if align != ALIGNMENT:
            self._fail(f"alignment {align}, expected {ALIGNMENT}")
        if fsize != size:
            self._fail(f"the header says {fsize} bytes but the file has {size} (truncated or damaged)")
        if not 0 < jsize <= min(MAX_JSON, size - HEADER.size):
            self._fail(f"JSON block size {jsize} does not fit in the file ({size} bytes)")
        if data_off % ALIGNMENT or not HEADER.size + jsize <= data_off <= size:
            self._fail(f"data offset {data_off} is misaligned or outside [{HEADER.size + jsize}, {size}]")
        block = bytes(buf[HEADER.size:HEADER.size + jsize])
        if zlib.crc32(bytes(buf[:48]) + block) != crc:
            self._fail("header/JSON checksum mismatch (the file is damaged)")
        try:
            if flags & FLAG_JSON_ZLIB:
                d = zlib.decompressobj()
                text = d.decompress(block, MAX_JSON + 1)  # bounded: a zip bomb stops here
                if len(text) > MAX_JSON or d.unconsumed_tail:
                    self._fail(f"the JSON block expands past {MAX_JSON} bytes")
            else:
                text = block
            doc = json.loads(text.decode("utf-8"))
        except FormatError:
            raise
        except Exception as e:
            self._fail(f"the JSON block cannot be read ({type(e).__name__}: {e})")
        if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), list) or \
                not isinstance(doc.get("graph"), dict) or not isinstance(doc.get("metadata"), dict):
            self._fail("the JSON block must hold 'metadata', 'graph' (objects) and 'tensors' (a list)")
        if len(doc["tensors"]) != ntens:
            self._fail(f"the header counts {ntens} tensors, the table lists {len(doc['tensors'])}")
        self.version, self.flags = version, flags
        self.metadata, self.graph = doc["metadata"], doc["graph"]
        self._data_off, self._data_len = data_off, size - data_off
        self._entries = {}
        spans = []
        for k, e in enumerate(doc["tensors"]):
            self._check_entry(k, e, spans)
        spans.sort()
        for (a0, a1, n0), (b0, b1, n1) in zip(spans, spans[1:]):
            if b0 < a1:
                self._fail(f"tensors {n0!r} and {n1!r} overlap")
        self.names = list(self._entries)
        if verify:
            for name, e in self._entries.items():
                if zlib.crc32(self._slice(e["offset"], e["nbytes"])) != e["crc32"]:
                    self._fail(f"tensor {name!r}: checksum mismatch (its data is damaged)")
                if "scale_offset" in e and zlib.crc32(self._slice(e["scale_offset"], e["scale_nbytes"])) != e["scale_crc32"]:
                    self._fail(f"tensor {name!r}: checksum mismatch in its int8 scales")

    def _check_entry(self, k, e, spans):
        if not isinstance(e, dict):
            self._fail(f"tensor table entry {k} is not an object")
        name = e.get("name")
        if not isinstance(name, str):
            self._fail(f"tensor table entry {k} has no string name")
        if name in self._entries:
            self._fail(f"tensor {name!r} appears twice")
        dt = e.get("dtype")
        if dt not in STORED:
            self._fail(f"tensor {name!r}: unknown dtype {dt!r} (known: {', '.join(STORED)})")
        shape = e.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or \
                not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape):
            self._fail(f"tensor {name!r}: invalid shape {shape!r} (at most {MAX_NDIM} dimensions, "
                       f"each in [0, 2**40])")
        count = 1
        for d in shape:
            count *= d  # Python integers: no overflow
        itemsize = np.dtype(STORED[dt]).itemsize
        for key in ("offset", "nbytes", "crc32"):
            if type(e.get(key)) is not int or e[key] < 0:
                self._fail(f"tensor {name!r}: field {key!r} must be a non-negative integer, got {e.get(key)!r}")
        if e["nbytes"] != count * itemsize:
            self._fail(f"tensor {name!r}: shape {tuple(shape)} of {dt} needs {count * itemsize} bytes, "
                       f"the table says {e['nbytes']}")
        self._check_span(name, e["offset"], e["nbytes"], spans)
        if dt == "int8":
            for key in ("scale_offset", "scale_nbytes", "scale_crc32"):
                if type(e.get(key)) is not int or e[key] < 0:
                    self._fail(f"tensor {name!r}: int8 needs a non-negative integer {key!r}")
            if e["scale_nbytes"] != 4 * _rows(shape):
                self._fail(f"tensor {name!r}: {_rows(shape)} rows need {4 * _rows(shape)} bytes of scales, "
                           f"the table says {e['scale_nbytes']}")
            self._check_span(name + " (scales)", e["scale_offset"], e["scale_nbytes"], spans)
        self._entries[name] = e

    def _check_span(self, name, off, n, spans):
        if off % ALIGNMENT:
            self._fail(f"tensor {name!r}: offset {off} is not a multiple of {ALIGNMENT}")
        if off + n > self._data_len:
            self._fail(f"tensor {name!r}: bytes [{off}, {off + n}) lie past the end of the data "
                       f"({self._data_len} bytes)")
        if n:
            spans.append((off, off + n, name))

    def _slice(self, off, n):
        return memoryview(self._buf)[self._data_off + off:self._data_off + off + n]

    def info(self, name):
        e = self._entries[name]
        return {"dtype": e["dtype"], "shape": tuple(e["shape"]), "nbytes": e["nbytes"], "offset": e["offset"]}

    def raw(self, name):
        """The stored array (a read-only view into the file, no copy) and the int8 scales
        (or None)."""
        if name not in self._entries:
            raise KeyError(f"no tensor {name!r} in {self.path}")
        e = self._entries[name]
        dt = np.dtype(STORED[e["dtype"]])
        count = e["nbytes"] // dt.itemsize
        arr = np.frombuffer(self._buf, dtype=dt.newbyteorder("<"), count=count,
                            offset=self._data_off + e["offset"]).reshape(e["shape"])
        scales = None
        if e["dtype"] == "int8":
            scales = np.frombuffer(self._buf, dtype="<f4", count=e["scale_nbytes"] // 4,
                                   offset=self._data_off + e["scale_offset"])
        return arr, scales

    def tensor(self, name):
        """float32 (a view for float32 storage; dequantized for float16 / int8) or the stored
        integer array."""
        arr, scales = self.raw(name)
        e = self._entries[name]
        if e["dtype"] == "float16":
            return arr.astype(np.float32)
        if e["dtype"] == "int8":
            if arr.size == 0:
                return np.zeros(arr.shape, np.float32)
            rows = arr.reshape(_rows(arr.shape), -1).astype(np.float32) * scales[:, None]
            return rows.reshape(arr.shape)
        return arr

    def close(self):
        buf, self._buf = getattr(self, "_buf", None), None
        if isinstance(buf, mmap.mmap):
            try:
                buf.close()
            except BufferError:
                pass  # arrays still view the map; it closes when they are gone

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read(path, *, verify=True, mmap=True):
    """Opens a weight file (memory-mapped unless mmap=False), checking every field and, with
    verify=True, every checksum."""
    return WeightFile(path, verify, mmap)
