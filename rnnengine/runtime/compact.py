"""compact.py - which storage (float32 / float16 / int8) a converted model's recurrent kernels read.

A GraphModel runs each LSTM / GRU / RNN node through a one-layer ``_core.Stack``
(``GraphModel._stack_for``). ``model.weight_dtype`` decides how that stack keeps its packed W
and R, as ``Model(weight_dtype=...)`` does for a layer stack:

- "float32": the weights' float32 values (for a weight file stored compact: the stored
  values widened, exactly).
- "float16" / "int8": when the node's W and R are both stored in the model's weight file in
  that storage, the kernels read the stored halves / int8 codes and row scales themselves
  (``rnn_cell_create_stored``: no second rounding, so the file's storage is what runs);
  otherwise the packer rounds the float32 values (pack.c, the same rounding the weight file's
  writer uses: IEEE half, round to nearest even; int8 symmetric, scale = max|row| / 127).
  A model loaded with ``weight_dtype=None`` ("as stored") gives a node whose W and R are not
  both stored in the file's storage float32 kernels rather than rounding it a second time.

Refusals are the layer stack's (``_check_compact_weights``): float16 cannot hold finite
weights above 65504, int8 has no code for +-Inf; both raise ValueError naming the node.
Non-recurrent weights (Gemm, MatMul, Conv, Gather tables) always run in float32.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np

from rnnengine.errors import where
from rnnengine.runtime.model import _check_compact_weights

WEIGHT_DTYPES = ("float32", "float16", "int8")
RECURRENT = ("LSTM", "GRU", "RNN")


def stored_weight_dtype(model: Any) -> str:
    """The storage of the weight file the model was loaded from ("float32" otherwise)."""
    wf = getattr(model, "compact_file", None)
    dt = wf.metadata.get("general.weight_dtype") if wf is not None else None
    return dt if dt in WEIGHT_DTYPES else "float32"


def configure(model: Any, weight_dtype: Optional[str] = "float32", threads: int = 1) -> Any:
    """Sets model.weight_dtype (None: as the weight file stores it) and model.threads, after
    checking them and, for a compact storage, every recurrent node's constant W and R (the
    refusals of the module doc, raised here rather than at the first run). Forgets packed
    stacks and plans made for other settings."""
    as_stored = weight_dtype is None
    if as_stored:
        weight_dtype = stored_weight_dtype(model)
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be float32, float16, int8 or None (as stored), got {weight_dtype!r}")
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    if weight_dtype != "float32":
        for node in recurrent_nodes(model.graph["nodes"]):
            ins = node["inputs"]
            cell = {k: model.tensors.get(ins[s]) if s < len(ins) else None for k, s in (("W", 1), ("R", 2))}
            if cell["W"] is None or cell["R"] is None:
                continue  # computed at planning: checked by _stack_for then
            if np.ndim(cell["W"]) != 3 or np.ndim(cell["R"]) != 3 or \
                    np.shape(cell["W"])[0] != np.shape(cell["R"])[0]:
                continue  # malformed weights: the recurrent node refuses them when planned, naming itself
            for d in range(np.shape(cell["W"])[0]):
                _check_compact_weights({k: np.asarray(v)[d] for k, v in cell.items()}, weight_dtype, where(node), d)
    model.weight_dtype = weight_dtype
    model.weights_as_stored = as_stored
    model.threads = int(threads)
    with model._lock:
        model._stacks.clear()
        model._plans.clear()
    return model


def recurrent_nodes(nodes: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every LSTM / GRU / RNN node, also inside If branches and Loop bodies."""
    for n in nodes:
        if n["op"] in RECURRENT:
            yield n
        for v in n.get("attrs", {}).values():
            if isinstance(v, dict) and "nodes" in v:
                yield from recurrent_nodes(v["nodes"])


def _stored(model: Any, name: str, value: Any, dtype: str) -> Optional[tuple[np.ndarray, Optional[np.ndarray]]]:
    """(stored array, row scales or None) when tensor `name` is stored in the model's weight
    file as `dtype` and `value` is that tensor as the model holds it; else None."""
    wf = getattr(model, "compact_file", None)
    if wf is None or not name or name not in wf.names or model.tensors.get(name) is not value:
        return None
    info = wf.info(name)
    if info["dtype"] != dtype or not info["quantized"]:
        return None
    return wf.raw(name)


def apply(model: Any, node: dict[str, Any], consts: dict[str, np.ndarray], spec: dict[str, Any]) -> str:
    """Sets the storage of one recurrent node's cells in ``spec`` (its ``_Layer._spec()``):
    weight_dtype on every cell and, when the file stores W and R that way, the stored arrays.
    Returns the storage the node's kernels read."""
    dtype = getattr(model, "weight_dtype", "float32")
    if dtype == "float32":
        return dtype
    ins = node["inputs"]
    W = _stored(model, ins[1] if len(ins) > 1 else "", consts.get("W"), dtype)
    R = _stored(model, ins[2] if len(ins) > 2 else "", consts.get("R"), dtype)
    if (W is None or R is None) and getattr(model, "weights_as_stored", False):
        return "float32"  # not stored compact in this storage: not rounded a second time
    for d, cell in enumerate(spec["cells"]):
        _check_compact_weights(cell, dtype, where(node), d)
        cell["weight_dtype"] = dtype
        if W is not None and R is not None and spec.get("proj_size", 0) == 0:
            (wq, ws), (rq, rs) = W, R
            gh = wq.shape[1]
            cell["stored"] = (wq[d], rq[d], None if ws is None else ws[d * gh:(d + 1) * gh],
                              None if rs is None else rs[d * gh:(d + 1) * gh])
    return dtype


def kernel_dtypes(model: Any) -> dict[str, str]:
    """{node name: storage its kernels read} for the recurrent nodes planned so far."""
    return dict(getattr(model, "_kernel_dtypes", {}))
