"""ops.py - the op handlers: one per ONNX op type the converter and the graph executor know.

Every handler does two things for its op, with ONNX semantics at the graph's opset:
  * ``eval``: NumPy evaluation, used to fold constants (at conversion, and when a model is
    planned for concrete input shapes, e.g. the Shape -> Gather -> ConstantOfShape chains that
    build zero initial states);
  * ``emit``: planning of instructions for the C executor (src_c/graph.c) when an input is
    only known at run time.
Handlers are registered in OPS by ``@register("Op", ...)``. ``ATTRS`` lists the attributes
each op accepts; any other attribute is refused at conversion (never silently ignored).
"""
from __future__ import annotations

import math

import numpy as np

from typing import Any, Iterable, Optional, Protocol

from rnnengine import _core
from rnnengine.errors import NotStreamableError, UnsupportedError, where  # noqa: F401 (re-exported)
# the C enums (src_c/rnnengine.h) and the recurrent ops' tables, defined once in codes.py
from rnnengine.codes import (  # noqa: F401 (OP_* re-exported)
    ACT_ELU, ACT_HARD_SIGMOID, ACT_LEAKY_RELU, ACT_RELU, ACT_SIGMOID, ACT_SOFTPLUS, ACT_SOFTSIGN, ACT_TANH,
    ACT_THRESHOLDED_RELU, BIN_ADD, BIN_AND, BIN_DIV, BIN_EQUAL, BIN_FMOD, BIN_GREATER, BIN_GREATER_EQUAL,
    BIN_LESS, BIN_LESS_EQUAL, BIN_MAX, BIN_MIN, BIN_MOD, BIN_MUL, BIN_OR, BIN_POW, BIN_SUB, BIN_XOR, DT_F32,
    DT_I32, DT_I64, OP_ARGMAX, OP_BINARY, OP_CAST, OP_CONV1D, OP_CONV1D_PACKED, OP_COPY, OP_STFT, OP_CUMSUM, OP_GATHER, OP_LAYERNORM,
    OP_BMATMUL, OP_MATMUL, OP_PAD, OP_POOL1D,
    OP_RECURRENT, OP_REDUCE, OP_REVSEQ, OP_SCATTER, OP_SOFTMAX, OP_TBINARY, OP_TOPK, OP_TREDUCE, OP_TUNARY,
    OP_UNARY, OP_WHERE, ONNX_DTYPE, RECURRENT_ATTRS, RECURRENT_INPUTS, RECURRENT_OPS, REDUCE_MAX, REDUCE_MEAN,
    REDUCE_MIN, REDUCE_PROD, REDUCE_SUM, TENSOR_DTYPES, TUNARY_ABS, TUNARY_NEG, TUNARY_NOT,
    UNARY_ABS, UNARY_CEIL, UNARY_CLIP, UNARY_ERF, UNARY_EXP, UNARY_FLOOR, UNARY_LOG, UNARY_NEG, UNARY_RECIPROCAL,
    UNARY_SQRT, recurrent_attrs)
from rnnengine.frontend.opsets import schema as opset_schema
from rnnengine.limits import refuse, resolve
from rnnengine.runtime.layers import layer_from_onnx

OPS = {}  # op type -> handler class
F32_MAX = float(np.finfo(np.float32).max)

# attributes the converter adds to the recurrent nodes it builds (rnnengine/frontend/fuse.py):
STATELESS = "rnnengine_stateless"  # converter-made cells start from their given state every call
# converter-made cells with a per-row step mask (Keras masking): input 8 is the mask (T, B, 1);
# a masked row-step keeps the state and repeats it as output (rnnengine.h)
STEP_MASK = "rnnengine_step_mask"
# converter-made cells that replace a Keras while-loop: a whole run of T = 0 steps is refused,
# as the Loop it replaces is (onnxruntime's Loop answers (0, 0, H) or fails); a stream's empty
# chunk is still empty
KERAS_LOOP = "rnnengine_keras_loop"
# converter-made marks of a Keras Tensordot, Reshape -> MatMul -> Reshape
# (rnnengine/frontend/converter.py _unflatten_matmuls): 1 on the Reshape flattening X into rows
# of its last axis (it passes X on, after checking that its target makes exactly those rows),
# 2 on the Reshape after the MatMul (its target resolved as against the (rows, N) product)
ROWS_VIEW = "rnnengine_rows_view"


class PlannerInterface(Protocol):
    """What a handler may call on the planner (rnnengine/runtime/graph.py ``Planner``) in
    ``emit`` (and a control-flow handler in ``plan_node``). Values are planning-time tensors
    (``Value``: ``shape``, ``dtype``, and ``const`` or a run-time buffer id)."""

    model: Any          # the GraphModel being planned
    streaming: bool     # planning a stream (chunks) rather than whole sequences
    finishing: bool     # planning a stream's finish() (the trailing frames)
    tail: bool          # the plan holds frames back until finish()
    aux_in: dict[str, int]   # context carried along time into this call (rnnengine/ops/streaming.py)
    aux_out: dict[str, int]  # ... and out of it
    recurrent: list[dict[str, Any]]  # the recurrent layers planned so far (B, T per layer)

    def const(self, arr: Any) -> Any:
        """A constant Value."""

    def new(self, shape: Any, dtype: Any) -> Any:
        """A fresh run-time buffer of this shape and dtype (refused past the plan's limits)."""

    def alias(self, x: Any, shape: Any) -> Any:
        """The same buffer as x viewed with another shape (no copy)."""

    def materialize(self, x: Any) -> Any:
        """x as a run-time buffer (a constant becomes one)."""

    def tid(self, v: Any) -> int:
        """The buffer id of a Value in the program's tensor table."""

    def derived(self, source: Any, tag: str, fn: Any) -> Any:
        """fn() computed once per model for this source array and tag (e.g. packed weights)."""

    def need_work(self, floats: int) -> None:
        """Reserves scratch memory of this many floats for an instruction."""

    def stack(self, handler: Any, consts: Any) -> Any:
        """The C stack of a recurrent node (shared between nodes with the same weights)."""

    def stack_index(self, stack: Any) -> int:
        """The index of a stack in the program's stack list."""

    def stream_state(self, key: str, start: Any, parts: Any) -> Any:
        """A run-time Value holding a state a stream carries between calls, starting from
        ``start`` (a flat float32 vector); ``parts``: the shapes it is made of, in order, as
        the stream's get_state() shows it ((h, c) of an LSTM, one array otherwise)."""

    def emit(self, op: int, ins: Any, outs: Any, ip: Any, fp: Any = (), aux: int = -1) -> None:
        """Appends one instruction of the C executor (op code, input/output buffer ids,
        integer and float parameters); the C verifier checks it when the program is made."""

    def walk(self, nodes: Any, env: dict[str, Any]) -> None:
        """Plans a list of nodes (a subgraph) in an environment name -> Value."""

    def loop(self, node: dict[str, Any], env: dict[str, Any]) -> list[Any]:
        """Plans a Loop node (unrolled)."""

    def sequence_op(self, node: dict[str, Any], env: dict[str, Any]) -> list[Any]:
        """Plans a sequence op."""


def register(*op_types: str, attrs: tuple[str, ...] | list[str] = ()) -> Any:
    """Class decorator: the handler of these op types, taking these attributes."""
    def deco(cls: Any) -> Any:
        for op in op_types:
            OPS[op] = cls
        cls.ATTRS = set(attrs)
        return cls
    return deco


INT_TYPES = (np.dtype(np.int64), np.dtype(np.int32))


def rows_view_errors(nodes: list[dict[str, Any]], consts: Any) -> list[str]:
    """Where the ROWS_VIEW marks of a graph (a weight file's, or the converter's) are not
    the pattern the converter writes: 1 on a Reshape whose output only one MatMul reads, by a
    constant 2-D matrix, whose output only one Reshape marked 2 reads (as its data); 2 only
    there. A mark anywhere else would pass a Reshape's input on unchanged: refused."""
    errors = []
    readers: dict[str, list[tuple[dict[str, Any], int]]] = {}
    for n in nodes:
        for k, x in enumerate(n.get("inputs", [])):
            if x:
                readers.setdefault(x, []).append((n, k))
    for n in nodes:
        mark = n.get("attrs", {}).get(ROWS_VIEW)
        if mark is None:
            continue
        label = f"{n.get('op')} node {n.get('name') or (n.get('outputs') or ['?'])[0]!r}"
        if isinstance(mark, bool) or mark not in (1, 2) or n.get("op") != "Reshape":
            errors.append(f"{label}: {ROWS_VIEW} {mark!r} (only 1 or 2, on a Reshape)")
            continue
        if mark != 1:
            continue
        out = (n.get("outputs") or [""])[0]
        r = readers.get(out, [])
        m = r[0][0] if len(r) == 1 and r[0][1] == 0 else None
        w = m["inputs"][1] if m is not None and m.get("op") == "MatMul" and len(m.get("inputs", [])) == 2 else None
        after = readers.get((m.get("outputs") or [""])[0], []) if w is not None else []
        if w is None or w not in consts or np.ndim(consts[w]) != 2 or len(after) != 1 or after[0][1] != 0 \
                or after[0][0].get("op") != "Reshape" or after[0][0].get("attrs", {}).get(ROWS_VIEW) != 2:
            errors.append(f"{label}: {ROWS_VIEW} 1 is not followed by the one MatMul (by a constant matrix) "
                          f"and the Reshape marked 2 it is written for")
    marked2 = [n for n in nodes if n.get("attrs", {}).get(ROWS_VIEW) == 2 and not isinstance(n["attrs"][ROWS_VIEW], bool)]
    fed = set()
    for n in nodes:
        if n.get("attrs", {}).get(ROWS_VIEW) == 1:
            m = readers.get((n.get("outputs") or [""])[0], [(None, 0)])[0][0]
            if m is not None:
                fed.update(id(r[0]) for r in readers.get((m.get("outputs") or [""])[0], []))
    for n in marked2:
        if id(n) not in fed:
            errors.append(f"Reshape node {n.get('name') or (n.get('outputs') or ['?'])[0]!r}: {ROWS_VIEW} 2 without "
                          "the Reshape marked 1 and the MatMul it is written for")
    return errors


class Handler:
    ATTRS = set()
    PRIVATE_ATTRS = frozenset()  # rnnengine's own attributes: only its converter writes them (weight files)

    def __init__(self, node: dict[str, Any], opset: int) -> None:
        self.node = node
        self.opset = opset
        self.attrs = node.get("attrs", {})

    def fail(self, msg):
        raise UnsupportedError(f"{where(self.node)}: {msg}")

    def allowed_attrs(self):
        return self.ATTRS

    def check_attrs(self, stored=False):
        """Refuses any attribute this handler does not implement, and any the ONNX schema of
        the op at the graph's opset does not define (an opset-13 Unsqueeze with an ``axes``
        attribute: onnxruntime refuses the model, and the handler would read an attribute no
        schema checked the type of). Run at conversion and, with ``stored=True`` (rnnengine's
        own attributes then allowed), on every node of a weight file when it is loaded."""
        private = set(self.PRIVATE_ATTRS) if stored else set()
        allowed = set(self.allowed_attrs()) | private
        extra = sorted(set(self.attrs) - allowed)
        if extra:
            self.fail(f"attribute(s) {extra} not supported (known: {sorted(allowed)})")
        sch = opset_schema(self.node["op"], self.opset)
        undefined = sorted(set(self.attrs) - set(sch.attributes) - private) if sch is not None else []
        if undefined:
            self.fail(f"attribute(s) {undefined} are not defined for {self.node['op']} at opset {self.opset} "
                      f"(its ONNX schema has {sorted(sch.attributes)})")

    def attr(self, name, default=None):
        return self.attrs.get(name, default)

    def flag(self, name, default):
        """A 0/1 attribute (keepdims, transA, ...) as a bool; any other value is refused: peers
        read it differently (onnxruntime takes keepdims=4 as false, a truthiness test as true)."""
        v = self.attrs.get(name, default)
        if not isinstance(v, (bool, int, np.integer)) or int(v) not in (0, 1):
            self.fail(f"attribute {name} must be 0 or 1, got {v!r}")
        return bool(v)

    def validate(self, xs):
        """Checks at conversion what the constant inputs allow (xs: arrays or None)."""

    def eval(self, xs):
        """Outputs as NumPy arrays from NumPy inputs (None for absent optional inputs)."""
        self.fail("cannot be evaluated at conversion time")

    def emit(self, p, xs):
        """Plans instructions; xs are Values (runtime or constant); returns output Values."""
        self.fail(f"{self.node['op']} with inputs only known at run time is not supported "
                  "(it is supported when its inputs are constants or shapes)")


def check_size(h, shape, what="result"):
    """Refuses a result with a negative dimension, or more elements than the limit
    max_tensor_elements in force (rnnengine/limits.py), before it is allocated."""
    n = 1
    for d in shape:
        if d < 0:
            h.fail(f"{what} has a negative dimension: {tuple(shape)}")
        n *= int(d)
    most = resolve().max_tensor_elements
    if n > most:
        refuse(h.node, f"the {what} of shape {tuple(int(d) for d in shape)} would hold {n} elements",
               "max_tensor_elements", most)
    return n


def optional_const(h, xs, k, what):
    """Input k as a NumPy array (None when absent); it must be known when planning."""
    if len(xs) <= k or xs[k] is None:
        return None
    v = xs[k].const if hasattr(xs[k], "const") else xs[k]
    if v is None:
        h.fail(f"{what} must be constants")
    return np.asarray(v)


def const_input(h, x, what):
    if x is None or x.const is None:
        h.fail(f"input {what} must be a constant (known at conversion or from the input shapes)")
    return x.const


def contiguous_strides(shape):
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return list(reversed(strides))


def broadcast_strides(shape, out_shape):
    """Element strides reading an array of `shape` as if broadcast to out_shape (NumPy rules:
    shapes aligned on the right; a missing or size-1 dimension repeats, stride 0)."""
    strides = contiguous_strides(shape)
    pad = len(out_shape) - len(shape)
    res = []
    for i in range(len(out_shape)):
        j = i - pad
        res.append(0 if j < 0 or shape[j] == 1 else strides[j])
    return res


def emit_copy(p: Any, src: Any, dst: Any, shape: Iterable[int], src_strides: Iterable[int], dst_strides: Iterable[int],
              src_off: int = 0, dst_off: int = 0) -> None:
    shape = list(shape)
    if len(shape) > 8:
        raise UnsupportedError(f"tensors of rank {len(shape)} > 8 are not supported")
    es = src.dtype.itemsize
    shape, (src_strides, dst_strides) = merge_axes(shape, list(src_strides), list(dst_strides))
    p.emit(OP_COPY, [src], [dst], [es, len(shape), src_off, dst_off] + shape + src_strides + dst_strides)


def merge_axes(shape: list[int], *strides: list[int]) -> tuple[list[int], list[list[int]]]:
    """The same element walk over fewer axes: axes of size 1 dropped, and an axis merged
    into the next where every operand steps over it as one run (the C loops of COPY and
    BINARY take the innermost axis as a run: a Slice or Concat along an outer axis becomes
    one memmove per block, an elementwise op on (1, 129, 4) one loop of 516)."""
    if 0 in shape:
        return list(shape), [list(s) for s in strides]
    axes = [(n,) + tuple(s[d] for s in strides) for d, n in enumerate(shape) if n != 1]
    merged: list[tuple[int, ...]] = []
    for ax in axes:
        n = ax[0]
        if merged and all(merged[-1][1 + k] == n * ax[1 + k] for k in range(len(strides))):
            merged[-1] = (merged[-1][0] * n,) + ax[1:]
        else:
            merged.append(ax)
    return [ax[0] for ax in merged], [[ax[1 + k] for ax in merged] for k in range(len(strides))]


def axis_of(h, axis, ndim):
    a = int(axis)
    if ndim == 0:  # (every op taking an axis reads shape[axis]: an IndexError on a scalar before)
        h.fail(f"takes an axis ({a}) of its input, which is a scalar (rank 0)")
    if not -ndim <= a < ndim:
        h.fail(f"axis {a} is out of range for rank {ndim}")
    return a % ndim


def broadcast_shape(h, *shapes):
    try:
        out = tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        h.fail(f"shapes {' and '.join(str(tuple(s)) for s in shapes)} do not broadcast")
    if len(out) > 8:
        h.fail("rank > 8")
    return out


def emit_tbinary(p, kind, a, b, out_shape, out_dtype):
    """One typed binary instruction (src_c/graph.c TBINARY) on a and b of one dtype."""
    out = p.new(out_shape, out_dtype)
    p.emit(OP_TBINARY, [a, b], [out], [TENSOR_DTYPES[a.dtype], kind, len(out_shape)] + list(out_shape)
           + broadcast_strides(a.shape, out_shape) + broadcast_strides(b.shape, out_shape))
    return out


def int_divmod(h, a, b, kind):
    """Integer a / b truncated toward 0 (kind "div", ONNX integer Div), a mod b with the
    divisor's sign ("mod", Mod fmod=0) or with the dividend's sign ("fmod"), exactly, as the
    executor computes them; division by zero and min / -1 are refused."""
    a, b = np.asarray(a), np.asarray(b)
    if np.any(b == 0):
        h.fail("an integer division or modulo by zero")
    if a.dtype.kind == "i" and kind == "div" and np.any((a == np.iinfo(a.dtype).min) & (b == -1)):
        h.fail("an integer division overflows (the minimum / -1)")
    with np.errstate(all="ignore"):
        if kind == "mod":
            return np.mod(a, np.where(b == -1, 1, b)).astype(a.dtype)
        r = np.where(b == -1, 0, np.fmod(a, np.where(b == -1, 1, b))).astype(a.dtype)
        if kind == "fmod":
            return r
        q = np.floor_divide(a, np.where(b == -1, 1, b))
        q = np.where(b == -1, np.negative(a), q)
        return (q + ((r != 0) & ((a < 0) != (b < 0)))).astype(a.dtype)


# --- constants and shapes ------------------------------------------------------------------

@register("Constant", attrs=("value", "value_float", "value_floats", "value_int", "value_ints"))
class Constant(Handler):
    def eval(self, xs):
        a = self.attrs
        if "value" in a:
            return [np.asarray(a["value"])]
        if "value_float" in a:
            return [np.array(a["value_float"], np.float32)]
        if "value_floats" in a:
            return [np.array(a["value_floats"], np.float32)]
        if "value_int" in a:
            return [np.array(a["value_int"], np.int64)]
        if "value_ints" in a:
            return [np.array(a["value_ints"], np.int64)]
        self.fail("needs one of value, value_float(s), value_int(s)")


@register("Shape", attrs=("start", "end"))
class Shape(Handler):
    def _shape(self, shape):
        s = np.array(shape, np.int64)
        n = len(s)
        start = self.attr("start", 0)
        end = self.attr("end", n)
        return [s[slice(start, end)]]

    def eval(self, xs):
        return self._shape(xs[0].shape)

    def emit(self, p, xs):
        return [p.const(self._shape(xs[0].shape)[0])]


@register("Size")
class Size(Handler):
    def eval(self, xs):
        return [np.array(xs[0].size, np.int64)]

    def emit(self, p, xs):
        return [p.const(np.array(int(np.prod(xs[0].shape)), np.int64))]


@register("ConstantOfShape", attrs=("value",))
class ConstantOfShape(Handler):
    def eval(self, xs):
        v = self.attr("value")
        v = np.zeros(1, np.float32) if v is None else np.asarray(v).reshape(-1)
        shape = tuple(int_vector(self, xs[0], "shape"))
        check_size(self, shape)
        return [np.full(shape, v[0], dtype=v.dtype)]


@register("Range")
class Range(Handler):
    """As onnxruntime: n = ceil((limit - start) / delta) with the difference taken in the
    input type, and values start, start + delta, ... accumulated in that type."""

    def eval(self, xs):
        dt = np.asarray(xs[0]).dtype
        start, limit, delta = (np.asarray(x, dt).reshape(()) for x in xs)
        if delta == 0:
            self.fail("delta is 0")
        with np.errstate(all="ignore"):
            diff = np.subtract(limit, start, dtype=dt)
        n = max(0, math.ceil(float(diff) / float(delta)))
        check_size(self, (n,))
        if dt.kind == "f":
            steps = np.full(n, delta, dt)
            if n:
                steps[0] = start
            return [np.cumsum(steps, dtype=dt)]
        with np.errstate(all="ignore"):
            return [(start + np.arange(n, dtype=dt) * delta).astype(dt)]

    def emit(self, p, xs):
        self.fail("start, limit and delta must be known when planning (constants or shapes): the "
                  "output's length would depend on run-time values")


# --- elementwise -------------------------------------------------------------------------

BINARY = {"Add": (BIN_ADD, np.add), "Sub": (BIN_SUB, np.subtract), "Mul": (BIN_MUL, np.multiply),
          "Div": (BIN_DIV, None), "Pow": (BIN_POW, np.power), "Max": (BIN_MAX, np.maximum),
          "Min": (BIN_MIN, np.minimum)}


def _pow_eval(h, a, b):
    """Pow as onnxruntime computes it: powf for float32 (NumPy takes a one-element exponent of
    0.5 for sqrt, which gives NaN for -inf and -0 for -0 where powf gives +inf and +0: the
    exponent is given as an array of the result's size); integers as the double pow
    converted back (exact below 2**53, refused beyond or outside the type, where the
    conversion is undefined in C and NumPy's exact wrapping power differs)."""
    shape = np.broadcast_shapes(a.shape, b.shape)
    n = math.prod(shape)
    if a.dtype.kind in "iu":
        with np.errstate(all="ignore"):
            f = np.power(np.broadcast_to(a, shape).astype(np.float64), np.broadcast_to(b, shape).astype(np.float64))
        info = np.iinfo(a.dtype)
        if n and not (np.all(np.isfinite(f)) and np.all(np.abs(f) < 2.0 ** 53) and f.min() >= info.min
                      and f.max() <= info.max):
            h.fail(f"integer Pow results beyond +-2**53 or outside {a.dtype} (onnxruntime converts a double "
                   "pow back, undefined there)")
        return np.trunc(f).astype(a.dtype)
    aa = np.broadcast_to(a, shape).reshape(-1)
    bb = np.broadcast_to(b, shape).astype(a.dtype).reshape(-1)
    if n == 1:  # (a size-1 exponent takes NumPy's scalar fast paths)
        aa, bb = np.concatenate([aa, aa]), np.concatenate([bb, bb])
    with np.errstate(all="ignore"):
        return np.power(aa, bb.copy())[:n].reshape(shape).astype(a.dtype)


@register(*BINARY)
class Binary(Handler):
    def eval(self, xs):
        op = self.node["op"]
        if op in ("Max", "Min") and len(xs) != 2:
            out = xs[0]
            for x in xs[1:]:
                out = BINARY[op][1](out, x)
            return [out]
        a, b = xs
        if op == "Div":
            if a.dtype.kind in "iu":
                return [int_divmod(self, a, b, "div")]
            return [(a / b).astype(a.dtype)]
        if op == "Pow":
            return [_pow_eval(self, a, b)]
        return [BINARY[op][1](a, b).astype(np.result_type(a, b) if a.dtype == b.dtype else a.dtype)]

    def emit(self, p, xs):
        op = self.node["op"]
        if len(xs) < 2 or (len(xs) > 2 and op not in ("Max", "Min")):
            self.fail(f"takes 2 inputs here, got {len(xs)}")
        out = xs[0]
        for b in xs[1:]:  # variadic Max / Min: pairwise, left to right, as eval
            out = self.emit2(p, out, b)
        return [out]

    def emit2(self, p, a, b):
        op = self.node["op"]
        if op == "Pow" and a.dtype == np.float32 and b.dtype in INT_TYPES and b.const is not None:
            bf = np.asarray(b.const).astype(np.float32)  # an integer exponent, exact in float32
            if np.array_equal(bf.astype(b.dtype), b.const):
                b = p.const(bf)
        if a.dtype != b.dtype:
            self.fail(f"inputs of types {a.dtype} and {b.dtype} (ONNX {op} takes one type)")
        out_shape = broadcast_shape(self, a.shape, b.shape)
        if op == "Pow" and a.dtype == np.float32 and b.const is not None and tuple(out_shape) == tuple(a.shape) \
                and np.size(b.const) > 0 and np.all(np.asarray(b.const) == 2):
            # x ** 2 as x * x: the correctly rounded square, what onnxruntime computes for an
            # exponent of 2 (powf's general path costs ~10x more; silero-vad's STFT magnitude)
            out = p.new(out_shape, np.float32)
            shape, (st, _) = merge_axes(list(out_shape), broadcast_strides(a.shape, out_shape), contiguous_strides(out_shape))
            p.emit(OP_BINARY, [a, a], [out], [BIN_MUL, len(shape)] + shape + st + st)
            return out
        if a.dtype != np.float32:
            if a.dtype not in INT_TYPES or op == "Pow":
                self.fail(f"{op} on {a.dtype} tensors at run time is not supported (float32, int64, int32"
                          f"{'; Pow: float32' if op == 'Pow' else ''})")
            return emit_tbinary(p, TBINARY_KIND[op], a, b, out_shape, a.dtype)
        out = p.new(out_shape, np.float32)
        # the output is contiguous: its strides merge exactly where a's and b's do
        shape, (sa, sb, _) = merge_axes(list(out_shape), broadcast_strides(a.shape, out_shape),
                                         broadcast_strides(b.shape, out_shape), contiguous_strides(out_shape))
        p.emit(OP_BINARY, [a, b], [out], [BINARY[self.node["op"]][0], len(shape)] + shape + sa + sb)
        return out


TBINARY_KIND = {"Add": BIN_ADD, "Sub": BIN_SUB, "Mul": BIN_MUL, "Div": BIN_DIV, "Max": BIN_MAX, "Min": BIN_MIN}


@register("Mod", attrs=("fmod",))
class Mod(Handler):
    """fmod=0 (integers only): the result has the divisor's sign, as Python's %; fmod=1: the
    dividend's sign, as C's fmod (float32 and integers)."""

    def kind(self, dtype):
        fm = int(self.attr("fmod", 0))
        if dtype.kind == "f" and not fm:
            self.fail("Mod on floats needs fmod=1 (ONNX)")
        return "fmod" if fm else "mod"

    def eval(self, xs):
        a, b = xs
        k = self.kind(a.dtype)
        if a.dtype.kind == "f":
            return [np.fmod(a, b).astype(a.dtype)]
        return [int_divmod(self, a, b, k)]

    def emit(self, p, xs):
        a, b = xs
        k = self.kind(a.dtype)
        if a.dtype != b.dtype or (a.dtype not in INT_TYPES and a.dtype != np.float32):
            self.fail(f"Mod on {a.dtype}/{b.dtype} at run time is not supported (float32, int64, int32; one type)")
        return [emit_tbinary(p, BIN_MOD if k == "mod" else BIN_FMOD, a, b, broadcast_shape(self, a.shape, b.shape),
                             a.dtype)]


def _sigmoid(x):
    return (1 / (1 + np.exp(-x.astype(np.float64)))).astype(x.dtype)


# op -> (C kind, NumPy function of (x, alpha, beta), default alpha, default beta)
UNARY = {
    "Relu": (ACT_RELU, lambda x, a, b: np.maximum(x, 0).astype(x.dtype), 0, 0),
    "Tanh": (ACT_TANH, lambda x, a, b: np.tanh(x), 0, 0),
    "Sigmoid": (ACT_SIGMOID, lambda x, a, b: _sigmoid(x), 0, 0),
    "LeakyRelu": (ACT_LEAKY_RELU, lambda x, a, b: np.where(x >= 0, x, a * x).astype(x.dtype), 0.01, 0),
    "ThresholdedRelu": (ACT_THRESHOLDED_RELU, lambda x, a, b: np.where(x > a, x, 0).astype(x.dtype), 1.0, 0),
    "HardSigmoid": (ACT_HARD_SIGMOID, lambda x, a, b: np.clip(a * x + b, 0, 1).astype(x.dtype), 0.2, 0.5),
    "Elu": (ACT_ELU, lambda x, a, b: np.where(x >= 0, x, a * (np.exp(x) - 1)).astype(x.dtype), 1.0, 0),
    "Softsign": (ACT_SOFTSIGN, lambda x, a, b: (x / (1 + np.abs(x))).astype(x.dtype), 0, 0),
    "Softplus": (ACT_SOFTPLUS, lambda x, a, b: np.logaddexp(0, x).astype(x.dtype), 0, 0),
    "Sqrt": (UNARY_SQRT, lambda x, a, b: np.sqrt(x), 0, 0),
    "Exp": (UNARY_EXP, lambda x, a, b: np.exp(x), 0, 0),
    "Log": (UNARY_LOG, lambda x, a, b: np.log(x), 0, 0),
    "Neg": (UNARY_NEG, lambda x, a, b: -x, 0, 0),
    "Abs": (UNARY_ABS, lambda x, a, b: np.abs(x), 0, 0),
    "Reciprocal": (UNARY_RECIPROCAL, lambda x, a, b: (1 / x).astype(x.dtype), 0, 0),
    "Floor": (UNARY_FLOOR, lambda x, a, b: np.floor(x), 0, 0),
    "Ceil": (UNARY_CEIL, lambda x, a, b: np.ceil(x), 0, 0),
    # (NumPy has no erf: math.erf per element, in float64, rounded once; C: erff)
    "Erf": (UNARY_ERF, lambda x, a, b: np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype), 0, 0),
}


@register(*UNARY, attrs=("alpha", "beta"))
class Unary(Handler):
    def allowed_attrs(self):
        return {"LeakyRelu": {"alpha"}, "ThresholdedRelu": {"alpha"}, "Elu": {"alpha"},
                "HardSigmoid": {"alpha", "beta"}}.get(self.node["op"], set())

    def params(self):
        kind, fn, da, db = UNARY[self.node["op"]]
        self.check_attrs()
        return kind, fn, float(self.attr("alpha", da)), float(self.attr("beta", db))

    def eval(self, xs):
        kind, fn, a, b = self.params()
        return [fn(xs[0], a, b)]

    def emit(self, p, xs):
        kind, fn, a, b = self.params()
        x = xs[0]
        op = self.node["op"]
        if x.dtype in INT_TYPES and op in ("Neg", "Abs"):
            out = p.new(x.shape, x.dtype)  # wraps: -min and |min| are min, as onnxruntime
            p.emit(OP_TUNARY, [x], [out], [TENSOR_DTYPES[x.dtype], TUNARY_NEG if op == "Neg" else TUNARY_ABS,
                                          int(np.prod(x.shape))])
            return [out]
        if x.dtype != np.float32:
            self.fail(f"needs a float32 input at run time{' (or int64 / int32)' if op in ('Neg', 'Abs') else ''}, "
                      f"got {x.dtype}")
        out = p.new(x.shape, np.float32)
        p.emit(OP_UNARY, [x], [out], [kind, int(np.prod(x.shape))], [a, b])
        return [out]


def emit_binary(h, p, op, a, b):
    """a (op) b, float32 elementwise (Add, Mul, ...), planned as a node of h's: one
    instruction, rounded once. For handlers whose ONNX function is such a chain."""
    return Binary({**h.node, "op": op}, 14).emit2(p, a, b)


def emit_chain(h, p, x, steps):
    """Elementwise float32 steps on x, each one instruction rounded once: ("mul" | "add",
    a number) or (a unary op's name,). For ops the ONNX function defines as such a chain."""
    for step in steps:
        if step[0] in ("mul", "add"):
            x = emit_binary(h, p, "Mul" if step[0] == "mul" else "Add", x, p.const(np.asarray(step[1], np.float32)))
        else:
            x = Unary({**h.node, "op": step[0], "attrs": {}}, 13).emit(p, [x])[0]
    return x


@register("Gelu", attrs=("approximate",))
class Gelu(Handler):
    """Gelu-20: x/2 (1 + erf(x / sqrt 2)), or with approximate="tanh"
    x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); computed in float32 step by step as the
    ONNX function writes it. (Exporters below opset 20 write the same chain as separate
    nodes: Div / Erf / Add / Mul.)"""

    def mode(self):
        m = self.attr("approximate", "none")
        m = m.decode() if isinstance(m, bytes) else m
        if m not in ("none", "tanh"):
            self.fail(f"approximate={m!r} is not defined (none or tanh)")
        return m

    def eval(self, xs):
        x = xs[0]
        if x.dtype != np.float32:
            self.fail(f"X is {x.dtype}; only float32 is supported")
        xd = x.astype(np.float64)
        if self.mode() == "none":
            y = 0.5 * xd * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(xd / math.sqrt(2.0)))
        else:
            with np.errstate(over="ignore", invalid="ignore"):  # (x^3 of 1e38: tanh(inf) = 1)
                y = 0.5 * xd * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (xd + 0.044715 * xd ** 3)))
        return [y.astype(np.float32)]

    def emit(self, p, xs):
        x = xs[0]
        if x.dtype != np.float32:
            self.fail(f"needs a float32 input at run time, got {x.dtype}")
        if self.mode() == "none":
            inner = emit_chain(self, p, x, [("mul", np.float32(1 / math.sqrt(2.0))), ("Erf",)])
        else:
            cube = emit_binary(self, p, "Mul", emit_binary(self, p, "Mul", x, x), x)
            poly = emit_binary(self, p, "Add", x, emit_chain(self, p, cube, [("mul", 0.044715)]))
            inner = emit_chain(self, p, poly, [("mul", np.float32(math.sqrt(2.0 / math.pi))), ("Tanh",)])
        one_plus = emit_chain(self, p, inner, [("add", 1.0)])
        # (0.5 x) (1 + ...), in onnxruntime's order: x (1 + ...) first overflows above 1.7e38
        return [emit_binary(self, p, "Mul", emit_chain(self, p, x, [("mul", 0.5)]), one_plus)]


@register("HardSwish")
class HardSwish(Handler):
    """x * max(0, min(1, x / 6 + 1/2)): HardSigmoid(1/6, 1/2), then the product by x."""

    def sig(self):
        return Unary({**self.node, "op": "HardSigmoid", "attrs": {"alpha": 1 / 6, "beta": 0.5}}, 6)

    def eval(self, xs):
        if xs[0].dtype != np.float32:
            self.fail(f"needs a float32 input, got {xs[0].dtype}")
        return [(xs[0] * self.sig().eval(xs[:1])[0]).astype(np.float32)]

    def emit(self, p, xs):
        return [emit_binary(self, p, "Mul", xs[0], self.sig().emit(p, xs[:1])[0])]


@register("Mish")
class Mish(Handler):
    """x * tanh(softplus(x)), each step rounded to float32."""

    def eval(self, xs):
        x = xs[0]
        if x.dtype != np.float32:
            self.fail(f"needs a float32 input, got {x.dtype}")
        return [(x * np.tanh(np.logaddexp(np.float32(0), x))).astype(np.float32)]

    def emit(self, p, xs):
        t = emit_chain(self, p, xs[0], [("Softplus",), ("Tanh",)])
        return [emit_binary(self, p, "Mul", xs[0], t)]


@register("Selu", attrs=("alpha", "gamma"))
class Selu(Handler):
    """gamma * (x if x > 0 else alpha (exp(x) - 1)): Elu(alpha) then the product by gamma
    (defaults: alpha 1.67326319..., gamma 1.05070102..., the float32 values of the spec's)."""

    def params(self):
        a, g = self.attr("alpha", 1.67326319217681884765625), self.attr("gamma", 1.05070102214813232421875)
        for name, v in (("alpha", a), ("gamma", g)):
            if isinstance(v, bool) or not isinstance(v, (float, int, np.floating, np.integer)):
                self.fail(f"{name} must be a float, got {v!r}")
        a32, g32 = np.float32(a), np.float32(g)
        with np.errstate(over="ignore", invalid="ignore"):
            finite = np.isfinite(a32) and np.isfinite(g32) and np.isfinite(a32 * g32)
        if not finite:  # (onnxruntime multiplies gamma * alpha first: NaN at x = 0 where Elu gives 0)
            self.fail(f"alpha {a!r} and gamma {g!r} must be finite, with a finite float32 product")
        return float(a32), float(g32)

    def elu(self, a):
        return Unary({**self.node, "op": "Elu", "attrs": {"alpha": a}}, 6)

    def eval(self, xs):
        a, g = self.params()
        return [(self.elu(a).eval(xs[:1])[0] * np.float32(g)).astype(xs[0].dtype)]

    def emit(self, p, xs):
        a, g = self.params()
        return [emit_chain(self, p, self.elu(a).emit(p, xs[:1])[0], [("mul", g)])]


@register("PRelu")
class PRelu(Handler):
    """x where x >= 0, slope * x elsewhere; slope broadcasts to X (unidirectionally: the
    output has X's shape). NaN stays NaN."""

    def check(self, x, slope):
        if x.dtype != np.float32 or slope.dtype != np.float32:
            self.fail(f"takes float32 X and slope, got {x.dtype} and {slope.dtype}")
        if broadcast_shape(self, x.shape, slope.shape) != tuple(x.shape):
            self.fail(f"slope of shape {tuple(slope.shape)} does not broadcast to X's shape {tuple(x.shape)}")

    def eval(self, xs):
        x, slope = xs
        self.check(x, slope)
        return [np.where(x < 0, x * slope, x).astype(np.float32)]

    def emit(self, p, xs):
        x, slope = xs
        self.check(x, slope)
        neg = Compare({**self.node, "op": "Less"}, 13).emit(p, [x, p.const(np.zeros((), np.float32))])[0]
        scaled = emit_binary(self, p, "Mul", x, slope)
        return Where({**self.node, "op": "Where"}, 16).emit(p, [neg, scaled, x])


@register("BatchNormalization", attrs=("epsilon", "momentum", "spatial", "training_mode"))
class BatchNormalization(Handler):
    """Inference-mode BatchNormalization over channel axis 1 of (N, C, ...):
    Y = (X - mean) / sqrt(var + epsilon) * scale + B with the stored statistics, computed as
    onnxruntime computes it, every step in float32: per channel inv = 1 / sqrt(var + epsilon),
    a = inv * scale, b = B - mean * a, then Y = X * a + b (a, b rounded as onnxruntime rounds
    them: with a large mean, b = B - mean * a cancels, and a float64 b differs from its by
    more than the tolerance).
    Refused: training_mode=1 (batch statistics, running-mean outputs), spatial=0 (opset 7's
    per-element statistics), run-time statistics, other types than float32."""

    def affine(self, xs):
        x = xs[0]
        if self.flag("training_mode", 0):
            self.fail("training_mode=1 (statistics of the batch itself) is not supported: export the model in "
                      "eval mode")
        if not self.flag("spatial", 1):
            self.fail("spatial=0 (statistics per element, opset 7) is not supported")
        if len(self.node["outputs"]) > 1 and any(self.node["outputs"][1:]):
            self.fail("running mean / variance outputs exist only in training mode")
        if len(x.shape) < 2:
            self.fail(f"X must have a channel axis 1, got shape {tuple(x.shape)}")
        C = x.shape[1]
        params = []
        for k, what in ((1, "scale"), (2, "B"), (3, "mean"), (4, "var")):
            v = optional_const(self, xs, k, what)
            if v is None:
                self.fail(f"input {what} is required")
            if v.dtype != np.float32 or v.shape != (C,):
                self.fail(f"{what} must be float32 of shape ({C},), got {v.dtype} of shape {tuple(v.shape)}")
            params.append(v)
        if x.dtype != np.float32:
            self.fail(f"X must be float32, got {x.dtype}")
        scale, bias, mean, var = params
        one, eps = np.float32(1), np.float32(self.attr("epsilon", 1e-5))
        with np.errstate(all="ignore"):
            inv = one / np.sqrt(var + eps)
            a = inv * scale
            b = bias - mean * a
        tail = (1,) * (len(x.shape) - 2)
        return a.reshape((C,) + tail), b.reshape((C,) + tail)

    def eval(self, xs):
        a, b = self.affine(xs)
        return [((xs[0] * a).astype(np.float32) + b).astype(np.float32)]

    def emit(self, p, xs):
        a, b = self.affine(xs)
        y = emit_binary(self, p, "Mul", xs[0], p.const(a))
        return [emit_binary(self, p, "Add", y, p.const(b))]


@register("Clip", attrs=("min", "max"))
class Clip(Handler):
    def bounds(self, xs):
        # an absent bound is the type's largest value (Clip-6's attribute defaults, Clip-11's
        # inputs), so +-inf clip to +-FLT_MAX as in onnxruntime
        big = float(np.finfo(np.float32).max)
        if self.opset < 11:
            lo, hi = self.attr("min", -big), self.attr("max", big)
        else:
            lo = -big if len(xs) < 2 or xs[1] is None else const_input(self, xs[1], "min").item() \
                if hasattr(xs[1], "const") else np.asarray(xs[1]).item()
            hi = big if len(xs) < 3 or xs[2] is None else const_input(self, xs[2], "max").item() \
                if hasattr(xs[2], "const") else np.asarray(xs[2]).item()
        return float(lo), float(hi)

    def eval(self, xs):
        x = xs[0]
        if x.dtype.kind in "iu" and self.opset >= 11:  # integer bounds, exactly: min(max(x, lo), hi)
            out = x
            for k, fn in ((1, np.maximum), (2, np.minimum)):
                if len(xs) > k and xs[k] is not None:
                    out = fn(out, np.asarray(xs[k]).astype(x.dtype))
            return [np.asarray(out).astype(x.dtype)]
        lo, hi = self.bounds(xs)
        if x.dtype.kind in "iu":  # opset < 11: float bounds clipped to the integer range
            info = np.iinfo(x.dtype)
            return [np.clip(x, x.dtype.type(max(lo, info.min)), x.dtype.type(min(hi, info.max)))]
        # the C kernel's rule (RNN_UNARY_CLIP): min(max(x, lo), hi) by comparisons, so a NaN bound
        # clips nothing (np.clip would make every element NaN) and hi wins when lo > hi
        with np.errstate(invalid="ignore"):
            t = np.where(x < lo, lo, x)
            return [np.where(t > hi, hi, t).astype(x.dtype)]

    def emit(self, p, xs):
        x = xs[0]
        if x.dtype in INT_TYPES and self.opset >= 11:  # integer Clip (opset 12): Max, then Min
            out = x
            for k, kind in ((1, BIN_MAX), (2, BIN_MIN)):
                if len(xs) > k and xs[k] is not None:
                    v = xs[k]
                    if v.dtype != x.dtype:
                        self.fail(f"bound of type {v.dtype} for an input of type {x.dtype}")
                    out = emit_tbinary(p, kind, out, v, broadcast_shape(self, out.shape, v.shape), x.dtype)
            return [out if out is not x else p.alias(x, x.shape)]
        lo, hi = self.bounds(xs)
        if x.dtype != np.float32:
            self.fail(f"needs a float32, int64 or int32 input at run time, got {x.dtype}")
        out = p.new(x.shape, np.float32)
        p.emit(OP_UNARY, [x], [out], [UNARY_CLIP, int(np.prod(x.shape))], [lo, hi])
        return [out]


COMPARE = {"Equal": np.equal, "Less": np.less, "Greater": np.greater, "LessOrEqual": np.less_equal,
           "GreaterOrEqual": np.greater_equal, "And": np.logical_and, "Or": np.logical_or,
           "Xor": np.logical_xor}
COMPARE_KIND = {"Equal": BIN_EQUAL, "Less": BIN_LESS, "LessOrEqual": BIN_LESS_EQUAL, "Greater": BIN_GREATER,
                "GreaterOrEqual": BIN_GREATER_EQUAL, "And": BIN_AND, "Or": BIN_OR, "Xor": BIN_XOR}


@register(*COMPARE)
class Compare(Handler):
    """Comparisons of float32 (NaN compares unequal and unordered), int64, int32 or bool
    tensors, and And/Or/Xor of bools; the result is bool."""

    def eval(self, xs):
        return [COMPARE[self.node["op"]](xs[0], xs[1])]

    def emit(self, p, xs):
        a, b = xs
        op = self.node["op"]
        logic = op in ("And", "Or", "Xor")
        if a.dtype != b.dtype:
            self.fail(f"inputs of types {a.dtype} and {b.dtype} (ONNX {op} takes one type)")
        if (logic and a.dtype != np.bool_) or a.dtype not in TENSOR_DTYPES:
            self.fail(f"{op} on {a.dtype} at run time is not supported "
                      f"({'bool' if logic else 'float32, int64, int32, bool'})")
        return [emit_tbinary(p, COMPARE_KIND[op], a, b, broadcast_shape(self, a.shape, b.shape), np.bool_)]


@register("Not")
class Not(Handler):
    def eval(self, xs):
        return [np.logical_not(xs[0])]

    def emit(self, p, xs):
        x = xs[0]
        if x.dtype != np.bool_:
            self.fail(f"needs a bool input, got {x.dtype}")
        out = p.new(x.shape, np.bool_)
        p.emit(OP_TUNARY, [x], [out], [TENSOR_DTYPES[x.dtype], TUNARY_NOT, int(np.prod(x.shape))])
        return [out]


@register("Where")
class Where(Handler):
    def eval(self, xs):
        return [np.where(xs[0], xs[1], xs[2]).astype(np.result_type(xs[1], xs[2]))]

    def emit(self, p, xs):
        c, x, y = xs
        if c.dtype != np.bool_:
            self.fail(f"the condition must be bool, got {c.dtype}")
        if x.dtype != y.dtype:
            self.fail(f"X and Y have types {x.dtype} and {y.dtype} (ONNX Where takes one type)")
        shape = broadcast_shape(self, c.shape, x.shape, y.shape)
        out = p.new(shape, x.dtype)
        p.emit(OP_WHERE, [c, x, y], [out], [x.dtype.itemsize, len(shape)] + list(shape)
               + broadcast_strides(c.shape, shape) + broadcast_strides(x.shape, shape)
               + broadcast_strides(y.shape, shape))
        return [out]


def cast_array(x, to):
    """x.astype(to) with the executor's (and onnxruntime's, on x86-64) semantics where NumPy's
    are undefined: float -> int32 / int64 / uint8 truncates toward 0, and NaN, infinities and
    values out of the target's range give its minimum (uint8: through int32, keeping the low
    byte); float -> bool is x != 0 (NaN -> True)."""
    x = np.asarray(x)
    to = np.dtype(to)
    if x.dtype.kind == "f" and to in (np.dtype(np.uint32), np.dtype(np.uint64)):
        # in range: truncated toward 0 (3e9 -> 3000000000, not through int32); out of range,
        # NaN or infinite: undefined in C (x86 gives values that differ by target): refused
        v = x.astype(np.float64)
        with np.errstate(invalid="ignore"):
            ok = (v > -1.0) & (v < float(2 ** (to.itemsize * 8)))
        if not np.all(ok):
            raise ValueError(f"Cast to {to} of {v[~ok].reshape(-1)[0]!r}: out of range of {to} (undefined)")
        return np.trunc(v).astype(to)
    if x.dtype.kind == "f" and to.kind in "iu":
        wide = np.dtype(np.int64) if to == np.int64 else np.dtype(np.int32)
        lim = float(2 ** (wide.itemsize * 8 - 1))
        v = x.astype(np.float64)
        with np.errstate(invalid="ignore"):
            ok = (v >= -lim) & (v < lim)
        r = np.where(ok, np.trunc(np.where(ok, v, 0)), 0).astype(wide)
        r = np.where(ok, r, np.iinfo(wide).min).astype(wide)
        return r.astype(to)
    with np.errstate(all="ignore"):
        return x.astype(to)


@register("Cast", attrs=("to", "saturate"))
class Cast(Handler):
    def target(self):
        to = self.attr("to")
        if to not in ONNX_DTYPE:
            self.fail(f"cast to ONNX element type {to} is not supported")
        return np.dtype(ONNX_DTYPE[to])

    def eval(self, xs):
        return [cast_array(xs[0], self.target())]

    def emit(self, p, xs):
        x, to = xs[0], self.target()
        if x.dtype not in TENSOR_DTYPES or to not in TENSOR_DTYPES:
            self.fail(f"cast from {x.dtype} to {to} at run time is not supported "
                      "(float32, int64, int32, uint8, bool only)")
        if x.dtype == to:
            return [p.alias(x, x.shape)]
        out = p.new(x.shape, to)
        p.emit(OP_CAST, [x], [out], [TENSOR_DTYPES[x.dtype], TENSOR_DTYPES[to], int(np.prod(x.shape))])
        return [out]


# --- shape-only ops (views) ---------------------------------------------------------------

@register("Identity")
class Identity(Handler):
    def eval(self, xs):
        return [xs[0]]

    def emit(self, p, xs):
        return [xs[0]]


@register("Dropout", attrs=("ratio", "seed", "is_test"))
class Dropout(Handler):
    """Inference: the identity (and the mask onnxruntime gives, when asked for). training_mode
    given as a constant true is refused."""

    def check(self, xs):
        if len(xs) > 2 and xs[2] is not None:
            tm = xs[2].const if hasattr(xs[2], "const") else xs[2]
            if tm is None or bool(np.asarray(tm).reshape(-1)[0]):
                self.fail("training_mode must be a constant false for inference")

    def validate(self, xs):
        if len(xs) > 2 and self.node["inputs"][2]:
            self.check(xs)

    def mask(self, shape, dtype):
        """The inference mask as onnxruntime gives it: all true from opset 12 (the spec's
        "all ones"), all false at opsets 10-11, zeros of the input's type at 7-9 (where the
        mask has the input's type)."""
        if self.opset >= 12:
            return np.ones(shape, bool)
        return np.zeros(shape, bool if self.opset >= 10 else dtype)

    def eval(self, xs):
        self.check(xs)
        return [xs[0], self.mask(xs[0].shape, xs[0].dtype)][: len(self.node["outputs"])]

    def emit(self, p, xs):
        self.check(xs)
        return [xs[0], p.const(self.mask(xs[0].shape, xs[0].dtype))][: len(self.node["outputs"])]


def _reshape_target(h, shape_in, shape, allowzero):
    arr = np.asarray(shape)
    if arr.ndim != 1 or not (arr.dtype.kind in "iu" or (arr.size == 0 and arr.dtype.kind == "f")):
        h.fail(f"its shape input must be a 1-D int64 tensor, got {arr.dtype} of shape {arr.shape}")
    shape = [int(s) for s in arr]
    if any(s < -1 for s in shape):
        h.fail(f"shape {shape} has a dimension below -1 (only -1, 0 and sizes are allowed)")
    out = []
    for i, s in enumerate(shape):
        if s == 0 and not allowzero:
            if i >= len(shape_in):
                h.fail(f"shape {shape} copies dimension {i} of an input of rank {len(shape_in)}")
            out.append(shape_in[i])
        else:
            out.append(s)
    # exact products (math.prod over Python ints): np.prod wraps around in int64, and a
    # hostile [2**63 - 1, -1, 8] then "fits" 4,232 elements (fuzz: output-view-dim-2e63)
    n = math.prod(int(d) for d in shape_in)
    if out.count(-1) > 1:
        h.fail(f"shape {shape} has more than one -1")
    if -1 in out:
        rest = math.prod(d for d in out if d != -1)
        if rest == 0 or n % rest:
            h.fail(f"cannot reshape {tuple(shape_in)} to {shape}")
        out[out.index(-1)] = n // rest
    if math.prod(out) != n:
        h.fail(f"cannot reshape {tuple(shape_in)} ({n} elements) to {out}")
    return tuple(out)


@register("Reshape", attrs=("allowzero",))
class Reshape(Handler):
    PRIVATE_ATTRS = frozenset({ROWS_VIEW})

    def rows_view(self, shape_in, target):
        """ROWS_VIEW 1 (the flattening Reshape): X's shape, once its target is proven to make
        rows of X's last axis in X's own order (so the MatMul reading them computes the same
        rows from X). ROWS_VIEW 2 (the Reshape after that MatMul): its target as resolved
        against X.shape[:-1] + (N,), once proven to be what it is against the (rows, N) the
        MatMul had computed (a 0 in the target copies a dimension of its input)."""
        allowzero = self.attr("allowzero", 0)
        if not shape_in:
            self.fail("a Dense written as Tensordot over a scalar")
        flat = (math.prod(int(d) for d in shape_in[:-1]), int(shape_in[-1]))
        if self.attrs.get(ROWS_VIEW) == 1:
            if flat[0] * flat[1] == 0:
                return tuple(shape_in)  # (no rows: a stream's chunk with no steps)
            if _reshape_target(self, shape_in, target, allowzero) != flat:
                self.fail(f"a Dense written as Tensordot: its rows {np.asarray(target).tolist()} are not the rows of "
                          f"the last axis of {tuple(shape_in)} (the converter let the MatMul read the input itself)")
            return tuple(shape_in)
        out = _reshape_target(self, shape_in, target, allowzero)
        if _reshape_target(self, flat, target, allowzero) != out:
            self.fail(f"a Dense written as Tensordot: target {np.asarray(target).tolist()} reads the dimensions of the "
                      f"(rows, N) product, which the converter replaced by {tuple(shape_in)}")
        return out

    def eval(self, xs):
        if self.attrs.get(ROWS_VIEW):
            return [xs[0].reshape(self.rows_view(xs[0].shape, xs[1]))]
        return [xs[0].reshape(_reshape_target(self, xs[0].shape, xs[1], self.attr("allowzero", 0)))]

    def emit(self, p, xs):
        shape = const_input(self, xs[1], "shape")
        if self.attrs.get(ROWS_VIEW) == 1:
            self.rows_view(xs[0].shape, shape)
            return [xs[0]]
        if self.attrs.get(ROWS_VIEW):
            return [p.alias(xs[0], self.rows_view(xs[0].shape, shape))]
        return [p.alias(xs[0], _reshape_target(self, xs[0].shape, shape, self.attr("allowzero", 0)))]


@register("Flatten", attrs=("axis",))
class Flatten(Handler):
    def target(self, shape):
        a = self.attr("axis", 1)
        if not (-len(shape) if self.opset >= 11 else 0) <= a <= len(shape):
            self.fail(f"axis {a} is out of range for rank {len(shape)}")
        a = a + len(shape) if a < 0 else a
        return (math.prod(shape[:a]), math.prod(shape[a:]))  # exact: np.prod wraps around in int64

    def eval(self, xs):
        return [xs[0].reshape(self.target(xs[0].shape))]

    def emit(self, p, xs):
        return [p.alias(xs[0], self.target(xs[0].shape))]


def _axes(h, xs, k, name="axes"):
    """Axes from the attribute (older opsets) or from input k (newer)."""
    if name in h.attrs:
        return [int(a) for a in h.attrs[name]]
    if len(xs) > k and xs[k] is not None:
        v = xs[k].const if hasattr(xs[k], "const") else xs[k]
        if v is None:
            h.fail(f"input {name} must be a constant")
        arr = np.asarray(v)
        if arr.dtype.kind not in "iu" and arr.size:
            h.fail(f"input {name} must hold integers, got {arr.dtype}")
        return [int(a) for a in arr.reshape(-1)]
    return None


class _View(Handler):
    """Ops that only give the data another shape (no copy): subclasses define target()."""

    def eval(self, xs):
        return [xs[0].reshape(self.target(xs[0].shape, _axes(self, xs, 1)))]

    def emit(self, p: Any, xs: list[Any]) -> list[Any]:
        return [p.alias(xs[0], self.target(xs[0].shape, _axes(self, xs, 1)))]


@register("Squeeze", attrs=("axes",))
class Squeeze(_View):
    def target(self, shape, axes):
        if axes is None:
            return tuple(d for d in shape if d != 1)
        if not axes:
            # onnxruntime's kernel squeezes every unit axis, its graph optimiser none (review:
            # (1, 2, 1, 3) or (2, 3) by session options): no one answer to give
            self.fail("an empty axes input is ambiguous (onnxruntime squeezes every unit axis or none, "
                      "depending on its graph optimisations); give the axes, or none")
        axes = {axis_of(self, a, len(shape)) for a in axes}
        for a in axes:
            if shape[a] != 1:
                self.fail(f"cannot squeeze axis {a} of size {shape[a]} (shape {tuple(shape)})")
        return tuple(d for i, d in enumerate(shape) if i not in axes)


@register("Unsqueeze", attrs=("axes",))
class Unsqueeze(_View):
    def target(self, shape, axes):
        if axes is None:
            self.fail("needs axes")
        nd = len(shape) + len(axes)
        axes = sorted(axis_of(self, a, nd) for a in axes)
        out = list(shape)
        for a in axes:
            out.insert(a, 1)
        return tuple(out)


# --- data movement -----------------------------------------------------------------------

@register("Transpose", attrs=("perm",))
class Transpose(Handler):
    def perm(self, nd):
        perm = self.attr("perm") or list(range(nd))[::-1]
        if sorted(perm) != list(range(nd)):
            self.fail(f"perm {perm} is not a permutation of {nd} axes")
        return [int(a) for a in perm]

    def eval(self, xs):
        return [np.transpose(xs[0], self.perm(xs[0].ndim))]

    def emit(self, p, xs):
        x = xs[0]
        perm = self.perm(len(x.shape))
        if perm == sorted(perm):
            return [x]
        shape = [x.shape[a] for a in perm]
        moved = [a for a in perm if x.shape[a] != 1]
        if moved == sorted(moved):  # only axes of length 1 move (a layer's (T, 1, 1, H) output):
            return [p.alias(x, shape)]  # the same elements in the same order, no copy
        out = p.new(tuple(shape), x.dtype)
        st = contiguous_strides(x.shape)
        emit_copy(p, x, out, shape, [st[a] for a in perm], contiguous_strides(shape))
        return [out]


def _slice_params(h, shape, xs):
    """Per axis (start, count, step) of an ONNX Slice."""
    if h.opset < 10:
        starts, ends = h.attr("starts"), h.attr("ends")
        axes, steps = h.attr("axes"), None
    else:
        def val(k):
            v = optional_const(h, xs, k, "starts, ends, axes and steps")
            if v is not None and v.dtype.kind not in "iu" and v.size:  # ONNX types them int32/int64
                h.fail(f"input {k} ({['starts', 'ends', 'axes', 'steps'][k - 1]}) must hold integers, got {v.dtype}")
            return None if v is None else [int(a) for a in v.reshape(-1)]
        starts, ends, axes, steps = val(1), val(2), val(3), val(4)
    nd = len(shape)
    if starts is None or ends is None:
        h.fail("starts and ends are required")
    if nd == 0:
        h.fail("the input is a scalar (rank 0): there is no axis to slice")
    n = len(starts)
    if len(ends) != n or (axes is not None and len(axes) != n) or (steps is not None and len(steps) != n):
        h.fail(f"starts, ends, axes and steps must have one entry each per sliced axis, got lengths "
               f"{n}, {len(ends)}, {None if axes is None else len(axes)}, {None if steps is None else len(steps)}")
    if axes is None and n > nd:
        h.fail(f"{n} starts for an input of rank {nd} (without axes, entry k slices axis k)")
    axes = list(range(n)) if axes is None else [axis_of(h, a, nd) for a in axes]
    if len(set(axes)) != len(axes):
        h.fail(f"axes {axes} name an axis twice")
    steps = [1] * len(axes) if steps is None else steps
    res = [(0, d, 1) for d in shape]
    for a, s, e, st in zip(axes, starts, ends, steps):
        if st == 0:
            h.fail("a slice step of 0")
        d = shape[a]
        if st < 0 and e in (2**31 - 1, 2**63 - 1):
            # onnxruntime reads this end as "through the first element", the ONNX spec (and its
            # shape inference) as the last element: neither can be computed without differing
            h.fail(f"ends {e} with a negative step: onnxruntime and the ONNX spec read it differently "
                   "(write the end as -(2**63 - 1) to run to the first element)")
        # the ONNX spec: a negative index counts from the end, then starts and ends are clamped
        # to [0, d] for a positive step and to [0, d - 1] / [-1, d - 1] for a negative one (not
        # Python's slice rules: a start below -d with a negative step still takes element 0)
        s = s + d if s < 0 else s
        e = e + d if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), d), min(max(e, 0), d)
            n = max(0, -(-(e - s) // st))
        else:
            s, e = min(max(s, 0), d - 1), min(max(e, -1), d - 1)
            n = max(0, -(-(s - e) // -st)) if d else 0
        res[a] = (s if n else 0, n, st)
    return res


@register("Slice", attrs=("starts", "ends", "axes"))
class Slice(Handler):
    def eval(self, xs):
        params = _slice_params(self, xs[0].shape, xs)
        idx = tuple(slice(s, s + n * st if s + n * st >= 0 else None, st) for s, n, st in params)
        return [xs[0][idx]]

    def emit(self, p: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        params = _slice_params(self, x.shape, xs)
        shape = [n for _, n, _ in params]
        out = p.new(tuple(shape), x.dtype)
        st = contiguous_strides(x.shape)
        off = sum(s * k for (s, _, _), k in zip(params, st))
        emit_copy(p, x, out, shape, [k * step for (_, _, step), k in zip(params, st)],
                  contiguous_strides(shape), src_off=off)
        return [out]


@register("Concat", attrs=("axis",))
class Concat(Handler):
    def eval(self, xs):
        return [np.concatenate(xs, axis=self.attr("axis"))]

    def emit(self, p: Any, xs: list[Any]) -> list[Any]:
        nd = len(xs[0].shape)
        a = axis_of(self, self.attr("axis"), nd)
        for x in xs:
            if len(x.shape) != nd or any(x.shape[i] != xs[0].shape[i] for i in range(nd) if i != a):
                self.fail(f"inputs of shapes {[x.shape for x in xs]} do not concatenate on axis {a}")
            if x.dtype != xs[0].dtype:
                self.fail(f"inputs of dtypes {[str(x.dtype) for x in xs]} differ")
        shape = list(xs[0].shape)
        shape[a] = sum(x.shape[a] for x in xs)
        out = p.new(tuple(shape), xs[0].dtype)
        ost = contiguous_strides(shape)
        pos = 0
        for x in xs:
            if int(np.prod(x.shape)):
                emit_copy(p, x, out, x.shape, contiguous_strides(x.shape), ost, dst_off=pos * ost[a])
            pos += x.shape[a]
        return [out]


@register("Split", attrs=("axis", "split", "num_outputs"))
class Split(Handler):
    def sizes(self, shape, xs):
        a = axis_of(self, self.attr("axis", 0), len(shape))
        split = self.attr("split")
        if split is None and len(xs) > 1 and xs[1] is not None:
            v = xs[1].const if hasattr(xs[1], "const") else xs[1]
            if v is None:
                self.fail("input split must be a constant")
            arr = np.asarray(v)
            if arr.dtype.kind not in "iu":
                self.fail(f"input split must hold integers, got {arr.dtype}")
            split = [int(s) for s in arr.reshape(-1)]
        n_out = len(self.node["outputs"])
        if "num_outputs" in self.attrs and int(self.attr("num_outputs")) != n_out:
            self.fail(f"num_outputs = {self.attr('num_outputs')} but the node has {n_out} outputs")
        if split is None and self.opset >= 18 and "num_outputs" not in self.attrs:
            self.fail("needs the split input or the num_outputs attribute (opset 18)")
        if split is None:
            n = shape[a]
            k = -(-n // n_out) if "num_outputs" in self.attrs else n // n_out
            if "num_outputs" not in self.attrs and n % n_out:
                self.fail(f"cannot split {n} evenly into {n_out}")
            split = [min(k, n - i * k) for i in range(n_out)]
        if any(s < 0 for s in split):
            self.fail(f"split sizes {split} must not be negative")
        if sum(split) != shape[a] or len(split) != n_out:
            self.fail(f"split {split} does not cover axis {a} of size {shape[a]} with {n_out} outputs")
        return a, split

    def eval(self, xs):
        a, split = self.sizes(xs[0].shape, xs)
        return np.split(xs[0], np.cumsum(split)[:-1], axis=a)

    def emit(self, p, xs):
        x = xs[0]
        a, split = self.sizes(x.shape, xs)
        st = contiguous_strides(x.shape)
        outs, pos = [], 0
        for n in split:
            shape = list(x.shape)
            shape[a] = n
            out = p.new(tuple(shape), x.dtype)
            emit_copy(p, x, out, shape, st, contiguous_strides(shape), src_off=pos * st[a])
            outs.append(out)
            pos += n
        return outs


def int_vector(h, v, what, low=0):
    """A shape-like input (Expand's shape, Tile's repeats, ConstantOfShape's shape): a 1-D
    integer tensor of values >= low and at most 8 of them, as a list of ints. ONNX types
    these int64; a float one was truncated value by value, a NaN raised from int()."""
    arr = np.asarray(v)
    if arr.ndim != 1 or not (arr.dtype.kind in "iu" or (arr.size == 0 and arr.dtype.kind == "f")):
        h.fail(f"its {what} input must be a 1-D int64 tensor, got {arr.dtype} of shape {arr.shape}")
    if arr.size > 8:
        h.fail(f"its {what} has {arr.size} values; rnnengine runs tensors of rank <= 8")
    out = [int(d) for d in arr]
    if any(d < low for d in out):
        h.fail(f"its {what} {out} has a value below {low}")
    return out


@register("Expand")
class Expand(Handler):
    def target(self, xshape, shape):
        """(N-D broadcast of the input's shape and the shape input) as ONNX Expand."""
        target = tuple(int_vector(self, shape, "shape"))
        try:
            return tuple(np.broadcast_shapes(tuple(xshape), target))
        except (ValueError, RuntimeError):
            self.fail(f"cannot expand {tuple(xshape)} to {target}")

    def eval(self, xs):
        shape = self.target(xs[0].shape, xs[1])
        check_size(self, shape)
        return [np.broadcast_to(xs[0], shape).copy()]

    def emit(self, p, xs):
        x = xs[0]
        shape = self.target(x.shape, const_input(self, xs[1], "shape"))
        out = p.new(shape, x.dtype)
        emit_copy(p, x, out, shape, broadcast_strides(x.shape, shape), contiguous_strides(shape))
        return [out]


@register("Tile")
class Tile(Handler):
    def eval(self, xs):
        reps = int_vector(self, xs[1], "repeats")
        if len(reps) != xs[0].ndim:
            self.fail(f"repeats {reps} must have one value per dimension of the input {xs[0].shape}")
        check_size(self, [d * r for d, r in zip(xs[0].shape, reps)])
        return [np.tile(xs[0], reps)]


@register("Gather", attrs=("axis",))
class Gather(Handler):
    def eval(self, xs):
        if not xs[0].shape:
            self.fail("gathers from a scalar (ONNX Gather's data has rank >= 1)")
        idx = xs[1].astype(np.int64)
        a = axis_of(self, self.attr("axis", 0), xs[0].ndim)
        n = xs[0].shape[a]
        if idx.size and (idx.min() < -n or idx.max() >= n):
            self.fail(f"an index lies outside [-{n}, {n})")
        return [np.take(xs[0], idx, axis=a)]

    def emit(self, p, xs):
        data, idx = xs
        if not data.shape:
            self.fail("gathers from a scalar (ONNX Gather's data has rank >= 1)")
        a = axis_of(self, self.attr("axis", 0), len(data.shape))
        if idx.dtype not in (np.int64, np.int32):
            self.fail(f"indices must be int32 or int64, got {idx.dtype}")
        if idx.dtype == np.int32:
            if idx.const is not None:
                idx = p.const(idx.const.astype(np.int64))
            else:
                cast = p.new(idx.shape, np.int64)
                p.emit(OP_CAST, [idx], [cast], [2, 1, int(np.prod(idx.shape))])
                idx = cast
        shape = tuple(data.shape[:a]) + tuple(idx.shape) + tuple(data.shape[a + 1:])
        out = p.new(shape, data.dtype)
        p.emit(OP_GATHER, [data, idx], [out], [data.dtype.itemsize, int(np.prod(data.shape[:a])),
                                               data.shape[a], int(np.prod(data.shape[a + 1:])),
                                               int(np.prod(idx.shape))])
        return [out]


@register("TopK", attrs=("axis", "k", "largest", "sorted"))
class TopK(Handler):
    """As exported around padded batches (sorting sequence lengths). Always sorted; ties
    keep the lower index first."""

    def geometry(self, shape, xs):
        a = axis_of(self, self.attr("axis", -1), len(shape))
        if self.opset < 10:
            k = int(self.attr("k"))
        else:
            v = xs[1].const if hasattr(xs[1], "const") else xs[1]
            if v is None:
                self.fail("k must be a constant")
            kv = np.asarray(v)
            if kv.size != 1 or kv.dtype.kind not in "iu":
                self.fail(f"K must hold one integer (a 1-D tensor of one value), got {kv.dtype} of shape {kv.shape}")
            k = int(kv.reshape(-1)[0])
        if not 0 <= k <= shape[a]:
            self.fail(f"k = {k} is out of range for axis {a} of size {shape[a]}")
        if not self.attr("sorted", 1) and k > 1:
            # the order of unsorted results is onnxruntime's implementation (heap order), not a rule
            self.fail("sorted = 0 with k > 1 is not supported (the order of the results is unspecified)")
        return a, k

    def eval(self, xs):
        x = xs[0]
        a, k = self.geometry(x.shape, xs)
        largest = self.flag("largest", 1)
        # NaN counts as larger than every number (onnxruntime); ties keep the lower index
        nan = np.isnan(x) if x.dtype.kind == "f" else np.zeros(x.shape, bool)
        if x.dtype.kind == "f":
            key = np.where(nan, 0, x).astype(np.float64)
            key = np.where(nan, 0, -key) if largest else key
            group = np.where(nan, 0 if largest else 1, 1 if largest else 0)
        else:  # integers, exactly (also beyond 2^53); ~k = -k - 1 reverses the order without overflow
            key = x.astype(np.int64)
            key = ~key if largest else key
            group = np.zeros(x.shape, np.int64)
        order = np.moveaxis(np.lexsort((np.moveaxis(key, a, -1), np.moveaxis(group, a, -1)), axis=-1), -1, a)
        idx = np.take(order, np.arange(k), axis=a)
        return [np.take_along_axis(x, idx, axis=a), idx.astype(np.int64)]

    def emit(self, p, xs):
        x = xs[0]
        if x.dtype not in TENSOR_DTYPES:
            self.fail(f"dtype {x.dtype} is not supported at run time")
        a, k = self.geometry(x.shape, xs)
        shape = list(x.shape)
        shape[a] = k
        vals, idx = p.new(tuple(shape), x.dtype), p.new(tuple(shape), np.int64)
        n = x.shape[a]
        p.need_work(2 * n + 2)  # int64 scratch, counted in floats
        p.emit(OP_TOPK, [x], [vals, idx], [TENSOR_DTYPES[x.dtype], int(np.prod(x.shape[:a])), n,
                                           int(np.prod(x.shape[a + 1:])), k, int(self.flag("largest", 1))])
        return [vals, idx]


@register("ScatterElements", "Scatter", attrs=("axis", "reduction"))
class ScatterElements(Handler):
    def check(self, data, idx, upd):
        if self.attr("reduction", "none") != "none":
            self.fail(f"reduction {self.attr('reduction')!r} is not supported")
        if len(idx) != len(data) or tuple(idx) != tuple(upd):
            self.fail(f"indices {tuple(idx)} and updates {tuple(upd)} must have the data's rank {len(data)}")
        a = axis_of(self, self.attr("axis", 0), len(data))
        for d, (i, n) in enumerate(zip(idx, data)):
            if d != a and i > n:
                self.fail(f"indices of shape {tuple(idx)} are wider than the data {tuple(data)} on axis {d}")
        return a

    def eval(self, xs):
        data, idx, upd = xs
        a = self.check(data.shape, idx.shape, upd.shape)
        out = data.copy()
        n = data.shape[a]
        idx = np.where(idx < 0, idx + n, idx).astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            self.fail("an index is out of range")
        # element j of the indices and updates goes to the same place on every axis but a (where
        # the index is): np.put_along_axis would instead stretch indices narrower than the data
        # over its other axes, writing rows onnxruntime leaves alone (review)
        grid = list(np.indices(idx.shape, sparse=True))
        grid[a] = idx
        out[tuple(grid)] = upd
        return [out]

    def emit(self, p, xs):
        data, idx, upd = xs
        a = self.check(data.shape, idx.shape, upd.shape)
        if len(data.shape) > 8:
            self.fail("rank > 8")
        if idx.dtype != np.int64:
            if idx.const is not None:
                idx = p.const(idx.const.astype(np.int64))
            else:
                cast = p.new(idx.shape, np.int64)
                p.emit(OP_CAST, [idx], [cast], [TENSOR_DTYPES[idx.dtype], DT_I64, int(np.prod(idx.shape))])
                idx = cast
        if upd.dtype != data.dtype:
            self.fail(f"updates {upd.dtype} differ from data {data.dtype}")
        out = p.new(data.shape, data.dtype)
        p.emit(OP_SCATTER, [data, idx, upd], [out], [data.dtype.itemsize, len(data.shape)] + list(data.shape)
               + list(idx.shape) + [a])
        return [out]


# --- dense layers ------------------------------------------------------------------------

def pack_panels(Bt: Any) -> Any:
    """Weights Bt (N, K) in the panel layout RNN_OP_MATMUL reads (src_c/pack.c): ceil(N/16)
    panels of (K, 16), row n of Bt in lane n % 16 (lanes past N zero), 64-byte aligned. The
    packed kernels sum each output over k in order, so a row of the product has the same bits
    whatever other rows share the call: a stream's batch, the session batcher's sessions, a
    whole sequence's time steps."""
    Bt = np.asarray(Bt, np.float32)
    N, K = Bt.shape
    P = -(-N // 16)
    padded = np.zeros((P * 16, K), np.float32)
    padded[:N] = Bt
    out = aligned_floats(P * 16 * K)
    out[...] = padded.reshape(P, 16, K).transpose(0, 2, 1).reshape(-1)  # (P, K, 16)
    return out


@register("MatMul")
class MatMul(Handler):
    def eval(self, xs):
        return [np.matmul(xs[0], xs[1])]

    @staticmethod
    def weight_matrix(b):
        """A constant B as the (K, N) matrix of the packed path (a 1-D B as a column), or None
        when the product goes to RNN_OP_BMATMUL (a run-time B, or a constant one with batch
        axes), whose rows are summed by BLAS in an order that depends on how many rows the
        call has."""
        if b.const is None:
            return None
        B = np.asarray(b.const, np.float32)
        while B.ndim > 2 and B.shape[0] == 1:
            B = B[0]
        return B[:, None] if B.ndim == 1 else B if B.ndim == 2 else None

    def emit(self, p, xs):
        a, b = xs
        B = self.weight_matrix(b)
        if B is None:
            return [self.emit_batched(p, a, b)]
        if a.dtype != np.float32:
            self.fail(f"supports float32 (..., K) @ (K, N) with constant weights, got {a.shape} @ {b.shape}")
        K, N = B.shape
        if a.shape[-1:] != (K,):
            self.fail(f"shapes {a.shape} and {B.shape} do not multiply")
        # B's leading unit axes still broadcast into the result's batch axes (numpy.matmul):
        # (3, 4) @ (1, 4, 5) is (1, 3, 5), (4,) @ (1, 4, 5) is (1, 5); the data is the same
        lead = tuple(b.shape[:-2])
        if len(a.shape) == 1:
            shape = lead + (N,)
        else:
            batch = tuple(a.shape[:-2])
            batch = (1,) * max(0, len(lead) - len(batch)) + batch
            shape = batch + (a.shape[-2], N)
        out = p.new(shape, np.float32)
        Bp = p.derived(b.const, "matmul-panels", lambda: pack_panels(np.ascontiguousarray(B.T)))
        p.emit(OP_MATMUL, [a, p.const(Bp), None], [out],
               [int(np.prod(a.shape[:-1])), N, K])
        if len(b.shape) == 1:  # a column: its axis dropped from the result
            return [p.alias(out, shape[:-1])]
        return [out]

    def emit_batched(self, p, a, b):
        """numpy.matmul of two run-time operands (attention: scores = Q K^T, then scores @ V),
        or of a constant B with its own batch axes: one BLAS product per batch index
        (RNN_OP_BMATMUL), the batch axes broadcast as numpy.matmul does; float32. A 1-D
        operand is a row (A) or a column (B), its axis dropped from the result."""
        if a.dtype != np.float32 or b.dtype != np.float32:
            self.fail(f"multiplies float32 tensors at run time, got {a.dtype} and {b.dtype}")
        if not a.shape or not b.shape:
            self.fail("MatMul of a scalar is not defined")
        a2 = p.alias(a, (1,) + tuple(a.shape)) if len(a.shape) == 1 else a
        b2 = p.alias(b, tuple(b.shape) + (1,)) if len(b.shape) == 1 else b
        (M, K), (K2, N) = a2.shape[-2:], b2.shape[-2:]
        if K != K2:
            self.fail(f"shapes {list(a.shape)} and {list(b.shape)} do not multiply (K {K} and {K2})")
        ba, bb = tuple(a2.shape[:-2]), tuple(b2.shape[:-2])
        batch = broadcast_shape(self, ba, bb)
        nd = len(batch)
        if nd > 8:
            self.fail(f"{nd} batch axes (at most 8)")

        def strides(shape, mat):
            full = (1,) * (nd - len(shape)) + shape
            st = contiguous_strides(full + (1,))[:-1]
            return [int(s) * mat if n != 1 else 0 for s, n in zip(st, full)]
        out_shape = batch + (M, N)
        out = p.new(out_shape, np.float32)
        p.emit(OP_BMATMUL, [a2, b2], [out], [nd, M, N, K] + list(batch) + strides(ba, M * K) + strides(bb, K * N))
        if len(a.shape) == 1 and len(b.shape) == 1:
            return p.alias(out, batch)
        if len(a.shape) == 1:
            return p.alias(out, batch + (N,))
        if len(b.shape) == 1:
            return p.alias(out, batch + (M,))
        return out


@register("Gemm", attrs=("alpha", "beta", "transA", "transB", "broadcast"))
class Gemm(Handler):
    def eval(self, xs):
        A, B = xs[0], xs[1]
        if self.flag("transA", 0):
            A = A.T
        if self.flag("transB", 0):
            B = B.T
        y = self.attr("alpha", 1.0) * (A @ B)
        if len(xs) > 2 and xs[2] is not None and self.attr("beta", 1.0) != 0:  # beta 0: C unread (a NaN in it too)
            y = y + self.attr("beta", 1.0) * xs[2]
        return [y.astype(np.float32)]

    def emit(self, p, xs):
        a, b = xs[0], xs[1]
        c = xs[2] if len(xs) > 2 else None
        if b.const is None:
            self.fail("B must be a constant weight matrix")
        if len(a.shape) != 2:
            self.fail(f"A must be 2-D, got shape {a.shape}")
        if a.dtype != np.float32 or (c is not None and c.dtype != np.float32):
            self.fail(f"takes float32 A and C at run time, got {a.dtype}"
                      f"{'' if c is None else f' and {c.dtype}'}")
        if self.flag("transA", 0):
            t = p.new((a.shape[1], a.shape[0]), a.dtype)
            emit_copy(p, a, t, t.shape, [1, a.shape[1]], [a.shape[0], 1])
            a = t
        B = np.asarray(b.const, np.float32)
        if B.ndim != 2:
            self.fail(f"B must be 2-D, got shape {B.shape}")
        Bt = B if self.flag("transB", 0) else B.T
        Bt = np.ascontiguousarray(Bt * np.float32(self.attr("alpha", 1.0)), np.float32)
        M, K = a.shape
        N = Bt.shape[0]
        if Bt.shape[1] != K:
            self.fail(f"shapes {a.shape} and {B.shape} do not multiply")
        if c is not None and (len(c.shape) > 2 or any(d not in (1, w) for d, w in zip(reversed(c.shape), (N, M)))):
            self.fail(f"C of shape {c.shape} does not broadcast to the result ({M}, {N})")
        if self.attr("beta", 1.0) == 0:
            c = None  # C is not read (onnxruntime: 0 * NaN in C does not reach the result)
        bias = None
        out = p.new((M, N), np.float32)
        Bp = p.derived(b.const, f"gemm-panels-{int(self.flag('transB', 0))}-{float(self.attr('alpha', 1.0))!r}",
                       lambda: pack_panels(Bt))
        if c is not None and c.const is not None and np.asarray(c.const).size in (1, N) and \
                np.asarray(c.const).ndim <= 2 and (np.asarray(c.const).ndim < 2 or np.asarray(c.const).shape[0] == 1):
            bias = p.const(np.broadcast_to(np.asarray(c.const, np.float32).reshape(-1) * np.float32(self.attr("beta", 1.0)), (N,)).copy())
            c = None
        p.emit(OP_MATMUL, [a, p.const(Bp), bias], [out], [M, N, K])
        if c is not None:
            if self.attr("beta", 1.0) != 1.0:
                if c.const is None:
                    self.fail("C with beta != 1 must be a constant")
                c = p.const(np.asarray(c.const, np.float32) * np.float32(self.attr("beta", 1.0)))
            out2 = p.new((M, N), np.float32)
            p.emit(OP_BINARY, [out, c], [out2], [BIN_ADD, 2, M, N] + broadcast_strides((M, N), (M, N))
                   + broadcast_strides(c.shape, (M, N)))
            out = out2
        return [out]


@register("Softmax", "LogSoftmax", attrs=("axis",))
class Softmax(Handler):
    def geometry(self, shape):
        nd = len(shape)
        if self.opset < 13:
            a = axis_of(self, self.attr("axis", 1), nd)
            return math.prod(shape[:a]), math.prod(shape[a:]), 1
        a = axis_of(self, self.attr("axis", -1), nd)
        return math.prod(shape[:a]), shape[a], math.prod(shape[a + 1:])

    def eval(self, xs):
        x = xs[0]
        outer, n, inner = self.geometry(x.shape)
        v = x.reshape(outer, n, inner).astype(np.float64)
        v = v - v.max(axis=1, keepdims=True)
        if self.node["op"] == "LogSoftmax":
            y = v - np.log(np.exp(v).sum(axis=1, keepdims=True))
        else:
            y = np.exp(v) / np.exp(v).sum(axis=1, keepdims=True)
        return [y.reshape(x.shape).astype(x.dtype)]

    def emit(self, p, xs):
        x = xs[0]
        if x.dtype != np.float32:
            self.fail(f"needs a float32 input at run time, got {x.dtype}")
        out = p.new(x.shape, np.float32)
        p.emit(OP_SOFTMAX, [x], [out], list(self.geometry(x.shape)) + [int(self.node["op"] == "LogSoftmax")])
        return [out]


@register("LayerNormalization", attrs=("axis", "epsilon", "stash_type"))
class LayerNormalization(Handler):
    """LayerNormalization-17 (nn.LayerNorm as both PyTorch exporters write it from opset 17,
    Keras LayerNormalization through tf2onnx): over the axes [axis, rank) of each row,
    Y = (X - mean) / sqrt(var + epsilon) * Scale + B with var = mean((X - mean)^2); outputs
    Mean and InvStdDev (optional) of shape X.shape[:axis] + 1s.

    Numerics (src_c/graph.c op_layernorm): as the ONNX function defines it at stash_type 1,
    the mean a float32 value, var = mean((X - mean)^2) in a second pass (in float64, float32's
    overflow kept: var inf, Y = B). Equal to onnxruntime also on rows 1e5 times their spread
    from zero, where a float32 sum for the mean (onnx.reference's) is not. Scale and B broadcast to X's shape without growing it
    (onnxruntime 1.32's rule). Refused: stash_type other than 1 (float32 statistics), inputs
    other than float32, and an empty row (onnxruntime refuses it too)."""

    def geometry(self, xshape, others):
        """(axis, outer, n) for an X of this shape; `others`: (what, shape or None) of Scale, B."""
        r = len(xshape)
        a = axis_of(self, self.attr("axis", -1), r)
        stash = self.attr("stash_type", 1)
        if not isinstance(stash, (int, np.integer)) or int(stash) != 1:
            self.fail(f"stash_type {stash!r} is not supported (only 1: float32 statistics)")
        eps = self.attr("epsilon", 1e-5)
        if isinstance(eps, bool) or not isinstance(eps, (float, int, np.floating, np.integer)):
            self.fail(f"epsilon must be a float, got {eps!r}")
        n = math.prod(xshape[a:])
        if n == 0:
            self.fail(f"normalises over X's axes {a}.. of shape {tuple(xshape[a:])}, which hold no element "
                      "(onnxruntime refuses an empty row too)")
        for what, shape in others:
            if shape is None:
                continue
            if len(shape) > r or any(d not in (1, w) for d, w in zip(reversed(shape), reversed(xshape))):
                self.fail(f"{what} of shape {tuple(shape)} does not broadcast to X's shape {tuple(xshape)} "
                          "without growing it")
        return a, math.prod(xshape[:a]), n

    def epsilon(self):
        return np.float32(self.attr("epsilon", 1e-5))  # (a float32 attribute; C adds it in double)

    def eval(self, xs):
        x, scale = xs[0], xs[1]
        bias = xs[2] if len(xs) > 2 else None
        for what, v in (("X", x), ("Scale", scale), ("B", bias)):
            if v is not None and v.dtype != np.float32:
                self.fail(f"{what} is {v.dtype}; only float32 is supported")
        a, _, _ = self.geometry(x.shape, [("Scale", scale.shape), ("B", None if bias is None else bias.shape)])
        axes = tuple(range(a, x.ndim))
        xd = x.astype(np.float64)
        # as src_c/graph.c op_layernorm: the mean a float32 value (+-inf where float32's sum
        # overflows); Var inf where a square or the sum of squares leaves float32's range
        total = xd.sum(axis=axes, keepdims=True)
        mean = np.where(np.abs(total) > F32_MAX, np.sign(total) * np.inf,
                        (total / math.prod(x.shape[a:])).astype(np.float32)).astype(np.float64)
        dd = (xd - mean) ** 2
        ss = dd.sum(axis=axes, keepdims=True)
        over = (dd > F32_MAX).any(axis=axes, keepdims=True) | (ss > F32_MAX)
        var = np.where(np.isnan(ss), np.nan, np.where(over, np.inf, ss / math.prod(x.shape[a:])))
        inv = 1.0 / np.sqrt(var + np.float64(self.epsilon()))
        y = (xd - mean) * inv * scale.astype(np.float64)
        if bias is not None:
            y = y + bias.astype(np.float64)
        return [y.astype(np.float32), mean.astype(np.float32), inv.astype(np.float32)]

    def emit(self, p, xs):
        x, scale = xs[0], xs[1]
        bias = xs[2] if len(xs) > 2 else None
        if scale is None:
            self.fail("Scale is required")
        for what, v in (("X", x), ("Scale", scale), ("B", bias)):
            if v is not None and v.dtype != np.float32:
                self.fail(f"takes float32 inputs at run time, got {what} of {v.dtype}")
        a, outer, n = self.geometry(x.shape, [("Scale", scale.shape), ("B", None if bias is None else bias.shape)])
        r = len(x.shape)

        def row(v):
            """A constant Scale / B that is the same for every row, as the n values the
            kernel reads; None when it is not (it is then applied by broadcast afterwards)."""
            if v is None or v.const is None:
                return None
            c = np.asarray(v.const, np.float32).reshape((1,) * (r - v.const.ndim) + tuple(v.const.shape))
            if any(d != 1 for d in c.shape[:a]):
                return None
            return p.const(np.ascontiguousarray(np.broadcast_to(c, (1,) * a + tuple(x.shape[a:])).reshape(-1)))
        s_row, b_row = row(scale), row(bias)
        fused = s_row is not None and (bias is None or b_row is not None)
        outputs = self.node["outputs"]
        stats = tuple(x.shape[:a]) + (1,) * (r - a)
        y = p.new(tuple(x.shape), np.float32)
        mean = p.new(stats, np.float32) if len(outputs) > 1 and outputs[1] else None
        inv = p.new(stats, np.float32) if len(outputs) > 2 and outputs[2] else None
        p.emit(OP_LAYERNORM, [x, s_row if fused else None, b_row if fused else None], [y, mean, inv],
               [outer, n], [float(self.epsilon())])
        if not fused:  # a per-row or run-time Scale / B: the broadcast product and sum
            y = emit_binary(self, p, "Mul", y, scale)
            if bias is not None:
                y = emit_binary(self, p, "Add", y, bias)
        return [y, mean, inv][:max(1, len(outputs))]


# --- audio front ends --------------------------------------------------------------------

def aligned_floats(n: int) -> Any:
    """An uninitialised float32 array of n elements starting on a 64-byte boundary, as the
    packed kernels' aligned loads want (C computes an unaligned one with the plain reference
    kernel)."""
    buf = np.empty(n + 16, np.float32)
    start = (-buf.ctypes.data % 64) // 4  # float32 arrays start on 4-byte boundaries
    return buf[start:start + n]


def pack_conv_filters(W: Any, group: int, parts: int = 1) -> Any:
    """Conv filters W (M, C/group, K) in the packed layout RNN_OP_CONV1D_PACKED reads for sums
    in `parts` parts (_core.conv_parts), written by C (src_c/conv.c rnn_conv1d_pack, where the
    layout is specified: per group, the taps in parts, each part panels of 16 filters),
    64-byte aligned."""
    W = np.ascontiguousarray(W, np.float32)
    M, Cg, K = W.shape
    out = aligned_floats(-(-(M // group) // 16) * 16 * group * Cg * K)
    _core.conv_pack(W, group, parts, out)
    return out


def conv_work_floats(N: int, Lout: int, Cg: int, K: int, Mg: int) -> int:
    """Workspace floats of RNN_OP_CONV1D_PACKED, from C (src_c/conv.c
    rnn_conv1d_packed_work): one block's im2col rows (up to 64: the positions of as many
    batch rows as fit) and their product."""
    return int(_core.conv_work(N, Lout, Cg, K, Mg))



def dft_basis(W: Any) -> Any:
    """(table, sign) when the Conv filters W (M, 1, K) are a windowed DFT basis, as audio
    front ends compute their STFT (silero-vad: a periodic Hann window): K a power of two from
    4, M = K + 2, and every stored value within float32 rounding of the formula
    (src_c/stft.c): W[f, 0, n] = w[n] cos(2 pi f n / K), W[K/2 + 1 + f, 0, n] = sign w[n]
    sin(2 pi f n / K), f = 0 .. K/2, the window w being W[0, 0] itself. table is what
    RNN_OP_STFT reads: the window, the FFT's twiddles and the split step's (computed in float64
    and rounded). None when W is anything else: the Conv is then computed as one.

    The test of "within rounding", tap by tap: |W[:, 0, n] - formula| <= 2 eps |w[n]|, eps =
    2^-23 (where the window is 0, the filters must be 0 too). A float32 basis stored from exact
    values is within half an ulp of each plus the rounding of w[n] itself (silero-vad's: at
    most 0.66 eps |w[n]|); the FFT's result then differs from the direct product by at most
    2 eps sum |w[n] x[n]| over the frame, the size of the direct product's own rounding."""
    W = np.asarray(W)
    if W.ndim != 3 or W.shape[1] != 1 or W.dtype != np.float32:
        return None
    M, _, K = W.shape
    if K < 4 or K > 1 << 20 or K & (K - 1) or M != K + 2 or not np.isfinite(W).all():
        return None
    h = K // 2
    w = W[0, 0].astype(np.float64)
    top = float(np.abs(w).max())
    if top == 0.0:
        return None
    n = np.arange(K)
    tol = 2.0 * 2.0 ** -23 * np.abs(w)  # per tap

    def within(rows: Any, sign: int) -> bool:
        """Whether rows f of the cosine (sign 0) or sine filters are the formula within rounding."""
        angle = 2 * np.pi * ((rows[:, None] * n) % K) / K  # reduced exactly before the product with 2 pi
        stored = W[rows if sign == 0 else h + 1 + rows, 0].astype(np.float64)
        want = w * np.cos(angle) if sign == 0 else sign * w * np.sin(angle)
        return bool(np.all(np.abs(stored - want) <= tol))
    one = np.array([1])
    if not within(one, 0):  # most filters fail at once, on the first cosine row
        return None
    sign = 1 if within(one, 1) else -1
    # every row, a block at a time (temporaries of at most 2^20 float64, whatever K is)
    block = max(1, (1 << 20) // K)
    for f0 in range(0, h + 1, block):
        rows = np.arange(f0, min(h + 1, f0 + block))
        if not within(rows, 0) or not within(rows, sign):
            return None
    parts = [w]
    e = np.arange(h // 2)
    s = 1
    while s < h:  # FFT stage of s interleaved sequences: the twiddle of each e, expanded
        parts += [np.cos(2 * np.pi * (e - e % s) / h), np.sin(2 * np.pi * (e - e % s) / h)]
        s *= 2
    k = np.arange(h + 1)
    parts += [np.cos(2 * np.pi * k / K), np.sin(2 * np.pi * k / K)]
    table = np.concatenate(parts).astype(np.float32)
    assert table.size == _core.stft_sizes(K)[0]
    return table, sign


def emit_conv1d(p: Any, x: Any, w: Any, bias: Any, out: Any, geometry: list[int]) -> None:
    """out (N, M, Lout) = conv(x (N, C, L), constant W (M, C/g, K)) + constant bias, with the
    filters packed once per model (p.derived) for RNN_OP_CONV1D_PACKED; geometry is CONV1D's
    [N, C, L, M, K, Lout, stride, dilation, pad_left, group]. The planner may later fuse a
    Relu / LeakyRelu that reads only this output into the instruction (fuse_activations in
    rnnengine/runtime/graph.py)."""
    N, C, L, M, K, Lout, s, d, pl, g = geometry
    if C == 1 and g == 1 and d == 1 and (bias is None or (np.size(bias.const) == M and not np.any(bias.const))):
        found = p.derived(w.const, "stft-table", lambda: dft_basis(w.const))
        if found is not None:  # an STFT front end: by FFT, reading no filters (src_c/stft.c)
            table, sign = found
            p.need_work(_core.stft_sizes(K)[1])
            p.emit(OP_STFT, [x, p.const(np.ascontiguousarray(w.const, np.float32)), p.const(table)], [out],
                   [N, L, Lout, K, s, pl, sign])
            return
    parts = _core.conv_parts((C // g) * K, Lout)  # the order of the sums (src_c/conv.c)
    packed = p.derived(w.const, f"conv-packed-{g}-{parts}", lambda: pack_conv_filters(w.const, g, parts))
    bc = None if bias is None else p.const(np.ascontiguousarray(bias.const, np.float32).reshape(-1))
    p.need_work(conv_work_floats(N, Lout, C // g, K, M // g))
    p.emit(OP_CONV1D_PACKED, [x, p.const(packed), bc], [out], list(geometry) + [-1], [0.0])


def flatten_conv_inputs(p: Any, xs: list[Any]) -> list[Any]:
    """(N, C, 1, L) input and (M, C/g, 1, K) weights seen as (N, C, L) and (M, C/g, K) (a
    pool: its input only, (N, C, 1, L) or (N, C, L, 1))."""
    x = xs[0]
    flat = [p.alias(x, (x.shape[0], x.shape[1], x.shape[2] * x.shape[3]))]
    if len(xs) == 1:
        return flat
    w = xs[1]
    return flat + [p.const(np.asarray(w.const).reshape(w.shape[0], w.shape[1], w.shape[3])) if w.const is not None
                   else p.alias(w, (w.shape[0], w.shape[1], w.shape[3]))] + list(xs[2:])


def unflatten_shape(shape: Iterable[int], long_axis: int) -> tuple[int, ...]:
    """The (N, M, Lout) result of a 1-D window op seen as the 4-D op's: (N, M, 1, Lout) when
    L was axis 3, (N, M, Lout, 1) when axis 2."""
    N, M, L = shape
    return (N, M, 1, L) if long_axis == 3 else (N, M, L, 1)


def window_1d(h: Any, L: int, K: int, ceil: bool = False, pool: bool = False) -> tuple[int, int, int, int, int]:
    """(stride, dilation, pad_left, pad_right, Lout) of a 1-D window op (Conv, MaxPool,
    AveragePool) with a kernel of K taps over L steps, from the node's strides, dilations,
    pads and auto_pad. With `ceil` (a pool's ceil_mode) the last window may hang past the
    padded input, but, as in onnxruntime and PyTorch, never starts in the right padding. A
    `pool` shorter than its window by more than a stride has onnxruntime's count of windows
    (its division truncates toward zero: none, where a floor gives -1)."""
    def ints(name, n, default, low):
        """A list attribute: n values >= low, as ONNX requires (onnxruntime refuses others;
        a longer list was cut to its first values, negative pads cropped)."""
        v = h.attr(name)
        if v is None:
            return default
        v = [int(a) for a in v]
        if len(v) != n or any(a < low for a in v):
            h.fail(f"{name} {v[:8]} must be {n} value{'s' if n > 1 else ''} >= {low} for a 1-D {h.node['op']}")
        return v
    (s,), (d,) = ints("strides", 1, [1], 1), ints("dilations", 1, [1], 1)
    pads = ints("pads", 2, [0, 0], 0)
    ap = h.attr("auto_pad", "NOTSET")
    ap = ap.decode() if isinstance(ap, bytes) else ap
    if ap in ("NOTSET", ""):
        pl, pr = pads
    elif ap == "VALID":
        pl = pr = 0
    elif ap in ("SAME_UPPER", "SAME_LOWER"):
        if d != 1:  # onnxruntime refuses it for Conv, and sizes a pool's padding without the dilation
            h.fail(f"auto_pad {ap} with dilation {d} is not supported")
        out = -(-L // s)
        total = (out - 1) * s + K - L
        if total < 0:  # onnxruntime crops (a negative pad), TensorFlow pads by 0: they disagree
            h.fail(f"auto_pad {ap} with stride {s} over a kernel of {K} needs a negative padding for "
                   f"{L} steps (onnxruntime crops the input there, TensorFlow does not); refused")
        pl = total // 2 if ap == "SAME_UPPER" else total - total // 2
        pr = total - pl
    else:
        h.fail(f"auto_pad {ap!r} is not supported")
    if ceil and ap not in ("NOTSET", ""):
        h.fail(f"ceil_mode=1 with auto_pad {ap} is not supported")
    room = L + pl + pr - d * (K - 1) - 1
    Lout = (-(-room // s) if ceil or (pool and room < 0) else room // s) + 1
    if ceil and Lout > 0 and (Lout - 1) * s >= L + pl:
        Lout -= 1  # that window would start in the right padding
    if Lout < 0:
        h.fail(f"input length {L} is too short for kernel {K}")
    return s, d, int(pl), int(pr), Lout


@register("Conv", attrs=("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"))
class Conv(Handler):
    def as_1d(self, xshape, wshape):
        """A 2-D Conv over (N, C, 1, L) with a (M, C/g, 1, K) kernel, as tf2onnx writes Keras
        Conv1D: the same handler for the 1-D conv over (N, C, L), or None for any other rank."""
        if len(xshape) != 4 or len(wshape) != 4 or xshape[2] != 1 or wshape[2] != 1:
            return None
        a = dict(self.attrs)
        for name, first in (("kernel_shape", 1), ("strides", 1), ("dilations", 1)):
            v = a.get(name)
            if v is not None:
                if len(v) != 2 or (name != "kernel_shape" and int(v[0]) != first) or \
                        (name == "kernel_shape" and int(v[0]) != 1):
                    self.fail(f"{name} {list(v)} of a conv over (N, C, 1, L) must be 1 on the height axis")
                a[name] = [int(v[1])]
        pads = a.get("pads")
        if pads is not None:
            if len(pads) != 4 or int(pads[0]) or int(pads[2]):
                self.fail(f"pads {list(pads)} pad the height axis of a conv over (N, C, 1, L)")
            a["pads"] = [int(pads[1]), int(pads[3])]
        flat = type(self)(dict(self.node, attrs=a), self.opset)
        flat.long_axis = 3
        return flat

    def geometry(self, xshape, wshape):
        if len(xshape) != 3 or len(wshape) != 3:
            self.fail(f"only 1-D convolution (N, C, L) is supported, got input {xshape}, weights {wshape}")
        N, C, L = xshape
        M, Cg, K = wshape
        g = int(self.attr("group", 1))
        if g < 1 or Cg * g != C or M % g:
            self.fail(f"weights {wshape} with group {g} do not fit input channels {C}")
        ks = self.attr("kernel_shape")
        if ks is not None and list(ks) != [K]:
            self.fail(f"kernel_shape {ks} differs from the weights' {K}")
        s, d, pl, pr, Lout = window_1d(self, L, K)
        return N, C, L, M, K, Lout, s, d, pl, pr, g

    def eval(self, xs):
        flat = self.as_1d(np.shape(xs[0]), np.shape(xs[1]))
        if flat is not None:
            y = flat.eval([xs[0][:, :, 0], xs[1][:, :, 0]] + list(xs[2:]))[0]
            return [y[:, :, None, :]]
        x, W = xs[0].astype(np.float64), xs[1].astype(np.float64)
        N, C, L, M, K, Lout, s, d, pl, pr, g = self.geometry(x.shape, W.shape)
        xp = np.pad(x, ((0, 0), (0, 0), (pl, max(pr, 0))))
        out = np.zeros((N, M, Lout))
        Cg, Mg = C // g, M // g
        for gi in range(g):
            for k in range(K):
                cols = xp[:, gi * Cg:(gi + 1) * Cg, k * d: k * d + s * (Lout - 1) + 1: s]
                out[:, gi * Mg:(gi + 1) * Mg] += np.einsum("mc,ncl->nml", W[gi * Mg:(gi + 1) * Mg, :, k], cols)
        if len(xs) > 2 and xs[2] is not None:
            out += xs[2].reshape(1, M, 1)
        return [out.astype(np.float32)]

    def emit(self, p, xs):
        flat = self.as_1d(xs[0].shape, xs[1].shape)
        if flat is not None:
            y = flat.emit(p, flatten_conv_inputs(p, xs))[0]
            return [p.alias(y, unflatten_shape(y.shape, flat.long_axis))]
        x, w = xs[0], xs[1]
        bias = xs[2] if len(xs) > 2 else None
        if w.const is None or (bias is not None and bias.const is None):
            self.fail("weights and bias must be constants")
        if x.dtype != np.float32:
            self.fail(f"needs a float32 input at run time, got {x.dtype}")
        N, C, L, M, K, Lout, s, d, pl, pr, g = self.geometry(x.shape, w.shape)
        out = p.new((N, M, Lout), np.float32)
        emit_conv1d(p, x, w, bias, out, [N, C, L, M, K, Lout, s, d, pl, g])
        return [out]


POOL_MAX, POOL_AVG_EXCLUDE, POOL_AVG_INCLUDE = 0, 1, 2  # RNN_OP_POOL1D's kinds (src_c/graph.c)
WINDOW_OPS = ("Conv", "MaxPool", "AveragePool")  # ops with a window along their last axis (streams carry frames)


def taps_within(p0: int, d: int, K: int, a: int, b: int) -> tuple[int, int]:
    """The taps k in [k0, k1) of [0, K) of a window starting at p0 (dilation d) whose
    positions p0 + k*d lie in [a, b); src_c/graph.c's taps_within."""
    lo = -(-(a - p0) // d) if a > p0 else 0
    hi = -(-(b - p0) // d) if b > p0 else 0
    k0, k1 = min(lo, K), min(hi, K)
    return k0, max(k0, k1)


def first_empty_window(Lout: int, K: int, s: int, d: int, off: int, lo: int, hi: int) -> Optional[int]:
    """The first output j of a pool whose taps j*s + k*d - off (k < K) all miss [lo, hi), or
    None. Only windows reaching past lo or hi can miss: those at either end are checked."""
    def empty(j):
        k0, k1 = taps_within(j * s - off, d, K, lo, hi)
        return k0 == k1
    head = min(Lout, (lo + off) // s + 1)
    tail = max(head, min(Lout, (hi + off - (K - 1) * d) // s))
    for j in list(range(head)) + list(range(tail, Lout)):
        if empty(j):
            return j
    return None


@register("MaxPool", "AveragePool", attrs=("auto_pad", "ceil_mode", "count_include_pad", "dilations",
                                             "kernel_shape", "pads", "storage_order", "strides"))
class Pool(Handler):
    """MaxPool / AveragePool over the length axis of (N, C, L), or of tf2onnx's (N, C, 1, L)
    / (N, C, L, 1) forms of Keras MaxPooling1D / AveragePooling1D (as_1d); float32.

    Semantics, as onnxruntime 1.32 computes them: windows of K taps, `dilations` apart,
    `strides` apart, over the input padded by `pads` / `auto_pad` (each pad < K, as
    onnxruntime requires); ceil_mode adds a last window that hangs past the padded input
    unless it would start in the right padding. Average: the float32 sum of the window's
    input taps in order, divided by their number (count_include_pad=0) or by the number of
    taps inside the padded input (count_include_pad=1). Max: the largest input tap; a NaN
    among them gives NaN, as in PyTorch and the ONNX reference, where onnxruntime skips NaN
    and gives -3.4e38 for a window of -inf (README, "Accuracy"). The second output of
    MaxPool (Indices) and AveragePool with dilations are refused."""

    def kind(self):
        op = self.node["op"]
        if op == "MaxPool":
            if "count_include_pad" in self.attrs:
                self.fail("count_include_pad is an AveragePool attribute")
            if len([o for o in self.node["outputs"] if o]) > 1:
                self.fail("its Indices output is not supported")
            return POOL_MAX
        if "storage_order" in self.attrs:
            self.fail("storage_order is a MaxPool attribute")
        if any(int(v) != 1 for v in (self.attr("dilations") or [])):
            self.fail(f"dilations {list(self.attr('dilations'))} of an average are not supported")
        return POOL_AVG_INCLUDE if self.flag("count_include_pad", 0) else POOL_AVG_EXCLUDE

    def as_1d(self, xshape, _w=None, prefer=None):
        """A pool over (N, C, 1, L) with a kernel [1, K] (tf2onnx's Keras 3 pooling), or over
        (N, C, L, 1) with a kernel [K, 1] (Keras 2): the same handler over (N, C, L), with
        `long_axis` 3 or 2, the axis of L. The unit axis must have a kernel, stride and
        dilation of 1 and no padding; when both axes qualify (a chunk of one step through a
        kernel [1, 1]) the axis `prefer` (a stream's time axis), else 3."""
        ks = self.attr("kernel_shape")
        if len(xshape) != 4 or ks is None or len(ks) != 2:
            return None
        st, dl, pads = self.attr("strides") or [1, 1], self.attr("dilations") or [1, 1], self.attr("pads") or [0, 0, 0, 0]
        if len(st) != 2 or len(dl) != 2 or len(pads) != 4:
            self.fail(f"strides {list(st)}, dilations {list(dl)} and pads {list(pads)} do not fit a 2-D kernel")

        def unit(axis):  # axis (2 or 3) of the input is a unit axis the pool leaves alone
            i = axis - 2
            return xshape[axis] == 1 and int(ks[i]) == 1 and int(st[i]) == 1 and int(dl[i]) == 1 and \
                int(pads[i]) == 0 and int(pads[2 + i]) == 0
        options = [la for la in (3, 2) if unit(5 - la)]
        if not options:
            return None
        la = prefer if prefer in options else options[0]
        k = la - 2  # the attributes' position of L
        a = dict(self.attrs)
        a["kernel_shape"] = [int(ks[k])]
        for name in ("strides", "dilations"):
            if a.get(name) is not None:
                a[name] = [int(a[name][k])]
        if a.get("pads") is not None:
            a["pads"] = [int(pads[k]), int(pads[2 + k])]
        flat = type(self)(dict(self.node, attrs=a), self.opset)
        flat.long_axis = la
        return flat

    def geometry(self, xshape):
        """(N, C, L, K, Lout, stride, dilation, pad_left, pad_right, ceil) of the pool."""
        ks = self.attr("kernel_shape")
        if len(xshape) != 3 or ks is None or len(ks) != 1:
            self.fail(f"only 1-D pooling is supported: over (N, C, L), or over (N, C, 1, L) / (N, C, L, 1) whose unit "
                      f"axis has kernel, stride and dilation 1 and no padding; got input {list(xshape)}, "
                      f"kernel_shape {None if ks is None else list(ks)}")
        N, C, L = (int(v) for v in xshape)
        K = int(ks[0])
        if K < 1:
            self.fail(f"kernel_shape {list(ks)} must be >= 1")
        ceil = bool(self.flag("ceil_mode", 0))
        s, d, pl, pr, Lout = window_1d(self, L, K, ceil, pool=True)
        if pl >= K or pr >= K:
            self.fail(f"pads {[pl, pr]} must be smaller than the kernel {K} (onnxruntime refuses them)")
        self.check_partial(L + pl + pr, d * (K - 1) + 1, s)
        return N, C, L, K, Lout, s, d, pl, pr, ceil

    def check_partial(self, padded, span, s):
        """onnxruntime pools an input (with its padding) shorter than one window, by less than
        a stride, as one window of the steps there are (refused here), and refuses one
        shorter by more than that, up to an exact multiple of the stride (no window)."""
        room = padded - span
        if span - s < padded < span:
            self.fail(f"its input, {padded} steps with padding, is shorter than one window of {span} steps "
                      "(onnxruntime pools them as one partial window; not supported)")
        if room < 0 and -((-room) // s) + 1 < 0:
            self.fail(f"its input, {padded} steps with padding, is too short for a window of {span} steps")

    def check_windows(self, Lout, K, s, d, off, lo, hi):
        j = first_empty_window(Lout, K, s, d, off, lo, hi)
        if j is not None:
            self.fail(f"window {j} holds only padding (dilation {d} steps over the {hi - lo} input steps): "
                      "onnxruntime gives -3.4e38 or NaN there; refused")

    def eval(self, xs):
        flat = self.as_1d(np.shape(xs[0]))
        if flat is not None:
            x = np.asarray(xs[0])
            y = flat.eval([x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])])[0]
            return [y.reshape(unflatten_shape(y.shape, flat.long_axis))]
        x = np.asarray(xs[0])
        if x.dtype != np.float32:
            self.fail(f"pools float32 tensors, got {x.dtype}")
        kind = self.kind()
        N, C, L, K, Lout, s, d, pl, pr, _ = self.geometry(x.shape)
        self.check_windows(Lout, K, s, d, pl, 0, L)
        out = np.empty((N, C, Lout), np.float32)
        for j in range(Lout):  # each window's input taps only (a kernel of 1e11 may hold one)
            p0 = j * s - pl
            k0, k1 = taps_within(p0, d, K, 0, L)
            w = x[:, :, p0 + k0 * d: p0 + (k1 - 1) * d + 1: d] if k1 > k0 else np.zeros((N, C, 0), np.float32)
            acc = np.full((N, C), -np.inf if kind == POOL_MAX else 0.0, np.float32)
            for k in range(w.shape[2]):  # in tap order: the float32 sum's rounding, a NaN kept by max
                v = w[:, :, k]
                acc = np.where((v > acc) | np.isnan(v), v, acc) if kind == POOL_MAX else (acc + v).astype(np.float32)
            if kind != POOL_MAX:
                c0, c1 = taps_within(p0, d, K, -pl, L + pr) if kind == POOL_AVG_INCLUDE else (k0, k1)
                with np.errstate(invalid="ignore", divide="ignore"):
                    acc = acc / np.float32(c1 - c0)
            out[:, :, j] = acc
        return [out]

    def emit(self, p, xs):
        flat = self.as_1d(xs[0].shape)
        if flat is not None:
            y = flat.emit(p, flatten_conv_inputs(p, xs[:1]))[0]
            return [p.alias(y, unflatten_shape(y.shape, flat.long_axis))]
        x = xs[0]
        kind = self.kind()
        if x.dtype != np.float32:
            self.fail(f"needs a float32 input at run time, got {x.dtype}")
        N, C, L, K, Lout, s, d, pl, pr, _ = self.geometry(x.shape)
        out = p.new((N, C, Lout), np.float32)
        emit_pool1d(p, self, x, out, kind, [N * C, L, Lout, K, s, d, pl, 0, L, -pl, L + pr])
        return [out]


def emit_pool1d(p: Any, h: Pool, x: Any, out: Any, kind: int, g: list[int]) -> None:
    """RNN_OP_POOL1D over x (rows, L) into out (rows, Lout); g is [rows, L, Lout, K, stride,
    dilation, off, lo, hi, cnt_lo, cnt_hi] (src_c/graph.c), each window checked to hold an
    input step."""
    rows, L, Lout, K, s, d, off, lo, hi, cnt_lo, cnt_hi = g
    h.check_windows(Lout, K, s, d, off, lo, hi)
    if rows * Lout:
        p.emit(OP_POOL1D, [x], [out], [rows, L, Lout, K, s, d, off, lo, hi, kind, cnt_lo, cnt_hi])


@register("Pad", attrs=("mode", "pads", "value"))
class Pad(Handler):
    def params(self, shape, xs):
        nd = len(shape)
        mode = self.attr("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if self.opset < 11:
            pads, value = list(self.attr("pads")), float(self.attr("value", 0.0))
            axes = list(range(nd))
        else:
            def val(k):
                return optional_const(self, xs, k, "pads, constant_value and axes")

            def ints(k, what):
                v = val(k)
                if v is not None and v.dtype.kind not in "iu" and v.size:  # ONNX types them int64 (NaN: ValueError)
                    self.fail(f"its {what} input must hold integers, got {v.dtype}")
                return v
            if ints(1, "pads") is None:
                self.fail("needs its pads input")
            pads = [int(v) for v in ints(1, "pads").reshape(-1)]
            cv = val(2)
            value = 0.0 if cv is None or cv.size == 0 else cv.reshape(-1)[0]  # in its own type: int64 exactly
            ax = ints(3, "axes")
            axes = list(range(nd)) if ax is None else [axis_of(self, a, nd) for a in ax.reshape(-1)]
        if len(pads) != 2 * len(axes):
            self.fail(f"pads {pads} do not match {len(axes)} axes")
        begin, end = [0] * nd, [0] * nd
        for i, a in enumerate(axes):
            begin[a], end[a] = pads[i], pads[i + len(axes)]
        if mode not in ("constant", "reflect", "edge", "wrap"):
            self.fail(f"mode {mode!r} is not supported")
        if mode == "wrap" and any((b < 0 < e) or (e < 0 < b) for b, e in zip(begin, end)):
            # onnxruntime wraps around the cropped axis, the ONNX reference refuses such pads
            self.fail(f"mode 'wrap' with pads that crop one end and extend the other ({pads}): "
                      "onnxruntime and the ONNX reference disagree")
        return mode, begin, end, value

    @staticmethod
    def index_map(n, b, e, mode):
        """For each output position along one axis: the input index, or -1 (constant)."""
        out = []
        for o in range(n + b + e):
            i = o - b
            if 0 <= i < n:
                out.append(i)
            elif mode == "constant" or n == 0:
                out.append(-1)
            elif mode == "edge":
                out.append(min(max(i, 0), n - 1))
            elif mode == "wrap":
                out.append(i % n)
            else:  # reflect, without repeating the edge
                if n == 1:
                    out.append(0)
                    continue
                period = 2 * (n - 1)
                i = i % period
                out.append(i if i < n else period - i)
        return out

    def check(self, shape, mode, begin, end):
        for d, (n, b, e) in enumerate(zip(shape, begin, end)):
            if n + b + e < 0:
                self.fail(f"pads remove more than axis {d} holds")
            if mode == "reflect" and (b >= n or e >= n) and (b > 0 or e > 0):
                self.fail(f"reflect padding of {max(b, e)} needs more than {n} elements on axis {d}")

    def eval(self, xs):
        x = xs[0]
        mode, begin, end, value = self.params(x.shape, xs)
        self.check(x.shape, mode, begin, end)
        maps = [np.array(self.index_map(n, b, e, mode), np.int64) for n, b, e in zip(x.shape, begin, end)]
        out = np.full([len(m) for m in maps], value, dtype=x.dtype)
        if all(len(m) for m in maps):
            grids = np.ix_(*[np.maximum(m, 0) for m in maps])
            inside = np.ones(out.shape, bool)
            for d, m in enumerate(maps):
                sh = [1] * x.ndim
                sh[d] = len(m)
                inside &= (m >= 0).reshape(sh)
            out = np.where(inside, x[grids], out)
        return [out]

    def emit(self, p, xs):
        x = xs[0]
        mode, begin, end, value = self.params(x.shape, xs)
        self.check(x.shape, mode, begin, end)
        return [self.emit_padded(p, x, mode, begin, end, value)]

    def emit_padded(self, p, x, mode, begin, end, value):
        """Plans x padded by begin / end steps per axis (also used by streams, which pad along
        time only at the sequence's ends)."""
        maps = [self.index_map(n, b, e, mode) for n, b, e in zip(x.shape, begin, end)]
        shape = tuple(len(m) for m in maps)
        out = p.new(shape, x.dtype)
        if not int(np.prod(shape)):
            return out
        nd = len(shape)
        head = 3 + 3 * nd
        starts, pos = [], head
        for m in maps:
            starts.append(pos)
            pos += len(m)
        # the fill element's bytes, as the low bytes of an int64 (float32 by its bit pattern,
        # integers exactly, bool as 0 / 1)
        es = x.dtype.itemsize
        fill = cast_array(np.asarray(value), x.dtype).reshape(1)
        fill = int(fill.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.int64}[es])[0])
        ip = [es, nd] + list(shape) + contiguous_strides(x.shape) + starts + [fill]
        for m in maps:
            ip += m
        p.emit(OP_PAD, [x], [out], ip)
        return out


REDUCE = {"ReduceSum": REDUCE_SUM, "ReduceMean": REDUCE_MEAN, "ReduceMax": REDUCE_MAX, "ReduceMin": REDUCE_MIN,
          "ReduceProd": REDUCE_PROD}


@register(*REDUCE, attrs=("axes", "keepdims", "noop_with_empty_axes"))
class Reduce(Handler):
    def axes(self, shape, xs):
        axes = _axes(self, xs, 1)
        nd = len(shape)
        if not axes:
            if self.flag("noop_with_empty_axes", 0):
                return []
            return list(range(nd))
        return sorted({axis_of(self, a, nd) for a in axes})

    def eval(self, xs):
        x = xs[0]
        axes = self.axes(x.shape, xs)
        if not axes:
            return [x]
        op = self.node["op"]
        keep = self.flag("keepdims", 1)
        count = int(np.prod([x.shape[a] for a in axes]))
        if x.dtype.kind in "iu" and op in ("ReduceSum", "ReduceMean", "ReduceProd"):
            # exactly (Python integers), refused when the result leaves the type, as the C
            # kernel does (onnxruntime saturates some and widens a mean); a mean truncates toward 0
            exact = (np.prod if op == "ReduceProd" else np.sum)(x.astype(object), axis=tuple(axes), keepdims=keep)
            exact = np.asarray(exact, dtype=object)
            info = np.iinfo(x.dtype)
            if exact.size and (min(exact.flat) < info.min or max(exact.flat) > info.max):
                self.fail(f"the integer {op[6:].lower()} overflows {x.dtype}")
            total = exact.astype(x.dtype)
            if op == "ReduceMean":
                return [int_divmod(self, total, np.array(count, x.dtype), "div") if count else total]
            return [total]
        if op == "ReduceMean" and count == 0:  # the kernel's (and onnxruntime's) 0, not NumPy's NaN
            return [np.zeros(np.sum(x, axis=tuple(axes), keepdims=keep).shape, x.dtype)]
        fn = {"ReduceSum": np.sum, "ReduceMean": np.mean, "ReduceMax": np.max, "ReduceMin": np.min,
              "ReduceProd": np.prod}[op]
        return [fn(x, axis=tuple(axes), keepdims=keep).astype(x.dtype)]

    def emit(self, p, xs):
        x = xs[0]
        if x.dtype != np.float32 and x.dtype not in INT_TYPES:
            self.fail(f"needs float32, int64 or int32 at run time, got {x.dtype}")
        axes = self.axes(x.shape, xs)
        if not axes:
            return [x]
        keep = self.flag("keepdims", 1)
        kept = [1 if i in axes else d for i, d in enumerate(x.shape)]
        shape = tuple(kept) if keep else tuple(d for i, d in enumerate(x.shape) if i not in axes)
        kst = contiguous_strides(kept)
        ostr = [0 if i in axes else kst[i] for i in range(len(x.shape))]
        count = int(np.prod([x.shape[a] for a in axes]))
        if len(x.shape) > 8:
            self.fail("rank > 8")
        out = p.new(shape, x.dtype)
        ip = [REDUCE[self.node["op"]], len(x.shape)] + list(x.shape) + ostr + [int(np.prod(shape)), count]
        if x.dtype == np.float32:
            p.emit(OP_REDUCE, [x], [out], ip)
        else:  # integers: an overflowing sum or product is refused when it runs; a mean truncates toward 0
            p.emit(OP_TREDUCE, [x], [out], [TENSOR_DTYPES[x.dtype]] + ip)
        return [out]


@register("GlobalAveragePool")
class GlobalPool(Handler):
    """The mean over every axis after (N, C), kept as 1s: ReduceMean over axes 2.. . tf2onnx
    writes it for a mean over the last axis (Keras 3 LayerNormalization's moments, after a
    transpose). float32 only. (GlobalMaxPool is not taken: onnxruntime's max skips a NaN or
    not depending on where it sits, where ReduceMax propagates it.)"""

    def reduce(self, x):
        if len(x.shape) < 3:
            self.fail(f"needs (N, C, spatial...) of rank 3 or more, got shape {tuple(x.shape)}")
        if x.dtype != np.float32:
            self.fail(f"needs a float32 input, got {x.dtype}")
        if any(d == 0 for d in x.shape[2:]):
            self.fail(f"pools over an empty spatial axis (shape {tuple(x.shape)})")
        return Reduce({**self.node, "op": "ReduceMean", "attrs": {"axes": list(range(2, len(x.shape))), "keepdims": 1}}, 13)

    def eval(self, xs):
        return self.reduce(xs[0]).eval(xs[:1])

    def emit(self, p, xs):
        return self.reduce(xs[0]).emit(p, xs[:1])


@register("ReduceSumSquare", "ReduceL1", "ReduceL2", attrs=("axes", "keepdims", "noop_with_empty_axes"))
class ReduceNorm(Handler):
    """ReduceSumSquare = ReduceSum(x * x), ReduceL1 = ReduceSum(|x|), ReduceL2 =
    sqrt(ReduceSum(x * x)): each element rounded once, then the float32 ReduceSum (F.normalize,
    Keras 2 LayerNormalization). float32 only."""

    def sum(self):
        return Reduce({**self.node, "op": "ReduceSum"}, self.opset)  # (axes from the attribute or input 1)

    def check(self, x):
        if x.dtype != np.float32:
            self.fail(f"needs a float32 input, got {x.dtype}")

    def axes(self, shape, xs):  # (the stream and thread-split rules ask every reduction)
        return self.sum().axes(shape, xs)

    def eval(self, xs):
        x = xs[0]
        self.check(x)
        op = self.node["op"]
        inner = np.abs(x) if op == "ReduceL1" else (x * x).astype(np.float32)
        total = self.sum().eval([inner] + list(xs[1:]))[0]
        return [np.sqrt(total).astype(np.float32) if op == "ReduceL2" else total]

    def emit(self, p, xs):
        x = xs[0]
        self.check(x)
        op = self.node["op"]
        if op == "ReduceL1":
            inner = Unary({**self.node, "op": "Abs", "attrs": {}}, 13).emit(p, [x])[0]
        else:
            inner = emit_binary(self, p, "Mul", x, x)
        total = self.sum().emit(p, [inner] + list(xs[1:]))[0]
        if op == "ReduceL2":
            total = Unary({**self.node, "op": "Sqrt", "attrs": {}}, 13).emit(p, [total])[0]
        return [total]


@register("InstanceNormalization", attrs=("epsilon",))
class InstanceNormalization(Handler):
    """(N, C, spatial...): each (n, c) normalised over its spatial axes, then scale[c] and
    B[c]: the LayerNormalization kernel over axes 2.. (mean a correctly rounded float32
    value, variance in a second pass) and the per-channel affine map by broadcast. Written by
    both PyTorch exporters for nn.InstanceNorm1d and nn.GroupNorm. float32 only."""

    def parts(self, xs):
        x = xs[0]
        if len(x.shape) < 3:
            self.fail(f"needs (N, C, spatial...) of rank 3 or more, got shape {tuple(x.shape)}")
        C = x.shape[1]
        for k, what in ((1, "scale"), (2, "B")):
            v = xs[k] if len(xs) > k else None
            if v is None:
                self.fail(f"input {what} is required")
            if v.dtype != np.float32 or tuple(v.shape) != (C,):
                self.fail(f"{what} must be float32 of shape ({C},), got {v.dtype} of shape {tuple(v.shape)}")
        if x.dtype != np.float32:
            self.fail(f"X must be float32, got {x.dtype}")
        ln = LayerNormalization({**self.node, "op": "LayerNormalization", "outputs": self.node["outputs"][:1],
                                 "attrs": {"axis": 2, "epsilon": self.attr("epsilon", 1e-5)}}, 17)
        tail = (1,) * (len(x.shape) - 2)
        return ln, (C,) + tail

    def eval(self, xs):
        ln, shape = self.parts(xs)
        z = ln.eval([xs[0], np.ones(xs[0].shape[2:], np.float32)])[0]
        y = (z * xs[1].reshape(shape)).astype(np.float32)
        return [(y + xs[2].reshape(shape)).astype(np.float32)]

    def emit(self, p, xs):
        ln, shape = self.parts(xs)
        z = ln.emit(p, [xs[0], p.const(np.ones(xs[0].shape[2:], np.float32))])[0]
        scale = p.alias(xs[1], shape) if xs[1].const is None else p.const(np.asarray(xs[1].const).reshape(shape))
        bias = p.alias(xs[2], shape) if xs[2].const is None else p.const(np.asarray(xs[2].const).reshape(shape))
        y = emit_binary(self, p, "Mul", z, scale)
        return [emit_binary(self, p, "Add", y, bias)]


@register("ArgMax", "ArgMin", attrs=("axis", "keepdims", "select_last_index"))
class ArgMax(Handler):
    """onnxruntime's scan: the best position starts at 0 and moves to a strictly greater
    (ArgMin: smaller) value, or greater-or-equal with select_last_index; so a NaN at
    position 0 wins and any later NaN is passed over."""

    def geometry(self, shape):
        a = axis_of(self, self.attr("axis", 0), len(shape))
        if shape[a] == 0:
            self.fail(f"axis {a} is empty: no position to return")
        keep = self.flag("keepdims", 1)
        out = tuple(1 if i == a else d for i, d in enumerate(shape)) if keep else \
            tuple(d for i, d in enumerate(shape) if i != a)
        return a, out

    def eval(self, xs):
        x = xs[0]
        a, out_shape = self.geometry(x.shape)
        is_min, last = self.node["op"] == "ArgMin", self.flag("select_last_index", 0)
        best = np.take(x, 0, axis=a)
        at = np.zeros(best.shape, np.int64)
        with np.errstate(invalid="ignore"):
            for i in range(1, x.shape[a]):
                v = np.take(x, i, axis=a)
                if is_min:
                    better = v <= best if last else v < best
                else:
                    better = v >= best if last else v > best
                best = np.where(better, v, best)
                at = np.where(better, i, at)
        return [at.reshape(out_shape)]

    def emit(self, p, xs):
        x = xs[0]
        if x.dtype not in TENSOR_DTYPES or x.dtype == np.bool_:
            self.fail(f"{x.dtype} is not supported at run time (float32, int64, int32, uint8)")
        a, out_shape = self.geometry(x.shape)
        out = p.new(out_shape, np.int64)
        p.emit(OP_ARGMAX, [x], [out], [TENSOR_DTYPES[x.dtype], int(np.prod(x.shape[:a])), x.shape[a],
                                       int(np.prod(x.shape[a + 1:])), int(self.node["op"] == "ArgMin"),
                                       int(self.flag("select_last_index", 0))])
        return [out]


@register("CumSum", attrs=("exclusive", "reverse"))
class CumSum(Handler):
    """Running sums along a constant axis, in the element type (integers wrap), added in
    order from the first element of the scan (the last with reverse)."""

    def axis(self, x, xs):
        v = xs[1].const if hasattr(xs[1], "const") else xs[1]
        if v is None:
            self.fail("the axis must be a constant")
        v = np.asarray(v)
        if v.size != 1 or v.dtype.kind not in "iu":
            self.fail(f"the axis must be one integer, got {v.dtype} {v.shape}")
        return axis_of(self, int(v.reshape(-1)[0]), len(x.shape))

    def eval(self, xs):
        x = xs[0]
        a = self.axis(x, xs)
        rev, excl = self.flag("reverse", 0), self.flag("exclusive", 0)
        v = np.flip(x, a) if rev else x
        with np.errstate(all="ignore"):
            c = np.cumsum(v, axis=a, dtype=x.dtype)
        if excl:
            c = np.concatenate([np.zeros_like(np.take(c, [0], axis=a)), np.take(c, range(c.shape[a] - 1), axis=a)],
                               axis=a) if c.shape[a] else c
        return [np.ascontiguousarray(np.flip(c, a) if rev else c)]

    def emit(self, p, xs):
        x = xs[0]
        a = self.axis(x, xs)
        if x.dtype != np.float32 and x.dtype not in INT_TYPES:
            self.fail(f"{x.dtype} is not supported at run time (float32, int64, int32)")
        out = p.new(x.shape, x.dtype)
        p.emit(OP_CUMSUM, [x], [out], [TENSOR_DTYPES[x.dtype], int(np.prod(x.shape[:a])), x.shape[a],
                                       int(np.prod(x.shape[a + 1:])), int(self.flag("exclusive", 0)),
                                       int(self.flag("reverse", 0))])
        return [out]


@register("ReverseSequence", attrs=("batch_axis", "time_axis"))
class ReverseSequence(Handler):
    """Reverses the first sequence_lens[b] steps of each batch row b (the rest stay), as
    Keras 3 Bidirectional layers export their backward direction."""

    def geometry(self, x, lens):
        ta, ba = int(self.attr("time_axis", 0)), int(self.attr("batch_axis", 1))
        if {ta, ba} != {0, 1}:
            self.fail(f"time_axis {ta} and batch_axis {ba} must be 0 and 1")
        if len(x.shape) < 2:
            self.fail(f"the input must have rank >= 2, got shape {tuple(x.shape)}")
        T, B = x.shape[ta], x.shape[ba]
        if tuple(lens.shape) != (B,) or lens.dtype != np.int64:
            self.fail(f"sequence_lens must be int64 ({B},), got {lens.dtype} {tuple(lens.shape)}")
        return ta, T, B

    def eval(self, xs):
        x, lens = xs
        ta, T, B = self.geometry(x, lens)
        if lens.size and (lens.min() < 0 or lens.max() > T):
            self.fail(f"sequence_lens {lens.tolist()} must lie in [0, T = {T}]")
        out = np.array(x, copy=True)
        for b in range(B):
            n = int(lens[b])
            if ta == 0:
                out[:n, b] = x[:n, b][::-1]
            else:
                out[b, :n] = x[b, :n][::-1]
        return [out]

    def emit(self, p, xs):
        x, lens = xs
        ta, T, B = self.geometry(x, lens)
        if getattr(p, "streaming", False):
            raise NotStreamableError(self.node, "it reverses each sequence as a whole, which chunk-by-chunk "
                                                "calls cannot reproduce")
        if lens.const is not None:
            lv = np.asarray(lens.const)
            if lv.size and (lv.min() < 0 or lv.max() > T):
                self.fail(f"sequence_lens {lv.tolist()} must lie in [0, T = {T}]")
        out = p.new(x.shape, x.dtype)
        p.emit(OP_REVSEQ, [x, lens], [out], [x.dtype.itemsize, T, B, int(np.prod(x.shape[2:])), int(ta == 0)])
        return [out]


# --- recurrent layers ----------------------------------------------------------------------

@register(*RECURRENT_OPS, attrs=RECURRENT_ATTRS)
class Recurrent(Handler):
    """ONNX LSTM / GRU / RNN. The weights must be constants; the layer becomes a one-layer
    rnn_stack packed once per model (see graph.Planner.stack)."""
    PRIVATE_ATTRS = frozenset({STATELESS, STEP_MASK, KERAS_LOOP})

    def allowed_attrs(self):
        allowed = set(recurrent_attrs(self.node["op"]))
        if self.opset < 14:
            allowed.discard("layout")
        return allowed

    def layer(self, consts):
        extra = sorted(set(self.attrs) - set(self.allowed_attrs()) - self.PRIVATE_ATTRS)
        if extra:
            self.fail(f"attribute(s) {extra} not supported (known: {sorted(self.allowed_attrs())})")
        attrs = {k: v for k, v in self.attrs.items() if k not in (STEP_MASK, KERAS_LOOP)}
        try:
            layer = layer_from_onnx(self.node["op"], attrs, consts["W"], consts["R"], consts.get("B"),
                                    consts.get("P"), name=self.node.get("name") or None)
        except (ValueError, TypeError) as e:
            raise UnsupportedError(f"{where(self.node)}: {e}") from None
        layer.step_mask = int(self.attrs.get(STEP_MASK) or 0)
        if layer.step_mask not in (0, 1, 2):
            self.fail(f"{STEP_MASK} must be 1 or 2, got {layer.step_mask}")
        return layer

    def with_step_mask(self, p, x, mask, T, B, I):
        """X (T, B, I) and the step mask (T, B, 1) as the rows the C cell reads with a step
        mask: (T, B, I + 1), the mask (1.0 / 0.0) last (see rnn_cell_config.step_mask)."""
        if mask is None:
            self.fail("a step-masked layer needs its mask input")
        if tuple(mask.shape) != (T, B, 1) or mask.dtype not in TENSOR_DTYPES:
            self.fail(f"the step mask must be ({T}, {B}, 1) bool (the shape the converter proved the "
                      f"loop for), got {mask.dtype} {mask.shape}")
        if mask.const is not None:
            mf = p.const(np.ascontiguousarray((np.asarray(mask.const) != 0).astype(np.float32).reshape(T, B)))
        elif mask.dtype != np.float32:
            mf = p.new((T, B), np.float32)
            p.emit(OP_CAST, [mask], [mf], [TENSOR_DTYPES[mask.dtype], DT_F32, T * B])
        else:
            mf = mask
        xm = p.new((T, B, I + 1), np.float32)
        row = [B * (I + 1), I + 1]
        emit_copy(p, x, xm, (T, B, I), contiguous_strides((T, B, I)), row + [1])
        emit_copy(p, mf, xm, (T, B), [B, 1], row, dst_off=I)
        return xm

    def emit(self, p, xs):
        kind = self.node["op"]
        slots = dict(zip(RECURRENT_INPUTS, list(xs) + [None] * 8))
        consts = {}
        for w in ("W", "R", "B", "P"):
            if slots[w] is not None:
                consts[w] = const_input(self, slots[w], w)
        if "W" not in consts or "R" not in consts:
            self.fail("the weights W and R are required")
        layer, stack = p.stack(self, consts)
        D, H, I = layer.num_directions, layer.hidden_size, layer.input_size
        x = slots["X"]
        if x.dtype != np.float32 or len(x.shape) != 3 or x.shape[2] != I:
            self.fail(f"X must be float32 ({'B, T' if layer.layout else 'T, B'}, {I}), got {x.dtype} {x.shape}")
        B, T = (x.shape[0], x.shape[1]) if layer.layout else (x.shape[1], x.shape[0])
        if self.attrs.get(KERAS_LOOP) and T == 0 and not p.streaming:
            self.fail("the Keras loop this layer replaces runs 0 times here (T = 0): such a Loop has no "
                      "defined output shape (onnxruntime answers (0, 0, H) or fails); feed at least one step")
        if x.const is not None:
            x = p.materialize(x)
        if self.attrs.get(STEP_MASK):
            # what the converter makes of Keras loops; other combinations are not tested
            if layer.layout or layer.direction != "forward" or slots["sequence_lens"] is not None:
                self.fail("a step mask is supported on forward layers of layout 0 without sequence_lens only")
            x = self.with_step_mask(p, x, xs[8] if len(xs) > 8 else None, T, B, I)
        lens = slots["sequence_lens"]
        if lens is not None:
            # int32, the operator's type T1 (onnxruntime refuses others): an int64 length cast
            # down could wrap (2**32 + 2 run as 2)
            if lens.shape != (B,) or lens.dtype != np.int32:
                self.fail(f"sequence_lens must be int32 ({B},), got {lens.dtype} {lens.shape}")
            if lens.const is not None:
                lv = lens.const.astype(np.int64)
                if lv.size and (lv.min() < 0 or lv.max() > T):
                    self.fail(f"sequence_lens {lv.tolist()} must lie in [0, T = {T}]")
                lens = p.const(lv.astype(np.int32))
        has_c = kind == "LSTM"
        sshape = (D, B, H)
        inits = [slots["initial_h"], slots["initial_c"] if has_c else None]
        for k, v in enumerate(inits):
            if v is None:
                continue
            want = (B, D, H) if layer.layout else (D, B, H)
            if v.shape != want or v.dtype != np.float32:
                self.fail(f"{('initial_h', 'initial_c')[k]} must be float32 {want}, got {v.dtype} {v.shape}")
        runtime_init = any(v is not None and v.const is None for v in inits)
        state_floats = int(np.prod(sshape)) * (2 if has_c else 1)
        key = self.node["outputs"][0] or self.node.get("name")
        if p.streaming and not runtime_init and not self.attrs.get(STATELESS):
            # The stream holds this layer's state: it starts from the constant initial state
            # (or zeros) and carries on from call to call.
            if layer.direction != "forward":
                self.fail(f"direction {layer.direction!r} needs the whole sequence, so it cannot be "
                          "streamed (run the model on whole sequences instead)")
            start = np.zeros((2 if has_c else 1,) + sshape, np.float32)
            for k, v in enumerate(inits):
                if v is not None:
                    c = np.asarray(v.const, np.float32)
                    start[k] = c.transpose(1, 0, 2) if layer.layout else c
            state = p.stream_state(key, start.reshape(-1), [sshape] * (2 if has_c else 1))
            mode, init_ins = 1, [None, None]
        else:
            state = p.new((state_floats,), np.float32)
            init_ins = []
            for v in inits:
                if v is not None and layer.layout:
                    if v.const is not None:
                        v = p.const(np.ascontiguousarray(np.asarray(v.const, np.float32).transpose(1, 0, 2)))
                    else:
                        t = p.new(sshape, np.float32)
                        emit_copy(p, v, t, sshape, [H, D * H, 1], contiguous_strides(sshape))
                        v = t
                init_ins.append(v)
            mode = 2 if any(v is not None for v in init_ins) else 0
        yshape = (B, T, D, H) if layer.layout else (T, D, B, H)
        hshape = (B, D, H) if layer.layout else (D, B, H)
        Y = p.new(yshape, np.float32)
        Yh = p.new(hshape, np.float32)
        Yc = p.new(hshape, np.float32) if has_c else None
        p.need_work(stack.workspace_size(T, B))
        p.recurrent.append({"node": self.node.get("name") or key, "T": T, "B": B, "direction": layer.direction,
                            "kind": kind, "explicit_state": runtime_init})
        started = -1
        if p.streaming and lens is not None and not self.attrs.get(STATELESS):
            # per row, whether it has had a step in an earlier call: a row at length 0 then ended
            # its sequence there (its Y_h / Y_c: the state carried on), else its sequence is empty
            # (0, as in a whole run). Kept by the stream beside the layer's state.
            started = p.tid(p.stream_state(f"{key}:started", np.zeros(B, np.float32), [(B,)]))
        p.emit(OP_RECURRENT, [x, lens, init_ins[0], init_ins[1]], [Y, Yh, Yc],
               [T, B, layer.layout, D, H, int(has_c), p.tid(state), mode, started], aux=p.stack_index(stack))
        return [Y, Yh] + ([Yc] if has_c else [])
