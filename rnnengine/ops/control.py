"""Control flow and sequences, registered like every other op (rnnengine.ops.OPS).

These ops act on the planner's environment (name -> value) rather than on a list of input
tensors: an If plans one of its branches, a Loop plans its body once per trip, a sequence op
builds or reads a Python list of tensors while planning. Each handler's ``plan_node(p,
env)`` returns the node's outputs; the planner (rnnengine/runtime/graph.py) calls it for
every node whose handler is an ``EnvHandler``, and ``p`` offers the interface of
``rnnengine.ops.handlers.PlannerInterface``.

ONNX semantics, and what rnnengine does with them:

- ``If(cond) -> outputs of then_branch or else_branch``: the condition must be known when
  the model is planned (a constant, or computed from shapes or fixed inputs); the chosen
  branch is planned in place, the other is never run. A condition that depends on input
  data is refused naming the node (fix the input at conversion, e.g. ``--input sr=16000``).
- ``Loop(M, cond, v...) -> (v_final..., scan_outputs...)``: unrolled at planning time when
  its trip count follows from constants and shapes (rnnengine/runtime/graph.py
  ``Planner.loop``; the total number of unrolled nodes is bounded by
  ``Limits.max_loop_nodes``); loops that run a recurrent cell step by step are fused into
  the engine's cells by the converter first (rnnengine/frontend/fuse.py).
- Sequence ops (``SplitToSequence``, ``SequenceAt``, ``SequenceConstruct``,
  ``SequenceEmpty``, ``SequenceLength``, ``SequenceInsert``, ``ConcatFromSequence``): a
  sequence is a list of tensors whose length is known when planning; the ops move tensors
  in and out of it (``Planner.sequence_op``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from rnnengine.errors import NotStreamableError, UnsupportedError, where
from rnnengine.ops import streaming
from rnnengine.ops.handlers import Handler, register

SEQUENCE_OPS = ("SplitToSequence", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceLength",
                "SequenceInsert", "ConcatFromSequence")
# which inputs of a sequence op are sequences (Python lists while planning); the rest are tensors
SEQUENCE_INPUTS = {"SequenceAt": (0,), "SequenceLength": (0,), "SequenceInsert": (0,), "ConcatFromSequence": (0,)}
SEQUENCE_ATTRS = {"SplitToSequence": {"axis", "keepdims"}, "ConcatFromSequence": {"axis", "new_axis"},
                  "SequenceEmpty": {"dtype"}}


class EnvHandler(Handler):
    """A handler that plans from the planner's environment (name -> value) instead of a
    list of tensor inputs; it has no ``eval``/``emit`` of its own."""

    def plan_node(self, p: Any, env: dict[str, Any]) -> list[Any]:
        raise NotImplementedError


@register("If", attrs=("then_branch", "else_branch"))
class If(EnvHandler):
    def plan_node(self, p: Any, env: dict[str, Any]) -> list[Any]:
        node = self.node
        cond = env[node["inputs"][0]]
        if isinstance(cond, list):
            raise UnsupportedError(f"{where(node)}: its condition is a sequence of tensors, not a tensor")
        if p.streaming and (streaming.timed(cond) or streaming.has_tdep(cond)):
            raise NotStreamableError(node, "chooses its branch from the sequence length or from time-varying data")
        if cond.const is None:
            raise UnsupportedError(
                f"{where(node)}: its condition depends on input data; fix the input it depends on "
                "at conversion (e.g. --input sr=16000) so the branch can be chosen")
        c = np.asarray(cond.const)
        if c.size != 1 or c.dtype.kind not in "biu":  # ONNX: one bool (an empty one raised IndexError)
            raise UnsupportedError(f"{where(node)}: its condition must be one boolean, got {c.dtype} of shape {c.shape}")
        branch = node["attrs"]["then_branch" if bool(c.reshape(-1)[0]) else "else_branch"]
        sub = dict(env)
        for name, arr in branch.get("tensors", {}).items():
            sub[name] = p.const(arr)
        p.walk(branch["nodes"], sub)
        for name in branch["outputs"]:
            if name not in sub:
                raise UnsupportedError(f"{where(node)}: branch output {name!r} is produced by no node of the "
                                       "branch and is no value outside it")
        return [sub[name] for name in branch["outputs"]]


@register("Loop", attrs=("body",))
class Loop(EnvHandler):
    def plan_node(self, p: Any, env: dict[str, Any]) -> list[Any]:
        return p.loop(self.node, env)  # type: ignore[no-any-return]


@register(*SEQUENCE_OPS)
class SequenceOp(EnvHandler):
    def allowed_attrs(self) -> set[str]:
        return SEQUENCE_ATTRS.get(self.node["op"], set())

    def plan_node(self, p: Any, env: dict[str, Any]) -> list[Any]:
        return p.sequence_op(self.node, env)  # type: ignore[no-any-return]
