"""graph.py - a converted model: its graph planned for concrete input shapes and run in C.

A converted graph (made by rnnengine.frontend.converter, stored in the weight file) is a list of
nodes with ONNX semantics at the graph's opset, over named tensors. Running it takes two
steps:
  1. Planning, once per set of input shapes (cached): the nodes are walked in order with
     each value either a constant (folded with NumPy: weights, and the shape arithmetic
     that depends only on input shapes) or a run-time tensor. Every node with a run-time
     input is turned into instructions for the C executor (src_c/graph.c), with all
     strides, broadcasts and axes resolved. Recurrent layers are packed once per model.
  2. Execution: one call into C per run or stream step, the GIL released. A stream binds
     each plan it runs once (rnnengine._core.GraphStep: the plan's buffers, its layer states,
     two buffers per explicit state that the calls alternate between); a call with the
     input names, shapes and dtypes of the last plan is then one compiled call that checks
     the caller's arrays in C, runs and copies the outputs out (GraphStream.feed / step).

Streams keep two kinds of state between calls: the state of recurrent layers whose
initial state is not a graph input (held per layer), and explicit state carried by the
graph itself (an input such as ``h0`` paired with an output such as ``hn``; the output of
one call becomes the input of the next).
"""
from __future__ import annotations

import math
import re
import itertools
import threading
import time

from typing import TYPE_CHECKING, Any, Callable, Collection, Iterable, Mapping, NoReturn, NotRequired, Optional, \
    Sequence, TypedDict, Union, cast, overload

import numpy as np
import numpy.typing as npt

from rnnengine import _core, limits
from rnnengine.errors import GraphRunError, LimitError, NotStreamableError, UnsupportedError, where
from rnnengine.limits import Limits
from rnnengine.runtime import compact, split

from rnnengine.ops import streaming
from rnnengine.ops.streaming import check_outputs as _check_stream_outputs
from rnnengine.codes import (ACT_LEAKY_RELU, ACT_RELU, NP_DTYPES, OP_CONV1D_PACKED, OP_RECURRENT, OP_UNARY,  # noqa: F401
                             RECURRENT_OPS, tensor_code)  # (NP_DTYPES re-exported)
from rnnengine.ops.handlers import OPS, ROWS_VIEW, WINDOW_OPS, Concat, Slice, Unsqueeze, emit_copy, flatten_conv_inputs, unflatten_shape
from rnnengine.ops.control import SEQUENCE_INPUTS, EnvHandler
from rnnengine.runtime.base import Model, State, Stream
from rnnengine.runtime.roles import axis_roles, input_roles
from rnnengine.runtime.states import check_state_positions

if TYPE_CHECKING:
    from rnnengine.format.weightfile import WeightFile
    from rnnengine.ops.handlers import PlannerInterface

Array = npt.NDArray[Any]
Node = dict[str, Any]  # a node of the converted graph (rnnengine.frontend.converter): op, name, inputs, ...
# while planning: tensor name -> Value, or a list of Values (an ONNX sequence)
Env = dict[str, Any]
# an entry of a plan's tensor table: ("buf", shape, dtype), ("const", array, dtype),
# ("input", name, shape, dtype) or ("state", key)
Spec = tuple[Any, ...]
# run() / feed() / step() take a dict name -> array(-like) and give a dict name -> array, or
# the one array of a model with one input to feed and give the outputs in order (one array alone)
Feeds = dict[str, Any]
Returned = Union[Array, tuple[Array, ...]]


GraphStreamState = State  # the name of earlier versions: every stream's state is rnnengine.State


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

class PlanContext(TypedDict):
    """Buffers for one run of a plan (Plan.context)."""
    ptrs: npt.NDArray[np.int64]  # the tensor table: an address per tensor id
    bufs: dict[int, Array]       # tensor id -> the array behind it (intermediates, constants)
    work: npt.NDArray[np.float32]
    views: NotRequired[dict[str, Array]]  # output name -> a view of its buffer, made at the first run


class Value:
    """A tensor during planning: its shape and dtype, and either its constant value or the
    id of the run-time buffer that will hold it."""
    __slots__ = ("shape", "dtype", "const", "tid", "t", "final", "tdep", "lag", "scale", "perm", "carried", "fstate",
                 "fromstate")
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    const: Any          # the constant's array, or None for a run-time tensor
    tid: Optional[int]  # the id of its run-time buffer in the tensor table, once it has one
    t: Optional[int]
    final: bool
    tdep: Any           # None, or a mask: EXACT / DERIVED elements (rnnengine/ops/streaming.py)
    lag: int
    scale: int
    perm: bool
    carried: bool
    fstate: bool
    fromstate: bool

    def __init__(self, shape: Iterable[Any], dtype: npt.DTypeLike, const: Any = None, tid: Optional[int] = None
                 ) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.const = const
        self.tid = tid
        # time information of a stream's plan (rnnengine/streaming.py); unused otherwise
        self.t, self.final, self.tdep, self.lag, self.scale, self.perm = None, False, None, 0, 1, False
        self.carried = False  # moved from explicit state inputs only (the stream feeds them back)
        self.fstate = False   # moved from a recurrent layer's final state only
        self.fromstate = False  # computed from explicit state inputs (other than by a recurrent layer)


_BOOL, _F32 = np.dtype(np.bool_), np.dtype(np.float32)
# dtype -> the tensor table's element type code (codes.tensor_code), cached
_TENSOR_CODES: dict[np.dtype[Any], int] = {}


class Plan:
    """The program for one set of input shapes, shared by every run and stream using them."""

    def __init__(self, planner: Planner) -> None:
        # the tensor table the C verifier checks every instruction against (element type
        # code, element count and whether it may be written, per tensor id): intermediates,
        # constants, inputs, states
        codes: list[int] = []
        counts: list[int] = []
        writable: list[bool] = []
        for spec in planner.specs:
            kind = spec[0]
            if kind == "buf":
                dtype, n = spec[2], math.prod(spec[1])
            elif kind == "const":
                dtype, n = spec[1].dtype, spec[1].size  # bool constants are stored as uint8 bytes
                if len(spec) > 2 and spec[2] == _BOOL and dtype.itemsize == 1:
                    dtype = _BOOL
            elif kind == "input":
                dtype, n = spec[3], math.prod(spec[2])
            else:  # a stream's state
                dtype, n = _F32, planner.state[spec[1]][1].size
            code = _TENSOR_CODES.get(dtype)
            if code is None:
                code = _TENSOR_CODES[dtype] = tensor_code(dtype)
            codes.append(code)
            counts.append(n)
            writable.append(kind == "buf" or kind == "state")  # not constants nor inputs
        self.work_floats = max(16, planner.work)  # what context() allocates
        self.program = _core.Program(np.array(planner.prog, np.int64).reshape(-1, _core.INSTR_WORDS),
                                     np.array(planner.ip, np.int64), np.array(planner.fp, np.float32),
                                     planner.stacks, planner.labels, tensor_dtypes=np.array(codes, np.int64),
                                     tensor_counts=np.array(counts, np.int64), work_floats=self.work_floats,
                                     tensor_writable=np.array(writable, np.uint8))
        self.specs = planner.specs
        self.inputs = planner.input_tids
        self.outputs = planner.outputs
        self.state = planner.state  # key -> (tid, start vector)
        self.state_parts = planner.state_parts  # key -> shapes of its parts (State["layers"])
        self.n_instructions = len(planner.prog) // _core.INSTR_WORDS
        self.recurrent = planner.recurrent
        # streams: the carried context this plan was made for and the one it leaves behind
        # (conv tails, pads already emitted), and per output its time axis / delay
        self.aux_in, self.next_aux = dict(planner.aux_in), dict(planner.aux_out)
        self.time = {name: (v.t, v.final, v.lag) for name, v in planner.outputs}
        lags = [lag for t, final, lag in self.time.values() if t is not None or final]
        self.delay = max(0, max(lags)) if lags else 0
        self.tail = planner.tail

    def context(self) -> PlanContext:
        """Buffers for one run: a tensor table with intermediates allocated, constants bound."""
        ptrs = np.zeros(max(1, len(self.specs)), np.int64)
        bufs: dict[int, Array] = {}
        for tid, spec in enumerate(self.specs):
            if spec[0] == "buf":
                bufs[tid] = np.zeros(max(1, int(np.prod(spec[1]))), spec[2])
            elif spec[0] == "const":
                bufs[tid] = spec[1]
            else:
                continue
            ptrs[tid] = _core.address(bufs[tid])
        return {"ptrs": ptrs, "bufs": bufs, "work": np.zeros(self.work_floats, np.float32)}

    def execute(self, ctx: PlanContext, feeds: Mapping[str, Array], states: Mapping[str, Array],
                want: Optional[Collection[str]] = None, into: Optional[Mapping[str, Array]] = None,
                threads: int = 1) -> dict[str, Array]:
        """Runs the program; returns copies of the outputs named in ``want`` (all when None)
        and copies the outputs named in ``into`` (name -> array) into those arrays.
        ``threads``: the recurrent layers' products split over up to that many threads by gate
        rows (bit-identical to one thread)."""
        ptrs = ctx["ptrs"]
        address = _core.address
        for name, tid in self.inputs.items():
            ptrs[tid] = address(feeds[name])
        for key, (tid, _) in self.state.items():
            ptrs[tid] = address(states[key])
        self.program.run(ptrs, ctx["work"], threads)
        out = {}
        views = ctx.get("views")
        if views is None:  # output views of this context's buffers, made once
            views = ctx["views"] = {name: (ref if kind == "const" else
                                           ctx["bufs"][ref].reshape(-1)[:n].view(dtype).reshape(shape))
                                    for name, kind, ref, n, dtype, shape in self._reads if kind != "input"}
        for name, kind, ref, n, dtype, shape in self._reads:
            dest = into.get(name) if into else None
            if dest is None and want is not None and name not in want:
                continue
            if kind == "input":
                val = feeds[ref].reshape(-1)[:n].view(dtype).reshape(shape)
            else:
                val = views[name]
            if dest is not None:
                np.copyto(dest, val)
            if want is None or name in want:
                out[name] = val.copy()
        return out

    @property
    def _reads(self) -> list[tuple[str, str, Any, int, np.dtype[Any], tuple[int, ...]]]:
        """How to read each graph output after a run: (name, kind, ref, n, dtype, shape)."""
        reads: Optional[list[tuple[str, str, Any, int, np.dtype[Any], tuple[int, ...]]]] = \
            self.__dict__.get("_reads_cache")
        if reads is None:
            reads = []
            for name, v in self.outputs:
                n = int(np.prod(v.shape))
                if v.const is not None:
                    reads.append((name, "const", np.asarray(v.const), n, v.dtype, v.shape))
                elif self.specs[cast(int, v.tid)][0] == "input":  # not a constant: it has a buffer
                    reads.append((name, "input", self.specs[cast(int, v.tid)][1], n, v.dtype, v.shape))
                else:
                    reads.append((name, "buf", v.tid, n, v.dtype, v.shape))
            self.__dict__["_reads_cache"] = reads
        return reads


class Planner:
    """Plans a graph for concrete input shapes: walks its nodes, folding constants and emitting
    the C executor's instructions (what Plan then holds)."""

    def __init__(self, model: GraphModel, feeds: Mapping[str, tuple[tuple[int, ...], npt.DTypeLike]],
                 streaming: bool, time_axes: Optional[Mapping[str, int]] = None,
                 aux: Optional[Mapping[str, int]] = None, finishing: bool = False) -> None:
        self.model = model
        self.streaming = streaming
        self.aux_in: dict[str, int] = dict(aux or {})
        self.aux_out: dict[str, int] = {}
        self.finishing = finishing
        self.tail = False  # in a stream, an op along time holds frames back until finish()
        self.has_time = bool(streaming and time_axes)
        self.loop_reads: Optional[list[Any]] = None  # in a loop over time: (steps, lag, scale) of each series it reads
        self.loop_iter: Optional[int] = None  # in a stream, the iteration of the loop over time being planned
        self.loop_timing: tuple[int, int] = (0, 1)
        self.specs: list[Spec] = []
        self.prog: list[int] = []
        self.ip: list[int] = []
        self.fp: list[float] = []
        self.labels: list[str | None] = []  # per instruction, the node it computes (for errors)
        self._node: Optional[Node] = None
        self.work = 16
        self.stacks: list[_core.Stack] = []
        self._stack_ids: dict[int, int] = {}
        self.state: dict[str, tuple[int, Array]] = {}
        # key -> the shapes of its parts, in order: (h, c) or (h,) of a recurrent layer,
        # (shape,) of a Loop's carried value or a convolution's kept frames (State["layers"])
        self.state_parts: dict[str, tuple[tuple[int, ...], ...]] = {}
        self.input_tids: dict[str, int] = {}
        self.recurrent: list[dict[str, Any]] = []  # per recurrent layer planned: node, T, B, direction, kind
        # rnnengine/limits.py: tensor sizes, bytes folded + allocated, Loop nodes unrolled, time
        self.budget = limits.Budget(getattr(model, "limits", None))
        env: Env = {name: Value(arr.shape, arr.dtype, const=arr) for name, arr in model.tensors.items()}
        for name, (shape, dtype) in feeds.items():
            tid = self._spec(("input", name, tuple(shape), np.dtype(dtype)))
            self.input_tids[name] = tid
            env[name] = Value(shape, dtype, tid=tid)
            if streaming and time_axes and name in time_axes:
                env[name].t = time_axes[name]
            if streaming and name in {a for a, _ in model.state_pairs}:
                env[name].carried = env[name].fromstate = True
        with limits.using(self.budget.limits):  # the op handlers' own size checks use them too
            self.walk(model.graph["nodes"], env)
        self.outputs: list[tuple[str, Value]] = []
        for o in model.graph["outputs"]:
            if o["name"] not in env:
                raise UnsupportedError(f"graph output {o['name']!r} is produced by no node")
            if not isinstance(env[o["name"]], Value):  # a sequence (SplitToSequence...) or other non-tensor
                raise UnsupportedError(f"graph output {o['name']!r} is a sequence of tensors; rnnengine's "
                                       "outputs are tensors (concatenate it in the model, or output its items)")
            self.outputs.append((o["name"], env[o["name"]]))
        if streaming and self.has_time:
            _check_stream_outputs(self, dict(self.outputs), model.state_pairs)
        fuse_activations(self)

    # -- building blocks used by the op handlers (rnnengine/ops.py)
    def _spec(self, spec: Spec) -> int:
        self.specs.append(spec)
        return len(self.specs) - 1

    def const(self, arr: npt.ArrayLike) -> Value:
        arr = np.asarray(arr)
        return Value(arr.shape, arr.dtype, const=arr)

    def new(self, shape: Iterable[Any], dtype: npt.DTypeLike) -> Value:
        dtype = np.dtype(dtype)
        shape = tuple(int(d) for d in shape)
        n = math.prod(shape)
        node = self._node or "the graph"
        self.budget.sizes(node, shape, "a run-time tensor")
        self.budget.elements(node, n, f"a run-time tensor of shape {shape}")
        self.budget.allocate(node, n * dtype.itemsize, "allocated")
        return Value(shape, dtype, tid=self._spec(("buf", shape, dtype)))

    def alias(self, x: Value, shape: Iterable[Any]) -> Value:
        """The same data seen with another shape (Reshape, Squeeze...): no copy. The planner
        does not trust the handler's shape: sizes must be non-negative and hold exactly the
        elements of x (exact integers, no int64 wrap-around)."""
        shape = tuple(int(d) for d in shape)
        self._check_view(x, shape)
        if x.const is not None:
            return Value(shape, x.dtype, const=np.asarray(x.const).reshape(shape))
        return Value(shape, x.dtype, tid=x.tid)

    def _check_view(self, x: Value, shape: tuple[int, ...]) -> None:
        n = math.prod(int(d) for d in x.shape)
        if any(d < 0 for d in shape) or math.prod(shape) != n:
            raise UnsupportedError(f"{where(self._node) if self._node else 'the graph'}: a view of shape "
                                   f"{shape} does not hold the {n} elements of its input of shape "
                                   f"{tuple(int(d) for d in x.shape)}")
        self.budget.sizes(self._node or "the graph", shape, "a view")

    def materialize(self, x: Value) -> Value:
        self.tid(x)
        return x

    def tid(self, v: Value) -> int:
        if v.tid is None:
            arr = np.ascontiguousarray(v.const)
            if arr.dtype == np.bool_:
                arr = arr.astype(np.uint8)
            if arr.size == 0:
                arr = np.zeros(1, arr.dtype)
            v.tid = self._spec(("const", arr, v.dtype))  # a bool stays bool in the tensor table
        return v.tid

    def derived(self, source: Any, tag: str, fn: Callable[[], Any]) -> Any:
        """fn() computed once per model for a constant (e.g. a transposed weight matrix), so
        plans for other shapes reuse it instead of copying the weights again."""
        return self.model._derived_for(source, tag, fn)

    def need_work(self, floats: float) -> None:
        self.work = max(self.work, int(floats))

    def stack(self, handler: Any, consts: Any) -> tuple[Any, _core.Stack]:
        return self.model._stack_for(handler, consts)

    def stack_index(self, stack: _core.Stack) -> int:
        if id(stack) not in self._stack_ids:
            self._stack_ids[id(stack)] = len(self.stacks)
            self.stacks.append(stack)
        return self._stack_ids[id(stack)]

    def stream_state(self, key: str, start: Array, parts: Sequence[tuple[int, ...]]) -> Value:
        if key in self.state:
            raise UnsupportedError(f"two recurrent layers share the state key {key!r}")
        if sum(int(np.prod(s)) for s in parts) != start.size:
            raise AssertionError(f"state {key!r}: parts {parts} do not cover its {start.size} floats")
        tid = self._spec(("state", key))
        self.state[key] = (tid, start)
        self.state_parts[key] = tuple(tuple(int(d) for d in s) for s in parts)
        return Value(start.shape, np.float32, tid=tid)

    def emit(self, op: int, ins: Collection[Optional[Value]], outs: Collection[Optional[Value]], ip: Collection[Any],
             fp: Collection[Any] = (), aux: int = -1) -> None:
        if len(ins) > 4 or len(outs) > 3:
            raise AssertionError("instruction slots exceeded")
        word = [op] + [-1] * 15
        for k, v in enumerate(ins):
            word[1 + k] = -1 if v is None else self.tid(v)
        for k, v in enumerate(outs):
            word[5 + k] = -1 if v is None else self.tid(v)
        word[8] = aux
        word[9], word[10] = len(self.ip), len(ip)
        word[11], word[12] = len(self.fp), len(fp)
        self.budget.params(self._node or "the graph", 16 + len(ip) + len(fp))
        ints = [int(v) for v in ip]
        if ints and (min(ints) < _INT64_MIN or max(ints) > _INT64_MAX):  # a hostile attribute (2**63 strides)
            bad = next(v for v in ints if not _INT64_MIN <= v <= _INT64_MAX)
            raise UnsupportedError(f"{where(self._node) if self._node else 'the graph'}: a size or index of {bad} "
                                   "does not fit in 64 bits")
        self.prog.extend(int(w) for w in word)
        self.labels.append(where(self._node) if self._node else "")
        self.ip.extend(ints)
        self.fp.extend(float(v) for v in fp)

    # -- the walk over the nodes
    def walk(self, nodes: list[Node], env: Env) -> None:
        opset = self.model.opset
        for node in nodes:
            op = node["op"]
            self._node = node
            self.budget.tick(node)
            handler_cls = OPS.get(op)
            if handler_cls is not None and issubclass(handler_cls, EnvHandler):
                # control flow and sequences act on the environment (rnnengine/ops/control.py)
                for name in node["inputs"]:
                    if name and name not in env:
                        raise UnsupportedError(f"{where(node)} reads {name!r}, which nothing produces")
                outs = handler_cls(node, opset).plan_node(self, env)
            else:
                if handler_cls is None:
                    raise UnsupportedError(f"{where(node)}: op {op!r} is not supported")
                h = handler_cls(node, opset)
                xs: list[Optional[Value]] = []
                for name in node["inputs"]:
                    if not name:
                        xs.append(None)
                    elif name not in env:
                        raise UnsupportedError(f"{where(node)} reads {name!r}, which nothing produces")
                    elif isinstance(env[name], list):
                        raise UnsupportedError(f"{where(node)}: input {name!r} is a sequence of tensors; {op} "
                                               "takes tensors")
                    else:
                        xs.append(env[name])
                if self.streaming:
                    outs = self.emit_streaming(h, xs)
                    if outs is not None:
                        for name, v in zip(node["outputs"], outs):
                            if name:
                                env[name] = v
                        continue
                if all(x is None or x.const is not None for x in xs) and op not in RECURRENT_OPS:
                    consts = [None if x is None else x.const for x in xs]
                    self.budget.before_eval(node, consts)  # an output too large is refused before NumPy
                    try:
                        with np.errstate(all="ignore"):
                            vals = h.eval(consts)
                    except UnsupportedError:
                        raise
                    except Exception as e:  # NumPy refusing the shapes, etc.
                        raise UnsupportedError(f"{where(node)}: {e}") from None
                    outs = [self.const(np.asarray(v)) for v in vals]
                    self.budget.after_eval(node, [o.const for o in outs])
                else:
                    # sizes first: an op planned with a huge output (a Pad of 2**40) is refused
                    # before its handler builds index maps or buffers for it
                    self.budget.before_eval(node, [None if x is None else x.const if x.const is not None
                                                   else limits.Shaped(x.shape, x.dtype) for x in xs], planning=True)
                    outs = h.emit(self, xs)
                if self.streaming:
                    streaming.propagate(self, h, xs, outs)
            for name, v in zip(node["outputs"], outs):
                if name:
                    env[name] = v


    def emit_streaming(self, h: Any, xs: list[Any]) -> Optional[list[Value]]:
        """In a stream: checks a recurrent layer before it is planned, and plans the ops that
        carry context along time (rnnengine/streaming.py). Returns their outputs, or None
        when the op is planned as usual."""
        op = h.node["op"]
        streaming.precheck(self, h, xs)
        if op in RECURRENT_OPS:
            streaming.recurrent_check(h, xs)
        elif op in WINDOW_OPS and h.as_1d(*[v.shape for v in xs[:2]]) is not None and streaming.timed(xs[0]):
            # Keras Conv1D / pooling written as a 2-D op over (N, C, 1, L) (or a pool over
            # (N, C, L, 1)): the 1-D op, time on L
            flat = h.as_1d(xs[0].shape, xs[1].shape) if op == "Conv" else h.as_1d(xs[0].shape, prefer=xs[0].t)
            la = flat.long_axis
            ys = flatten_conv_inputs(self, xs)
            ys[0].t, ys[0].final, ys[0].lag, ys[0].scale = (2 if xs[0].t == la else xs[0].t), xs[0].final, \
                xs[0].lag, xs[0].scale
            if xs[0].t not in (0, la):
                raise NotStreamableError(h.node, f"{'convolves' if op == 'Conv' else 'pools'} over the channels of a time series")
            if streaming.conv_along_time(self, flat, ys):
                y = streaming.emit_window(self, flat, ys)[0]
            else:
                y = flat.emit(self, ys)[0]
                y.t, y.lag, y.scale = ys[0].t, ys[0].lag, ys[0].scale
            out = self.alias(y, unflatten_shape(y.shape, la))
            out.t, out.lag, out.scale = (la if y.t == 2 else y.t), y.lag, y.scale
            return [out]
        elif op in WINDOW_OPS and streaming.conv_along_time(self, h, xs):
            return streaming.emit_window(self, h, xs)
        elif op == "Pad":
            tp = streaming.pad_along_time(self, h, xs, xs[0].shape)
            if tp is not None:
                return streaming.emit_pad(self, h, xs, *tp)
        elif op in ("Reshape", "Flatten") and xs[0].t is not None and xs[0].shape[xs[0].t] == 0 \
                and h.attrs.get(ROWS_VIEW) != 1:  # (a rows view passes its input on, steps or none)
            return streaming.reshape_no_steps(self, h, xs)
        return None

    def sequence_op(self, node: Node, env: Env) -> list[Any]:
        """ONNX sequence ops, as the dynamo exporter writes torch.unbind / torch.stack: a
        sequence is a Python list of values while planning; nothing of it reaches C."""
        op, at = node["op"], node.get("attrs", {})
        for name in node["inputs"]:
            if name and name not in env:
                raise UnsupportedError(f"{where(node)} reads {name!r}, which nothing produces")
        xs: list[Any] = [env[n] if n else None for n in node["inputs"]]  # Values, lists of them, None
        for k, x in enumerate(xs):
            if x is not None and isinstance(x, list) != (k in SEQUENCE_INPUTS.get(op, ())):
                raise UnsupportedError(f"{where(node)}: input {k} ({node['inputs'][k]!r}) is "
                                       f"{'a sequence' if isinstance(x, list) else 'a tensor'}; {op} takes "
                                       f"{'a tensor' if isinstance(x, list) else 'a sequence'} there")
        if self.streaming and any(streaming.timed(x) or streaming.has_tdep(x) for x in xs
                                  if not isinstance(x, list)):
            raise NotStreamableError(node, f"{op} on a time series is not known to act step by step")

        def sub(op_type: str, inputs: list[str], attrs: dict[str, Any]) -> Node:
            return {"op": op_type, "name": node.get("name", ""), "inputs": inputs, "outputs": ["x"], "attrs": attrs}

        def fail(msg: str) -> NoReturn:
            raise UnsupportedError(f"{where(node)}: {msg}")

        def axis_in(a: Any, nd: int, what: str = "axis") -> int:
            """An axis attribute within [-nd, nd - 1], as a position (ONNX refuses others)."""
            if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not -nd <= int(a) < nd:
                fail(f"{what} {a!r} is out of range for rank {nd}")
            return int(a) % nd

        def same_type(seq: list[Value]) -> list[Value]:
            """ONNX sequences hold tensors of one element type (onnxruntime refuses a mix)."""
            kinds = sorted({str(v.dtype) for v in seq})
            if len(kinds) > 1:
                fail(f"a sequence of tensors of different types {kinds}")
            return seq
        if op == "SplitToSequence":
            # SplitToSequence(x, split?) -> [parts of x along axis]: split a scalar k > 0 (chunks of
            # k, the last one shorter) or a 1-D list of sizes >= 0 summing to x.shape[axis];
            # without split, parts of 1 (axis dropped unless keepdims)
            x = xs[0]
            if not x.shape:
                fail("cannot split a scalar: its input must have at least one dimension")
            axis = axis_in(at.get("axis", 0), len(x.shape))
            dim = x.shape[axis]
            if len(xs) > 1 and xs[1] is not None:
                if xs[1].const is None:
                    fail("split sizes must be constants")
                split = np.asarray(xs[1].const)
                sizes: Any
                if split.dtype.kind != "i" or split.ndim > 1:
                    fail(f"split must be an integer scalar or 1-D tensor, got {split.dtype} of shape {split.shape}")
                if split.ndim == 0:
                    k = int(split)
                    if k <= 0:
                        fail(f"split {k} must be greater than 0")
                    sizes = [min(k, dim - i) for i in range(0, dim, k)]
                else:
                    sizes = [int(n) for n in split]
                    if any(n < 0 for n in sizes) or sum(sizes) != dim:
                        fail(f"split sizes {sizes[:8]}{' ...' if len(sizes) > 8 else ''} must be >= 0 and sum to "
                             f"{dim}, the size of axis {axis} of the input {tuple(x.shape)}")
                keep = True
            else:
                sizes, keep = [1] * dim, bool(at.get("keepdims", 1))
            self.budget.unroll(node, len(sizes), f"splitting into a sequence of {len(sizes)} tensors")
            parts: list[Value] = []
            pos = 0
            for n in sizes:
                sl = Slice(sub("Slice", [], {}), 10)
                part = sl.emit(self, [x, self.const(np.array([pos])), self.const(np.array([pos + n])),
                                      self.const(np.array([axis]))])[0] if x.const is None else \
                    self.const(np.take(x.const, range(pos, pos + n), axis=axis))
                if not keep:
                    part = self.alias(part, tuple(d for i, d in enumerate(part.shape) if i != axis))
                parts.append(part)
                pos += n
            return [parts]
        if op == "SequenceAt":
            seq, index = xs
            if index.const is None:
                raise UnsupportedError(f"{where(node)}: the position must be a constant")
            at = np.asarray(index.const).reshape(-1)
            if at.size != 1 or at.dtype.kind not in "iu" or not -len(seq) <= int(at[0]) < len(seq):
                raise UnsupportedError(f"{where(node)}: position {at.tolist()[:4]} is not one integer within the "
                                       f"sequence of {len(seq)} tensors")
            return [seq[int(at[0])]]
        if op == "SequenceConstruct":
            return [same_type(list(xs))]
        if op == "SequenceEmpty":
            return [[]]
        if op == "SequenceLength":
            return [self.const(np.array(len(xs[0]), np.int64))]
        if op == "SequenceInsert":
            # SequenceInsert(seq, x, position?) -> seq with x before position (in [-n, n]; at the end without)
            seq = list(xs[0])
            if len(xs) > 2 and xs[2] is not None:
                if xs[2].const is None:
                    fail("the position must be a constant")
                p = np.asarray(xs[2].const).reshape(-1)
                if p.size != 1 or p.dtype.kind != "i" or not -len(seq) <= int(p[0]) <= len(seq):
                    fail(f"position {p.tolist()[:4]} is not one integer within [-{len(seq)}, {len(seq)}] "
                         f"(a sequence of {len(seq)} tensors)")
                k = int(p[0])
                seq.insert(k + len(seq) if k < 0 else k, xs[1])
            else:
                seq.append(xs[1])
            return [same_type(seq)]
        if op == "ConcatFromSequence":
            # ConcatFromSequence(seq) -> its tensors concatenated along axis (in [-r, r-1]), or
            # stacked along a new axis (new_axis=1: in [-r-1, r]); all of one type and shape
            # except along axis
            seq, axis = same_type(xs[0]), at.get("axis")
            if not seq:
                fail("concatenates an empty sequence (ONNX needs at least one tensor)")
            if at.get("new_axis", 0):
                ax = axis_in(axis, len(seq[0].shape) + 1)
                seq = [Unsqueeze(sub("Unsqueeze", [], {"axes": [ax]}), 11).emit(self, [v])[0]
                       if v.const is None else self.const(np.expand_dims(v.const, ax)) for v in seq]
                axis = ax
            nd = len(seq[0].shape)
            axis = axis_in(axis, nd)
            for v in seq:
                if len(v.shape) != nd or any(v.shape[i] != seq[0].shape[i] for i in range(nd) if i != axis):
                    fail(f"tensors of shapes {[tuple(v.shape) for v in seq][:8]} do not concatenate on axis {axis}")
            if all(v.const is not None for v in seq):
                return [self.const(np.concatenate([v.const for v in seq], axis=axis))]
            return Concat(sub("Concat", [], {"axis": axis}), 13).emit(self, seq)
        raise UnsupportedError(f"{where(node)}: {op} is not supported")

    def loop(self, node: Node, env: Env) -> list[Any]:
        """ONNX Loop, unrolled: the trip count and the condition must be known when planning
        (they are for recurrent loops over a time axis: Shape-derived, and `i < T`). In a
        stream, float loop-carried values that start from constants (zero states) are held
        by the stream and carried on from call to call, as a recurrent layer's state is."""
        body = node["attrs"]["body"]
        ins = node["inputs"] + [""] * 2
        for k, name in enumerate(node["inputs"]):
            if not name:
                continue
            if name not in env:
                raise UnsupportedError(f"{where(node)} reads {name!r}, which nothing produces")
            if isinstance(env[name], list):
                raise UnsupportedError(f"{where(node)}: input {k} ({name!r}) is a sequence of tensors; a Loop's "
                                       "trip count, condition and carried values must be tensors here")
        M = env[ins[0]] if ins[0] else None
        cond = env[ins[1]] if ins[1] else None
        if M is not None and M.const is None or cond is not None and cond.const is None:
            raise UnsupportedError(f"{where(node)}: the trip count and condition must be known when planning")
        # in a stream, a loop whose trip count or condition is the chunk's length runs over
        # the time axis, one step per iteration (rnnengine/streaming.py, "time loops")
        time_loop = self.streaming and (streaming.has_tdep(M) or streaming.has_tdep(cond))
        if time_loop:
            if self.loop_iter is not None:
                raise NotStreamableError(node, "a loop over time inside another loop over time")
            for n in node["inputs"][2:]:
                v = env.get(n) if n else None
                if v is not None and v.const is None and v.dtype.kind == "f" and not v.carried:
                    raise NotStreamableError(node, "its loop-carried state starts from a value computed in each "
                                                   "call, so every chunk would start the recurrence anew")
        trips = int(_one_value(node, M.const, "trip count", "iu")) if M is not None else None
        keep_going = bool(_one_value(node, cond.const, "condition", "biu")) if cond is not None else True
        carried: list[Any] = [env[n] if n else None for n in node["inputs"][2:]]
        initial = list(carried)
        n_carried = len(carried)
        n_scan = len(body["outputs"]) - 1 - n_carried
        states = []
        produced_by = {o: n for n in body["nodes"] for o in n["outputs"] if o}
        if len(body.get("inputs", ())) != 2 + n_carried or n_scan < 0:
            raise UnsupportedError(f"{where(node)}: its body takes {len(body.get('inputs', ()))} inputs and gives "
                                   f"{len(body['outputs'])} outputs; with {n_carried} carried values ONNX needs "
                                   f"{2 + n_carried} inputs (iteration, condition, the values) and at least "
                                   f"{1 + n_carried} outputs")

        def passes_through(k: int) -> bool:
            """True when the body hands carried value k on unchanged (through Identities):
            a loop invariant such as a weight, not state."""
            name, seen = body["outputs"][1 + k], set()
            while name in produced_by and produced_by[name]["op"] == "Identity" and name not in seen:
                seen.add(name)  # an Identity writing its own input (x -> x) would loop forever
                name = produced_by[name]["inputs"][0]
            return bool(name == body["inputs"][2 + k])

        def counts_steps(k: int) -> bool:
            """True when carried value k starts at 0 and the body adds 1 to it: after a loop over
            time it is the chunk's length (any other counter, one from -1 say, is computed from
            the length, not the length: review, a Slice to it dropped a step per chunk)."""
            v0 = initial[k]
            if v0 is None or v0.const is None or np.asarray(v0.const).size != 1 or \
                    np.asarray(v0.const).reshape(-1)[0] != 0:
                return False
            add = produced_by.get(body["outputs"][1 + k])
            if add is None or add["op"] != "Add" or len(add["inputs"]) != 2 or body["inputs"][2 + k] not in add["inputs"]:
                return False
            other = [x for x in add["inputs"] if x != body["inputs"][2 + k]]
            one = env.get(other[0]) if len(other) == 1 else None
            c = one.const if isinstance(one, Value) else body.get("tensors", {}).get(other[0]) if other else None
            return c is not None and np.asarray(c).size == 1 and np.asarray(c).reshape(-1)[0] == 1
        # a stream carries a loop's state from call to call when the loop runs over time (or,
        # in a model without a time axis, a fixed step per call); another loop starts anew
        if self.streaming and (time_loop or not self.has_time):
            for k, v in enumerate(carried):
                if v is not None and v.const is not None and v.dtype == np.float32 and not passes_through(k):
                    key = f"{node['outputs'][k] or node.get('name')}:loop{k}"
                    st = self.stream_state(key, np.ascontiguousarray(np.asarray(v.const, np.float32)).reshape(-1),
                                           [tuple(v.shape)])
                    carried[k] = self.alias(st, v.shape)
                    states.append((k, st, v.shape))
        # unrolled: every iteration plans the body's nodes again, counted against
        # max_loop_nodes over the whole plan (nested loops multiply); refused before it starts
        # when the trip count alone goes past it and the condition cannot stop it earlier
        per_iteration = max(1, len(body["nodes"]))
        if trips is not None and trips > 0 and keep_going and _runs_every_trip(body):
            left = self.budget.limits.max_loop_nodes - self.budget.loop_nodes
            total = trips * _unrolled_nodes(body, env)  # nested Loops with constant trip counts included
            if total > left:
                limits.refuse(node, f"unrolling its {trips} iterations of {len(body['nodes'])} body nodes "
                                    f"(nested Loops included) would plan {self.budget.loop_nodes + total} body nodes",
                              "max_loop_nodes", self.budget.limits.max_loop_nodes)
        record = {"node": node.get("name") or node["outputs"][0], "T": trips, "B": None, "direction": "forward",
                  "kind": "Loop", "explicit_state": not states}
        self.recurrent.append(record)
        scans: list[list[Value]] = [[] for _ in range(n_scan)]
        # a while loop (no trip count) runs as long as its condition, known when planning,
        # stays true
        i = 0
        while trips is None or i < trips:
            if not keep_going:
                break
            self.budget.unroll(node, per_iteration)  # a while loop that never stops ends here
            sub = dict(env)
            names = body["inputs"]
            sub[names[0]] = self.const(np.array(i, np.int64))
            sub[names[1]] = self.const(np.array(keep_going))
            for name, v in zip(names[2:], carried):
                sub[name] = v
            if time_loop:
                self.loop_iter = i
                if i == 0:
                    self.loop_reads = []
                # positions counted within the chunk: only good for reading step i
                sub[names[0]].tdep = np.full((), streaming.DERIVED, np.int8)
                for name, v in zip(names[2:], carried):
                    if v is not None and v.const is not None and v.dtype.kind in "iu":
                        sub[name] = self.const(v.const)
                        sub[name].tdep = np.full(v.shape, streaming.DERIVED, np.int8)
            try:
                self.walk(body["nodes"], sub)
            finally:
                if time_loop:
                    self.loop_iter = None
            for k, name in enumerate(body["outputs"]):
                if name not in sub:
                    raise UnsupportedError(f"{where(node)}: body output {k} ({name!r}) is produced by no body node "
                                           "and is neither a body input nor a value outside the loop")
                if isinstance(sub[name], list):
                    raise UnsupportedError(f"{where(node)}: body output {k} ({name!r}) is a sequence of tensors; "
                                           "a Loop's condition, carried values and scan outputs must be tensors here")
            res = [sub[n] for n in body["outputs"]]
            c = res[0]
            if c.const is None:
                raise UnsupportedError(f"{where(node)}: the loop condition depends on run-time data")
            keep_going = bool(_one_value(node, c.const, "condition its body gives", "biu"))
            carried = res[1:1 + n_carried]
            for k, v in enumerate(res[1 + n_carried:]):
                scans[k].append(v)
            record["T"] = i + 1
            i += 1
        if time_loop:
            reads, self.loop_reads = self.loop_reads or [], None
            if len(set(reads)) > 1:
                raise NotStreamableError(node, "reads time series that are out of step (delayed or subsampled "
                                               "differently) in one loop over time")
            if reads and reads[0][0] != record["T"] and not (reads[0][0] == 0 and not record["T"]):
                raise NotStreamableError(node, f"runs {record['T']} iterations over a chunk of {reads[0][0]} steps, "
                                               "so a chunk's steps would not all be read once")
        outs = list(carried)
        self._node = node  # the copies below belong to the Loop (its body's last node was walked last)
        for k, st, start in states:
            v = carried[k]
            _check_loop_state(node, k, start, v)
            emit_copy(self, v, st, [int(np.prod(v.shape))], [1], [1])
        if time_loop:  # after a loop over time: its states are final, its counters the length
            for k, v in enumerate(carried):
                if v is not None and not passes_through(k):
                    v = outs[k] = self.alias(v, v.shape) if v.const is None else self.const(v.const)
                    if v.const is None:
                        v.final = v.fstate = True
                    else:
                        v.tdep = np.full(v.shape, streaming.EXACT if counts_steps(k) else streaming.DERIVED, np.int8)
        for k, vals in enumerate(scans):
            if not vals:
                raise UnsupportedError(f"{where(node)}: a loop that runs 0 times has scan outputs of unknown shape")
            shape = (len(vals),) + vals[0].shape
            if all(v.const is not None for v in vals):
                n = len(vals) * int(np.prod(vals[0].shape))
                self.budget.elements(node, n, f"scan output {k} of shape {shape}")
                self.budget.allocate(node, n * vals[0].dtype.itemsize, "folded")
                outs.append(self.const(np.stack([v.const for v in vals])))
                continue
            out = self.new(shape, vals[0].dtype)
            per = int(np.prod(vals[0].shape))
            for t, v in enumerate(vals):
                emit_copy(self, v, out, [per], [1], [1], dst_off=t * per)
            outs.append(out)
            if self.streaming:
                streaming.scan_output(self, node, vals, out, time_loop)
        return outs


# activations a packed conv computes in its own store (src_c/conv.c): the same selects as UNARY
_FUSABLE_ACTS = (ACT_RELU, ACT_LEAKY_RELU)


def fuse_activations(p: Planner) -> None:
    """Folds a Relu / LeakyRelu into the packed conv before it (RNN_OP_CONV1D_PACKED's act
    parameter), where the program shows it changes nothing but the instruction count: the
    conv's output is an intermediate buffer that only the activation reads and nothing else
    writes, and the activation's output is a buffer only it writes. The conv then writes the
    activation's output directly and the activation's instruction is dropped; the result is
    bit for bit the same (both apply the same select to the same float)."""
    W = _core.INSTR_WORDS
    n = len(p.prog) // W
    if not any(p.prog[k * W] == OP_CONV1D_PACKED for k in range(n)):
        return
    reads: dict[int, list[int]] = {}
    writes: dict[int, list[int]] = {}
    for k in range(n):
        word = p.prog[k * W:(k + 1) * W]
        for t in word[1:5]:
            if t >= 0:
                reads.setdefault(t, []).append(k)
        for t in word[5:8]:
            if t >= 0:
                writes.setdefault(t, []).append(k)
        if word[0] == OP_RECURRENT:  # its state tensor (and started flags): read and written through parameters
            for t in (p.ip[word[9] + 6], p.ip[word[9] + 8]):
                if t >= 0:
                    reads.setdefault(t, []).append(k)
                    writes.setdefault(t, []).append(k)
    kept = {v.tid for _, v in p.outputs if v.tid is not None}
    drop: set[int] = set()
    for k in range(n):
        word = p.prog[k * W:(k + 1) * W]
        if word[0] != OP_CONV1D_PACKED or p.ip[word[9] + 10] != -1:
            continue
        t = word[5]
        if t in kept or p.specs[t][0] != "buf" or writes.get(t) != [k] or len(reads.get(t, [])) != 1:
            continue
        j = reads[t][0]
        act = p.prog[j * W:(j + 1) * W]
        if j <= k or act[0] != OP_UNARY or act[1] != t or p.ip[act[9]] not in _FUSABLE_ACTS:
            continue
        u = act[5]
        geo = p.ip[word[9]:word[9] + 6]
        if p.specs[u][0] != "buf" or writes.get(u) != [j] or p.ip[act[9] + 1] != geo[0] * geo[3] * geo[5]:
            continue
        p.prog[k * W + 5] = u
        p.ip[word[9] + 10] = p.ip[act[9]]
        p.fp[word[11]] = p.fp[act[11]]  # LeakyRelu's alpha
        p.labels[k] = f"{p.labels[k]} + {p.labels[j]}"
        drop.add(j)
    if drop:
        p.prog = [w for k in range(n) if k not in drop for w in p.prog[k * W:(k + 1) * W]]
        p.labels = [lab for k, lab in enumerate(p.labels) if k not in drop]


def _transient(e: BaseException) -> bool:
    """Whether e, or an error that caused it, may not happen again for the same shapes."""
    seen: set[int] = set()
    cur: Optional[BaseException] = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, (MemoryError, RecursionError, LimitError)):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _rebuilds(e: BaseException) -> bool:
    """Whether type(e)(*e.args) makes the same error (so a refusal can be kept and raised again)."""
    try:
        again = type(e)(*e.args)
    except Exception:  # noqa: BLE001 - an error type with another constructor: not kept
        return False
    return str(again) == str(e)


def _one_value(node: Node, v: Any, what: str, kinds: str) -> Any:
    """A Loop's trip count or condition: one value of the given NumPy kinds (ONNX: an int64
    or a bool scalar; an empty tensor raised IndexError, a float trip count was truncated)."""
    arr = np.asarray(v)
    if arr.size != 1 or arr.dtype.kind not in kinds:
        raise UnsupportedError(f"{where(node)}: its {what} must be one {'integer' if kinds == 'iu' else 'boolean'}, "
                               f"got {arr.dtype} of shape {arr.shape}")
    return arr.reshape(-1)[0]


def _differ_in_one_axis(a: tuple[tuple[int, ...], ...], b: tuple[tuple[int, ...], ...]) -> bool:
    """Does every part of two states differ along one and the same axis only (as a state of
    another batch size does: h and c both)?"""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        return False
    diffs = [{k for k, (p, q) in enumerate(zip(x, y)) if p != q} for x, y in zip(a, b)]
    return all(len(d) == 1 for d in diffs) and len(set.union(*diffs)) == 1


def _check_loop_state(node: Node, k: int, start: Iterable[int], v: Value) -> None:
    """A stream carries a Loop's state from call to call: the next call starts from the value
    this one ends with, as it started here, so its shape and type must stay the same."""
    if v.shape != tuple(start) or v.dtype != np.float32:
        raise UnsupportedError(f"{where(node)}: loop-carried state {k} starts as float32 {tuple(start)} and ends "
                               f"as {v.dtype} {v.shape}; a stream carries it from call to call, so its shape and "
                               "type must stay the same")


def _runs_every_trip(body: dict[str, Any]) -> bool:
    """True when a Loop body hands its condition on unchanged (through Identities) or sets it
    to a constant true: nothing but the trip count stops the loop (tf2onnx's while loops,
    with a huge trip count and a condition computed in the body, may stop any time)."""
    produced = {o: n for n in body["nodes"] for o in n["outputs"] if o}
    name, seen = body["outputs"][0], set()
    while name in produced and produced[name]["op"] == "Identity" and produced[name]["inputs"] and name not in seen:
        seen.add(name)
        name = produced[name]["inputs"][0]
    if len(body.get("inputs", ())) > 1 and name == body["inputs"][1]:
        return True
    value = body.get("tensors", {}).get(name)
    try:
        return value is not None and bool(np.asarray(value).reshape(-1)[0])
    except (TypeError, ValueError, IndexError):
        return False


def _unrolled_nodes(body: dict[str, Any], env: Env, depth: int = 0) -> int:
    """Nodes planned per iteration of a Loop body: its own, plus those of the Loops nested in
    it whose trip counts are constants (outer values or the body's own tensors) and that run
    every trip, multiplied out; another nested Loop counts as one node here (the walk counts
    it when it runs). A lower bound, so the check before unrolling never refuses too much."""
    n = max(1, len(body["nodes"]))
    if depth > 32:
        return n
    local = body.get("tensors", {})
    for sub in body["nodes"]:
        if sub["op"] == "Loop" and sub["inputs"] and sub["inputs"][0] and \
                (len(sub["inputs"]) < 2 or not sub["inputs"][1]) and _runs_every_trip(sub["attrs"]["body"]):
            name = sub["inputs"][0]
            m = local.get(name)
            if m is None and name not in body.get("inputs", ()) and env.get(name) is not None:
                m = env[name].const
            try:
                trips = int(np.asarray(m).reshape(-1)[0]) if m is not None else 0
            except (TypeError, ValueError, IndexError, OverflowError):
                trips = 0
            if trips > 0:
                n += trips * _unrolled_nodes(sub["attrs"]["body"], env, depth + 1)
    return n


def _outer_reads(node: Node) -> list[str]:
    """Names a node's subgraphs (If branches, Loop bodies) read from the enclosing scope."""
    reads: list[str] = []
    for v in node.get("attrs", {}).values():
        if isinstance(v, dict) and "nodes" in v:
            local = set(v.get("tensors", {})) | set(v.get("inputs", []))
            for n in v["nodes"]:
                reads.extend(x for x in [x for x in n["inputs"] if x] + _outer_reads(n) if x not in local)
                local.update(n["outputs"])
    return reads


Members = list[tuple[str, int]]  # (input name, axis) pairs lengthened together


def _reaching_recurrence(graph: dict[str, Any]) -> set[str]:
    """The graph inputs from which a recurrent layer, or a node holding subgraphs (a Loop, an
    If: they may hold one, and read outer values implicitly), is reached through the data
    flow: the only inputs whose axes can be a recurrent layer's time axis."""
    def reads(node: Node) -> set[str]:
        names = {x for x in node["inputs"] if x}
        for v in node.get("attrs", {}).values():
            if isinstance(v, dict) and "nodes" in v:
                for inner in v["nodes"]:
                    names |= reads(inner)
        return names
    nodes = graph["nodes"]
    deps: dict[str, set[str]] = {i["name"]: {i["name"]} for i in graph["inputs"]}  # value -> inputs it comes from
    out: set[str] = set()
    for node in nodes:  # (a converted graph's nodes are in topological order)
        came = set().union(*(deps.get(x, set()) for x in reads(node)))
        if node["op"] in RECURRENT_OPS or any(isinstance(v, dict) and "nodes" in v for v in node.get("attrs", {}).values()):
            out |= came
        for o in node["outputs"]:
            if o:
                deps[o] = came
    return out


class _TimeAxes:
    """GraphModel.time_axes for one set of feeds: which input axes are time, found by planning
    probes (the feeds with some axes lengthened, as stride-0 views: planning reads shapes and
    dtypes only).

    Candidates: each symbol's axes (every axis of an input declared without a shape counts as
    a symbol of its own; a carried state input's are never time), then, when none decides,
    the axes of one fed length across inputs, one per input (one length named by several
    symbols: tf2onnx names each input's dynamic axes apart, unk__N, so no symbol lengthened
    alone plans when the data and a mask must agree). A candidate is time when lengthening it
    changes a recurrent layer's T (or a loop over time unrolls further) and no batch; in a
    graph that keeps no state, when the outputs grow with it and streaming along it carries
    context (context_time). Every probe counts against max_planning_seconds, all together."""

    MAX_UNIONS = 32  # candidate unions of one fed length tried at most (inputs x axes of that length)

    def __init__(self, model: GraphModel, feeds: Mapping[str, Array], lim: Limits) -> None:
        self.model, self.feeds = model, feeds
        self.deadline = time.monotonic() + lim.max_planning_seconds
        self.lim = lim
        self.limited: LimitError | bool = False  # a probe refused by a limit: an answer not certain to keep
        self.not_streamable: Optional[NotStreamableError] = None  # (context_time: outputs grow, no stream)
        # axes as long as a recurrent layer's T whose longer and shorter probes all failed to
        # plan: time, or not, cannot be told (a Reshape to the export's example length)
        self.undecided: list[Members] = []
        self.groups: list[Members] = []
        by_symbol: dict[Any, Members] = {}
        carried = {a for a, _ in model.state_pairs}
        for spec in model.inputs:
            name = spec["name"]
            if name not in feeds:
                continue
            shape = spec["shape"]
            if shape is None:  # no declared shape: any axis of the data may be time (the state is carried whole)
                if name in carried:
                    continue
                shape = [None] * feeds[name].ndim
            for axis, d in enumerate(shape):
                if isinstance(d, int) and d >= 0:
                    continue
                if axis >= feeds[name].ndim or not feeds[name].shape[axis]:
                    continue
                by_symbol.setdefault(d if isinstance(d, str) and d else (name, axis), []).append((name, axis))
        self.groups = list(by_symbol.values())
        self.reaches_recurrence = _reaching_recurrence(model.graph)
        self.given = self.plan(feeds)

    # --- probes ---------------------------------------------------------------------------
    def plan(self, f: Mapping[str, Array], probing: bool = False) -> Optional[Plan]:
        """The plan for these feeds, or None when they do not plan. A LimitError: raised for
        the caller's own lengths (whether this is the time axis cannot be told: refused, not
        guessed); for a probe (a length rnnengine chose), None, noted."""
        if time.monotonic() > self.deadline:
            limits.refuse("stream", "deciding which input axes are time took longer than that (planning probes "
                          "of every symbolic axis)", "max_planning_seconds", self.lim.max_planning_seconds)
        try:
            return self.model.plan(f)
        except LimitError as e:
            if probing:
                self.limited = self.limited or e
                return None
            raise
        except Exception:
            return None

    def lengthened(self, members: Members, n_new: int) -> dict[str, Array]:
        """The feeds with these axes n_new long: read-only views (stride 0 along the axis),
        no data (a probe of 4096 rows of a (batch, 65535, 6) input would otherwise allocate
        6 GiB)."""
        out = dict(self.feeds)
        axes: dict[str, list[int]] = {}
        for name, axis in members:  # (one symbol may name several axes of one input)
            axes.setdefault(name, []).append(axis)
        for name, which in axes.items():
            small, shape = self.feeds[name], list(self.feeds[name].shape)
            for axis in which:  # one element along each lengthened axis: only ever smaller
                small = np.take(small, [0], axis=axis)
                shape[axis] = n_new
            out[name] = np.broadcast_to(small, shape)
        return out

    @staticmethod
    def frames(plan: Optional[Plan]) -> list[Any]:
        """The recurrent layers' T, or [] when the plan tells nothing (none, or one with none)."""
        if plan is None or not plan.recurrent:
            return []
        ts = [a["T"] for a in plan.recurrent]
        return [] if 0 in ts else ts

    def length(self, members: Members) -> Optional[int]:
        sizes = {self.feeds[n].shape[k] for n, k in members}
        return sizes.pop() if len(sizes) == 1 else None

    def unions(self) -> list[Members]:
        """Axes of one fed length, one per input, over two inputs or more (not a symbol's own)."""
        by_len: dict[int, dict[str, list[int]]] = {}
        for members in self.groups:
            for name, axis in members:
                by_len.setdefault(self.feeds[name].shape[axis], {}).setdefault(name, []).append(axis)
        own = [sorted(m) for m in self.groups]
        out: list[Members] = []
        for per_input in by_len.values():
            names = sorted(per_input)
            for r in range(len(names), 1, -1):
                for chosen in itertools.combinations(names, r):
                    for axes in itertools.product(*(per_input[n] for n in chosen)):
                        union = sorted(zip(chosen, axes))
                        if union not in own:
                            out.append(union)
                            if len(out) >= self.MAX_UNIONS:  # (the enumeration itself is exponential)
                                return out
        return out

    def recurrent_time(self, members: Members) -> bool:
        """Whether these axes, lengthened together, change a recurrent layer's T and no batch."""
        n = self.length(members)
        if n is None or not any(name in self.reaches_recurrence for name, _ in members):
            return False  # (inputs no recurrent layer or loop reads, even through others: not its time)
        given = self.given
        # bases: the feeds as given; when they plan no frame (a first chunk too short for a
        # convolution's kernel or stride), the axes much longer
        bases = [(n, given)]
        if not self.frames(given):
            bases += [(m, None) for m in (256, 1024, 4096) if m > n]
        for m, plan in bases:
            if plan is None and m != n:
                plan = self.plan(self.lengthened(members, m), probing=True)
            if not self.frames(plan):
                continue
            assert plan is not None
            batches = {a["B"] for a in plan.recurrent}
            # much longer: one step more may not change T behind a strided convolution (nor
            # 32 behind a stride of 64), so longer and longer until T changes
            for extra in (max(m, 32), 1024, 4096):
                longer = self.plan(self.lengthened(members, m + extra), probing=m != n or extra > max(m, 32))
                if longer is None:
                    # longer does not plan: a feature axis, or one coupled to another, or a time
                    # axis bounded by a table (x + pe[Range(T)] with 40 rows, review: taken for
                    # no time axis, every chunk then ran as its own sequence). Shorter tells:
                    # a time axis changes T there, a feature axis does not plan either.
                    return self.shorter_changes_time(members, m, plan, batches, n)
                if self.frames(longer):
                    if {a["B"] for a in longer.recurrent} != batches:
                        return False  # a batch axis: longer probes tell nothing more (and cost more)
                    if self.frames(longer) != self.frames(plan):
                        return True
            return False  # a base that plans frames decides
        return False

    def shorter_changes_time(self, members: Members, m: int, plan: Plan, batches: set[Any], n: int) -> bool:
        """Whether these axes, m long in `plan`, change the recurrent layers' T (and no
        batch) when shortened to m - 1 or m // 2 steps. When nothing shorter plans either and
        the axes, fed n long (n >= 2), are as long as a layer's T: noted as undecided."""
        planned = False
        for k in sorted({m - 1, m // 2}, reverse=True):
            if k < 1 or k == m:
                continue
            shorter = self.plan(self.lengthened(members, k), probing=True)
            planned = planned or shorter is not None
            if self.frames(shorter):
                assert shorter is not None
                if {a["B"] for a in shorter.recurrent} != batches:
                    return False
                if self.frames(shorter) != self.frames(plan):
                    return True
        if not planned and m == n >= 2 and n in self.frames(plan):
            self.undecided.append(members)
        return False

    def context_time(self, members: Members) -> bool:
        """For a graph that keeps no state (no recurrent layer, no state input): whether the
        outputs grow with these axes and streaming along them carries context from one call
        to the next (a convolution's frames, a look-ahead), as a temporal convolution
        network's does. Calls of such a graph taken as independent runs would give chunks
        convolved without their neighbours. Nothing carried (pointwise ops): either reading
        gives the same, so not time. Outputs growing along axes that cannot be streamed (a
        pooling over them beside a convolution's output): NotStreamableError, raised by
        find() when no candidate is time."""
        n = self.length(members)
        if n is None or len({name for name, _ in members}) != len(members):
            return False  # (one symbol on two axes of one input: not a time axis)
        given = self.given
        assert given is not None
        # longer and longer until the outputs grow: behind a convolution of hop 129, 70 samples
        # and 140 both give one frame (the review's case: each call was then run on its own)
        for extra in (max(n, 32), 1024, 4096):
            longer = self.plan(self.lengthened(members, n + extra), probing=True)
            if longer is None:
                return False  # longer does not plan (a feature axis, or coupled to another)
            if [v.shape for _, v in longer.outputs] != [v.shape for _, v in given.outputs]:
                break
        else:
            return False
        try:
            streamed = self.model.plan(self.feeds, streaming=True, time_axes=dict(members))
        except NotStreamableError as e:
            self.not_streamable = self.not_streamable or e
            return False
        except LimitError as e:
            self.limited = self.limited or e
            return False
        except Exception:
            return False
        return bool(streamed.state or streamed.next_aux or streamed.delay or streamed.tail)

    # --- the answer -----------------------------------------------------------------------
    def find(self, first_chunk: bool) -> tuple[dict[str, int], bool]:
        """({input name: time axis}, whether no limit shaped the answer). ``first_chunk``: the
        feeds are a stream's first call and the answer is final: a chunk that reaches a
        recurrent layer as no frame while no probe decides raises ValueError (rather than {},
        which would run every chunk as a separate sequence)."""
        found: dict[str, int] = {}
        stateless = not self.model.state_pairs and self.given is not None and not self.given.recurrent
        for test in (self.recurrent_time, self.context_time) if stateless else (self.recurrent_time,):
            for members in self.groups:
                if test(members):
                    found.update(members)
            if not found and len(self.groups) > 1:
                for union in self.unions():
                    if test(union):
                        found.update(union)
                        break
            if found:
                return found, not self.limited
        e = self.not_streamable
        if e is not None:
            raise NotStreamableError(e.label, f"{e.reason} (the graph keeps no state, but its outputs grow along the "
                                            f"input axes a stream would be fed, so calls taken one by one would not "
                                            f"give what run() gives on the whole sequence; for independent windows, "
                                            f"call run() on each)") from e
        if first_chunk and self.undecided:
            # (review: a dynamo export of a time-major LSTM reshapes Y to the example's length,
            # [6, -1, 5]; a first chunk of 3 planned, 2 and 4 did not, and the stream ran with no
            # time axis: each chunk reshaped on its own, (6, 1, 5) for the whole run's (6, 2, 5))
            name, axis = self.undecided[0][0]
            raise NotStreamableError({"op": "input", "name": name},
                                     f"axis {axis} is as long as the recurrent layers' steps ({self.feeds[name].shape[axis]}), "
                                     "but the graph plans at no other length along it (a shape fixed in the graph, "
                                     "e.g. a Reshape to the exported example's length), so whether it is time "
                                     "cannot be told")
        if first_chunk and isinstance(self.limited, LimitError):
            # no axis decided, and a probe that might have decided one was refused: the time
            # axes cannot be told within the limits (not guessed: {} runs chunks apart)
            raise LimitError(f"this stream cannot tell which input axes are time: a probe input longer along them "
                             f"was refused ({self.limited})") from self.limited
        given = self.given
        if first_chunk and given is not None and any(a["T"] == 0 for a in given.recurrent):
            layer = next(a for a in given.recurrent if a["T"] == 0)
            raise ValueError(
                f"this first chunk reaches the recurrent layer {layer['node']!r} as no time step, and longer probes "
                f"of its symbolic axes could not be planned either, so the stream cannot tell which input axis is "
                f"time; feed a longer first chunk")
        return found, not self.limited


class GraphModel(Model):
    """A :class:`rnnengine.Model` that is a converted graph, planned into a C program and run
    by the C graph executor. :func:`rnnengine.convert` (an ONNX file) and
    :func:`rnnengine.load` (a weight file) give one.

    ``run(inputs)`` runs whole sequences; ``stream()`` gives a stream that keeps every
    recurrent state between calls. ``inputs`` is a dict name -> array, or one array when
    the model has a single input to feed (its outputs then come back in ``outputs`` order).
    """
    limits: Limits | None = None  # rnnengine.Limits given to convert()/load(); None: the defaults in force when planning
    weight_dtype = "float32"  # storage of the recurrent kernels' weights (rnnengine/runtime/compact.py)
    # run() splits the batch rows over this many threads when exact (rnnengine/runtime/split.py);
    # otherwise, and in streams, each recurrent layer's products split by gate rows (pool.c)
    threads = 1
    thread_split_reason: Optional[str] = "threads is 1"  # why the last run() was not split (None: it was)
    # load(..., mmap=True): the memory-mapped WeightFile, checked before each run
    mapped_file: Optional[WeightFile] = None
    _probed: dict[tuple[Any, ...], dict[str, tuple[int, ...]]]  # _probe_state_shapes' results, once made

    def __init__(self, graph: dict[str, Any], tensors: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        self.graph = graph
        self.tensors = dict(tensors)
        self.metadata = dict(metadata or {})
        self.opset = int(graph["opset"])
        self.inputs: list[dict[str, Any]] = graph["inputs"]  # name, dtype, shape (ints, symbols, None)
        self.outputs = [o["name"] for o in graph["outputs"]]
        # (state input, output fed back as it): the graph's explicit state
        self.state_pairs = cast("list[tuple[str, str]]", [tuple(p) for p in graph.get("state_pairs", [])])
        # plans by input shapes, and refusals (error type, args) of shapes that cannot be planned
        self._plans: dict[tuple[Any, ...], Plan | tuple[type[BaseException], tuple[Any, ...]]] = {}
        self._stacks: dict[Any, tuple[Any, _core.Stack]] = {}
        self._derived: dict[tuple[int, str], tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"GraphModel(inputs={[i['name'] for i in self.inputs]}, outputs={self.outputs}, "
                f"nodes={len(self.graph['nodes'])})")

    @property
    def feed_names(self) -> list[str]:
        """Inputs a stream's caller feeds: all inputs but the explicit state ones."""
        carried = {a for a, _ in self.state_pairs}
        return [i["name"] for i in self.inputs if i["name"] not in carried]

    @property
    def input_names(self) -> list[str]:
        return self.feed_names

    def _as_feeds(self, inputs: Any, lengths: Optional[npt.ArrayLike], state: Optional[Mapping[str, Any]], who: str
                  ) -> Any:
        """run()/feed()'s arguments as one dict of inputs: ``lengths`` goes to the input that
        feeds the recurrent layers' sequence_lens, ``state`` ({state input: array}, or a
        stream's get_state() structure, of which only "inputs" applies) to the state inputs."""
        feeds = dict(inputs) if isinstance(inputs, dict) else None
        extra = {}
        if lengths is not None:
            names = sorted(_length_inputs(self))
            if len(names) != 1:
                raise ValueError(f"{who}: lengths= needs one input that feeds the recurrent layers' "
                                 f"sequence_lens; this model has {names or 'none'}")
            extra[names[0]] = lengths
        if state is not None:
            if not isinstance(state, dict):
                raise TypeError(f"{who}: state must be a dict {{state input: array}}, got {type(state).__name__}")
            if set(state) <= {"layers", "inputs", "context"} and isinstance(state.get("inputs", {}), dict):
                if state.get("layers") or state.get("context"):
                    raise ValueError(f"{who}: a whole-sequence run starts its recurrent layers from their initial "
                                     "state; a state with 'layers' or 'context' is a stream's "
                                     "(model.stream(state=...))")
                state = state.get("inputs", {})
            names = [a for a, _ in self.state_pairs]
            unknown = sorted(map(str, set(state) - set(names)))
            if unknown:
                raise ValueError(f"{who}: state has {unknown}, not state input(s) of this model "
                                 f"(its state inputs: {names or 'none'})")
            extra.update(state)
        if not extra:
            return inputs
        if feeds is None:
            data = [n for n in self.feed_names if n not in extra]
            if len(data) != 1:
                raise TypeError(f"{who}: this model takes several inputs {data}; pass a dict name -> array")
            feeds = {data[0]: inputs}
        for n, v in extra.items():
            if n in feeds:
                raise ValueError(f"{who}: input {n!r} given twice (in the dict and as a keyword)")
            feeds[n] = v
        return feeds

    def _as_returned(self, inputs: object, out: dict[str, Array], outputs: Optional[Iterable[str]] = None
                     ) -> dict[str, Array] | Returned:
        """A dict of outputs for a dict of inputs, else the outputs in order (one array alone)."""
        if isinstance(inputs, dict):
            return out
        names = self.outputs if outputs is None else list(outputs)
        vals = tuple(out[n] for n in names if n in out)
        return vals[0] if len(vals) == 1 else vals

    def _derived_for(self, source: Any, tag: str, fn: Callable[[], Any]) -> Any:
        key = (id(source), tag)
        with self._lock:
            hit = self._derived.get(key)
            if hit is None or hit[0] is not source:
                hit = (source, fn())
                self._derived[key] = hit
            return hit[1]

    def _stack_for(self, handler: Any, consts: Any) -> tuple[Any, _core.Stack]:
        node = handler.node
        ins = node["inputs"]
        weights = [ins[k] if k < len(ins) else "" for k in (1, 2, 3, 7)]
        if all(not w or w in self.tensors for w in weights):
            # layers sharing their weights and attributes (e.g. the steps of an unrolled
            # cell loop) share one packed stack
            key = (node["op"], tuple(weights), repr(sorted(node.get("attrs", {}).items())))
        else:
            key = node["outputs"][0] or node.get("name")
        with self._lock:
            if key not in self._stacks:
                layer = handler.layer(consts)
                spec = layer._spec()  # the storage its kernels read: rnnengine/runtime/compact.py
                self.__dict__.setdefault("_kernel_dtypes", {})[str(node.get("name") or key)] = \
                    compact.apply(self, node, consts, spec)
                cache = getattr(self, "panel_cache", None)
                if cache is not None:  # load(shared=True): the panels from the shared cache file
                    stack = cache.share(f"{self.weight_dtype}|{key!r}", spec, lambda: _core.Stack([spec]))
                else:
                    stack = _core.Stack([spec])
                self._stacks[key] = (layer, stack)
            return self._stacks[key]

    def plan(self, feeds: Mapping[str, Array], streaming: bool = False, time_axes: Optional[Mapping[str, int]] = None,
             aux: Optional[Mapping[str, int]] = None, finishing: bool = False) -> Plan:
        """The plan for these input shapes (cached). A stream's plan also depends on its
        inputs' time axes and on the context it carries (rnnengine/streaming.py)."""
        key = (streaming, finishing, tuple(sorted((time_axes or {}).items())), tuple(sorted((aux or {}).items()))) \
            + tuple((n, a.shape, a.dtype.str) for n, a in sorted(feeds.items()))
        plan = self._plans.get(key)
        if isinstance(plan, tuple):  # these shapes were refused before: the same error, not planned again
            raise plan[0](*plan[1])
        if plan is None:
            try:
                planner = Planner(self, {n: (a.shape, a.dtype) for n, a in feeds.items()}, streaming,
                                  time_axes=time_axes, aux=aux, finishing=finishing)
                plan = Plan(planner)
            except (UnsupportedError, ValueError, TypeError) as e:
                # A refusal depends on the shapes only, so it is kept too: deciding what a new
                # stream can do plans shapes that fail (too short for a convolution, a batch
                # other than the state's), ~10 ms per stream of silero-vad when planned again
                # for every stream. Not kept: a LimitError (max_planning_seconds is wall time),
                # an error caused by running out of memory or stack (the planner reports a
                # failed constant fold as UnsupportedError), an error type that does not
                # rebuild from its arguments.
                if not isinstance(e, LimitError) and not _transient(e) and _rebuilds(e):
                    with self._lock:
                        if len(self._plans) > 64:
                            self._plans.clear()
                        self._plans[key] = (type(e), e.args)
                raise
            with self._lock:
                if len(self._plans) > 64:
                    self._plans.clear()
                self._plans[key] = plan
        return plan

    def _check_feeds(self, inputs: Any, allow_missing: Collection[str] = ()) -> dict[str, Array]:
        """The inputs as contiguous arrays of the declared dtypes, checked against the
        declared shapes; mistakes are reported in the user's terms (the input's name, its
        axes as batch / time / features, the shape given), not the engine's."""
        if not isinstance(inputs, dict):
            names = [n for n in self.feed_names]
            if len(names) != 1:
                raise TypeError(f"this model takes several inputs {names}; pass a dict name -> array")
            inputs = {names[0]: inputs}
        declared = {i["name"]: i for i in self.inputs}
        for name in inputs:
            if name not in declared:
                raise ValueError(f"unknown input {name!r}; the model's inputs are {list(declared)}")

        def roles() -> dict[str, dict[int, str]]:
            return axis_roles(self)

        def axis_label(name: str, k: int) -> str:
            spec = declared[name]
            d = spec["shape"][k]
            role = roles().get(name, {}).get(k)
            if isinstance(d, int) and d >= 0:
                sequence = "time" in roles().get(name, {}).values()
                return f"{d} features" if sequence and k == len(spec["shape"]) - 1 else str(d)
            return role or (d if isinstance(d, str) and not re.fullmatch(r"(s|unk__)\d+", d) else "?")

        def described(name: str) -> str:
            return "(" + ", ".join(axis_label(name, k) for k in range(len(declared[name]["shape"]))) + ")"
        feeds = {}
        for name, spec in declared.items():
            if name not in inputs:
                if name in allow_missing:
                    continue
                raise ValueError(f"input {name!r} is missing (the model's inputs are {list(declared)})")
            arr = np.asarray(inputs[name])
            want = np.dtype(NP_DTYPES[spec["dtype"]])
            if arr.dtype != want:
                if want.kind in "iu" and arr.dtype.kind in "iu":
                    # NumPy's default int64 fed to an int32 input (sequence_lens): converted only
                    # when every value fits, never wrapped (2**32 + 2 is not 2)
                    info = np.iinfo(want)
                    if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
                        raise ValueError(f"input {name!r} is {want}: its values {int(arr.min())}..{int(arr.max())} "
                                         f"(given as {arr.dtype}) do not fit")
                    arr = arr.astype(want)
                elif want.kind == arr.dtype.kind:
                    with np.errstate(over="ignore"):
                        new = arr.astype(want)
                    if want.kind == "f" and arr.size and not np.array_equal(np.isfinite(new), np.isfinite(arr)):
                        raise ValueError(f"input {name!r} is {want}: values given as {arr.dtype} overflow it")
                    arr = new
                else:
                    raise TypeError(f"input {name!r} must be {want}, got {arr.dtype} (shape {arr.shape})")
            shape = spec["shape"]
            if shape is not None:
                if arr.ndim != len(shape):
                    hint = ""
                    if arr.ndim == len(shape) - 1 and "batch" in roles().get(name, {}).values():
                        hint = "; a batch of one still needs its batch axis (of size 1)"
                    raise ValueError(f"input {name!r} must have {len(shape)} dimensions {described(name)}, "
                                     f"got shape {arr.shape}{hint}")
                for k, (d, g) in enumerate(zip(shape, arr.shape)):
                    if isinstance(d, int) and d >= 0 and d != g:
                        label = axis_label(name, k)
                        if label.endswith(" features"):
                            raise ValueError(f"input {name!r} has {g} features per step, the model takes {d}: "
                                             f"shape {described(name)}, got {arr.shape}")
                        raise ValueError(f"input {name!r} must have size {d} in dimension {k}: shape "
                                         f"{described(name)}, got {arr.shape}")
            vocab = self._token_inputs().get(name)
            if vocab is not None and arr.size:
                if arr.size <= 64:  # a token per call: Python's min/max cost less than NumPy's
                    vals = arr.ravel().tolist()
                    lo, hi = min(vals), max(vals)
                else:
                    lo, hi = arr.min(), arr.max()
                if lo < -vocab or hi >= vocab:
                    bad = arr[(arr < -vocab) | (arr >= vocab)].reshape(-1)[0]
                    raise ValueError(f"input {name!r} holds token index {bad}, outside the vocabulary of {vocab} "
                                     f"(ids 0..{vocab - 1}; as ONNX Gather, -{vocab}..-1 count from the end)")
            feeds[name] = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)  # keeps rank 0
        # a symbol naming axes of several inputs (x's batch and lens's) takes one size; refused
        # here when the axis is a known batch or time axis (other symbols are left to planning)
        shared = self.__dict__.get("_shared_dims")
        if shared is None:  # (input, axis) pairs whose symbol also names another input's axis
            owners: dict[str, list[tuple[str, int]]] = {}
            for i in self.inputs:
                for k, d in enumerate(i["shape"] or ()):
                    if isinstance(d, str):
                        owners.setdefault(d, []).append((i["name"], k))
            shared = self.__dict__["_shared_dims"] = [(n, k, d) for d, o in owners.items() if len(o) > 1
                                                      for n, k in o]
        seen: dict[str, tuple[str, int, int]] = {}
        for name, k, d in shared:
            fed = feeds.get(name)
            if fed is None:
                continue
            n0, k0, g0 = seen.setdefault(d, (name, k, fed.shape[k]))
            if g0 != fed.shape[k]:
                role = roles().get(name, {}).get(k) or roles().get(n0, {}).get(k0)
                if role:
                    raise ValueError(f"input {name!r} has {role} {fed.shape[k]} (shape {fed.shape}) but input "
                                     f"{n0!r} has {role} {g0} (shape {feeds[n0].shape})")
        return feeds

    def _token_inputs(self) -> dict[str, int]:
        """{input name: vocabulary size} of the inputs that index an embedding table (cached)."""
        tokens = self.__dict__.get("_tokens")
        if tokens is None:
            tokens = {n: r[1] for n, r in input_roles(self).items() if r[0] == "tokens"}
            self.__dict__["_tokens"] = tokens
        return tokens

    @overload
    def run(self, inputs: Feeds, lengths: Optional[npt.ArrayLike] = None,
            state: State | Mapping[str, Any] | None = None) -> dict[str, Array]: ...
    @overload
    def run(self, inputs: npt.ArrayLike, lengths: Optional[npt.ArrayLike] = None,
            state: State | Mapping[str, Any] | None = None) -> Returned: ...

    def run(self, inputs: Feeds | npt.ArrayLike, lengths: Optional[npt.ArrayLike] = None,
            state: State | Mapping[str, Any] | None = None) -> dict[str, Array] | Returned:
        """Runs the graph once on whole sequences (no state kept). ``inputs``: a dict name ->
        array (returns a dict output name -> array), or the one array of a model with one
        input to feed (returns the outputs in ``outputs`` order, one array alone).
        ``lengths``: the valid steps per row, for the input that feeds the recurrent layers'
        sequence_lens. ``state``: {state input: array}; explicit state inputs default to
        zeros when omitted."""
        if self.mapped_file is not None:  # a truncated map would kill the process (SIGBUS)
            self.mapped_file.check_unchanged()
        given = inputs
        inputs = self._as_feeds(inputs, lengths, state, "run()")
        feeds = self._check_feeds(inputs, allow_missing={a for a, _ in self.state_pairs})
        for a, _ in self.state_pairs:
            if a not in feeds:
                feeds[a] = self._zero_state(a, feeds)
        if self.threads > 1:  # batch rows over threads when provably exact (rnnengine/runtime/split.py)
            out = split.run(self, feeds)
            if out is not None:
                return self._as_returned(given, out)
        plan = self.plan(feeds)  # (rows not split: each recurrent product splits by gate rows)
        return self._as_returned(given, plan.execute(plan.context(), feeds, {}, threads=self.threads))

    def _zero_state(self, name: str, feeds: Mapping[str, Array]) -> Array:
        """Zeros for the explicit state input ``name`` (a stream's start, or run() without
        it). Its shape comes from the graph: static dimensions as declared, named ones from
        the inputs fed with the same name, and any still unknown (e.g. silero-vad's
        ``state: [2, ?, 128]``) from the graph itself: the one shape among the sizes of the
        fed inputs' dimensions that the graph accepts and maps to itself (the paired output
        comes out with the shape of the state that went in)."""
        spec = next((i for i in self.inputs if i["name"] == name), None)
        if spec is None:
            raise UnsupportedError(f"state pair {name!r}: the model has no input {name!r} to carry the state in "
                                   f"(inputs: {[i['name'] for i in self.inputs]})")
        declared = self._declared_state_shape(spec, feeds)
        shape: Iterable[Optional[int]] = declared
        if any(d is None for d in declared):
            shape = self._probe_state_shapes(feeds)[name]
        return self._zero_array(name, [int(cast(int, d)) for d in shape], spec["dtype"])  # every dimension known now

    def _zero_array(self, name: str, dims: list[int], dtype: str) -> Array:
        """A zero state for input ``name``, refused (LimitError) past max_tensor_elements: a
        declared dimension of 2**31 must not allocate gigabytes (fuzz: MemoryError before)."""
        most = limits.resolve(getattr(self, "limits", None)).max_tensor_elements
        if math.prod(dims) > most:
            limits.refuse(f"state input {name!r}", f"its zero state of shape {tuple(dims)} would hold "
                          f"{math.prod(dims)} elements", "max_tensor_elements", most)
        return np.zeros(dims, NP_DTYPES[dtype])

    def _check_state_positions(self, feeds: Mapping[str, Array]) -> None:
        """Before a stream first runs with these input shapes: every paired output must hand
        each state element back to its own place (rnnengine.runtime.states.check_state_positions)."""
        if not self.state_pairs:
            return
        sig = tuple((n, a.shape, a.dtype.str) for n, a in sorted(feeds.items()))
        done = self.__dict__.setdefault("_positions_checked", {})
        if sig not in done:
            with limits.using(self.limits):
                done[sig] = check_state_positions({**self.graph, "state_pairs": self.state_pairs}, self.tensors, feeds)

    def _declared_state_shape(self, spec: dict[str, Any], feeds: Mapping[str, Array]) -> list[Optional[int]]:
        """The state's shape with the sizes the declaration and the fed inputs give (None for
        a dimension neither tells)."""
        dims = {}
        for i in self.inputs:
            if i["name"] in feeds and i["shape"] is not None:
                for d, g in zip(i["shape"], feeds[i["name"]].shape):
                    if isinstance(d, str):
                        dims[d] = g
        if spec["shape"] is None:
            raise ValueError(f"state input {spec['name']!r} has no declared rank: pass it explicitly "
                             f"(to a stream: stream.set_state({{'inputs': {{{spec['name']!r}: array}}}}) "
                             "before the first call)")
        shape: list[Optional[int]] = []
        for k, d in enumerate(spec["shape"]):
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            elif d in dims:
                shape.append(dims[d])
            else:  # tf2onnx gives one batch unrelated symbols: the data's batch; else unknown (None)
                shape.append(self._batch_of(spec["name"], k, feeds))
        return shape

    def _probe_state_shapes(self, feeds: Mapping[str, Array]) -> dict[str, tuple[int, ...]]:
        """Shapes of every explicit state input, unknown dimensions found by planning: each
        unknown dimension takes, in turn, each size of a fed input's dimensions (with one
        state input, these are the only sizes a state dimension of a batch can take); a
        combination is kept when planning succeeds and every paired output has its input's
        shape. Exactly one such combination must exist, else a ValueError asks for the state."""
        data = {n: a for n, a in feeds.items() if n not in {p for p, _ in self.state_pairs}}
        sig = tuple((n, a.shape, a.dtype.str) for n, a in sorted(data.items()))
        hit: Optional[dict[str, tuple[int, ...]]] = self.__dict__.setdefault("_probed", {}).get(sig)
        if hit is not None:
            return hit
        specs = {a: next(i for i in self.inputs if i["name"] == a) for a, _ in self.state_pairs}
        partial = {a: self._declared_state_shape(spec, data) for a, spec in specs.items()}
        holes = [(a, k) for a, shp in partial.items() for k, d in enumerate(shp) if d is None]
        sizes = sorted({int(g) for arr in data.values() for g in arr.shape})
        if len(sizes) ** len(holes) > 256:
            sizes = []
        fits, errors = [], []
        for combo in (np.array(np.meshgrid(*[sizes] * len(holes))).reshape(len(holes), -1).T if sizes else []):
            shapes: dict[str, list[Any]] = {a: list(shp) for a, shp in partial.items()}  # ints once filled
            for (a, k), g in zip(holes, combo):
                shapes[a][k] = int(g)
            trial = dict(data)
            trial.update({a: self._zero_array(a, shapes[a], specs[a]["dtype"]) for a in shapes})
            try:
                plan = self.plan(trial)
            except LimitError:
                raise  # a trial past a limit proves nothing about the state's shape: refused
            except (UnsupportedError, ValueError) as e:
                errors.append(e)
                continue
            got = dict(plan.outputs)
            if all(tuple(got[o].shape) == tuple(shapes[a]) for a, o in self.state_pairs):
                fits.append({a: tuple(v) for a, v in shapes.items()})
        if not fits and errors and len({str(e) for e in errors}) == 1:
            raise errors[0]  # every trial fails the same way, whatever the state's shape
        unknown = ", ".join(f"dimension {k} of {a!r}" for a, k in holes)
        if len(fits) != 1:
            why = (f"the graph maps several shapes to themselves ({[f for f in fits]})" if fits
                   else f"no shape with sizes from the inputs ({sizes}) passes through the graph unchanged")
            names = [a for a, _ in self.state_pairs]
            raise ValueError(f"cannot tell the size of {unknown} from the inputs: {why}; pass the state "
                             f"explicitly (to a stream: stream.set_state({{'inputs': {{{names[0]!r}: array}}}}) "
                             "before the first call)")
        self._probed[sig] = fits[0]
        return fits[0]

    def time_axes(self, feeds: Mapping[str, Array], first_chunk: bool = False) -> dict[str, int]:
        """{input name: axis} of the inputs whose axis is the recurrent time axis: found by
        planning with that symbolic axis much longer (every input axis named by the same
        symbol together, e.g. the data and a mask) and seeing a recurrent layer's T change, or
        a loop over time unroll further, while the batch sizes stay. A stream is fed chunks
        along these axes.

        The feeds may be a stream's first chunk, too short to tell: a convolution with a long
        kernel or stride plans no frame (or refuses) from a few samples, so neither length
        reaches a recurrent layer. A symbol's axes are then tried much longer too (up to
        4096), rather than taking the input for one without time (whose chunks would then
        run as separate sequences).

        ``first_chunk``: the feeds are a stream's first call, and its answer is final. When
        they reach a recurrent layer as no frame at all and no longer probe plans (a resource
        limit refusing them, say), the time axis cannot be told: ValueError, rather than {}
        (which would run every chunk as a separate sequence)."""
        # planning reads shapes and dtypes only, and so does this answer: kept per shapes and
        # limits in force (each new stream of a model in use asks it again at its first call);
        # an answer that a limit shaped (a probe refused) is not kept
        lim = limits.resolve(getattr(self, "limits", None))
        memo_key = (first_chunk, lim) + tuple((n, a.shape, a.dtype.str) for n, a in sorted(feeds.items()))
        memo: dict[Any, dict[str, int]] = self.__dict__.setdefault("_time_axes_memo", {})
        hit = memo.get(memo_key)
        if hit is not None:
            return dict(hit)
        found, sure = _TimeAxes(self, feeds, lim).find(first_chunk)
        if sure:
            with self._lock:
                if len(memo) > 64:
                    memo.clear()
                memo[memo_key] = dict(found)
        return found

    def example_feeds(self, time: int = 23, batch: int = 2) -> Optional[dict[str, Array]]:
        """Zero inputs of the declared shapes (symbolic dimensions: `batch` for names that look
        like a batch, else `time`, a length unlikely to equal any other dimension), for
        deciding what a stream can do before it is fed."""
        feeds = {}
        carried = {a for a, _ in self.state_pairs}
        for spec in self.inputs:
            if spec["name"] in carried:
                continue
            shape = []
            for d in spec["shape"] or ():
                if isinstance(d, int) and d >= 0:
                    shape.append(d)
                else:
                    low = str(d).lower()
                    shape.append(batch if ("batch" in low or low in ("b", "n")) else time)
            most = limits.resolve(getattr(self, "limits", None)).max_tensor_elements
            # every dim counts, a 0 beside it too: NumPy refuses (0, 2**63 - 1) as "too big"
            # (fuzz, eleventh session: a ValueError from np.zeros before)
            if math.prod(max(d, 1) for d in shape) > most:  # a declared 2**40 (fuzz: MemoryError before)
                limits.refuse(f"input {spec['name']!r}", f"its declared shape {tuple(shape)} holds "
                              f"{math.prod(max(d, 1) for d in shape)} elements (counting 0 as 1)",
                              "max_tensor_elements", most)
            feeds[spec["name"]] = np.zeros(shape, NP_DTYPES[spec["dtype"]])
        for a in carried:
            try:
                feeds[a] = self._zero_state(a, feeds)
            except ValueError:
                return None
        return feeds

    def _batch_of(self, name: str, axis: int, feeds: Mapping[str, Array]) -> Optional[int]:
        """The batch size of the fed data when axis `axis` of input `name` is a batch axis."""
        roles = axis_roles(self)
        if roles.get(name, {}).get(axis) != "batch":
            return None
        for n, arr in feeds.items():
            for k, r in roles.get(n, {}).items():
                if r == "batch" and n != name and k < arr.ndim:
                    return int(arr.shape[k])
        return None

    def stream(self, batch_size: Optional[int] = None, state: State | Mapping[str, Any] | None = None
               ) -> GraphStream:
        """A stream: feed it chunks (any number of time steps) or single steps, and it carries
        every recurrent state on from call to call. ``batch_size``: the rows it carries (the
        first call's when None; a call with another batch is refused). ``state``: where it
        starts (get_state()'s structure). Raises NotStreamableError, naming the node and the
        reason, when a chunk-by-chunk run could differ from the whole-sequence run."""
        if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        s: GraphStream
        if self.mapped_file is not None:  # load(..., mmap=True): every call checks the file
            self.mapped_file.check_unchanged()
            s = _MappedGraphStream(self)
        else:
            s = GraphStream(self)
        s.batch_size = None if batch_size is None else int(batch_size)
        if state is not None:
            s.set_state(state)
        return s


_BUSY = ("this stream is being used by another thread at the same time; a stream carries one "
         "sequence, so use it from one thread at a time (or fork() it)")


class GraphStream(Stream):
    """A :class:`rnnengine.Stream` of a graph model. State held between calls: recurrent layers' own state, the graph's explicit state
    inputs (fed from the paired outputs of the previous call), and the context that ops
    along time carry (the last frames a convolution still needs; rnnengine/streaming.py).

    Whether the graph can be streamed is decided when the stream is made: every op between
    a time-carrying input and an output must give, chunk by chunk, exactly what it gives on
    the whole sequence; otherwise NotStreamableError names the node and the reason."""

    def __init__(self, model: GraphModel) -> None:
        self.model = model
        self._paired_outputs = {o for _, o in model.state_pairs}
        self._carried_names = [a for a, _ in model.state_pairs]
        # the bound call (rnnengine._core.GraphStep) of the last plan, when its calls can repeat
        # it (one that leaves the carried context as it found it): feed() and step() try it first
        self._fast: Optional[_core.GraphStep] = None
        self._layer_state: dict[str, npt.NDArray[np.float32]] = {}  # recurrent layer key -> float32 vector
        # key -> the shapes of its parts (the plan's state_parts, known from the first call; before
        # it, the shapes set_state was given, checked against the plan's at the first call)
        self._parts: dict[str, tuple[tuple[int, ...], ...]] = {}
        self._given: dict[str, tuple[tuple[int, ...], ...]] = {}
        self._carried: dict[str, Array] = {}  # explicit state input name -> array
        self._aux: dict[str, int] = {}  # context carried by ops along time: key -> int
        self._steps: dict[int, _core.GraphStep] = {}  # id(plan) -> its bound call (buffers, state)
        self._taxes: Optional[dict[str, int]] = None  # {input name: time axis}, known from the first call
        self._last: Optional[dict[str, Array]] = None  # the last call's feeds (finish() repeats their other axes)
        self._finished = False
        self._busy = threading.Lock()  # held during a call: concurrent use raises
        self.delay = 0           # input steps by which outputs along time trail the input
        self.output_axes: dict[str, Optional[int]] = {}  # output name -> its time axis (None: a final state or no time)
        self._tail = False       # the plan holds frames back until finish()
        self._decide()

    def _decide(self) -> None:
        """Plans the graph for example inputs (zeros of the declared shapes) as a stream, so
        that a graph that cannot be streamed is refused now rather than at the first call."""
        m = self.model
        feeds = m.example_feeds()
        if feeds is None:
            return
        try:
            taxes = m.time_axes(feeds)
            plan = m.plan(feeds, streaming=True, time_axes=taxes)
        except NotStreamableError:
            raise
        except Exception:  # e.g. shapes the example cannot guess: decided at the first call
            return
        if not taxes:
            # the example's lengths are guesses (every symbolic axis but a batch's 23 long): no
            # time axis found in them may still be one in the data (two symbols of one
            # length, tf2onnx's unk__N, tell apart only by their fed lengths), so the first
            # call decides; a plan without time axes checks nothing about streaming anyway
            return
        self._taxes = taxes
        self.delay = plan.delay
        self.output_axes = {name: t for name, (t, final, lag) in plan.time.items()}

    def reset(self) -> None:
        self._layer_state.clear()
        self._given = {}
        self._carried.clear()
        self._aux = {}
        self._fast = None
        self._last = None
        self._finished = False

    def fork(self) -> GraphStream:
        other = GraphStream.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other._fast, other._steps, other._busy = None, {}, threading.Lock()
        other._layer_state = {k: v.copy() for k, v in self._layer_state.items()}
        other._parts, other._given = dict(self._parts), dict(self._given)
        other._carried = {k: v.copy() for k, v in self._carried.items()}
        other._aux = dict(self._aux)
        return other

    def get_state(self) -> State:
        """Every piece of state the stream holds, as copies, in the structure of
        :class:`rnnengine.State` (the same for every model)::

            {"layers": {key: (h, c) | h | array}, "inputs": {name: array}, "context": {key: int}}

        "layers": the state of each recurrent layer whose initial state is not a graph input,
        keyed by the layer's first output: ``(h, c)`` for an LSTM, ``h`` otherwise, each
        float32 (num_directions, batch, hidden_size); a Loop carrying state
        ("<output>:loop<k>"): its value; a convolution along time ("conv:<output>"): the input
        frames it keeps, (batch, channels, frames); a recurrent layer fed sequence_lens
        ("<output>:started"): per row 1.0 once it has had a step (a row at length 0 then ended
        its sequence in an earlier call and keeps its state; one that never started gives a
        zero final state, as a whole run of an empty sequence). "inputs": the graph's explicit state, one
        array per state input of ``model.state_pairs``, with that input's dtype and shape. Both
        are empty before the first call (the stream then starts from the model's initial
        state). "context": what ops along time carry (rnnengine/ops/streaming.py): per
        convolution the frames it keeps (or, negative, still skips), per Pad whether its
        leading padding was given."""
        layers: dict[str, Any] = {}
        for k, v in self._layer_state.items():
            shapes = self._parts.get(k) or self._given.get(k) or ((v.size,),)
            pieces, at = [], 0
            for shape in shapes:
                n = int(np.prod(shape))
                pieces.append(v[at:at + n].reshape(shape).copy())
                at += n
            layers[k] = tuple(pieces) if len(pieces) > 1 else pieces[0]
        return {"layers": layers,
                "inputs": {k: v.copy() for k, v in self._carried.items()},
                "context": dict(self._aux)}

    def _layer_keys(self) -> set[str]:
        """Keys of "layers" the model can have: recurrent nodes' first outputs, Loop outputs."""
        keys: set[Any] = set()  # first outputs (the node's name for an unnamed one)
        loops: set[str] = set()

        def visit(nodes: list[Node]) -> None:
            for n in nodes:
                if n["op"] in ("LSTM", "GRU", "RNN"):
                    keys.add(n["outputs"][0] or n.get("name"))
                    keys.add(f"{n['outputs'][0] or n.get('name')}:started")  # with sequence_lens
                if n["op"] == "Conv":  # the frames a conv along time carries (rnnengine/streaming.py)
                    keys.add("conv:" + (n["outputs"][0] or n.get("name", "")))
                if n["op"] == "Loop":
                    loops.update(f"{o or n.get('name')}:loop{k}" for k, o in enumerate(n["outputs"]))
                for v in n.get("attrs", {}).values():
                    if isinstance(v, dict) and "nodes" in v:
                        visit(v["nodes"])
        visit(self.model.graph["nodes"])
        return keys | loops

    def set_state(self, state: State | Mapping[str, Any]) -> None:
        """Replaces the stream's state with ``state``, structured as get_state() returns it (of
        this stream, a fork, or another stream of the same model and batch). Everything is
        checked before anything changes, and a mistake raises TypeError / ValueError naming
        it: ``state`` is a dict with the keys "layers" and "inputs" only; "inputs" names
        every state input of the model (``model.state_pairs``) and nothing else, each an array
        of that input's dtype and declared shape (the shape the stream carries, once it has
        run); "layers" holds exactly the layers the stream holds once it has run, each a 1-D
        float vector of the same size. Before the first call, empty (or absent) "layers" /
        "inputs" mean the model's initial state; after it, use reset() for that."""
        m = self.model
        structure = ("{'layers': {key: vector}, 'inputs': {name: array}, 'context': {key: int}}, as "
                     "get_state() returns")
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict {structure}; got {type(state).__name__}")
        unknown = sorted(map(str, set(state) - {"layers", "inputs", "context"}))
        if unknown:
            raise ValueError(f"state has unknown key(s) {unknown}; a stream's state is {structure}")
        layers, inputs, context = state.get("layers", {}), state.get("inputs", {}), state.get("context", {})
        for part, d in (("layers", layers), ("inputs", inputs), ("context", context)):
            if not isinstance(d, dict):
                raise TypeError(f"state[{part!r}] must be a dict, got {type(d).__name__}")
        started = bool(self._layer_state) or bool(self._carried)
        # explicit state: the model's state inputs, each with its declared dtype and shape
        specs = {i["name"]: i for i in m.inputs}
        names = [a for a, _ in m.state_pairs]
        extra = sorted(map(str, set(inputs) - set(names)))
        if extra:
            raise ValueError(f"state['inputs'] has {extra}, which {'are' if len(extra) > 1 else 'is'} not state "
                             f"input(s) of this model (its state inputs: {names or 'none'})")
        missing = [a for a in names if a not in inputs]
        if missing and (inputs or started):
            raise ValueError(f"state['inputs'] is missing {missing} (this model's state inputs are {names}"
                             f"{'; reset() returns to the initial state' if started else ''})")
        carried = {}
        for a, v in inputs.items():
            spec, arr = specs[a], np.asarray(v)
            want = np.dtype(NP_DTYPES[spec["dtype"]])
            if arr.dtype != want:
                if arr.dtype.kind != want.kind and not (want.kind == "i" and arr.dtype.kind == "u"):
                    raise TypeError(f"state['inputs'][{a!r}] must be {want}, got {arr.dtype}")
                arr = arr.astype(want)
            shape = spec["shape"]
            if shape is not None and (arr.ndim != len(shape) or any(
                    isinstance(d, int) and d != g for d, g in zip(shape, arr.shape))):
                roles = axis_roles(m).get(a, {})
                shown = ", ".join(str(d) if isinstance(d, int) else roles.get(k, str(d)) for k, d in enumerate(shape))
                raise ValueError(f"state['inputs'][{a!r}] must have shape ({shown}), got {arr.shape}")
            cur = self._carried.get(a)
            if cur is not None and cur.shape != arr.shape:
                raise ValueError(f"state['inputs'][{a!r}] has shape {arr.shape} but this stream carries {a!r} "
                                 f"of shape {cur.shape}: a stream keeps its batch size (use a new stream)")
            carried[a] = np.array(arr, copy=True)
        # recurrent layers' own state
        allowed = set(self._layer_state) if self._layer_state else self._layer_keys()
        extra = sorted(map(str, set(layers) - allowed))
        if extra:
            raise ValueError(f"state['layers'] has {extra}, which this stream does not hold (its layers: "
                             f"{sorted(allowed) or 'none'})")
        missing = sorted(k for k in self._layer_state if k not in layers)
        if missing:
            raise ValueError(f"state['layers'] is missing {missing} (this stream holds "
                             f"{sorted(self._layer_state)}; reset() returns to the initial state)")
        new_layers, given = {}, {}
        for k, v in layers.items():
            parts = self._parts.get(k)
            label = f"state['layers'][{k!r}]"
            if isinstance(v, (list, tuple)):
                pieces = list(v)
                if not pieces or len(pieces) > 2:
                    raise ValueError(f"{label} must be (h, c) for an LSTM layer or one array, got a "
                                     f"{type(v).__name__} of {len(pieces)}")
            else:
                pieces = [v]
            if parts is not None and len(parts) != len(pieces):
                shape = "a pair (h, c) of arrays" if len(parts) == 2 else "one array (h alone, or the node's value)"
                raise ValueError(f"{label} must be {shape} {' and '.join(map(str, parts))}, got "
                                 f"{'a pair' if len(pieces) == 2 else 'one array'}")
            arrays = []
            for j, piece in enumerate(pieces):
                arr = np.asarray(piece)
                what = f"{label}{' ' + 'hc'[j] if len(pieces) == 2 else ''}"
                if arr.dtype.kind != "f":
                    raise TypeError(f"{what} must be a float32 array, got {arr.dtype}")
                if parts is not None and arr.shape != parts[j]:
                    raise ValueError(f"{what} must have shape {parts[j]} (as this stream holds it), got "
                                     f"{arr.shape}: the state is of another batch size or another model")
                arrays.append(np.asarray(arr, np.float32))
            given[k] = tuple(a.shape for a in arrays)
            new_layers[k] = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float32, copy=True)
        aux = {}
        for k, v in context.items():
            if not isinstance(k, str) or not k.startswith(("conv:", "pad:")) or isinstance(v, bool) or \
                    not isinstance(v, (int, np.integer)):
                raise ValueError(f"state['context'] entry {k!r}: {v!r} is not what get_state() returns "
                                 "(keys 'conv:<output>' / 'pad:<output>' with integer values)")
            aux[k] = int(v)
        self._fast = None
        self._layer_state = new_layers
        self._given = {k: g for k, g in given.items() if k not in self._parts}  # checked at the first call
        self._carried = carried
        self._aux = aux

    def _check_batch(self, feeds: Mapping[str, Array]) -> None:
        """A stream keeps its batch size: refuses, in the user's terms, data whose batch differs
        from the first call's (or from the state given to set_state), before planning would
        fail on engine internals. ``feeds``: the checked data inputs of a call."""
        if self.batch_size is not None and not self.__dict__.get("_batch_checked"):
            roles = axis_roles(self.model)
            for n, a in feeds.items():
                b = next((a.shape[k] for k, r in roles.get(n, {}).items() if r == "batch" and k < a.ndim), None)
                if b is not None and b != self.batch_size:
                    raise ValueError(f"input {n!r} has batch {b} (shape {a.shape}) but this stream was made with "
                                     f"batch_size={self.batch_size}")
            self._batch_checked = True
        fresh = not self._layer_state and not self._carried
        first = None if fresh else self.__dict__.get("_first_shapes")
        if first is None:
            self._first_shapes = {n: a.shape for n, a in feeds.items()}
            if not self._carried:  # nothing to compare with yet
                return
        elif all(first.get(n) == a.shape for n, a in feeds.items()):
            return
        roles = axis_roles(self.model)

        def batch(name: str, shape: tuple[int, ...]) -> Optional[int]:
            return next((shape[k] for k, r in roles.get(name, {}).items() if r == "batch" and k < len(shape)),
                        None)
        for n, a in feeds.items():
            b = batch(n, a.shape)
            if b is None:
                continue
            if first is not None and n in first and batch(n, first[n]) not in (None, b):
                raise ValueError(f"input {n!r} has batch {b} (shape {a.shape}) but this stream was started with "
                                 f"batch {batch(n, first[n])} (shape {first[n]}): a stream keeps its batch size; "
                                 "start another with model.stream()")
            for s_name, st in self._carried.items():
                sb = batch(s_name, st.shape)
                if sb is not None and sb != b:
                    raise ValueError(f"input {n!r} has batch {b} (shape {a.shape}) but this stream's state "
                                     f"{s_name!r} is for batch {sb} (shape {st.shape}): a stream keeps its batch "
                                     "size; start another with model.stream()")

    def _state_mismatch(self, cur: Array, start: Array, feeds: Mapping[str, Array]) -> ValueError:
        """The error for a layer state (from set_state) that does not fit a call, worded with
        the call's inputs and the batch the state was made for."""
        roles = axis_roles(self.model)
        shown = ", ".join(f"{n}{tuple(a.shape)}" for n, a in feeds.items() if n not in self._carried_names)
        for n, a in feeds.items():
            k = next((k for k, r in roles.get(n, {}).items() if r == "batch" and k < a.ndim), None)
            if k is not None and a.shape[k] and start.size % a.shape[k] == 0:
                per_row = start.size // a.shape[k]
                if cur.size % per_row == 0:
                    return ValueError(f"input {n!r} has batch {a.shape[k]} (shape {a.shape}) but this stream's state "
                                      f"is for batch {cur.size // per_row}: a stream keeps its batch size; start "
                                      "another with model.stream()")
        return ValueError(f"this stream's state (from set_state) does not fit the inputs {shown}: it was made for "
                          "another batch size; start another stream with model.stream()")

    batch_size: Optional[int] = None  # the rows the stream carries (None: the first call's)
    _array_io: bool  # the last call was given one array (not a dict): finish() returns the same kind
    _first_shapes: dict[str, tuple[int, ...]]  # the first call's input shapes (_check_batch)
    _batch_checked: bool  # the first call's batch was checked against batch_size

    @overload
    def __call__(self, inputs: Feeds, outputs: Optional[Collection[str]] = None) -> dict[str, Array]: ...
    @overload
    def __call__(self, inputs: npt.ArrayLike, outputs: Optional[Collection[str]] = None) -> Returned: ...

    def __call__(self, inputs: Feeds | npt.ArrayLike, outputs: Optional[Collection[str]] = None
                 ) -> dict[str, Array] | Returned:
        return self.feed(inputs, outputs=outputs)

    @overload
    def feed(self, inputs: Feeds, out: None = None, outputs: Optional[Collection[str]] = None) -> dict[str, Array]: ...
    @overload
    def feed(self, inputs: npt.ArrayLike, out: None = None, outputs: Optional[Collection[str]] = None) -> Returned: ...

    def feed(self, inputs: Feeds | npt.ArrayLike, out: None = None, outputs: Optional[Collection[str]] = None
             ) -> dict[str, Array] | Returned:
        """Runs the graph on one chunk (any number of time steps, along each input's time
        axis) and returns its outputs: a dict name -> array for a dict, else the outputs in
        ``model.outputs`` order (one array alone); only the names in ``outputs`` when given,
        which saves copying the others. Outputs along time trail the input by
        ``self.delay`` steps when an op looks ahead; finish() gives the rest. A stream
        carries one sequence: a call while another thread's call on the same stream runs
        raises RuntimeError (fork() gives independent streams)."""
        fast = self._fast
        if fast is not None and out is None:  # the inputs of the last plan: one compiled call
            try:
                res = fast.call(inputs, outputs, False)
            except GraphRunError as e:
                self._raise_reworded(e)
            if res is not None:
                return res  # type: ignore[no-any-return]
        if out is not None:
            raise ValueError("out= is taken by layer-stack streams; a graph stream returns new arrays")
        if not self._busy.acquire(False):
            raise RuntimeError(_BUSY)
        try:
            res = self._step(inputs, outputs)
        finally:
            self._busy.release()
        self._array_io = not isinstance(inputs, dict)
        return self.model._as_returned(inputs, res, outputs)

    def _step_time_axes(self, inputs: Any) -> dict[str, int]:
        """The time axes, for a first call that is step(): the inputs as given are complete (the
        rank each input declares) and the graph plans with them without a time axis (a model
        that takes one fixed-size step per call, such as silero-vad) -> {}. Otherwise the time
        axis cannot be told from a step (which leaves it out): a chunk must come first."""
        m = self.model
        feeds = m._check_feeds(inputs, allow_missing=set(self._carried_names))
        for a in self._carried_names:
            feeds[a] = self._carried[a] if a in self._carried else m._zero_state(a, feeds)
        declared = {i["name"]: i["shape"] for i in m.inputs}
        complete = all(declared.get(n) is not None and len(declared[n]) == a.ndim for n, a in feeds.items())
        if complete and not m.time_axes(feeds, first_chunk=True):
            return {}
        raise ValueError("this stream does not know its inputs' time axes yet (the model's declared "
                         "shapes do not tell them): call feed() with a chunk first")

    @overload
    def step(self, inputs: Feeds, out: None = None, outputs: Optional[Collection[str]] = None) -> dict[str, Array]: ...
    @overload
    def step(self, inputs: npt.ArrayLike, out: None = None, outputs: Optional[Collection[str]] = None) -> Returned: ...

    def step(self, inputs: Feeds | npt.ArrayLike, out: None = None, outputs: Optional[Collection[str]] = None
             ) -> dict[str, Array] | Returned:
        """Advances one time step: like feed() with inputs that have no time axis (each
        output along time then comes back without it too). For a model that takes one
        fixed-size step per call (no time axis, e.g. a chunk of audio reduced to one
        recurrent step, see ``time_axes``), the same as feed()."""
        fast = self._fast
        if fast is not None and out is None:  # the inputs of the last plan, without the time axis
            try:
                res = fast.call(inputs, outputs, True)
            except GraphRunError as e:
                self._raise_reworded(e)
            if res is not None:
                return res  # type: ignore[no-any-return]
        if out is not None:
            raise ValueError("out= is taken by layer-stack streams; a graph stream returns new arrays")
        taxes = self._taxes
        if taxes is None:
            taxes = self._step_time_axes(inputs)
        if not taxes:
            self._taxes = taxes
            return self.feed(inputs, outputs=outputs)
        self._taxes = taxes
        if isinstance(inputs, dict):
            chunk = {n: (np.expand_dims(np.asarray(v), taxes[n]) if n in taxes else v) for n, v in inputs.items()}
        else:
            names = [n for n in self.model.feed_names]
            if len(names) != 1:
                raise TypeError(f"this model takes several inputs {names}; pass a dict name -> array")
            if names[0] not in taxes:
                raise ValueError(f"input {names[0]!r} has no time axis; call feed()")
            chunk = {names[0]: np.expand_dims(np.asarray(inputs), taxes[names[0]])}
        if not self._busy.acquire(False):
            raise RuntimeError(_BUSY)
        try:
            res = self._step(chunk, outputs)
        finally:
            self._busy.release()
        for name, t in self.output_axes.items():
            v = res.get(name)
            if t is not None and v is not None and t < v.ndim and v.shape[t] == 1:
                res[name] = np.squeeze(v, axis=t)
        self._array_io = not isinstance(inputs, dict)
        return self.model._as_returned(inputs, res, outputs)

    def _step(self, inputs: Any, outputs: Optional[Collection[str]]) -> dict[str, Array]:
        """One call. When the stream's first call fails, the time axes found for it are
        forgotten, so the next call finds them from its own chunk (a first chunk too short
        for a pool's window found none, and every later chunk ran as a sequence of its own:
        the review of the fourteenth session)."""
        first = self._last is None
        try:
            return self._step_once(inputs, outputs)
        except BaseException as e:
            if first:
                self._taxes = None
            if isinstance(e, GraphRunError):
                self._raise_reworded(e)
            raise

    def _raise_reworded(self, e: GraphRunError) -> NoReturn:
        """Raises e, or, for C's refusal of a recurrent layer's sequence_lens past the chunk's
        steps, a ValueError in the stream's terms (from e): a length input counts each row's
        valid steps in this chunk (README, "Sequence lengths in streams"), so a value past
        them is most likely the whole sequence's length given by mistake."""
        text = str(e)
        if "sequence_lens[" not in text or "lies outside [0, T = " not in text:
            raise e
        lengths = sorted(_length_inputs(self.model))  # found only now: the error path alone needs them
        named = f"input {lengths[0]!r}" if len(lengths) == 1 else (
            f"the inputs {lengths}" if lengths else "the input that feeds it")
        raise ValueError(f"{text}: in a stream, {named} counts each row's valid steps in this chunk (0 to the "
                         "chunk's steps), not the whole sequence's: for a row whose whole sequence has L steps, "
                         "a chunk starting at step t0 with n steps takes clip(L - t0, 0, n) (README, \"Sequence "
                         "lengths in streams\")") from e

    def _step_once(self, inputs: Any, outputs: Optional[Collection[str]]) -> dict[str, Array]:
        if self._finished:
            raise ValueError("this stream was finished; call reset() to start a new sequence")
        want = None if outputs is None else set(outputs)
        m = self.model
        carried_names = self._carried_names
        if isinstance(inputs, dict):
            for a in carried_names:
                if a in inputs:
                    raise ValueError(f"input {a!r} is state the stream carries itself; "
                                     "use set_state to change it")
        feeds = m._check_feeds(inputs, allow_missing=set(carried_names))
        self._check_batch(feeds)
        for a in carried_names:
            if a not in self._carried:
                self._carried[a] = m._zero_state(a, feeds)
            feeds[a] = np.asarray(self._carried[a], order="C")  # (ascontiguousarray makes rank 0 rank 1)
        if self._taxes is None:
            self._taxes = m.time_axes(feeds, first_chunk=True)
        m._check_state_positions(feeds)
        plan = self._plan(feeds)
        if want is not None and not want <= set(m.outputs):
            raise ValueError(f"unknown outputs {sorted(want - set(m.outputs))}; the model's are {m.outputs}")
        bound = self._bound(plan, feeds)
        # a plan that leaves the carried context as it found it runs again for the same inputs:
        # the next calls try its bound call first
        self._fast = bound if plan.next_aux == plan.aux_in else None
        self._last = feeds
        out = bound.run(feeds, want)
        self._aux = plan.next_aux  # the plan's own dict: never changed in place (set_state makes a new one)
        return out

    @property
    def time_axes(self) -> dict[str, int]:
        """{input name: axis} the stream is fed along (the axes that reach a recurrent layer's
        time axis). Empty for a model that takes one fixed-size step per call (e.g. a chunk
        of audio reduced to one recurrent step): each call is then one step."""
        return dict(self._taxes or {})

    def _plan(self, feeds: Mapping[str, Array], finishing: bool = False) -> Plan:
        plan = self.model.plan(feeds, streaming=True, time_axes=self._taxes, aux=self._aux, finishing=finishing)
        for key, (tid, start) in plan.state.items():
            cur = self._layer_state.get(key)
            parts = plan.state_parts[key]
            given = self._given.get(key)
            if given is not None and given != parts:  # set before the first call: checked now
                if not _differ_in_one_axis(given, parts):  # (another batch is worded by _state_mismatch)
                    raise ValueError(f"state['layers'][{key!r}] (from set_state) has the shapes {given}, "
                                     f"but for these inputs this model's {key!r} holds {parts}")
            if cur is not None and cur.shape != start.shape:  # most often a state of another batch
                raise self._state_mismatch(cur, start, feeds)
            if given is not None and given != parts:
                raise ValueError(f"state['layers'][{key!r}] (from set_state) has the shapes {given}, "
                                 f"but for these inputs this model's {key!r} holds {parts}")
            if cur is None:
                self._layer_state[key] = start.copy()
            self._parts[key] = parts
        self._given = {}
        self.delay = plan.delay
        self._tail = plan.tail
        self.output_axes = {name: t for name, (t, final, lag) in plan.time.items()}
        return plan

    def _bound(self, plan: Plan, feeds: Mapping[str, Array]) -> _core.GraphStep:
        """The bound call of this plan for this stream (made at its first use, kept for a
        handful of plans: per-step calls alternate between few)."""
        step = self._steps.get(id(plan))
        if step is None or step.plan is not plan:
            if len(self._steps) >= 8:
                self._steps.clear()
            step = self._steps[id(plan)] = self._bind(plan, feeds)
        return step

    def _bind(self, plan: Plan, feeds: Mapping[str, Array]) -> _core.GraphStep:
        """A GraphStep for ``plan`` (checked by its constructor against the program's tensor table)."""
        return _core.GraphStep(*self._step_args(plan, feeds))

    def _step_args(self, plan: Plan, feeds: Mapping[str, Array]) -> tuple[Any, ...]:
        """GraphStep's arguments for ``plan``: its context's buffers, the data inputs with the
        shapes feed() and step() give them (step() without the time axis), each explicit state
        with the output the program writes the next state into, the layer states, the outputs
        with their shapes per mode (step() drops a time axis of length 1, as it always did)."""
        m = self.model
        pairs = m.state_pairs
        planned = dict(plan.outputs)
        for a, o in pairs:  # a carried state keeps its shape and type
            v = planned.get(o)
            if v is None or v.shape != feeds[a].shape or v.dtype != feeds[a].dtype:
                got = "nothing" if v is None else f"{v.dtype} {v.shape}"
                raise UnsupportedError(f"state pair {a}={o}: the stream feeds {o!r} back as {a!r}, but the graph "
                                       f"makes {got} from a state of {feeds[a].dtype} {feeds[a].shape}; a "
                                       "carried state must keep its shape and type")
        ctx = plan.context()
        taxes = self._taxes or {}
        tokens = m._token_inputs()
        step_ok = True
        inputs = []
        for name in m.feed_names:
            if name not in feeds:
                continue
            arr = feeds[name]
            shape = arr.shape
            stepped = shape
            if name in taxes:  # step() gives it without the time axis (of length 1 in this plan)
                t = taxes[name]
                if t < len(shape) and shape[t] == 1:
                    stepped = shape[:t] + shape[t + 1:]
                else:
                    step_ok = False
            inputs.append((name, plan.inputs[name], arr.dtype, shape, stepped, tokens.get(name, 0)))
        reads = {name: (kind, ref, n, dtype, shape) for name, kind, ref, n, dtype, shape in plan._reads}

        def source(name: str) -> tuple[int, Optional[Array]]:
            """Where output ``name`` is read after a run: (tensor id, None), or (-1, constant)."""
            kind, ref = reads[name][:2]
            if kind == "const":
                return -1, np.asarray(ref, order="C")  # a rank-0 constant stays rank 0
            return (plan.inputs[ref] if kind == "input" else int(ref)), None
        states = []
        written: set[int] = set()
        for a, o in pairs:
            kind, ref = reads[o][:2]
            tid, const = source(o)
            if const is not None:  # (copied as np.copyto would: cast to the state's type)
                const = np.asarray(np.broadcast_to(const, feeds[a].shape).astype(feeds[a].dtype), order="C")
            # the program writes the next state straight into the spare buffer when the output
            # is a buffer of its own (not an input, a constant, or another pair's output)
            out_tid = tid if kind == "buf" and tid not in written else -1
            if out_tid >= 0:
                written.add(out_tid)
            states.append((a, plan.inputs[a], feeds[a].dtype, feeds[a].shape, out_tid, tid, const))
        outputs = []
        axes = {name: t for name, (t, final, lag) in plan.time.items()}
        for name, (kind, ref, n, dtype, shape) in reads.items():
            tid, const = source(name)
            if const is not None:  # returned as the constant is (its own type and shape)
                dtype, shape = const.dtype, const.shape
            ax = axes.get(name)
            stepped = shape[:ax] + shape[ax + 1:] if taxes and ax is not None and ax < len(shape) and shape[ax] == 1 \
                else shape
            outputs.append((name, tid, const, dtype, shape, stepped))
        return (plan, plan.program, self, m, dict(ctx["bufs"]), len(ctx["work"]), inputs, states,
                [(k, tid) for k, (tid, _) in plan.state.items()], outputs, m.mapped_file, bool(plan.tail), step_ok)

    def finish(self, outputs: Optional[Collection[str]] = None) -> dict[str, Array] | Returned:
        """Ends the sequence (see _finish_sequence); refuses concurrent use like feed().
        Returns a dict when the last call was given a dict, else the outputs in order."""
        if not self._busy.acquire(False):
            raise RuntimeError(_BUSY)
        try:
            res = self._finish_sequence(outputs)
        finally:
            self._busy.release()
        if self.__dict__.get("_array_io"):  # arrays in, arrays out (an empty tuple when nothing is held)
            return self.model._as_returned(None, res, outputs)
        return res

    def _finish_sequence(self, outputs: Optional[Collection[str]] = None) -> dict[str, Array]:
        """Ends the sequence: flushes what ops along time still hold (the trailing padding
        of a convolution that looks ahead, or of a Pad) and returns those last outputs (an
        empty dict when nothing is held back). The stream then refuses further steps until
        reset()."""
        if self._finished:
            raise ValueError("this stream was already finished; call reset() to start a new sequence")
        if self._last is None:
            raise ValueError("nothing was fed to this stream")
        self._finished = True
        self._fast = None
        if not self._tail:
            return {}  # nothing held back: every output was given by the calls
        m = self.model
        taxes = cast("dict[str, int]", self._taxes)  # known once a call was made
        feeds = {}
        for name, arr in self._last.items():
            if name in self._carried:
                feeds[name] = np.asarray(self._carried[name], order="C")  # the state the last call left
            elif name in taxes:
                shape = list(arr.shape)
                shape[taxes[name]] = 0
                feeds[name] = np.zeros(shape, arr.dtype)
            else:
                feeds[name] = arr
        roles = _length_inputs(m)
        for name in roles:
            if name in feeds:
                feeds[name] = np.zeros_like(feeds[name])
        plan = self._plan(feeds, finishing=True)
        out = self._bind(plan, feeds).run(feeds, None if outputs is None else set(outputs))
        self._aux = plan.next_aux
        return out


class _MappedGraphStream(GraphStream):
    """A stream of a model loaded with load(..., mmap=True): before every call, one fstat
    checks that the mapped file was not truncated or rewritten (a read past its new end
    would kill the process); other streams pay nothing for it."""

    def _step(self, inputs: Any, outputs: Optional[Collection[str]]) -> dict[str, Array]:
        cast("WeightFile", self.model.mapped_file).check_unchanged()  # a stream of a mapped model
        return GraphStream._step(self, inputs, outputs)

    def finish(self, outputs: Optional[Collection[str]] = None) -> dict[str, Array] | Returned:
        cast("WeightFile", self.model.mapped_file).check_unchanged()
        return GraphStream.finish(self, outputs)


def _length_inputs(model: GraphModel) -> set[str]:
    """Graph inputs that reach a recurrent layer's sequence_lens (packed-sequence exports):
    in a stream they count the valid steps of each row in the chunk."""
    return {name for name, role in input_roles(model).items() if role[0] == "lengths"}


if TYPE_CHECKING:
    def _planner_interface(p: Planner) -> PlannerInterface:
        """For mypy only: the Planner offers what the op handlers call (ops.handlers.PlannerInterface)."""
        return p
