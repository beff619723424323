"""Scoring on Dask (distributed): a worker plugin loads the model once per worker; the rows
are a Dask bag partitioned along the rows only (a row is a whole sequence, never split), each
partition scored by the worker's model."""
from __future__ import annotations

import os
import sys
import time
from typing import Any

import dask.bag as db
import numpy as np
from distributed import Client, LocalCluster, WorkerPlugin, get_worker

from rnnengine.scoring import LOADS, load_model, score_row

PLUGIN_NAME = "rnnengine-model"


class ModelPlugin(WorkerPlugin):
    """Loads the model when a worker starts (or when the plugin is registered)."""
    name = PLUGIN_NAME

    def __init__(self, model_path: str, shared: bool = False) -> None:
        self.model_path = os.path.abspath(model_path)
        self.shared = shared

    def setup(self, worker: Any) -> None:
        worker.rnnengine_model = load_model(self.model_path, self.shared)


def _score_partition(part: list[tuple[int, int, np.ndarray]]) -> list[tuple[int, int, np.ndarray, int, int]]:
    model = get_worker().rnnengine_model  # type: ignore[attr-defined]
    return [(k, i, score_row(model, x), os.getpid(), LOADS["count"]) for k, i, x in part]


def score_bag(client: Client, model_path: str, rows: list[tuple[int, int, np.ndarray]],
              partitions: int, shared: bool = False) -> tuple[dict[tuple[int, int], np.ndarray], dict[int, int]]:
    """{(shard, row): output} and {worker pid: models that process loaded}, on ``client``."""
    client.register_plugin(ModelPlugin(model_path, shared))
    bag = db.from_sequence(rows, npartitions=max(1, min(partitions, len(rows))))
    out = bag.map_partitions(_score_partition).compute(scheduler=client.get)
    results = {(k, i): y for k, i, y, _, _ in out}
    loads: dict[int, int] = {}
    for _, _, _, pid, n in out:
        loads[pid] = max(loads.get(pid, 0), n)
    return results, loads


def score_with_dask(model_path: str, rows: list[tuple[int, int, np.ndarray]], workers: int,
                    progress: bool, shared: bool = False) -> dict[tuple[int, int], np.ndarray]:
    t0 = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        results, _ = score_bag(client, model_path, rows, partitions=4 * workers, shared=shared)
    if progress:
        print(f"dask: {len(rows)} rows on {workers} workers in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return results
