#!/usr/bin/env bash
# Builds the CUDA binaries on a machine that has no GPU and no CUDA toolkit (this is how the CUDA
# build was verified: built on a CPU machine, run on a GPU machine that has no Rust toolchain).
#
#   scripts/cuda_cross_build.sh [WORK_DIR]     # default WORK_DIR: target/cuda-toolkit
#
# 1. nvcc 13.0 and the CUDA headers come from NVIDIA's wheels on PyPI (pip download, no install).
#    13.0 because PTX from a newer nvcc does not load on a driver that only knows CUDA 13.0 (580).
# 2. candle links cuda, cublas, cublasLt and curand dynamically; without the libraries here, tiny
#    stub libraries with the right sonames and every symbol cudarc declares stand in at link time.
#    The real libraries are found at run time on the GPU machine (set LD_LIBRARY_PATH there).
# 3. cargo builds with CUDA_COMPUTE_CAP (default 90: H100/H200) and a portable CPU target
#    (x86-64-v3) instead of this machine's `native`, into target/cuda/.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-target/cuda-toolkit}
CAP=${CUDA_COMPUTE_CAP:-90}
mkdir -p "$W/wheels" "$W/stubs"
W=$(cd "$W" && pwd)
if [ ! -x "$W/root/nvidia/cu13/bin/nvcc" ]; then
  for p in nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-crt nvidia-nvvm nvidia-cuda-cccl nvidia-cuda-nvrtc; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_28_x86_64 -d "$W/wheels" "$p==13.0.*"
  done
  for w in "$W"/wheels/*.whl; do python3 -m zipfile -e "$w" "$W/root"; done
  chmod +x "$W"/root/nvidia/cu13/bin/* "$W"/root/nvidia/cu13/nvvm/bin/*
fi
CU=$W/root/nvidia/cu13
cargo fetch --quiet
CUDARC=$(dirname "$(cargo metadata --features cuda --format-version 1 | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')")/src
stub() { # name soname bindings
  grep -oP '^\s+fn \K\w+(?=\()' "$CUDARC/$3" | sort -u | awk '{print "void "$1"(void){}"}' >"$W/stubs/$1.c"
  gcc -shared -fPIC -o "$W/stubs/lib$1.so" -Wl,-soname,"$2" "$W/stubs/$1.c"
}
stub cuda libcuda.so.1 driver/sys/mod.rs
stub cublas libcublas.so.13 cublas/sys/mod.rs
stub cublasLt libcublasLt.so.13 cublaslt/sys/mod.rs
stub curand libcurand.so.10 curand/sys/mod.rs
ln -sf "$CU/lib/libnvrtc.so.13" "$W/stubs/libnvrtc.so"
ln -sf "$CU/lib/libcudart.so.13" "$W/stubs/libcudart.so"
PATH=$CU/bin:$PATH CUDA_COMPUTE_CAP=$CAP CARGO_TARGET_DIR=target/cuda \
  RUSTFLAGS="-C target-cpu=x86-64-v3 -L native=$W/stubs" \
  cargo test --release --features cuda --no-run
echo "built target/cuda/release/collapse-lab and the test binaries in target/cuda/release/deps/"
echo "on the GPU machine: LD_LIBRARY_PATH=<dir of libcublas.so.13>:<dir of libcuda.so.1> and"
echo "  LAB=.../collapse-lab DEVICE_TESTS=.../deps/device-<hash> scripts/gpu_check.sh"
