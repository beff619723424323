"""Does each explicit state pair hand every element back to its own place? (Run by a
graph model before a stream first runs with given input shapes; the converter's
pair_states decided which inputs and outputs pair, this checks positions.)"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import numpy.typing as npt

from rnnengine import limits
from rnnengine.errors import UnsupportedError, where
from rnnengine.codes import GATES, RECURRENT_OPS, SLOT_INITIAL_C, SLOT_INITIAL_H
from rnnengine.ops.control import EnvHandler
from rnnengine.ops.handlers import BINARY, OPS, UNARY


# ops that only move data: the state's elements are followed through them
_MOVES = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Slice", "Concat", "Split",
          "Gather", "Expand", "Tile", "Dropout", "Cast"}
_ELEMENTWISE = set(BINARY) | set(UNARY) | {"Clip"}


class _Untraceable(Exception):
    pass


def check_state_positions(graph: dict[str, Any], tensors: Mapping[str, npt.ArrayLike],
                          feeds: Mapping[str, npt.ArrayLike]) -> bool:
    """Checks that every state pair (i, o) hands each element back to its own place: element
    p of output o must be the final value of the recurrent state element that element p of
    input i started (e.g. silero-vad's stateN[0] is the h that state[0] started, not c).
    pair_states matches which layers' states flow; this matches positions, for the concrete
    input shapes in ``feeds``. It follows the state through the ops that only move data
    (Gather, Slice, Concat, Reshape, Transpose...), evaluating everything else with NumPy for
    shapes and If conditions. Raises UnsupportedError on a definite mismatch; returns False
    when the graph cannot be traced (a Loop, a state passing through arithmetic), True when
    every element checked out."""
    pairs = graph.get("state_pairs") or []
    if not pairs:
        return True
    val = {k: np.asarray(v) for k, v in tensors.items()}
    val.update({k: np.asarray(v) for k, v in feeds.items()})
    pid: dict[str, npt.NDArray[np.int64]] = {}  # tensor name -> the id of each of its elements
    start: dict[str, int] = {}  # state input -> the id of its first element
    nxt = 1
    for a, _ in pairs:
        n = val[a].size
        pid[a] = np.arange(nxt, nxt + n, dtype=np.int64).reshape(val[a].shape)
        start[a] = nxt
        nxt += n
    first_slot = nxt
    origin: dict[int, int] = {}  # slot id (a Y_h / Y_c element) -> id of the state element it started from (0: none)
    counter = [first_slot]
    opset = int(graph["opset"])

    def walk(nodes: list[dict[str, Any]]) -> None:
        for node in nodes:
            op, ins = node["op"], node["inputs"]
            if op == "If":
                cond = val[ins[0]]
                branch = node["attrs"]["then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch"]
                for k, v in branch.get("tensors", {}).items():
                    val[k] = np.asarray(v)
                walk(branch["nodes"])
                for o, bo in zip(node["outputs"], branch["outputs"]):
                    val[o] = val[bo]
                    if bo in pid:
                        pid[o] = pid[bo]
                continue
            if op not in OPS or issubclass(OPS[op], EnvHandler):  # a Loop, a sequence op
                raise _Untraceable(op)
            xs: list[Any] = [val[x] if x else None for x in ins]  # arrays, None for an absent input
            if op in RECURRENT_OPS:
                recurrent(node, xs)
                continue
            h = OPS[op](node, opset)
            limits.check_eval(node, xs)
            with np.errstate(all="ignore"):
                outs = h.eval(xs)
            for o, v in zip(node["outputs"], outs):
                if o:
                    val[o] = np.asarray(v)
            if op in _ELEMENTWISE:
                # an elementwise op keeps every element in its place (state + zeros, as some
                # exports write): the positions follow the one tracked operand of full shape
                tracked = [k for k, x in enumerate(ins) if x in pid]
                o = node["outputs"][0]
                if len(tracked) == 1 and np.shape(xs[tracked[0]]) == np.shape(val[o]):
                    pid[o] = pid[ins[tracked[0]]]
                continue
            movers = [0] if op != "Concat" else list(range(len(ins)))
            if op in _MOVES and any(ins[k] in pid for k in movers if ins[k]):
                ps = list(xs)
                for k in movers:
                    ps[k] = pid[ins[k]] if ins[k] in pid else np.zeros(np.shape(xs[k]), np.int64)
                if op == "Cast":
                    pouts = [ps[0]]
                else:
                    pouts = h.eval(ps)
                for o, p in zip(node["outputs"], pouts):
                    if o:
                        pid[o] = np.asarray(p).astype(np.int64)

    def recurrent(node: dict[str, Any], xs: list[Any]) -> None:
        a = node["attrs"]
        layout = int(a.get("layout", 0))
        D = 2 if a.get("direction", "forward") == "bidirectional" else 1
        H = int(a.get("hidden_size") or xs[1].shape[1] // GATES[node["op"]])
        X = xs[0]
        T, B = (X.shape[1], X.shape[0]) if layout else (X.shape[0], X.shape[1])
        sshape = (B, D, H) if layout else (D, B, H)
        R = xs[2] if len(xs) > 2 else None
        if R is None or R.ndim != 3 or R.shape[-1] != H:
            raise _Untraceable(node["op"])  # hidden_size contradicts R: the planner refuses the layer, naming it
        most = limits.resolve().max_tensor_elements
        for shape in (sshape, (T, D, B, H)):  # the zeros below, sized before they are allocated
            n = int(np.prod(shape, dtype=object))
            if n > most:
                limits.refuse(node, f"its state trace would hold {n} elements", "max_tensor_elements", most)
        outs = node["outputs"] + ["", "", ""]
        if outs[0]:
            val[outs[0]] = np.zeros((B, T, D, H) if layout else (T, D, B, H), np.float32)
        for k, slot in ((1, SLOT_INITIAL_H), (2, SLOT_INITIAL_C)):  # Y_h from initial_h, Y_c from initial_c
            if k == 2 and node["op"] != "LSTM":
                break
            if not outs[k]:
                continue
            val[outs[k]] = np.zeros(sshape, np.float32)
            init = node["inputs"][slot] if len(node["inputs"]) > slot else ""
            src = pid.get(init) if init else None
            ids = np.arange(counter[0], counter[0] + int(np.prod(sshape)), dtype=np.int64)
            counter[0] += ids.size
            src = np.zeros(ids.size, np.int64) if src is None or src.size != ids.size else src.reshape(-1)
            origin.update(zip(ids.tolist(), src.tolist()))
            pid[outs[k]] = ids.reshape(sshape)

    try:
        walk(graph["nodes"])
    except (_Untraceable, UnsupportedError, ValueError, TypeError, IndexError, KeyError, ArithmeticError):
        return False  # a Loop, a sequence, an op NumPy cannot evaluate here: not traceable
    checked = True
    owner = sorted((s, a) for a, s in start.items())
    for a, o in pairs:
        p = pid.get(o)
        if p is None or p.shape != val[a].shape:
            checked = False
            continue
        for pos, q in enumerate(p.reshape(-1).tolist()):
            src = origin.get(q, 0) if q >= first_slot else q
            if src <= 0:
                checked = False  # unknown, or started from a constant: nothing to compare
                continue
            if src == start[a] + pos:
                continue
            b = [name for s, name in owner if s <= src][-1]
            if src - start[b] >= val[b].size:
                checked = False  # from no state input's element (a later input's): nothing to compare
                continue
            where_from = np.unravel_index(src - start[b], val[b].shape)
            raise UnsupportedError(
                f"state pair {a}={o}: element {tuple(int(i) for i in np.unravel_index(pos, p.shape))} of {o!r} "
                f"continues element {tuple(int(i) for i in where_from)} of {b!r}, so feeding {o!r} back as {a!r} "
                "would put the state in the wrong place; give the right pairs (convert --state IN=OUT) or "
                "feed the state yourself with run()")
    return checked
