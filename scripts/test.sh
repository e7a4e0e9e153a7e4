#!/usr/bin/env bash
# The test suite, as CI runs it: NVRTC and the CUDA headers come from PyPI
# (no GPU or CUDA toolkit needed) so that every kernel source is compiled to
# PTX for sm_80 and sm_90 on every run, and the CUDA backend runs on the CPU
# emulator of its kernels (scripts/gpu-check.sh runs the same suite on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
if nvrtc_env=$(scripts/fetch-nvrtc.sh); then
    eval "$nvrtc_env"
    export RLHF_REQUIRE_NVRTC=1
else
    echo "WARNING: NVRTC could not be fetched from PyPI; the kernel PTX test will be skipped" >&2
fi
cargo test --workspace --locked "$@"
