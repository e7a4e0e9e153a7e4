#!/usr/bin/env python3
"""The GPU anchor: PyTorch + PEFT LoRA training throughput of ~1B Llama-shaped models.

This is what a MedicalGPT user runs today (transformers + PEFT, eager, SDPA attention, bf16
weights), measured so the CUDA backend of `rlhf` has a number to beat. It trains on random
tokens (throughput does not depend on the data), one optimizer step per micro-batch.

For each (shape, micro-batch, gradient checkpointing) it reports the median step time over
`--steps` timed steps after `--warmup` untimed ones, tokens/s, peak GPU memory, and MFU two
ways:
  * mfu_6n   — the usual convention, (6·N + 12·L·h·s) FLOPs per token (PaLM appendix B),
               N = parameters in matmuls; comparable with full fine-tuning numbers.
  * mfu_lora — the FLOPs LoRA training actually needs: forward 2·N, backward 2·N (input
               gradients only; frozen weights get no weight gradient), attention forward
               plus twice that backward, causal masking halving the attention work.
Both are divided by the bf16 dense peak measured in the same run (an 8192³ matmul), and the
vendor's 989 TFLOP/s is recorded beside it.

usage: python3 bench/gpu_anchor_pytorch.py --out results.json [--tiny] (tiny = CPU smoke test)
"""
import argparse
import json
import platform
import statistics
import time

import torch
import transformers
import peft
from transformers import LlamaConfig, AutoModelForCausalLM
from peft import LoraConfig, get_peft_model

SHAPES = {
    # meta-llama/Llama-3.2-1B: tied embeddings, 128k vocabulary
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                        tie_word_embeddings=True, rope_theta=500000.0),
    # TinyLlama/TinyLlama-1.1B: Llama-2 layout, 32k vocabulary
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                           tie_word_embeddings=False, rope_theta=10000.0),
    # CPU smoke test of this script
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                 tie_word_embeddings=False, rope_theta=10000.0),
}

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure_peak(dev, dtype):
    """bf16 dense matmul rate of this GPU, TFLOP/s (median of 10 after 3 warm-ups)."""
    n = 8192 if dev.type == "cuda" else 256
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    times = []
    for i in range(13):
        sync(dev)
        t = time.perf_counter()
        a @ b
        sync(dev)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e12


def flops_per_token(cfg, seq):
    h, L, v, f = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size
    hd = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    n_matmul = L * (h * h + 2 * h * kv + h * h + 3 * h * f) + v * h  # linears + lm_head
    six_n = 6 * n_matmul + 12 * L * h * seq
    attn_fwd = 2 * L * h * seq  # QK^T and PV, 2 FLOPs per MAC, causal half: 4·s·h/2 per token
    lora = 4 * n_matmul + 3 * attn_fwd
    return n_matmul, six_n, lora


def run_config(shape, batch, seq, gc, steps, warmup, dev, dtype, rank):
    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=max(seq, 4096), use_cache=False, **SHAPES[shape])
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype, attn_implementation="sdpa")
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=TARGETS,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4,
                            fused=dev.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(warmup + steps):
        sync(dev)
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        losses.append(out.loss.item())
    med = statistics.median(times)
    n_matmul, six_n, lora = flops_per_token(cfg, seq)
    tok_s = batch * seq / med
    res = dict(shape=shape, batch=batch, seq=seq, gradient_checkpointing=gc, lora_rank=rank,
               trainable_params=trainable, matmul_params=n_matmul,
               step_s_median=med, step_s_all=times, tokens_per_s=tok_s,
               tflops_6n=tok_s * six_n / 1e12, tflops_lora=tok_s * lora / 1e12,
               loss_first=losses[0], loss_last=losses[-1],
               peak_mem_gib=(torch.cuda.max_memory_allocated() / 2**30) if dev.type == "cuda" else None)
    del model, opt, out
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test of this script")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--plan", help="only these configs, comma-separated shape:batch[:gc], "
                    "e.g. llama3.2-1b:8 (scripts/gpu-check.sh runs one side by side with rlhf)")
    a = ap.parse_args()
    if a.tiny:
        dev, dtype, seq = torch.device("cpu"), torch.float32, 64
        plan = [("tiny", 2, False), ("tiny", 4, True)]
    else:
        dev, dtype, seq = torch.device("cuda"), torch.bfloat16, a.seq
        plan = [("llama3.2-1b", b, False) for b in (1, 2, 4, 8)] + \
               [("llama3.2-1b", 16, True)] + \
               [("tinyllama-1.1b", b, False) for b in (4, 8)] + [("tinyllama-1.1b", 16, True)]
    if a.plan:
        plan = []
        for item in a.plan.split(","):
            parts = item.split(":")
            plan.append((parts[0], int(parts[1]), len(parts) > 2 and parts[2] == "gc"))
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = measure_peak(dev, dtype)
    env = dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
               python=platform.python_version(),
               gpu=torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor(),
               measured_peak_tflops=peak, vendor_peak_tflops=989.0 if dev.type == "cuda" else None)
    print(json.dumps(env), flush=True)
    results = []
    for shape, batch, gc in plan:
        try:
            r = run_config(shape, batch, seq, gc, a.steps, a.warmup, dev, dtype, a.rank)
            r["mfu_6n"] = r["tflops_6n"] / peak
            r["mfu_lora"] = r["tflops_lora"] / peak
        except torch.OutOfMemoryError as e:
            r = dict(shape=shape, batch=batch, seq=seq, gradient_checkpointing=gc, error=f"OOM: {e}"[:300])
            torch.cuda.empty_cache()
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "step_s_all"}), flush=True)
        with open(a.out, "w") as f:
            json.dump(dict(env=env, results=results), f, indent=1)


if __name__ == "__main__":
    main()
