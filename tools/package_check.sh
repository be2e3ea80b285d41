#!/usr/bin/env bash
# Packaging and dependency-floor check, run by `make test` (so by CI):
# build the wheel, install it into a fresh environment with its core dependencies only, each pinned to the
# floor pyproject.toml declares (tools/floors.py), then run what a new user runs: `lorastream demo`, a merge
# (dense, and to NF4 through the compiled kernels), plan, inspect and verify, and a job that needs a missing
# extra. Every step must be quiet (no third-party warnings) and every missing extra must be a one-line message,
# never a traceback. Last, the tests that need no reference library (formats, options, structure, the Hub
# cache, reruns, crash safety) run against the installed wheel at those floors.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WORK=${PACKAGE_CHECK_DIR:-$(mktemp -d -t lorastream-package-XXXX)}
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" -m venv "$WORK/venv"
PIP="$WORK/venv/bin/python -m pip -q --disable-pip-version-check"
$PIP install "$TORCH_SPEC"
$PIP wheel --no-deps -w "$WORK/dist" . >/dev/null
"$PYTHON" tools/floors.py > "$WORK/floors.txt"
$PIP install -c "$WORK/floors.txt" "$WORK"/dist/lorastream-*.whl
echo "package check: installed $(cd "$WORK/dist" && ls) with $(paste -sd' ' "$WORK/floors.txt") $TORCH_SPEC"

fail() { echo "package check FAILED: $*" >&2; exit 1; }
quiet() {  # run a command; its output must hold no third-party warnings, errors, tracebacks or progress bars
  local name=$1; shift
  "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || { cat "$WORK/$name.out" "$WORK/$name.err" >&2; fail "$name"; }
  if cat "$WORK/$name.out" "$WORK/$name.err" | grep -i -q -E 'warn|traceback|error|failed to initialize|it/s'; then
    cat "$WORK/$name.err" >&2; fail "$name printed third-party output on stderr"
  fi
}
LS="$WORK/venv/bin/lorastream"
quiet demo "$LS" demo --keep "$WORK/demo"
grep -q "merged into" "$WORK/demo.err" || fail "demo did not merge"
quiet plan "$LS" plan "$WORK/demo/base" "$WORK/demo/adapter" -o "$WORK/out" --max-memory 512MiB
quiet merge "$LS" merge "$WORK/demo/base" "$WORK/demo/adapter" -o "$WORK/out" --max-memory 512MiB --quiet
quiet inspect "$LS" inspect "$WORK/out"
quiet verify "$LS" verify "$WORK/demo/base" "$WORK/demo/adapter" "$WORK/out"
quiet nf4 "$LS" merge "$WORK/demo/base" "$WORK/demo/adapter" -o "$WORK/nf4" --quantize nf4 --quiet
grep -q "codec kernels: compiled" "$WORK/nf4.err" || { cat "$WORK/nf4.err" >&2; fail "the compiled kernels did not run"; }
quiet verify-nf4 "$LS" verify "$WORK/demo/base" "$WORK/demo/adapter" "$WORK/nf4"

# a job that needs an extra that is not installed: one line naming the extra, exit 2, no traceback
for job in "merge s3://bucket/base $WORK/demo/adapter -o $WORK/out2" \
           "merge $WORK/demo/base $WORK/demo/adapter -o $WORK/out3 --executor ray"; do
  set +e; $LS $job >"$WORK/extra.out" 2>"$WORK/extra.err"; status=$?; set -e
  [ "$status" -eq 2 ] || { cat "$WORK/extra.err" >&2; fail "'lorastream $job' exited $status, expected 2"; }
  [ "$(wc -l <"$WORK/extra.err")" -eq 1 ] && grep -q "pip install 'lorastream\[" "$WORK/extra.err" \
    || { cat "$WORK/extra.err" >&2; fail "'lorastream $job' did not name the extra in one line"; }
done

# the core tests, against the installed wheel (not src/) with the core dependencies at their floors
$PIP install -c "$WORK/floors.txt" pytest hypothesis
(cd "$WORK" && ln -s "$OLDPWD/tests" tests && cp "$OLDPWD/pyproject.toml" . &&
 venv/bin/python -m pytest -q -p no:cacheprovider tests/test_formats.py tests/test_options.py \
   tests/test_structure.py tests/test_hub_cache.py tests/test_rerun.py tests/test_crash_safety.py) \
  || fail "core tests at the dependency floors"
echo "package check: ok (demo, plan, merge, NF4 merge, inspect, verify quiet; missing extras named; core tests" \
     "pass at the floors)"
