"""fileformat.py - the rnnengine weight file: reader and writer in plain Python (NumPy and
the standard library only), so tools and tests need no compiled code. The layout is
specified byte by byte in docs/FORMAT.md; this module follows it section by section.

    header (64 bytes) | JSON block (zlib) | zero padding to 64 | tensor data, each 64-aligned

Every field of an untrusted file is checked before it is used; a malformed file raises
FormatError naming the field and what was expected. Misuse of the writer (bad arguments)
raises TypeError / ValueError.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, NoReturn

import numpy as np
import numpy.typing as npt

from rnnengine._version import __version__
from rnnengine.errors import FormatError  # noqa: F401 (re-exported)
from rnnengine.limits import Limits, resolve

# --- layout (docs/FORMAT.md, "Layout" and "Header") --------------------------------------
MAGIC = b"RNNE"          # bytes 0..3 of every weight file
FORMAT_VERSION = 1       # the version this module writes, and the newest it reads
ALIGNMENT = 64           # the data section and every tensor in it start at a multiple of this
# magic, version, flags, alignment, json_size, n_tensors, data_offset, file_size, meta_crc32, reserved
HEADER = struct.Struct("<4sIIIQQQQI12s")
assert HEADER.size == 64
CRC_SPAN = 48            # meta_crc32 covers header bytes [0, 48) followed by the JSON block
FLAG_JSON_ZLIB = 1       # flags bit 0: the JSON block is zlib-compressed (always set by this writer)
KNOWN_FLAGS = FLAG_JSON_ZLIB  # a file with any other flag bit set is refused

# --- limits a reader enforces before allocating anything -----------------------------------
MAX_JSON = 64 << 20      # default bytes of JSON text after decompression (Limits.max_metadata_bytes)
JSON_CHUNK = 1 << 20     # the JSON block is decompressed this many bytes at a time
MAX_NDIM = 16            # dimensions of a tensor
MAX_DIM = 1 << 40        # largest single dimension

# stored dtype name -> little-endian NumPy dtype of the stored elements (FORMAT.md, "dtypes")
DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int8": np.dtype("i1"),
    "int64": np.dtype("<i8"), "int32": np.dtype("<i4"), "uint8": np.dtype("u1"), "bool": np.dtype("?")}
PLAIN = ("int64", "int32", "int8", "uint8", "bool")  # non-float input dtypes, stored as they are
SCALE_KEYS = ("scale_offset", "scale_nbytes", "scale_crc32")  # present exactly on int8-quantized entries


def quantization_error_bound(dtype: str) -> float:
    """Per-element error bound of storing a float32 weight w as `dtype` (docs/FORMAT.md):

    float32: 0.0 (exact).
    float16: 2**-11, relative: |w - w'| <= 2**-11 |w| for 2**-14 <= |w| <= 65504
             (absolute 2**-25 below 2**-14, where float16 is subnormal).
    int8:    1/254, relative to the row: |w - w'| <= max|row| / 254 (half a step of max|row|/127).
    """
    bounds = {"float32": 0.0, "float16": 2.0 ** -11, "int8": 1.0 / 254}
    if dtype not in bounds:
        raise ValueError(f"dtype must be float32, float16 or int8, got {dtype!r}")
    return bounds[dtype]


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _rows(shape: Sequence[int]) -> int:
    """int8 scales: one per row, a row being the last axis; (..., K) has prod(...) rows."""
    n = 1
    for d in shape[:-1]:
        n *= d
    return n


def quantize_int8(a: npt.ArrayLike) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """Symmetric int8 with one float32 scale per row: (q, scales), a ~= q * scales[row]."""
    a = np.asarray(a, np.float32)
    rows = a.reshape(_rows(a.shape), a.shape[-1] if a.ndim else 1)  # (R, K)
    amax = np.abs(rows).max(axis=1) if rows.shape[1] else np.zeros(rows.shape[0], np.float32)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)  # all-zero row: 1
    q = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8)
    return q.reshape(a.shape), scale


# --- writer ----------------------------------------------------------------------------------

def _stored(name: str, arr: npt.NDArray[Any], dtype: str,
            chosen: bool) -> tuple[str, npt.NDArray[Any], npt.NDArray[np.float32] | None]:
    """(stored dtype name, array to store, int8 row scales or None) for one input tensor."""
    if arr.dtype.kind == "f":
        target = dtype if chosen else "float32"
        if target != "float32" and not np.isfinite(arr).all():
            raise ValueError(f"tensor {name!r} holds non-finite values; it cannot be stored as {target} "
                             "(store it as float32)")
        if target == "float16":
            big = float(np.abs(arr).max()) if arr.size else 0.0
            if big > float(np.finfo(np.float16).max):
                raise ValueError(f"tensor {name!r} holds {big:g}, beyond the float16 range "
                                 f"(max {np.finfo(np.float16).max:g}); store it as float32 or int8")
            return "float16", arr.astype(DTYPES["float16"]), None
        if target == "int8":
            q, scales = quantize_int8(arr)
            return "int8", q, scales
        if arr.dtype.itemsize > 4 and arr.size:
            finite = np.abs(arr[np.isfinite(arr)])
            if finite.size and finite.max() > np.finfo(np.float32).max:
                raise ValueError(f"tensor {name!r} holds {finite.max():g}, beyond the float32 range")
        return "float32", arr.astype(DTYPES["float32"]), None
    if arr.dtype.name in PLAIN:
        return arr.dtype.name, arr.astype(DTYPES[arr.dtype.name]), None
    raise TypeError(f"tensor {name!r} has dtype {arr.dtype}, which the weight file cannot store "
                    f"(supported: float16/32/64, {', '.join(PLAIN)})")


def write(path: str | os.PathLike[str], graph: dict[str, Any], tensors: Mapping[str, npt.ArrayLike], *,
          dtype: str = "float32", quantize: Iterable[str] | None = None,
          metadata: Mapping[str, Any] | None = None) -> None:
    """Writes a weight file (atomically: a temporary file renamed over `path`).

    graph: a JSON-serialisable dict, stored as is. tensors: name -> array. Float tensors are
    stored as float32, except those chosen for quantization (the names in `quantize`; None
    chooses every float tensor of 2 or more dimensions), which are stored as `dtype`:
    "float32", "float16" or "int8" (one float32 scale per row). int64/int32/int8/uint8/bool
    tensors are stored as they are. metadata: namespaced keys ("source.sha256") -> JSON
    values, merged over the defaults general.converter_version and general.weight_dtype."""
    if dtype not in ("float32", "float16", "int8"):
        raise ValueError(f"dtype must be float32, float16 or int8, got {dtype!r}")
    if not isinstance(graph, dict):
        raise TypeError(f"graph must be a dict, got {type(graph).__name__}")
    for name in tensors:
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
    if quantize is not None:
        quantize = set(quantize)
        unknown = sorted(map(str, quantize - set(tensors)))
        if unknown:
            raise ValueError(f"quantize names tensors that are not given: {', '.join(unknown)}")
    meta: dict[str, Any] = {"general.weight_dtype": dtype}
    meta["general.converter_version"] = __version__
    for key in metadata or {}:
        if not isinstance(key, str) or "." not in key.strip("."):
            raise ValueError(f"metadata keys must be namespaced strings like 'source.producer', got {key!r}")
    meta.update(metadata or {})

    # (a): an ndarray is a buffer, which NumPy's stubs declare (__buffer__, PEP 688) for Python >= 3.12 only
    entries: list[dict[str, Any]]
    blobs: list[tuple[int, npt.NDArray[Any]]]
    entries, blobs, offset = [], [], 0  # blobs: (offset in the data section, contiguous array)
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if arr.ndim > MAX_NDIM:
            raise ValueError(f"tensor {name!r} has {arr.ndim} dimensions; at most {MAX_NDIM} are stored")
        chosen = arr.ndim >= 2 if quantize is None else name in quantize
        if chosen and quantize is not None and arr.dtype.kind != "f":
            raise ValueError(f"tensor {name!r} is {arr.dtype}; only float tensors can be quantized")
        kind, data, scales = _stored(name, arr, dtype, chosen)
        data = np.ascontiguousarray(data)
        entry = {"name": name, "dtype": kind, "shape": [int(d) for d in arr.shape], "offset": offset,
                 "nbytes": data.nbytes, "crc32": zlib.crc32(data)}  # type: ignore[arg-type]  # (a)
        blobs.append((offset, data))
        offset = _align(offset + data.nbytes)
        if scales is not None:
            scales = np.ascontiguousarray(scales, DTYPES["float32"])
            scale_crc = zlib.crc32(scales)  # type: ignore[arg-type]  # (a)
            entry.update(scale_offset=offset, scale_nbytes=scales.nbytes, scale_crc32=scale_crc)
            blobs.append((offset, scales))
            offset = _align(offset + scales.nbytes)
        entries.append(entry)

    doc = {"metadata": meta, "graph": graph, "tensors": entries}
    try:
        text = json.dumps(doc, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise TypeError(f"graph and metadata must be JSON-serialisable (finite numbers, str keys): {e}") from None
    block = zlib.compress(text, 9)
    data_offset = _align(HEADER.size + len(block))
    fields = [MAGIC, FORMAT_VERSION, FLAG_JSON_ZLIB, ALIGNMENT, len(block), len(entries), data_offset,
              data_offset + offset]
    crc = zlib.crc32(block, zlib.crc32(HEADER.pack(*fields, 0, bytes(12))[:CRC_SPAN]))
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(HEADER.pack(*fields, crc, bytes(12)))
            f.write(block)
            f.write(bytes(data_offset - HEADER.size - len(block)))
            pos = 0
            for off, data in blobs:
                f.write(bytes(off - pos))
                f.write(data.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # (a)
                pos = off + data.nbytes
            f.write(bytes(offset - pos))
        os.replace(tmp, path)  # never leave a half-written file under the final name
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --- reader ----------------------------------------------------------------------------------

class WeightFile:
    """An open weight file: metadata, graph and tensors (read-only views into a memory map,
    or with use_mmap=False into a private copy of the file). Use as a context manager or
    call close(); arrays already handed out stay valid.

    A memory-mapped file must not be truncated while its arrays are in use: reading a page
    past the new end kills the process (SIGBUS). ``check_unchanged()`` detects a file that
    was truncated or rewritten in place since it was opened (rnnengine.load reads into
    private memory by default, where this cannot happen; docs/FORMAT.md, "Reading while the
    file changes")."""

    _buf: mmap.mmap | bytes | None
    _fd: int | None
    _stat: tuple[int, int]
    _entries: dict[str, dict[str, Any]]
    _data_off: int
    _data_len: int
    version: int
    flags: int
    meta_crc32: int
    file_size: int
    metadata: dict[str, Any]
    graph: dict[str, Any]
    names: list[str]

    def __init__(self, path: str | os.PathLike[str], verify: bool = True, use_mmap: bool = True,
                 limits: Limits | None = None) -> None:
        self.path = os.fspath(path)
        self._buf = None
        self.limits = resolve(limits)
        self.mapped = bool(use_mmap)
        # checks of files derived from this one whose maps the model reads too (its panel
        # cache: rnnengine/format/panels.py), run by check_unchanged
        self.derived_checks: list[Callable[[], None]] = []
        with open(self.path, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            if size < HEADER.size:
                raise FormatError(f"{self.path}: {size} bytes is shorter than the {HEADER.size}-byte header "
                                  "(truncated, or not an rnnengine weight file)")
            if use_mmap:
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._fd = os.dup(f.fileno())  # fstat-ed by check_unchanged(); closed by close()
            else:
                self._buf = f.read()  # a file that shrank meanwhile fails the file_size check
                self._fd = None
            self._stat = (st.st_size, st.st_mtime_ns)
        try:
            self._parse(len(self._buf), verify)
        except BaseException:
            self.close()
            raise

    def check_unchanged(self) -> None:
        """Raises FormatError when a memory-mapped file has been truncated or rewritten in
        place since it was opened (its arrays could read past its end and kill the process,
        or read other numbers); a no-op for a file read into memory. One fstat of the open
        file (1-4 us). A file replaced by renaming another over its name is not a change:
        the map keeps the old file, whole. The files in derived_checks are checked too."""
        for check in self.derived_checks:
            check()
        if not self.mapped or self._fd is None:
            return
        st = os.fstat(self._fd)
        if (st.st_size, st.st_mtime_ns) != self._stat:
            raise FormatError(f"{self.path}: the weight file was truncated or rewritten on disk after it was "
                              f"loaded (size {self._stat[0]} -> {st.st_size} bytes); its memory-mapped weights "
                              "can no longer be read safely: load it again")

    def _fail(self, msg: str) -> NoReturn:
        raise FormatError(f"{self.path}: {msg}")

    def _parse(self, size: int, verify: bool) -> None:
        assert self._buf is not None  # open (set by __init__)
        # 1. the header, field by field, against the file's real size
        magic, version, flags, align, jsize, ntens, data_off, fsize, crc, _ = HEADER.unpack_from(self._buf, 0)
        if magic != MAGIC:
            self._fail(f"wrong magic {magic!r} (expected {MAGIC!r}): not an rnnengine weight file")
        if version > FORMAT_VERSION:
            self._fail(f"file is version {version}, this rnnengine reads up to version {FORMAT_VERSION}: "
                       "upgrade rnnengine")
        if version < 1:
            self._fail(f"invalid version {version} (versions start at 1)")
        if flags & ~KNOWN_FLAGS:
            self._fail(f"unknown flags {flags:#x} (this rnnengine knows {KNOWN_FLAGS:#x})")
        if align != ALIGNMENT:
            self._fail(f"alignment is {align}, expected {ALIGNMENT}")
        if fsize != size:
            self._fail(f"the header says the file has {fsize} bytes but it has {size} (truncated or damaged)")
        if not 0 < jsize <= size - HEADER.size:
            self._fail(f"JSON block size {jsize} does not fit in the file ({size} bytes)")
        if data_off % ALIGNMENT or not HEADER.size + jsize <= data_off <= size:
            self._fail(f"data offset {data_off} must be a multiple of {ALIGNMENT} in "
                       f"[{HEADER.size + jsize}, {size}]")
        # 2. the checksum of header and JSON block (always: it is cheap)
        block = bytes(self._buf[HEADER.size:HEADER.size + jsize])
        if zlib.crc32(block, zlib.crc32(bytes(self._buf[:CRC_SPAN]))) != crc:
            self._fail("header/JSON checksum mismatch (the file is damaged)")
        # 3. the JSON block, decompressed with a bound, then its three parts
        doc = self._json(block, flags, self.limits.max_metadata_bytes)
        if not isinstance(doc, dict) or not isinstance(doc.get("metadata"), dict) or \
                not isinstance(doc.get("graph"), dict) or not isinstance(doc.get("tensors"), list):
            self._fail("the JSON block must be an object with 'metadata' and 'graph' (objects) and "
                       "'tensors' (a list)")
        if len(doc["tensors"]) != ntens:
            self._fail(f"the header counts {ntens} tensors, the table lists {len(doc['tensors'])}")
        self.version, self.flags = version, flags
        self.meta_crc32, self.file_size = crc, size  # the file's identity (the panel cache keys on it)
        self.metadata, self.graph = doc["metadata"], doc["graph"]
        # 4. every tensor-table entry, then overlaps, then (verify) the data checksums
        self._data_off, self._data_len = data_off, size - data_off
        spans: list[tuple[int, int, str]]
        self._entries, spans = {}, []
        for k, e in enumerate(doc["tensors"]):
            self._check_entry(k, e, spans)
        spans.sort()
        for (a0, a1, n0), (b0, b1, n1) in zip(spans, spans[1:]):
            if b0 < a1:
                self._fail(f"tensors {n0!r} and {n1!r} overlap (bytes [{a0}, {a1}) and [{b0}, {b1}))")
        self.names = list(self._entries)
        if verify:
            for name, e in self._entries.items():
                if zlib.crc32(self._slice(e["offset"], e["nbytes"])) != e["crc32"]:
                    self._fail(f"tensor {name!r}: checksum mismatch (its data is damaged)")
                if "scale_offset" in e and \
                        zlib.crc32(self._slice(e["scale_offset"], e["scale_nbytes"])) != e["scale_crc32"]:
                    self._fail(f"tensor {name!r}: checksum mismatch in its int8 scales (damaged)")

    def _limit(self, what: str) -> NoReturn:
        lim = self.limits.max_metadata_bytes
        self._fail(f"{what}, more than the limit max_metadata_bytes={lim}; if the file is trusted, raise it "
                   "with rnnengine.load(..., limits=rnnengine.Limits(max_metadata_bytes=...))")

    def _inflate(self, block: bytes, most: int) -> bytearray:
        """The zlib stream `block` decompressed, refused past `most` bytes. Two passes: the
        first only counts (a zip bomb is refused holding one chunk at a time), the second
        fills a buffer of the counted size."""
        total = 0
        try:
            d = zlib.decompressobj()
            data = block
            while True:
                chunk = d.decompress(data, JSON_CHUNK)
                total += len(chunk)
                if total > most:
                    self._limit(f"the JSON block expands past {most} bytes")
                data = d.unconsumed_tail
                if not chunk and not data:
                    break
            if not d.eof or d.unused_data:
                self._fail("the JSON block's zlib stream is incomplete or followed by other bytes")
            text = bytearray(total)
            d, pos, data = zlib.decompressobj(), 0, block
            while pos < total:
                chunk = d.decompress(data, JSON_CHUNK)
                text[pos:pos + len(chunk)] = chunk
                pos += len(chunk)
                data = d.unconsumed_tail
        except zlib.error as e:
            self._fail(f"the JSON block is not a valid zlib stream ({e})")
        return text

    def _json(self, block: bytes, flags: int, most: int) -> Any:
        text: bytes | bytearray
        if flags & FLAG_JSON_ZLIB:
            text = self._inflate(block, most)
        else:
            if len(block) > most:
                self._limit(f"the JSON block has {len(block)} bytes")
            text = block
        # parsed, JSON takes up to ~50 times its text in Python objects (an empty list per
        # 3 bytes of "[],"): the objects the text can make are counted and bounded first
        cost = 128 * (text.count(b"[") + text.count(b"{")) + 40 * text.count(b",") + 32 * text.count(b'"')
        if cost > most:
            self._limit(f"the JSON block's {len(text)} bytes would parse into about {cost} bytes of objects")
        try:
            return json.loads(text.decode("utf-8"))
        except UnicodeDecodeError as e:
            self._fail(f"the JSON block is not valid UTF-8 ({e})")
        except (ValueError, RecursionError) as e:
            self._fail(f"the JSON block is not valid JSON ({type(e).__name__}: {e})")

    def _check_entry(self, k: int, e: Any, spans: list[tuple[int, int, str]]) -> None:
        if not isinstance(e, dict):
            self._fail(f"tensor table entry {k} is not an object")
        name = e.get("name")
        if not isinstance(name, str) or not name:
            self._fail(f"tensor table entry {k} has no name (a non-empty string), got {name!r}")
        if name in self._entries:
            self._fail(f"tensor {name!r} appears twice in the tensor table")
        dt = e.get("dtype")
        if not isinstance(dt, str) or dt not in DTYPES:
            self._fail(f"tensor {name!r}: unknown dtype {dt!r} (known: {', '.join(DTYPES)})")
        shape = e.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or \
                not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape):
            self._fail(f"tensor {name!r}: invalid shape {str(shape)[:80]} (a list of at most {MAX_NDIM} "
                       f"integers, each in [0, 2**40])")
        has_scales = [key in e for key in SCALE_KEYS]
        if any(has_scales) and (dt != "int8" or not all(has_scales)):
            self._fail(f"tensor {name!r}: {', '.join(SCALE_KEYS)} must be all present (int8 with row "
                       f"scales) or all absent; dtype {dt}, present: {[k for k in SCALE_KEYS if k in e]}")
        for key in ("offset", "nbytes", "crc32") + (SCALE_KEYS if all(has_scales) else ()):
            v = e.get(key)
            if type(v) is not int or not 0 <= v < (1 << 32 if key.endswith("crc32") else 1 << 64):
                self._fail(f"tensor {name!r}: field {key!r} must be an integer in "
                           f"[0, 2**{32 if key.endswith('crc32') else 64}), got {str(v)[:40]}")
        count = 1
        for d in shape:
            count *= d  # Python integers: the product cannot overflow here
        need = count * DTYPES[dt].itemsize
        if need >= 1 << 63:
            self._fail(f"tensor {name!r}: shape {tuple(shape)} of {dt} is {need} bytes, which overflows "
                       "a 64-bit size")
        if e["nbytes"] != need:
            self._fail(f"tensor {name!r}: shape {tuple(shape)} of {dt} needs {need} bytes, "
                       f"the table says {e['nbytes']}")
        self._check_span(name, e["offset"], need, spans)
        if all(has_scales):
            rows = _rows(shape)
            if e["scale_nbytes"] != 4 * rows:
                self._fail(f"tensor {name!r}: {rows} rows need {4 * rows} bytes of int8 scales, "
                           f"the table says {e['scale_nbytes']}")
            self._check_span(f"{name} (scales)", e["scale_offset"], e["scale_nbytes"], spans)
        self._entries[name] = e

    def _check_span(self, name: str, off: int, n: int, spans: list[tuple[int, int, str]]) -> None:
        if off % ALIGNMENT:
            self._fail(f"tensor {name!r}: offset {off} is not a multiple of {ALIGNMENT}")
        if off + n > self._data_len:
            self._fail(f"tensor {name!r}: bytes [{off}, {off + n}) lie past the end of the data section "
                       f"({self._data_len} bytes)")
        if n:
            spans.append((off, off + n, name))

    def _slice(self, off: int, n: int) -> memoryview:
        assert self._buf is not None  # open (read by _parse only)
        return memoryview(self._buf)[self._data_off + off:self._data_off + off + n]

    def _entry(self, name: str) -> dict[str, Any]:
        if self._buf is None:
            raise ValueError(f"{self.path} is closed")
        if name not in self._entries:
            raise KeyError(f"no tensor {name!r} in {self.path}")
        return self._entries[name]

    def info(self, name: str) -> dict[str, Any]:
        """{"dtype": stored dtype, "shape", "nbytes", "offset" (from the data section),
        "quantized": True for float16 and int8-with-scales, which tensor() expands to float32}."""
        e = self._entry(name)
        return {"dtype": e["dtype"], "shape": tuple(e["shape"]), "nbytes": e["nbytes"], "offset": e["offset"],
                "quantized": e["dtype"] == "float16" or "scale_offset" in e}

    def raw(self, name: str) -> tuple[npt.NDArray[Any], npt.NDArray[np.float32] | None]:
        """(stored array, int8 row scales or None): read-only views into the file, no copy."""
        e = self._entry(name)
        dt = DTYPES[e["dtype"]]
        arr = self._view(e["offset"], dt, e["nbytes"] // dt.itemsize).reshape(e["shape"])
        scales = None
        if "scale_offset" in e:
            scales = self._view(e["scale_offset"], DTYPES["float32"], e["scale_nbytes"] // 4)
        return arr, scales

    def _view(self, off: int, dt: np.dtype[Any], count: int) -> npt.NDArray[Any]:
        if count == 0:  # an empty tensor may sit at the very end of the file
            a = np.empty(0, dt)
            a.flags.writeable = False
            return a
        assert self._buf is not None  # open (_entry has checked)
        return np.frombuffer(self._buf, dtype=dt, count=count, offset=self._data_off + off)

    def tensor(self, name: str) -> npt.NDArray[Any]:
        """float32 (a zero-copy view for float32 storage; expanded for float16 and int8 with
        scales) or the stored integer / bool array (a view); read-only in every case."""
        arr, scales = self.raw(name)
        if arr.dtype == DTYPES["float16"]:
            out = arr.astype(np.float32)
        elif scales is not None:
            K = arr.shape[-1] if arr.ndim else 1
            out = (arr.reshape(len(scales), K).astype(np.float32) * scales[:, None]).reshape(arr.shape)  # q * scale[row]
        else:
            return arr
        out.flags.writeable = False  # read-only like the views, whatever the storage
        return out

    def close(self) -> None:
        buf, self._buf = self._buf, None
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)
        if isinstance(buf, mmap.mmap):
            try:
                buf.close()
            except BufferError:
                pass  # arrays still view the map; it is unmapped when the last of them is gone

    def __enter__(self) -> WeightFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<WeightFile {self.path!r} version {getattr(self, 'version', '?')}, " \
               f"{len(getattr(self, 'names', []))} tensors>"


def read(path: str | os.PathLike[str], *, verify: bool = True, mmap: bool = True,
         limits: Limits | None = None) -> WeightFile:
    """Opens a weight file: memory-mapped (mmap=False reads it into private memory), every
    field checked, and with verify=True every tensor's checksum too (the header/JSON
    checksum is always checked). limits: a rnnengine.Limits (its max_metadata_bytes bounds
    the JSON block); None: the defaults in force."""
    return WeightFile(path, verify, mmap, limits)
