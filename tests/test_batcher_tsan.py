"""The C session batcher (src_c/batch.c) under ThreadSanitizer: tests/c/batcher_stress.c,
built with gcc -fsanitize=thread against src_c, steps slots from many threads at once (batches
computed by callers and by the scheduler, timeouts, asynchronous steps collected through the
notify pipe) and checks every slot's outputs against its rows run alone."""
import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src_c")


@pytest.mark.skipif(not os.path.isdir(SRC) or shutil.which("gcc") is None,
                    reason="needs the source tree (src_c) and gcc")
def test_the_batcher_has_no_data_race(tmp_path):
    exe = str(tmp_path / "batcher_stress")
    sources = sorted(os.path.join(SRC, f) for f in os.listdir(SRC) if f.endswith(".c"))
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # (the ASan CI step preloads libasan)
    build = subprocess.run(["gcc", "-O1", "-g", "-std=c99", "-D_GNU_SOURCE", "-fsanitize=thread", "-pthread",
                            "-I" + SRC, os.path.join(HERE, "c", "batcher_stress.c"), *sources, "-o", exe, "-lm"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    for _ in range(2):
        run = subprocess.run([exe], capture_output=True, text=True, timeout=300,
                             env=dict(env, TSAN_OPTIONS="halt_on_error=1 exitcode=66"))
        assert run.returncode == 0 and "ThreadSanitizer" not in run.stderr, (run.returncode, run.stderr[-4000:])
        assert "0 values differ" in run.stdout, run.stdout
