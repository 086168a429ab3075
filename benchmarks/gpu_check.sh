#!/usr/bin/env bash
# The GPU verification kit: one command that checks regopt on a CUDA machine and measures it.
#
#   bash benchmarks/gpu_check.sh OUTDIR [tests|speed|repro|all] [--smoke]
#
# Parts (run in this order by `all`, each under its own `timeout`, each independent of the others):
#   tests  CUDA tests: tests/test_cuda.py (CUDA against the CPU, host syncs), tests/test_device_paths.py on
#          CUDA, the existing CUDA no-sync test                                      -> tests.md, tests.json
#   speed  benchmarks/speed.py --suite gpu: ResNet-18 B=5120 |M|=128, fmnist CNN B=1024 |M|=128, torch.compile
#                                                                                    -> speed.md, speed.json
#   repro  benchmarks/reproduce.py --preset fmnist on CUDA, several worker processes (under CUDA MPS when it
#          starts), as many runs as fit in the time budget                         -> repro.md, repro.json, repro.tar.gz
# plus gpu_check.log (everything printed). At most 8 files, all directly in OUTDIR.
# --smoke runs every part on the CPU at tiny sizes in about a minute (tests/benchmarks/test_gpu_check.py).
#
# Environment (all optional):
#   GPU_CHECK_BUDGET   seconds for the whole run (default 540; parts: tests 60 (--smoke: ended only by 120 s
#                      without output), speed 180, repro the rest)
#   REPRO_METHODS      default "SB LB GN FT AJ UJ GRAFT-ext GN-|M|=1024" (whitespace-separated; names as
#                      reproduce.py reads them, e.g. GN@λ=0.03; --smoke: "SB GN GRAFT-ext GN@λ=0.03-|M|=8")
#   REPRO_SEEDS (3), REPRO_JOBS (8), REPRO_BUDGET (420: reproduce.py --time-budget, capped by what is left)
#                      (--smoke: 1 seed, 2 jobs)
#   REPRO_ARGS         more reproduce.py arguments, e.g. "--steps 1500"
#   REPRO_OUT          reproduce.py's output folder (default results/gpu_check/repro; an existing one is resumed)
#   PYTHON             the interpreter (default python3)
# Exit code: 0 when every part that ran passed, else 1 (2: bad usage).

set -u

usage() { echo "usage: bash benchmarks/gpu_check.sh OUTDIR [tests|speed|repro|all] [--smoke]" >&2; exit 2; }

OUT="" PART="all" SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    tests|speed|repro|all) PART="$arg" ;;
    -h|--help) usage ;;
    -*) echo "unknown option: $arg" >&2; usage ;;
    *) if [ -z "$OUT" ]; then OUT="$arg"; else usage; fi ;;
  esac
done
[ -n "$OUT" ] || usage
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
cd "$(dirname "$0")/.." || exit 2
ROOT="$(pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-540}"
TESTS_STALL_S=120  # pytest prints a mark per test: no test takes this long, a hang does
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
LOG="$OUT/gpu_check.log"
START=$SECONDS
MPS_STATUS="not tried" MPS_RUNNING=0
NAMES=() STATUSES=() DIGESTS=()

left() { echo $((BUDGET - (SECONDS - START))); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
banner() { printf '\n==== %s  [%s s elapsed, %s s left]\n' "$*" $((SECONDS - START)) "$(left)"; }

# Record a part's outcome in OUTDIR/<part>.json ("part" key) and .md (status line), print a digest.
finish_part() {  # part rc seconds
  local status
  case "$2" in 0) status="passed" ;; 124|137) status="timeout" ;; *) status="failed" ;; esac
  NAMES+=("$1") STATUSES+=("$status (exit $2, $3 s)")
  DIGESTS+=("$("$PY" - "$OUT" "$1" "$status" "$2" "$3" "$MPS_STATUS" <<'EOF'
import json, sys
from pathlib import Path
out, part, status, rc, secs, mps = Path(sys.argv[1]), *sys.argv[2:]
info = {"status": status, "exit_code": int(rc), "seconds": int(secs)}
if part == "repro":
    info["mps"] = mps
path = out / f"{part}.json"
try:
    data = json.loads(path.read_text())
except (OSError, ValueError) as error:
    data = {"error": f"{part} wrote no readable JSON ({type(error).__name__}); see gpu_check.log"}
data["part"] = info
path.write_text(json.dumps(data, indent=2, default=str))
md = out / f"{part}.md"
body = md.read_text() if md.exists() else f"No output: {data.get('error', 'see gpu_check.log')}\n"
md.write_text(f"<!-- gpu_check part {part}: {status}, exit {rc}, {secs} s -->\n"
              f"**{part}: {status}** (exit {rc}, {secs} s)\n\n{body}")
lines = []  # the part's digest for the final summary
if part == "tests" and "counts" in data:
    lines.append(", ".join(f"{v} {k}" for k, v in data["counts"].items() if v))
    lines += [f"FAILED {t['name']}: {t['message']}" for t in data.get("tests", [])
              if t["outcome"] in ("failed", "error")][:12]
elif part == "speed" and "tables" in data:
    verdicts = {True: "reached", False: "NOT reached", None: "not measured"}
    for table in data["tables"]:
        rows = table.get("rows", [])
        ok = len([r for r in rows if r.get("status") == "ok"])
        lines.append(f"{table['table']}: " + (table.get("skipped") or
                     f"{ok}/{len(rows)} rows ok, {table.get('timed_rounds', 0)} timed rounds"))
        lines += [f"  {r['method']}: {r['status']}"[:160] for r in rows if r.get("status") != "ok"][:6]
        for t in table.get("targets", []):
            value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
            lines.append(f"  {t['row']} {t['quantity']} = {value} (target <= {t['bound']:g}): {verdicts[t['reached']]}")
elif part == "repro" and "runs" in data:
    lines.append(f"{len(data['runs'])} runs finished; MPS: {mps}")
print("\n".join(lines))
EOF
)")
}

run_timed() {  # seconds command... : run under coreutils timeout (SIGTERM, SIGKILL 10 s later)
  local limit="$1"; shift
  timeout -k 10 "$limit" "$@"
}

# Like run_timed, and also ended (exit 124) once its output has not grown for STALL seconds: a hang.
# A stall, unlike the time taken, does not grow with the load of a shared machine.
run_watched() {  # stall limit command...
  local stall="$1" limit="$2" out="$WORK/watched.out" size=-1 idle=0 now pid tailer rc
  shift 2
  : > "$out"
  timeout -k 10 "$limit" "$@" > "$out" 2>&1 &
  pid=$!
  tail -n +1 -f --pid="$pid" "$out" &  # the output, as it comes, in the log
  tailer=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    now=$(stat -c %s "$out")
    if [ "$now" = "$size" ]; then idle=$((idle + 1)); else size=$now idle=0; fi
    if [ "$idle" -ge "$stall" ]; then
      echo "no output for ${stall} s: a hang; ended" >> "$out"
      kill -TERM "$pid" 2>/dev/null; wait "$pid"; wait "$tailer"; return 124
    fi
  done
  wait "$pid"; rc=$?
  wait "$tailer"
  return "$rc"
}

# -- tests ----------------------------------------------------------------------------------------
part_tests() {
  # test_cuda.py: two devices compared, or CUDA only; test_device_paths.py on CUDA alone (REGOPT_TEST_DEVICES),
  # since the default suite runs it on the CPU: what passes here is a check of the GPU.
  local t0=$SECONDS limit rc nodes=(tests/test_cuda.py tests/test_device_paths.py)
  # On a GPU the part gets 60 s of the budget; --smoke saves no GPU time: a stall ends it (or the whole budget).
  if [ "$SMOKE" = 1 ]; then limit=$(left); else limit=$(min 60 "$(left)"); fi
  banner "tests (limit ${limit} s, or ${TESTS_STALL_S} s without output)"
  # The CUDA no-sync test that predates tests/test_cuda.py (not marked `cuda`): run it by name if present.
  if grep -q "def test_no_host_sync_inside_the_micro_batch_loop_on_cuda" tests/test_optimizers.py 2>/dev/null; then
    nodes+=("tests/test_optimizers.py::test_no_host_sync_inside_the_micro_batch_loop_on_cuda")
  fi
  local device="cuda" options=(-q -rfEs -p no:cacheprovider --junitxml="$WORK/junit.xml")
  [ "$SMOKE" = 1 ] && device="${REGOPT_TEST_DEVICE:-cpu}"
  # With pytest-timeout (the GPU image has it), a hung test is reported with its stack and the rest still run.
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then options+=(--timeout 30); fi
  echo "REGOPT_TEST_DEVICE=$device REGOPT_TEST_DEVICES=cuda $PY -m pytest ${options[*]} ${nodes[*]}"
  REGOPT_TEST_DEVICE="$device" REGOPT_TEST_DEVICES=cuda run_watched "$TESTS_STALL_S" "$limit" \
    "$PY" -m pytest "${options[@]}" "${nodes[@]}"
  rc=$?
  "$PY" - "$WORK/junit.xml" "$OUT" "$device" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
junit, out, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
tests = []
if junit.exists():
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                text = (node.get("message") or node.text or "").strip().splitlines()
                message = text[0][:300] if text else ""
                break
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        tests.append({"name": name, "outcome": outcome, "seconds": float(case.get("time") or 0), "message": message})
counts = Counter(t["outcome"] for t in tests)
counts = {k: counts.get(k, 0) for k in ("passed", "failed", "error", "skipped")}
(out / "tests.json").write_text(json.dumps({"device": device, "counts": counts, "tests": tests}, indent=2))
lines = [f"# CUDA tests (REGOPT_TEST_DEVICE={device})", "",
         ", ".join(f"{v} {k}" for k, v in counts.items()) or "no tests ran (see gpu_check.log)", ""]
bad = [t for t in tests if t["outcome"] in ("failed", "error")]
if bad:
    lines += ["| test | outcome | message |", "|---|---|---|"]
    lines += [f"| `{t['name']}` | {t['outcome']} | {t['message'].replace('|', '/')} |" for t in bad]
skips = Counter(t["message"] for t in tests if t["outcome"] == "skipped")
lines += [""] + [f"- skipped {n}×: {reason}" for reason, n in skips.items()]
(out / "tests.md").write_text("\n".join(lines) + "\n")
EOF
  finish_part tests "$rc" $((SECONDS - t0))
}

# -- speed ----------------------------------------------------------------------------------------
part_speed() {
  local t0=$SECONDS limit rc args
  limit=$(min 180 "$(left)")
  banner "speed (limit ${limit} s)"
  # --smoke: a budget that never cuts a table short (the smoke test counts the rounds); the part's timeout still holds.
  if [ "$SMOKE" = 1 ]; then args=(--smoke --threads 1 --budget 600); else args=(--budget $((limit - 25))); fi
  echo "$PY benchmarks/speed.py --suite gpu ${args[*]}"
  run_timed "$limit" "$PY" benchmarks/speed.py --suite gpu "${args[@]}" --json "$OUT/speed.json" \
    --markdown "$OUT/speed.md"
  rc=$?
  finish_part speed "$rc" $((SECONDS - t0))
}

# -- repro ----------------------------------------------------------------------------------------
start_mps() {
  if [ "$SMOKE" = 1 ]; then MPS_STATUS="not tried (--smoke)"; return; fi
  if ! command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
    MPS_STATUS="not started: nvidia-cuda-mps-control not found"; return
  fi
  export CUDA_MPS_PIPE_DIRECTORY="$WORK/mps-pipe" CUDA_MPS_LOG_DIRECTORY="$WORK/mps-log"
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if ! timeout 20 nvidia-cuda-mps-control -d; then
    MPS_STATUS="not started: nvidia-cuda-mps-control -d failed"
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; return
  fi
  MPS_RUNNING=1
  # A client that cannot work under this MPS server must not cost the workers their GPU: probe once.
  if timeout 45 "$PY" -c "import torch; x = torch.ones(8, device='cuda'); assert float(x.sum()) == 8.0"; then
    MPS_STATUS="started"
  else
    stop_mps
    MPS_STATUS="started, but a CUDA client failed under it: stopped, workers run without MPS"
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
}

stop_mps() {
  if [ "$MPS_RUNNING" = 1 ]; then
    echo quit | timeout 20 nvidia-cuda-mps-control
    MPS_RUNNING=0
  fi
}

write_fake_fashion_mnist() {  # folder: 64 training and 16 test images in the IDX format (--smoke only)
  "$PY" - "$1" <<'EOF'
import gzip, struct, sys
from pathlib import Path
import numpy as np
folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for name, shape in {"train-images-idx3-ubyte": (64, 28, 28), "train-labels-idx1-ubyte": (64,),
                    "t10k-images-idx3-ubyte": (16, 28, 28), "t10k-labels-idx1-ubyte": (16,)}.items():
    data = rng.integers(0, 10 if len(shape) == 1 else 256, shape, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
    with gzip.open(folder / f"{name}.gz", "wb") as f:
        f.write(header + data.tobytes())
EOF
}

repro_command() {  # fills REPRO_CMD for this run (real or --smoke)
  local methods=() words=() m data_root
  read -r -a words <<< "${REPRO_METHODS:-$1}"
  for m in "${words[@]}"; do m="${m//\'/}"; methods+=("${m//\"/}"); done
  REPRO_CMD=("$PY" benchmarks/reproduce.py --preset fmnist --methods "${methods[@]}" --out "$REPRO_DIR" --no-progress)
  if [ "$SMOKE" = 1 ]; then
    data_root="$WORK/fmnist"
    write_fake_fashion_mnist "$data_root" || return 1
    REPRO_CMD+=(--device cpu --seeds "${REPRO_SEEDS:-1}" --jobs "${REPRO_JOBS:-2}" --time-budget "$2"
                --data-root "$data_root" --train-size 48 --heldout-size 16 --steps 4 --eval-every 2 --batch-size 16
                --micro-batch-size 4 --widths 4 8 --eval-size 0 --test-size 0 --bn-recalibrate 2 --threads 1)
  else
    REPRO_CMD+=(--device cuda --seeds "${REPRO_SEEDS:-3}" --jobs "${REPRO_JOBS:-8}" --time-budget "$2"
                --data-root "$ROOT/.fmnist")
  fi
  if [ -f "$REPRO_DIR/config.json" ]; then REPRO_CMD+=(--resume); fi
  read -r -a words <<< "${REPRO_ARGS:-}"
  REPRO_CMD+=("${words[@]}")
}

part_repro() {
  local t0=$SECONDS limit rc budget
  limit=$(( $(left) - 15 ))
  banner "repro (limit ${limit} s)"
  local methods="SB LB GN FT AJ UJ GRAFT-ext GN-|M|=1024"
  if [ "$SMOKE" = 1 ]; then
    REPRO_DIR="$WORK/repro" methods="SB GN GRAFT-ext GN@λ=0.03-|M|=8"
  else
    REPRO_DIR="${REPRO_OUT:-$ROOT/results/gpu_check/repro}"
  fi
  budget=$(min "${REPRO_BUDGET:-420}" $((limit - 45)))
  rc=0
  local help help_rc
  help="$("$PY" benchmarks/reproduce.py --help 2>&1)"; help_rc=$?
  if [ "$limit" -lt 60 ]; then
    echo "error: only ${limit} s left for the repro part (needs 60): raise GPU_CHECK_BUDGET" >&2; rc=1
  elif [ "$help_rc" != 0 ]; then
    printf '%s\n' "$help" | tail -n 15 >&2
    echo "error: benchmarks/reproduce.py --help failed (exit $help_rc)" >&2; rc=1
  elif ! grep -q -- "--time-budget" <<< "$help" || ! grep -q -- "--jobs" <<< "$help"; then
    echo "error: benchmarks/reproduce.py has no --time-budget/--jobs option yet: the repro part cannot run" >&2; rc=1
  elif [ "$SMOKE" = 0 ] && ! "$PY" -c "from benchmarks.data import find_fashion_mnist as f; print('Fashion-MNIST:', f('$ROOT/.fmnist')['train_images'])"; then
    echo "error: Fashion-MNIST not found: copy the four .gz files into .fmnist/ (or set REGOPT_DATA)" >&2; rc=1
  elif ! repro_command "$methods" "$budget"; then
    echo "error: could not prepare the repro command" >&2; rc=1
  fi
  if [ "$rc" = 0 ]; then
    start_mps
    echo "MPS: $MPS_STATUS"
    mkdir -p "$(dirname "$REPRO_DIR")"
    echo "${REPRO_CMD[*]}"
    run_timed "$limit" "${REPRO_CMD[@]}"
    rc=$?
    stop_mps
  fi
  collect_repro
  finish_part repro "$rc" $((SECONDS - t0))
}

collect_repro() {  # REPRO_DIR -> OUTDIR/repro.tar.gz, repro.md (its summary.md), repro.json (runs.json + config)
  if [ -d "${REPRO_DIR:-/nonexistent}" ]; then
    tar -czf "$OUT/repro.tar.gz" -C "$(dirname "$REPRO_DIR")" "$(basename "$REPRO_DIR")"
    if [ "$(stat -c %s "$OUT/repro.tar.gz")" -gt 15000000 ]; then  # without checkpoints when large (a small file to copy back)
      tar -czf "$OUT/repro.tar.gz" --exclude=checkpoints -C "$(dirname "$REPRO_DIR")" "$(basename "$REPRO_DIR")"
    fi
  fi
  "$PY" - "${REPRO_DIR:-/nonexistent}" "$OUT" "${REPRO_CMD[*]:-}" <<'EOF'
import json, sys
from pathlib import Path
folder, out, command = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
def read(name, default):
    try:
        return json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return default
runs = read("runs.json", [])
config = read("config.json", {})
(out / "repro.json").write_text(json.dumps({"command": command, "folder": str(folder), "runs": runs,
                                            "config": config}, indent=2, default=str))
summary = folder / "summary.md"
text = summary.read_text() if summary.exists() else "No summary.md was written (see gpu_check.log).\n"
(out / "repro.md").write_text(f"Command: `{command}`\n\nAll of its output folder: repro.tar.gz\n\n{text}")
EOF
}

# -- main -----------------------------------------------------------------------------------------
main() {
  trap 'stop_mps; rm -rf "$WORK"' EXIT
  trap 'echo "gpu_check: interrupted"; exit 143' TERM INT
  echo "gpu_check: part=$PART smoke=$SMOKE budget=${BUDGET}s out=$OUT root=$ROOT python=$PY"
  "$PY" -c "import torch, platform; print('torch', torch.__version__, '| python', platform.python_version(), '| cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))" \
    || echo "warning: torch does not import"
  case "$PART" in
    tests) part_tests ;;
    speed) part_speed ;;
    repro) part_repro ;;
    all) part_tests; part_speed; part_repro ;;
  esac
  local i failed=0
  banner "summary"
  for i in "${!NAMES[@]}"; do
    printf '%-6s %s\n' "${NAMES[$i]}" "${STATUSES[$i]}"
    [ -n "${DIGESTS[$i]}" ] && printf '%s\n' "${DIGESTS[$i]}" | sed 's/^/       /'
    case "${STATUSES[$i]}" in passed*) ;; *) failed=1 ;; esac
  done
  echo "files: $(cd "$OUT" && ls | tr '\n' ' ')"
  echo "overall: $([ "$failed" = 0 ] && echo PASSED || echo FAILED) in $((SECONDS - START)) s"
  return "$failed"
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
