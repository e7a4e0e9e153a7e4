#!/usr/bin/env bash
# PPO with a separate rollout worker: what crosses between trainer and rollout
# worker per iteration, and what the split costs in wall time, against one
# worker doing both. The medium shape of `rlhf bench` (as bench/ppo_memory.sh).
#
#   bench/ppo_split.sh [OUT]     (needs target/release/rlhf, or RLHF=path; python3)
#
# Two pipelines of one ppo stage, the same work (4 iterations of 8 rollouts ×
# 64 new tokens, 2 epochs of mini-batches of 4):
#   split:  2 workers, rollout_workers = 1 (1 trainer + 1 rollout worker)
#   single: 1 worker sampling and training
# Their adapters must come out bitwise equal. OUT (default
# bench/results/ppo-split-cpu-<date>.md) gets the figures; ROUNDS=N (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/ppo-split-cpu-$(date -u +%Y-%m-%d).md}
rlhf=$(realpath "${RLHF:-${CARGO_TARGET_DIR:-target}/release/rlhf}")
rounds=${ROUNDS:-3}
[ -x "$rlhf" ] || { echo "no release binary at $rlhf (cargo build --release --bin rlhf)" >&2; exit 1; }
d=$(mktemp -d)
trap '[ -n "${KEEP:-}" ] || rm -rf "$d"' EXIT
export RAYON_NUM_THREADS=1

python3 bench/ppo_memory_torch.py data "$d"
"$rlhf" init-model --corpus "$d/corpus.txt" --output_dir "$d/base" --vocab_size 8000 \
    --hidden_size 512 --intermediate_size 1376 --num_hidden_layers 8 \
    --num_attention_heads 8 --num_key_value_heads 4 --max_position_embeddings 512 > /dev/null
"$rlhf" rm --model_name_or_path "$d/base" --train_file_dir "$d/pairs" --template_name vicuna \
    --validation_split_percentage 0 --output_dir "$d/rm" --per_device_train_batch_size 4 \
    --max_steps 1 --save_steps 1000 > /dev/null

pipeline() { # NAME WORKERS EXTRA
    cat > "$d/$1.toml" <<EOF
[cluster]
workers = $2
state_dir = "$d/$1/.coordinator"

[[stage]]
name = "ppo"
kind = "ppo"
model_name_or_path = "$d/base"
reward_model_name_or_path = "$d/rm"
train_file_dir = "$d/prompts"
validation_split_percentage = 0
template_name = "vicuna"
output_dir = "$d/$1/ppo"
batch_size = 8
mini_batch_size = 4
ppo_epochs = 2
max_target_length = 64
max_steps = 32
save_steps = 1000
seed = 0
$3
EOF
}
pipeline split 2 "rollout_workers = 1"
pipeline single 1 ""

for round in $(seq 1 "$rounds"); do
    for run in split single; do
        rm -rf "${d:?}/$run"
        start=$(date +%s.%N)
        (cd "$d" && "$rlhf" run "$d/$run.toml" > "$d/$run.log" 2>&1) \
            || { echo "$run failed:" >&2; tail -20 "$d/$run.log" >&2; exit 1; }
        end=$(date +%s.%N)
        echo "$run $(echo "$end - $start" | bc)" >> "$d/walls.txt"
        echo "round $round $run: $(echo "$end - $start" | bc) s" >&2
    done
    cmp "$d/split/ppo/adapter_model.safetensors" "$d/single/ppo/adapter_model.safetensors" \
        || { echo "the split run's adapter differs from the single worker's" >&2; exit 1; }
done

python3 - "$d" "$out" "$rounds" <<'PY'
import json, statistics, sys
d, out, rounds = sys.argv[1], sys.argv[2], sys.argv[3]
walls = {}
for line in open(f"{d}/walls.txt"):
    k, v = line.split()
    walls.setdefault(k, []).append(float(v))
r = json.load(open(f"{d}/split/ppo/all_results.json"))["split"]
m = [json.loads(l) for l in open(f"{d}/split/ppo/metrics.jsonl")]
s = [json.loads(l) for l in open(f"{d}/single/ppo/metrics.jsonl")]
med = statistics.median
policy = r["policy_bytes_per_sync"]
base = r["base_values_not_shipped"] * 4
lines = [
    "# PPO with a separate rollout worker (CPU, medium shape)",
    "",
    "`bench/ppo_split.sh`: 4 iterations of 8 rollouts × 64 new tokens, 2 epochs of mini-batches of 4;",
    f"split = 1 trainer + 1 rollout worker, single = 1 worker doing both; {rounds} rounds, medians.",
    "The two runs' adapters are bitwise equal (checked every round).",
    "",
    "| | value |",
    "|---|---|",
    f"| policy shipped per sync (LoRA r 8 all linears + value head, f32) | {policy:,} B ({policy / 2**20:.2f} MiB) |",
    f"| base not shipped (f32) | {base:,} B ({base / 2**20:.1f} MiB), {base / policy:.0f}× the policy |",
    f"| `sync/policy_bytes` per iteration (metrics.jsonl) | {sorted(set(x['sync/policy_bytes'] for x in m))} |",
    f"| pipeline wall, split | {med(walls['split']):.1f} s |",
    f"| pipeline wall, single | {med(walls['single']):.1f} s |",
    f"| trainer wait for rollouts per iteration, split (median) | {med(x['time/rollout_s'] for x in m):.2f} s |",
    f"| sampling + scoring per iteration, single (median) | {med(x['time/rollout_s'] for x in s):.2f} s |",
    f"| update per iteration, split / single (median) | {med(x['time/update_s'] for x in m):.2f} / {med(x['time/update_s'] for x in s):.2f} s |",
]
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
