#!/usr/bin/env bash
# Everything attnopt measures on a GPU, in one command: the GPU-marked tests, every benchmark in benchmarks/ and
# the anchor scripts in ../shared/anchors (beside the repository, skipped when absent), one process per script,
# all JSON into one folder, within a total time budget (default 470 s: one 8-minute device call on an H100).
#
#   benchmarks/gpu.sh [OUT_DIR]          # default OUT_DIR: gpu-results/
#
# Environment: PYTHON (default: python), GPU_SH_BUDGET (total seconds, default 470), GPU_SH_ANCHORS (default
# ../shared/anchors from the repository root). Each script runs under
# `timeout` with its own limit, cut to what is left of the budget; one that times out or fails is reported in
# the summary and the others still run. Writes OUT_DIR/<script>.json and OUT_DIR/<script>.log per script and
# OUT_DIR/summary.json. Exits 2 at once without a CUDA device, 1 when any script failed or timed out.
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-gpu-results}"
PYTHON="${PYTHON:-python}"
BUDGET="${GPU_SH_BUDGET:-470}"
ANCHORS="${GPU_SH_ANCHORS:-$REPO/../shared/anchors}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "benchmarks/gpu.sh: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False); it measures" \
         "on a GPU only. Nothing was run." >&2
    exit 2
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
START=$SECONDS
SUMMARY=()

# run NAME LIMIT_S COMMAND...: runs COMMAND (from the repository root) under timeout, logs to OUT/NAME.log
run() {
    local name="$1" limit="$2"
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 10)); then
        SUMMARY+=("$name skipped 0 budget-spent")
        echo "== $name: skipped, the ${BUDGET} s budget is spent"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at most ${limit} s)"
    local t0=$SECONDS status
    (cd "$REPO" && timeout --kill-after=10 "$limit" "$@") >"$OUT/$name.log" 2>&1
    case $? in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    SUMMARY+=("$name $status $((SECONDS - t0)) $name.log")
    echo "   $status in $((SECONDS - t0)) s; last lines:"
    tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
}

run gpu-tests 120 env ATTNOPT_TEST_GPU=1 "$PYTHON" -m pytest -q -m gpu tests -p no:cacheprovider \
    --junitxml="$OUT/gpu-tests.xml"
run exact 150 "$PYTHON" benchmarks/exact.py --out "$OUT/exact.json"
if compgen -G "$ANCHORS/*.py" >/dev/null; then
    for script in "$ANCHORS"/*.py; do
        name="anchors-$(basename "$script" .py)"
        run "$name" 90 "$PYTHON" "$script" "$OUT/$name.json"
    done
else
    SUMMARY+=("anchors skipped 0 no-$ANCHORS")
    echo "== anchors: skipped, $ANCHORS has no scripts"
fi
run sparse 60 "$PYTHON" benchmarks/sparse.py --quick --json "$OUT/sparse.json"
run linear 60 "$PYTHON" benchmarks/linear.py --out "$OUT/linear.json"
run cost_model 60 "$PYTHON" benchmarks/cost_model.py --seq 4096,16384 --out "$OUT/cost_model.json"
run sass_compare 40 "$PYTHON" benchmarks/sass_compare.py --out "$OUT/sass_compare.json"
run detection 60 "$PYTHON" benchmarks/detection.py --out "$OUT/detection.json"

"$PYTHON" - "$OUT" "${SUMMARY[@]}" <<'EOF'
import json, sys
from pathlib import Path
import xml.etree.ElementTree as ET

out = Path(sys.argv[1])
rows = [dict(zip(("script", "status", "seconds", "log"), line.split(" ", 3))) for line in sys.argv[2:]]
for row in rows:
    row["seconds"] = int(row["seconds"])
junit = out / "gpu-tests.xml"
if junit.is_file():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    (out / "gpu-tests.json").write_text(json.dumps(counts, indent=1) + "\n")
    rows[0]["tests"] = counts
for row in rows:
    path = out / f"{row['script']}.json"
    row["json"] = path.name if path.is_file() else None
(out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
print(f"\n{'script':28s} {'status':8s} {'s':>5s}  json")
for row in rows:
    print(f"{row['script']:28s} {row['status']:8s} {row['seconds']:5d}  {row['json'] or '-'}"
          + (f"  tests {row['tests']}" if "tests" in row else ""))
print(f"results in {out}")
sys.exit(1 if any(r["status"] in ("failed", "timeout") for r in rows) else 0)
EOF
