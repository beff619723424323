"""panels.py - the panel cache: a model's packed recurrent weights in a file beside its weight
file, memory-mapped read-only so that every process serving the model shares one copy.

The recurrent kernels (src_c/pack.c) read weights packed into panels of 16 columns, a layout
that differs from the weight file's row-major matrices; packing them at load gives every
process a private copy. ``rnnengine.load(path, shared=True)`` instead maps ``path +
".panels"`` (docs/FORMAT.md, "The panel cache", byte by byte) and hands its pages to the
kernels (rnn_cell_create_mapped): the page cache holds one copy for all processes.

Trust: the cache is derived data that anyone able to write beside the model may have
changed, so it is never read unchecked. Opening it checks every header and table field
(sizes, offsets, alignment, overlaps, checksum) and that it was made from this very weight
file (its size and header checksum); then C accepts a layer's mapped panels only when they
equal, byte for byte, what packing the layer's weights gives (rnn_cell_create_mapped packs
one 16-row panel at a time to compare, so no private copy of the weights is made). A cache
that fails any check is ignored and written again
(atomically: a new file renamed over the old one, so processes that mapped the old one keep
reading it, whole). Results are therefore bit-identical with and without sharing.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
import weakref
import zlib
from typing import Any, Callable

import numpy as np

from rnnengine.errors import FormatError

MAGIC = b"RNNP"
VERSION = 1
PANEL_WIDTH = 16         # columns per panel (pack.c RNN_PANEL; checked against _core.panel_width())
ALIGNMENT = 64
MAX_JSON = 16 << 20      # bytes of table JSON a reader accepts
# magic, version, panel_width, alignment, json_size, data_offset, file_size, source_size,
# source_crc32, meta_crc32, reserved
HEADER = struct.Struct("<4sIIIQQQQII8s")
CRC_SPAN = 52            # meta_crc32 covers header bytes [0, 52) followed by the JSON block
ITEMSIZE = {"float32": 4, "float16": 2, "int8": 1}
WHICH = ("Wp", "Rp", "Rhp")  # Stack.panel_raw's which = 0, 1, 2
TENSOR = "tensor"            # `which` of an entry holding a compact tensor widened to float32
CHUNK = 1 << 13              # elements compared at a time: small scratch, reused (see _widened)
assert HEADER.size == 64


class CacheInvalid(Exception):
    """A panel cache that cannot be used (stale, damaged or hostile): it is rebuilt."""


def panel_bytes(n: int, k: int, dtype: str) -> tuple[int, int]:
    """(data bytes, int8 scale bytes or 0) of the panels of an (n, k) matrix in `dtype`."""
    padded = -(-n // PANEL_WIDTH) * PANEL_WIDTH
    return padded * k * ITEMSIZE[dtype], (padded * 4 if dtype == "int8" else 0)


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def write(path: str, source: Any, entries: dict[tuple[str, int, str], tuple[Any, Any, int, int, str]]) -> None:
    """Writes a panel cache for weight file `source` (a WeightFile) atomically: a temporary
    file in the same directory, renamed over `path`. entries: {(stack key, cell, which):
    (data uint8, scales float32 or None, N, K, dtype)}."""
    table: list[dict[str, Any]] = []
    offset = 0
    for (key, cell, which), (data, scales, n, k, dtype) in sorted(entries.items()):
        e: dict[str, Any] = {"stack": key, "cell": cell, "which": which, "dtype": dtype, "N": n, "K": k,
             "offset": offset, "nbytes": int(data.nbytes)}
        offset = _align(offset + data.nbytes)
        if scales is not None:
            e.update(scale_offset=offset, scale_nbytes=int(scales.nbytes))
            offset = _align(offset + scales.nbytes)
        table.append(e)
    block = json.dumps({"entries": table}, separators=(",", ":")).encode()
    data_off = _align(HEADER.size + len(block))
    size = data_off + offset
    fields = (MAGIC, VERSION, PANEL_WIDTH, ALIGNMENT, len(block), data_off, size, source.file_size, source.meta_crc32)
    crc = zlib.crc32(block, zlib.crc32(HEADER.pack(*fields, 0, bytes(8))[:CRC_SPAN]))
    import tempfile  # here: its import (with random's) was 6 ms of every load()
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(HEADER.pack(*fields, crc, bytes(8)))
            f.write(block)
            for e, (data, scales, *_) in zip(table, (entries[k] for k in sorted(entries))):
                f.seek(data_off + e["offset"])
                f.write(np.ascontiguousarray(data).data)
                if scales is not None:
                    f.seek(data_off + e["scale_offset"])
                    f.write(np.ascontiguousarray(scales).data)
            f.truncate(size)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read(path: str, source: Any, opened: list[Any] | None = None
         ) -> dict[tuple[str, int, str], tuple[Any, Any, int, int, str]]:
    """The entries of the panel cache at `path` as read-only views of its map, after checking
    every field and that it was made from weight file `source`. Raises CacheInvalid naming
    the first problem (FileNotFoundError when there is no cache). opened: when given, gets
    (fd, (size, mtime_ns)) of the mapped file appended (PanelCache.check_unchanged)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        out = _read(f, st.st_size, source)
        if opened is not None:  # the mapped file itself (not whatever later has its name)
            opened.append((os.dup(f.fileno()), (st.st_size, st.st_mtime_ns)))
    return out


def _read(f: Any, size: int, source: Any) -> dict[tuple[str, int, str], tuple[Any, Any, int, int, str]]:
    """read() of the open file f of `size` bytes."""
    if size < HEADER.size:
        raise CacheInvalid(f"{size} bytes, shorter than the {HEADER.size}-byte header")
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    (magic, version, width, align, jsize, data_off, fsize, src_size, src_crc, crc, _) = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CacheInvalid(f"wrong magic {magic!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise CacheInvalid(f"version {version}, this rnnengine writes and reads version {VERSION}")
    if width != PANEL_WIDTH or align != ALIGNMENT:
        raise CacheInvalid(f"layout of {width}-column panels aligned to {align}; the kernels read "
                           f"{PANEL_WIDTH}-column panels aligned to {ALIGNMENT}")
    if fsize != size:
        raise CacheInvalid(f"the header says {fsize} bytes, the file has {size}")
    if not 0 < jsize <= min(MAX_JSON, size - HEADER.size):
        raise CacheInvalid(f"table size {jsize} out of range")
    if data_off % ALIGNMENT or not HEADER.size + jsize <= data_off <= size:
        raise CacheInvalid(f"data offset {data_off} must be a multiple of {ALIGNMENT} in [{HEADER.size + jsize}, {size}]")
    block = bytes(buf[HEADER.size:HEADER.size + jsize])
    if zlib.crc32(block, zlib.crc32(bytes(buf[:CRC_SPAN]))) != crc:
        raise CacheInvalid("header/table checksum mismatch")
    if (src_size, src_crc) != (source.file_size, source.meta_crc32):
        raise CacheInvalid("made from another weight file (or an earlier version of this one)")
    try:
        doc = json.loads(block.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CacheInvalid(f"the table is not JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise CacheInvalid("the table must be an object with an 'entries' list")
    out: dict[tuple[str, int, str], tuple[Any, Any, int, int, str]] = {}
    spans = []
    whole = np.frombuffer(buf, np.uint8)  # read-only: the map is ACCESS_READ
    for i, ent in enumerate(doc["entries"]):
        def field(name: str, kind: type) -> Any:
            v: Any = ent.get(name) if isinstance(ent, dict) else None
            in_range = kind is not int or (type(v) is int and 0 <= v < 1 << 48)
            if type(v) is not kind or not in_range:  # bool is not int here
                raise CacheInvalid(f"entry {i}: field {name!r} must be {kind.__name__}"
                                   f"{' in [0, 2**48)' if kind is int else ''}, got {str(v)[:40]}")
            return v
        key, cell, which, dtype = field("stack", str), field("cell", int), field("which", str), field("dtype", str)
        n, k, off, nbytes = field("N", int), field("K", int), field("offset", int), field("nbytes", int)
        if which not in WHICH + (TENSOR,) or dtype not in ITEMSIZE or cell > 1:
            raise CacheInvalid(f"entry {i}: which {which!r}, dtype {dtype!r} or cell {cell} unknown")
        if which == TENSOR and (dtype != "float32" or k != 1 or cell != 0):
            raise CacheInvalid(f"entry {i}: a widened tensor is float32, K 1, cell 0")
        want, want_scales = (n * 4, 0) if which == TENSOR else panel_bytes(n, k, dtype)
        if nbytes != want:
            raise CacheInvalid(f"entry {i}: {nbytes} bytes; {n} x {k} {dtype} panels have {want}")
        if (key, cell, which) in out:
            raise CacheInvalid(f"entry {i}: listed twice")
        ranges = [(off, nbytes)]
        if want_scales:
            soff, sbytes = field("scale_offset", int), field("scale_nbytes", int)
            if sbytes != want_scales:
                raise CacheInvalid(f"entry {i}: {sbytes} scale bytes, expected {want_scales}")
            ranges.append((soff, sbytes))
        elif "scale_offset" in ent or "scale_nbytes" in ent:
            raise CacheInvalid(f"entry {i}: scales belong to int8 panels only")
        for o, nb in ranges:
            if o % ALIGNMENT or data_off + o + nb > size:
                raise CacheInvalid(f"entry {i}: range [{o}, {o + nb}) misaligned or past the end of the file")
            if nb:
                spans.append((o, o + nb, i))
        views = [whole[data_off + o:data_off + o + nb] for o, nb in ranges]
        out[key, cell, which] = (views[0], views[1].view(np.float32) if want_scales else None, n, k, dtype)
    spans.sort()
    for (a0, a1, i), (b0, _, j) in zip(spans, spans[1:]):
        if b0 < a1:
            raise CacheInvalid(f"entries {i} and {j} overlap")
    return out


def _widened(stored: Any, scales: Any) -> Any:
    """(start, float32 chunk) over WeightFile.tensor's widening of a float16 / int8 tensor,
    a few rows at a time: the same elementwise operations, so the same bits."""
    if scales is None:  # float16
        flat = stored.reshape(-1)
        for i in range(0, flat.size, CHUNK):
            yield i, flat[i:i + CHUNK].astype(np.float32)
        return
    k = stored.shape[-1] if stored.ndim else 1
    q = stored.reshape(len(scales), k)
    rows = max(1, CHUNK // max(k, 1))
    for r in range(0, len(scales), rows):
        yield r * k, (q[r:r + rows].astype(np.float32) * scales[r:r + rows, None]).reshape(-1)


def _close_all(opened: list[tuple[int, Any]]) -> None:
    for fd, _ in opened:
        os.close(fd)


class PanelCache:
    """The panel cache of one loaded model (GraphModel.panel_cache): maps the file when the
    model is loaded, gives each recurrent stack its mapped panels when they equal a fresh
    packing (share), and writes the file again when a stack was missing or different."""

    def __init__(self, path: str, source: Any) -> None:
        self.path, self.source = path, source
        self.status = "not read"  # what happened, for users and tests
        # every map whose pages stacks and tensors may read: a descriptor of its file, with
        # the file's size and time then (closed when the cache is collected)
        self._opened: list[tuple[int, tuple[int, int]]] = []
        weakref.finalize(self, _close_all, self._opened)
        try:
            self.entries = read(path, source, self._opened)
            self.status = f"mapped {path}"
        except FileNotFoundError:
            self.entries, self.status = {}, f"no cache at {path} yet"
        except (CacheInvalid, OSError, ValueError) as e:
            self.entries, self.status = {}, f"{path} not used ({e}); it is rebuilt"

    def check_unchanged(self) -> None:
        """Raises FormatError when a mapped cache file was truncated or written again in place
        since it was read: the stacks read its pages (rnn_cell_create_mapped compared them
        with a packing only when each stack was made), so new bytes would silently change the
        numbers, and a truncation would kill the process (SIGBUS). One fstat per map, as for
        the weight file (WeightFile.check_unchanged, which calls this). A cache renamed over
        the name is no change: the map keeps the old file, whole."""
        for fd, (size, mtime) in self._opened:
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                raise FormatError(f"{self.path}: the panel cache was truncated or rewritten in place after it was "
                                  f"mapped (size {size} -> {st.st_size} bytes); its mapped panels can no longer "
                                  "be trusted: load the model again")

    def tensors(self) -> dict[str, Any]:
        """{name: float32 array} of the weight file's float16 / int8 tensors widened (exactly
        what WeightFile.tensor gives), as read-only views of the cache: one shared copy for
        all processes instead of one expanded copy each. Each entry is compared with the
        widening of the stored values chunk by chunk before it is used; missing or different
        ones are widened here and the cache is written again (or, when it cannot be, the
        private arrays are returned)."""
        names = [n for n in self.source.names if self.source.info(n)["quantized"]]
        out, missing = {}, {}
        for name in names:
            view = self._tensor(name)
            if view is None:
                missing[name] = self.source.tensor(name)
            else:
                out[name] = view
        if missing:
            raw = {(f"{TENSOR}|{n}", 0, TENSOR): (a.reshape(-1).view(np.uint8), None, a.size, 1, "float32")
                   for n, a in missing.items()}
            if not self._rewrite(raw):
                return out | missing
            for name, a in missing.items():
                view = self._tensor(name)
                out[name] = a if view is None else view
        return out

    def _tensor(self, name: str) -> Any:
        """The cache's copy of tensor `name` widened, when it equals the widening of the
        stored values bit for bit; else None."""
        hit = self.entries.get((f"{TENSOR}|{name}", 0, TENSOR))
        stored, scales = self.source.raw(name)
        if hit is None or hit[2] != stored.size:
            return None
        got = hit[0].view(np.uint32)
        for start, chunk in _widened(stored, scales):
            if not np.array_equal(got[start:start + chunk.size], chunk.view(np.uint32)):
                return None
        return hit[0].view(np.float32).reshape(stored.shape)

    def share(self, key: str, spec: dict[str, Any], pack: Callable[[], Any]) -> Any:
        """The stack of `spec` reading its panels from the cache (C compares them with a
        packing of the spec's weights, panel by panel, before accepting them), else the stack
        `pack()` builds in private memory, whose panels are then written to the cache and
        mapped in turn (or, when the cache cannot be written, used as they are)."""
        if spec.get("proj_size") or len(spec["cells"]) > 2:
            return pack()  # projections are not cached (docs/FORMAT.md)
        try:
            return self._mapped(key, spec)
        except ValueError:
            pass  # missing, stale or damaged: packed afresh and written below
        private = pack()
        raw = {}
        for d in range(len(spec["cells"])):
            for w, which in enumerate(WHICH):
                got = private.panel_raw(0, d, w)
                if got is not None:
                    raw[key, d, which] = got
        if not self._rewrite(raw):
            return private
        try:
            return self._mapped(key, spec)  # the private panels are freed on return
        except ValueError as e:  # the file changed between writing and mapping it
            warnings.warn(f"rnnengine: the panel cache {self.path} changed while it was written ({e}); "
                          "this layer's weights stay in private memory", RuntimeWarning, stacklevel=4)
            return private

    def _mapped(self, key: str, spec: dict[str, Any]) -> Any:
        """The stack of `spec` over the cache's panels for `key` (ValueError when they are
        missing or differ from the spec's weights)."""
        from rnnengine import _core  # the compiled core; format/ stays importable without it
        cells = []
        for d, cell in enumerate(spec["cells"]):
            mapped = {}
            for which in WHICH:
                hit = self.entries.get((key, d, which))
                mapped[which] = None if hit is None else (hit[0], hit[1])
            cells.append(dict(cell, mapped=mapped))
        return _core.Stack([dict(spec, cells=cells)])

    def _rewrite(self, raw: dict[tuple[str, int, str], Any]) -> bool:
        """Writes the cache again with `raw` replacing or adding its entries, then maps it.
        False (and a warning) when the file cannot be written: the model then runs from
        private panels, as without sharing."""
        keep = {k: v for k, v in self.entries.items() if k[0] not in {r[0] for r in raw}}
        try:
            write(self.path, self.source, keep | raw)
            self.entries = read(self.path, self.source, self._opened)
        except (OSError, CacheInvalid) as e:
            warnings.warn(f"rnnengine: the panel cache {self.path} cannot be written ({e}); this model's "
                          "recurrent weights stay in private memory", RuntimeWarning, stacklevel=4)
            self.status = f"cannot write {self.path}: {e}"
            return False
        self.status = f"wrote and mapped {self.path}"
        return True
