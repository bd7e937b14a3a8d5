#!/usr/bin/env bash
# Runs the GPU validation cases on a device machine, from the repository root, with the
# binaries carried in `.devpack/` (disagg-hw.gz from hw/gpu/build-cuda.sh, disagg-validate.gz
# from validation/gpu/pack.sh):
#
#   1. with --calibrate, `disagg-hw calibrate --device cuda:0 --model tinyllama-1.1b --dtype
#      bf16` writes configs/calibration/tinyllama-1.1b-bf16-TAG.toml (and .csv);
#   2. `disagg-validate run --profile configs/calibration/tinyllama-1.1b-bf16-TAG.toml` on the
#      cases (default validation/cases/gpu/*.toml) into validation/results/gpu-TAG/: the
#      cases price steps with the profile of this GPU kind (just measured, with --calibrate).
#
# It writes under $OUT (the device tool's output folder; default ./gpu-out): calibration/
# (profile, samples, log), gpu-TAG.tar.gz (gpu-TAG/: reports, CSVs, figures, derived files,
# serve logs, summary.csv; packed, as the device tool brings back only a few files),
# validate.log and nvidia-smi.txt.
#
# Usage: validation/gpu/run-cases.sh [--calibrate] [--tag TAG] [CASE.toml ...]
#   TAG (default h100) names the GPU kind: the profile's file and the results directory.
set -euo pipefail
calibrate=false
tag=h100
cases=()
while [ $# -gt 0 ]; do
    case $1 in
        --calibrate) calibrate=true ;;
        --tag) tag=${2:?--tag needs a value}; shift ;;
        -*) echo "error: unknown option $1" >&2; exit 2 ;;
        *) cases+=("$1") ;;
    esac
    shift
done
[ ${#cases[@]} -gt 0 ] || cases=(validation/cases/gpu/*.toml)
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"

BIN=/tmp/disagg-bin
mkdir -p "$BIN"
for exe in disagg-hw disagg-validate; do
    [ -e ".devpack/$exe.gz" ] || { echo "error: no .devpack/$exe.gz (carry .devpack)" >&2; exit 2; }
    gunzip -c ".devpack/$exe.gz" >"$BIN/$exe"
    chmod +x "$BIN/$exe"
done
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true

profile=configs/calibration/tinyllama-1.1b-bf16-$tag.toml
if $calibrate; then
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null || echo "GPU 0")
    cpu=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
    mkdir -p "$OUT/calibration"
    "$BIN/disagg-hw" calibrate --device cuda:0 --model tinyllama-1.1b --dtype bf16 \
        --out "$profile" --machine "$gpu (cuda:0), host $cpu, $(nproc) cores" \
        2>&1 | tee "$OUT/calibration/calibrate.log"
    cp "$profile" "${profile%.toml}.csv" "$OUT/calibration/"
fi

# The results land in $OUT as each case ends (a run cut short keeps the cases it finished),
# while the reports name the directory they are committed in.
results=validation/results/gpu-$tag
mkdir -p "$OUT/gpu-$tag"
rm -rf "$results"
ln -s "$OUT/gpu-$tag" "$results"
"$BIN/disagg-validate" run "${cases[@]}" --hw-bin "$BIN/disagg-hw" --machine "gpu-$tag" \
    --profile "$profile" --out "$results" 2>&1 | tee "$OUT/validate.log" || status=$?
tar -czf "$OUT/gpu-$tag.tar.gz" -C "$OUT" "gpu-$tag" && rm -rf "${OUT:?}/gpu-$tag"
exit "${status:-0}"
