"""Scoring on Ray with Ray Data: the rows become a dataset, ``map_batches`` runs a callable
class over it with an actor pool of ``workers`` actors (``concurrency=workers``), each actor
loading the model once in its constructor; every row is a whole sequence, scored alone."""
from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np
import ray

from rnnengine.scoring import LOADS, load_model, score_row


class RayScorer:
    """The callable class of ``map_batches``: one per actor, the model loaded once."""

    def __init__(self, model_path: str, shared: bool = False) -> None:
        self.model = load_model(model_path, shared)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ys = [score_row(self.model, np.asarray(x)) for x in batch["x"]]
        out = np.empty(len(ys), dtype=object)
        out[:] = ys
        n = len(ys)
        return {"shard": batch["shard"], "row": batch["row"], "y": out,
                "pid": np.full(n, os.getpid()), "loads": np.full(n, LOADS["count"])}


def score_rows_with_ray(model_path: str, rows: list[tuple[int, int, np.ndarray]], workers: int,
                        batch_size: int = 16, collect: Any = None, shared: bool = False
                        ) -> tuple[dict[tuple[int, int], np.ndarray], dict[int, int]]:
    """{(shard, row): output} and {worker pid: models that process loaded}; ``collect(shard,
    row, y)`` is also called for each row as its result streams back."""
    if not ray.is_initialized():
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    items = [{"shard": k, "row": i, "x": x} for k, i, x in rows]
    ds = ray.data.from_items(items)
    out = ds.map_batches(RayScorer, fn_constructor_args=(os.path.abspath(model_path), shared), concurrency=workers,
                         batch_size=batch_size, batch_format="numpy")
    results: dict[tuple[int, int], np.ndarray] = {}
    loads: dict[int, int] = {}
    for r in out.iter_rows():
        key = (int(r["shard"]), int(r["row"]))
        results[key] = np.asarray(r["y"])
        if collect is not None:
            collect(key[0], key[1], results[key])
        loads[int(r["pid"])] = max(loads.get(int(r["pid"]), 0), int(r["loads"]))
    return results, loads


def score_with_ray(model_path: str, rows: list[tuple[int, int, np.ndarray]], workers: int,
                   progress: bool, collect: Any = None, shared: bool = False) -> dict[tuple[int, int], np.ndarray]:
    t0 = time.perf_counter()
    results, _ = score_rows_with_ray(model_path, rows, workers, collect=collect, shared=shared)
    if progress:
        print(f"ray: {len(rows)} rows on {workers} actors in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return results
