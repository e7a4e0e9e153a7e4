#!/usr/bin/env bash
# PPO memory: `rlhf ppo` on one shared base against the same PPO work holding
# several model copies (PyTorch + transformers + PEFT). Peak RSS and wall time
# of each whole process, 3 interleaved rounds, medians.
#
#   bench/ppo_memory.sh PYTHON [OUT]     (needs target/release/rlhf, or RLHF=path)
#
# PYTHON has torch, transformers and peft (e.g. /work/venv-fixtures/bin/python).
# OUT (default bench/results/ppo-memory-cpu-<date>) gets .json and .md.
# The model is the medium benchmark shape of `rlhf bench` (src/bench.rs):
# hidden 512, intermediate 1376, 8 layers, 8 heads, 4 kv heads, vocab 8000, untied.
# Every process runs on one thread (RAYON_NUM_THREADS=1, torch.set_num_threads(1)).
# ROUNDS=N changes the 3 rounds; KEEP=1 keeps the work dir (logs, models).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:?usage: bench/ppo_memory.sh PYTHON [OUT]}
out=${2:-bench/results/ppo-memory-cpu-$(date -u +%Y-%m-%d)}
rlhf=${RLHF:-${CARGO_TARGET_DIR:-target}/release/rlhf}
rounds=${ROUNDS:-3}
[ -x "$rlhf" ] || { echo "no release binary at $rlhf (cargo build --release --bin rlhf)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (GNU time) for the peak RSS" >&2; exit 1; }
d=$(mktemp -d)
trap '[ -n "${KEEP:-}" ] || rm -rf "$d"' EXIT
export RAYON_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# Inputs: corpus, preference pairs, prompts; a random medium model with a
# tokenizer trained on the corpus; an RM adapter on it (one step: its weights do
# not matter here, its shapes do); a byte copy of the base for the RM's own copy.
"$py" bench/ppo_memory_torch.py data "$d"
"$rlhf" init-model --corpus "$d/corpus.txt" --output_dir "$d/base" --vocab_size 8000 \
    --hidden_size 512 --intermediate_size 1376 --num_hidden_layers 8 \
    --num_attention_heads 8 --num_key_value_heads 4 --max_position_embeddings 512 > /dev/null
"$rlhf" rm --model_name_or_path "$d/base" --train_file_dir "$d/pairs" --template_name vicuna \
    --validation_split_percentage 0 --output_dir "$d/rm" --per_device_train_batch_size 4 \
    --max_steps 1 --save_steps 1000 > /dev/null
cp -r "$d/base" "$d/base_copy"
mkdir -p "$d/times"

# 2 iterations of 8 rollouts of 64 new tokens, 2 PPO epochs of mini-batches of 4.
ppo=("$rlhf" ppo --model_name_or_path "$d/base" --reward_model_name_or_path "$d/rm"
    --train_file_dir "$d/prompts" --validation_split_percentage 0 --template_name vicuna
    --batch_size 8 --mini_batch_size 4 --ppo_epochs 2 --max_target_length 64 --max_steps 16
    --save_steps 1000 --seed 0)
measure() { # ROUND NAME COMMAND...: /usr/bin/time's "wall_s peak_KB" into times/ROUND-NAME.txt
    local round=$1 name=$2; shift 2
    nice -n 10 /usr/bin/time -f "%e %M" -o "$d/times/$round-$name.txt" "$@" > "$d/$round-$name.log" 2>&1 \
        || { echo "$name failed (round $round):" >&2; tail -20 "$d/$round-$name.log" >&2; exit 1; }
    echo "round $round $name: $(cat "$d/times/$round-$name.txt") (s, KB)" >&2
}

for round in $(seq 1 "$rounds"); do
    rm -rf "$d/ppo_shared" "$d/ppo_copy"
    measure "$round" rlhf-shared "${ppo[@]}" --output_dir "$d/ppo_shared"
    grep -q "policy's base (shared weights)" "$d/$round-rlhf-shared.log" \
        || { echo "rlhf ppo did not share the base:" >&2; tail -5 "$d/$round-rlhf-shared.log" >&2; exit 1; }
    measure "$round" torch-four-copies "$py" bench/ppo_memory_torch.py run "$d" four-copies
    measure "$round" rlhf-rm-copy "${ppo[@]}" --output_dir "$d/ppo_copy" \
        --reward_base_model_name_or_path "$d/base_copy"
    grep -q "adapter on its own copy" "$d/$round-rlhf-rm-copy.log" \
        || { echo "rlhf ppo did not load the RM's own copy:" >&2; tail -5 "$d/$round-rlhf-rm-copy.log" >&2; exit 1; }
    # The same shared run with no-grad forwards of 4 rollouts instead of 8 (see BENCHMARKS.md).
    rm -rf "$d/ppo_shared"
    measure "$round" rlhf-shared-fb4 "${ppo[@]}" --output_dir "$d/ppo_shared" --forward_batch_size 4
    measure "$round" torch-ppov2-lora "$py" bench/ppo_memory_torch.py run "$d" ppov2-lora
    measure "$round" torch-classic-peft "$py" bench/ppo_memory_torch.py run "$d" classic-peft
    measure "$round" torch-floor "$py" bench/ppo_memory_torch.py run "$d" floor
done
mkdir -p "$(dirname "$out")"
"$py" bench/ppo_memory_torch.py report "$d" "$out"
