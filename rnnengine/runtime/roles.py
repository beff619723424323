"""What each input of a graph model is, found from the graph and by planning probes: token
ids (and their vocabulary), sequence lengths, batch and time axes; and random valid inputs
made from that. The runtime uses it to word errors in the user's terms (batch / time rather
than axis numbers) and to decide what a stream is fed along; verify.py and the CLI use it to
make test inputs. Every function takes the model (it reads ``graph``, ``inputs``,
``tensors``, ``state_pairs`` and calls ``plan``/``time_axes``) and imports no runtime module.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

import numpy as np
import numpy.typing as npt

from rnnengine.codes import RECURRENT_OPS, SLOT_SEQUENCE_LENS

Node = dict[str, Any]  # a node of the converted graph (rnnengine.frontend.converter)
# an input's role: ("tokens", vocabulary size), ("lengths",) or ("int",)
Role = tuple[Any, ...]
Uses = dict[str, list[tuple[Node, int]]]  # tensor name -> (node, input index) pairs that read it


class GraphModelLike(Protocol):
    """What these functions read of a model (rnnengine.runtime.graph.GraphModel)."""

    @property
    def graph(self) -> dict[str, Any]: ...
    @property
    def inputs(self) -> list[dict[str, Any]]: ...
    @property
    def tensors(self) -> dict[str, Any]: ...
    @property
    def state_pairs(self) -> list[tuple[str, str]]: ...
    def plan(self, feeds: dict[str, npt.NDArray[Any]]) -> Any: ...
    def time_axes(self, feeds: dict[str, npt.NDArray[Any]]) -> dict[str, int]: ...


def _consumers(graph: dict[str, Any]) -> Uses:
    uses: Uses = {}
    for n in graph["nodes"]:
        for k, x in enumerate(n["inputs"]):
            if x:
                uses.setdefault(x, []).append((n, k))
    return uses


def _follow(uses: Uses, name: str, through: tuple[str, ...] = ("Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape")
            ) -> list[tuple[Node, int]]:
    """(node, input index) pairs that read `name`, looking through dtype/shape glue."""
    out: list[tuple[Node, int]] = []
    todo, seen = [name], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        for n, k in uses.get(t, []):
            if n["op"] in through and k == 0:
                todo.extend(o for o in n["outputs"] if o)
            else:
                out.append((n, k))
    return out


def input_roles(model: GraphModelLike) -> dict[str, Role]:
    """For each integer input: ("tokens", vocab) when it indexes an embedding, ("lengths",)
    when it reaches a recurrent layer's sequence_lens, else ("int",)."""
    uses = _consumers(model.graph)
    roles: dict[str, Role] = {}
    for spec in model.inputs:
        if spec["dtype"] not in ("int64", "int32"):
            continue
        role: Role = ("int",)
        for n, k in _follow(uses, spec["name"]):
            if n["op"] == "Gather" and k == 1 and n["inputs"][0] in model.tensors:
                table = model.tensors[n["inputs"][0]]
                axis = n.get("attrs", {}).get("axis", 0)
                if not isinstance(axis, int) or not -table.ndim <= axis < table.ndim:
                    continue  # not a lookup (the Gather is refused when planned)
                role = ("tokens", int(table.shape[axis]))
                break
            if n["op"] in RECURRENT_OPS and k == SLOT_SEQUENCE_LENS:
                role = ("lengths",)
                break
        if role == ("int",) and "len" in spec["name"].lower():
            role = ("lengths",)
        roles[spec["name"]] = role
    return roles


def default_dim(name: object) -> int:
    low = str(name).lower()
    return 2 if ("batch" in low or low in ("b", "n")) else 5


def random_feeds(model: GraphModelLike, dims: dict[Any, int] | None = None, fixed: dict[str, Any] | None = None,
                 seed: int = 0, time_size: int | None = None, states: bool = True) -> dict[str, npt.NDArray[Any]]:
    """Random valid inputs for every input; explicit state inputs get random values too
    (a non-zero starting state) unless ``states`` is False."""
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    fixed = dict(fixed or {})
    roles = input_roles(model)
    carried = {a for a, _ in model.state_pairs}
    feeds: dict[str, npt.NDArray[Any]] = {}
    lengths_inputs: list[tuple[str, list[int], type[Any]]] = []
    for spec in model.inputs:
        name = spec["name"]
        if name in fixed:
            feeds[name] = np.asarray(fixed[name], np.dtype(spec["dtype"]))
            continue
        if name in carried and not states:
            continue
        shape: list[int] = []
        for d in spec["shape"] or []:
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            else:
                key = d if d is not None else f"{name}_{len(shape)}"
                if key not in dims:
                    dims[key] = default_dim(key)
                shape.append(dims[key])
        dt = np.dtype(spec["dtype"]).type
        role = roles.get(name, ("float",))
        if role[0] == "tokens":
            feeds[name] = rng.integers(0, role[1], size=shape).astype(dt)
        elif role[0] == "lengths":
            lengths_inputs.append((name, shape, dt))
        elif role[0] == "int":
            feeds[name] = rng.integers(0, 3, size=shape).astype(dt)
        elif dt == np.bool_:
            feeds[name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dt)
    for name, shape, dt in lengths_inputs:
        T = time_size or _guess_time(model, feeds) or 5
        n = int(np.prod(shape))
        lens = np.sort(rng.integers(1, T + 1, size=n))[::-1].copy()
        if n:
            lens[0] = T
        feeds[name] = lens.reshape(shape).astype(dt)
    return feeds


def _guess_time(model: GraphModelLike, feeds: dict[str, npt.NDArray[Any]]) -> Optional[int]:
    axes = time_axes(model, feeds)
    for name, axis in axes.items():
        return int(feeds[name].shape[axis])
    return None


def time_axes(model: GraphModelLike, feeds: dict[str, npt.NDArray[Any]]) -> dict[str, int]:
    """{input name: axis} of the inputs a stream is fed along (GraphModel.time_axes)."""
    return model.time_axes(feeds)


def axis_roles(model: GraphModelLike) -> dict[str, dict[int, str]]:
    """{input name: {axis: "batch" | "time"}} for the symbolic axes of the model's inputs,
    found by planning random inputs with the axis one longer (with every axis of the same
    symbol, and if that alone does not plan, with the symbolic axes of the state inputs too):
    a batch axis changes the recurrent layers' batch, a time axis their T. Used to word
    errors in the user's terms; computed once per model."""
    cached: Optional[dict[str, dict[int, str]]] = model.__dict__.get("_axis_roles")
    if cached is not None:
        return cached
    roles: dict[str, dict[int, str]] = {}
    model.__dict__["_axis_roles"] = roles
    try:
        feeds = random_feeds(model, seed=0)
        base = model.plan(feeds)
    except Exception:
        return roles
    if not base.recurrent:
        return roles
    carried = {a for a, _ in model.state_pairs}

    def grown(axes: list[tuple[str, int]]) -> Optional[dict[str, npt.NDArray[Any]]]:
        f = dict(feeds)
        for n, ax in axes:
            if f[n].shape[ax] == 0:
                return None
            f[n] = np.concatenate([f[n], np.take(f[n], [-1], axis=ax)], axis=ax)
        return f

    def probe(axes: list[tuple[str, int]]) -> Optional[str]:
        f = grown(axes)
        if f is None:
            return None
        try:
            plan = model.plan(f)
        except Exception:
            return None
        if len(plan.recurrent) != len(base.recurrent):
            return None
        if any(a["B"] != b["B"] for a, b in zip(base.recurrent, plan.recurrent)):
            return "batch"
        if any(a["T"] != b["T"] for a, b in zip(base.recurrent, plan.recurrent)):
            return "time"
        return None
    symbolic = [(i["name"], k, d) for i in model.inputs for k, d in enumerate(i["shape"] or [])
                if not (isinstance(d, int) and d >= 0) and i["name"] in feeds]
    for name, axis, d in symbolic:
        same = {(n, k) for n, k, d2 in symbolic if (n, k) == (name, axis) or (isinstance(d, str) and d2 == d)}
        role = probe(sorted(same))
        if role is None and name not in carried:
            states = {(n, k) for n, k, _ in symbolic if n in carried}
            role = probe(sorted(same | states))
            if role == "batch":
                for n, k in states:
                    roles.setdefault(n, {}).setdefault(k, "batch")
        if role is not None:
            roles.setdefault(name, {})[axis] = role
    for name, axis, d in symbolic:  # by name, and the other axis of an input with a time axis
        low = str(d).lower()
        mine = roles.setdefault(name, {})
        if axis not in mine and ("batch" in low or "time" in low or "seq" in low):
            mine[axis] = "batch" if "batch" in low else "time"
        others = [k for n, k, _ in symbolic if n == name and k not in mine]
        if "time" in mine.values() and "batch" not in mine.values() and others == [axis]:
            mine[axis] = "batch"
    return roles
