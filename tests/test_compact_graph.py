"""Converted models with float16 / int8 recurrent weights: a weight file's compact storage
reaches the kernels exactly as stored, and convert/load(weight_dtype=...) choose it."""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rnnengine
from rnnengine import _core
from rnnengine.format import weightfile
from rnnengine.format.weightfile import quantize_int8
from rnnengine.runtime import compact
from oracle import WEIGHT_DTYPE_ATOL

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
CASES = [("LSTM", 1, 0), ("LSTM", 2, 0), ("GRU", 1, 0), ("GRU", 2, 1), ("RNN", 2, 0)]


def recurrent_onnx(kind, D, lbr, I=5, H=7, seed=0, head=False):
    """One LSTM/GRU/RNN node with constant, non-symmetric weights (and optionally a MatMul
    head), input x (T, N, I)."""
    rng = np.random.default_rng(seed)
    G = GATES[kind]
    W = (rng.standard_normal((D, G * H, I)) * 0.6 + 0.1).astype(np.float32)
    R = (rng.standard_normal((D, G * H, H)) * 0.4 - 0.05).astype(np.float32)
    B = (rng.standard_normal((D, 2 * G * H)) * 0.3).astype(np.float32)
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R"), numpy_helper.from_array(B, "B")]
    attrs = {"hidden_size": H, "direction": "bidirectional" if D == 2 else "forward"}
    if kind == "GRU":
        attrs["linear_before_reset"] = lbr
    nodes = [helper.make_node(kind, ["x", "W", "R", "B"], ["Y", "Yh"], name=f"/rnn/{kind}", **attrs)]
    outs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]
    if head:
        M = rng.standard_normal((H, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(M, "M"))
        nodes.append(helper.make_node("MatMul", ["Y", "M"], ["Z"], name="/head/MatMul"))
        outs.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "N", I])], outs,
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    return m, W, R, B


def cells_of(model):
    """The packed stacks of a GraphModel's recurrent nodes."""
    return [st for _, st in model._stacks.values()]


def x_of(T, N, I=5, seed=3):
    return np.random.default_rng(seed).standard_normal((T, N, I)).astype(np.float32)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("kind,D,lbr", CASES)
def test_file_storage_reaches_the_kernels_bit_for_bit(tmp_path, kind, D, lbr, dtype):
    """What the kernels read (the packed panels, unpacked) is exactly what the file stores:
    the same float16 bits, the same int8 codes and float32 row scales."""
    m, *_ = recurrent_onnx(kind, D, lbr)
    path = str(tmp_path / "m.rnne")
    rnnengine.save(rnnengine.convert(m), path, dtype=dtype)
    model = rnnengine.load(path)
    assert model.weight_dtype == dtype
    model.run({"x": x_of(4, 2)})
    assert compact.kernel_dtypes(model) == {f"/rnn/{kind}": dtype}
    (st,) = cells_of(model)
    wf = weightfile.read(path)
    H, G = 7, GATES[kind]
    split = kind == "GRU" and not lbr
    for name, which_rows in (("W", [(0, slice(None))]),
                             ("R", [(1, slice(0, 2 * H)), (2, slice(2 * H, 3 * H))] if split
                              else [(1, slice(None))])):
        q, scales = wf.raw(name)
        assert q.dtype == np.dtype(dtype).newbyteorder("<") or q.dtype == np.dtype(dtype)
        for d in range(D):
            for which, rows in which_rows:
                codes, sc = st.packed_weights(0, d, which)
                want = q[d][rows]
                assert codes.dtype == np.dtype(dtype)
                assert np.array_equal(codes.view(np.uint8), np.ascontiguousarray(want).view(np.uint8))
                if dtype == "int8":
                    want_s = scales.reshape(D, G * H)[d][rows]
                    assert np.array_equal(sc.view(np.uint32), want_s.view(np.uint32))
                else:
                    assert sc is None


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("kind,D,lbr", CASES)
def test_loaded_compact_file_matches_layer_stack_and_onnxruntime(tmp_path, kind, D, lbr, dtype):
    """A file saved as float16/int8 and loaded gives, bit for bit, what a layer-stack Model
    with the same weight_dtype gives on the stored values, over short (packed kernel) and long
    (BLAS input projection) sequences; and it stays within the storage's tolerance of
    onnxruntime on the float32 original."""
    m, W, R, B = recurrent_onnx(kind, D, lbr)
    path = str(tmp_path / "m.rnne")
    rnnengine.save(rnnengine.convert(m), path, dtype=dtype)
    model = rnnengine.load(path)
    wf = weightfile.read(path)
    Wd, Rd = wf.tensor("W"), wf.tensor("R")  # the stored values, widened
    layer = {"LSTM": rnnengine.LSTM, "GRU": rnnengine.GRU, "RNN": rnnengine.RNN}[kind]
    kw = {"linear_before_reset": lbr} if kind == "GRU" else {}
    stack = rnnengine.Model([layer(Wd, Rd, B, direction="bidirectional" if D == 2 else "forward", **kw)],
                            weight_dtype=dtype)
    # the layer stack's packer, given the stored values, makes the stored codes again (so the
    # comparison below compares the same kernels on the same weights)
    q, _ = wf.raw("W")
    assert np.array_equal(stack._stack.packed_weights(0, 0, 0)[0].view(np.uint8),
                          np.ascontiguousarray(q[0]).view(np.uint8))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    for T, N in ((3, 2), (9, 40)):  # 6 rows: packed input projection; 360 rows: BLAS (below AVX-512)
        x = x_of(T, N)
        got = model.run({"x": x})["Y"]  # (T, D, N, H)
        want, _ = stack.run(x)  # (T, N, D*H)
        assert np.array_equal(got, want.reshape(T, N, D, 7).transpose(0, 2, 1, 3))
        ref = sess.run(["Y"], {"x": x})[0]
        assert np.abs(got - ref).max() <= WEIGHT_DTYPE_ATOL[dtype]


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_convert_weight_dtype_equals_the_saved_file(tmp_path, dtype):
    """convert(weight_dtype=...) rounds the float32 weights in the packer exactly as the
    writer rounds them into the file: the same codes, the same results (short sequences,
    where the input projection is packed too; long ones use float32 W through BLAS, which
    for the file is the stored values and for convert the original ones)."""
    m, *_ = recurrent_onnx("LSTM", 2, 0, seed=5)
    conv = rnnengine.convert(m, weight_dtype=dtype)
    assert conv.weight_dtype == dtype
    path = str(tmp_path / "m.rnne")
    rnnengine.save(rnnengine.convert(m), path, dtype=dtype)
    loaded = rnnengine.load(path)
    x = x_of(5, 3)
    assert np.array_equal(conv.run({"x": x})["Y"], loaded.run({"x": x})["Y"])
    for which in (0, 1):
        for d in (0, 1):
            a, b = cells_of(conv)[0].packed_weights(0, d, which), cells_of(loaded)[0].packed_weights(0, d, which)
            assert np.array_equal(a[0].view(np.uint8), b[0].view(np.uint8))
    # and float32 kernels differ from both (the storage really changed the kernels)
    assert not np.array_equal(rnnengine.convert(m).run({"x": x})["Y"], conv.run({"x": x})["Y"])


def test_load_weight_dtype_overrides_the_storage(tmp_path):
    m, W, R, B = recurrent_onnx("GRU", 1, 0, seed=7, head=True)
    path = str(tmp_path / "m.rnne")
    rnnengine.save(rnnengine.convert(m), path, dtype="int8")
    x = x_of(6, 2)
    wf = weightfile.read(path)
    # float32 kernels on the stored values: exactly the stored values widened
    f32 = rnnengine.load(path, weight_dtype="float32")
    out = f32.run({"x": x})
    codes, scales = cells_of(f32)[0].packed_weights(0, 0, 0)
    assert codes.dtype == np.float32 and scales is None
    assert np.array_equal(codes, wf.tensor("W")[0])
    # as stored: int8, and the MatMul head runs float32 on its stored (int8) values
    as_stored = rnnengine.load(path)
    assert as_stored.weight_dtype == "int8"
    got = as_stored.run({"x": x})
    assert not np.array_equal(got["Y"], out["Y"])
    # float16 kernels over the int8 file's values: the packer rounds the widened values
    f16 = rnnengine.load(path, weight_dtype="float16")
    f16.run({"x": x})
    assert compact.kernel_dtypes(f16) == {"/rnn/GRU": "float16"}
    codes, _ = cells_of(f16)[0].packed_weights(0, 0, 0)
    assert np.array_equal(codes, wf.tensor("W")[0].astype(np.float16))
    # memory-mapped: the same kernels, the same results
    mapped = rnnengine.load(path, mmap=True)
    assert all(np.array_equal(mapped.run({"x": x})[k], got[k]) for k in got)


def test_as_stored_keeps_float32_for_weights_not_stored_compact(tmp_path):
    """A file whose recurrent R is stored float32 but W int8 (hand-made: rnnengine.save
    quantizes both) loaded as stored: the node runs float32 kernels, R is not rounded."""
    m, *_ = recurrent_onnx("LSTM", 1, 0, seed=2)
    model = rnnengine.convert(m)
    path = str(tmp_path / "mixed.rnne")
    meta = dict(model.metadata, **{"general.weight_dtype": "int8"})
    weightfile.write(path, model.graph, model.tensors, dtype="int8", quantize={"W"}, metadata=meta)
    loaded = rnnengine.load(path)
    loaded.run({"x": x_of(3, 1)})
    assert compact.kernel_dtypes(loaded) == {"/rnn/LSTM": "float32"}
    # asked for explicitly, int8 applies to both (R rounded by the packer)
    forced = rnnengine.load(path, weight_dtype="int8")
    forced.run({"x": x_of(3, 1)})
    assert compact.kernel_dtypes(forced) == {"/rnn/LSTM": "int8"}
    assert np.array_equal(cells_of(forced)[0].packed_weights(0, 0, 1)[0], quantize_int8(model.tensors["R"][0])[0])


def test_refusals_name_the_node():
    m, W, R, B = recurrent_onnx("LSTM", 1, 0)
    big = m
    for t in big.graph.initializer:
        if t.name == "R":
            arr = numpy_helper.to_array(t).copy()
            arr[0, 3, 2] = 1e5
            t.CopyFrom(numpy_helper.from_array(arr, "R"))
    with pytest.raises(ValueError, match=r"LSTM.*/rnn/LSTM.*R\[0, 3, 2\].*float16 range"):
        rnnengine.convert(big, weight_dtype="float16")
    rnnengine.convert(big, weight_dtype="int8")  # int8 holds it (with a coarser row)
    for t in big.graph.initializer:
        if t.name == "W":
            arr = numpy_helper.to_array(t).copy()
            arr[0, 1, 4] = np.inf
            t.CopyFrom(numpy_helper.from_array(arr, "W"))
    with pytest.raises(ValueError, match=r"/rnn/LSTM.*W\[0, 1, 4\].*infinite"):
        rnnengine.convert(big, weight_dtype="int8")
    for bad in ("bfloat16", "int4", 8):
        with pytest.raises(ValueError, match="weight_dtype"):
            rnnengine.convert(m, weight_dtype=bad)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            rnnengine.convert(m, threads=bad)


def test_stored_codes_are_packed_as_given():
    """rnn_cell_create_stored packs the codes it is given even when the packer would round
    the values differently (a file from another writer: max |code| below 127)."""
    rng = np.random.default_rng(11)
    H, I = 5, 4
    q = rng.integers(-60, 60, (H, I)).astype(np.int8)
    s = rng.uniform(0.01, 0.1, H).astype(np.float32)
    r = rng.integers(-60, 60, (H, H)).astype(np.int8)
    rs = rng.uniform(0.01, 0.1, H).astype(np.float32)
    W, R = q.astype(np.float32) * s[:, None], r.astype(np.float32) * rs[:, None]
    cell = {"act": [(0, 0.0, 0.0)] * 3, "clip": None, "input_forget": 0, "linear_before_reset": 0, "W": W, "R": R,
            "B": None, "P": None, "weight_dtype": "int8", "stored": (q, r, s, rs)}
    st = _core.Stack([{"kind": "RNN", "direction": "forward", "input_size": I, "hidden_size": H, "cells": [cell]}])
    codes, scales = st.packed_weights(0, 0, 0)
    assert np.array_equal(codes, q) and np.array_equal(scales, s)
    plain = _core.Stack([{"kind": "RNN", "direction": "forward", "input_size": I, "hidden_size": H,
                          "cells": [dict(cell, stored=None)]}])
    assert not np.array_equal(plain.packed_weights(0, 0, 0)[0], q)  # the packer would rescale to 127
    with pytest.raises(ValueError, match="stored weights must be int8"):
        _core.Stack([{"kind": "RNN", "direction": "forward", "input_size": I, "hidden_size": H,
                      "cells": [dict(cell, stored=(q.astype(np.int16), r, s, rs))]}])


def test_stream_of_a_compact_file_continues_the_whole_run(tmp_path):
    """A stream of an int8 file (packed int8 input projections, chunk by chunk) gives the
    whole-sequence run's result to float32 rounding: both compute with the stored weights
    (the run's projection of 240 rows through the compact kernels, or on the portable
    kernels through BLAS over the stored values widened: src_c/internal.h, RNN_BLAS_MIN_ROWS)."""
    from oracle import max_violation
    m, *_ = recurrent_onnx("LSTM", 1, 0, seed=4)
    path = str(tmp_path / "m.rnne")
    rnnengine.save(rnnengine.convert(m), path, dtype="int8")
    model = rnnengine.load(path)
    x = x_of(60, 4)
    whole = model.run({"x": x})["Y"]
    stream = model.stream()
    got = np.concatenate([stream({"x": x[t:t + 7]})["Y"] for t in range(0, 60, 7)], axis=0)
    assert compact.kernel_dtypes(model) == {"/rnn/LSTM": "int8"}
    assert max_violation(got, whole) <= 1.0
