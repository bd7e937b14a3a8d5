#!/usr/bin/env bash
# Builds `disagg-hw` with feature `cuda` on a machine without a CUDA installation or GPU, and
# packs what a GPU machine needs to run it (the device runs have no Rust toolchain):
#
#   1. the CUDA 13.0 toolkit from PyPI (nvcc, runtime, cuBLAS, cuRAND, NVRTC, CCCL, NVVM),
#      installed with `pip install --target` under the cache directory, with unversioned
#      `.so` links so that the linker finds them;
#   2. a link-time stub of the driver library, `libcuda.so` (soname `libcuda.so.1`): one empty
#      function per `cu*` name that `cuda.h` declares; at run time the GPU machine's driver is
#      loaded instead;
#   3. `cargo build --release -p hw --features cuda` (kernels for compute capability 9.0, H100
#      and H200), in its own target directory so a second run reuses everything;
#   4. the stripped binary, gzipped (the device run carries at most 64 MiB), in
#      `.devpack/disagg-hw.gz`: carry `.devpack` and `gunzip -c` it there.
#
# Usage: hw/gpu/build-cuda.sh            (cache: target/cuda, or $DISAGG_CUDA_CACHE)
# Checkouts may share one cache (its paths are in every fingerprint, so a cache of its own means
# a full rebuild): builds into it take turns, each packing the binary it built.
# On the GPU machine: LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${DISAGG_CUDA_CACHE:-$ROOT/target/cuda}
TOOLKIT=$CACHE/toolkit
STUB=$CACHE/stub
PACKAGES=(
    "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cublas==13.0.*"
    "nvidia-curand==10.4.0.*" "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-crt==13.0.*"
    "nvidia-cuda-cccl==13.0.*" "nvidia-nvvm==13.0.*"
)

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

if [ ! -e "$TOOLKIT/.complete" ]; then
    echo "== CUDA 13.0 toolkit from PyPI into $TOOLKIT"
    rm -rf "$TOOLKIT"
    python3 -m pip install --quiet --no-deps --target "$TOOLKIT" "${PACKAGES[@]}"
    touch "$TOOLKIT/.complete"
fi
NVCC=$(find "$TOOLKIT" -path '*/bin/nvcc' -type f | head -1)
[ -n "$NVCC" ] || { echo "error: no bin/nvcc under $TOOLKIT" >&2; exit 1; }
CUDA_ROOT=$(dirname "$(dirname "$NVCC")")
chmod +x "$CUDA_ROOT"/bin/* "$CUDA_ROOT"/nvvm/bin/* 2>/dev/null || true
# The wheels ship libfoo.so.N only; the linker looks for libfoo.so.
for lib in "$CUDA_ROOT"/lib/lib*.so.*; do
    base=${lib%%.so.*}.so
    [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
done

if [ ! -e "$STUB/libcuda.so" ]; then
    echo "== link-time stub of libcuda.so"
    mkdir -p "$STUB"
    gcc -E -I"$CUDA_ROOT/include" "$CUDA_ROOT/include/cuda.h" |
        grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t' | sort -u |
        sed 's/.*/void &(void) {}/' >"$STUB/stub.c"
    gcc -shared -fPIC -o "$STUB/libcuda.so" -Wl,-soname,libcuda.so.1 "$STUB/stub.c"
fi

echo "== cargo build --release -p hw --features cuda (nvcc: $NVCC)"
export CUDA_ROOT CUDA_PATH=$CUDA_ROOT CUDA_COMPUTE_CAP=90
export PATH=$CUDA_ROOT/bin:$PATH
export RUSTFLAGS="-L $STUB -L $CUDA_ROOT/lib"
export CARGO_TARGET_DIR=$CACHE/target
cargo build --release --locked -p hw --features cuda --bin disagg-hw

mkdir -p "$ROOT/.devpack"
strip -o "$ROOT/.devpack/disagg-hw" "$CARGO_TARGET_DIR/release/disagg-hw"
gzip -9 -f "$ROOT/.devpack/disagg-hw"
ls -l "$ROOT/.devpack/disagg-hw.gz"
