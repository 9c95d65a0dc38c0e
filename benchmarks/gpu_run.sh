#!/usr/bin/env bash
# One budgeted GPU benchmark run of the project (docs/gpu_run.md): kernel parity, per-call and
# whole-step timings, a kernel-class profile, the latent preset and the real trainer, written to
# $OUT as at most 8 files. From the repository root of a plain checkout on the GPU machine:
#
#   OUT=$OUT BUDGET_S=480 bash benchmarks/gpu_run.sh
#
# Needs torch, triton and numpy; the trainer stage also needs the wheelhouse (`make wheelhouse`,
# carried as .wheelhouse), which the deps stage installs offline. Without a CUDA device (or with
# REHEARSAL=1) every stage runs on the CPU under the Triton interpreter at tiny shapes: the CI
# rehearsal of the wiring, not a measurement.
#
# Stages run in order of value, each in its own process under its own time limit (TIMEOUT_<stage>
# overrides it), never beyond what is left of BUDGET_S; a stage is skipped once less than
# MIN_STAGE_S seconds are left. STAGES picks stages and their order (a later GPU session puts
# first what earlier ones did not measure). The summary is printed last.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY=${PY:-python3}
OUT=${OUT:-${TMPDIR:-/tmp}/ddhpc_gpu_run_out}
BUDGET_S=${BUDGET_S:-480}
MIN_STAGE_S=${MIN_STAGE_S:-15}
STRAGGLER_S=${STRAGGLER_S:-30}
ALL_STAGES="deps env parity calls step profile latent trainer sample step_compile calls_compile gpu_tests"
STAGES=${STAGES:-$ALL_STAGES}
STAGES=${STAGES//,/ }
for name in $STAGES; do
  case " $ALL_STAGES " in
    *" $name "*) ;;
    *) echo "gpu_run.sh: unknown stage '$name' in STAGES (stages: $ALL_STAGES)" >&2; exit 2 ;;
  esac
done
# The step modes STEP_MODES / COMPILE_STEP_MODES name, checked before any stage (the plan is
# plain Python: no torch import); a typo would otherwise fail every stage of a lent GPU's run.
if ! why=$("$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); import gpu_stages as g
try:
    g.Plan.make(False)
except ValueError as exc:
    sys.exit(str(exc))' 2>&1); then
  echo "gpu_run.sh: ${why}" >&2; exit 2
fi
export WHEELHOUSE=${WHEELHOUSE:-$ROOT/.wheelhouse}
T0=$(date +%s)

mkdir -p "$OUT" || exit 2
rm -f "$OUT"/{summary.txt,report.md,log.txt,env.csv,parity.csv,calls.csv,steps.csv,profile.csv}
SUM="$OUT/summary.txt"
LOG="$OUT/log.txt"
# Scratch (installed wheels, synthetic store, trainer run): never under $OUT, whose files all
# come back from the GPU machine.
if [ -z "${WORK:-}" ]; then
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/ddhpc_gpu_run.XXXXXX") || exit 2
  trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"
# The checkout itself is the package (no install on the GPU machine); the deps stage installs
# the wheelhouse into $WORK/site, on the path from the start so every later stage sees it.
export PYTHONPATH="$ROOT:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 BUDGET_S STAGES
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$WORK/triton_cache}

if [ "${REHEARSAL:-0}" = 1 ] || ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  MODE=rehearsal
  export TRITON_INTERPRET=1
  MODE_FLAG=--rehearsal
else
  MODE=gpu
  unset TRITON_INTERPRET
  MODE_FLAG=
fi

# Time limits (s). GPU: sized for an H100/H200 with a cold Triton and inductor cache. Rehearsal:
# for the 2-core CI machine.
declare -A GPU_LIMIT=([deps]=60 [env]=60 [parity]=180 [calls]=180 [step]=150 [profile]=90
                      [latent]=120 [trainer]=240 [sample]=120 [step_compile]=300 [calls_compile]=240
                      [gpu_tests]=300)
declare -A CPU_LIMIT=([deps]=60 [env]=60 [parity]=240 [calls]=180 [step]=180 [profile]=120
                      [latent]=180 [trainer]=240 [sample]=120 [step_compile]=240 [calls_compile]=180
                      [gpu_tests]=120)

limit_of() {
  local var="TIMEOUT_$1"
  if [ -n "${!var:-}" ]; then echo "${!var}"
  elif [ "$MODE" = gpu ]; then echo "${GPU_LIMIT[$1]}"
  else echo "${CPU_LIMIT[$1]}"; fi
}

record() {  # name status rc seconds limit note
  printf '%-14s %-8s %4s %6s %6s  %s\n' "$@" | tee -a "$SUM"
}

run_stage() {
  local name=$1 limit left start rc status pid waited note=""
  limit=$(limit_of "$name")
  left=$(( BUDGET_S - ($(date +%s) - T0) ))
  if (( left < MIN_STAGE_S )); then
    record "$name" skipped - 0 "$limit" "budget spent (${left} s of ${BUDGET_S} s left)"
    return
  fi
  if (( limit > left )); then limit=$left; note="limit cut to the budget left"; fi
  echo "##### stage $name (limit ${limit} s, $(date -u +%H:%M:%S) UTC)" >> "$LOG"
  start=$(date +%s)
  # -k: a stage that ignores SIGTERM (a stuck CUDA call) is killed 10 s later.
  STAGE_LIMIT_S=$limit timeout -k 10 "$limit" "$PY" benchmarks/gpu_stages.py "$name" --out "$OUT" --work "$WORK" \
    $MODE_FLAG >> "$LOG" 2>&1 &
  pid=$!
  wait "$pid"
  rc=$?
  # timeout leads a process group of its own. What the stage started and left running (the
  # trainer, still writing the checkpoint that timeout's SIGTERM asked for, outlived its stage
  # on an H100 and raced the clean-up of $WORK) gets STRAGGLER_S to finish, then is killed:
  # nothing of a stage runs on into the next one or the report.
  for (( waited = 0; waited < STRAGGLER_S; waited++ )); do
    kill -0 -- "-$pid" 2>/dev/null || break
    sleep 1
  done
  kill -KILL -- "-$pid" 2>/dev/null
  case $rc in
    0) status=ok ;;
    124|137) status=timeout; note="stopped at its ${limit} s limit" ;;
    *) status=FAIL ;;
  esac
  record "$name" "$status" "$rc" "$(( $(date +%s) - start ))" "$limit" "$note"
}

{
  echo "gpu_run.sh: mode $MODE, budget ${BUDGET_S} s, stages: $STAGES"
  printf '%-14s %-8s %4s %6s %6s  %s\n' stage status rc secs limit note
} | tee "$SUM"
for name in $STAGES; do
  run_stage "$name"
done

echo "##### report" >> "$LOG"
"$PY" benchmarks/gpu_stages.py report --out "$OUT" --summary "$SUM" >> "$LOG" 2>&1 \
  || echo "report: failed (see log.txt)" >> "$SUM"
echo "total $(( $(date +%s) - T0 )) s of ${BUDGET_S} s; files in $OUT: $(cd "$OUT" && echo *)" >> "$SUM"
echo
echo "=================== summary ($OUT/summary.txt)"
cat "$SUM"
