#!/usr/bin/env bash
# Distributed figures for BENCHMARKS.md, on this machine, with the release binary:
#  1. tokens/s of the "medium" model (hidden 512, 8 layers, seq 256, LoRA and full)
#     trained by `rlhf run` with 1 and with 2 worker processes, same global batch;
#  2. time from kill -9 of a worker to training resumed on the survivor
#     (default heartbeat timeout 10 s, and 2 s).
# usage: bench/distributed.sh [ROUNDS] > results.md   (needs python3 for the log arithmetic)
set -euo pipefail
ROUNDS=${1:-3}
cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN=$PWD/target/release/rlhf
W=$(mktemp -d /tmp/rlhf-dist-bench.XXXXXX)
trap 'pkill -P $$ 2>/dev/null || true; rm -rf "$W"' EXIT
cd "$W"

# Data and the medium model (vocab from a BPE trained on the demo corpus).
"$BIN" demo --output_dir assets --num_train_epochs 0.01 --train_docs 3000 >/dev/null 2>&1 || true
"$BIN" init-model --corpus assets/data/train/corpus.txt --output_dir medium --vocab_size 8000 \
  --hidden_size 512 --intermediate_size 1376 --num_hidden_layers 8 --num_attention_heads 8 \
  --num_key_value_heads 4 --max_position_embeddings 256 >/dev/null 2>&1

pipeline() { # name workers use_peft steps save_steps heartbeat_timeout_ms
  cat > "$1.toml" <<EOF
[cluster]
workers = $2
heartbeat_interval_ms = 500
heartbeat_timeout_ms = $6
state_dir = "$1/.coordinator"

[[stage]]
name = "pt"
kind = "pt"
model_name_or_path = "medium"
train_file_dir = "assets/data/train"
output_dir = "$1/pt"
block_size = 256
per_device_train_batch_size = 4
per_device_eval_batch_size = 4
validation_split_percentage = 0
max_steps = $4
learning_rate = 1e-3
logging_steps = 1
save_steps = $5
use_peft = $3
EOF
}

echo "# Distributed training on this machine ($(nproc) vCPU), $(date -u +%F)"
echo
echo "Medium model (hidden 512, 8 layers, seq 256), per-device batch 4, global batch 8"
echo "(pipeline workers = 2), 12 optimizer steps; tokens/s from all_results.json"
echo "(all tokens of the run / wall time of the training loop). Median of $ROUNDS."
echo
echo "| mode | worker processes | tokens/s (median) | all rounds |"
echo "|---|---|---|---|"
for mode in true false; do
  for n in 1 2; do
    runs=()
    for r in $(seq "$ROUNDS"); do
      name="tp-$mode-$n-$r"
      pipeline "$name" 2 "$mode" 12 1000 10000
      "$BIN" run "$name.toml" --workers "$n" >/dev/null 2>"$name.log"
      runs+=("$(python3 -c "import json;print(round(json.load(open('$name/pt/all_results.json'))['train_tokens_per_second']))")")
    done
    med=$(printf '%s\n' "${runs[@]}" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}')
    label=$([ "$mode" = true ] && echo LoRA || echo full)
    echo "| $label | $n | $med | ${runs[*]} |"
  done
done

echo
echo "Time from kill -9 of a worker (rank 1 of 2) to the survivor's first step"
echo "after the rollback (coordinator and workers as separate processes, LoRA):"
echo
echo "| heartbeat timeout | stage stopped after | training resumed (first new step) after |"
echo "|---|---|---|"
for hb in 10000 2000; do
  name="kill-$hb"
  pipeline "$name" 2 true 400 2 "$hb"
  port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
  echo "0123456789abcdef0123456789abcdef" > token
  "$BIN" coordinator --config "$name.toml" --listen "127.0.0.1:$port" --token-file token >"$name-coord.log" 2>&1 &
  "$BIN" worker --coordinator "http://127.0.0.1:$port" --token-file token >"$name-w0.log" 2>&1 &
  sleep 1
  "$BIN" worker --coordinator "http://127.0.0.1:$port" --token-file token >"$name-w1.log" 2>&1 &
  w1=$!
  until grep -q "checkpoint committed" "$name-coord.log"; do sleep 0.1; done
  kill -9 "$w1"
  killed=$(date +%s.%N)
  until grep -q "resumed" "$name-w0.log" && grep -q "train step" <(sed -n '/resumed/,$p' "$name-w0.log"); do sleep 0.05; done
  python3 - "$killed" "$name" <<'EOF'
import sys, re, datetime
killed, name = float(sys.argv[1]), sys.argv[2]
def ts(line):
    t = re.match(r"(\S+Z)", line).group(1)
    return datetime.datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
coord = open(f"{name}-coord.log").read().splitlines()
w0 = open(f"{name}-w0.log").read().splitlines()
dead = next(ts(l) for l in coord if "declared dead" in l or "generation aborted" in l)
i = next(i for i, l in enumerate(w0) if "resumed" in l)
step = next(ts(l) for l in w0[i:] if "train step" in l)
hb = name.split("-")[1]
print(f"| {int(hb)/1000:.0f} s | {dead - killed:.2f} s | {step - killed:.2f} s |")
EOF
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
done
