#!/usr/bin/env python3
"""Differential fuzzing against onnxruntime: silent wrong answers, not crashes.

    python tools/fuzz/diff_onnx.py --seconds 600 --dir /var/tmp/diff [--seed 0]

fuzz_onnx.py looks for crashes and unclean errors on hostile files. This one looks for the
worst bug of all (README, "the first rule"): a result that differs from onnxruntime without an
error. It takes the committed models (tests/data/corpus, tests/data/masking), edits them in
ways that keep most of them valid (attributes: activations, clip, direction, hidden sizes,
axes, perms; small integer constants: shapes, axes, slice bounds; float weights scaled,
negated, zeroed or given a NaN/Inf; node wiring; op types; declared dims), draws inputs
(symbolic sizes 1-6, values of several scales) and, whenever onnxruntime runs the model:

  * rnnengine must refuse it cleanly (common.classify) or give every output of onnxruntime's
    shape, within the tolerance of tests/oracle.py (integer and boolean outputs exactly);
  * a stream of it, fed the same inputs in chunks of random sizes along the time axes it
    finds (then finish()), must refuse cleanly or give the whole run's outputs.

A finding (a mismatch, an unclean exception, or a hang: the watchdog ends the worker after
--hang seconds inside rnnengine) is written to DIR/findings/NNNN.onnx with its inputs
(NNNN.npz) and what differed (NNNN.txt); DIR/summary.txt holds the counts. A worker that
dies (a hang inside onnxruntime or rnnengine, a crash) is restarted by the supervisor; the
model it was on is kept as DIR/findings/NNNN-died.onnx when rnnengine was running it.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

SMALL_INTS = [0, 1, -1, 2, -2, 3, 4, 5, 6, 7, 8, 16]
ACTS = ["Sigmoid", "Tanh", "Relu", "HardSigmoid", "Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh", "Elu",
        "Softsign", "Softplus"]
SEMANTIC_FLOATS = [0.0, -0.0, 0.5, 1.0, -1.0, 2.0, 3.0, 0.1, 1e-3, 10.0, float("inf"), float("nan")]
SWAP_OPS = {"Sigmoid": ["Tanh", "Relu", "Softsign"], "Tanh": ["Sigmoid", "Relu"], "Relu": ["Sigmoid", "Tanh"],
            "Add": ["Sub", "Mul", "Max", "Min"], "Sub": ["Add", "Mul"], "Mul": ["Add", "Sub", "Div"],
            "Softmax": ["LogSoftmax"], "LogSoftmax": ["Softmax"], "ReduceMean": ["ReduceSum", "ReduceMax"],
            "LSTM": ["LSTM"], "GRU": ["GRU"], "RNN": ["RNN"], "MatMul": ["MatMul"], "Max": ["Min"], "Min": ["Max"]}


def seeds():
    paths = sorted(glob.glob(os.path.join(ROOT, "tests", "data", "corpus", "*.onnx")))
    paths += sorted(glob.glob(os.path.join(ROOT, "tests", "data", "masking", "*.onnx")))
    return paths


# --- edits that keep most models valid ------------------------------------------------------

def mut_rnn_attr(m, r, fo):
    """An attribute of an LSTM/GRU/RNN node: activations (with alpha/beta), clip, direction,
    linear_before_reset, input_forget, layout."""
    from onnx import helper
    nodes = [n for _, n in fo.all_nodes(m) if n.op_type in ("LSTM", "GRU", "RNN")]
    if not nodes:
        return False
    n = r.choice(nodes)
    attrs = {a.name: a for a in n.attribute}
    k = r.random()
    ngates = {"LSTM": 3, "GRU": 2, "RNN": 1}[n.op_type]
    dirs = 2 if "direction" in attrs and attrs["direction"].s == b"bidirectional" else 1

    def put(name, value):
        for i, a in enumerate(n.attribute):
            if a.name == name:
                del n.attribute[i]
                break
        if value is not None:
            n.attribute.append(helper.make_attribute(name, value))
    if k < 0.35:
        acts = [r.choice(ACTS) for _ in range(ngates * dirs)]
        put("activations", acts)
        if r.random() < 0.6:
            put("activation_alpha", [r.choice([0.1, 0.5, 1.0, 2.0, 0.01]) for _ in acts])
        if r.random() < 0.5:
            put("activation_beta", [r.choice([0.0, 0.5, 1.0, -0.5]) for _ in acts])
    elif k < 0.5:
        put("clip", r.choice([0.1, 0.5, 1.0, 3.0, 100.0]) if r.random() < 0.9 else None)
    elif k < 0.6 and n.op_type == "GRU":
        put("linear_before_reset", r.choice([0, 1]))
    elif k < 0.7 and n.op_type == "LSTM":
        put("input_forget", r.choice([0, 1]))
    elif k < 0.8:
        put("direction", r.choice(["forward", "reverse"]) if dirs == 1 else "bidirectional")
    else:
        put("layout", r.choice([0, 1]))
    return True


def mut_attr(m, r, fo):
    """Any INT/INTS/FLOAT attribute, to small values (axes, perms, keepdims, alpha...)."""
    from onnx import AttributeProto
    nodes = [n for _, n in fo.all_nodes(m) if n.attribute]
    if not nodes:
        return False
    n = r.choice(nodes)
    a = r.choice(n.attribute)
    if a.type == AttributeProto.INT:
        a.i = r.choice(SMALL_INTS)
    elif a.type == AttributeProto.INTS and a.ints:
        if r.random() < 0.5 and len(a.ints) >= 2:  # a permutation stays a permutation
            i, j = r.sample(range(len(a.ints)), 2)
            a.ints[i], a.ints[j] = a.ints[j], a.ints[i]
        else:
            a.ints[r.randrange(len(a.ints))] = r.choice(SMALL_INTS)
    elif a.type == AttributeProto.FLOAT:
        a.f = r.choice(SEMANTIC_FLOATS)
    elif a.type == AttributeProto.FLOATS and a.floats:
        a.floats[r.randrange(len(a.floats))] = r.choice(SEMANTIC_FLOATS)
    else:
        return False
    return True


def mut_int_const(m, r, fo):
    """An element of a small integer initializer/constant (shapes, axes, starts, ends, steps,
    pads, indices) to a small value."""
    import numpy as np
    import onnx
    picked = fo.pick_int_tensor(m, r, max_size=64)
    if picked is None:
        return False
    t, arr = picked
    flat = arr.reshape(-1)
    i = r.randrange(flat.size)
    v = r.choice(SMALL_INTS) if r.random() < 0.6 else int(flat[i]) + r.choice([-1, 1])
    info = np.iinfo(flat.dtype)
    flat[i] = v if info.min <= v <= info.max else r.choice(SMALL_INTS)  # INT64_MAX + 1 ended the worker
    new = onnx.numpy_helper.from_array(arr, t.name)
    t.ClearField("int64_data")
    t.ClearField("int32_data")
    t.raw_data = new.raw_data
    return True


def mut_float_const(m, r, fo):
    """A float initializer scaled (saturating the gates), negated, zeroed, or one element made
    NaN / Inf / huge."""
    import numpy as np
    import onnx
    ts = [t for t in fo.tensors(m) if t.data_type == onnx.TensorProto.FLOAT]
    if not ts:
        return False
    t = r.choice(ts)
    try:
        arr = onnx.numpy_helper.to_array(t).astype(np.float32).copy()
    except Exception:  # noqa: BLE001
        return False
    if arr.size == 0:
        return False
    k = r.random()
    if k < 0.5:
        arr *= np.float32(r.choice([0.0, -1.0, 0.1, 3.0, 10.0, 100.0]))
    else:
        arr.reshape(-1)[r.randrange(arr.size)] = np.float32(r.choice([float("nan"), float("inf"), -float("inf"),
                                                                         1e30, -1e30, 0.0]))
    new = onnx.numpy_helper.from_array(arr, t.name)
    t.ClearField("float_data")
    t.raw_data = new.raw_data
    return True


def mut_op_type(m, r, fo):
    nodes = [n for _, n in fo.all_nodes(m) if n.op_type in SWAP_OPS]
    if not nodes:
        return False
    n = r.choice(nodes)
    n.op_type = r.choice(SWAP_OPS[n.op_type])
    return True


def mut_wiring(m, r, fo):
    """One node input re-pointed at another value of the same graph, or two inputs swapped."""
    gn = fo.all_nodes(m)
    if not gn:
        return False
    g, n = r.choice(gn)
    pool = [i.name for i in g.input] + [o for x in g.node for o in x.output if o]
    if not n.input or not pool:
        return False
    if r.random() < 0.3 and len(n.input) >= 2:
        i, j = r.sample(range(len(n.input)), 2)
        n.input[i], n.input[j] = n.input[j], n.input[i]
    else:
        n.input[r.randrange(len(n.input))] = r.choice(pool)
    return True


def mut_graph_output(m, r, fo):
    """An intermediate value made a graph output too (exposes ops whose result was hidden)."""
    from onnx import helper
    outs = [o for n in m.graph.node for o in n.output if o]
    have = {o.name for o in m.graph.output}
    cand = [o for o in outs if o not in have]
    if not cand:
        return False
    m.graph.output.append(helper.make_empty_tensor_value_info(r.choice(cand)))
    return True


MUTATIONS = [mut_rnn_attr, mut_rnn_attr, mut_attr, mut_int_const, mut_int_const, mut_float_const, mut_float_const,
             mut_op_type, mut_wiring, mut_graph_output, mut_graph_output]


def mutate(data, r, fo):
    import onnx
    m = onnx.ModelProto()
    m.ParseFromString(data)
    for _ in range(r.choice([0, 1, 1, 2, 3])):
        for _ in range(5):
            try:
                if r.choice(MUTATIONS)(m, r, fo):
                    break
            except (ValueError, TypeError, IndexError):
                continue
    return m.SerializeToString()


# --- inputs ---------------------------------------------------------------------------------

_NP = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
       "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(int8)": "int8",
       "tensor(uint8)": "uint8"}


def draw_feeds(sess, r, given):
    """Inputs for onnxruntime's declared inputs: one size per symbol (1-6), the committed
    feeds' values when their shapes fit (masks, token ids), else random ones."""
    import numpy as np
    rng = np.random.default_rng(r.randrange(1 << 30))
    sizes, feeds = {}, {}
    scale = r.choice([0.1, 1.0, 1.0, 3.0, 10.0])
    for i in sess.get_inputs():
        if i.type not in _NP:
            return None
        shape = []
        for d in i.shape:
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            else:
                key = d if isinstance(d, str) and d else f"?{len(sizes)}"
                shape.append(sizes.setdefault(key, r.choice([1, 1, 2, 3, 4, 5, 6])))
        if any(s > 4096 for s in shape) or int(np.prod(shape)) > 1 << 20:
            return None
        dt = np.dtype(_NP[i.type])
        g = given.get(i.name)
        if g is not None and g.dtype == dt and g.ndim == len(shape) and r.random() < 0.5:
            # the committed feeds (a mask, token ids): their symbolic sizes are taken as drawn
            for d, v in zip(i.shape, g.shape):
                if isinstance(d, str) and d and sizes.get(d, v) != v:
                    break
            else:
                for d, v in zip(i.shape, g.shape):
                    if isinstance(d, str) and d:
                        sizes[d] = v
                feeds[i.name] = g
                continue
        if dt.kind == "f":
            feeds[i.name] = (rng.standard_normal(shape) * scale + 0.1).astype(dt)
        elif dt.kind == "b":
            feeds[i.name] = rng.random(shape) < 0.7
        else:
            feeds[i.name] = rng.integers(0, 4, shape).astype(dt)
    return feeds


# --- comparison -----------------------------------------------------------------------------

def compare(got, want, what):
    """None when got equals want (within tolerance for floats), else a description."""
    import numpy as np
    from oracle import max_violation
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return f"{what}: shape {got.shape}, onnxruntime {want.shape}"
    if want.dtype.kind == "f":
        v = max_violation(got.astype(np.float64), want.astype(np.float64))
        if v > 1:
            idx = np.unravel_index(int(np.nanargmax(np.where(np.isnan(got) != np.isnan(want), np.inf,
                                                            np.abs(got.astype(np.float64) - want)))), got.shape) \
                if got.size else ()
            return f"{what}: max violation {v:.3g} at {idx}: {got[idx]!r} vs {want[idx]!r}"
        return None
    if got.dtype.kind not in "iub" or not np.array_equal(got, want):
        return f"{what}: {got.dtype} {got.ravel()[:8]} vs {want.dtype} {want.ravel()[:8]}"
    return None


class Finding(Exception):
    pass


def check_one(data, feeds_rng, counts):
    """Runs one model through onnxruntime and rnnengine. Returns what happened (a key of counts)
    or raises Finding(description)."""
    import onnxruntime as ort
    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        so.log_severity_level = 4
        sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001
        return "ort_refused", None
    feeds = draw_feeds(sess, feeds_rng, counts.get("_given", {}))
    if feeds is None:
        return "ort_refused", None
    _last_feeds[0] = feeds
    try:
        want = sess.run(None, feeds)
    except Exception:  # noqa: BLE001
        return "ort_refused", feeds
    names = [o.name for o in sess.get_outputs()]
    done = _in_rnnengine(lambda: _convert_and_run(data, feeds), "refused", "")
    if isinstance(done, str):
        return done, feeds
    gm, got = done
    nonfinite = None
    for name, w in zip(names, want):
        if name not in got:
            raise Finding(f"output {name!r} missing from run(): {sorted(got)}")
        bad = compare(got[name], w, f"run() output {name!r}")
        if bad and nonfinite is None:
            given = _has_nonfinite(data, feeds)
            nonfinite = (given, given or _ort_made_nonfinite(data, feeds))
        # IEEE NaN / Inf that rnnengine kept where onnxruntime's recurrent kernels clamp (README);
        # and, only where no NaN / Inf was given (weights, inputs) but the model overflowed inside,
        # onnxruntime's NaN / Inf where rnnengine's rounding stayed finite
        if bad and nonfinite[1] and _only_where_nonfinite(got[name], w, either=not nonfinite[0]):
            return "nan_kept", feeds
        if bad and _ort_recurrent_off_spec(data, feeds):
            return "ort_off_spec", feeds
        if bad and _ort_unstable(data, feeds, names, want, got):
            return "ill_conditioned", feeds
        if bad:
            raise Finding(bad)
    # the stream: the same inputs in chunks along its time axes, against the whole run
    return _in_rnnengine(lambda: stream_check(gm, feeds, got, feeds_rng), "matched_stream_refused",
                         "stream: "), feeds


def _convert_and_run(data, feeds):
    import rnnengine
    gm = rnnengine.convert(data)
    return gm, gm.run(feeds)


def _in_rnnengine(fn, refused, what):
    """fn() timed by the watchdog as rnnengine's; a clean refusal gives `refused`, any other
    exception a Finding."""
    import common
    _phase[0] = "rnnengine"
    try:
        return fn()
    except Finding:
        raise
    except Exception as e:  # noqa: BLE001
        if common.classify(e) == "clean":
            return refused
        raise Finding(f"{what}unclean {type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        _phase[0] = "ort"


def _has_nonfinite(data, feeds):
    """Does the model (a float initializer or constant) or an input hold a NaN or an Inf?"""
    import numpy as np
    import onnx
    import fuzz_onnx as fo
    if any(np.asarray(v).dtype.kind == "f" and not np.isfinite(v).all() for v in feeds.values()):
        return True
    m = onnx.ModelProto()
    m.ParseFromString(data)
    for t in fo.tensors(m):
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            try:
                if not np.isfinite(onnx.numpy_helper.to_array(t)).all():
                    return True
            except Exception:  # noqa: BLE001
                continue
    return False


def _ort_values(data, feeds):
    """Every node output as onnxruntime computes it ({name: array}), or None."""
    import onnx
    import onnxruntime as ort
    m = onnx.ModelProto()
    m.ParseFromString(data)
    have = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for o in node.output:
            if o and o not in have:
                m.graph.output.append(onnx.ValueInfoProto(name=o))
                have.add(o)
    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        so.log_severity_level = 4
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return m, dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    except Exception:  # noqa: BLE001
        return None


def _ort_made_nonfinite(data, feeds):
    """Does a value inside the model become NaN or Inf (Pow(x, 1e30), say) in onnxruntime's run?
    Then a difference where rnnengine keeps the NaN / Inf is the README's known one."""
    import numpy as np
    got = _ort_values(data, feeds)
    return got is not None and any(np.asarray(v).dtype.kind == "f" and not np.isfinite(v).all()
                                   for v in got[1].values())


def _ort_recurrent_off_spec(data, feeds):
    """onnxruntime's LSTM / GRU / RNN kernels leave the operator's formulas for huge finite
    values (an initial state of 1e30: its GRU gives -1 where the formulas, in float64, give
    0.63). True when the model's first node whose output differs from rnnengine's is such an op,
    its inputs agree, and rnnengine's output is within tests/oracle.py's tolerance of
    oracle.np_reference (the formulas in float64, on onnxruntime's own inputs to the node), or
    within what the node's conditioning allows (_within_conditioning), while onnxruntime's is not."""
    import numpy as np
    import onnx
    import rnnengine
    from oracle import max_violation, np_reference
    found = _ort_values(data, feeds)
    if found is None:
        return False
    m, want = found
    try:
        ours = rnnengine.convert(m.SerializeToString()).run(feeds)
    except Exception:  # noqa: BLE001
        return False
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    for node in m.graph.node:
        differs = [o for o in node.output if o in want and o in ours and compare(ours[o], want[o], o)]
        if not differs:
            continue
        if node.op_type not in ("LSTM", "GRU", "RNN"):
            return False
        names = ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"]
        args = {}
        for nm, i in zip(names, node.input):
            if i:
                v = want.get(i, consts.get(i, feeds.get(i)))
                if v is None:
                    return False
                args[nm] = np.asarray(v)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: (v.decode() if isinstance(v, bytes) else [x.decode() if isinstance(x, bytes) else x for x in v]
                     if isinstance(v, list) else v) for k, v in attrs.items()}
        try:
            ref = np_reference(node.op_type, attrs, **args)
        except Exception:  # noqa: BLE001
            return False
        for k, (o, r) in enumerate(zip(node.output, ref)):
            if o in differs and (max_violation(want[o], r) <= 1 or
                                 not _within_conditioning(ours[o], r, node.op_type, attrs, args, k)):
                return False
        return True
    return False


def _within_conditioning(got, ref, op, attrs, args, k, tries=3):
    """rnnengine's output k of a recurrent node is within tolerance of the formulas in float64
    (`ref`), or, where it is not, within 4x of how far those formulas themselves move when every
    float input moves by its last bit (relative 2^-23, random signs): a GRU whose state of 1e21
    meets a reset gate of 1e-18 cannot be computed closer in float32 (the thirteenth session's
    findings 0000 and 0002: rnnengine 2.8-5x the tolerance off the float64 formulas, which moved
    25-57x under those one-bit moves; onnxruntime 3.6-1e5x off)."""
    import numpy as np
    from oracle import TOLERANCE, np_reference
    tol = TOLERANCE[np.float32]
    g, r = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    with np.errstate(invalid="ignore"):
        off = np.abs(g - r)
        bad = ~(off <= tol["atol"] + tol["rtol"] * np.abs(r)) & ~(np.isnan(g) & np.isnan(r))
    if not bad.any():
        return True
    rng = np.random.default_rng(int(bad.sum()))
    spread = np.zeros(r.shape)
    for _ in range(tries):
        moved = {nm: (a * (1 + rng.choice([-1.0, 1.0], a.shape) * 2.0 ** -23)).astype(np.float32)
                 if a.dtype == np.float32 else a for nm, a in args.items()}
        try:
            r2 = np.asarray(np_reference(op, attrs, **moved)[k], np.float64)
        except Exception:  # noqa: BLE001
            return False
        with np.errstate(invalid="ignore"):
            d = np.abs(r2 - r)
        spread = np.maximum(spread, np.where(np.isfinite(d), d, 0.0))
    return bool(np.all(off[bad] <= 4 * spread[bad]))


def _ort_unstable(data, feeds, names, want, got, tries=3):
    """Is the model so ill-conditioned that onnxruntime disagrees with itself by as much as it
    disagrees with rnnengine, when every float weight and input moves by its last bit
    (relative 2^-23, random signs)? Then rounding alone, not a bug, can put two correct
    engines that far apart (a mutated Keras LSTM cell dividing by tanh(g) near 0, outputs near
    1872). Only tensors of several values, not all whole numbers, move: an exponent of 2.0 or a
    threshold moved by a bit is another model (Pow(x, 2.0000002) of a negative x is NaN), and
    counting that as instability set aside a simulated bug on the VAD seeds (review, eleventh
    session). Every element where rnnengine is off onnxruntime beyond the tolerance must be
    within 4x onnxruntime's own largest move there."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import fuzz_onnx as fo
    from oracle import TOLERANCE

    def movable(a):
        a = np.asarray(a)
        return a.dtype == np.float32 and a.size > 1 and np.isfinite(a).all() and not np.all(a == np.round(a))
    r = np.random.default_rng(len(data))
    spread = [np.zeros(np.shape(w)) for w in want]
    for _ in range(tries):
        m = onnx.ModelProto()
        m.ParseFromString(data)
        for t in fo.tensors(m):
            if t.data_type != onnx.TensorProto.FLOAT:
                continue
            try:
                a = onnx.numpy_helper.to_array(t)
            except Exception:  # noqa: BLE001
                continue
            if movable(a):
                a = (a * (1 + r.choice([-1.0, 1.0], a.shape) * 2.0 ** -23)).astype(np.float32)
                t.CopyFrom(onnx.numpy_helper.from_array(a, t.name))
        moved = {k: (v * (1 + r.choice([-1.0, 1.0], v.shape) * 2.0 ** -23)).astype(v.dtype) if movable(v) else v
                 for k, v in feeds.items()}
        try:
            so = ort.SessionOptions()
            so.intra_op_num_threads = so.inter_op_num_threads = 1
            so.log_severity_level = 4
            again = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, moved)
        except Exception:  # noqa: BLE001
            return False
        for i, (a, w) in enumerate(zip(again, want)):
            if np.shape(a) != np.shape(w) or np.asarray(w).dtype.kind != "f":
                return False
            with np.errstate(invalid="ignore"):
                d = np.abs(np.asarray(a, np.float64) - w)
            spread[i] = np.maximum(spread[i], np.where(np.isfinite(d), d, 0.0))
    tol = TOLERANCE[np.float32]
    for name, w, s in zip(names, want, spread):
        g = np.asarray(got[name], np.float64)
        w = np.asarray(w, np.float64)
        with np.errstate(invalid="ignore"):
            off = np.abs(g - w)
            bad = ~(off <= tol["atol"] + tol["rtol"] * np.abs(w)) & ~(np.isnan(g) & np.isnan(w))
        if bad.any() and not np.all(off[bad] <= 4 * s[bad]):
            return False
    return bool(any(s.any() for s in spread))


def _only_where_nonfinite(got, want, either=False):
    """The outputs differ only where rnnengine's is NaN or Inf (a non-finite value it kept
    where onnxruntime's recurrent kernels clamp it); with `either`, also where onnxruntime's
    is: for a model whose weights and inputs are finite but whose own run overflows (1 / h of
    a mutated Keras loop), one engine's last-bit rounding of a tiny divisor can reach Inf or
    NaN and the other's stay finite (onnxruntime NaN where rnnengine gave 0.058, eleventh
    session). Not with a NaN given in the weights or inputs: rnnengine turning that NaN into
    a number is a bug to report (the review of the eleventh session)."""
    import numpy as np
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return False
    with np.errstate(invalid="ignore"):
        close = np.isclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    return bool(np.all(close | ~np.isfinite(got) | (either & ~np.isfinite(want))))


def stream_check(gm, feeds, whole, r):
    import numpy as np
    states = {a for a, _ in gm.state_pairs}
    s = gm.stream()
    if states:
        s.set_state({"inputs": {a: feeds[a] for a in states if a in feeds}})
    data = {k: v for k, v in feeds.items() if k not in states}
    axes = {k: v for k, v in gm.time_axes(feeds).items() if k not in states}
    if not axes:
        return "matched_no_time"
    if any(k not in axes and v.dtype.kind in "iu" for k, v in data.items()):
        # an integer input without time (sequence lengths): its per-call meaning is the
        # caller's (README: each row's valid steps in that chunk), not the whole value again
        return "matched_no_time"
    T = {data[n].shape[a] for n, a in axes.items()}
    if len(T) != 1:
        return "matched_no_time"
    T = T.pop()
    parts, t = [], 0
    while t < T:
        n = r.choice([1, 1, 2, 3, 5, T])
        parts.append(s({k: (np.take(v, range(t, min(T, t + n)), axis=axes[k]) if k in axes else v)
                        for k, v in data.items()}))
        t += n
    tail = s.finish()
    if tail:
        parts.append(tail)
    if s.time_axes != axes:
        raise Finding(f"stream time axes {s.time_axes} != time_axes() {axes}")
    for name, ax in s.output_axes.items():
        if name not in whole:
            continue
        if ax is None:  # a final state or a value without time: the last call's
            last = next((p[name] for p in reversed(parts) if name in p), None)
            if last is None:
                continue
            bad = compare(last, whole[name], f"stream output {name!r} (last call)")
        else:
            got = np.concatenate([p[name] for p in parts if name in p], axis=ax)
            bad = compare(got, whole[name], f"stream output {name!r} (chunks joined along {ax})")
        if bad:
            raise Finding(bad + f"; chunks {[tuple(v.shape) for p in parts for v in p.values()][:6]}")
    return "matched_stream"


_phase = ["ort"]
_last_feeds: list = [None]  # the inputs of the model being checked (written with a finding)


def worker(a):
    import resource

    import numpy as np
    # a mutated model that makes either engine allocate gigabytes fails instead of taking the machine
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    os.makedirs(os.path.join(a.dir, "findings"), exist_ok=True)
    import fuzz_onnx as fo  # the graph walkers (graphs, all_nodes, tensors)
    paths = seeds()
    given = {}
    blobs = []
    for p in paths:
        blobs.append(open(p, "rb").read())
        npz = p[:-5] + ".feeds.npz"
        if os.path.exists(npz):
            given.update(dict(np.load(npz)))
    counts = {"_given": given}
    r = random.Random(a.seed)
    deadline = time.time() + a.seconds
    stats_path = os.path.join(a.dir, f"worker{a.seed}.json")
    stats = json.load(open(stats_path)) if os.path.exists(stats_path) else {}
    started = [time.time()]

    def watchdog():
        while True:
            time.sleep(1)
            if _phase[0] == "rnnengine" and time.time() - started[0] > a.hang:
                write_finding(a.dir, open(os.path.join(a.dir, f"current{a.seed}.onnx"), "rb").read(), None,
                              f"hang: over {a.hang} s inside rnnengine")
                os._exit(3)
            if _phase[0] == "ort" and time.time() - started[0] > 2 * a.hang:
                os._exit(4)  # onnxruntime on a mutated model for minutes: not ours; skip it
    threading.Thread(target=watchdog, daemon=True).start()
    n = 0
    while time.time() < deadline:
        i = r.randrange(len(blobs))
        data = mutate(blobs[i], r, fo)
        with open(os.path.join(a.dir, f"current{a.seed}.onnx"), "wb") as f:
            f.write(data)
        started[0] = time.time()
        try:
            what, feeds = check_one(data, r, counts)
        except Finding as e:
            what = "finding"
            write_finding(a.dir, data, _last_feeds[0], f"seed model {os.path.basename(paths[i])}\n{e}")
        stats[what] = stats.get(what, 0) + 1
        n += 1
        if n % 20 == 0:
            json.dump(stats, open(stats_path, "w"))
    json.dump(stats, open(stats_path, "w"))


def write_finding(d, data, feeds, text):
    fd = os.path.join(d, "findings")
    k = len(glob.glob(os.path.join(fd, "*.txt")))
    with open(os.path.join(fd, f"{k:04d}.onnx"), "wb") as f:
        f.write(data)
    if feeds is not None:
        import numpy as np
        np.savez(os.path.join(fd, f"{k:04d}.npz"), **feeds)
    with open(os.path.join(fd, f"{k:04d}.txt"), "w") as f:
        f.write(text)
    print(f"FINDING {k:04d}: {text.splitlines()[0] if text else ''}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=600)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hang", type=int, default=60, help="seconds inside rnnengine that count as a hang")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    if a.worker:
        worker(a)
        return
    deadline = time.time() + a.seconds
    seed = a.seed
    while time.time() < deadline - 2:
        rc = subprocess.call([sys.executable, os.path.abspath(__file__), "--worker", "--dir", a.dir,
                              "--seed", str(seed), "--hang", str(a.hang),
                              "--seconds", str(int(deadline - time.time()))])
        if rc != 0:
            cur = os.path.join(a.dir, f"current{seed}.onnx")
            if rc not in (3, 4) and os.path.exists(cur):  # 3: the watchdog wrote the hang itself; 4: onnxruntime's
                write_finding(a.dir, open(cur, "rb").read(), None,
                              f"worker died (exit {rc}) on this model: onnxruntime or rnnengine")
            print(f"worker {seed} exited with {rc}; restarting with the next seed", flush=True)
            seed += 1000
    total = {}
    for p in glob.glob(os.path.join(a.dir, "worker*.json")):
        for k, v in json.load(open(p)).items():
            total[k] = total.get(k, 0) + v
    with open(os.path.join(a.dir, "summary.txt"), "w") as f:
        f.write(json.dumps(total, sort_keys=True) + "\n")
    print(total)


if __name__ == "__main__":
    main()
