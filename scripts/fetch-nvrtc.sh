#!/usr/bin/env bash
# NVRTC and the CUDA headers (runtime: cuda_fp16.h, cuda_bf16.h; crt: mma.h) from PyPI (no GPU, no CUDA toolkit needed), so
# the kernel sources can be compiled to PTX on any Linux x86-64 machine.
# Unpacks into target/nvrtc (kept between runs) and prints the two variables
# the tests read; use:  eval "$(scripts/fetch-nvrtc.sh)"
set -euo pipefail
cd "$(dirname "$0")/.."
dest=target/nvrtc
if [ ! -f "$dest/nvidia/cu13/lib/libnvrtc.so.13" ] || [ ! -f "$dest/nvidia/cu13/include/cuda_bf16.h" ] || [ ! -f "$dest/nvidia/cu13/include/crt/mma.h" ]; then
    rm -rf "$dest.tmp" && mkdir -p "$dest.tmp/wheels"
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        -d "$dest.tmp/wheels" 'nvidia-cuda-nvrtc==13.0.*' 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-crt==13.0.*' >&2
    for w in "$dest.tmp"/wheels/*.whl; do python3 -m zipfile -e "$w" "$dest.tmp" >&2; done
    rm -rf "$dest.tmp/wheels" "$dest" && mv "$dest.tmp" "$dest"
fi
echo "export RLHF_CUDA_LIB_DIRS=$PWD/$dest/nvidia/cu13/lib"
echo "export RLHF_CUDA_INCLUDE=$PWD/$dest/nvidia/cu13/include"
