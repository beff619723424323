"""split.py - GraphModel.run() over several threads: the batch rows split, when provably exact.

``GraphModel.threads = N`` (``convert(..., threads=N)`` / ``load(..., threads=N)``) lets
run() give each of N threads a contiguous block of the batch rows; each runs the whole graph
on its rows (its own plan for that row count, its own buffers), and the outputs are joined
back along their batch axes. This is exact only when every output row depends on the same
row of the inputs alone, so before splitting, per input shapes (cached), ``analyse`` follows
the batch axis through the graph and refuses, naming the node, anything it cannot prove
row-independent:

- each fed input needs a batch axis (rnnengine.runtime.roles.axis_roles, or the one axis of the
  batch's size that the declaration leaves open); every output must have one;
- an op is followed only by a rule written for it (RULES below): elementwise ops (a constant
  operand may not vary along the batch axis), MatMul / Gemm / Conv with constant weights and
  the batch outside the contracted axis, Transpose, Reshape-like ops that keep the batch as
  its own axis with the same row blocks (a Reshape merging the batch with another axis is
  refused), Slice / Gather / Concat / Split / Pad / Expand / Softmax / LayerNormalization / reductions / CumSum /
  ArgMax / TopK along other axes only, LSTM / GRU / RNN with their batch axis on the batch,
  If with a constant condition (its branch followed), shape arithmetic (constants);
  anything else (Loop, sequence ops, ops without a rule) is refused;
- the analysis is repeated at the row counts the threads get: a constant written for the
  full batch (a literal Reshape target of 64 rows) fails there and is refused.

The reason a run was not split is ``model.thread_split_reason`` (None after a split run).
Results equal the one-thread run's bit for bit: the recurrent layers' input projections and
MatMul / Gemm compute each row with the same chain of sums whatever the number of rows
(src_c/pack.c; on a CPU without AVX2 an input projection of 128 rows or more goes to BLAS,
and fewer rows may then round differently, within float32 rounding, as for
``Model(threads=N)``).
"""
from __future__ import annotations

import math
import threading
from typing import Any, Iterator, Optional

import numpy as np

from rnnengine.ops.handlers import OPS, UnsupportedError, where
from rnnengine.runtime.roles import axis_roles


class NotSplittable(Exception):
    """Why a run cannot be split over threads (the message names the node)."""


class V:
    """A value while analysing: its shape, and either its constant value or its batch axis.
    ``bdep``: for a constant of shape arithmetic, a bool mask of the elements that are (or
    are computed from) the batch size, None when none is."""
    __slots__ = ("shape", "dtype", "const", "b", "bdep")

    def __init__(self, shape, dtype, const=None, b=None):
        self.shape, self.dtype, self.const, self.b = tuple(int(d) for d in shape), np.dtype(dtype), const, b
        self.bdep = None

    def dummy(self):
        return self.const if self.const is not None else np.zeros(self.shape, self.dtype)


def _fail(node, why):
    raise NotSplittable(f"{where(node)}: {why}")


def _uniform(c, axis):
    """True when constant c holds the same values at every index of `axis`."""
    c = np.asarray(c)
    return c.shape[axis] <= 1 or bool(np.all(c == np.take(c, [0], axis=axis)))


def _axis(a, rank):
    return int(a) % max(rank, 1)


ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less", "Greater",
               "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not", "Cast", "CastLike", "Relu", "Sigmoid",
               "Tanh", "Sqrt", "Exp", "Log", "Abs", "Neg", "Clip", "Erf", "LeakyRelu", "Elu", "Selu", "Softplus",
               "Softsign", "HardSigmoid", "HardSwish", "Identity", "Dropout", "Floor", "Ceil", "Round", "Reciprocal",
               "Sign", "Mod", "Sin", "Cos", "Gelu", "Mish", "IsNaN", "IsInf", "PRelu", "ThresholdedRelu", "Celu",
               "BitShift", "Shrink"}


def elementwise(node, h, xs, outs):
    r = len(outs[0].shape)
    a = None
    for x in xs:
        if x is not None and x.b is not None:
            at = x.b + r - len(x.shape)
            if a not in (None, at) or x.shape[x.b] != outs[0].shape[at]:
                _fail(node, "combines operands whose batch axes do not line up")
            a = at
    for x in xs:
        if x is not None and x.const is not None:
            k = a - (r - len(x.shape))
            if k >= 0 and not _uniform(x.const, k):
                _fail(node, "a constant operand differs from batch row to batch row")
    return [a] * len(outs)


def transpose(node, h, xs, outs):
    perm = h.attrs.get("perm") or list(range(len(xs[0].shape)))[::-1]
    return [list(perm).index(xs[0].b)]


def reshape_like(node, h, xs, outs):
    """The batch stays its own axis with the same row blocks: prod(dims before it) and its
    size are the same before and after (so each row's elements stay together, in place)."""
    x, o = xs[0], outs[0]
    before = math.prod(x.shape[:x.b])
    for k, d in enumerate(o.shape):
        if math.prod(o.shape[:k]) == before and d == x.shape[x.b]:
            return [k]
    _fail(node, f"reshapes {x.shape} (batch axis {x.b}) to {o.shape}, merging the batch with another axis")


def _excluded(node, axes, b, rank, what):
    if any(_axis(a, rank) == b for a in axes):
        _fail(node, f"{what} the batch axis")


def slice_(node, h, xs, outs):
    x = xs[0]
    if any(v is not None and v.const is None for v in xs[1:]):
        _fail(node, "slices with run-time bounds")
    starts = np.asarray(xs[1].const).reshape(-1) if len(xs) > 1 else np.asarray(h.attrs.get("starts", []))
    axes = (np.asarray(xs[3].const).reshape(-1) if len(xs) > 3 and xs[3] is not None
            else np.asarray(h.attrs.get("axes", range(len(starts)))))
    steps = np.asarray(xs[4].const).reshape(-1) if len(xs) > 4 and xs[4] is not None else np.ones(len(axes), int)
    for a, step in zip(axes, steps):  # along the batch only as a whole, in order (keeps every row in place)
        if _axis(a, len(x.shape)) == x.b and (step != 1 or outs[0].shape[x.b] != x.shape[x.b]):
            _fail(node, "slices along the batch axis")
    return [x.b]


def gather(node, h, xs, outs):
    data, idx = xs[0], xs[1]
    axis = _axis(h.attrs.get("axis", 0), len(data.shape))
    if data.b is not None and idx.b is not None:
        _fail(node, "gathers batch rows by run-time indices")
    if data.b is not None:
        if axis == data.b:
            _fail(node, "gathers along the batch axis")
        return [data.b if data.b < axis else data.b + len(idx.shape) - 1]
    return [axis + idx.b]


def concat(node, h, xs, outs):
    r = len(outs[0].shape)
    axis = _axis(h.attrs.get("axis", 0), r)
    bs = {x.b for x in xs if x is not None and x.b is not None}
    if len(bs) != 1 or axis in bs:
        _fail(node, "concatenates along the batch axis, or operands with different batch axes")
    b = bs.pop()
    for x in xs:
        if x is not None and x.const is not None and not _uniform(x.const, b):
            _fail(node, "a constant operand differs from batch row to batch row")
    return [b]


def split(node, h, xs, outs):
    _excluded(node, [h.attrs.get("axis", 0)], xs[0].b, len(xs[0].shape), "splits along")
    return [xs[0].b] * len(outs)


def pad(node, h, xs, outs):
    x = xs[0]
    pads = np.asarray(xs[1].const if len(xs) > 1 and xs[1] is not None else h.attrs.get("pads", [])).reshape(-1)
    if len(xs) > 1 and xs[1] is not None and xs[1].const is None:
        _fail(node, "pads by run-time amounts")
    axes = (np.asarray(xs[3].const).reshape(-1) if len(xs) > 3 and xs[3] is not None and xs[3].const is not None
            else np.arange(len(pads) // 2))
    n = len(pads) // 2
    for k, a in enumerate(axes[:n]):
        if _axis(a, len(x.shape)) == x.b and (pads[k] or pads[k + n]):
            _fail(node, "pads the batch axis")
    return [x.b]


def expand(node, h, xs, outs):
    x = xs[0]
    if x.b is None:
        _fail(node, "expands a constant to the batch by a run-time shape")
    a = x.b + len(outs[0].shape) - len(x.shape)
    if outs[0].shape[a] != x.shape[x.b]:
        _fail(node, "expands along the batch axis")
    return [a]


def matmul(node, h, xs, outs):
    a, b = xs
    if a.b is None:
        _fail(node, "its left operand does not carry the batch")
    if len(a.shape) < 2 or a.b == len(a.shape) - 1:
        _fail(node, "contracts over the batch axis")
    # a 1-D B drops A's last axis (the batch keeps its place); otherwise the result has A's
    # matrix axes last, behind the broadcast batch axes
    out_b = a.b if len(b.shape) == 1 else a.b + len(outs[0].shape) - len(a.shape)
    if b.const is not None and len(b.shape) <= 2:
        return [out_b]
    # two run-time operands (attention) or a batched B: one product per batch index, so a
    # block of rows splits when the batch is a batch axis of both, aligned from the right
    if a.b < len(a.shape) - 2 and b.b is not None and len(b.shape) >= 3 and \
            b.b - len(b.shape) == a.b - len(a.shape):
        return [out_b]
    _fail(node, "multiplies by a right-hand matrix that does not carry the same batch axis")


def gemm(node, h, xs, outs):
    a, b = xs[0], xs[1]
    c = xs[2] if len(xs) > 2 else None
    if a.b is None or b.const is None or (c is not None and c.const is None):
        _fail(node, "multiplies by a run-time right-hand matrix or bias")
    if a.b != (1 if h.attrs.get("transA", 0) else 0):
        _fail(node, "contracts over the batch axis")
    if c is not None and len(c.shape) == 2 and not _uniform(c.const, 0):
        _fail(node, "its bias differs from batch row to batch row")
    return [0]


def conv(node, h, xs, outs):
    if xs[0].b != 0 or any(x is not None and x.const is None for x in xs[1:]):
        _fail(node, "convolves with run-time weights or with the batch off axis 0")
    return [0]


def pool(node, h, xs, outs):
    """MaxPool / AveragePool: over the axes after (N, C), which must not hold the batch."""
    if xs[0].b >= 2:
        _fail(node, "pools along the batch axis")
    return [xs[0].b]


def along_axis(node, h, xs, outs):
    """Softmax, ArgMax, CumSum, TopK...: one axis (an attribute, or CumSum's input 1)."""
    x = xs[0]
    op, r = node["op"], len(x.shape)
    if op == "CumSum":
        if xs[1].const is None:
            _fail(node, "runs along a run-time axis")
        axis = int(np.asarray(xs[1].const).reshape(-1)[0])
    else:
        axis = h.attrs.get("axis", -1 if op in ("Softmax", "LogSoftmax", "Hardmax", "TopK") and h.opset >= 13
                           or op == "TopK" else 1 if op in ("Softmax", "LogSoftmax", "Hardmax") else 0)
    axis = _axis(axis, r)
    if op in ("Softmax", "LogSoftmax", "Hardmax") and h.opset < 13:
        if x.b >= axis:  # the input is read as (prod(shape[:axis]), prod(shape[axis:])) rows
            _fail(node, "normalises over a block that includes the batch axis")
    elif axis == x.b:
        _fail(node, "runs along the batch axis")
    keep = h.attrs.get("keepdims", 1)
    b = x.b if keep or op not in ("ArgMax", "ArgMin") or axis > x.b else x.b - 1
    return [b] * len(outs)


def layernorm(node, h, xs, outs):
    """LayerNormalization: each row normalised over the axes [axis, rank), which must all
    follow the batch axis; Scale and B constants of one value along the batch axis."""
    x = xs[0]
    r = len(x.shape)
    if x.b >= _axis(h.attrs.get("axis", -1), r):
        _fail(node, "normalises over the batch axis")
    for v in xs[1:]:
        if v is None:
            continue
        if v.const is None:
            _fail(node, "has a run-time Scale or B")
        k = x.b - (r - len(v.shape))
        if k >= 0 and v.shape[k] != 1:
            _fail(node, "its Scale or B is as long as the batch along the batch axis")
    return [x.b] * len(outs)


def global_pool(node, h, xs, outs):
    """GlobalAveragePool: over axes 2.., which must not hold the batch."""
    if xs[0].b >= 2:
        _fail(node, "pools over the batch axis")
    return [xs[0].b]


def instance_norm(node, h, xs, outs):
    """InstanceNormalization: each (n, c) over axes 2..; the batch must be axis 0."""
    if xs[0].b != 0:
        _fail(node, "normalises with the batch off axis 0")
    if any(v is not None and v.const is None for v in xs[1:]):
        _fail(node, "has a run-time scale or B")
    return [0]


def batchnorm(node, h, xs, outs):
    """BatchNormalization: constant statistics per channel (axis 1), not the batch axis."""
    if xs[0].b == 1:
        _fail(node, "its channel axis is the batch axis")
    if any(v is not None and v.const is None for v in xs[1:]):
        _fail(node, "has run-time statistics")
    return [xs[0].b] + [None] * (len(outs) - 1)


def reduce(node, h, xs, outs):
    x = xs[0]
    r = len(x.shape)
    if len(xs) > 1 and xs[1] is not None:
        if xs[1].const is None:
            _fail(node, "reduces over run-time axes")
        axes = list(np.asarray(xs[1].const).reshape(-1))
    else:
        axes = h.attrs.get("axes")
    if not axes:
        if h.attrs.get("noop_with_empty_axes", 0):
            return [x.b]
        _fail(node, "reduces over every axis, the batch included")
    axes = [_axis(a, r) for a in axes]
    _excluded(node, axes, x.b, r, "reduces over")
    return [x.b if h.attrs.get("keepdims", 1) else x.b - sum(a < x.b for a in axes)]


def recurrent(node, h, xs, outs):
    layout = int(h.attrs.get("layout", 0) or 0)
    bx = 0 if layout else 1  # X (T, B, I) / (B, T, I); initial states (D, B, H) / (B, D, H)
    x = xs[0]
    if x.b != bx:
        _fail(node, "its batch axis is not the input's batch axis (it would run along the batch)")
    for k, axis in ((4, 0), (5, bx), (6, bx), (8, 1)):
        v = xs[k] if len(xs) > k else None
        if v is None:
            continue
        if v.b is not None and v.b != axis:
            _fail(node, f"input {k} has its batch on another axis than the layer's")
        if v.const is not None and len(v.shape) > axis and not _uniform(v.const, axis):
            _fail(node, f"constant input {k} differs from batch row to batch row")
    if any(xs[k] is not None and xs[k].const is None for k in (1, 2, 3, 7) if len(xs) > k):
        _fail(node, "has run-time weights")
    return [0 if layout else 2] + [0 if layout else 1] * (len(outs) - 1)


RULES = {op: elementwise for op in ELEMENTWISE}
RULES.update({"Transpose": transpose, "Reshape": reshape_like, "Flatten": reshape_like, "Squeeze": reshape_like,
              "Unsqueeze": reshape_like, "Slice": slice_, "Gather": gather, "Concat": concat, "Split": split,
              "Pad": pad, "Expand": expand, "MatMul": matmul, "Gemm": gemm, "Conv": conv, "MaxPool": pool, "AveragePool": pool,
              "Softmax": along_axis, "LogSoftmax": along_axis, "Hardmax": along_axis, "ArgMax": along_axis,
              "ArgMin": along_axis, "CumSum": along_axis, "TopK": along_axis, "LayerNormalization": layernorm,
              "BatchNormalization": batchnorm, "GlobalAveragePool": global_pool, "InstanceNormalization": instance_norm,
              "LSTM": recurrent, "GRU": recurrent, "RNN": recurrent})
RULES.update({op: reduce for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
                                    "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare")})
SHAPE_ONLY = ("Shape", "Size")  # their result is a constant (shape arithmetic)
# inputs (by slot) that are shapes, axes, indices or sizes, not data: a constant there that
# is the batch size (a Reshape target of B rows) is checked by the analysis at the threads'
# row counts; anywhere else it is the batch size used as a value, which each thread's rows see
# as a different number
SHAPE_SLOTS = {"Reshape": {1}, "Expand": {1}, "Slice": {1, 2, 3, 4}, "Pad": {1, 3}, "Tile": {1}, "Squeeze": {1},
               "Unsqueeze": {1}, "Split": {1}, "ConstantOfShape": {0}, "Range": set(), "TopK": {1},
               "ReduceSum": {1}, "ReduceMean": {1}, "ReduceMax": {1}, "ReduceMin": {1}, "ReduceProd": {1},
               "ReduceL1": {1}, "ReduceL2": {1}, "ReduceLogSumExp": {1}, "ReduceSumSquare": {1}, "CumSum": {1}}


def _batch_dependence(node, xs, outs):
    """Follows which constant elements are the batch size (Shape / Size of a value with a
    batch axis) through shape arithmetic, element by element where it moves them (Gather,
    Slice, Concat, reshapes, Cast) and wholly where it computes; refuses such a constant fed to
    an op with run-time data as a value."""
    op = node["op"]
    runtime = any(x is not None and x.const is None for x in xs)
    if op in ("Shape", "Size"):
        x = xs[0]
        if x.b is None or outs[0].const is None:
            return
        if op == "Size":
            outs[0].bdep = np.ones(np.shape(outs[0].const), bool)
            return
        full = np.zeros(len(x.shape), bool)
        full[x.b] = True
        start, end = node.get("attrs", {}).get("start", 0), node.get("attrs", {}).get("end", None)
        part = full[start:end] if end is not None else full[start:]
        outs[0].bdep = part if part.shape == np.shape(outs[0].const) else np.ones(np.shape(outs[0].const), bool)
        return
    # a batch size only in shape slots shapes the result, whose values are the data's (zeros of
    # B rows, a table expanded to B rows): those shapes are checked at the threads' row counts
    dep = [k for k, x in enumerate(xs) if x is not None and x.bdep is not None and x.bdep.any()
           and k not in SHAPE_SLOTS.get(op, set())]
    if not dep:
        return
    if runtime:
        _fail(node, "uses the batch size as a value (each thread's rows would see a different one)")
    out = outs[0]
    if out.const is None:
        return
    mask = None
    x0 = xs[0]
    try:
        if op in ("Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten") and dep == [0]:
            mask = x0.bdep.reshape(np.shape(out.const))
        elif op == "Gather" and dep == [0] and x0.bdep.ndim == 1:
            mask = np.take(x0.bdep, np.asarray(xs[1].const, np.int64), axis=0)
        elif op == "Slice" and dep == [0] and x0.bdep.ndim == 1:
            idx = np.arange(x0.bdep.size)
            starts, ends = (np.asarray(xs[k].const).reshape(-1) for k in (1, 2))
            steps = np.asarray(xs[4].const).reshape(-1) if len(xs) > 4 and xs[4] is not None else [1]
            mask = x0.bdep[idx[slice(int(starts[0]), int(ends[0]), int(steps[0]))]]
        elif op == "Concat" and all(x is not None and x.const is not None for x in xs):
            mask = np.concatenate([x.bdep if x.bdep is not None else np.zeros(np.shape(x.const), bool)
                                   for x in xs], axis=int(node.get("attrs", {}).get("axis", 0)))
    except (ValueError, IndexError, TypeError):
        mask = None
    if mask is None or np.shape(mask) != np.shape(out.const):
        mask = np.ones(np.shape(out.const), bool)  # computed from it: every element may be
    out.bdep = np.asarray(mask, bool)
    for o in outs[1:]:
        if o is not None and o.const is not None:
            o.bdep = np.ones(np.shape(o.const), bool)


def _recurrent_shapes(h, xs):
    x = xs[0]
    layout = int(h.attrs.get("layout", 0) or 0)
    D = 2 if h.attrs.get("direction", "forward") in ("bidirectional", b"bidirectional") else 1
    H = int(h.attrs["hidden_size"])
    T, B = (x.shape[1], x.shape[0]) if layout else (x.shape[0], x.shape[1])
    y = (B, T, D, H) if layout else (T, D, B, H)
    s = (B, D, H) if layout else (D, B, H)
    return [y, s, s]


def _walk(model, nodes, env):
    opset = model.opset
    for node in nodes:
        op = node["op"]
        if op == "If":
            cond = env.get(node["inputs"][0])
            if cond is None or cond.const is None:
                _fail(node, "chooses its branch from run-time data")
            branch = node["attrs"]["then_branch" if bool(np.asarray(cond.const).reshape(-1)[0]) else "else_branch"]
            sub = dict(env)
            for name, arr in branch.get("tensors", {}).items():
                sub[name] = V(arr.shape, arr.dtype, const=arr)
            _walk(model, branch["nodes"], sub)
            outs = [sub[n] for n in branch["outputs"]]
        else:
            cls = OPS.get(op)
            if cls is None:
                _fail(node, f"{op} is not analysed for splitting the batch")
            h = cls(node, opset)
            xs = [env[n] if n else None for n in node["inputs"]]
            if any(isinstance(x, list) for x in xs) or any(n and n not in env for n in node["inputs"]):
                _fail(node, "reads a value the analysis does not follow")
            runtime = [x for x in xs if x is not None and x.const is None]
            rule = RULES.get(op)
            if runtime and op not in SHAPE_ONLY and rule is None:
                _fail(node, f"{op} is not known to keep batch rows independent")
            if op in ("LSTM", "GRU", "RNN"):
                if not runtime:
                    _fail(node, "runs on constants only (not followed)")
                outs = [V(s, np.float32) for s in _recurrent_shapes(h, xs)[:len(node["outputs"])]]
            else:
                try:  # the outputs' shapes (and constants' values): the op on zeros of its inputs' shapes
                    with np.errstate(all="ignore"):
                        vals = h.eval([None if x is None else x.dummy() for x in xs])
                except (UnsupportedError, ValueError, TypeError, IndexError, KeyError) as e:
                    _fail(node, f"cannot be followed at these shapes ({e})")
                outs = [V(np.shape(v), np.asarray(v).dtype, const=np.asarray(v) if not runtime or op in SHAPE_ONLY
                          else None) for v in vals]
            _batch_dependence(node, xs, outs)
            if runtime and op not in SHAPE_ONLY:
                for o, b in zip(outs, rule(node, h, xs, outs)):
                    o.b = b
        for name, v in zip(node["outputs"], outs):
            if name:
                env[name] = v


def analyse(model: Any, feeds: dict[str, np.ndarray], axes: dict[str, int]) -> dict[str, int]:
    """{output: batch axis} when every output row provably depends on the same input row
    only (inputs split along `axes`, {input: axis}); raises NotSplittable naming why not."""
    env = {name: V(arr.shape, arr.dtype, const=arr) for name, arr in model.tensors.items()}
    for name, arr in feeds.items():
        env[name] = V(arr.shape, arr.dtype, b=axes[name])
    try:
        _walk(model, model.graph["nodes"], env)
    except NotSplittable:
        raise
    except (UnsupportedError, ValueError, TypeError, IndexError, KeyError) as e:
        raise NotSplittable(f"the graph could not be followed at these shapes ({e})") from None
    out = {}
    for o in model.outputs:
        v = env.get(o)
        if v is None or v.b is None:
            raise NotSplittable(f"output {o!r} has no batch axis")
        out[o] = v.b
    return out


def batch_axes(model: Any, feeds: dict[str, np.ndarray]) -> Iterator[tuple[dict[str, int], int]]:
    """Candidate {input: batch axis} assignments: the batch axes rnnengine.runtime.roles.axis_roles
    found; an input without one takes its one open (undeclared) axis of the batch's size. With
    no known batch axis at all, each open axis of the first input is tried as the batch."""
    roles = axis_roles(model)
    declared = {i["name"]: i["shape"] for i in model.inputs}

    def open_axes(name):
        shape = declared.get(name)
        return [k for k in range(feeds[name].ndim)
                if shape is None or k >= len(shape) or not isinstance(shape[k], int)]
    known = {n: k for n, r in roles.items() if n in feeds for k, role in r.items() if role == "batch"}
    names = list(feeds)
    starts = [known] if known else [{names[0]: k} for k in open_axes(names[0])]
    for start in starts:
        size = {feeds[n].shape[k] for n, k in start.items()}
        if len(size) != 1:
            continue
        size = size.pop()
        axes = dict(start)
        for n in names:
            if n not in axes:
                fits = [k for k in open_axes(n) if feeds[n].shape[k] == size]
                if len(fits) != 1:
                    axes = None
                    break
                axes[n] = fits[0]
        if axes is not None:
            yield axes, size


def bounds(n: int, parts: int) -> list[int]:
    return [int(v) for v in np.linspace(0, n, parts + 1).astype(int)]


def decide(model: Any, feeds: dict[str, np.ndarray]) -> tuple[Any, Any, Optional[int]]:
    """(axes, out_axes, rows) for a split run of these feeds, or (None, reason, None); cached per shapes."""
    threads = int(getattr(model, "threads", 1))
    sig = (threads,) + tuple((n, a.shape, a.dtype.str) for n, a in sorted(feeds.items()))
    cache = model.__dict__.setdefault("_split_decisions", {})
    hit = cache.get(sig)
    if hit is not None:
        return hit
    reasons = []
    result = None
    for axes, rows in batch_axes(model, feeds):
        if rows < 2 * threads:
            reasons.append(f"a batch of {rows} rows gives a thread fewer than 2")
            continue
        label = "batch on " + ", ".join(f"axis {k} of {n!r}" for n, k in axes.items())
        try:
            out_axes = analyse(model, feeds, axes)
            b = bounds(rows, threads)
            for n in sorted({b[k + 1] - b[k] for k in range(threads)}):  # the row counts the threads get
                label = f"batch on {', '.join(f'axis {k} of {m!r}' for m, k in axes.items())}, {n} rows per thread"
                part = {name: np.take(a, range(n), axis=axes[name]) for name, a in feeds.items()}
                if analyse(model, part, axes) != out_axes:
                    raise NotSplittable("the outputs' batch axes change with the row count")
            result = (axes, out_axes, rows)
            break
        except NotSplittable as e:
            reasons.append(f"{label}: {e}")
    if result is None:
        result = (None, "; ".join(dict.fromkeys(reasons)) or "no input has a batch axis that could be told", None)
    if len(cache) > 64:
        cache.clear()
    cache[sig] = result
    return result


_tls = threading.local()


def _context(plan):
    """This worker thread's buffers for `plan`, reused from run to run (a worker runs one
    part at a time; streams reuse their contexts across calls the same way)."""
    cache = getattr(_tls, "contexts", None)
    if cache is None:
        cache = _tls.contexts = {}
    hit = cache.get(id(plan))
    if hit is None or hit[0] is not plan:
        if len(cache) >= 8:
            cache.clear()
        hit = cache[id(plan)] = (plan, plan.context())
    return hit[1]


def run(model: Any, feeds: dict[str, np.ndarray]) -> Optional[dict[str, np.ndarray]]:
    """run()'s outputs computed over model.threads threads, or None (reason in
    model.thread_split_reason) when splitting cannot be proven exact."""
    axes, out_axes, rows = decide(model, feeds)
    if axes is None:
        model.thread_split_reason = out_axes
        return None
    model.thread_split_reason = None
    threads = int(model.threads)
    pool = model.__dict__.get("_split_pool")
    if pool is None or pool._max_workers != threads:
        import concurrent.futures as cf  # here, not at import: (with logging) 4 ms of every load()
        pool = model.__dict__["_split_pool"] = cf.ThreadPoolExecutor(threads, thread_name_prefix="rnnengine-split")
    b = bounds(rows, threads)

    def part(k):
        sub = {}
        for name, a in feeds.items():
            sl = [slice(None)] * a.ndim
            sl[axes[name]] = slice(b[k], b[k + 1])
            sub[name] = np.ascontiguousarray(a[tuple(sl)])
        plan = model.plan(sub)
        return plan.execute(_context(plan), sub, {})
    results = list(pool.map(part, range(threads)))
    return {o: np.concatenate([r[o] for r in results], axis=out_axes[o]) for o in results[0]}
