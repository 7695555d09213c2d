#!/usr/bin/env bash
# The GPU check's one call on a lent GPU machine (../shared/GPU_CHECK.md; bench/GPU_RESULTS.md keeps the figures):
# install the wheel set carried in .whl/ (built here by bench/gpu_wheels.sh) without any index, build DeepSpeed
# from its sdist, then run bench/gpu_check.py's phases. Nothing is installed outside /tmp.
#
#     bash bench/gpu_wheels.sh                    # here, first: .whl/ and the size of what travels (<= 64 MiB)
#     run tool: command "bash bench/gpu_check.sh", carry [".whl"], timeout_s 480
#     bash bench/gpu_check.sh --dry-run           # here: every phase at tiny shapes on CPU, the project's .venv
#
# Results: $OUT/gpu_check.jsonl (one line per phase, as each ends), $OUT/gpu_check.md (the table, printed last),
# $OUT/install.json and install.log. GPU_CHECK_LIMIT_S: seconds the whole call may take (default 470, for a
# timeout_s of 480); the phases get what the install leaves, less a margin for the table.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"

if [ "${1:-}" = "--dry-run" ]; then
  shift
  exec "${PYTHON:-.venv/bin/python}" bench/gpu_check.py --dry-run --out "$OUT" "$@"
fi

PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
LOG=$OUT/install.log
LIMIT=${GPU_CHECK_LIMIT_S:-470}
log() { echo "[gpu-check] $*" | tee -a "$LOG"; }
: >"$LOG"

install_wheels() {  # every carried wheel into $SITE, no index, no dependency resolution (the set is complete)
  ls .whl/*.whl >/dev/null 2>&1 || { log "no .whl/ here: carry it (run bench/gpu_wheels.sh first)"; return 1; }
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl >>"$LOG" 2>&1
}

build_deepspeed() {  # DS_BUILD_OPS=0: pure Python, ops JIT-built on first use; else its sources on PYTHONPATH
  local sdist
  sdist=$(ls .whl/deepspeed-*.tar.gz 2>/dev/null | head -1)
  [ -n "$sdist" ] || { log "no deepspeed sdist in .whl/"; return 1; }
  if DS_BUILD_OPS=0 "$PY" -m pip install -q --upgrade --no-build-isolation --no-index --no-deps --target "$SITE" \
       "$sdist" >>"$LOG" 2>&1; then
    echo built
  else
    mkdir -p /tmp/ds && tar -xzf "$sdist" -C /tmp/ds
    echo "source:$(ls -d /tmp/ds/deepspeed-*)"
  fi
}

mkdir -p "$SITE"
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
t0=$(date +%s)
install_wheels && WHEELS=ok || WHEELS=failed
t1=$(date +%s)
DS=$(build_deepspeed) || DS=failed
case "$DS" in source:*) export PYTHONPATH=$PYTHONPATH:${DS#source:}; log "deepspeed build failed; its sources on PYTHONPATH" ;; esac
t2=$(date +%s)
log "wheels $WHEELS in $((t1 - t0)) s; deepspeed $DS in $((t2 - t1)) s"
"$PY" - "$OUT/install.json" "$WHEELS" "$DS" "$((t1 - t0))" "$((t2 - t1))" <<'EOF'
import json, sys
out, wheels, ds, tw, td = sys.argv[1:]
json.dump({"wheels": wheels, "deepspeed": ds, "wheels_s": int(tw), "deepspeed_s": int(td)}, open(out, "w"))
EOF

LEFT=$((LIMIT - ($(date +%s) - START) - 15))  # 15 s kept for the table if the phases are cut short
log "phases get $LEFT s"
# no --json here: the run tool returns the last 12,000 characters, which must be the table ($OUT has the JSON)
timeout -k 5 $((LEFT + 10)) "$PY" bench/gpu_check.py --out "$OUT" --deadline-s "$LEFT" "$@"
RC=$?
if [ ! -s "$OUT/gpu_check.md" ] || [ "$OUT/gpu_check.md" -ot "$OUT/install.json" ]; then
  log "gpu_check.py ended without its table (rc $RC): the table of what it wrote"
  "$PY" bench/gpu_check.py --table "$OUT/gpu_check.jsonl"
fi
exit $RC
