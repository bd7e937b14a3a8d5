#!/usr/bin/env bash
# Runs on a GPU machine (the device tool) from a folder holding `.devpack` (built by
# hw/gpu/build-cuda.sh): the repository root, or a carried copy of this script and `.devpack`
# where the tool sends another checkout. Runs the CUDA build's `check-gpu`, then
# `bench-transfer` for both GPU transports, between cuda:0 and cuda:1 where there are two
# GPUs, else within cuda:0. Writes under $OUT: run.log (the machine, every command and its
# output), check-gpu.md and one CSV per benchmark. STEPS (default check,p2p,staged,tcp) picks
# what runs.
set -uo pipefail
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
STEPS=${STEPS:-check,p2p,staged,tcp}
BIN=/tmp/disagg-hw
gunzip -c .devpack/disagg-hw.gz >"$BIN" && chmod +x "$BIN" || exit 1
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64
LOG=$OUT/run.log
{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
    nvidia-smi topo -m
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) x $(nproc)"
} >>"$LOG" 2>&1
GPUS=$(nvidia-smi -L | wc -l)
DST=cuda:0
[ "$GPUS" -ge 2 ] && DST=cuda:1
status=0
step() { # NAME COMMAND...: runs one step, logging the command and its output
    local name=$1
    shift
    case ",$STEPS," in *",$name,"*) ;; *) return ;; esac
    echo -e "\n\$ disagg-hw ${*:2}" >>"$LOG"
    local started=$SECONDS
    "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "[$name: exit $rc after $((SECONDS - started)) s]" >>"$LOG"
    [ $rc -eq 0 ] || status=1
}
step check "$BIN" check-gpu --device cuda:0 --out "$OUT/check-gpu.md"
step p2p "$BIN" bench-transfer --transport cuda-p2p --src cuda:0 --dst "$DST" --out "$OUT/bench-cuda-p2p.csv"
step staged "$BIN" bench-transfer --transport cuda-p2p --staged --src cuda:0 --dst "$DST" --out "$OUT/bench-cuda-p2p-staged.csv"
step tcp "$BIN" bench-transfer --transport tcp --src cuda:0 --dst "$DST" --out "$OUT/bench-tcp.csv"
cat "$LOG"
exit $status
