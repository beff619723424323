"""Shared by the fuzz targets: which exceptions count as a clean refusal, how a model is exercised, the seeds.

What counts as a bug (the rule: a hostile file gets a clear Python exception, never a crash,
a hang or gigabytes of memory):
  * any exception that classify() does not call "clean" (below): an AssertionError,
    IndexError, KeyError, ZeroDivisionError, RecursionError, MemoryError, OverflowError,
    EngineError (the C core refused a call: validation missed something), or a bare
    ValueError/TypeError raised from inside NumPy/onnx/C rather than by a `raise` statement
    of rnnengine itself;
  * a crash or signal (under the ASan/UBSan build: any sanitizer report);
  * a hang (libFuzzer -timeout) or a memory blow-up (libFuzzer -rss_limit_mb).
"""
from __future__ import annotations

import glob
import linecache
import os
import shutil
import sys
import tempfile

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# --- the allowed set, in one place ------------------------------------------------------------


def allowed_classes():
    """The project's own error classes for bad input (all ValueError subclasses) and onnx's
    parse error. Imported lazily so a target can instrument rnnengine before importing it."""
    from google.protobuf.message import DecodeError
    from rnnengine._core import GraphRunError
    from rnnengine.format.weightfile import FormatError
    from rnnengine.ops.handlers import UnsupportedError  # ConversionError, NotStreamableError are subclasses
    from rnnengine.frontend.opsets import OpsetError
    return (FormatError, UnsupportedError, OpsetError, GraphRunError, DecodeError)


# Never clean, whoever raised them: they mean a check is missing.
BUG_CLASSES = (AssertionError, IndexError, KeyError, ZeroDivisionError, RecursionError, MemoryError,
               OverflowError, FloatingPointError, AttributeError, NameError, UnboundLocalError, SystemError)

_PKG = os.path.join(ROOT, "rnnengine") + os.sep


def _raised_by_rnnengine(exc):
    """True when the innermost traceback frame is a `raise` statement in rnnengine's own
    source (a deliberate error with a message), not a call into NumPy/onnx/C that failed."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    fn = os.path.abspath(tb.tb_frame.f_code.co_filename)
    if not (fn.startswith(_PKG) or "/rnnengine/" in fn.replace(os.sep, "/")):
        return False
    line = linecache.getline(fn, tb.tb_lineno).strip()
    return line.startswith("raise ") or line.startswith("self._fail(") or line.startswith("fail(")


def classify(exc):
    """'clean' for a clear refusal in the user's terms, else 'bug'."""
    if isinstance(exc, BUG_CLASSES):
        return "bug"
    if isinstance(exc, allowed_classes()):
        return "clean"
    if type(exc) in (ValueError, TypeError, FileNotFoundError) and _raised_by_rnnengine(exc):
        return "clean"
    return "bug"


def signature(exc):
    """A finding's identity: its exception type and the innermost rnnengine line it passed
    (e.g. "TypeError@rnnengine/ops.py:611"), so one bug found twice is counted once."""
    where, tb = "?", exc.__traceback__
    while tb is not None:
        fn = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if "/rnnengine/" in fn:
            where = f"rnnengine/{fn.rsplit('/rnnengine/', 1)[1]}:{tb.tb_lineno}"
        tb = tb.tb_next
    return f"{type(exc).__name__}@{where}"


def _known():
    """Signatures already reported (a long hunt skips them to look for new ones): one per
    line in the file named by $RNNE_FUZZ_KNOWN. Empty by default: every bug is a finding."""
    path = os.environ.get("RNNE_FUZZ_KNOWN")
    if not path or not os.path.exists(path):
        return frozenset()
    with open(path) as f:
        return frozenset(line.split()[0] for line in f if line.strip() and not line.startswith("#"))


KNOWN = _known()


def guarded(fn, *args, **kw):
    """Calls fn; a clean refusal returns None, any other exception propagates (a finding),
    unless its signature is listed in $RNNE_FUZZ_KNOWN (then it ends this input quietly)."""
    try:
        return fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - classified below
        _refused_cleanly(e)
        return None


def _refused_cleanly(e):
    """Called while handling e: returns when e is a clean refusal (or a known finding),
    else reports its signature and re-raises it."""
    if classify(e) == "clean" or (KNOWN and signature(e) in KNOWN):
        return
    print(f"FINDING-SIGNATURE {signature(e)}", file=sys.stderr)
    raise  # noqa: PLE0704 - the exception being handled by the caller


# --- exercising a converted / loaded model ------------------------------------------------------

MAX_FEED_ELEMENTS = 1 << 20  # the harness's own feeds stay small (a user chooses feed sizes)


def exercise(gm):
    """Runs a GraphModel once on small example inputs and once as a stream, so that the
    planner and the C executor see whatever the file made of the model. Clean refusals at
    any step end the exercise; anything else propagates."""
    feeds = guarded(gm.example_feeds)
    if not feeds:
        return
    if sum(int(np.prod(a.shape, dtype=np.float64)) for a in feeds.values()) > MAX_FEED_ELEMENTS:
        return
    from rnnengine.errors import LimitError
    try:
        out = gm.run(feeds)
    except LimitError:
        return  # a stream plans the same nodes under the same limits: refused again, after as long
    except Exception as e:  # noqa: BLE001
        _refused_cleanly(e)
        out = None
    carried = {a for a, _ in gm.state_pairs}
    stream = guarded(gm.stream)
    if stream is None:
        return
    chunk = {k: v for k, v in feeds.items() if k not in carried}
    guarded(stream, chunk)
    guarded(stream, chunk)  # a second call runs on the carried state
    return out


def one_input(data, path, read):
    """A target's test of one input: the bytes written to path, read by ``read``
    (rnnengine.convert or rnnengine.load), then exercised. True when the file was refused
    (a clean error when read)."""
    _write(path, data)
    gm = guarded(read, path)
    if gm is not None:
        exercise(gm)
    return gm is None


def one_onnx(data, path):
    """fuzz_onnx's test of one input: the bytes as an ONNX file, converted, then exercised."""
    import rnnengine
    return one_input(data, path, rnnengine.convert)


def one_weights(data, path):
    """fuzz_weights's test of one input: the bytes as a weight file, loaded, then exercised."""
    import rnnengine
    return one_input(data, path, rnnengine.load)


# The fuzz process's resource limits (rnnengine.Limits), tighter than the library's defaults:
# the seeds hold at most ~15,000 weights, and a mutated shape that folds or allocates up to the
# defaults (2**28 elements, 4 GiB) is a legitimate model that only costs time (the first touch
# of a gigabyte takes 10-20 s on a loaded machine: a false `-timeout`). With these, such an
# input is refused by a limit in milliseconds, and a timeout or an RSS blow-up means a path no
# limit bounds. repro.py and tests/test_fuzz_regressions.py keep the library's defaults (what
# users get); RNNE_FUZZ_LIMITS=default fuzzes with them too.
# The same for time: a while loop whose condition never turns false is refused by
# max_loop_nodes after as many body nodes as it allows (the default, 10**6, plans for 60 s or
# more: max_planning_seconds ends it), and max_planning_seconds=5 bounds whatever else walks
# nodes, well inside libFuzzer's -timeout. 500 unrolled nodes: no seed unrolls a Loop (every
# seed Loop is fused into a cell), so unrolling is reached only by mutants, and each input
# plans up to six times (run, time axes, stream decisions, steps). Measured on 400 inputs of a
# long run's corpus, one core: 20,000 -> 28.7 ms mean per input (the 10 slowest, unrolled
# loops, 58% of the time), 500 -> 13.5 ms. The cost: what the planner does after unrolling
# (loop-state checks, carried stream state) is explored for unrolls of up to 500 nodes only;
# larger ones reach the limit's refusal. The regression inputs replay under the defaults.
FUZZ_LIMITS = dict(max_tensor_elements=1 << 22, max_plan_bytes=256 << 20, max_loop_nodes=500,
                   max_planning_seconds=5.0)


def use_fuzz_limits():
    """Makes FUZZ_LIMITS the process-wide defaults (in the fuzz process only)."""
    if os.environ.get("RNNE_FUZZ_LIMITS", "") != "default":
        from rnnengine import limits
        limits.set_defaults(**FUZZ_LIMITS)


def structure_or_bytes(data, max_size, seed, every, structure_mutate, byte_mutate):
    """A target's custom mutator: ``structure_mutate()`` for all but one in ``every`` seeds (a
    result that fits in max_size), else libFuzzer's byte mutation ``byte_mutate(data, max_size)``.
    A mutator bug must not end a long hunt, so its exceptions fall back to bytes too
    (tests/test_fuzz_regressions.py runs the structure mutators over many seeds)."""
    if seed % every != 0:
        try:
            out = structure_mutate()
        except Exception:  # noqa: BLE001
            out = None
        if out is not None and len(out) <= max_size:
            return out
    return byte_mutate(data, max_size)


def fuzz_main(one, make_seeds, custom_mutator):
    """A target's entry point: libFuzzer over ``one(data, path)`` with the structure-level
    ``custom_mutator``, seeded by ``make_seeds`` when the corpus directory is empty; the
    input of any finding is kept (save_finding). Runs under FUZZ_LIMITS."""
    import atheris
    use_fuzz_limits()
    path = scratch_path(".onnx" if one is one_onnx else ".rnne")

    def test_one_input(data):
        try:
            one(data, path)
        except Exception:
            save_finding(data)
            raise
    atheris.Setup(prepare_corpus(sys.argv, make_seeds), test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


def _write(path, data):
    # a new file each time (written beside, then renamed): a previous model may still map the old one
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def save_finding(data):
    """Keeps the input of a Python-exception finding in $RNNE_FUZZ_ARTIFACTS (hunt.py sets it):
    libFuzzer does not always write its crash-* file when Python exits during seed replay."""
    d = os.environ.get("RNNE_FUZZ_ARTIFACTS")
    if d:
        import hashlib
        path = os.path.join(d, "pyfinding-" + hashlib.sha1(data).hexdigest())
        with open(path, "wb") as f:
            f.write(data)
        print(f"FINDING-INPUT {path}", file=sys.stderr)


ONE_INPUT = {"fuzz_onnx": (one_onnx, ".onnx"), "fuzz_weights": (one_weights, ".rnne")}


# --- seeds -----------------------------------------------------------------------------------------


def onnx_seed_files():
    """The committed ONNX models (demo_charlm.onnx, 2 MB, is left out: it would set libFuzzer's
    max_len and slow every mutation; its LSTM is covered by the smaller models)."""
    files = sorted(glob.glob(os.path.join(ROOT, "tests", "data", "corpus", "*.onnx")))
    files += sorted(glob.glob(os.path.join(ROOT, "tests", "data", "masking", "*.onnx")))
    files += [f for f in sorted(glob.glob(os.path.join(ROOT, "rnnengine", "data", "*.onnx")))
              if os.path.getsize(f) < 1_000_000]
    limit = int(os.environ.get("RNNE_FUZZ_SEED_LIMIT", "0"))  # N evenly spaced models (a short CI run)
    if 0 < limit < len(files):
        files = [files[k * len(files) // limit] for k in range(limit)]
    return files


def stft_seed_model(K=64, hop=16, H=4):
    """A spectrogram front end (a Conv over a Hann-windowed DFT basis, which rnnengine runs as
    RNN_OP_STFT, src_c/stft.c; then |X|^2 and a GRU over the frames), an onnx.ModelProto: no
    committed model has such filters, so the FFT path would go unfuzzed."""
    from onnx import TensorProto, helper, numpy_helper
    n, F = np.arange(K), K // 2 + 1
    w = 0.5 - 0.5 * np.cos(2 * np.pi * n / K)
    a = 2 * np.pi * np.arange(F)[:, None] * n / K
    basis = np.concatenate([w * np.cos(a), -w * np.sin(a)]).astype(np.float32)[:, None, :]
    rng = np.random.default_rng(7)
    inits = {"w": basis, "s0": np.array([0], np.int64), "s1": np.array([F], np.int64),
             "s2": np.array([2 * F], np.int64), "ax": np.array([1], np.int64),
             "W": (rng.standard_normal((1, 3 * H, F)) * 0.1).astype(np.float32),
             "R": (rng.standard_normal((1, 3 * H, H)) * 0.3).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["spec"], strides=[hop], kernel_shape=[K], pads=[K // 2, K // 2]),
             helper.make_node("Slice", ["spec", "s0", "s1", "ax"], ["re"]),
             helper.make_node("Slice", ["spec", "s1", "s2", "ax"], ["im"]),
             helper.make_node("Mul", ["re", "re"], ["re2"]), helper.make_node("Mul", ["im", "im"], ["im2"]),
             helper.make_node("Add", ["re2", "im2"], ["p"]),
             helper.make_node("Transpose", ["p"], ["pt"], perm=[2, 0, 1]),
             helper.make_node("GRU", ["pt", "W", "R"], ["y"], hidden_size=H)]
    g = helper.make_graph(nodes, "stft_front_end", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 1, "T"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def make_onnx_seeds(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    for f in onnx_seed_files():
        shutil.copy(f, os.path.join(out_dir, os.path.basename(f)))
    with open(os.path.join(out_dir, "generated_stft_front_end.onnx"), "wb") as f:
        f.write(stft_seed_model().SerializeToString())
    return out_dir


def make_weight_seeds(out_dir, dtypes=("float32", "float16", "int8")):
    """Weight files made from every committed ONNX model that converts, at each storage
    dtype, plus one small training checkpoint."""
    import rnnengine
    os.makedirs(out_dir, exist_ok=True)
    for f in onnx_seed_files():
        try:
            gm = rnnengine.convert(f)
        except Exception:  # noqa: BLE001 - a model the converter refuses gives no seed
            continue
        base = os.path.splitext(os.path.basename(f))[0]
        for dt in dtypes:
            try:
                rnnengine.save(gm, os.path.join(out_dir, f"{base}.{dt}.rnne"), dt)
            except Exception:  # noqa: BLE001
                pass
    try:  # the STFT front end (RNN_OP_STFT) as a weight file too
        rnnengine.save(rnnengine.convert(stft_seed_model()), os.path.join(out_dir, "generated_stft_front_end.rnne"))
    except Exception as e:  # noqa: BLE001
        print(f"(no STFT seed: {type(e).__name__}: {e})", file=sys.stderr)
    try:
        from rnnengine.train import Network, fit
        net = Network("LSTM", 9, 8, 9, embedding=4, seed=1)
        text = np.random.default_rng(5).integers(0, 9, 400)
        fit(net, text, None, "lm", steps=2, batch_size=4, seq_len=8, seed=2,
            checkpoint=os.path.join(out_dir, "checkpoint_lstm.rnne"))
    except Exception as e:  # noqa: BLE001
        print(f"(no checkpoint seed: {type(e).__name__}: {e})", file=sys.stderr)
    return out_dir


def prepare_corpus(argv, make):
    """libFuzzer takes corpus directories as positional arguments. When none is given, seeds
    go to a new temporary directory; an empty given directory is filled with seeds. Returns
    the argument list to hand to atheris.Setup."""
    dirs = [a for a in argv[1:] if not a.startswith("-") and os.path.isdir(a)]
    files = [a for a in argv[1:] if not a.startswith("-") and os.path.isfile(a)]
    if files:  # running given inputs (a reproducer, -minimize_crash): no seeds needed
        return argv
    if not dirs:
        d = tempfile.mkdtemp(prefix="rnne-fuzz-seeds-")
        make(d)
        return argv + [d]
    if not os.listdir(dirs[0]):
        make(dirs[0])
    return argv


def scratch_path(suffix):
    """A per-process file on a RAM disk when there is one."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"rnne-fuzz-{os.getpid()}{suffix}")
