#!/usr/bin/env bash
# Scouting for a Fashion-MNIST setting with a real small-batch advantage: SB and LB only (cheap), in several
# settings side by side, one reproduce.py output folder per setting. benchmarks/scout_report.py then ranks the
# settings by their held-out SB − LB gap per unit of compute.
#
#   bash benchmarks/scout_gap.sh OUTDIR [--device cuda|cpu] [--seeds N] [--first-seed S] [--budget SECONDS]
#                                [--only NAME ...] [--smoke]
#
# Settings (each the `fmnist` preset with one change):
#   base       the preset as it is (|B| = 1024, |M| = 128, k = 8, 3,000 steps, 10,000 images, widths 16-32-64)
#   k32        |B| = 4096 (k = 32, near the paper's k = 40)
#   steps6000  6,000 steps
#   wide       widths 32-64-128
#   train5000  the first 5,000 training images
# Every setting runs its own reproduce.py with --jobs (JOBS_<name> or the default below) at the same time as
# the others, all under --time-budget; an existing folder is resumed (--seeds may grow it). JOBS_OVERRIDE=N gives
# every setting N jobs. The data: Fashion-MNIST wherever benchmarks/data.py finds it (e.g. REGOPT_DATA=folder).
# --smoke: tiny sizes on the CPU (64 training images are enough), to check the script; |B| is then 16 everywhere.
set -u
OUT="" DEVICE="" SEEDS=4 FIRST=0 BUDGET=420 SMOKE=0 ONLY=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --seeds) SEEDS="$2"; shift 2 ;;
    --first-seed) FIRST="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --only) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do ONLY+=("$1"); shift; done ;;
    --smoke) SMOKE=1; shift ;;
    -*) echo "unknown option: $1" >&2; exit 2 ;;
    *) [ -z "$OUT" ] && OUT="$1" || { echo "one OUTDIR only" >&2; exit 2; }; shift ;;
  esac
done
[ -n "$OUT" ] || { echo "usage: bash benchmarks/scout_gap.sh OUTDIR [options]" >&2; exit 2; }
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

declare -A ARGS=(
  [base]=""
  [k32]="--batch-size 4096"
  [steps6000]="--steps 6000"
  [wide]="--widths 32 64 128"
  [train5000]="--train-size 5000"
)
declare -A JOBS=([k32]=4 [steps6000]=3 [wide]=3 [base]=2 [train5000]=2)
NAMES=(k32 steps6000 wide base train5000)  # the longest first
[ ${#ONLY[@]} -gt 0 ] && NAMES=("${ONLY[@]}")

COMMON=(--preset fmnist --methods SB LB --seeds "$SEEDS" --first-seed "$FIRST" --time-budget "$BUDGET" --no-progress)
[ -n "$DEVICE" ] && COMMON+=(--device "$DEVICE")
if [ "$SMOKE" = 1 ]; then  # after the setting's own options, so these win (argparse keeps the last)
  SMOKE_ARGS=(--device cpu --threads 1 --steps 4 --eval-every 2 --eval-size 0 --test-size 0 --bn-recalibrate 2
              --train-size 48 --heldout-size 16 --batch-size 16 --micro-batch-size 4)
else
  SMOKE_ARGS=()
fi

pids=()
for name in "${NAMES[@]}"; do
  [ -n "${ARGS[$name]+x}" ] || { echo "unknown setting: $name (one of ${!ARGS[*]})" >&2; exit 2; }
  folder="$OUT/$name"
  resume=(); [ -f "$folder/config.json" ] && resume=(--resume)
  # shellcheck disable=SC2206  # the settings' options are words
  cmd=("$PY" benchmarks/reproduce.py "${COMMON[@]}" --jobs "${JOBS_OVERRIDE:-${JOBS[$name]}}" --out "$folder"
       ${ARGS[$name]} "${SMOKE_ARGS[@]}" "${resume[@]}")
  if [ ${#resume[@]} -gt 0 ]; then  # --resume refuses options that would change a saved folder: give it none
    cmd=("$PY" benchmarks/reproduce.py --resume --out "$folder" --jobs "${JOBS_OVERRIDE:-${JOBS[$name]}}"
         --time-budget "$BUDGET" --no-progress --seeds "$SEEDS")
    [ -n "$DEVICE" ] && cmd+=(--device "$DEVICE")
  fi
  echo "$name: ${cmd[*]}"
  "${cmd[@]}" > "$OUT/$name.log" 2>&1 &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
for name in "${NAMES[@]}"; do echo "== $name: $(tail -n 1 "$OUT/$name.log")"; done
exit "$rc"
