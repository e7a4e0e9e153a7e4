#!/usr/bin/env python3
"""The PEFT side of the merge benchmark (bench/merge.sh), and the inputs.

    python bench/merge_peft.py make DIR     # DIR/base (bf16 Llama, ~160M) + DIR/adapter (r=16, all linears)
    python bench/merge_peft.py merge DIR    # PEFT merge_and_unload + save_pretrained into DIR/peft-merged

Needs torch, transformers, peft. Deterministic (seed 0).
"""
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def make(d: Path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                      torch_dtype="bfloat16")
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(d / "base")
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    peft_model.save_pretrained(d / "adapter")
    print(sum(p.numel() for p in model.parameters()), "parameters")


def merge(d: Path):
    from peft import PeftModel
    t0 = time.perf_counter()
    base = LlamaForCausalLM.from_pretrained(d / "base", torch_dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(base, d / "adapter").merge_and_unload()
    merged.save_pretrained(d / "peft-merged")
    print(f"peft merge: {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    {"make": make, "merge": merge}[sys.argv[1]](Path(sys.argv[2]))
