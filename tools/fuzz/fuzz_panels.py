#!/usr/bin/env python3
"""atheris fuzz target: hostile panel caches (docs/FORMAT.md, "The panel cache") through
rnnengine.load(path, shared=CACHE), then a run and a stream.
Usage:  python tools/fuzz/fuzz_panels.py [libFuzzer flags] [CORPUS_DIR ...]

An input is one byte choosing the weight file (even: a float32 file, odd: an int8 one, both
made once per process from fixed random weights: an LSTM and a GRU without
linear_before_reset, so every entry kind occurs) followed by the bytes of its panel cache.
The oracle is stronger than "a clean error": a cache is derived data, so whatever its bytes,
the load must succeed and give exactly (bit for bit) what the model gives without a cache; any
exception or difference is a finding. Seeds: the valid caches of both files. Mutations:
libFuzzer's bytes, and (custom mutator, four in five) edits of the header fields and of any
value of the table, written back with a valid checksum so they reach the checks behind it,
or of the data section (a value changed: only the byte comparison catches it).
"""
import contextlib
import json
import os
import random
import sys
import zlib

try:
    import atheris
except ImportError:  # the oracle and mutator are usable without it (tests); fuzzing is not
    atheris = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import fuzz_weights  # noqa: E402 - its JSON value mutations

with atheris.instrument_imports(include=["rnnengine"]) if atheris else contextlib.nullcontext():
    import numpy as np
    import rnnengine
    import rnnengine.format.panels as panels
    import rnnengine.format.store  # noqa: F401
    import rnnengine.runtime.graph  # noqa: F401

_STATE = {}


def _models():
    """{0: float32 file, 1: int8 file}: (path, inputs, expected outputs), made once."""
    if not _STATE:
        import tempfile
        d = tempfile.mkdtemp(prefix="rnne-fuzz-panels-")
        rng = np.random.default_rng(3)
        layers = [rnnengine.LSTM(rng.standard_normal((1, 4 * 9, 5)).astype(np.float32),
                                 rng.standard_normal((1, 4 * 9, 9)).astype(np.float32),
                                 rng.standard_normal((1, 8 * 9)).astype(np.float32)),
                  rnnengine.GRU(rng.standard_normal((1, 3 * 7, 9)).astype(np.float32),
                                rng.standard_normal((1, 3 * 7, 7)).astype(np.float32), linear_before_reset=0)]
        X = rng.standard_normal((4, 2, 5)).astype(np.float32)
        for k, dt in enumerate(("float32", "int8")):
            path = os.path.join(d, f"m_{dt}.rnne")
            rnnengine.save(rnnengine.Model(layers), path, dtype=dt)
            _STATE[k] = (path, X, _outputs(rnnengine.load(path), X))
    return _STATE


def _outputs(model, X):
    s = model.stream(batch_size=X.shape[1])
    return [np.asarray(model.run(X)).tobytes()] + [np.asarray(s.step(X[t])).tobytes() for t in range(len(X))]


def one_panels(data, cache_path):
    """One input: data[0] chooses the weight file, data[1:] is written as its panel cache.
    Raises (a finding) unless the model loads and computes exactly what it computes unshared."""
    if not data:
        return
    path, X, want = _models()[data[0] & 1]
    with open(cache_path + ".tmp", "wb") as f:
        f.write(data[1:])
    os.replace(cache_path + ".tmp", cache_path)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # writing the cache must succeed here: a warning is a finding too
        got = _outputs(rnnengine.load(path, shared=cache_path), X)
    if got != want:
        raise AssertionError("a model loaded with a panel cache computed something else")


def make_seeds(out_dir):
    import tempfile
    os.makedirs(out_dir, exist_ok=True)
    for k, (path, X, _) in _models().items():
        cache = os.path.join(tempfile.mkdtemp(), "c.panels")
        rnnengine.load(path, shared=cache).run(X)
        with open(cache, "rb") as f:
            data = bytes([k]) + f.read()
        with open(os.path.join(out_dir, f"seed{k}"), "wb") as f:
            f.write(data)
    return out_dir


def structure_mutate(data, max_size, seed):
    """One edit of a parsed cache, written back with a valid checksum; None when unparsable."""
    r = random.Random(seed)
    if len(data) < 1 + panels.HEADER.size:
        return None
    sel, buf = data[:1], bytearray(data[1:])
    f = list(panels.HEADER.unpack_from(buf, 0))
    jsize, data_off = f[4], f[5]
    if not 0 < jsize <= len(buf) - 64 or not 64 + jsize <= data_off <= len(buf):
        return None
    try:
        doc = json.loads(bytes(buf[64:64 + jsize]))
    except ValueError:
        return None
    section = bytearray(buf[data_off:])
    k = r.random()
    if k < 0.25:  # a header field (the checksum fixed below unless the field is the checksum)
        i = r.choice([1, 2, 3, 4, 5, 6, 7, 8])
        f[i] = r.choice(fuzz_weights.INTS) & (0xFFFFFFFF if i in (1, 2, 3, 8) else (1 << 64) - 1)
    elif k < 0.75:
        fuzz_weights.mut_json(doc, section, r)
    elif section:  # one value of the data: only the byte comparison with a packing catches it
        at = r.randrange(len(section))
        section[at] = r.randrange(256)
    block = json.dumps(doc, separators=(",", ":")).encode("utf-8", "surrogatepass")
    if k >= 0.25 or r.random() < 0.5:  # sizes and offsets follow the new table
        f[4] = len(block)
        f[5] = -(-(64 + len(block)) // 64) * 64
        f[6] = f[5] + len(section)
    f[9] = 0
    head = panels.HEADER.pack(*f)
    f[9] = zlib.crc32(block, zlib.crc32(head[:panels.CRC_SPAN]))
    out = panels.HEADER.pack(*f) + block
    if f[5] - len(out) + len(section) > max_size:
        return None  # a data offset mutated far past the end: libFuzzer's bytes instead
    out += bytes(max(0, f[5] - len(out))) + bytes(section)
    return sel + out


def custom_mutator(data, max_size, seed):
    return common.structure_or_bytes(data, max_size, seed, 5, lambda: structure_mutate(data, max_size, seed),
                                     atheris.Mutate if atheris else (lambda d, n: d))


def main():
    common.use_fuzz_limits()
    cache = common.scratch_path(".panels")

    def test_one_input(data):
        try:
            one_panels(data, cache)
        except Exception:
            common.save_finding(data)
            raise
    atheris.Setup(common.prepare_corpus(sys.argv, make_seeds), test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
