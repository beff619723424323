"""Runs one fuzz input exactly as its target does, without atheris: `python tools/fuzz/repro.py fuzz_onnx FILE`.

Prints "RESULT clean (refused)" (a clear error at conversion / load) or "RESULT clean
(accepted)" (it converted or loaded; running it then ended cleanly) and exits 0; a finding is an
uncaught exception (exit 1, traceback and "FINDING-SIGNATURE ..." on stderr), a crash (a
signal) or a sanitizer report. The address space is limited to 3 GiB (without ASan), so a
memory blow-up shows as a MemoryError rather than taking the machine's memory.
Used by tests/test_fuzz_regressions.py, one subprocess per input.
Known signatures ($RNNE_FUZZ_KNOWN) are NOT skipped here: every finding shows.
The library's default resource limits apply (the fuzz process runs under the tighter
common.FUZZ_LIMITS); `--fuzz-limits` (before the target) runs under those instead.
"""
import os
import sys

os.environ.pop("RNNE_FUZZ_KNOWN", None)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


MEMORY_LIMIT = 3 << 30  # bytes of address space: a blow-up ends in MemoryError (a finding) within seconds


def main():
    args = sys.argv[1:]
    if args and args[0] == "--fuzz-limits":
        args = args[1:]
        common.use_fuzz_limits()
    target, path = args[0], args[1]
    if "asan" not in os.environ.get("LD_PRELOAD", ""):  # ASan reserves terabytes of address space
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    fn, suffix = common.ONE_INPUT[target]
    with open(path, "rb") as f:
        data = f.read()
    try:
        refused = fn(data, common.scratch_path(suffix))
    except Exception as e:
        print(f"FINDING-NODE {_node_of(e)}", file=sys.stderr)
        raise
    print("RESULT clean", "(refused)" if refused else "(accepted)")


def _node_of(exc):
    """The innermost graph node on the traceback (a handler's self.node or a local `node`), for the report."""
    found, tb = "?", exc.__traceback__
    while tb is not None:
        loc = tb.tb_frame.f_locals
        node = getattr(loc.get("self"), "node", None) if "self" in loc else None
        node = node if isinstance(node, dict) else loc.get("node") if isinstance(loc.get("node"), dict) else None
        if node is not None:
            found = f"{node.get('op')} {node.get('name')!r} inputs={node.get('inputs')} outputs={node.get('outputs')}"
        tb = tb.tb_next
    return found


if __name__ == "__main__":
    main()
