"""A stream's state as bytes: saved in one process, restored in another, the stream goes on
exactly; state of another model and damaged bytes are refused (StateError), never crash."""
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

import rnnengine
from rnnengine.runtime.batcher import Batcher
from rnnengine.runtime.portable import MAGIC, VERSION, _HEADER

rng = np.random.default_rng(11)
I, H = 5, 7
HERE = os.path.dirname(os.path.abspath(__file__))


def f32(*shape, scale=0.5):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


WEIGHTS = {"gW": f32(1, 3 * H, I), "gR": f32(1, 3 * H, H), "gB": f32(1, 6 * H),
           "lW": f32(1, 4 * H, H), "lR": f32(1, 4 * H, H), "lB": f32(1, 8 * H)}


def layer_model(w=WEIGHTS):
    return rnnengine.Model([rnnengine.GRU(w["gW"], w["gR"], w["gB"], linear_before_reset=1),
                            rnnengine.LSTM(w["lW"], w["lR"], w["lB"])])


CONTINUE = r"""
import sys, numpy as np, rnnengine
kind, model_path, state_path, xs_path, out_path = sys.argv[1:]
if kind == "layers":
    w = dict(np.load(model_path))
    model = rnnengine.Model([rnnengine.GRU(w["gW"], w["gR"], w["gB"], linear_before_reset=1),
                             rnnengine.LSTM(w["lW"], w["lR"], w["lB"])])
else:
    model = rnnengine.load(model_path)
s = model.stream()
rnnengine.state_from_bytes(s, open(state_path, "rb").read())
np.save(out_path, s.feed(np.load(xs_path)))
"""


@pytest.mark.parametrize("kind", ["layers", "graph"])
def test_a_state_continues_exactly_in_another_process(tmp_path, kind):
    model = layer_model()
    if kind == "layers":
        model_path = str(tmp_path / "w.npz")
        np.savez(model_path, **WEIGHTS)
    else:
        model_path = str(tmp_path / "m.rnne")
        rnnengine.save(model, model_path)
        model = rnnengine.load(model_path)
    xs = f32(9, 1, I, scale=1.0)
    s = model.stream()
    s.feed(xs[:4])
    data = rnnengine.state_to_bytes(s)
    assert data[:4] == MAGIC
    want = s.feed(xs[4:])
    (tmp_path / "state.bin").write_bytes(data)
    np.save(tmp_path / "xs.npy", xs[4:])
    r = subprocess.run([sys.executable, "-c", CONTINUE, kind, model_path, str(tmp_path / "state.bin"),
                        str(tmp_path / "xs.npy"), str(tmp_path / "out.npy")], capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), want)


def test_state_of_another_model_is_refused():
    a = layer_model()
    other = dict(WEIGHTS, lB=WEIGHTS["lB"] + 1e-3)  # one bias differs
    b = layer_model(other)
    s = a.stream()
    s.step(f32(I))
    data = rnnengine.state_to_bytes(s)
    target = b.stream()
    before = target.get_state()
    with pytest.raises(rnnengine.StateError, match="another model"):
        rnnengine.state_from_bytes(target, data)
    for x, y in zip(before, target.get_state()):  # nothing changed
        for p, q in zip(x if isinstance(x, tuple) else (x,), y if isinstance(y, tuple) else (y,)):
            np.testing.assert_array_equal(p, q)
    graph = rnnengine.convert(rnnengine.frontend.layer_export.layers_to_onnx(a))
    with pytest.raises(rnnengine.StateError, match="another model"):
        rnnengine.state_from_bytes(graph.stream(), data)


def test_damaged_bytes_are_refused_never_crash():
    model = layer_model()
    s = model.stream(batch_size=2)
    s.feed(f32(3, 2, I))
    data = rnnengine.state_to_bytes(s)
    target = model.stream(batch_size=2)
    cuts = sorted(set(list(range(0, 80)) + list(range(0, len(data), max(1, len(data) // 50)))))
    for n in cuts:
        with pytest.raises(rnnengine.StateError):
            rnnengine.state_from_bytes(target, data[:n])
    for pos in range(0, len(data), max(1, len(data) // 97)):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        with pytest.raises(rnnengine.StateError):
            rnnengine.state_from_bytes(target, bytes(bad))
    with pytest.raises(rnnengine.StateError):
        rnnengine.state_from_bytes(target, "not bytes")
    with pytest.raises(rnnengine.StateError, match="batch|fit"):  # a state of batch 2 into a batch-1 stream
        rnnengine.state_from_bytes(model.stream(batch_size=1), data)


def craft(model, skeleton, blob=b""):
    """Bytes with a valid header and checksum around any skeleton (what a hostile peer sends)."""
    from rnnengine.runtime.portable import model_fingerprint
    sk = json.dumps(skeleton).encode()
    crc = zlib.crc32(blob, zlib.crc32(sk))
    return _HEADER.pack(MAGIC, VERSION, 0, model_fingerprint(model), len(sk), len(blob), crc) + sk + blob


DEEP = [1]
for _ in range(40):
    DEEP = [DEEP]


def test_hostile_structures_with_valid_checksums_are_refused():
    model = layer_model()
    target = model.stream()
    for skeleton in ([{"a": ["float32", [2**40], 0]}], [{"a": ["float64", [1], 0]}], [{"a": ["float32", [-1], 0]}],
                     [{"x": 1}], {"d": {"k": {"t": 5}}}, DEEP,
                     [{"a": ["float32", [3], 2**62]}], "text", [1, 2]):
        with pytest.raises(rnnengine.StateError):
            rnnengine.state_from_bytes(target, craft(model, skeleton, b"\0" * 16))
    for other in (1, 3):  # 1: the structure before rnnengine.State; 3: a future one
        v = bytearray(craft(model, [1]))
        struct.pack_into("<H", v, 4, other)
        with pytest.raises(rnnengine.StateError, match=f"version {other}; this rnnengine reads version 2"):
            rnnengine.state_from_bytes(target, bytes(v))


def test_a_batcher_session_moves_to_another_batcher():
    model = layer_model()
    xs = f32(6, I, scale=1.0)
    ref = model.stream()
    want = np.stack([ref.step(x) for x in xs])
    with Batcher(model) as a, Batcher(model) as b:
        s = a.open()
        for x in xs[:3]:
            s.step(x)
        data = rnnengine.state_to_bytes(s)
        t = b.open()
        rnnengine.state_from_bytes(t, data)
        got = np.stack([t.step(x) for x in xs[3:]])
    np.testing.assert_array_equal(got, want[3:])


def test_deep_or_huge_structures_raise_state_error():
    model = layer_model()
    target = model.stream()
    deep = "[" * 100000 + "]" * 100000
    from rnnengine.runtime.portable import model_fingerprint
    sk = deep.encode()
    data = _HEADER.pack(MAGIC, 1, 0, model_fingerprint(model), len(sk), 0, zlib.crc32(b"", zlib.crc32(sk))) + sk
    with pytest.raises(rnnengine.StateError):
        rnnengine.state_from_bytes(target, data)
    for skeleton in ([{"a": ["float32", [0, 2**70], 0]}], [{"a": ["float32", [0] * 65, 0]}]):
        with pytest.raises(rnnengine.StateError):
            rnnengine.state_from_bytes(target, craft(model, skeleton))
