#!/usr/bin/env bash
# The CUDA backend's check on one H100/H200, offline, in under 8 minutes:
#   (a) every CUDA op against the CPU op on fresh random inputs — the suite CI runs on
#       the emulator (kernels/tests/cuda_backend.rs), here on the GPU
#       (bf16 rel. err ≤ 1e-2, fp16 ≤ 5e-3, f32 ≤ 1e-5; outputs poisoned with NaN first);
#   (b) 20 training steps on CPU and on CUDA (f32, bf16) from the same weights: losses compared;
#   (c) ~1B Llama-shaped LoRA training (random weights, seq 2048, bf16): tokens/s and MFU,
#       the fused LoRA linear against the base GEMM alone, and PyTorch + PEFT's same step,
#       side by side in this run.
# Writes bench/results/gpu-check-<gpu>-<date>.{json,md} and prints the table last.
#
# Building: with a warm cargo registry it builds here (`cargo build --release
# --offline`). Device machines have no network, so a session prepares the
# binaries on its own machine first and carries them over:
#     scripts/gpu-check.sh --prepare      # → target/gpu-check-bin (carry this path)
#     scripts/gpu-check.sh                # on the GPU machine
# The prepared binaries need glibc ≥ 2.34 there (Ubuntu 22.04 or newer), CUDA 13
# libraries (/usr/local/cuda or PyTorch's pip wheels), and python3 with torch,
# transformers and peft for the side-by-side.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=target/gpu-check-bin

if [ "${1:-}" = "--prepare" ]; then
    set -e
    export CARGO_PROFILE_RELEASE_DEBUG=0
    cargo build --release --locked --bin rlhf
    # The op tests, as standalone binaries (cargo prints their paths).
    tests=$(cargo test --release --locked -p rlhf-kernels --test cuda_backend \
        --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"] + " " + m["executable"])')
    rm -rf "$bin" && mkdir -p "$bin"
    cp target/release/rlhf "$bin/"
    while read -r name path; do cp "$path" "$bin/$name"; done <<< "$tests"
    strip "$bin"/* 2>/dev/null || true
    du -sh "$bin"; ls "$bin"
    exit 0
fi

t_start=$(date +%s)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9-')
gpu=${gpu:-unknown-gpu}
day=$(date -u +%Y-%m-%d)
work=$(mktemp -d /tmp/gpu-check.XXXXXX)
mkdir -p bench/results
log="$work/log.txt"
echo "gpu-check on $gpu, work dir $work" | tee "$log"

if [ ! -x "$bin/rlhf" ]; then
    echo "building (offline)..." | tee -a "$log"
    if cargo build --release --offline --locked --bin rlhf >>"$log" 2>&1; then
        "$0" --prepare >>"$log" 2>&1 || { echo "preparing test binaries failed; see $log"; exit 1; }
    else
        echo "no prebuilt binaries in $bin and no offline build: run '$0 --prepare' where crates.io is reachable and carry $bin" | tee -a "$log"
        exit 1
    fi
fi
rlhf="$bin/rlhf"

# (a) ops ------------------------------------------------------------------
export RLHF_REQUIRE_GPU=1
ops_status=pass
for t in cuda_backend; do
    if [ -x "$bin/$t" ]; then
        echo "== $t" | tee -a "$log"
        if ! "$bin/$t" --test-threads=1 --nocapture >"$work/$t.txt" 2>&1; then ops_status=FAIL; fi
        grep -E "rel err|test result|FAILED|panicked" "$work/$t.txt" | tee -a "$log"
    else
        echo "== $t: binary missing" | tee -a "$log"; ops_status=FAIL
    fi
done

# (b) 20 steps, CPU vs CUDA ----------------------------------------------------
# Only the demo's model and corpus are used here (its own short PT may fail its check).
"$rlhf" demo --output_dir "$work/demo" --train_docs 400 --num_train_epochs 0.05 >>"$log" 2>&1 || true
common=(--model_name_or_path "$work/demo/base-model" --train_file_dir "$work/demo/data/train"
        --validation_file_dir "$work/demo/data/valid" --block_size 128 --per_device_train_batch_size 4
        --max_steps 20 --logging_steps 1 --save_steps 0 --learning_rate 1e-3 --seed 7
        --use_peft true --lora_rank 8 --lora_alpha 16 --lora_dropout 0.05)
steps_status=pass
for run in "cpu:" "cuda:" "cuda:--bf16"; do
    dev=${run%%:*}; flag=${run#*:}
    name="$dev${flag:+-bf16}"
    echo "== 20 steps on $name" | tee -a "$log"
    "$rlhf" pt "${common[@]}" --device "$dev" $flag --output_dir "$work/steps-$name" >>"$log" 2>&1 || steps_status=FAIL
done
python3 - "$work" >"$work/steps.json" <<'PY' || steps_status=FAIL
import json, sys
w = sys.argv[1]
def losses(name):
    out = {}
    for line in open(f"{w}/steps-{name}/metrics.jsonl"):
        r = json.loads(line)
        if "loss" in r and r.get("loss") is not None:
            out[r["step"]] = r["loss"]
    return out
cpu = losses("cpu")
res = {"cpu": cpu}
ok = True
for name, tol in (("cuda", 1e-3), ("cuda-bf16", 3e-2)):
    got = losses(name)
    rel = max(abs(got[s] - cpu[s]) / abs(cpu[s]) for s in cpu)
    res[name] = {"losses": got, "max_rel_diff": rel, "tol": tol, "pass": rel <= tol and len(got) == len(cpu) == 20}
    ok &= res[name]["pass"]
print(json.dumps(res))
sys.exit(0 if ok else 1)
PY

# (c) throughput ---------------------------------------------------------------
echo "== rlhf llama3.2-1b LoRA bf16" | tee -a "$log"
"$rlhf" bench --model llama1b --mode lora --device cuda --bf16 --steps 10 --warmup 3 --json \
    >"$work/rlhf-bench.json" 2>>"$log" || echo '{"error": "rlhf bench failed"}' >"$work/rlhf-bench.json"
"$rlhf" bench --model llama1b --mode lora --device cuda --bf16 --lora_linear --json \
    >"$work/lora-linear.json" 2>>"$log" || echo '{"error": "lora_linear failed"}' >"$work/lora-linear.json"
echo "== PyTorch + PEFT llama3.2-1b LoRA bf16" | tee -a "$log"
python3 bench/gpu_anchor_pytorch.py --plan llama3.2-1b:8 --steps 10 --warmup 3 \
    --out "$work/pytorch.json" >>"$log" 2>&1 || echo '{"error": "pytorch failed"}' >"$work/pytorch.json"

python3 - "$work" "$gpu" "$day" "$ops_status" "$steps_status" "$(( $(date +%s) - t_start ))" <<'PY'
import json, re, sys
w, gpu, day, ops_status, steps_status, secs = sys.argv[1:]
def load(p):
    try:
        return json.load(open(f"{w}/{p}"))
    except Exception as e:
        return {"error": str(e)}
ops = []
for t in ("cuda_backend",):
    try:
        for line in open(f"{w}/{t}.txt"):
            m = re.match(r"(.+?) \[(\w+)\]: rel err ([0-9.e+-]+) \(tol ([0-9.e+-]+)\)", line.strip())
            if m:
                ops.append(dict(test=t, what=m[1], dtype=m[2], rel_err=float(m[3]), tol=float(m[4])))
    except FileNotFoundError:
        pass
steps, ours, lora, torch = load("steps.json"), load("rlhf-bench.json"), load("lora-linear.json"), load("pytorch.json")
pt = next((r for r in torch.get("results", []) if "tokens_per_s" in r), {})
res = dict(gpu=gpu, date=day, seconds=int(secs), ops_status=ops_status, steps_status=steps_status,
           ops=ops, steps=steps, rlhf=ours, lora_linear=lora, pytorch=torch)
base = f"bench/results/gpu-check-{gpu}-{day}"
json.dump(res, open(base + ".json", "w"), indent=1)
worst = max((o["rel_err"] / o["tol"] for o in ops), default=float("nan"))
ratios = [s["fwd_bwd_ratio"] for s in lora.get("shapes", [])]
tps, ptps = ours.get("tokens_per_s"), pt.get("tokens_per_s")
rows = [
    ("ops vs CPU (worst err/tol)", f"{ops_status}, {len(ops)} comparisons, worst {worst:.2f} of tolerance", "≤ 1"),
    ("20 steps CPU vs CUDA f32", f"{steps.get('cuda', {}).get('max_rel_diff', float('nan')):.2e} max rel. loss diff", "≤ 1e-3"),
    ("20 steps CPU vs CUDA bf16", f"{steps.get('cuda-bf16', {}).get('max_rel_diff', float('nan')):.2e}", "≤ 3e-2"),
    ("rlhf tokens/s (1B LoRA, B=8, T=2048)", f"{tps or float('nan'):,.0f}", ""),
    ("rlhf MFU (6N / LoRA FLOPs)", f"{100*ours.get('mfu_6n', float('nan')):.1f}% / {100*ours.get('mfu_lora', float('nan')):.1f}%", "≥ 45% (6N)"),
    ("PyTorch+PEFT tokens/s, MFU 6N", f"{ptps or float('nan'):,.0f}, {100*pt.get('mfu_6n', float('nan')):.1f}%", ""),
    ("rlhf / PyTorch", f"{(tps or float('nan')) / (ptps or float('nan')):.2f}x", "≥ 2x"),
    ("fused LoRA linear / base GEMM (fwd+bwd)", ", ".join(f"{r:.2f}x" for r in ratios) or "n/a", "≤ 1.10x"),
]
md = [f"# gpu-check on {gpu}, {day} ({secs} s)", "", "| check | result | target |", "|---|---|---|"]
md += [f"| {a} | {b} | {c} |" for a, b, c in rows]
open(base + ".md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
