#!/usr/bin/env bash
# rlhf merge vs PEFT merge_and_unload + save_pretrained on the same ~160M bf16
# Llama with an r=16 all-linear adapter: wall time and peak RSS, interleaved,
# 3 rounds each. Usage: bench/merge.sh [PYTHON]   (needs a release build)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
"$py" bench/merge_peft.py make "$d" >&2
for round in 1 2 3; do
    rm -rf "$d/out" "$d/peft-merged"
    /usr/bin/time -f "round $round rlhf: %e s, peak RSS %M KB" target/release/rlhf merge \
        --model_name_or_path "$d/base" --peft_path "$d/adapter" --output_dir "$d/out" > /dev/null
    /usr/bin/time -f "round $round peft: %e s, peak RSS %M KB" "$py" bench/merge_peft.py merge "$d" > /dev/null
done
