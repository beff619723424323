"""Every input the fuzz targets (tools/fuzz/) ever found a bug with: each must now be refused with a clear error, or run.

The inputs live in tests/data/fuzz/regressions/<target>/<name>; each runs in its own
subprocess (tools/fuzz/repro.py, exactly the target's test of one input) so that a crash, a
sanitizer report or a hang fails this test instead of killing pytest. Findings not fixed yet
are listed in tests/data/fuzz/known_open.txt: their test is an xfail(strict), which turns red
when the fix lands so the line is removed and the input is held to the rule from then on.
Under tools/ci_sanitize.sh the subprocesses inherit the ASan/UBSan build.
"""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "fuzz")
REPRO = os.path.join(ROOT, "tools", "fuzz", "repro.py")


def _open_findings():
    out = {}
    with open(os.path.join(DATA, "known_open.txt")) as f:
        for line in f:
            parts = line.split()
            if parts and not line.startswith("#"):
                for rel in parts[1:]:
                    out[rel] = parts[0]
    return out


OPEN = _open_findings()
INPUTS = sorted(os.path.relpath(p, os.path.join(DATA, "regressions"))
                for p in glob.glob(os.path.join(DATA, "regressions", "*", "*")))


def _cases():
    for rel in INPUTS:
        marks = [pytest.mark.xfail(strict=True, reason=f"open finding {OPEN[rel]}")] if rel in OPEN else []
        yield pytest.param(rel, marks=marks, id=rel)


def test_every_open_finding_has_its_input():
    missing = [rel for rel in OPEN if rel not in INPUTS]
    assert not missing, f"known_open.txt names inputs that are not committed: {missing}"


@pytest.mark.parametrize("rel", list(_cases()))
def test_fuzz_input_is_refused_cleanly(rel):
    target = rel.split(os.sep)[0]
    env = dict(os.environ)
    env.pop("RNNE_FUZZ_KNOWN", None)
    p = subprocess.run([sys.executable, REPRO, target, os.path.join(DATA, "regressions", rel)],
                       capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert p.returncode == 0 and "RESULT clean" in p.stdout, (
        f"{rel}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
