"""Batch scoring: many whole sequences through one model, in one process or on a Ray or Dask
cluster (`rnnengine score`).

A row is one whole sequence, (T, features) for a model with one data input; it is never
split, so no recurrence crosses a partition. Each row runs alone (batch 1): its result does
not depend on which rows share its partition or worker, so every engine and any number of
workers give exactly the single-process result.

Shards on disk:
- ``.npy``: an array (N, T, features), N rows of full length;
- ``.npz``: ``x`` (N, T, features) and optionally ``lengths`` (N,): row i is
  ``x[i, :lengths[i]]``;
- ``.parquet`` (pyarrow): a column ``x`` holding each row as a list of time steps (lists of
  numbers); the other columns are copied to the output (e.g. an id).
Outputs: one shard per input shard, named after it: ``.npz`` with ``y`` (N, T_max, ...)
zero-padded and ``lengths`` for array shards, ``.parquet`` with a column ``y`` (and the
input's other columns) for Parquet shards. A shard is written to a temporary name and renamed
when complete, so a run that stops can be resumed: shards whose output exists are skipped.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, cast

import numpy as np

from rnnengine import load
from rnnengine.cli.common import _is_weight_file, _load_any
from rnnengine.runtime.base import Model
from rnnengine.runtime.model import LayerModel
from rnnengine.runtime.roles import axis_roles

__all__ = ["load_model", "score_row", "score_rows", "read_shard", "write_shard", "output_path", "score_files",
           "LOADS"]

SHARD_SUFFIXES = (".npy", ".npz", ".parquet")
_MODELS: dict[str, Model] = {}
LOADS = {"count": 0}  # models loaded by this process (each worker loads its model once)


def load_model(path: str, shared: bool = False) -> Model:
    """The model in ``path`` (a weight file or an ONNX file), loaded once per process.
    ``shared``: a weight file's packed weights are mapped from its panel cache
    (``rnnengine.load(path, shared=True)``), so the workers on one machine share one copy."""
    key = os.path.abspath(path)
    model = _MODELS.get(key)
    if model is None:
        model = load(key, shared=True) if shared and _is_weight_file(key) else _load_any(key)
        _MODELS[key] = model
        LOADS["count"] += 1
    return model


def _data_input(model: Model) -> str:
    names = model.input_names
    if len(names) != 1:
        raise ValueError(f"scoring feeds one input per row; this model takes {names}")
    return names[0]


def _batch_axes(model: Model) -> tuple[int, int]:
    """(batch axis of the data input, batch axis of the first output), found once per model."""
    cached = model.__dict__.get("_score_axes")
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    if isinstance(model, LayerModel):
        axes = (0, 0) if model.batch_first else (1, 1)
    else:
        name = _data_input(model)
        roles = axis_roles(cast(Any, model)).get(name, {})
        b_in = next((k for k, r in roles.items() if r == "batch"), None)
        if b_in is None:
            raise ValueError(f"cannot tell which axis of input {name!r} is the batch axis; scoring needs it")
        spec = next(i for i in model.graph["inputs"] if i["name"] == name)  # type: ignore[attr-defined]
        shape = [d if isinstance(d, int) and d > 0 else 3 for d in spec["shape"]]
        outs = []
        for b in (1, 2):
            shape[b_in] = b
            res = model.run({name: np.zeros(shape, np.dtype(spec["dtype"]))})
            outs.append(res[model.outputs[0]].shape)
        diff = [k for k, (p, q) in enumerate(zip(*outs)) if p != q]
        if len(outs[0]) != len(outs[1]) or len(diff) != 1 or outs[0][diff[0]] != 1:
            raise ValueError(f"cannot tell the batch axis of output {model.outputs[0]!r}; scoring needs it")
        axes = (b_in, diff[0])
    model.__dict__["_score_axes"] = axes
    return axes


def score_row(model: Model, x: np.ndarray) -> np.ndarray:
    """One whole sequence (without a batch axis) -> the model's first output for it (without
    a batch axis)."""
    b_in, b_out = _batch_axes(model)
    xb = np.expand_dims(np.asarray(x), b_in)
    if isinstance(model, LayerModel):
        y, _ = model.run(xb)
    else:
        y = model.run({_data_input(model): xb})[model.outputs[0]]
    return np.asarray(np.take(y, 0, axis=b_out))


def score_rows(model: Model, rows: Iterable[np.ndarray]) -> list[np.ndarray]:
    return [score_row(model, r) for r in rows]


# --- shards -------------------------------------------------------------------------------
def read_shard(path: str) -> tuple[list[np.ndarray], dict[str, Any]]:
    """(rows, other columns) of a shard."""
    if path.endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
        if arr.ndim < 2:
            raise ValueError(f"{path}: a .npy shard is (rows, T, ...), got shape {arr.shape}")
        return [arr[i] for i in range(arr.shape[0])], {}
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z:
                raise ValueError(f"{path}: an .npz shard holds 'x' (rows, T, ...) and optionally 'lengths'")
            x = z["x"]
            lens = z["lengths"] if "lengths" in z else np.full(x.shape[0], x.shape[1] if x.ndim > 1 else 0)
        if lens.shape != (x.shape[0],) or (lens.size and (lens.min() < 0 or lens.max() > x.shape[1])):
            raise ValueError(f"{path}: 'lengths' must be (rows,) within [0, T]")
        return [x[i, :int(lens[i])] for i in range(x.shape[0])], {}
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # the optional pyarrow dependency
        table = pq.read_table(path)
        if "x" not in table.column_names:
            raise ValueError(f"{path}: a Parquet shard has a column 'x' (each row a list of time steps)")
        rows = [np.asarray(r, np.float32) for r in table.column("x").to_pylist()]
        extra = {c: table.column(c) for c in table.column_names if c != "x"}
        return rows, extra
    raise ValueError(f"{path}: shards are .npy, .npz or .parquet")


def output_path(shard: str, out_dir: str) -> str:
    stem, suffix = os.path.splitext(os.path.basename(shard))
    return os.path.join(out_dir, stem + (".parquet" if suffix == ".parquet" else ".npz"))


def write_shard(path: str, ys: list[np.ndarray], extra: dict[str, Any]) -> None:
    """Writes the outputs of one shard atomically (a temporary file renamed when complete)."""
    tmp = path + ".partial"
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        cols = dict(extra)
        cols["y"] = pa.array([y.tolist() for y in ys])
        pq.write_table(pa.table(cols), tmp)
    else:
        lens = np.array([y.shape[0] if y.ndim else 0 for y in ys], np.int64)
        shape = ys[0].shape[1:] if ys and ys[0].ndim else ()
        T = int(lens.max()) if lens.size else 0
        y = np.zeros((len(ys), T) + tuple(shape), np.float32)
        for i, r in enumerate(ys):
            y[i, :r.shape[0]] = r
        with open(tmp, "wb") as f:
            np.savez(f, y=y, lengths=lens)
    os.replace(tmp, path)


def list_shards(inputs: list[str]) -> list[str]:
    shards = []
    for p in inputs:
        if os.path.isdir(p):
            shards += sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(SHARD_SUFFIXES))
        elif os.path.exists(p):
            shards.append(p)
        else:
            raise FileNotFoundError(f"no such file or directory: {p}")
    if not shards:
        raise ValueError(f"no .npy, .npz or .parquet shards in {inputs}")
    return shards


def score_files(model_path: str, inputs: list[str], out_dir: str, engine: str = "local", workers: int = 1,
                progress: bool = True, shared: bool = False) -> dict[str, Any]:
    """Scores every shard of ``inputs`` whose output is not in ``out_dir`` yet; returns a
    summary (shards done / skipped, rows, seconds). The local engine writes each shard as
    soon as it is scored; Ray writes each shard as soon as its last row comes back; Dask
    writes when its computation ends."""
    if engine not in ("local", "ray", "dask"):
        raise ValueError(f"engine must be local, ray or dask, got {engine!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    shards = list_shards(inputs)
    outputs: dict[str, str] = {}
    for s in shards:  # two shards named alike would write one output file: refused up front
        o = output_path(s, out_dir)
        if o in outputs:
            raise ValueError(f"shards {outputs[o]} and {s} would both write {o}; rename one of them")
        outputs[o] = s
    os.makedirs(out_dir, exist_ok=True)
    todo = [s for s in shards if not os.path.exists(output_path(s, out_dir))]
    t0 = time.perf_counter()
    n_rows = 0
    if engine == "local":
        model = load_model(model_path, shared)
        for shard in todo:
            rs, extra = read_shard(shard)
            ys = []
            for i, r in enumerate(rs):
                try:
                    ys.append(score_row(model, r))
                except Exception as err:
                    raise type(err)(f"{shard}, row {i}: {err}") if isinstance(err, (ValueError, TypeError)) \
                        else err
            write_shard(output_path(shard, out_dir), ys, extra)
            n_rows += len(rs)
            if progress:
                _bar(n_rows, n_rows, t0, f"{len(todo)} shards")
    else:
        loaded = [(s, *read_shard(s)) for s in todo]
        rows = [(k, i, r) for k, (_, rs, _) in enumerate(loaded) for i, r in enumerate(rs)]
        n_rows = len(rows)
        need = [len(rs) for _, rs, _ in loaded]
        got: dict[int, dict[int, np.ndarray]] = {k: {} for k in range(len(loaded))}

        def collect(k: int, i: int, y: np.ndarray) -> None:
            got[k][i] = y
            if len(got[k]) == need[k]:  # the shard is complete: write it now
                shard, rs, extra = loaded[k]
                write_shard(output_path(shard, out_dir), [got[k][j] for j in range(need[k])], extra)
                del got[k]
        for k in [k for k in got if need[k] == 0]:  # an empty shard: an empty output
            write_shard(output_path(loaded[k][0], out_dir), [], loaded[k][2])
            del got[k]
        if engine == "ray":
            from rnnengine.scoring.ray_engine import score_with_ray
            score_with_ray(model_path, rows, workers, progress, collect, shared=shared)
        else:
            from rnnengine.scoring.dask_engine import score_with_dask
            for (k, i), y in score_with_dask(model_path, rows, workers, progress, shared=shared).items():
                collect(k, i, y)
    if progress:
        print(file=sys.stderr)
    return {"shards": len(todo), "skipped": len(shards) - len(todo), "rows": n_rows,
            "seconds": round(time.perf_counter() - t0, 3), "engine": engine}


def _bar(done: int, total: int, t0: float, what: str = "") -> None:
    rate = done / max(time.perf_counter() - t0, 1e-9)
    print(f"\r{done} rows scored, {rate:.0f} rows/s {what}", end="", file=sys.stderr, flush=True)
