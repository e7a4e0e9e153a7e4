#!/usr/bin/env bash
# Build `rlhf` in release mode, then run the interleaved rlhf-vs-PyTorch CPU
# training benchmark (bench/run.py; its flags pass through).
#
#   PYTHON=/path/to/python-with-torch-transformers-peft bench/run.sh [--rounds N] [--cases tiny:lora,...]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
exec "${PYTHON:-python3}" bench/run.py "$@"
