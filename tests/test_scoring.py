"""Batch scoring (`rnnengine score`): local, Ray Data and Dask give exactly the single-process
result on a few hundred sequences of varying length, each worker loads the model once, and a
run resumes shard by shard."""
import os
import subprocess
import sys

import numpy as np
import pytest

import rnnengine
from rnnengine.scoring import read_shard, score_files, score_row, write_shard

rng = np.random.default_rng(21)
I, H = 4, 6


def f32(*shape, scale=0.5):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    m = rnnengine.Model([rnnengine.GRU(f32(1, 3 * H, I), f32(1, 3 * H, H), f32(1, 6 * H)),
                         rnnengine.LSTM(f32(1, 4 * H, H), f32(1, 4 * H, H))])
    path = str(d / "m.rnne")
    rnnengine.save(m, path)
    return path, m


@pytest.fixture(scope="module")
def rows():
    lens = rng.integers(1, 30, size=300)
    return [f32(int(n), I, scale=1.0) for n in lens]


def shards(tmp, rows):
    """The rows as three .npz shards (padded, with lengths) and one .npy of full-length rows."""
    d = tmp / "in"
    d.mkdir()
    n = len(rows) - 10
    parts = [rows[:n // 3], rows[n // 3:2 * n // 3], rows[2 * n // 3:n]]
    for k, part in enumerate(parts):
        T = max(r.shape[0] for r in part)
        x = np.zeros((len(part), T, I), np.float32)
        for i, r in enumerate(part):
            x[i, :r.shape[0]] = r
        np.savez(d / f"part{k}.npz", x=x, lengths=np.array([r.shape[0] for r in part]))
    np.save(d / "part3.npy", np.stack([r[:1] for r in rows[n:]]))
    return str(d)


def expected(model, path):
    rs, _ = read_shard(path)
    return [score_row(model, r) for r in rs]


def check_outputs(model, in_dir, out_dir):
    for name in sorted(os.listdir(in_dir)):
        src = os.path.join(in_dir, name)
        with np.load(os.path.join(out_dir, os.path.splitext(name)[0] + ".npz")) as z:
            y, lens = z["y"], z["lengths"]
        want = expected(model, src)
        assert len(want) == y.shape[0]
        for i, w in enumerate(want):
            assert lens[i] == w.shape[0]
            np.testing.assert_array_equal(y[i, :lens[i]], w)


def test_a_row_is_scored_as_the_whole_sequence(model_file):
    path, layer_model = model_file
    model = rnnengine.load(path)
    x = f32(9, I, scale=1.0)
    Y, _ = layer_model.run(x[:, None, :])
    assert np.abs(score_row(model, x) - Y[:, 0]).max() <= 1e-5
    assert np.abs(score_row(layer_model, x) - Y[:, 0]).max() == 0


def test_local_scoring_and_resume_by_shard(model_file, rows, tmp_path):
    path, _ = model_file
    model = rnnengine.load(path)
    in_dir = shards(tmp_path, rows)
    out = str(tmp_path / "out")
    s = score_files(path, [in_dir], out, progress=False)
    assert s["shards"] == 4 and s["rows"] == 300
    check_outputs(model, in_dir, out)
    os.remove(os.path.join(out, "part1.npz"))
    with open(os.path.join(out, "part2.npz.partial"), "wb") as f:
        f.write(b"half a shard")  # a run that stopped mid-write leaves only a .partial
    s = score_files(path, [in_dir], out, progress=False)
    assert s["shards"] == 1 and s["skipped"] == 3
    check_outputs(model, in_dir, out)


def test_parquet_shards_keep_their_other_columns(model_file, rows, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    path, _ = model_file
    model = rnnengine.load(path)
    src = str(tmp_path / "rows.parquet")
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(40)], "x": [r.tolist() for r in rows[:40]]}), src)
    score_files(path, [src], str(tmp_path / "out"), progress=False)
    t = pq.read_table(str(tmp_path / "out" / "rows.parquet"))
    assert t.column("id").to_pylist() == [f"r{i}" for i in range(40)]
    for i, y in enumerate(t.column("y").to_pylist()):
        np.testing.assert_array_equal(np.asarray(y, np.float32), score_row(model, rows[i]))


def test_ray_data_gives_the_single_process_result_loading_once_per_actor(model_file, rows, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    # Ray's workers start in the driver's directory: from the repository root they would import
    # the source tree's rnnengine (no compiled core) instead of the installed package
    monkeypatch.chdir(tmp_path)
    from rnnengine.scoring.ray_engine import score_rows_with_ray
    path, _ = model_file
    model = rnnengine.load(path)
    items = [(0, i, r) for i, r in enumerate(rows)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results, loads = score_rows_with_ray(path, items, workers=2)
    finally:
        ray.shutdown()
    assert len(results) == len(rows)
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(results[(0, i)], score_row(model, r))
    assert 1 <= len(loads) <= 2 and set(loads.values()) == {1}  # each actor's process loaded the model once


def test_dask_gives_the_single_process_result_loading_once_per_worker(model_file, rows, tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    monkeypatch.chdir(tmp_path)  # (as for Ray: workers must import the installed package)
    from distributed import Client, LocalCluster

    from rnnengine.scoring.dask_engine import score_bag
    path, _ = model_file
    model = rnnengine.load(path)
    items = [(0, i, r) for i, r in enumerate(rows)]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        results, loads = score_bag(client, path, items, partitions=8)
        pids = set(client.run(os.getpid).values())
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(results[(0, i)], score_row(model, r))
    assert set(loads) <= pids and set(loads.values()) == {1}


@pytest.mark.parametrize("engine", ["ray", "dask"])
def test_the_command_scores_with_each_engine(model_file, rows, tmp_path, engine):
    pytest.importorskip("ray" if engine == "ray" else "distributed")
    path, _ = model_file
    in_dir = shards(tmp_path, rows[:60] + rows[290:])
    out = str(tmp_path / "out")
    r = subprocess.run([sys.executable, "-m", "rnnengine.cli", "score", path, in_dir, "-o", out,
                        "--engine", engine, "--workers", "2"], capture_output=True, text=True, timeout=600,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "scored" in r.stdout
    check_outputs(rnnengine.load(path), in_dir, out)


def test_bad_shards_are_refused(tmp_path, model_file):
    path, _ = model_file
    np.save(tmp_path / "flat.npy", np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="rows, T"):
        score_files(path, [str(tmp_path / "flat.npy")], str(tmp_path / "o"), progress=False)
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 3, I), np.float32), lengths=np.array([1, 9]))
    with pytest.raises(ValueError, match="lengths"):
        score_files(path, [str(tmp_path / "bad.npz")], str(tmp_path / "o"), progress=False)
    with pytest.raises(FileNotFoundError):
        score_files(path, [str(tmp_path / "missing")], str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="engine"):
        score_files(path, [str(tmp_path)], str(tmp_path / "o"), engine="spark", progress=False)


def test_zero_length_rows_colliding_names_and_a_bad_shard(tmp_path, model_file):
    path, _ = model_file
    model = rnnengine.load(path)
    d = tmp_path / "in"
    d.mkdir()
    np.savez(d / "a.npz", x=f32(3, 5, I), lengths=np.array([5, 0, 3]))
    np.save(d / "z_bad.npy", f32(2, 4, I + 1))  # wrong feature count
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"z_bad.npy, row 0"):
        score_files(path, [str(d)], out, progress=False)
    with np.load(os.path.join(out, "a.npz")) as z:  # the good shard was written before the bad one failed
        assert list(z["lengths"]) == [5, 0, 3]
        assert np.array_equal(z["y"][0, :5], score_row(model, read_shard(str(d / "a.npz"))[0][0]))
    (tmp_path / "other").mkdir()
    np.save(tmp_path / "other" / "a.npy", f32(2, 4, I))
    with pytest.raises(ValueError, match="would both write"):
        score_files(path, [str(d / "a.npz"), str(tmp_path / "other" / "a.npy")], str(tmp_path / "o2"),
                    progress=False)


@pytest.mark.parametrize("engine", ["local", "dask"])
def test_shared_scoring_maps_the_panel_cache_and_gives_the_same_result(model_file, rows, tmp_path, engine):
    """`score --shared`: each worker loads the weight file with shared=True (its packed weights
    mapped from the panel cache beside it, written on first use); the outputs are exactly the
    unshared ones."""
    if engine == "dask":
        pytest.importorskip("distributed")
    import shutil
    src, _ = model_file
    path = str(tmp_path / "m.rnne")
    shutil.copy(src, path)
    in_dir = shards(tmp_path, rows[:40])
    out = str(tmp_path / "out")
    r = subprocess.run([sys.executable, "-m", "rnnengine.cli", "score", path, in_dir, "-o", out, "--engine", engine,
                        "--workers", "2", "--shared"], capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(path + ".panels")  # the cache the workers mapped
    check_outputs(rnnengine.load(src), in_dir, out)
