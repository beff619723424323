"""Structure-aware minimiser for a fuzz finding: drops whole nodes, initializers, attributes, JSON keys while the same bug still shows.

    python tools/fuzz/minimize.py fuzz_onnx CRASH_FILE OUT_FILE

libFuzzer's -minimize_crash=1 shrinks bytes, which barely helps with a protobuf or a
compressed-JSON file (run it first if you like). This tool instead removes parts of the
model and keeps a removal when the input still gives the same finding: for Python
exceptions the same signature (common.signature), for crashes / sanitizer reports the same
first line of the report (each try runs in a subprocess, tools/fuzz/repro.py).
"""
import copy
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

REPRO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "repro.py")


def outcome_in_process(target, data, tmp):
    """outcome() for an input known to end in a Python exception: no subprocess, much faster."""
    fn, _ = common.ONE_INPUT[target]
    try:
        fn(data, tmp)
    except Exception as e:  # noqa: BLE001
        return "py:" + common.signature(e)
    return "clean"


def outcome(target, data, tmp):
    """A string naming what the input does: 'clean', 'py:<signature>', or 'crash:<report line>'."""
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        p = subprocess.run([sys.executable, REPRO, target, tmp], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "hang"
    if p.returncode == 0:
        return "clean"
    for line in p.stderr.splitlines():
        if line.startswith("FINDING-SIGNATURE"):
            return "py:" + line.split()[1]
    for line in p.stderr.splitlines():
        if "ERROR: AddressSanitizer" in line or "runtime error:" in line:
            return "crash:" + line.split("ERROR:")[-1].split(" on address")[0].strip()[:120]
    return f"rc:{p.returncode}"


def onnx_candidates(data):
    """Smaller models, each with one part removed (as functions that build it: only tried ones are built)."""
    import onnx
    m = onnx.ModelProto()
    m.ParseFromString(data)
    fields = []
    g = m.graph
    for name in ("node", "initializer", "input", "output", "value_info"):
        for i in range(len(getattr(g, name)) - 1, -1, -1):
            fields.append(("g", name, i))
    for i, n in enumerate(g.node):
        for j in range(len(n.attribute) - 1, -1, -1):
            fields.append(("attr", i, j))
    for f in ("doc_string", "producer_name", "producer_version", "metadata_props", "domain"):
        fields.append(("m", f, None))
    def build(kind, a, b):
        c = onnx.ModelProto()
        c.CopyFrom(m)
        if kind == "g":
            del getattr(c.graph, a)[b]
        elif kind == "attr":
            del c.graph.node[a].attribute[b]
        else:
            c.ClearField(a)
        return c.SerializeToString()
    for f in fields:
        yield lambda f=f: build(*f)


def weights_candidates(data):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import fuzz_weights as fw  # noqa: E402 - needs atheris only for its mutator, not used here
    parsed = fw.parse(data)
    if parsed is None:
        return
    fields, doc, section = parsed
    paths = []

    def walk(obj, path):
        if isinstance(obj, dict):
            for k in list(obj):
                paths.append(path + (k,))
                walk(obj[k], path + (k,))
        elif isinstance(obj, list):
            for i in range(len(obj) - 1, -1, -1):
                paths.append(path + (i,))
                walk(obj[i], path + (i,))
    walk(doc, ())
    paths.sort(key=len)
    def build(p):
        d = copy.deepcopy(doc)
        host = d
        for k in p[:-1]:
            host = host[k]
        del host[p[-1]]
        return fw.serialize(fields, d, section)
    for p in paths:
        yield lambda p=p: build(p)


def size(target, data):
    """What the minimiser shrinks: file bytes, or for a weight file its JSON text and data
    (the file itself is padded to 64-byte steps, so a small removal may not change it)."""
    if target == "fuzz_weights":
        import fuzz_weights as fw  # noqa: E402
        parsed = fw.parse(data)
        if parsed is not None:
            return len(json.dumps(parsed[1])) + len(parsed[2])
    return len(data)


def main():
    target, src, dst = sys.argv[1:4]
    data = open(src, "rb").read()
    tmp = common.scratch_path(".min")
    want = outcome(target, data, tmp)
    print("finding:", want)
    if want == "clean":
        sys.exit("the input does not give a finding")
    # a Python exception: the candidates are tried in this process
    check = outcome_in_process if want.startswith("py:") else outcome
    gen = onnx_candidates if target == "fuzz_onnx" else weights_candidates
    stop = time.time() + float(os.environ.get("RNNE_MIN_SECONDS", "600"))
    changed = True
    while changed and time.time() < stop:  # passes until one removes nothing
        changed, k = False, 0
        while time.time() < stop:
            cands = list(gen(data))  # the same order each time: candidate k removes the k-th part
            if k >= len(cands):
                break
            try:
                cand = cands[k]()
            except (KeyError, IndexError, TypeError):
                cand = data
            if size(target, cand) < size(target, data) and check(target, cand, tmp) == want:
                data, changed = cand, True  # the next part now has index k
                print("  ->", len(data), "bytes")
            else:
                k += 1
    with open(dst, "wb") as f:
        f.write(data)
    print(f"{dst}: {len(data)} bytes, {want}")


if __name__ == "__main__":
    main()
