#!/usr/bin/env bash
# Packs the CPU-built `disagg-validate` for a device run (the GPU machines have no Rust
# toolchain): built --release, stripped and gzipped into `.devpack/disagg-validate.gz`, beside
# the `.devpack/disagg-hw.gz` that hw/gpu/build-cuda.sh packs. Carry `.devpack`; run-cases.sh
# beside this script unpacks both there. (disagg-validate drives the cluster and runs the
# simulator on the CPU, so it needs no CUDA build.)
#
# Usage: validation/gpu/pack.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
cargo build --release --locked -p validation --bin disagg-validate
mkdir -p .devpack
strip -o .devpack/disagg-validate target/release/disagg-validate
gzip -9 -f .devpack/disagg-validate
ls -l .devpack/disagg-validate.gz
