"""A stream's state as bytes, to move a stream to another process or machine (same model).

``rnnengine.state_to_bytes(stream)`` packs ``stream.get_state()`` (of any stream or batcher
session) with a header naming the model it belongs to; ``rnnengine.state_from_bytes(stream,
data)`` checks the header and the bytes, then ``set_state``s them: the stream continues
exactly where the other one stopped. State of another model, of another version of this
format, or damaged bytes are refused with StateError before anything changes.

Layout (integers little-endian)::

    offset  size  field
    0       4     magic b"RNST"
    4       2     version (2)
    6       2     reserved, 0
    8       32    the model's fingerprint (SHA-256, model_fingerprint below)
    40      4     n_skeleton: bytes of the JSON skeleton
    44      8     n_data: bytes of the array data
    52      4     CRC-32 of everything after this field (skeleton + data)
    56      n_skeleton  the state's structure as JSON; each array is {"a": [dtype, shape, offset]}
                        (dtype "float32" | "int64" | "int32" | "bool" | "uint8"; offset into the
                        data), a tuple {"t": [...]}, a dict {"d": {key: ...}}, a list [...],
                        numbers and strings as themselves
    56+n_skeleton  n_data  the arrays' bytes, C order, each at its offset
"""
from __future__ import annotations

import hashlib
import json
import struct
import zlib
from typing import Any

import numpy as np

from rnnengine.errors import StateError

__all__ = ["StateError", "state_to_bytes", "state_from_bytes", "model_fingerprint"]

MAGIC = b"RNST"
# 2: the state is rnnengine.State for every stream (version 1 held a layer stack's per-layer
# list and a graph's flat layer vectors; its bytes are refused by version, not misread)
VERSION = 2
_HEADER = struct.Struct("<4sHH32sIQI")
_DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "int64": np.dtype("<i8"), "int32": np.dtype("<i4"), "bool": np.dtype("?"),
           "uint8": np.dtype("u1")}
MAX_SKELETON = 16 << 20


def _hash_array(h: Any, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.data)


def model_fingerprint(model: Any) -> bytes:
    """SHA-256 of what a model computes: its layers' kinds, attributes and weights (a layer
    stack) or its graph and tensors (a converted model). Cached on the model."""
    cached = model.__dict__.get("_fingerprint")
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    h = hashlib.sha256()
    layers = getattr(model, "layers", None)
    if layers is not None and not hasattr(model, "graph"):
        h.update(b"layers" + repr(bool(model.batch_first)).encode())
        for layer in layers:
            h.update(repr((layer.kind, layer.direction, layer.hidden_size, layer.proj_size, layer.clip,
                           layer.input_forget, layer.linear_before_reset, layer._acts)).encode())
            for a in (layer.W, layer.R, layer.B, layer.P, layer.projection):
                if a is not None:
                    _hash_array(h, a)
    else:
        h.update(b"graph")

        def canon(v: Any) -> Any:
            if isinstance(v, np.ndarray):
                return ["ndarray", v.dtype.str, list(v.shape), hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()]
            if isinstance(v, dict):
                return {str(k): canon(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
            if isinstance(v, (list, tuple)):
                return [canon(x) for x in v]
            if isinstance(v, (np.integer, np.floating)):
                return v.item()
            if isinstance(v, bytes):
                return v.decode("latin-1")
            return v
        h.update(json.dumps(canon(model.graph), sort_keys=True, default=str).encode())
        for name in sorted(model.tensors):
            h.update(name.encode())
            _hash_array(h, model.tensors[name])
    digest = h.digest()
    model.__dict__["_fingerprint"] = digest
    return digest


def _model_of(stream: Any) -> Any:
    batcher = getattr(stream, "_batcher", None)  # a batcher session
    return batcher.model if batcher is not None else stream.model


def state_to_bytes(stream: Any) -> bytes:
    """The stream's (or session's) state as bytes (the layout above)."""
    state = stream.get_state()
    chunks: list[bytes] = []
    size = [0]

    def enc(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            name = next((k for k, d in _DTYPES.items() if v.dtype == d or v.dtype == d.newbyteorder("=")), None)
            if name is None:
                raise StateError(f"a state array of dtype {v.dtype} cannot be written")
            raw = np.ascontiguousarray(v, _DTYPES[name]).tobytes()
            off = size[0]
            pad = (-len(raw)) % 8
            chunks.append(raw + b"\0" * pad)
            size[0] += len(raw) + pad
            return {"a": [name, list(v.shape), off]}
        if isinstance(v, tuple):
            return {"t": [enc(x) for x in v]}
        if isinstance(v, list):
            return [enc(x) for x in v]
        if isinstance(v, dict):
            return {"d": {str(k): enc(x) for k, x in v.items()}}
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, (float, np.floating, str)) or v is None:
            return v
        raise StateError(f"a state entry of type {type(v).__name__} cannot be written")
    skeleton = json.dumps(enc(state), separators=(",", ":")).encode()
    data = b"".join(chunks)
    crc = zlib.crc32(data, zlib.crc32(skeleton))
    head = _HEADER.pack(MAGIC, VERSION, 0, model_fingerprint(_model_of(stream)), len(skeleton), len(data), crc)
    return head + skeleton + data


def state_from_bytes(stream: Any, data: bytes) -> None:
    """Restores a state written by state_to_bytes into this stream (or session) of the same
    model; StateError (naming what is wrong) for anything else, before anything changes."""
    state = decode(data, _model_of(stream))
    try:
        stream.set_state(state)
    except (TypeError, ValueError) as e:
        raise StateError(f"the state does not fit this stream: {e}") from None


def decode(data: bytes, model: Any) -> Any:
    """The state structure held in ``data``, checked against ``model``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StateError(f"state bytes must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise StateError(f"{len(data)} bytes are too short for a stream state ({_HEADER.size}-byte header)")
    magic, version, reserved, fp, n_skel, n_data, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StateError("these bytes are not a stream state (no RNST magic)")
    if version != VERSION:
        raise StateError(f"stream state format version {version}; this rnnengine reads version {VERSION}")
    if reserved:
        raise StateError("the header's reserved field is not 0: damaged bytes or a newer format")
    if n_skel > MAX_SKELETON or _HEADER.size + n_skel + n_data != len(data):
        raise StateError(f"the header announces {n_skel} + {n_data} bytes after it, the data has "
                         f"{len(data) - _HEADER.size}: truncated or damaged")
    body = data[_HEADER.size:]
    if zlib.crc32(body) != crc:
        raise StateError("the state's checksum does not match: the bytes are damaged")
    if fp != model_fingerprint(model):
        raise StateError("this state belongs to another model (its fingerprint differs): restore it into a "
                         "stream of the model it was saved from")
    try:
        skeleton = json.loads(body[:n_skel])
    except RecursionError:
        raise StateError("the state's structure is nested too deeply") from None
    except ValueError as e:
        raise StateError(f"the state's structure is not valid JSON: {e}") from None
    blob = memoryview(body)[n_skel:]

    def dec(v: Any, depth: int = 0) -> Any:
        if depth > 32:
            raise StateError("the state's structure is nested too deeply")
        if isinstance(v, list):
            return [dec(x, depth + 1) for x in v]
        if isinstance(v, dict):
            if set(v) == {"a"}:
                spec = v["a"]
                if not (isinstance(spec, list) and len(spec) == 3 and spec[0] in _DTYPES
                        and isinstance(spec[1], list) and len(spec[1]) <= 32
                        and all(type(d) is int and 0 <= d <= len(blob) for d in spec[1])
                        and type(spec[2]) is int and spec[2] >= 0):
                    raise StateError(f"a damaged array entry in the state: {str(spec)[:80]}")
                dt = _DTYPES[spec[0]]
                n = 1
                for d in spec[1]:
                    n *= d
                end = spec[2] + n * dt.itemsize
                if end > len(blob):
                    raise StateError(f"an array of the state runs past the data ({end} > {len(blob)} bytes)")
                try:
                    return np.frombuffer(blob, dt, count=n, offset=spec[2]).reshape(spec[1]).astype(
                        dt.newbyteorder("="), copy=True)
                except ValueError as e:
                    raise StateError(f"a damaged array entry in the state: {e}") from None
            if set(v) == {"t"} and isinstance(v["t"], list):
                return tuple(dec(x, depth + 1) for x in v["t"])
            if set(v) == {"d"} and isinstance(v["d"], dict):
                return {k: dec(x, depth + 1) for k, x in v["d"].items()}
            raise StateError("a damaged entry in the state's structure")
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise StateError("a damaged entry in the state's structure")
    return dec(skeleton)
