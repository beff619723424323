"""Long fuzz run driver: restarts a target after each finding (skipping it from then on) and totals libFuzzer's counts.

    python tools/fuzz/hunt.py fuzz_onnx --seconds 36000 --dir /var/tmp/hunt-onnx [-- extra libFuzzer flags]

libFuzzer stops at the first finding. This driver records the finding (its artifact and
signature in DIR/findings.txt), adds a Python exception's signature to DIR/known.txt (passed
to the target as $RNNE_FUZZ_KNOWN so the same bug is not found again and again), and starts
the target again on the same corpus until the time is used up. Crashes, sanitizer reports,
hangs and memory blow-ups cannot be skipped by signature; each restart records them too.
DIR/summary.txt: runs, total executions (the sum of each run's last #N), exec/s, findings.
Run it with the sanitized build's environment (tools/fuzz/README.md).
"""
import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("target", choices=["fuzz_onnx", "fuzz_weights"])
    ap.add_argument("--seconds", type=int, required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--timeout", type=int, default=10)
    ap.add_argument("--rss", type=int, default=2048)
    ap.add_argument("extra", nargs="*")
    a = ap.parse_args()
    os.makedirs(os.path.join(a.dir, "corpus"), exist_ok=True)
    os.makedirs(os.path.join(a.dir, "artifacts"), exist_ok=True)
    known = os.path.join(a.dir, "known.txt")
    open(known, "a").close()
    env = dict(os.environ, RNNE_FUZZ_KNOWN=known, RNNE_FUZZ_ARTIFACTS=os.path.join(a.dir, "artifacts"))
    deadline = time.time() + a.seconds
    total, runs, t0 = 0, 0, time.time()
    summary = os.path.join(a.dir, "summary.txt")
    if os.path.exists(summary):  # a continued hunt: the counts go on from the previous driver's
        m = re.search(r"runs (\d+) total_execs (\d+) elapsed_s (\d+)", open(summary).read())
        if m:
            runs, total, t0 = int(m.group(1)), int(m.group(2)), t0 - int(m.group(3))
    while time.time() < deadline - 5:
        runs += 1
        log = os.path.join(a.dir, f"run{runs:03d}.log")
        cmd = [sys.executable, os.path.join(HERE, f"{a.target}.py"), f"-max_total_time={int(deadline - time.time())}",
               f"-timeout={a.timeout}", f"-rss_limit_mb={a.rss}", "-print_final_stats=1",
               f"-artifact_prefix={os.path.join(a.dir, 'artifacts')}/", *a.extra, os.path.join(a.dir, "corpus")]
        with open(log, "w") as f:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=a.dir)
        text = open(log, errors="replace").read()
        counts = re.findall(r"^#(\d+)\s", text, re.M)
        execs = int(counts[-1]) if counts else 0
        m = re.search(r"stat::number_of_executed_units:\s*(\d+)", text)
        if m:
            execs = max(execs, int(m.group(1)))
        total += execs
        if rc != 0:
            art = re.findall(r"Test unit written to (\S+)", text) or re.findall(r"FINDING-INPUT (\S+)", text)
            sig = re.search(r"FINDING-SIGNATURE (\S+)", text)
            kind = ("python:" + sig.group(1)) if sig else \
                next((k for k in ("AddressSanitizer", "UndefinedBehaviorSanitizer", "runtime error", "timeout",
                                  "out-of-memory", "deadly signal", "fuzz target exited") if k in text), "unknown")
            with open(os.path.join(a.dir, "findings.txt"), "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} run{runs:03d} {kind} {art[-1] if art else '-'}\n")
            if sig:
                with open(known, "a") as f:
                    f.write(sig.group(1) + "\n")
            elif not art:  # neither a finding nor an artifact: a setup error, do not spin
                print(text[-3000:], file=sys.stderr)
                break
        el = time.time() - t0
        with open(os.path.join(a.dir, "summary.txt"), "w") as f:
            f.write(f"target {a.target} runs {runs} total_execs {total} elapsed_s {el:.0f} "
                    f"exec_per_s {total / max(el, 1):.1f}\n")
    print(open(os.path.join(a.dir, "summary.txt")).read())


if __name__ == "__main__":
    main()
