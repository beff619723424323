"""graph.py - a converted model: its graph planned for concrete input shapes and run in C.

A converted graph (made by rnnengine.converter, stored in the weight file) is a list of
nodes with ONNX semantics at the graph's opset, over named tensors. Running it takes two
steps:
  1. Planning, once per set of input shapes (cached): the nodes are walked in order with
     each value either a constant (folded with NumPy: weights, and the shape arithmetic
     that depends only on input shapes) or a run-time tensor. Every node with a run-time
     input is turned into instructions for the C executor (src_c/graph.c), with all
     strides, broadcasts and axes resolved. Recurrent layers are packed once per model.
  2. Execution: one call into C per run or stream step, the GIL released.

Streams keep two kinds of state between calls: the state of recurrent layers whose
initial state is not a graph input (held per layer), and explicit state carried by the
graph itself (an input such as ``h0`` paired with an output such as ``hn``; the output of
one call becomes the input of the next).
"""
from __future__ import annotations

import threading

import numpy as np

from . import _core
from .ops import OPS, UnsupportedError, where

NP_DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int32, "bool": np.bool_,
             "uint8": np.uint8, "float64": np.float64, "float16": np.float16, "int8": np.int8}


SEQUENCE_OPS = ("SplitToSequence", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceLength",
                "SequenceInsert", "ConcatFromSequence")
SEQUENCE_ATTRS = {"SplitToSequence": {"axis", "keepdims"}, "ConcatFromSequence": {"axis", "new_axis"},
                  "SequenceEmpty": {"dtype"}}


class Value:
    """A tensor during planning: its shape and dtype, and either its constant value or the
    id of the run-time buffer that will hold it."""
    __slots__ = ("shape", "dtype", "const", "tid")

    def __init__(self, shape, dtype, const=None, tid=None):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.const = const
        self.tid = tid


class Plan:
    """The program for one set of input shapes, shared by every run and stream using them."""

    def __init__(self, planner):
        self.program = _core.Program(np.array(planner.prog, np.int64).reshape(-1, _core.INSTR_WORDS),
                                     np.array(planner.ip, np.int64), np.array(planner.fp, np.float32),
                                     planner.stacks, planner.labels)
        self.specs = planner.specs
        self.inputs = planner.input_tids
        self.outputs = planner.outputs
        self.state = planner.state  # key -> (tid, start vector)
        self.work_floats = planner.work
        self.n_instructions = len(planner.prog) // _core.INSTR_WORDS
        self.recurrent = planner.recurrent

    def context(self):
        """Buffers for one run: a tensor table with intermediates allocated, constants bound."""
        ptrs = np.zeros(max(1, len(self.specs)), np.int64)
        bufs = {}
        for tid, spec in enumerate(self.specs):
            if spec[0] == "buf":
                bufs[tid] = np.zeros(max(1, int(np.prod(spec[1]))), spec[2])
            elif spec[0] == "const":
                bufs[tid] = spec[1]
            else:
                continue
            ptrs[tid] = _core.address(bufs[tid])
        return {"ptrs": ptrs, "bufs": bufs, "work": np.zeros(max(16, self.work_floats), np.float32)}

    def execute(self, ctx, feeds, states, want=None, into=None):
        """Runs the program; returns copies of the outputs named in ``want`` (all when None)
        and copies the outputs named in ``into`` (name -> array) into those arrays."""
        ptrs = ctx["ptrs"]
        address = _core.address
        for name, tid in self.inputs.items():
            ptrs[tid] = address(feeds[name])
        for key, (tid, _) in self.state.items():
            ptrs[tid] = address(states[key])
        self.program.run(ptrs, ctx["work"])
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
    def _reads(self):
        """How to read each graph output after a run: (name, kind, ref, n, dtype, shape)."""
        reads = self.__dict__.get("_reads_cache")
        if reads is None:
            reads = []
            for name, v in self.outputs:
                n = int(np.prod(v.shape))
                if v.const is not None:
                    reads.append((name, "const", np.asarray(v.const), n, v.dtype, v.shape))
                elif self.specs[v.tid][0] == "input":
                    reads.append((name, "input", self.specs[v.tid][1], n, v.dtype, v.shape))
                else:
                    reads.append((name, "buf", v.tid, n, v.dtype, v.shape))
            self.__dict__["_reads_cache"] = reads
        return reads


class Planner:
    def __init__(self, model, feeds, streaming):
        self.model = model
        self.streaming = streaming
        self.specs = []
        self.prog, self.ip, self.fp = [], [], []
        self.labels, self._node = [], None  # per instruction, the node it computes (for errors)
        self.work = 16
        self.stacks, self._stack_ids = [], {}
        self.state = {}
        self.input_tids = {}
        self.recurrent = []  # per recurrent layer planned: node, T, B, direction, kind
        env = {name: Value(arr.shape, arr.dtype, const=arr) for name, arr in model.tensors.items()}
        for name, (shape, dtype) in feeds.items():
            tid = self._spec(("input", name))
            self.input_tids[name] = tid
            env[name] = Value(shape, dtype, tid=tid)
        self.walk(model.graph["nodes"], env)
        self.outputs = []
        for o in model.graph["outputs"]:
            if o["name"] not in env:
                raise UnsupportedError(f"graph output {o['name']!r} is produced by no node")
            self.outputs.append((o["name"], env[o["name"]]))

    # -- building blocks used by the op handlers (rnnengine/ops.py)
    def _spec(self, spec):
        self.specs.append(spec)
        return len(self.specs) - 1

    def const(self, arr):
        arr = np.asarray(arr)
        return Value(arr.shape, arr.dtype, const=arr)

    def new(self, shape, dtype):
        dtype = np.dtype(dtype)
        n = 1
        for d in shape:
            n *= int(d)
        if n > (1 << 31):
            raise UnsupportedError(f"a run-time tensor of shape {tuple(shape)} would have {n:,} elements; "
                                   "rnnengine refuses to allocate it")
        return Value(shape, dtype, tid=self._spec(("buf", tuple(int(d) for d in shape), dtype)))

    def alias(self, x, shape):
        """The same data seen with another shape (Reshape, Squeeze...): no copy."""
        if x.const is not None:
            return Value(shape, x.dtype, const=np.asarray(x.const).reshape(shape))
        return Value(shape, x.dtype, tid=x.tid)

    def materialize(self, x):
        self.tid(x)
        return x

    def tid(self, v):
        if v.tid is None:
            arr = np.ascontiguousarray(v.const)
            if arr.dtype == np.bool_:
                arr = arr.astype(np.uint8)
            if arr.size == 0:
                arr = np.zeros(1, arr.dtype)
            v.tid = self._spec(("const", arr))
        return v.tid

    def derived(self, source, tag, fn):
        """fn() computed once per model for a constant (e.g. a transposed weight matrix), so
        plans for other shapes reuse it instead of copying the weights again."""
        return self.model._derived_for(source, tag, fn)

    def need_work(self, floats):
        self.work = max(self.work, int(floats))

    def stack(self, handler, consts):
        return self.model._stack_for(handler, consts)

    def stack_index(self, stack):
        if id(stack) not in self._stack_ids:
            self._stack_ids[id(stack)] = len(self.stacks)
            self.stacks.append(stack)
        return self._stack_ids[id(stack)]

    def stream_state(self, key, start):
        if key in self.state:
            raise UnsupportedError(f"two recurrent layers share the state key {key!r}")
        tid = self._spec(("state", key))
        self.state[key] = (tid, start)
        return Value(start.shape, np.float32, tid=tid)

    def emit(self, op, ins, outs, ip, fp=(), aux=-1):
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
        self.prog.extend(int(w) for w in word)
        self.labels.append(where(self._node) if self._node else "")
        self.ip.extend(int(v) for v in ip)
        self.fp.extend(float(v) for v in fp)

    # -- the walk over the nodes
    def walk(self, nodes, env):
        opset = self.model.opset
        for node in nodes:
            op = node["op"]
            self._node = node
            if op == "If":
                cond = env[node["inputs"][0]]
                if cond.const is None:
                    raise UnsupportedError(
                        f"{where(node)}: its condition depends on input data; fix the input it depends on "
                        "at conversion (e.g. --input sr=16000) so the branch can be chosen")
                branch = node["attrs"]["then_branch" if bool(np.asarray(cond.const).reshape(-1)[0])
                                       else "else_branch"]
                sub = dict(env)
                for name, arr in branch.get("tensors", {}).items():
                    sub[name] = Value(arr.shape, arr.dtype, const=arr)
                self.walk(branch["nodes"], sub)
                outs = [sub[name] for name in branch["outputs"]]
            elif op == "Loop":
                outs = self.loop(node, env)
            elif op in SEQUENCE_OPS:
                outs = self.sequence_op(node, env)
            else:
                handler_cls = OPS.get(op)
                if handler_cls is None:
                    raise UnsupportedError(f"{where(node)}: op {op!r} is not supported")
                h = handler_cls(node, opset)
                xs = []
                for name in node["inputs"]:
                    if not name:
                        xs.append(None)
                    elif name not in env:
                        raise UnsupportedError(f"{where(node)} reads {name!r}, which nothing produces")
                    else:
                        xs.append(env[name])
                if all(x is None or x.const is not None for x in xs) and op not in ("LSTM", "GRU", "RNN"):
                    try:
                        with np.errstate(all="ignore"):
                            vals = h.eval([None if x is None else x.const for x in xs])
                    except UnsupportedError:
                        raise
                    except Exception as e:  # NumPy refusing the shapes, etc.
                        raise UnsupportedError(f"{where(node)}: {e}") from None
                    outs = [self.const(np.asarray(v)) for v in vals]
                else:
                    outs = h.emit(self, xs)
            for name, v in zip(node["outputs"], outs):
                if name:
                    env[name] = v


    def sequence_op(self, node, env):
        """ONNX sequence ops, as the dynamo exporter writes torch.unbind / torch.stack: a
        sequence is a Python list of values while planning; nothing of it reaches C."""
        from .ops import Concat, Slice, Unsqueeze
        op, at = node["op"], node.get("attrs", {})
        xs = [env[n] if n else None for n in node["inputs"]]

        def sub(op_type, inputs, attrs):
            return {"op": op_type, "name": node.get("name", ""), "inputs": inputs, "outputs": ["x"], "attrs": attrs}
        if op == "SplitToSequence":
            x = xs[0]
            axis = at.get("axis", 0) % max(1, len(x.shape))
            if len(xs) > 1 and xs[1] is not None:
                if xs[1].const is None:
                    raise UnsupportedError(f"{where(node)}: split sizes must be constants")
                sizes = np.asarray(xs[1].const).reshape(-1)
                if sizes.size == 1 and np.ndim(xs[1].const) == 0:
                    k = int(sizes[0])
                    sizes = [min(k, x.shape[axis] - i) for i in range(0, x.shape[axis], k)]
                keep = True
            else:
                sizes, keep = [1] * x.shape[axis], bool(at.get("keepdims", 1))
            parts, pos = [], 0
            for n in sizes:
                sl = Slice(sub("Slice", [], {}), 10)
                part = sl.emit(self, [x, self.const(np.array([pos])), self.const(np.array([pos + int(n)])),
                                      self.const(np.array([axis]))])[0] if x.const is None else \
                    self.const(np.take(x.const, range(pos, pos + int(n)), axis=axis))
                if not keep:
                    part = self.alias(part, tuple(d for i, d in enumerate(part.shape) if i != axis))
                parts.append(part)
                pos += int(n)
            return [parts]
        if op == "SequenceAt":
            seq, pos = xs
            if pos.const is None:
                raise UnsupportedError(f"{where(node)}: the position must be a constant")
            return [seq[int(np.asarray(pos.const).reshape(-1)[0])]]
        if op == "SequenceConstruct":
            return [list(xs)]
        if op == "SequenceEmpty":
            return [[]]
        if op == "SequenceLength":
            return [self.const(np.array(len(xs[0]), np.int64))]
        if op == "SequenceInsert":
            seq = list(xs[0])
            if len(xs) > 2 and xs[2] is not None:
                seq.insert(int(np.asarray(xs[2].const).reshape(-1)[0]), xs[1])
            else:
                seq.append(xs[1])
            return [seq]
        if op == "ConcatFromSequence":
            seq, axis = xs[0], at.get("axis")
            if at.get("new_axis", 0):
                nd = len(seq[0].shape) + 1
                ax = axis % nd
                seq = [Unsqueeze(sub("Unsqueeze", [], {"axes": [ax]}), 11).emit(self, [v])[0]
                       if v.const is None else self.const(np.expand_dims(v.const, ax)) for v in seq]
            if all(v.const is not None for v in seq):
                return [self.const(np.concatenate([v.const for v in seq], axis=axis))]
            return Concat(sub("Concat", [], {"axis": axis}), 13).emit(self, seq)
        raise UnsupportedError(f"{where(node)}: {op} is not supported")

    def loop(self, node, env):
        """ONNX Loop, unrolled: the trip count and the condition must be known when planning
        (they are for recurrent loops over a time axis: Shape-derived, and `i < T`). In a
        stream, float loop-carried values that start from constants (zero states) are held
        by the stream and carried on from call to call, as a recurrent layer's state is."""
        from .ops import emit_copy
        body = node["attrs"]["body"]
        ins = node["inputs"] + [""] * 2
        M = env[ins[0]] if ins[0] else None
        cond = env[ins[1]] if ins[1] else None
        if M is not None and M.const is None or cond is not None and cond.const is None:
            raise UnsupportedError(f"{where(node)}: the trip count and condition must be known when planning")
        trips = int(np.asarray(M.const).reshape(-1)[0]) if M is not None else None
        keep_going = bool(np.asarray(cond.const).reshape(-1)[0]) if cond is not None else True
        carried = [env[n] if n else None for n in node["inputs"][2:]]
        n_carried = len(carried)
        n_scan = len(body["outputs"]) - 1 - n_carried
        states = []
        produced_by = {o: n for n in body["nodes"] for o in n["outputs"] if o}

        def passes_through(k):
            """True when the body hands carried value k on unchanged (through Identities):
            a loop invariant such as a weight, not state."""
            name = body["outputs"][1 + k]
            while name in produced_by and produced_by[name]["op"] == "Identity":
                name = produced_by[name]["inputs"][0]
            return name == body["inputs"][2 + k]
        if self.streaming:
            for k, v in enumerate(carried):
                if v is not None and v.const is not None and v.dtype == np.float32 and not passes_through(k):
                    key = f"{node['outputs'][k] or node.get('name')}:loop{k}"
                    st = self.stream_state(key, np.ascontiguousarray(np.asarray(v.const, np.float32)).reshape(-1))
                    carried[k] = self.alias(st, v.shape)
                    states.append((k, st))
        limit = 100000
        if trips is not None and trips > limit:
            raise UnsupportedError(f"{where(node)}: {trips} iterations are too many to unroll")
        record = {"node": node.get("name") or node["outputs"][0], "T": trips, "B": None, "direction": "forward",
                  "kind": "Loop", "explicit_state": not states}
        self.recurrent.append(record)
        scans = [[] for _ in range(n_scan)]
        # a while loop (no trip count) runs as long as its condition, known when planning,
        # stays true
        for i in range(trips if trips is not None else limit + 1):
            if not keep_going:
                break
            if i == limit:
                raise UnsupportedError(f"{where(node)}: the loop did not stop within {limit} iterations")
            sub = dict(env)
            names = body["inputs"]
            sub[names[0]] = self.const(np.array(i, np.int64))
            sub[names[1]] = self.const(np.array(keep_going))
            for name, v in zip(names[2:], carried):
                sub[name] = v
            self.walk(body["nodes"], sub)
            res = [sub[n] for n in body["outputs"]]
            c = res[0]
            if c.const is None:
                raise UnsupportedError(f"{where(node)}: the loop condition depends on run-time data")
            keep_going = bool(np.asarray(c.const).reshape(-1)[0])
            carried = res[1:1 + n_carried]
            for k, v in enumerate(res[1 + n_carried:]):
                scans[k].append(v)
            record["T"] = i + 1
        outs = list(carried)
        for k, st in states:
            v = carried[k]
            emit_copy(self, v, st, [int(np.prod(v.shape))], [1], [1])
        for k, vals in enumerate(scans):
            if not vals:
                raise UnsupportedError(f"{where(node)}: a loop that runs 0 times has scan outputs of unknown shape")
            shape = (len(vals),) + vals[0].shape
            if all(v.const is not None for v in vals):
                outs.append(self.const(np.stack([v.const for v in vals])))
                continue
            out = self.new(shape, vals[0].dtype)
            per = int(np.prod(vals[0].shape))
            for t, v in enumerate(vals):
                emit_copy(self, v, out, [per], [1], [1], dst_off=t * per)
            outs.append(out)
        return outs


class GraphModel:
    """A converted model ready to run. Build it with :func:`rnnengine.load` (a weight file)
    or :func:`rnnengine.convert` (an ONNX file).

    ``run(inputs)`` runs whole sequences; ``stream()`` gives a stream that keeps every
    recurrent state between calls. ``inputs`` is a dict name -> array, or one array when
    the model has a single input to feed.
    """

    def __init__(self, graph, tensors, metadata=None):
        self.graph = graph
        self.tensors = dict(tensors)
        self.metadata = dict(metadata or {})
        self.opset = int(graph["opset"])
        self.inputs = graph["inputs"]
        self.outputs = [o["name"] for o in graph["outputs"]]
        self.state_pairs = [tuple(p) for p in graph.get("state_pairs", [])]
        self._plans = {}
        self._stacks = {}
        self._derived = {}
        self._lock = threading.Lock()

    def __repr__(self):
        return (f"GraphModel(inputs={[i['name'] for i in self.inputs]}, outputs={self.outputs}, "
                f"nodes={len(self.graph['nodes'])})")

    @property
    def feed_names(self):
        """Inputs a stream's caller feeds: all inputs but the explicit state ones."""
        carried = {a for a, _ in self.state_pairs}
        return [i["name"] for i in self.inputs if i["name"] not in carried]

    def _derived_for(self, source, tag, fn):
        key = (id(source), tag)
        with self._lock:
            hit = self._derived.get(key)
            if hit is None or hit[0] is not source:
                hit = (source, fn())
                self._derived[key] = hit
            return hit[1]

    def _stack_for(self, handler, consts):
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
                self._stacks[key] = (layer, _core.Stack([layer._spec()]))
            return self._stacks[key]

    def plan(self, feeds, streaming=False):
        key = (streaming,) + tuple((n, a.shape, a.dtype.str) for n, a in sorted(feeds.items()))
        plan = self._plans.get(key)
        if plan is None:
            planner = Planner(self, {n: (a.shape, a.dtype) for n, a in feeds.items()}, streaming)
            plan = Plan(planner)
            with self._lock:
                if len(self._plans) > 64:
                    self._plans.clear()
                self._plans[key] = plan
        return plan

    def _check_feeds(self, inputs, allow_missing=()):
        if not isinstance(inputs, dict):
            names = [n for n in self.feed_names]
            if len(names) != 1:
                raise TypeError(f"this model takes several inputs {names}; pass a dict name -> array")
            inputs = {names[0]: inputs}
        declared = {i["name"]: i for i in self.inputs}
        for name in inputs:
            if name not in declared:
                raise ValueError(f"unknown input {name!r}; the model's inputs are {list(declared)}")
        feeds = {}
        for name, spec in declared.items():
            if name not in inputs:
                if name in allow_missing:
                    continue
                raise ValueError(f"input {name!r} is missing (the model's inputs are {list(declared)})")
            arr = np.asarray(inputs[name])
            want = np.dtype(NP_DTYPES[spec["dtype"]])
            if arr.dtype != want:
                if want.kind == arr.dtype.kind or (want.kind == "i" and arr.dtype.kind == "u"):
                    arr = arr.astype(want)
                else:
                    raise TypeError(f"input {name!r} must be {want} (got {arr.dtype})")
            shape = spec["shape"]
            if shape is not None:
                if arr.ndim != len(shape):
                    raise ValueError(f"input {name!r} must have rank {len(shape)} (shape {shape}), "
                                     f"got shape {arr.shape}")
                for k, (d, g) in enumerate(zip(shape, arr.shape)):
                    if isinstance(d, int) and d >= 0 and d != g:
                        raise ValueError(f"input {name!r} must have shape {shape}, got {arr.shape} "
                                         f"(dimension {k})")
            feeds[name] = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)  # keeps rank 0
        return feeds

    def run(self, inputs):
        """Runs the graph once on whole sequences (no state kept). Returns a dict
        output name -> array. Explicit state inputs default to zeros when omitted."""
        feeds = self._check_feeds(inputs, allow_missing={a for a, _ in self.state_pairs})
        for a, _ in self.state_pairs:
            if a not in feeds:
                feeds[a] = self._zero_state(a, feeds)
        plan = self.plan(feeds)
        return plan.execute(plan.context(), feeds, {})

    def _zero_state(self, name, feeds):
        spec = next(i for i in self.inputs if i["name"] == name)
        dims = {}
        for i in self.inputs:
            if i["name"] in feeds and i["shape"] is not None:
                for d, g in zip(i["shape"], feeds[i["name"]].shape):
                    if isinstance(d, str):
                        dims[d] = g
        shape = []
        for d in spec["shape"] or ():
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            elif d in dims:
                shape.append(dims[d])
            else:
                raise ValueError(f"cannot tell the size of dimension {d!r} of state input {name!r} from the "
                                 f"other inputs: pass {name!r} explicitly (to a stream: "
                                 f"stream.set_state({{'inputs': {{{name!r}: array}}}}) before the first call)")
        return np.zeros(shape, NP_DTYPES[spec["dtype"]])

    def stream(self):
        """A stream: feed it chunks (any number of time steps) and it carries every
        recurrent state on from call to call."""
        return GraphStream(self)


class GraphStream:
    """State held between calls: recurrent layers' own state and the graph's explicit state
    inputs (fed from the paired outputs of the previous call)."""

    def __init__(self, model):
        self.model = model
        self._paired_outputs = {o for _, o in model.state_pairs}
        self._carried_names = [a for a, _ in model.state_pairs]
        self._fast = None        # (input signature, plan, context) of the last call
        self._spare = {}         # explicit state: the buffer of the previous call, reused
        self._layer_state = {}   # recurrent layer key -> float32 vector
        self._carried = {}       # explicit state input name -> array
        self._ctx = {}

    def reset(self):
        self._layer_state.clear()
        self._carried.clear()
        self._fast = None

    def fork(self):
        other = GraphStream(self.model)
        other._layer_state = {k: v.copy() for k, v in self._layer_state.items()}
        other._carried = {k: v.copy() for k, v in self._carried.items()}
        return other

    def get_state(self):
        """Every piece of state: {"layers": {key: vector}, "inputs": {name: array}} (copies)."""
        return {"layers": {k: v.copy() for k, v in self._layer_state.items()},
                "inputs": {k: v.copy() for k, v in self._carried.items()}}

    def set_state(self, state):
        self._fast = None
        self._layer_state = {k: np.array(v, np.float32, copy=True) for k, v in state.get("layers", {}).items()}
        self._carried = {k: np.array(v, copy=True) for k, v in state.get("inputs", {}).items()}

    def __call__(self, inputs, outputs=None):
        return self.step(inputs, outputs)

    def step(self, inputs, outputs=None):
        """Runs the graph on one chunk and returns its outputs (dict name -> array; only
        the names in ``outputs`` when given, which saves copying the others)."""
        want = None if outputs is None else set(outputs)
        m = self.model
        fast = self._fast
        if fast is not None and type(inputs) is dict and len(inputs) == len(fast[0]):
            # the same input names, shapes and dtypes as the last call: its plan and buffers
            sig, plan, ctx = fast
            try:
                ok = all(type(a := inputs[n]) is np.ndarray and a.shape == sh and a.dtype == dt
                         and a.flags.c_contiguous for n, sh, dt in sig)
            except KeyError:
                ok = False
            if ok:
                feeds = dict(inputs)
                for a in self._carried_names:
                    feeds[a] = self._carried[a]
                return self._finish(plan, ctx, feeds, want)
        carried_names = [a for a, _ in m.state_pairs]
        if isinstance(inputs, dict):
            for a in carried_names:
                if a in inputs:
                    raise ValueError(f"input {a!r} is state the stream carries itself; "
                                     "use set_state to change it")
        feeds = m._check_feeds(inputs, allow_missing=set(carried_names))
        for a in carried_names:
            if a not in self._carried:
                self._carried[a] = m._zero_state(a, feeds)
            feeds[a] = np.ascontiguousarray(self._carried[a])
        plan = m.plan(feeds, streaming=True)
        for key, (tid, start) in plan.state.items():
            cur = self._layer_state.get(key)
            if cur is None:
                self._layer_state[key] = start.copy()
            elif cur.shape != start.shape:
                raise ValueError(f"the stream's state of layer {key!r} holds {cur.size} floats but this "
                                 f"call needs {start.size}: the batch size changed; use a new stream")
        ctx = self._ctx.get(id(plan))
        if ctx is None:
            self._ctx = {id(plan): plan.context()}  # keep one context: per-step calls reuse it
            ctx = self._ctx[id(plan)]
        if isinstance(inputs, dict) and all(isinstance(v, np.ndarray) for v in inputs.values()):
            self._fast = (tuple((n, feeds[n].shape, feeds[n].dtype) for n in inputs), plan, ctx)
        if want is not None and not want <= set(m.outputs):
            raise ValueError(f"unknown outputs {sorted(want - set(m.outputs))}; the model's are {m.outputs}")
        return self._finish(plan, ctx, feeds, want)

    def _finish(self, plan, ctx, feeds, want=None):
        # explicit state: each paired output is copied straight into the array the next call
        # feeds back (carried arrays are the stream's own, so nothing is allocated for them)
        into = {}
        for a, o in self.model.state_pairs:
            # feeds[a] (the carried state) is read by this very call: write the next state to
            # the spare buffer, then swap the two
            spare = self._spare.get(a)
            if spare is None or spare.shape != feeds[a].shape or spare.dtype != feeds[a].dtype:
                spare = np.empty_like(feeds[a])
            into[o] = spare
        out = plan.execute(ctx, feeds, self._layer_state, want, into)
        for a, o in self.model.state_pairs:
            self._spare[a], self._carried[a] = self._carried[a], into[o]
        return out
