"""Red team, round 2: Keras masked-loop fusion, typed ops, explicit state pairing, Keras
Conv1D as a 2-D conv. Each test asserts the correct behaviour (the converted model equals
onnxruntime, or a stream equals the whole run, or a clear refusal)."""
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rnnengine
from oracle import max_violation
from rnnengine.frontend.converter import convert_model
from rnnengine.ops.handlers import NotStreamableError, UnsupportedError

HERE = os.path.join(os.path.dirname(__file__), "data", "masking")
LSTM3 = os.path.join(HERE, "keras3_mask_lstm.onnx")
C_PREV = "functional_1_lstm_1_while_placeholder_4:0"
COUNTER = "functional_1_lstm_1_while_placeholder:0"
X_ROW = "functional_1/lstm_1/while/TensorArrayV2Read/TensorListGetItem:0"
M_ROW = "functional_1/lstm_1/while/TensorArrayV2Read_1/TensorListGetItem:0"


def body_of(m):
    loop = next(n for n in m.graph.node if n.op_type == "Loop")
    return loop.attribute[0].g


def ort_first(m, feeds):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def engine_equals_ort(m, feeds):
    """The converted model (fused or not) equals onnxruntime; returns the fused-loop count."""
    want = ort_first(m, feeds)
    try:
        got = next(iter(rnnengine.convert(m).run(feeds).values()))
    except UnsupportedError as e:   # a clear refusal is acceptable
        assert "node" in str(e) or "Loop" in str(e)
        return None
    _, _, meta = convert_model(m)
    err = float(np.abs(got.astype(np.float64) - want).max())
    assert max_violation(got, want) <= 1.0, (meta["converter.fused_keras_loops"], err)
    return meta["converter.fused_keras_loops"]


def feeds_lstm(B=3, T=30, scale=3.0, seed=0, mask=None):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((B, T, 6)) * scale).astype(np.float32)
    if mask is None:
        mask = np.ones((B, T), bool)
        mask[0, 5:8] = False
    return {"x": x, "mask": mask}


# --- 1. Keras masked-loop fusion --------------------------------------------------------------

def test_keras_lstm_loop_clipping_its_cell_state_is_not_fused_into_a_plain_lstm():
    """An extra Clip(c_prev, -1, 1) in the body is the identity on the proof's random states
    (uniform in [-1, 1], fuse.py _loop_cell trials) but not on real states, where |c| grows
    past 1: the fused cell must not drop it."""
    m = onnx.load(LSTM3)
    b = body_of(m)
    b.initializer.extend([numpy_helper.from_array(np.array(-1, np.float32), "clo"),
                          numpy_helper.from_array(np.array(1, np.float32), "chi")])
    for i, n in enumerate(b.node):
        if n.op_type == "Mul" and C_PREV in n.input and "Sigmoid_1" in n.input[0]:
            n.input[1] = "c_clipped"
            b.node.insert(i, helper.make_node("Clip", [C_PREV, "clo", "chi"], ["c_clipped"]))
            break
    else:
        raise AssertionError("forget-gate Mul not found")
    engine_equals_ort(m, feeds_lstm())


def float_mask_model(soft_body):
    """keras3_mask_lstm with a float mask graph input; the body reads it as
    Cast(m, float) * new + Cast(Not(Cast(m, bool)), float) * old (soft_body False) or
    m * new + (1 - m) * old (soft_body True)."""
    m = onnx.load(LSTM3)
    m.graph.input[1].type.tensor_type.elem_type = TensorProto.FLOAT
    b = body_of(m)
    if soft_body:
        b.initializer.append(numpy_helper.from_array(np.array(1, np.float32), "one_f"))
        nots = {n.output[0] for n in b.node if n.op_type == "Not"}
        for n in b.node:
            if n.op_type == "Not":
                n.op_type = "Sub"
                n.input[:] = ["one_f", M_ROW]
            elif n.op_type == "Cast" and (n.input[0] == M_ROW or n.input[0] in nots):
                n.op_type = "Identity"
                del n.attribute[:]
    else:
        for n in b.node:
            if n.op_type == "Not":
                n.input[0] = "mask_b"
        nodes = list(b.node)
        gi = next(i for i, n in enumerate(nodes) if M_ROW in n.output)
        nodes.insert(gi + 1, helper.make_node("Cast", [M_ROW], ["mask_b"], to=TensorProto.BOOL))
        del b.node[:]
        b.node.extend(nodes)
    del b.value_info[:]
    del m.graph.value_info[:]
    return m


def soft_mask(B=3, T=30):
    s = np.ones((B, T), np.float32)
    s[0, 5:8] = 0.5
    s[1, ::3] = 0.25
    s[2, :] = 0
    return s


def test_keras_lstm_loop_with_a_float_mask_not_0_or_1_equals_onnxruntime():
    """A float mask fed to the loop, blended as Cast(m, float) * new + Cast(!bool(m)) * old:
    with m = 0.5 the body blends 0.5 * new + 0 * old; the fused cell's step mask thresholds
    m != 0 to 1 (cell.c blend_step_mask) and ops.py with_step_mask accepts a float32 mask
    as it is. The proof only tried 0/1 masks."""
    m = float_mask_model(soft_body=False)
    engine_equals_ort(m, {"x": feeds_lstm()["x"], "mask": soft_mask()})


def test_keras_lstm_loop_with_a_float_mask_of_0_and_1_equals_onnxruntime():
    m = float_mask_model(soft_body=False)
    assert engine_equals_ort(m, {"x": feeds_lstm()["x"], "mask": (soft_mask() == 1).astype(np.float32)}) in (0, 1, None)


def test_keras_lstm_loop_blending_with_a_soft_float_mask_equals_onnxruntime():
    m = float_mask_model(soft_body=True)
    engine_equals_ort(m, {"x": feeds_lstm()["x"], "mask": soft_mask()})


def test_keras_lstm_loop_gating_its_input_by_the_counter_equals_onnxruntime():
    """The body zeroes its input row from step 3 on (x_t * Cast(i < 3)): the proof's trials
    use steps 0-2 only, so the loop must be left alone (it is)."""
    m = onnx.load(LSTM3)
    b = body_of(m)
    b.initializer.append(numpy_helper.from_array(np.array(3, np.int32), "three_i"))
    for n in b.node:
        if n.op_type == "MatMul" and n.input[0] == X_ROW:
            n.input[0] = "x_gated"
    idx = next(k for k, n in enumerate(b.node) if X_ROW in n.output)
    new = [helper.make_node("Less", [COUNTER, "three_i"], ["early"]),
           helper.make_node("Cast", ["early"], ["early_f"], to=TensorProto.FLOAT),
           helper.make_node("Mul", [X_ROW, "early_f"], ["x_gated"])]
    for k, n in enumerate(new):
        b.node.insert(idx + 1 + k, n)
    engine_equals_ort(m, feeds_lstm(mask=np.ones((3, 30), bool)))


SRNN3 = os.path.join(HERE, "keras3_mask_simplernn.onnx")
SRNN_H = "functional_3_1_simple_rnn_1_while_placeholder_3:0"


def simplernn_variant(variant):
    m = onnx.load(SRNN3)
    b = body_of(m)
    b.initializer.extend([numpy_helper.from_array(np.array(v, np.float32), n)
                          for n, v in (("z0", 0), ("six", 6), ("m1", -1), ("p1", 1))])
    for n in b.node:
        if n.op_type == "Tanh":
            if variant == "relu6":
                n.op_type = "Clip"
                n.input.extend(["z0", "six"])
            else:
                n.op_type = "Relu"
    if variant == "relu_clip_h":
        for n in b.node:
            if n.op_type == "MatMul" and n.input[0] == SRNN_H:
                n.input[0] = "h_clip"
        b.node.insert(0, helper.make_node("Clip", [SRNN_H, "m1", "p1"], ["h_clip"]))
    return m


def srnn_feeds(B=3, T=30, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((B, T, 6)).astype(np.float32), "mask": np.ones((B, T), bool)}


def test_keras_simplernn_loop_with_relu6_activation_is_not_fused_as_relu():
    """Clip(pre, 0, 6) (Keras relu with max_value=6) equals Relu on the proof's trials (their
    pre-activations stay below 6) and is fused as an RNN with Relu (fuse.py _loop_cell
    hypotheses Tanh/Relu/Sigmoid); real sequences grow past 6."""
    engine_equals_ort(simplernn_variant("relu6"), srnn_feeds())


def test_keras_relu_simplernn_loop_clipping_its_state_is_not_fused():
    """Relu SimpleRNN whose body reads Clip(h_prev, -1, 1): the identity on the trial states
    (uniform in [-1, 1]) but not on a Relu state, which exceeds 1."""
    engine_equals_ort(simplernn_variant("relu_clip_h"), srnn_feeds())


def test_keras_relu_simplernn_loop_equals_onnxruntime():
    engine_equals_ort(simplernn_variant("relu"), srnn_feeds())
