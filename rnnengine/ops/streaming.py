"""streaming.py - how each op behaves along the time axis of a stream, and the streaming
rule that follows from it.

A stream is fed a sequence in chunks along the time axis of its inputs. Its results are
exact only if every op on a path from a time-carrying input to an output gives, chunk by
chunk, what it gives on the whole sequence. While a stream's plan is made
(rnnengine.runtime.graph.Planner with streaming=True) every value carries its time information:

  t      the axis of this value that runs along the stream's time (None: no time axis)
  final  the value at the last step seen so far (a recurrent layer's Y_h / Y_c): the whole
         sequence's value once the stream has been fed all of it
  tdep   for small integer constants (shape arithmetic): a mask of the elements that depend on
         the chunk's length: EXACT (1) where the value is the length itself (Shape of a
         time-carrying tensor, moved or cast), so that a Reshape or ConstantOfShape built from
         it is known to have its time axis there; DERIVED (2) where it is computed from it
         (T - 1, T * B, a loop's step): never taken for the length (x[:T - 1] is not the whole
         axis), and refused wherever used as a number or an index (a mean over time, a feature
         picked at T - 1)
  lag    how many input steps step j of this value trails input step j by (a convolution's
         output j reads up to input step j + span - 1 - left padding; a Pad's leading steps
         run ahead); values combined step by step must have the same lag
  scale  input steps per step of this value (product of the strides along time)

RULES maps each op type to a function that checks its inputs and sets its outputs' time
information, or raises NotStreamableError naming the node and the reason. An op that is not
in RULES and sees time refuses: an op is streamed only when it is known to be exact.

Ops with a receptive field along time (Conv, MaxPool, AveragePool, Pad along time) stream
with carried context: `emit_window` and `emit_pad` keep the frames they still need in the stream's
state. Look-ahead (right padding) delays their outputs; `finish` flushes them.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import numpy as np

from rnnengine.codes import RECURRENT_OPS, SLOT_SEQUENCE_LENS
from rnnengine.ops.handlers import (ROWS_VIEW, STEP_MASK, emit_conv1d, emit_pool1d, NotStreamableError, _axes, _reshape_target, _slice_params, axis_of,
                  contiguous_strides, emit_copy)

RULES = {}
EXACT, DERIVED = 1, 2   # tdep mask values (above); a bool mask's True is EXACT
# ops whose output element is its input element (a length stays the length)
_VALUE_PRESERVING = frozenset({"Identity", "Cast", "CastLike", "Dropout"})


def rule(*ops):
    def deco(fn):
        for op in ops:
            RULES[op] = fn
        return fn
    return deco


# ops that only move data (a state moved through them is still that state)
MOVEMENT = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Slice", "Gather", "Split",
            "Concat", "Expand", "Dropout"}


def check_outputs(p: Any, outputs: dict[str, Any], state_pairs: Iterable[tuple[str, str]]) -> None:
    """At the end of a stream's plan: outputs must not be numbers computed from the chunk's
    length, and a paired state output must be a layer's final state moved into place (fed back
    as the next call's state it then continues the sequence exactly)."""
    for name, v in outputs.items():
        if has_tdep(v) or (v.const is not None and v.t is not None):
            raise NotStreamableError({"op": "output", "name": name}, "is computed from the length of the chunk, "
                                                                     "not from the whole sequence")
    paired = {o for _, o in state_pairs}
    for name, v in outputs.items():
        if v.fromstate and name not in paired:
            raise NotStreamableError({"op": "output", "name": name},
                                     "is computed from the state the stream feeds back, as it stands when each call "
                                     "begins, where the whole run reads the initial state once")
    for a, o in state_pairs:
        v = outputs.get(o)
        if v is not None and not v.fstate:
            raise NotStreamableError({"op": "output", "name": o},
                                     f"is fed back as state {a!r} but is not a recurrent layer's final state "
                                     "(it is computed from it), so the next call would not continue the sequence")


def timed(v: Any) -> bool:
    """Does this planning-time value run along a stream's time axis (or is it a final state)?"""
    return v is not None and (v.t is not None or v.final)


def has_tdep(v: Any) -> bool:
    """Does this value depend on the sequence length (a shape read along time)?"""
    return v is not None and v.tdep is not None and bool(np.any(v.tdep))


def propagate(p: Any, h: Any, xs: list[Any], outs: list[Any]) -> None:
    """Sets the time information of `outs` (the outputs of handler h's node) from `xs`."""
    node = h.node
    op = node["op"]
    if op in RECURRENT_OPS:
        return RULES[op](p, h, xs, outs)
    if not any(timed(x) or has_tdep(x) or (x is not None and (x.perm or x.fromstate)) for x in xs):
        return None
    runtime = [x for x in xs if x is not None and x.const is None]
    if any(x.fromstate for x in runtime) and any(timed(x) for x in xs):
        raise NotStreamableError(node, "combines the state fed back from the previous call with the time steps "
                                       "of this one (it holds the whole sequence's initial state only in the "
                                       "first call)")
    if any(timed(x) or has_tdep(x) for x in xs):
        fn = RULES.get(op)
        if fn is None:
            raise NotStreamableError(node, f"{op} is not known to act step by step along time, so a stream "
                                           "could not reproduce the whole-sequence result")
        fn(p, h, xs, outs)
        if any(has_tdep(x) for x in xs):
            # shape arithmetic a rule does not follow element by element: every element of its
            # result may be the length (refused wherever used as a number or an axis)
            for o in outs:
                if o is not None and o.const is not None and o.tdep is None and o.t is None:
                    o.tdep = np.full(np.shape(o.const), DERIVED, np.int8)
    # rows put in an order computed from run-time data (e.g. sorted by length): the order
    # can differ from chunk to chunk, which a recurrent layer's carried state must not see
    perm = any(x is not None and x.perm for x in xs) or \
        (op in ("Gather", "GatherElements", "GatherND") and timed(xs[0]) and xs[1].const is None)
    # values moved (not computed) from the explicit state inputs are fed back by the stream
    # itself; values moved from a layer's final state can be fed back as state
    moved = op in MOVEMENT and bool(runtime)
    carried = moved and all(x.carried for x in runtime)
    fstate = moved and all(x.fstate for x in runtime)
    # values computed from explicit state inputs hold the state as it stood when each call began
    fromstate = any(x.fromstate for x in runtime)
    for o in outs:
        if o is not None and o.const is None:
            o.perm, o.carried, o.fstate, o.fromstate = perm, carried, fstate, fromstate


def _set(v, t=None, final=False, lag=0, scale=1, tdep=None):
    v.t, v.final, v.lag, v.scale, v.tdep = t, final, lag, scale, tdep


def _timing(h, xs):
    """(lag, scale) shared by every time-carrying input; refuses inputs out of step."""
    pairs = {(x.lag, x.scale) for x in xs if x is not None and x.t is not None}
    if len(pairs) > 1:
        raise NotStreamableError(h.node, "combines time series that are out of step (one is delayed or "
                                         "subsampled by a convolution and the other is not)")
    return pairs.pop() if pairs else (0, 1)


def _runtime_tdep(h, xs, outs):
    """The chunk length used as a number in run-time arithmetic (e.g. sum / T)."""
    if any(o.const is None for o in outs) and any(has_tdep(x) for x in xs):
        raise NotStreamableError(h.node, "uses the sequence length as a value (e.g. to average over "
                                         "time), which a chunk does not know")


# --- elementwise: the same step in, the same step out -------------------------------------

def precheck(p: Any, h: Any, xs: list[Any]) -> None:
    """Checks made before an op is planned, whose violation would otherwise surface as a
    shape error (or not at all): time series out of step, state combined with time steps."""
    if h.node["op"] in RULES and RULES[h.node["op"]] is elementwise:
        _timing(h, xs)
    runtime = [x for x in xs if x is not None and x.const is None]
    if any(x.fromstate for x in runtime) and any(timed(x) for x in xs) and h.node["op"] not in RECURRENT_OPS:
        raise NotStreamableError(h.node, "combines the state fed back from the previous call with the time steps "
                                         "of this one (it holds the whole sequence's initial state only in the "
                                         "first call)")


@rule("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "Sum", "Mean", "Relu", "Tanh",
      "Sigmoid", "LeakyRelu", "ThresholdedRelu", "HardSigmoid", "Elu", "Softsign", "Softplus", "Sqrt",
      "Exp", "Log", "Neg", "Abs", "Reciprocal", "Floor", "Ceil", "Erf", "Round", "Sign", "Clip", "Cast",
      "CastLike", "Where", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor",
      "Not", "Identity", "Dropout", "IsNaN", "IsInf", "Gelu", "Selu", "Celu", "PRelu", "HardSwish", "Mish",
      "Sin", "Cos", "BitShift")
def elementwise(p, h, xs, outs):
    _runtime_tdep(h, xs, outs)
    out = outs[0]
    nd = len(out.shape)
    axes = set()
    for x in xs:
        if x is not None and x.t is not None:
            axes.add(x.t + nd - len(x.shape))
    if len(axes) > 1:
        raise NotStreamableError(h.node, "combines tensors whose time axes do not line up")
    finals = [x for x in xs if x is not None and x.final]
    t = axes.pop() if axes else None
    if t is not None and finals:
        raise NotStreamableError(h.node, "combines every step with a layer's final state, which is only "
                                         "known at the end of the sequence")
    if t is not None:
        for x in xs:
            if x is None or x.t is not None:
                continue
            k = t - (nd - len(x.shape))
            if 0 <= k < len(x.shape) and x.shape[k] != 1:
                raise NotStreamableError(h.node, f"combines the time axis with a tensor of fixed length "
                                                 f"{x.shape[k]} along it")
    lag, scale = _timing(h, xs)
    tdep = None
    if all(o.const is not None for o in outs):
        masks = [np.broadcast_to(np.asarray(x.tdep, np.int8), x.shape) if has_tdep(x) else np.zeros(x.shape, np.int8)
                 for x in xs if x is not None]
        try:
            tdep = np.maximum.reduce([np.broadcast_to(m, out.shape) for m in masks]) if masks else None
        except ValueError:
            tdep = None
        if tdep is not None and h.node["op"] not in _VALUE_PRESERVING:
            tdep = np.where(tdep != 0, DERIVED, 0).astype(np.int8)   # T - 1, T * B: not the length
    for o in outs[:1]:
        _set(o, t=t, final=bool(finals) and t is None, lag=lag, scale=scale, tdep=tdep)
    for o in outs[1:]:  # Dropout's mask
        _set(o, t=t, lag=lag, scale=scale)


# --- shapes and views ----------------------------------------------------------------------

@rule("Shape")
def shape(p, h, xs, outs):
    x, out = xs[0], outs[0]
    if x.final or x.t is None:
        _set(out)
        return
    mask = np.zeros(len(x.shape), bool)
    mask[x.t] = True
    start, end = h.attr("start", 0), h.attr("end", len(x.shape))
    _set(out, tdep=mask[slice(start, end)])


@rule("Size")
def size(p, h, xs, outs):
    _set(outs[0], tdep=np.array(xs[0].t is not None))


def _mask_of(x, n):
    return np.asarray(x.tdep).reshape(-1) if has_tdep(x) else np.zeros(n, bool)


def _shape_axis(h, x, what, exact=True):
    """The one element of a shape vector that is the chunk length, or None. exact=False: an
    element computed from the length is returned too (the caller checks its value)."""
    if not has_tdep(x):
        return None
    mask = np.asarray(x.tdep).reshape(-1)
    idx = np.flatnonzero(mask)
    if len(idx) != 1:
        raise NotStreamableError(h.node, f"its {what} uses the sequence length in {len(idx)} places")
    if exact and mask[idx[0]] != EXACT:
        raise NotStreamableError(h.node, f"its {what} is computed from the sequence length (not the length "
                                         "itself), so a chunk's would differ from the whole sequence's")
    return int(idx[0])


@rule("ConstantOfShape")
def constant_of_shape(p, h, xs, outs):
    _set(outs[0], t=_shape_axis(h, xs[0], "shape"))


@rule("Reshape", "Flatten")
def reshape(p, h, xs, outs):
    x, out = xs[0], outs[0]
    if h.attrs.get(ROWS_VIEW) == 1:  # X itself (its target, [B * T, K] in a stream, only checked)
        return
    if x.const is not None and x.t is None and not x.final:
        if h.node["op"] == "Reshape" and has_tdep(xs[1]):
            _set(out, t=_shape_axis(h, xs[1], "target shape"))
            return
        _set(out, tdep=np.asarray(x.tdep).reshape(out.shape) if has_tdep(x) else None)
        return
    if x.final:
        _set(out, final=True)
        return
    a, T = x.t, x.shape[x.t]
    before = int(np.prod(x.shape[:a]))
    target = _shape_axis(h, xs[1], "target shape", exact=False) if h.node["op"] == "Reshape" and len(xs) > 1 \
        else None
    cands = [b for b in range(len(out.shape))
             if out.shape[b] == T and int(np.prod(out.shape[:b])) == before]
    if target is not None:
        cands = [b for b in cands if b == target]
    if len(cands) > 1:
        # several axes fit (a chunk of 1 step reshaped to (1, 1, 1)): where the time axis goes
        # is where a chunk of P steps puts its P. Taking the first fit put time on the batch
        # axis of a Conv after Reshape [0, 0, 0] (review).
        try:
            pshape = _probe_reshape(h, x, xs)
        except Exception:  # noqa: BLE001 - a target that does not scale with time
            pshape = []
        cands = [b for b in cands if b < len(pshape) and pshape[b] == PROBE_STEPS and
                 int(np.prod(pshape[:b])) == before]
        if len(cands) != 1:
            raise NotStreamableError(h.node, f"reshapes the time axis {a} of {x.shape} into {out.shape}, and "
                                             "where time goes cannot be told from a chunk of this length")
    if not cands:
        raise NotStreamableError(h.node, f"reshapes the time axis {a} of {x.shape} into {out.shape}, "
                                         "mixing time with other axes")
    _set(out, t=cands[0], lag=x.lag, scale=x.scale)


PROBE_STEPS = 10007   # a chunk length no other dimension has


def _probe_reshape(h: Any, x: Any, xs: list[Any]) -> list[int]:
    """The output shape of this Reshape / Flatten for a chunk of PROBE_STEPS steps (the
    target's elements computed from the length taken as PROBE_STEPS)."""
    probe = list(x.shape)
    probe[x.t] = PROBE_STEPS
    if h.node["op"] == "Flatten":
        return list(h.target(tuple(probe)))
    target = np.asarray(xs[1].const, np.int64).reshape(-1).copy()
    if has_tdep(xs[1]):
        target[np.asarray(xs[1].tdep).reshape(-1) != 0] = PROBE_STEPS
    return list(_reshape_target(h, tuple(probe), target, h.attr("allowzero", 0)))


def reshape_no_steps(p: Any, h: Any, xs: list[Any]) -> list[Any]:
    """A Reshape of a chunk with no steps (a conv still filling its window, or finish()):
    -1 cannot be inferred from zero elements, so the target is resolved for a chunk of
    PROBE_STEPS steps and the time axis then set back to 0."""
    x = xs[0]
    if h.node["op"] != "Flatten" and has_tdep(xs[1]) and np.any(np.asarray(xs[1].tdep) == DERIVED):
        raise NotStreamableError(h.node, "reshapes a chunk with no steps to a shape computed from the "
                                         "sequence length")
    out_shape = _probe_reshape(h, x, xs)
    probe = list(x.shape)
    probe[x.t] = PROBE_STEPS
    fake = type(x)(probe, x.dtype, tid=-1)
    fake.t, fake.lag, fake.scale = x.t, x.lag, x.scale
    out = type(x)(out_shape, x.dtype, tid=-1)
    reshape(p, h, [fake] + list(xs[1:]), [out])
    b = out.t
    out_shape[b] = 0
    res = p.alias(x, tuple(out_shape))
    _set(res, t=b, lag=x.lag, scale=x.scale)
    return [res]


@rule("Squeeze")
def squeeze(p, h, xs, outs):
    x, out = xs[0], outs[0]
    if x.t is None:
        _set(out, final=x.final, tdep=np.asarray(x.tdep).reshape(out.shape) if has_tdep(x) else None)
        return
    if len(out.shape) == len(x.shape):
        _set(out, t=x.t, lag=x.lag, scale=x.scale)
        return
    axes = _axes(h, xs, 1)
    nd = len(x.shape)
    axes = [i for i, d in enumerate(x.shape) if d == 1] if axes is None else [axis_of(h, a, nd) for a in axes]
    if x.t in axes:
        raise NotStreamableError(h.node, "squeezes away the time axis (a chunk of one step would lose it)")
    _set(out, t=x.t - sum(1 for a in axes if a < x.t), lag=x.lag, scale=x.scale)


@rule("Unsqueeze")
def unsqueeze(p, h, xs, outs):
    x, out = xs[0], outs[0]
    if x.t is None:
        _set(out, final=x.final, tdep=np.asarray(x.tdep).reshape(out.shape) if has_tdep(x) else None)
        return
    nd = len(out.shape)
    axes = sorted(axis_of(h, a, nd) for a in _axes(h, xs, 1))
    rest = [i for i in range(nd) if i not in axes]
    _set(out, t=rest[x.t], lag=x.lag, scale=x.scale)


@rule("Transpose")
def transpose(p, h, xs, outs):
    x, out = xs[0], outs[0]
    if x.t is None:
        _set(out, final=x.final)
        return
    perm = h.perm(len(x.shape))
    _set(out, t=perm.index(x.t), lag=x.lag, scale=x.scale)


@rule("Expand")
def expand(p, h, xs, outs):
    x, out = xs[0], outs[0]
    if x.final:
        raise NotStreamableError(h.node, "repeats a final state along other axes")
    t = None if x.t is None else x.t + len(out.shape) - len(x.shape)
    ts = _shape_axis(h, xs[1], "target shape")
    if ts is not None:
        ts += len(out.shape) - len(np.asarray(xs[1].const).reshape(-1))
        if t is not None and t != ts:
            raise NotStreamableError(h.node, "expands along the time axis")
        t = ts
    _set(out, t=t, lag=x.lag, scale=x.scale)


@rule("Concat")
def concat(p, h, xs, outs):
    out = outs[0]
    nd = len(out.shape)
    a = axis_of(h, h.attr("axis"), nd)
    if all(o.const is not None for o in outs) and not any(x.t is not None or x.final for x in xs):
        _set(out, tdep=np.concatenate([_mask_of(x, int(np.prod(x.shape))).reshape(x.shape) for x in xs], axis=a))
        return
    if any(x.final for x in xs):
        if all(x.final or x.const is not None for x in xs):
            _set(out, final=True)
            return
        raise NotStreamableError(h.node, "concatenates final states with time steps")
    ts = {x.t for x in xs if x.t is not None}
    if a in ts:
        raise NotStreamableError(h.node, "concatenates along the time axis")
    if len(ts) > 1:
        raise NotStreamableError(h.node, "concatenates tensors whose time axes differ")
    t = ts.pop()
    if any(x.t is None and x.shape[t] != 1 for x in xs):
        raise NotStreamableError(h.node, "concatenates time steps with a tensor of fixed length along time")
    lag, scale = _timing(h, xs)
    _set(out, t=t, lag=lag, scale=scale)


@rule("Gather")
def gather(p, h, xs, outs):
    data, idx, out = xs[0], xs[1], outs[0]
    a = axis_of(h, h.attr("axis", 0), len(data.shape))
    if out.const is not None and data.t is None and not data.final and idx.t is None:
        m = _mask_of(data, int(np.prod(data.shape))).reshape(data.shape)
        _set(out, tdep=np.take(m, np.asarray(idx.const, np.int64), axis=a) if m.any() else None)
        return
    if data.final or idx.final:
        if data.t is None and idx.t is None:
            _set(out, final=True)
            return
        raise NotStreamableError(h.node, "gathers with a final state")
    if data.t is not None and idx.t is not None:
        raise NotStreamableError(h.node, "gathers time steps with time-dependent indices")
    if idx.t is not None:  # an embedding lookup of tokens: step by step
        _set(out, t=a + idx.t, lag=idx.lag, scale=idx.scale)
        return
    if data.t == a:
        if p.loop_iter is not None and idx.const is not None and np.asarray(idx.const).size == 1 \
                and int(np.asarray(idx.const).reshape(-1)[0]) == p.loop_iter:
            # step i of the chunk, read by iteration i of a loop over time: one step per iteration
            p.loop_timing = (data.lag, data.scale)
            if p.loop_reads is not None:
                p.loop_reads.append((data.shape[data.t], data.lag, data.scale))
            if len(idx.shape) != 0:
                raise NotStreamableError(h.node, "reads steps of the time axis as a tensor inside a loop over time")
            _set(out)
            return
        return _last_step(h, data, out, idx.const, a)
    if has_tdep(idx):
        raise NotStreamableError(h.node, "picks along another axis at an index computed from the sequence length")
    t = data.t if data.t < a else data.t + len(idx.shape) - 1
    _set(out, t=t, lag=data.lag, scale=data.scale)


def _last_step(h, x, out, index, axis):
    """x[..., -1, ...] along time: the value at the last step, as a final state is."""
    if index is not None and np.asarray(index).size == 1 and int(np.asarray(index).reshape(-1)[0]) == -1:
        if x.shape[axis] == 0:
            raise NotStreamableError(h.node, "a chunk with no steps has no last step: feed at least one step")
        if x.lag or x.scale != 1:
            raise NotStreamableError(h.node, "picks the last step of a series that a convolution delays or "
                                             "subsamples, so a chunk may hold no step")
        _set(out, final=True)
        return
    raise NotStreamableError(h.node, "picks steps out of the time axis (only the last step, index -1, "
                                     "has the same meaning in every chunk)")


@rule("Slice")
def slice_(p, h, xs, outs):
    x, out = xs[0], outs[0]
    if out.const is not None and x.t is None and not x.final:
        if has_tdep(x):
            params = _slice_params(h, x.shape, xs)
            idx = tuple(slice(s, s + n * st if s + n * st >= 0 else None, st) for s, n, st in params)
            _set(out, tdep=np.asarray(x.tdep).reshape(x.shape)[idx])
        else:
            _set(out)
        return
    if x.final:
        _set(out, final=True)
        return
    _no_length_params(h, xs, x.t)
    raw = _raw_slice(h, xs, x.t)
    if raw is not None and raw[2] == 1 and (raw[0] == 0 or raw[0] <= -(2 ** 31)) \
            and (raw[1] >= 2 ** 31 - 1 or raw[3]):
        # the whole time axis by construction (0 or -inf to +inf or to the length itself)
        _set(out, t=x.t, lag=x.lag, scale=x.scale)
        return
    if raw is not None and raw[:3] == (-1, raw[1], 1) and raw[1] >= 2 ** 31 - 1:
        return _last_step(h, x, out, -1, x.t)  # x[-1:], the last step
    raise NotStreamableError(h.node, "slices the time axis (a chunk holds other steps than the whole "
                                     "sequence)")


def _no_length_params(h, xs, t):
    """Refuses a Slice of a time series whose starts, axes or steps, or whose end on another
    axis than time, depend on the chunk's length (x[..., :T] cuts features at the chunk length)."""
    if h.opset < 10:
        return
    nd = len(xs[0].shape)
    if any(has_tdep(v) for v in xs[1:2] + xs[3:5] if v is not None):
        raise NotStreamableError(h.node, "its starts, axes or steps depend on the sequence length")
    if len(xs) > 2 and has_tdep(xs[2]):
        emask = np.asarray(xs[2].tdep).reshape(-1)
        axes = list(range(len(emask))) if len(xs) <= 3 or xs[3] is None or xs[3].const is None else \
            [int(a) % nd for a in np.asarray(xs[3].const).reshape(-1)]
        if any(m and a != t for m, a in zip(emask, axes)):
            raise NotStreamableError(h.node, "slices an axis other than time at a position computed from the "
                                             "sequence length")


def _raw_slice(h, xs, axis):
    """(start, end, step, end is the length) a Slice gives the axis, as written, or None."""
    if h.opset < 10:
        starts, ends, axes, steps, emask = h.attr("starts"), h.attr("ends"), h.attr("axes"), None, None
    else:
        def val(j):
            if len(xs) <= j or xs[j] is None or xs[j].const is None:
                return None
            return [int(v) for v in np.asarray(xs[j].const).reshape(-1)]
        starts, ends, axes, steps = val(1), val(2), val(3), val(4)
        emask = list(np.asarray(xs[2].tdep).reshape(-1)) if len(xs) > 2 and has_tdep(xs[2]) else None
    if starts is None or ends is None:
        return None
    nd = len(xs[0].shape)
    axes = list(range(len(starts))) if axes is None else [a % nd for a in axes]
    if axis not in axes:
        return (0, 2 ** 63 - 1, 1, False)
    k = axes.index(axis)
    return (starts[k], ends[k], 1 if steps is None else steps[k], bool(emask and emask[k] == EXACT))


@rule("Split")
def split(p, h, xs, outs):
    x = xs[0]
    a, _ = h.sizes(x.shape, xs)
    if x.t == a:
        raise NotStreamableError(h.node, "splits the time axis")
    if (x.t is not None or x.final) and any(has_tdep(v) for v in xs[1:]):
        raise NotStreamableError(h.node, "splits at sizes computed from the sequence length")
    for o in outs:
        _set(o, t=x.t, final=x.final, lag=x.lag, scale=x.scale)


@rule("MatMul")
def matmul(p, h, xs, outs):
    a, b = xs
    out = outs[0]
    if b.t is not None or b.final:
        raise NotStreamableError(h.node, "multiplies by a matrix that changes with time")
    if a.final:
        _set(out, final=True)
        return
    if a.t == len(a.shape) - 1:
        raise NotStreamableError(h.node, "sums over the time axis (it is the contracted axis)")
    if a.t == len(a.shape) - 2 and h.weight_matrix(b) is None:
        raise NotStreamableError(h.node, "multiplies the time steps, as the rows of one product, by a run-time "
                                         "or batched matrix: BLAS rounds a row differently with the chunk's length")
    # a 1-D B drops A's last axis (time keeps its place); otherwise A's matrix axes come last
    _set(out, t=a.t if len(b.shape) == 1 else a.t + len(out.shape) - len(a.shape), lag=a.lag, scale=a.scale)


@rule("Gemm")
def gemm(p, h, xs, outs):
    a = xs[0]
    if any(x is not None and (x.t is not None or x.final) for x in xs[1:]):
        raise NotStreamableError(h.node, "its B or C input changes with time")
    if a.final:
        _set(outs[0], final=True)
        return
    t = 1 - a.t if h.attr("transA", 0) else a.t
    if t != 0:
        raise NotStreamableError(h.node, "sums over the time axis (it is the contracted axis)")
    _set(outs[0], t=0, lag=a.lag, scale=a.scale)


@rule("Softmax", "LogSoftmax", "Hardmax")
def softmax(p, h, xs, outs):
    x = xs[0]
    if x.final:
        _set(outs[0], final=True)
        return
    nd = len(x.shape)
    if h.opset < 13:
        a = axis_of(h, h.attr("axis", 1), nd)
        mixes = x.t >= a
    else:
        mixes = x.t == axis_of(h, h.attr("axis", -1), nd)
    if mixes:
        raise NotStreamableError(h.node, "normalises over the time axis (needs the whole sequence)")
    _set(outs[0], t=x.t, lag=x.lag, scale=x.scale)


def _steps_apart(h, xs, outs, why_not):
    """The rule of an op that computes each step apart unless its axes reach time: the output
    keeps x's time axis; why_not(t): the reason a time axis t cannot stream, or None."""
    x = xs[0]
    if x.final:
        _set(outs[0], final=True)
        return
    if x.t is None:
        raise NotStreamableError(h.node, "normalises a value computed from the sequence length")
    why = why_not(x.t)
    if why:
        raise NotStreamableError(h.node, why)
    _set(outs[0], t=x.t, lag=x.lag, scale=x.scale)


@rule("GlobalAveragePool")
def global_pool(p, h, xs, outs):
    """The mean over axes 2.. ."""
    _steps_apart(h, xs, outs, lambda t: "pools over the time axis (needs the whole sequence)" if t >= 2 else None)


@rule("InstanceNormalization")
def instance_norm(p, h, xs, outs):
    """Each (n, c) over axes 2.., then a per-channel affine map."""
    _steps_apart(h, xs, outs, lambda t: "normalises over the time axis (needs the whole sequence)" if t >= 2 else
                 "its channel axis is the time axis" if t == 1 else None)


@rule("BatchNormalization")
def batchnorm(p, h, xs, outs):
    """A per-channel affine map on axis 1 (the statistics are constants)."""
    _steps_apart(h, xs, outs, lambda t: "its channel axis is the time axis (one statistic per time step)"
                 if t == 1 else None)


@rule("LayerNormalization")
def layernorm(p, h, xs, outs):
    x = xs[0]
    if any(timed(v) or has_tdep(v) for v in xs[1:]):
        raise NotStreamableError(h.node, "its Scale or B changes with time")
    if x.final:
        for o in outs:
            if o is not None:
                _set(o, final=True)
        return
    if x.t is None:
        raise NotStreamableError(h.node, "normalises a value computed from the sequence length")
    r = len(x.shape)
    if x.t >= axis_of(h, h.attr("axis", -1), r):
        raise NotStreamableError(h.node, "normalises over the time axis (needs the whole sequence)")
    for v in xs[1:]:
        k = x.t - (r - len(v.shape)) if v is not None else -1
        if k >= 0 and v.shape[k] != 1:
            raise NotStreamableError(h.node, f"scales the time axis by a tensor of fixed length {v.shape[k]} along it")
    for o in outs:
        if o is not None:
            _set(o, t=x.t, lag=x.lag, scale=x.scale)


def _reduced_axes(h, x, xs):
    op = h.node["op"]
    if op in ("ArgMax", "ArgMin", "CumSum", "TopK"):
        if op == "TopK":
            return [h.geometry(x.shape, xs)[0]]
        if op == "CumSum":
            return [axis_of(h, int(np.asarray(xs[1].const).reshape(-1)[0]), len(x.shape))]
        return [axis_of(h, h.attr("axis", 0), len(x.shape))]
    return h.axes(x.shape, xs)


@rule("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
      "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin", "CumSum", "TopK")
def reduce(p, h, xs, outs):
    x = xs[0]
    if any(has_tdep(v) for v in xs[1:]):
        raise NotStreamableError(h.node, "its axes depend on the sequence length")
    if x.final:
        for o in outs:
            _set(o, final=True)
        return
    if x.t is None:
        return  # shape arithmetic on the length: followed by propagate
    axes = _reduced_axes(h, x, xs)
    if x.t in axes:
        raise NotStreamableError(h.node, f"{h.node['op']} over the time axis needs the whole sequence "
                                         "(e.g. pooling over time)")
    keep = h.node["op"] in ("CumSum", "TopK") or bool(h.attr("keepdims", 1))
    t = x.t if keep else x.t - sum(1 for a in axes if a < x.t)
    for o in outs:
        _set(o, t=t, lag=x.lag, scale=x.scale)


# --- recurrent layers ----------------------------------------------------------------------

def recurrent_check(h: Any, xs: list[Any]) -> int:
    """Refuses, before it is planned, a recurrent layer a stream cannot carry forward."""
    x = xs[0]
    direction = h.attrs.get("direction", "forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if direction != "forward":
        raise NotStreamableError(h.node, f"direction {direction!r} runs backwards in time, so it needs "
                                         "the whole sequence (run the model on whole sequences instead)")
    masked = bool(h.attrs.get(STEP_MASK))
    for k, v in enumerate(xs[1:], 1):
        if masked and k == 8 and v is not None:  # a Keras step mask (rnnengine/fuse.py) runs with X
            if v.final or (v.t is None) != (x.t is None) or (v.t is not None and (v.t != 0 or v.lag != x.lag)):
                raise NotStreamableError(h.node, "its step mask does not run along time with its input")
            continue
        if v is not None and k != 4 and (v.t is not None or v.final) and k not in (5, 6):
            raise NotStreamableError(h.node, "its weights change with time")
    for v in xs[5:7]:
        if v is not None and v.t is not None:
            raise NotStreamableError(h.node, "its initial state changes with time")
        if v is not None and x.t is not None and v.const is None and not v.carried:
            raise NotStreamableError(h.node, "its initial state is an input fed anew at every call, not state "
                                             "the stream carries (pair it with the output holding the next state: "
                                             "convert --state IN=OUT)")
    if x.final:
        raise NotStreamableError(h.node, "runs over a final state as if it were a sequence")
    lens = xs[SLOT_SEQUENCE_LENS] if len(xs) > SLOT_SEQUENCE_LENS else None
    T_axis = 1 if int(h.attrs.get("layout", 0)) else 0
    full = lens is not None and lens.const is not None and has_tdep(lens) and x.t is not None \
        and bool(np.all(np.asarray(lens.const) == x.shape[T_axis]))
    if lens is not None and lens.const is not None and x.t is not None and not full:
        # the lengths count the steps of the whole sequence; a stream would apply them anew to
        # every chunk (steps past them computed in a later chunk, or a length past the chunk)
        raise NotStreamableError(h.node, "its sequence_lens are constants counting the whole sequence's "
                                         "steps, which a stream cannot apply chunk by chunk (give them as an "
                                         "input: per call, the valid steps of each row in that chunk)")
    if h.node["op"] == "LSTM" and x.t is not None:
        fed = [v is not None and v.const is None for v in (list(xs[5:7]) + [None, None])[:2]]
        if fed[0] != fed[1]:
            have, lack = ("initial_h", "initial_c") if fed[0] else ("initial_c", "initial_h")
            raise NotStreamableError(h.node, f"its {have} is state fed back by the caller but its {lack} is not, "
                                             "so that half of its state would start anew at every call")
    if x.perm and x.t is not None:
        raise NotStreamableError(h.node, "its batch rows arrive in an order computed from the data (e.g. "
                                         "sorted by sequence length), which can change from chunk to chunk, so "
                                         "its carried state would meet the wrong rows")
    if x.t is not None and x.t != T_axis:
        raise NotStreamableError(h.node, f"runs its recurrence over axis {T_axis} of X, but the stream's time "
                                         f"is axis {x.t}")
    return T_axis


@rule(*RECURRENT_OPS)
def recurrent(p, h, xs, outs):
    x = xs[0]
    T_axis = recurrent_check(h, xs)
    if x.t is None:
        for o in outs[1:]:  # a fixed-length chunk per call: the state carries on from call to call
            if o is not None:
                o.fstate = True
        return
    if x.lag or x.scale != 1:
        if len(xs) > SLOT_SEQUENCE_LENS and xs[SLOT_SEQUENCE_LENS] is not None:
            raise NotStreamableError(h.node, "its sequence_lens count the input's steps, but a convolution "
                                             "delays or subsamples what reaches this layer")
    _set(outs[0], t=T_axis, lag=x.lag, scale=x.scale)
    for o in outs[1:]:
        if o is not None:
            _set(o, final=True, lag=x.lag, scale=x.scale)
            o.fstate = True


# --- ops with a receptive field along time: carried context ---------------------------------

def conv_along_time(p: Any, h: Any, xs: list[Any]) -> bool:
    """True when a Conv's or a pool's length axis is the stream's time axis (it then streams
    with carried context through emit_window); refuses those that mix time otherwise."""
    x = xs[0]
    if not timed(x):
        return False
    if any(v is not None and (v.t is not None or v.final) for v in xs[1:]):
        raise NotStreamableError(h.node, "its weights change with time")
    if not x.final and x.t == 0:
        return False  # time runs along the conv's batch axis (a window per step): step by step
    if x.final or x.t != len(x.shape) - 1:
        raise NotStreamableError(h.node, f"{'convolves' if h.node['op'] == 'Conv' else 'pools'} over the "
                                         "channels of a time series (time must be the "
                                         "length axis)")
    return True


def emit_window(p: Any, h: Any, xs: list[Any]) -> list[Any]:
    """Conv1d, MaxPool or AveragePool over a chunk, with the frames it still needs from
    earlier chunks.

    Along time the whole-sequence op reads the padded input P = [pl pads, x, pr pads] and
    writes output j from P[j*s, j*s + span), span = d*(K-1) + 1. The stream keeps the
    unconsumed tail of P (`carry` frames, starting with the pl pads) in its state; each call
    appends the chunk, emits every window that is complete, and keeps the rest. finish()
    appends the pr pads. A negative carry is a number of frames to skip (stride > span). A
    pool reads only the input frames of its buffer (from `lo`, after the left pads it still
    holds, up to `hi`, before the right pads): the stream counts the input steps it has seen,
    up to the number of frames it keeps."""
    x = xs[0]
    conv = h.node["op"] == "Conv"
    if conv:
        w = xs[1]
        bias = xs[2] if len(xs) > 2 else None
        if w.const is None or (bias is not None and bias.const is None):
            h.fail("weights and bias must be constants")
        K0 = w.shape[2] if len(w.shape) == 3 else 1
    else:
        kind = h.kind()
        K0 = int((h.attr("kernel_shape") or [1])[0])  # (a missing one is refused by geometry)
    long_enough = (x.shape[0], x.shape[1], 4 * (K0 * 8 + 8))  # the geometry of a long input: pads, span
    if conv:
        N, C, _, M, K, _, s, d, pl, pr, g = h.geometry(long_enough, w.shape)
    else:
        N, C, _, K, _, s, d, pl, pr, ceil = h.geometry(long_enough)
        if ceil and s > 1:
            raise NotStreamableError(h.node, f"ceil_mode=1 with stride {s}: its last window depends on where "
                                             "the whole sequence ends")
        M = C
    ap = h.attr("auto_pad", "NOTSET")
    ap = ap.decode() if isinstance(ap, bytes) else ap
    if ap in ("SAME_UPPER", "SAME_LOWER") and s > 1:
        raise NotStreamableError(h.node, f"auto_pad {ap} with stride {s} pads by an amount that depends on "
                                         "the whole sequence's length")
    if pl < 0 or pr < 0:
        raise NotStreamableError(h.node, "negative padding crops the time axis")
    L = x.shape[2]
    span = d * (K - 1) + 1
    p.tail = p.tail or pr > 0
    key = "conv:" + (h.node["outputs"][0] or h.node.get("name", ""))
    cap = max(span - 1, pl)
    carry = p.aux_in.get(key, pl)
    # incoming frames: the chunk, then (finish) the pr pads; a pending skip eats them first
    skip, kept = max(0, -carry), max(0, carry)
    used = min(skip, L)
    tail0 = pr if p.finishing else 0
    tail = tail0 - min(skip - used, tail0)
    skip -= used + (tail0 - tail)
    n_in = L - used
    buf_len = kept + n_in + tail
    n_out = (buf_len - span) // s + 1 if buf_len >= span else 0
    # the next call's carry: frames kept (> 0), or frames still to skip (< 0)
    p.aux_out[key] = -skip if skip > 0 else buf_len - n_out * s
    st = p.stream_state(key, np.zeros(N * C * cap, np.float32), [(N, C, cap)])
    buf = p.new((N, C, buf_len), np.float32)
    bst = contiguous_strides((N, C, buf_len))
    if kept:
        emit_copy(p, st, buf, (N, C, kept), [C * cap, cap, 1], bst)
    if n_in:
        emit_copy(p, x, buf, (N, C, n_in), contiguous_strides(x.shape), bst, src_off=used, dst_off=kept)
    if tail:
        z = p.const(np.zeros((N, C, tail), np.float32))
        emit_copy(p, z, buf, (N, C, tail), contiguous_strides((N, C, tail)), bst, dst_off=kept + n_in)
    out = p.new((N, M, n_out), np.float32)
    if conv and n_out:
        emit_conv1d(p, buf, w, bias, out, [N, C, buf_len, M, K, n_out, s, d, 0, g])
    elif not conv:
        seen = p.aux_in.get(key + ":seen", 0)  # input steps before this call, counted up to cap
        p.aux_out[key + ":seen"] = min(cap, seen + L)
        # a window emitted before: set once; until then the buffer holds the whole padded input
        p.aux_out[key + ":out"] = 1 if n_out or p.aux_in.get(key + ":out") else 0
        if not p.aux_out[key + ":out"]:
            p.tail = True  # finish() must see whether the steps make a window, a partial one or none
            if p.finishing:
                h.check_partial(buf_len, span, s)
        if n_out:
            lo = max(0, kept - seen) if carry > 0 else 0  # left pads still in the buffer
            emit_pool1d(p, h, p.alias(buf, (N * C, buf_len)), p.alias(out, (N * C, n_out)), kind,
                        [N * C, buf_len, n_out, K, s, d, 0, lo, kept + n_in, 0, buf_len])
    rest = p.aux_out[key]
    if rest > 0:  # the unconsumed tail becomes the next call's carry
        emit_copy(p, buf, st, (N, C, rest), bst, [C * cap, cap, 1], src_off=buf_len - rest)
    # output j reads input steps up to j*s + span - 1 - pl: it trails step j by span - 1 - pl
    _set(out, t=2, lag=x.lag + (span - 1 - pl) * x.scale, scale=x.scale * s)
    return [out]


def pad_along_time(p: Any, h: Any, xs: list[Any], x_shape: tuple[int, ...]) -> Optional[tuple[int, int]]:
    """(begin, end) padding of the time axis, or None when the Pad leaves time alone."""
    x = xs[0]
    if not timed(x):
        return None
    mode, begin, end, value = h.params(x_shape, xs)
    if x.final:
        return None
    b, e = begin[x.t], end[x.t]
    if b == 0 and e == 0:
        return None
    if any(has_tdep(v) for v in xs[1:]):
        raise NotStreamableError(h.node, "pads the time axis by an amount computed from the chunk's length")
    if mode != "constant":
        raise NotStreamableError(h.node, f"{mode} padding of the time axis reads steps from the other end "
                                         "of the sequence")
    if b < 0 or e < 0:
        raise NotStreamableError(h.node, "negative padding crops the time axis")
    return b, e


def emit_pad(p: Any, h: Any, xs: list[Any], b: int, e: int) -> list[Any]:
    """Pad along time in a stream: the leading `b` steps come out before the first chunk, the
    trailing `e` steps at finish(); other axes are padded as usual."""
    x = xs[0]
    key = "pad:" + (h.node["outputs"][0] or h.node.get("name", ""))
    started = p.aux_in.get(key, 0)
    p.aux_out[key] = 1
    p.tail = p.tail or e > 0
    mode, begin, end, value = h.params(x.shape, xs)
    begin, end = list(begin), list(end)
    begin[x.t] = 0 if started else b
    end[x.t] = e if p.finishing else 0
    out = h.emit_padded(p, x, mode, begin, end, value)
    # step j of the padded series is input step j - b: it runs b steps ahead (its trailing
    # steps come at finish())
    _set(out, t=x.t, lag=x.lag - b * x.scale, scale=x.scale)
    return [out]


@rule("Conv", "Pad", "MaxPool", "AveragePool")
def conv_or_pad_without_time(p, h, xs, outs):
    """Conv / Pad / a pool whose time axis is left alone (handled by emit_window / emit_pad
    otherwise)."""
    x = xs[0]
    if any(has_tdep(v) for v in xs[1:]):
        raise NotStreamableError(h.node, "its parameters depend on the sequence length")
    for o in outs:
        if o.t is None and not o.final:
            _set(o, t=x.t, final=x.final, lag=x.lag, scale=x.scale)


def scan_output(p: Any, node: dict[str, Any], vals: list[Any], out: Any, time_loop: bool) -> None:
    """The time information of a Loop's scan output: the stacked per-iteration values."""
    if any(v.final for v in vals) or (time_loop and any(v.t is not None for v in vals)):
        raise NotStreamableError(node, "stacks values that already run along time")
    if time_loop:
        lag, scale = p.loop_timing
        _set(out, t=0, lag=lag, scale=scale)
    elif vals[0].t is not None:
        _set(out, t=vals[0].t + 1, lag=vals[0].lag, scale=vals[0].scale)


@rule("Range")
def range_(p, h, xs, outs):
    raise NotStreamableError(h.node, "counts up to the sequence length: positions would restart at 0 in "
                                     "every chunk")


@rule("Tile")
def tile(p, h, xs, outs):
    x = xs[0]
    if has_tdep(xs[1]) or x.final:
        raise NotStreamableError(h.node, "repeats along the time axis")
    reps = [int(r) for r in np.asarray(xs[1].const).reshape(-1)]
    if x.t is not None and reps[x.t] != 1:
        raise NotStreamableError(h.node, "repeats the time axis")
    _set(outs[0], t=x.t, lag=x.lag, scale=x.scale)
