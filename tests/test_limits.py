"""Resource limits (rnnengine/limits.py): models that would take gigabytes or hours to fold,
unroll or read are refused by the limit, naming it, the node and the value, before anything
is allocated; weight files truncated or replaced on disk while loaded raise instead of killing
the process; rnnengine.format.weightfile imports without the compiled extension."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper
from onnx import numpy_helper as nh

import rnnengine
from rnnengine import limits
from rnnengine.format import weightfile as fileformat
from rnnengine.limits import LimitError, Limits

# subprocesses run outside the repository root: `python -c` puts the working directory first on
# sys.path, and a fresh clone's rnnengine/ there has no compiled core (the installed one is tested)
OUTSIDE = tempfile.gettempdir()


def make(nodes, inits=(), inputs=(), outputs=("y",), opset=17):
    g = helper.make_graph(list(nodes), "g", list(inputs),
                          [helper.make_tensor_value_info(o, TP.FLOAT, None) if isinstance(o, str) else o
                           for o in outputs], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def inp(name, shape, t=TP.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def i64(name, v):
    return nh.from_array(np.asarray(v, np.int64), name)


def refused(fn, limit, node, value=None):
    """fn() raises LimitError naming the limit, the node and (when given) the value, fast."""
    t = time.perf_counter()
    with pytest.raises(LimitError) as e:
        fn()
    took = time.perf_counter() - t
    msg = str(e.value)
    assert f"limit {limit}=" in msg and node in msg and f"Limits({limit}=...)" in msg, msg
    if value is not None:
        assert str(value) in msg, msg
    assert took < 2.0, f"refused after {took:.2f} s"
    return msg


# --- folding: sizes checked before NumPy allocates ------------------------------------------

BLOWUPS = {
    # op: (nodes, initializers, elements of the output)
    "ConstantOfShape": ([helper.make_node("ConstantOfShape", ["s"], ["y"], name="c")],
                        [i64("s", [65536, 65536])], 1 << 32),
    "Expand": ([helper.make_node("Expand", ["v", "s"], ["y"], name="e")],
               [nh.from_array(np.ones((1, 3), np.float32), "v"), i64("s", [1 << 31, 3])], 3 << 31),
    "Tile": ([helper.make_node("Tile", ["v", "r"], ["y"], name="t")],
             [nh.from_array(np.ones((2, 3), np.float32), "v"), i64("r", [1 << 20, 1 << 12])], 6 << 32),
    "Range": ([helper.make_node("Range", ["a", "b", "d"], ["y"], name="r")],
              [nh.from_array(np.array(0, np.float32), "a"), nh.from_array(np.array(1e10, np.float32), "b"),
               nh.from_array(np.array(1, np.float32), "d")], 10000000000),
    "Add": ([helper.make_node("Add", ["u", "v"], ["y"], name="outer")],  # (N, 1) + (1, N): N^2
            [nh.from_array(np.ones((1 << 16, 1), np.float32), "u"),
             nh.from_array(np.ones((1, 1 << 16), np.float32), "v")], 1 << 32),
    "MatMul": ([helper.make_node("MatMul", ["u", "v"], ["y"], name="mm")],
               [nh.from_array(np.ones((1 << 16, 1), np.float32), "u"),
                nh.from_array(np.ones((1, 1 << 16), np.float32), "v")], 1 << 32),
    "Gather": ([helper.make_node("Gather", ["v", "k"], ["y"], name="g")],
               [nh.from_array(np.ones((4, 1 << 12), np.float32), "v"), i64("k", np.zeros(1 << 18))], 1 << 30),
}


@pytest.mark.parametrize("op", sorted(BLOWUPS))
def test_folding_refuses_a_huge_output_before_allocating_it(op):
    nodes, inits, n = BLOWUPS[op]
    m = make(nodes, inits)
    msg = refused(lambda: rnnengine.convert(m), "max_tensor_elements", f"{op} node '{nodes[0].name}'", n)
    assert "elements" in msg
    # a larger limit lets the size through (then another limit stops it: nothing is allocated)
    with pytest.raises(LimitError, match="max_plan_bytes"):
        rnnengine.convert(m, limits=Limits(max_tensor_elements=1 << 40, max_plan_bytes=1 << 20))


def weight_file(tmp_path, graph, tensors):
    path = str(tmp_path / "m.rnne")
    fileformat.write(path, graph, tensors)
    return path


def test_a_weight_file_folding_a_huge_tensor_is_refused_when_planned(tmp_path):
    """A hand-written weight file (no converter to fold it): the plan refuses it."""
    graph = {"opset": 17, "inputs": [{"name": "x", "dtype": "float32", "shape": [1]}],
             "outputs": [{"name": "y", "dtype": "float32", "shape": None}],
             "nodes": [{"op": "ConstantOfShape", "name": "c", "inputs": ["s"], "outputs": ["z"], "attrs": {}},
                       {"op": "Add", "name": "a", "inputs": ["x", "z"], "outputs": ["y"], "attrs": {}}]}
    path = weight_file(tmp_path, graph, {"s": np.array([1 << 20, 1 << 20], np.int64)})
    m = rnnengine.load(path)
    x = np.ones(1, np.float32)
    refused(lambda: m.run({"x": x}), "max_tensor_elements", "ConstantOfShape node 'c'", 1 << 40)
    # sizes that depend on the input shapes: refused with the limits given at load
    graph["nodes"] = [{"op": "Shape", "name": "sh", "inputs": ["x"], "outputs": ["s0"], "attrs": {}},
                      {"op": "Mul", "name": "m", "inputs": ["s0", "k"], "outputs": ["s"], "attrs": {}},
                      {"op": "ConstantOfShape", "name": "c", "inputs": ["s"], "outputs": ["y"], "attrs": {}}]
    graph["inputs"][0]["shape"] = ["n"]
    path = weight_file(tmp_path, graph, {"k": np.array([1000], np.int64)})
    small = rnnengine.load(path, limits=Limits(max_tensor_elements=5000))
    y = small.run({"x": np.arange(5, dtype=np.float32)})["y"]  # 5000 elements: allowed
    assert y.shape == (5000,) and y.dtype == np.float32 and not y.any()
    refused(lambda: small.run({"x": np.ones(6, np.float32)}), "max_tensor_elements", "ConstantOfShape node 'c'",
            6000)
    assert rnnengine.load(path).run({"x": np.ones(6, np.float32)})["y"].shape == (6000,)  # the defaults


def test_planning_refuses_a_huge_output_before_its_handler_runs():
    """A Pad of a run-time tensor by 2**40: refused before the planner builds its index maps."""
    m = make([helper.make_node("Pad", ["x", "pads"], ["y"], name="pad")], [i64("pads", [0, 1 << 40, 0, 0])],
             [inp("x", [2, 3])])
    gm = rnnengine.convert(m)
    refused(lambda: gm.run({"x": np.ones((2, 3), np.float32)}), "max_tensor_elements", "Pad node 'pad'",
            2 * (3 + (1 << 40)))
    x = np.random.default_rng(6).standard_normal((2, 3)).astype(np.float32)
    small = make([helper.make_node("Pad", ["x", "pads"], ["y"], name="pad")], [i64("pads", [0, 2, 1, 0])],
                 [inp("x", [2, 3])])
    want = ort.InferenceSession(small.SerializeToString()).run(None, {"x": x})[0]
    assert np.array_equal(rnnengine.convert(small).run({"x": x})["y"], want)
    refused(lambda: rnnengine.convert(small, limits=Limits(max_tensor_elements=14)).run({"x": x}),
            "max_tensor_elements", "Pad node 'pad'", 15)
    # a planned Pad holds an index per output position of each axis (40 bytes each while
    # planning): (2, 1003) float32 = 8024 bytes, and 1005 indices = 40200 bytes
    long = make([helper.make_node("Pad", ["x", "pads"], ["y"], name="pad")], [i64("pads", [0, 1000, 0, 0])],
                [inp("x", [2, 3])])
    refused(lambda: rnnengine.convert(long, limits=Limits(max_plan_bytes=40000)).run({"x": x}), "max_plan_bytes",
            "Pad node 'pad'", 8024 + 40200)
    want = ort.InferenceSession(long.SerializeToString()).run(None, {"x": x})[0]
    assert np.array_equal(rnnengine.convert(long, limits=Limits(max_plan_bytes=60000)).run({"x": x})["y"], want)


def test_plan_bytes_count_every_folded_tensor_and_buffer(tmp_path):
    # 8 constants of 2^20 float32 each (4 MiB), folded by Mul: 32 MiB in all
    nodes = [helper.make_node("ConstantOfShape", ["s"], [f"c{k}"], name=f"c{k}",
                              value=nh.from_array(np.array([float(k)], np.float32))) for k in range(8)]
    nodes += [helper.make_node("Add", ["x", "c0"], ["y"], name="add")]
    m = make(nodes, [i64("s", [1 << 20])], [inp("x", [1 << 20])])
    refused(lambda: rnnengine.convert(m, limits=Limits(max_plan_bytes=5 << 20)), "max_plan_bytes", "ConstantOfShape")
    gm = rnnengine.convert(m, limits=Limits(max_plan_bytes=40 << 20))
    x = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    assert np.array_equal(gm.run({"x": x})["y"], x)
    # planning: the run-time buffer of y (4 MiB) goes past a 3 MiB budget
    rnnengine.save(gm, str(tmp_path / "m.rnne"))
    small = rnnengine.load(str(tmp_path / "m.rnne"), limits=Limits(max_plan_bytes=3 << 20))
    refused(lambda: small.run({"x": x}), "max_plan_bytes", "Add node 'add'", 1 << 22)
    assert np.array_equal(rnnengine.load(str(tmp_path / "m.rnne")).run({"x": x})["y"], x)


# --- Loops: unrolled nodes counted over the whole plan, nesting included -----------------------

def loop_body(nodes, p="", name="b"):
    """A Loop body (names prefixed by p): iteration p+i, condition p+c passed on, state p+s -> p+s2."""
    return helper.make_graph(
        [helper.make_node("Identity", [p + "c"], [p + "c2"])] + nodes, name,
        [inp(p + "i", [], TP.INT64), inp(p + "c", [], TP.BOOL), inp(p + "s", None)],
        [inp(p + "c2", [], TP.BOOL), inp(p + "s2", None)])


def nested_loops(outer, inner, inner_count_in_body=False):
    """y = x * outer * inner by two nested Loops adding x."""
    inner_body = loop_body([helper.make_node("Add", ["s", "x"], ["s2"])], name="ib")
    # the inner count computed from the outer iteration (N + 0 * i): known only when planning
    outer_nodes = [helper.make_node("Mul", ["oi", "zero"], ["oi0"]), helper.make_node("Add", ["N", "oi0"], ["n"])] \
        if inner_count_in_body else []
    outer_nodes.append(helper.make_node("Loop", ["n" if inner_count_in_body else "N", "", "os"], ["os2"],
                                        body=inner_body, name="inner"))
    outer_body = loop_body(outer_nodes, "o", name="ob")
    return make([helper.make_node("Loop", ["M", "", "s0"], ["y"], body=outer_body, name="outer")],
                [i64("M", outer), i64("N", inner), i64("zero", 0), nh.from_array(np.zeros((1, 4), np.float32), "s0")],
                [inp("x", [1, 4])])


def test_loops_within_the_limit_run_as_onnxruntime():
    x = np.random.default_rng(1).standard_normal((1, 4)).astype(np.float32)
    for flag in (False, True):
        m = nested_loops(3, 5, flag)
        got = rnnengine.convert(m).run({"x": x})["y"]
        want = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
        assert np.allclose(got, want, rtol=1e-6, atol=1e-6) and np.allclose(got, 15 * x, rtol=1e-6)


def test_huge_and_nested_loops_are_refused_before_they_are_unrolled(tmp_path):
    x = np.ones((1, 4), np.float32)
    # one loop of 10^9 iterations; nested 1000 x 1000 (the trip count of the inner loop a
    # constant of the outer scope: refused at the outer Loop, before any iteration)
    for outer, inner, node, total in ((1, 10 ** 9, "Loop node 'outer'", 2 * 10 ** 9 + 2),
                                      (1000, 1000, "Loop node 'outer'", 2002000)):
        gm = rnnengine.convert(nested_loops(outer, inner))
        refused(lambda: gm.run({"x": x}), "max_loop_nodes", node, total)
        rnnengine.save(gm, str(tmp_path / "loops.rnne"))
        loaded = rnnengine.load(str(tmp_path / "loops.rnne"))
        refused(lambda: loaded.run({"x": x}), "max_loop_nodes", node, total)
    # an inner trip count computed inside the outer body: counted as the loops unroll
    gm = rnnengine.convert(nested_loops(1000, 1000, inner_count_in_body=True), limits=Limits(max_loop_nodes=5000))
    refused(lambda: gm.run({"x": x}), "max_loop_nodes", "Loop node 'inner'")
    # the limit is the whole graph's: 3 outer iterations of 2 nodes, each with 5 inner ones
    # of 2 nodes: 36 nodes
    m = nested_loops(3, 5)
    assert rnnengine.convert(m, limits=Limits(max_loop_nodes=36)).run({"x": x})["y"][0, 0] == 15
    refused(lambda: rnnengine.convert(m, limits=Limits(max_loop_nodes=35)).run({"x": x}), "max_loop_nodes",
            "Loop node 'outer'", 36)


def test_a_while_loop_with_a_huge_trip_count_runs_as_long_as_its_condition():
    """tf2onnx's while loops: trip count INT64_MAX, stopped by a condition computed in the
    body (i + 1 < 4). Not refused for the trip count; runs as onnxruntime."""
    body = helper.make_graph(
        [helper.make_node("Add", ["i", "one"], ["i1"]), helper.make_node("Less", ["i1", "four"], ["c2"]),
         helper.make_node("Add", ["s", "x"], ["s2"])], "b",
        [inp("i", [], TP.INT64), inp("c", [], TP.BOOL), inp("s", None)], [inp("c2", [], TP.BOOL), inp("s2", None)],
        [i64("one", 1), i64("four", 4)])
    m = make([helper.make_node("Loop", ["M", "t", "s0"], ["y"], body=body, name="while")],
             [i64("M", 2 ** 63 - 1), nh.from_array(np.array(True), "t"), nh.from_array(np.zeros((1, 4), np.float32), "s0")],
             [inp("x", [1, 4])])
    x = np.random.default_rng(7).standard_normal((1, 4)).astype(np.float32)
    want = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    got = rnnengine.convert(m, limits=Limits(max_loop_nodes=12)).run({"x": x})["y"]
    assert np.allclose(got, want, rtol=1e-6, atol=1e-6) and np.allclose(got, 4 * x, rtol=1e-6)
    refused(lambda: rnnengine.convert(m, limits=Limits(max_loop_nodes=11)).run({"x": x}), "max_loop_nodes",
            "Loop node 'while'", 12)


def test_a_loop_that_never_stops_is_refused():
    # no trip count, a condition that stays true: the node count stops it
    m = make([helper.make_node("Loop", ["", "t", "s0"], ["y"], body=loop_body(
        [helper.make_node("Add", ["s", "x"], ["s2"])]), name="forever")],
        [nh.from_array(np.array(True), "t"), nh.from_array(np.zeros((1, 4), np.float32), "s0")], [inp("x", [1, 4])])
    gm = rnnengine.convert(m, limits=Limits(max_loop_nodes=2000))
    refused(lambda: gm.run({"x": np.ones((1, 4), np.float32)}), "max_loop_nodes", "Loop node 'forever'", 2002)


def test_a_sequence_split_from_a_tensor_counts_against_max_loop_nodes():
    """SplitToSequence plans one Slice per tensor of the sequence (a fuzzed model split a
    tensor into ~13,000 and took 2.4 s per plan): those count against max_loop_nodes with the
    Loop bodies. Within the limit it runs like onnxruntime."""
    m = make([helper.make_node("SplitToSequence", ["x"], ["seq"], axis=1, keepdims=0, name="unbind"),
              helper.make_node("ConcatFromSequence", ["seq"], ["y"], axis=0, new_axis=1, name="stack")],
             inputs=[inp("x", [2, 40])])
    x = np.random.default_rng(3).standard_normal((2, 40)).astype(np.float32)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(rnnengine.convert(m, limits=Limits(max_loop_nodes=40)).run({"x": x})["y"], want)
    gm = rnnengine.convert(m, limits=Limits(max_loop_nodes=39))
    with pytest.raises(LimitError, match=r"SplitToSequence node 'unbind': splitting into a sequence of 40 tensors "
                                         r"would bring the nodes unrolled .* to 40, more than the limit max_loop_nodes=39"):
        gm.run({"x": x})


def test_planning_time_is_bounded():
    gm = rnnengine.convert(nested_loops(20, 50), limits=Limits(max_planning_seconds=0.05))
    t = time.perf_counter()
    with pytest.raises(LimitError, match=r"planning has taken 0.05 s .* max_planning_seconds=0.05"):
        gm.run({"x": np.ones((1, 4), np.float32)})
    assert time.perf_counter() - t < 1.5


def loop_with_if(out="o"):
    """A Loop whose body holds an If (decided when planning) whose branches name their
    output as the If does: planning such a stream once looped forever."""
    branches = [helper.make_graph([helper.make_node(op, ["s", "x"], [out])], op, [], [inp(out, None)])
                for op in ("Add", "Sub")]
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c2"]),
         helper.make_node("Constant", [], ["k"], value=nh.from_array(np.array(True))),
         helper.make_node("If", ["k"], [out], then_branch=branches[0], else_branch=branches[1], name="if")],
        "body", [inp("i", [], TP.INT64), inp("c", [], TP.BOOL), inp("s", None)], [inp("c2", [], TP.BOOL), inp(out, None)])
    return make([helper.make_node("Loop", ["M", "", "s0"], ["y"], body=body, name="loop")],
                [i64("M", 3), nh.from_array(np.zeros((1, 4), np.float32), "s0")], [inp("x", [1, 4])])


def test_stream_over_a_loop_with_an_if_reusing_its_output_name():
    m = loop_with_if()
    gm = rnnengine.convert(m)
    rng = np.random.default_rng(2)
    sess = ort.InferenceSession(m.SerializeToString())
    stream = gm.stream()  # returned (it never did)
    acc = np.zeros((1, 4), np.float32)
    for _ in range(3):
        x = rng.standard_normal((1, 4)).astype(np.float32)
        assert np.allclose(gm.run({"x": x})["y"], sess.run(None, {"x": x})[0], rtol=1e-6, atol=1e-6)
        acc = acc + 3 * x  # the stream carries the loop's state from call to call
        assert np.allclose(stream({"x": x})["y"], acc, rtol=1e-5, atol=1e-5)


# --- the limits themselves ------------------------------------------------------------------

def test_limits_per_call_global_and_checked():
    assert rnnengine.Limits is Limits and limits.defaults() == Limits()
    d = Limits()
    assert (d.max_tensor_elements, d.max_plan_bytes, d.max_loop_nodes, d.max_metadata_bytes,
            d.max_planning_seconds) == (1 << 28, 4 << 30, 1_000_000, 64 << 20, 60.0)
    for bad in ({"max_tensor_elements": 0}, {"max_loop_nodes": -1}, {"max_plan_bytes": 1.5},
                {"max_planning_seconds": "60"}, {"max_metadata_bytes": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Limits(**bad)
    with pytest.raises(TypeError):
        rnnengine.convert(make([]), limits={"max_tensor_elements": 5})
    nodes, inits, _ = BLOWUPS["ConstantOfShape"]
    small = make([helper.make_node("ConstantOfShape", ["s"], ["y"], name="c")], [i64("s", [10, 10])])
    old = limits.set_defaults(max_tensor_elements=99)
    try:
        refused(lambda: rnnengine.convert(small), "max_tensor_elements", "ConstantOfShape node 'c'", 100)
        assert rnnengine.convert(small, limits=Limits(max_tensor_elements=100)).run({})["y"].shape == (10, 10)
    finally:
        limits.set_defaults(old)
    assert limits.defaults() == Limits()
    assert rnnengine.convert(small).run({})["y"].shape == (10, 10)


# --- weight files: the JSON block, bounded ----------------------------------------------------

def forge(path, block):
    """A weight file with this JSON block (zlib) and no tensors, header and CRC valid."""
    data_offset = (64 + len(block) + 63) // 64 * 64
    fields = [fileformat.MAGIC, 1, fileformat.FLAG_JSON_ZLIB, 64, len(block), 0, data_offset, data_offset]
    head = fileformat.HEADER.pack(*fields, 0, bytes(12))
    crc = zlib.crc32(block, zlib.crc32(head[:fileformat.CRC_SPAN]))
    with open(path, "wb") as f:
        f.write(fileformat.HEADER.pack(*fields, crc, bytes(12)) + block + bytes(data_offset - 64 - len(block)))


MEASURE = textwrap.dedent("""
    import resource, sys, time, tracemalloc
    from rnnengine.format import weightfile as fileformat
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t = time.process_time()  # CPU seconds: the machine's load does not count
    try:
        fileformat.read(sys.argv[1])
        print("LOADED")
    except fileformat.FormatError as e:
        print("REFUSED", e)
    print("SECONDS", time.process_time() - t)
    # the larger of the peak resident size's growth and the peak of Python's allocations
    print("EXTRA_MB", max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before,
                          tracemalloc.get_traced_memory()[1] / 1024) / 1024)
""")


def measure(path):
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, timeout=60,
                         cwd=OUTSIDE).stdout
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    return lines.get("REFUSED"), float(lines["SECONDS"]), float(lines["EXTRA_MB"])


def test_zlib_bomb_is_refused_fast_in_little_memory(tmp_path):
    # 65 MiB of JSON whitespace in a 0.3 MB block (1 GiB in 1 MB is refused the same way, after
    # decompressing the same 64 MiB)
    z, chunk = zlib.compressobj(1), b" " * (1 << 20)
    bomb = b"".join(z.compress(chunk) for _ in range(65)) + z.flush()
    assert len(bomb) < 400_000
    forge(tmp_path / "bomb.rnne", bomb)
    msg, seconds, extra_mb = measure(tmp_path / "bomb.rnne")
    assert msg and f"expands past {64 << 20} bytes, more than the limit max_metadata_bytes" in msg
    assert seconds < 1.0 and extra_mb < 100, (seconds, extra_mb)


def test_json_that_would_parse_into_gigabytes_is_refused_before_parsing(tmp_path):
    # 48 MiB of "[]," (under the 64 MiB text limit) would parse into ~1.5 GB of lists
    text = b'{"metadata":{},"graph":{},"tensors":[],"x":[' + b"[]," * (16 << 20) + b"[]]}"
    forge(tmp_path / "lists.rnne", zlib.compress(text, 1))
    msg, seconds, extra_mb = measure(tmp_path / "lists.rnne")
    assert msg and "would parse into about" in msg and "max_metadata_bytes" in msg
    assert seconds < 2.0 and extra_mb < 200, (seconds, extra_mb)
    # with a smaller limit the same check refuses a small file; a real model's JSON passes
    small = tmp_path / "small.rnne"
    forge(small, zlib.compress(b'{"metadata":{},"graph":{},"tensors":[],"x":[' + b"[]," * 1000 + b"[]]}"))
    assert fileformat.read(str(small)).names == []
    with pytest.raises(fileformat.FormatError, match="max_metadata_bytes=10000"):
        fileformat.read(str(small), limits=Limits(max_metadata_bytes=10000))
    with pytest.raises(fileformat.FormatError, match="max_metadata_bytes=100;"):
        rnnengine.load(str(small), limits=Limits(max_metadata_bytes=100))


# --- weight files changed on disk while loaded ------------------------------------------------

VICTIM = textwrap.dedent("""
    import os, shutil, sys
    import numpy as np
    import rnnengine
    from rnnengine.format import weightfile as fileformat
    path, how, other = sys.argv[1], sys.argv[2], sys.argv[3]
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    models = {"mmap": rnnengine.load(path, mmap=True), "private": rnnengine.load(path)}
    if how == "unchecked":  # what the check prevents: the process killed by SIGBUS
        fileformat.WeightFile.check_unchanged = lambda self: None
        how = "truncate"
    before = {k: m.run({"x": x})["y"] for k, m in models.items()}
    streams = {k: m.stream() for k, m in models.items()}  # made before the change, fed after it
    forks = {k: s.fork() for k, s in streams.items()}
    if how == "truncate":
        os.truncate(path, 64 * 3)
    elif how == "rewrite":  # overwritten in place by another file of the same size (as cp does)
        with open(other, "rb") as src, open(path, "r+b") as dst:
            dst.write(src.read())
    else:  # another file renamed over the name (a new inode; the old one stays whole)
        shutil.copy(other, path + ".new")
        os.replace(path + ".new", path)
    for k, m in models.items():
        for what in ("run", "stream", "step", "fork"):
            try:
                if what == "run":
                    print(k, what, "same" if np.array_equal(m.run({"x": x})["y"], before[k]) else "DIFFERENT")
                elif what == "stream":
                    m.stream()
                    print(k, what, "ok")
                else:
                    t = streams[k] if what == "step" else forks[k]
                    print(k, what, "same" if np.array_equal(t({"x": x})["y"], before[k]) else "DIFFERENT")
            except fileformat.FormatError as e:
                print(k, what, "FormatError", e)
            sys.stdout.flush()
""")


@pytest.mark.parametrize("how", ["truncate", "rewrite", "rename", "unchecked"])
def test_weight_file_changed_on_disk_while_loaded(tmp_path, how):
    """Run in a subprocess, so a SIGBUS fails the test instead of killing pytest."""
    W = np.random.default_rng(3).standard_normal((1, 16, 3)).astype(np.float32)
    R = np.random.default_rng(4).standard_normal((1, 16, 4)).astype(np.float32)
    # the bias b (16 kB, past the file's first page) is read from the file at every run
    m = make([helper.make_node("LSTM", ["x", "W", "R"], ["Y"], hidden_size=4, name="lstm"),
              helper.make_node("MatMul", ["Y", "P"], ["Yp"], name="proj"),
              helper.make_node("Add", ["Yp", "b"], ["y"], name="bias")],
             [nh.from_array(W, "W"), nh.from_array(R, "R"),
              nh.from_array(np.random.default_rng(5).standard_normal((4, 4096)).astype(np.float32), "P"),
              nh.from_array(np.random.default_rng(6).standard_normal(4096).astype(np.float32), "b")],
             [inp("x", ["T", 2, 3])])
    path, other = str(tmp_path / "m.rnne"), str(tmp_path / "other.rnne")
    rnnengine.save(rnnengine.convert(m), path)
    m.graph.initializer[3].CopyFrom(nh.from_array(np.ones(4096, np.float32), "b"))
    rnnengine.save(rnnengine.convert(m), other)
    assert os.path.getsize(path) == os.path.getsize(other)
    # under the sanitizer build (tools/ci_sanitize.sh) AddressSanitizer would catch the
    # deliberate SIGBUS of the unchecked case and report it: let the signal through instead
    env = dict(os.environ, ASAN_OPTIONS=":".join(filter(None, [os.environ.get("ASAN_OPTIONS"), "handle_sigbus=0"])))
    r = subprocess.run([sys.executable, "-c", VICTIM, path, how, other], capture_output=True, text=True,
                       timeout=120, cwd=OUTSIDE, env=env)
    if how == "unchecked":  # the same truncation without the check: the map kills the process
        assert r.returncode == -signal.SIGBUS, (r.returncode, r.stdout, r.stderr[-2000:])
        return
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    lines = r.stdout.strip().splitlines()
    unaffected = ["run same", "stream ok", "step same", "fork same"]
    assert [line.split(" ", 1)[1] for line in lines if line.startswith("private ")] == unaffected, lines
    mapped = [line.split(" ", 1)[1] for line in lines if line.startswith("mmap ")]
    if how == "rename":  # the map keeps the old file, whole: the same numbers
        assert mapped == unaffected, lines
    else:  # every use after the change raises, naming it
        assert [line.split(" ")[:2] for line in mapped] == [["run", "FormatError"], ["stream", "FormatError"],
                                                            ["step", "FormatError"], ["fork", "FormatError"]], lines
        assert all("truncated or rewritten on disk after it was loaded" in line and "load it again" in line
                   for line in mapped), lines


def test_fileformat_imports_without_the_compiled_extension(tmp_path):
    """Tools read weight files with plain Python: rnnengine._core is never imported."""
    path = str(tmp_path / "t.rnne")
    fileformat.write(path, {"nodes": []}, {"W": np.arange(6, dtype=np.float32).reshape(2, 3)}, dtype="int8")
    code = textwrap.dedent("""
        import sys
        class Hide:
            def find_spec(self, name, path=None, target=None):
                if name == "rnnengine._core":
                    raise ImportError("the compiled extension is hidden")
        sys.meta_path.insert(0, Hide())
        from rnnengine.format import weightfile as fileformat
        import rnnengine.format.weightfile
        wf = fileformat.read(sys.argv[1])
        print(wf.tensor("W").round(1).tolist(), "rnnengine._core" in sys.modules)
        fileformat.write(sys.argv[1] + "2", {"nodes": []}, {"a": wf.tensor("W")})
        print(fileformat.read(sys.argv[1] + "2").metadata["general.converter_version"])
        try:
            import rnnengine._core
        except ImportError as e:
            print("hidden:", e)
    """)
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=60, cwd=OUTSIDE)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == ["[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]] False", rnnengine.__version__,
                                     "hidden: the compiled extension is hidden"], r.stdout
