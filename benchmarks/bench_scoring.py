"""Batch scoring throughput (`rnnengine score`): sequences per second for the local engine and
for Ray Data and Dask with 1 and 2 workers, on the same shards, in one run.

    python benchmarks/bench_scoring.py [--rows 4000] [--hidden 256]

Every engine scores every row alone (batch 1, the whole sequence), so all give the same
bytes; the script checks that against the local run. "wall" is the whole call, the cluster's
start included (Ray: ray.init and the actor pool; Dask: LocalCluster); "scoring" leaves out
the start, measured by scoring one tiny shard first on the same cluster.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import rnnengine  # noqa: E402


def make_shards(d: str, rows: int, I: int, rng: np.random.Generator) -> list[str]:
    paths = []
    per = rows // 4
    for k in range(4):
        lens = rng.integers(50, 400, size=per)
        x = np.zeros((per, int(lens.max()), I), np.float32)
        for i, n in enumerate(lens):
            x[i, :n] = rng.standard_normal((n, I)).astype(np.float32)
        p = os.path.join(d, f"part{k}.npz")
        np.savez(p, x=x, lengths=lens)
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--hidden", type=int, default=256)
    a = ap.parse_args(argv)
    from distributed import Client, LocalCluster

    from rnnengine.scoring import load_model, read_shard, score_row
    from rnnengine.scoring.dask_engine import score_bag
    from rnnengine.scoring.ray_engine import score_rows_with_ray
    import ray
    rng = np.random.default_rng(0)
    I, H = 32, a.hidden
    d = tempfile.mkdtemp()
    os.chdir(d)  # Ray's workers start here: not a source checkout (README)
    try:
        layers = [rnnengine.LSTM((rng.standard_normal((1, 4 * H, n)) / np.sqrt(n)).astype(np.float32),
                                 (rng.standard_normal((1, 4 * H, H)) / np.sqrt(H)).astype(np.float32))
                  for n in (I, H)]
        model_path = os.path.join(d, "m.rnne")
        rnnengine.save(rnnengine.Model(layers), model_path)
        shards = make_shards(d, a.rows, I, rng)
        rows = [(k, i, r) for k, s in enumerate(shards) for i, r in enumerate(read_shard(s)[0])]
        tiny = rows[:4]
        steps = sum(r.shape[0] for _, _, r in rows)
        print(f"{len(rows)} rows, {steps} steps in all, LSTM I={I} H={H} x2; {os.cpu_count()} cores", file=sys.stderr)
        model = load_model(model_path)
        results = []
        t0 = time.perf_counter()
        want = {(k, i): score_row(model, r) for k, i, r in rows}
        t = time.perf_counter() - t0
        results.append(("local", 1, t, t))
        for workers in (1, 2):
            t0 = time.perf_counter()
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            try:
                score_rows_with_ray(model_path, tiny, workers)
                t1 = time.perf_counter()
                got, _ = score_rows_with_ray(model_path, rows, workers)
                t2 = time.perf_counter()
            finally:
                ray.shutdown()
            assert all(np.array_equal(got[key], want[key]) for key in want)
            results.append(("ray", workers, t2 - t0, t2 - t1))
        for workers in (1, 2):
            t0 = time.perf_counter()
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                              dashboard_address=None) as cluster, Client(cluster) as client:
                score_bag(client, model_path, tiny, partitions=workers)
                t1 = time.perf_counter()
                got, _ = score_bag(client, model_path, rows, partitions=4 * workers)
                t2 = time.perf_counter()
            assert all(np.array_equal(got[key], want[key]) for key in want)
            results.append(("dask", workers, t2 - t0, t2 - t1))
        print("\n| engine | workers | wall s | sequences/s (wall) | scoring s | sequences/s (scoring) |")
        print("|---|---:|---:|---:|---:|---:|")
        for eng, w, wall, sc in results:
            print(f"| {eng} | {w} | {wall:.1f} | {len(rows) / wall:.0f} | {sc:.1f} | {len(rows) / sc:.0f} |")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
