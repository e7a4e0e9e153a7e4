#!/usr/bin/env python3
"""The PyTorch side of `rlhf bench`: the same model, batch and training step in
transformers (+PEFT for LoRA), fp32, 2 threads, printing the same JSON line.

One timed step = optimizer.zero_grad() + forward + loss.backward() +
clip_grad_norm_(1.0) + AdamW.step(), as the HF Trainer does per optimizer step
(and as `rlhf bench` does: zero_grads + forward_backward + Optimizer::step).

    python bench/pytorch_step.py --model medium --mode lora --steps 5 --warmup 1 --json
    python bench/pytorch_step.py --gemm_peak --json   # torch.matmul f32 GFLOP/s

Model FLOPs per step use the formula of src/bench.rs (see BENCHMARKS.md).
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

# Presets: the same as src/bench.rs.
MODELS = {
    # hidden, intermediate, layers, heads, kv heads, batch, seq
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, batch=4, seq=128),
    "medium": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=4, batch=4, seq=256),
}
VOCAB = 8000
LORA_R, LORA_ALPHA, LORA_DROPOUT = 8, 32, 0.05
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_flops(p, mode, b, t):
    """(matmul params N, LoRA params, FLOPs per step): src/bench.rs's formula."""
    c, f, l = p["hidden_size"], p["intermediate_size"], p["num_hidden_layers"]
    hd = c // p["num_attention_heads"]
    qd, kvd = p["num_attention_heads"] * hd, p["num_key_value_heads"] * hd
    linears = [(c, qd), (c, kvd), (c, kvd), (qd, c), (c, f), (c, f), (f, c)]
    n_mm = l * sum(i * o for i, o in linears) + VOCAB * c
    n_lora = l * sum(LORA_R * (i + o) for i, o in linears) if mode == "lora" else 0
    tok = b * t
    linear = (6 if mode == "full" else 4) * n_mm * tok + 6 * n_lora * tok
    attention = 6 * l * t * qd * tok
    return n_mm, n_lora, linear + attention


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def gemm_peak(torch, rounds):
    out = {}
    for n in (512, 1024):
        a, b = torch.randn(n, n), torch.randn(n, n)
        c = a @ b
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        once = max(time.perf_counter() - t0, 1e-7)
        reps = max(1, min(10000, int(0.05 / once + 1)))
        rates = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.matmul(a, b, out=c)
            rates.append(2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
        out[str(n)] = statistics.median(rates)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=MODELS, default="tiny")
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--gemm_peak", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    if a.gemm_peak:
        sq = gemm_peak(torch, a.rounds)
        out = {"impl": "pytorch", "kind": "gemm_peak", "threads": torch.get_num_threads(),
               "rounds": a.rounds, "square_gflops": sq, "peak_gflops": max(sq.values()),
               "torch": torch.__version__}
        print(json.dumps(out) if a.json else out)
        return

    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    p = MODELS[a.model]
    b, t = p["batch"], p["seq"]
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=p["hidden_size"],
        intermediate_size=p["intermediate_size"],
        num_hidden_layers=p["num_hidden_layers"],
        num_attention_heads=p["num_attention_heads"],
        num_key_value_heads=p["num_key_value_heads"],
        max_position_embeddings=max(t, 256),
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
    )
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).float()
    peft_version = None
    if a.mode == "lora":
        import peft
        from peft import LoraConfig, get_peft_model

        peft_version = peft.__version__
        model = get_peft_model(model, LoraConfig(
            r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
            target_modules=TARGETS, task_type="CAUSAL_LM", bias="none"))
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    # transformers' TrainingArguments defaults (MedicalGPT keeps them).
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    g = torch.Generator().manual_seed(a.seed)
    data = [torch.randint(0, VOCAB, (b, t), generator=g) for _ in range(a.warmup + a.steps)]

    def step(ids):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    losses, times = [], []
    for ids in data[: a.warmup]:
        losses.append(step(ids))
    for ids in data[a.warmup:]:
        t0 = time.perf_counter()
        losses.append(step(ids))
        times.append(time.perf_counter() - t0)

    n_mm, n_lora, flops = model_flops(p, a.mode, b, t)
    # The formula's parameter counts must be this model's: every nn.Linear
    # weight that is not a LoRA factor, and the LoRA factors.
    lin = [(n, q.numel()) for n, q in model.named_parameters() if q.dim() == 2]
    real_lora = sum(k for n, k in lin if "lora_" in n)
    real_mm = sum(k for n, k in lin if "lora_" not in n and "embed_tokens" not in n)
    if (real_mm, real_lora) != (n_mm, n_lora):
        raise SystemExit(f"FLOP formula mismatch: model has {real_mm} matmul / {real_lora} "
                         f"LoRA params, formula {n_mm} / {n_lora}")
    med = statistics.median(times)
    out = {
        "impl": "pytorch",
        "model": a.model,
        "mode": a.mode,
        "batch_size": b,
        "seq_len": t,
        "tokens_per_step": b * t,
        "steps": a.steps,
        "warmup": a.warmup,
        "threads": torch.get_num_threads(),
        "tokens_per_sec": statistics.median([b * t / x for x in times]),
        "step_time_s": med,
        "step_times_s": times,
        "peak_rss_mib": peak_rss_mib(),
        "matmul_params": n_mm,
        "lora_params": n_lora,
        "model_flops_per_step": flops,
        "achieved_gflops": flops / med / 1e9,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "attn_implementation": model.config._attn_implementation
        if hasattr(model, "config") else "sdpa",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
    }
    if a.json:
        print(json.dumps(out))
    else:
        print(f"pytorch {a.model} {a.mode}: B={b} T={t} threads={out['threads']}  "
              f"{out['tokens_per_sec']:.0f} tokens/s  step {med:.3f} s  "
              f"{out['achieved_gflops']:.1f} GFLOP/s ({flops / 1e9:.3f} GFLOP/step)  "
              f"peak RSS {out['peak_rss_mib']:.0f} MiB  loss {losses[0]:.3f} -> {losses[-1]:.3f}")


if __name__ == "__main__":
    sys.exit(main())
