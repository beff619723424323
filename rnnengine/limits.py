"""limits.py - the resource limits a model must stay within while it is read, converted and
planned (tensor sizes, plan memory, unrolled loops, weight-file metadata, planning time), in
one place, with the checks that refuse a model past one of them by name.

Every limit has a default (``Limits()``); change them for one call with
``rnnengine.convert(path, limits=rnnengine.Limits(max_tensor_elements=2**30))`` or
``rnnengine.load(path, limits=...)`` (the model keeps them for its later planning), or for
the whole process with ``rnnengine.limits.set_defaults(max_plan_bytes=8 << 30)``.

Sizes are checked before anything is allocated, with Python integers (no overflow).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from rnnengine.errors import LimitError, UnsupportedError, where  # noqa: F401 (LimitError re-exported)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of reading, converting and planning a model. Every field is a bound
    that a hand-made or damaged model could otherwise push into gigabytes or hours."""
    max_tensor_elements: int = 1 << 28       # elements of any one tensor folded or allocated
    max_plan_bytes: int = 4 << 30            # bytes one conversion or one plan may fold + allocate
    max_loop_nodes: int = 1_000_000          # nodes unrolled in a plan: Loop bodies (nested too), sequence elements
    max_metadata_bytes: int = 64 << 20       # a weight file's JSON block, decompressed and parsed
    max_planning_seconds: float = 60.0       # wall time of one conversion's folding or one plan

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or \
                    (f.type == "int" and not isinstance(v, int)):
                raise ValueError(f"Limits.{f.name} must be a positive {'number' if f.type == 'float' else 'integer'}, "
                                 f"got {v!r}")


_defaults = Limits()
_active: contextvars.ContextVar[Limits | None] = contextvars.ContextVar("rnnengine_limits", default=None)


def defaults() -> Limits:
    """The process-wide defaults (what a call without ``limits=`` uses)."""
    return _defaults


def set_defaults(limits: Limits | None = None, **changes: Any) -> Limits:
    """Sets the process-wide defaults: a whole Limits, or some fields changed
    (``set_defaults(max_tensor_elements=2**30)``). Returns the previous defaults, so
    ``set_defaults(old)`` restores them."""
    global _defaults
    old = _defaults
    base = old if limits is None else limits
    if not isinstance(base, Limits):
        raise TypeError(f"limits must be a rnnengine.Limits, got {type(base).__name__}")
    _defaults = dataclasses.replace(base, **changes) if changes else base
    return old


def resolve(limits: Limits | None = None) -> Limits:
    """The limits in force: the given ones, else those of the enclosing ``using``, else the
    defaults."""
    if limits is not None:
        if not isinstance(limits, Limits):
            raise TypeError(f"limits must be a rnnengine.Limits, got {type(limits).__name__}")
        return limits
    return _active.get() or _defaults


@contextlib.contextmanager
def using(limits: Limits | None) -> Iterator[None]:
    """Makes ``limits`` (None: the defaults at each check) the ones in force inside the block."""
    token = _active.set(resolve(limits) if limits is not None else _active.get())
    try:
        yield
    finally:
        _active.reset(token)


def _how(name: str) -> str:
    return (f"raise it with rnnengine.convert(..., limits=rnnengine.Limits({name}=...)), "
            f"rnnengine.load(..., limits=...) or rnnengine.limits.set_defaults({name}=...)")


def refuse(node: dict[str, Any] | str, what: str, name: str, limit: float) -> NoReturn:
    """Raises LimitError: '<op> node '<name>': <what>, more than the limit <name>=<limit>; raise it ...'."""
    label = where(node) if isinstance(node, dict) else str(node)
    raise LimitError(f"{label}: {what}, more than the limit {name}={limit}; {_how(name)}")


def _prod(dims: Iterable[Any]) -> int:
    n = 1
    for d in dims:
        n *= max(0, int(d))
    return n


def _bshape(*shapes: Sequence[Any]) -> Sequence[int]:
    """Broadcast of shapes, permissive (a mismatch takes the larger size; the op itself
    refuses it later): an upper bound of the result's shape."""
    try:
        return np.broadcast_shapes(*shapes)  # the common case, in C
    except (ValueError, RuntimeError):  # RuntimeError: more dimensions than NumPy's iterator takes (32)
        pass
    nd = max((len(s) for s in shapes), default=0)
    out = []
    for k in range(nd):
        ds = [int(s[len(s) - nd + k]) for s in shapes if len(s) - nd + k >= 0]
        out.append(max(ds) if ds else 1)
    return out


_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "Equal", "Less", "Greater",
                 "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Where", "Sum", "Mean", "BitShift"}


class Shaped:
    """A run-time input seen by output_elements: its shape and dtype, no values."""
    __slots__ = ("shape", "dtype")

    def __init__(self, shape: Iterable[int], dtype: npt.DTypeLike) -> None:
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)


_GROWING = _BROADCASTING | {"ConstantOfShape", "Expand", "Tile", "Range", "MatMul", "Gemm", "Gather", "Pad", "Concat",
                            "Conv"}


def output_elements(op: str, attrs: dict[str, Any], xs: Sequence[Any], planning: bool = False) -> int | None:
    """An upper bound of the elements of the largest tensor op computes from the NumPy
    inputs xs (None: absent; Shaped: a run-time input, shape only), for the ops whose output
    can be larger than their inputs; None for the others (their outputs are no larger than
    an input). planning: the op is planned for the C executor (a Conv there gathers no
    patches, so only its output counts)."""
    if op not in _GROWING:
        return None
    # shapes (None: absent); a malformed input raises below and gives no bound
    sh: list[Any] = [None if x is None else np.shape(x) for x in xs]

    def vals(k: int) -> list[int]:  # a shape-like input's values (a run-time one has none: no bound)
        if isinstance(xs[k], Shaped):
            raise TypeError("a run-time value")
        return [int(v) for v in np.asarray(xs[k]).reshape(-1)]
    try:
        if op == "ConstantOfShape":
            return _prod(vals(0))
        if op == "Expand":
            return _prod(_bshape(sh[0], vals(1)))
        if op == "Tile":
            return _prod(int(d) * max(0, r) for d, r in zip(sh[0], vals(1)))
        if op == "Range":
            if any(isinstance(x, Shaped) for x in xs[:3]):
                return None
            start, limit, delta = (float(np.asarray(x).reshape(-1)[0]) for x in xs[:3])
            if delta == 0 or not all(map(math.isfinite, (start, limit, delta))):
                return None  # the handler refuses these itself
            n = (limit - start) / delta
            return max(0, math.ceil(n)) if n < 1e30 else int(1e30)
        if op in _BROADCASTING:
            return _prod(_bshape(*[s for s in sh if s is not None]))
        if op == "MatMul":
            a, b = list(sh[0]), list(sh[1])
            m = a[-2] if len(a) >= 2 else 1
            n = b[-1] if len(b) >= 2 else 1
            return _prod(_bshape(a[:-2], b[:-2])) * int(m) * int(n)
        if op == "Gemm":
            a, b = sh[0], sh[1]
            m = a[-1] if attrs.get("transA", 0) else a[0]
            n = b[0] if attrs.get("transB", 0) else b[-1]
            return _prod(_bshape([m, n], *([sh[2]] if len(sh) > 2 and sh[2] is not None else [])))
        if op == "Gather":
            data, idx = sh[0], sh[1]
            axis = int(attrs.get("axis", 0)) % max(1, len(data))
            return _prod(data[:axis]) * _prod(idx) * _prod(data[axis + 1:])
        if op == "Pad":
            axes = pad_axes(attrs, xs)
            return None if axes is None else _prod(axes)
        if op == "Concat":
            return sum(_prod(s) for s in sh if s is not None)
        if op == "Conv" and not planning:
            x, w = sh[0], sh[1]
            pads = attrs.get("pads") or [0] * (2 * (len(x) - 2))
            span = _prod(int(d) + sum(int(p) for p in pads[k::len(x) - 2]) for k, d in enumerate(x[2:]))
            # the output, and the patches a NumPy convolution gathers (input channels x kernel)
            return int(x[0]) * span * max(int(w[0]), _prod(w[1:]))
    except (TypeError, ValueError, IndexError, OverflowError, ZeroDivisionError):
        return None  # malformed inputs: the handler refuses them with its own message
    return None


PARAM_BYTES = 40  # an instruction parameter while planning: a Python int (28-32 bytes) in a list (8)


def pad_axes(attrs: dict[str, Any], xs: Sequence[Any]) -> list[int] | None:
    """The output length of each axis of a Pad (None when the pads are not known)."""
    try:
        shape = np.shape(xs[0])
        pads = attrs.get("pads")
        if pads is None and len(xs) > 1 and xs[1] is not None and not isinstance(xs[1], Shaped):
            pads = [int(v) for v in np.asarray(xs[1]).reshape(-1)]
        if pads is None or len(pads) != 2 * len(shape):
            return None
        return [max(0, int(d) + int(pads[k]) + int(pads[k + len(shape)])) for k, d in enumerate(shape)]
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _itemsize(node: dict[str, Any], xs: Sequence[Any]) -> int:
    """Bytes per element of the output output_elements bounds: the data input's for ops that
    move data, the fill value's for ConstantOfShape, else the widest input's."""
    def dt(x: Any) -> int:
        return (x.dtype if isinstance(x, (np.ndarray, np.generic, Shaped)) else np.asarray(x).dtype).itemsize
    op = node["op"]
    if op == "ConstantOfShape":
        v = node.get("attrs", {}).get("value")
        return np.asarray(v).dtype.itemsize if v is not None else 4
    if op in ("Pad", "Expand", "Tile", "Gather", "Range", "Concat") and xs and xs[0] is not None:
        return dt(xs[0])
    return max([dt(x) for x in xs if x is not None] + [1])


class Budget:
    """What one conversion or one plan has used of its limits: bytes folded and allocated,
    Loop body nodes unrolled, time since it started."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = resolve(limits)
        self.bytes = 0
        self.loop_nodes = 0
        self.deadline = time.monotonic() + self.limits.max_planning_seconds

    def tick(self, node: dict[str, Any] | str) -> None:
        """The planning time budget; cheap enough to call for every node walked."""
        if time.monotonic() > self.deadline:
            refuse(node, f"planning has taken {self.limits.max_planning_seconds:g} s when it reaches this node",
                   "max_planning_seconds", self.limits.max_planning_seconds)

    def elements(self, node: dict[str, Any] | str, n: int, what: str = "the output") -> None:
        """One tensor of n elements (before it is allocated)."""
        if n > self.limits.max_tensor_elements:
            refuse(node, f"{what} would hold {n} elements", "max_tensor_elements", self.limits.max_tensor_elements)

    def sizes(self, node: dict[str, Any] | str, shape: Sequence[int], what: str) -> None:
        """Every size of a tensor bounded, not only the product: an empty tensor of shape
        (2**63 - 1, 0) holds 0 elements, but NumPy cannot make it, and a Concat of two would
        be 2**64 - 2."""
        bound = _prod(d for d in shape if d > 0)
        if bound > self.limits.max_tensor_elements:
            refuse(node, f"{what} of shape {tuple(shape)} has sizes whose product, without its zero sizes, is "
                         f"{bound}", "max_tensor_elements", self.limits.max_tensor_elements)

    def allocate(self, node: dict[str, Any] | str, nbytes: int, what: str = "allocated") -> None:
        """nbytes more folded or allocated by this plan (before they are)."""
        self.bytes += int(nbytes)
        if self.bytes > self.limits.max_plan_bytes:
            refuse(node, f"the tensors {what} so far would take {self.bytes} bytes", "max_plan_bytes",
                   self.limits.max_plan_bytes)

    def unroll(self, node: dict[str, Any] | str, n: int, what: str = "unrolling the Loops of this graph") -> None:
        """n more nodes unrolled into the plan: a Loop body's (one iteration), or the elements of
        a sequence split from a tensor (one Slice each)."""
        self.loop_nodes += int(n)
        if self.loop_nodes > self.limits.max_loop_nodes:
            refuse(node, f"{what} would bring the nodes unrolled in this plan (Loop bodies, sequence elements) "
                         f"to {self.loop_nodes}", "max_loop_nodes", self.limits.max_loop_nodes)

    def before_eval(self, node: dict[str, Any], xs: Sequence[Any], planning: bool = False) -> None:
        """Refuses folding (or, planning=True, planning) a node whose output would be too
        large, before NumPy or the planner allocates anything for it."""
        n = output_elements(node["op"], node.get("attrs", {}), xs, planning)
        if n is not None:
            self.elements(node, n)
            nbytes = n * _itemsize(node, xs)
            if planning and node["op"] == "Pad":  # its plan holds an index per output position of each axis
                nbytes += PARAM_BYTES * sum(pad_axes(node.get("attrs", {}), xs) or ())
            if self.bytes + nbytes > self.limits.max_plan_bytes:
                refuse(node, f"the tensors folded so far and its output would take {self.bytes + nbytes} "
                             "bytes", "max_plan_bytes", self.limits.max_plan_bytes)

    def params(self, node: dict[str, Any] | str, n_words: int) -> None:
        """n_words more instruction parameters (Python integers while the plan is built)."""
        self.allocate(node, PARAM_BYTES * n_words, "and instruction parameters planned")

    def after_eval(self, node: dict[str, Any] | str, outs: Iterable[Any]) -> None:
        """Counts the folded outputs against the plan's bytes (and any output that is too
        large for an op output_elements does not bound)."""
        for v in outs:
            size = getattr(v, "size", 1)
            self.elements(node, int(size))
            self.allocate(node, getattr(v, "nbytes", 8), "folded")


def check_eval(node: dict[str, Any], xs: Sequence[Any]) -> None:
    """Before a NumPy evaluation outside a plan (a fusion's proof, a state-position trace):
    the output size against the limits in force."""
    lim = resolve()
    n = output_elements(node["op"], node.get("attrs", {}), xs)
    if n is not None and n > lim.max_tensor_elements:
        refuse(node, f"the output would hold {n} elements", "max_tensor_elements", lim.max_tensor_elements)
