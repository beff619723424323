"""Runs one fuzz input exactly as its target does, without atheris: `python tools/fuzz/repro.py fuzz_onnx FILE`.

Prints "RESULT clean" (refused with a clear error, or ran) and exits 0; a finding is an
uncaught exception (exit 1, traceback and "FINDING-SIGNATURE ..." on stderr), a crash (a
signal) or a sanitizer report. Used by tests/test_fuzz_regressions.py, one subprocess per input.
Known signatures ($RNNE_FUZZ_KNOWN) are NOT skipped here: every finding shows.
"""
import os
import sys

os.environ.pop("RNNE_FUZZ_KNOWN", None)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main():
    target, path = sys.argv[1], sys.argv[2]
    fn, suffix = common.ONE_INPUT[target]
    with open(path, "rb") as f:
        data = f.read()
    fn(data, common.scratch_path(suffix))
    print("RESULT clean")


if __name__ == "__main__":
    main()
