#!/usr/bin/env bash
# Speed against the peer and the limits, in one run on one GPU: HF transformers (eager, the
# PyTorch of the machine; hw/bench/torch_bench.py) and `disagg-hw bench-model` on the same
# shapes, bench-model measuring the device's copy bandwidth and matmul rate in the same process.
# Then one table joins both beside the limits and the goals of issue 6 are checked against the
# numbers. Run from the repository root:
#
#   DISAGG_HW=/tmp/disagg-hw OUT=results hw/gpu/bench-speed.sh
#
# Writes under $OUT: env.txt (machine, versions), hf.csv + hf.log + hf.status, ours.csv +
# ours.log + ours.status (exit code and seconds), and bench-speed.md (device, versions,
# commands, the joined table, the goals met or not).
# Settings (environment): MODEL (tinyllama-1.1b), PROMPT_LENS (128,512,1024,2048), BATCH_SIZES
# (1,8,32,64), CONTEXT (256), STEPS (32 decode steps per timed region), REPEATS (3, the fastest
# counts), TORCH_DEVICE (cuda) and DEVICE (cuda:0), DTYPE (bf16), STAGE_TIMEOUT_S (210: each
# benchmark is stopped after this, so the whole run stays under 8 minutes and the report is
# written from what was measured), STAGES (env,hf,ours,report: which stages run; `report`
# alone rejoins the CSVs already in $OUT).
set -uo pipefail
: "${OUT:?set OUT to the folder for the results}"
STAGES=${STAGES:-env,hf,ours,report}
MODEL=${MODEL:-tinyllama-1.1b}
PROMPT_LENS=${PROMPT_LENS:-128,512,1024,2048}
BATCH_SIZES=${BATCH_SIZES:-1,8,32,64}
CONTEXT=${CONTEXT:-256}
STEPS=${STEPS:-32}
REPEATS=${REPEATS:-3}
TORCH_DEVICE=${TORCH_DEVICE:-cuda}
DEVICE=${DEVICE:-cuda:0}
DTYPE=${DTYPE:-bf16}
STAGE_TIMEOUT_S=${STAGE_TIMEOUT_S:-210}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT"

HF_CMD=(python3 "$ROOT/hw/bench/torch_bench.py" --model "$MODEL" --device "$TORCH_DEVICE"
    --dtype "$DTYPE" --prompt-lens "$PROMPT_LENS" --batch-sizes "$BATCH_SIZES"
    --context "$CONTEXT" --steps "$STEPS" --repeats "$REPEATS" --csv "$OUT/hf.csv")
OURS_CMD=("${DISAGG_HW:-disagg-hw}" bench-model --device "$DEVICE" --model "$MODEL" --random
    --dtype "$DTYPE" --prompt-lens "$PROMPT_LENS" --batch-sizes "$BATCH_SIZES"
    --context "$CONTEXT" --steps "$STEPS" --repeats "$REPEATS" --csv "$OUT/ours.csv")

wants() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
status=0
run_stage() { # NAME COMMAND...: runs one benchmark, its output to $OUT/NAME.log
    local name=$1
    shift
    wants "$name" || return 0
    echo "== $name: $*"
    local started=$SECONDS
    timeout "$STAGE_TIMEOUT_S" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local note="$name: exit $rc after $((SECONDS - started)) s"
    [ $rc -eq 124 ] && note="$note (stopped at STAGE_TIMEOUT_S=$STAGE_TIMEOUT_S)"
    echo "   $note"
    echo "$note" >"$OUT/$name.status"
    [ $rc -eq 0 ] || { status=1; tail -5 "$OUT/$name.log"; }
}

if wants env; then
    {
        echo "date: $(date -u +'%Y-%m-%d %H:%M UTC')"
        echo "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader -i 0 2>/dev/null || echo none)"
        echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//') x $(nproc)"
        echo "python: $(python3 -c 'import sys; print(sys.version.split()[0])' 2>&1)"
        echo "torch: $(python3 -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null || echo none)"
        echo "transformers: $(python3 -c 'import transformers; print(transformers.__version__)' 2>/dev/null || echo none)"
        echo "disagg-hw: $("${OURS_CMD[0]}" --version 2>&1)"
    } >"$OUT/env.txt"
    cat "$OUT/env.txt"
fi
run_stage hf "${HF_CMD[@]}"
run_stage ours "${OURS_CMD[@]}"

if wants report; then
    HF_CMD_TEXT="${HF_CMD[*]}" OURS_CMD_TEXT="${OURS_CMD[*]}" python3 - "$OUT" <<'PY' || status=1
import csv, os, sys

out = sys.argv[1]


def read_csv(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {(r["phase"], int(r["size"])): r for r in csv.DictReader(f)}


def read_lines(name):
    path = os.path.join(out, name)
    return open(path).read().splitlines() if os.path.exists(path) else []


hf, ours = read_csv("hf.csv"), read_csv("ours.csv")
env = read_lines("env.txt")
hf_log, ours_log = read_lines("hf.log"), read_lines("ours.log")
stages = read_lines("hf.status") + read_lines("ours.status")
ours_rates = [l for l in ours_log if l.startswith(("copy:", "matmul:"))]


def num(row, key):
    return float(row[key]) if row and row.get(key) not in (None, "") else None


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def ratio(a, b):
    return a / b if a is not None and b else None


lines = ["# Speed against HF transformers and the device's limits", ""]
lines += ["Machine and versions:", "", "```"] + env + ["```", ""]
lines += ["Commands (one run, one after the other, on the same GPU):", "", "```",
          os.environ.get("HF_CMD_TEXT", ""), os.environ.get("OURS_CMD_TEXT", ""), "```", ""]
lines += ["Stages:", "", "```"] + stages + ["```", ""]
describe = lambda log: [l for l in log if "(random weights" in l][:1] or log[:1]
lines += ["As each describes itself:", "", "```"] + describe(hf_log) + describe(ours_log)
lines += ours_rates
lines += ["```", ""]
lines += [
    "Limits: a step moves at least its weights (and the KV it reads or writes) at the copy's",
    "bandwidth, counted as bytes read + written per second, and does at least its FLOPs",
    "(`ModelSpec::prefill_flops` / `decode_flops`: linear layers, attention, the last",
    "position's output projection) at the matmul's rate; the limit is the larger of the two.",
    "Decode rows are per step, averaged over the timed steps. Fraction of limit = limit s /",
    "ours s.", ""]
lines += ["| phase | shape | HF tokens/s | ours tokens/s | ours/HF | limit s | bound | ours s "
          "| fraction of limit |", "|---|---|---|---|---|---|---|---|---|"]
keys = sorted(set(hf) | set(ours), key=lambda k: (k[0] != "prefill", k[1]))
for phase, size in keys:
    h, o = hf.get((phase, size)), ours.get((phase, size))
    h_rate, o_rate = num(h, "tokens_per_s"), num(o, "tokens_per_s")
    shape = f"{size} tokens" if phase == "prefill" else f"batch {size}"
    lines.append(
        f"| {phase} | {shape} | {fmt(h_rate, ',.1f')} | {fmt(o_rate, ',.1f')} "
        f"| {fmt(ratio(o_rate, h_rate), '.2f')} | {fmt(num(o, 'limit_s'), '.6f')} "
        f"| {o['bound'] if o else '-'} | {fmt(num(o, 'step_s'), '.6f')} "
        f"| {fmt(num(o, 'fraction_of_limit'), '.3f')} |")


def goal(text, value, target, unit):
    if value is None:
        return f"- {text}: not measured"
    verdict = "met" if value >= target else "not met"
    return f"- {text}: {value:.3g}{unit} against >= {target:g}{unit}: **{verdict}**"


d1, d32, p2048 = ours.get(("decode", 1)), ours.get(("decode", 32)), ours.get(("prefill", 2048))
lines += ["", "Goals (issue 6), computed from the rows above:", "",
          goal("batch-1 decode, memory roofline (memory limit s / ours s)",
               ratio(num(d1, "memory_s"), num(d1, "step_s")), 0.5, ""),
          goal("batch-1 decode tokens/s, ours / HF eager",
               ratio(num(d1, "tokens_per_s"), num(hf.get(("decode", 1)), "tokens_per_s")),
               3, "x"),
          goal("batch-32 decode tokens/s, ours / HF eager",
               ratio(num(d32, "tokens_per_s"), num(hf.get(("decode", 32)), "tokens_per_s")),
               5, "x"),
          goal("2048-token prefill, achieved FLOP/s / measured matmul rate",
               ratio(num(p2048, "compute_s"), num(p2048, "step_s")), 0.4, "")]
with open(os.path.join(out, "bench-speed.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
fi
exit $status
