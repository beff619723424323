"""GraphModel.threads: run() splits the batch rows over threads only when the analysis in
rnnengine/runtime/split.py proves every output row depends on its own input row; the split
run equals the one-thread run (bit for bit, or to float32 rounding where BLAS sees fewer rows)."""
import importlib.util
import os

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import rnnengine
from oracle import max_violation

CORPUS = os.path.join(os.path.dirname(__file__), "data", "corpus")


def feeds_of(model, batch, time=23, seed=1):
    rng = np.random.default_rng(seed)
    feeds = model.example_feeds(time=time, batch=batch)
    return {k: rng.standard_normal(v.shape).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in feeds.items()}


def both(path, **kw):
    return rnnengine.convert(path, **kw), rnnengine.convert(path, threads=2, **kw)


def test_silero_vad_batch_splits_bit_for_bit():
    spec = importlib.util.find_spec("silero_vad")
    if spec is None:
        pytest.skip("silero-vad is not installed (pip install --no-deps silero-vad)")
    path = os.path.join(spec.submodule_search_locations[0], "data", "silero_vad.onnx")
    one, two = both(path, fixed_inputs={"sr": 16000})
    x = (np.random.default_rng(0).standard_normal((64, 576)) * 0.1).astype(np.float32)
    state = (np.random.default_rng(1).standard_normal((2, 64, 128)) * 0.5).astype(np.float32)
    a, b = one.run({"input": x, "state": state}), two.run({"input": x, "state": state})
    assert two.thread_split_reason is None
    assert one.thread_split_reason == "threads is 1"
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("name,exact", [("keras2_tf2onnx_lstm_op17.onnx", True),
                                        ("keras2_tf2onnx_lstm_globalavgpool_dense_op17.onnx", True),
                                        ("torch_dynamo_lstm_2layer_batchfirst_op18.onnx", False),
                                        ("torch_dynamo_kws_conv_gru_softmax_op18.onnx", False),
                                        ("torch_dynamo_gru_1layer_bidir_batchfirst_initstate_op18.onnx", False)])
def test_corpus_models_split(name, exact):
    """exact: bit for bit. Otherwise the layer's input projection runs through OpenBLAS on
    23 * 64 and on 23 * 32 rows, whose blocking rounds differently: within float32 tolerance."""
    one, two = both(os.path.join(CORPUS, name))
    feeds = feeds_of(one, 64)
    a, b = one.run(feeds), two.run(feeds)
    assert two.thread_split_reason is None, two.thread_split_reason
    for k in a:
        assert a[k].shape == b[k].shape
        if exact:
            assert np.array_equal(a[k], b[k]), k
        else:
            assert max_violation(b[k], a[k]) <= 1.0, k


def lstm_then(tail_nodes, tail_inits=(), out="Z", I=4, H=5, seed=0):
    """x (T, N, I) -> LSTM (Y (T, 1, N, H)) -> tail nodes reading 'Y' -> output `out`."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((1, 4 * H, I)).astype(np.float32)
    R = (rng.standard_normal((1, 4 * H, H)) * 0.5).astype(np.float32)
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R"), *tail_inits]
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["Y"], hidden_size=H, name="/rnn/LSTM"), *tail_nodes]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "N", I])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    return m


def i64(name, v):
    return numpy_helper.from_array(np.array(v, np.int64), name)


REFUSED = {
    "sum over the batch": (lstm_then([helper.make_node("ReduceSum", ["Y", "ax"], ["Z"], keepdims=0, name="/sum")],
                                     [i64("ax", [2])]), r"ReduceSum node '/sum': reduces over the batch axis"),
    "batch merged with features": (lstm_then([helper.make_node("Reshape", ["Y", "shp"], ["Z"], name="/merge")],
                                             [i64("shp", [0, -1])]),
                                   r"Reshape node '/merge': reshapes .* merging the batch"),
    "a literal row count": (lstm_then([helper.make_node("Transpose", ["Y"], ["Yt"], perm=[2, 0, 1, 3]),
                                       helper.make_node("Reshape", ["Yt", "shp"], ["Z"], name="/rows")],
                                      [i64("shp", [8, -1])]), r"Reshape node '/rows'"),
    "softmax over the batch": (lstm_then([helper.make_node("Softmax", ["Y"], ["Z"], axis=2, name="/sm")]),
                               r"Softmax node '/sm': runs along the batch axis"),
    "a per-row constant": (lstm_then([helper.make_node("Add", ["Y", "bias"], ["Z"], name="/add")],
                                     [numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(8, 1), "bias")]),
                           r"Add node '/add': a constant operand differs from batch row to batch row"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_rows_mixed_run_on_one_thread(case):
    """A graph that mixes batch rows (or whose constants fix the row count) is not split: the
    reason names the node, and the result is the one-thread result."""
    m, why = REFUSED[case]
    one, two = rnnengine.convert(m), rnnengine.convert(m, threads=2)
    x = np.random.default_rng(2).standard_normal((6, 8, 4)).astype(np.float32)
    a, b = one.run({"x": x}), two.run({"x": x})
    assert two.thread_split_reason is not None
    assert __import__("re").search(why, two.thread_split_reason), two.thread_split_reason
    assert np.array_equal(a["Z"], b["Z"])


def test_row_wise_tail_splits_and_small_batches_do_not():
    m = lstm_then([helper.make_node("Transpose", ["Y"], ["Yt"], perm=[2, 0, 1, 3]),
                   helper.make_node("Reshape", ["Yt", "shp"], ["Yr"]),  # (N, T*H): the batch kept
                   helper.make_node("MatMul", ["Yr", "M"], ["Zm"]),
                   helper.make_node("Softmax", ["Zm"], ["Z"], axis=-1)],
                  [i64("shp", [0, -1]), numpy_helper.from_array(
                      np.random.default_rng(3).standard_normal((6 * 5, 3)).astype(np.float32), "M")])
    one, two = rnnengine.convert(m), rnnengine.convert(m, threads=2)
    x = np.random.default_rng(4).standard_normal((6, 8, 4)).astype(np.float32)
    assert np.array_equal(one.run({"x": x})["Z"], two.run({"x": x})["Z"])
    assert two.thread_split_reason is None
    two.run({"x": x[:, :3]})
    assert "fewer than 2" in two.thread_split_reason
