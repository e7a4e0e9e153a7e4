#!/usr/bin/env python3
"""Reference fixtures for `rlhf merge` and for PEFT adapter interop.

Usage (from the repository root, after scripts/make_fixtures.py):

    # 1. our side of the interop fixture (an adapter written by rlhf's save code):
    cargo test -p rlhf-worker --test merge -- --ignored write_rlhf_adapter_fixture
    # 2. everything PEFT/transformers computes:
    python scripts/make_merge_fixtures.py

Writes worker/tests/fixtures/merge/ (see README.md there). Builds on the tiny
llama_gqa model of worker/tests/fixtures (read, not rewritten). Deterministic:
fixed seeds, float32 on CPU, eager attention, PYTHONHASHSEED=0.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path

if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
from safetensors.torch import load_file, save_file

import peft
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "worker" / "tests" / "fixtures"
GQA = FIXTURES / "llama_gqa"
OUT = FIXTURES / "merge"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_B_STD = 0.1
SCORE_STD = 0.2


def inputs():
    doc = json.loads((GQA / "inputs.json").read_text())
    return torch.tensor(doc["input_ids"]), torch.tensor(doc["attention_mask"])


def load_causal(path: Path, dtype=torch.float32):
    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager")
    return m.eval()


def logits_of(model):
    ids, mask = inputs()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float().contiguous()


def clean_adapter_dir(d: Path):
    (d / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template


def randomise_lora(pm, seed: int, score=False):
    """lora_B (zero at init) and the score head get random values so the merge matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_B." in name:
                p.copy_(LORA_B_STD * torch.randn(p.shape, generator=g))
            elif score and ".modules_to_save." in name:
                p.copy_(SCORE_STD * torch.randn(p.shape, generator=g))


def causal_case():
    """llama_gqa + adapter_mts (all 7 linears, embed_tokens + lm_head saved) merged by PEFT."""
    base = load_causal(GQA / "model")
    pm = PeftModel.from_pretrained(base, str(GQA / "adapter_mts")).eval()
    before = logits_of(pm)
    merged = pm.merge_and_unload()
    logits = logits_of(merged)
    assert torch.allclose(before, logits, atol=1e-5), (before - logits).abs().max()
    tensors = {"logits": logits}
    for k, v in merged.state_dict().items():
        tensors[f"tensor.{k}"] = v.detach().float().contiguous()
    save_file(tensors, str(OUT / "expected_causal.safetensors"))
    print(f"causal: {len(tensors) - 1} merged tensors; max|logits diff| before/after merge "
          f"{(before - logits).abs().max().item():.2e}")


def qv_rslora_case():
    """q/v-only adapter with use_rslora (scale alpha/sqrt(r)); merged into the f32 and the bf16 base."""
    base = load_causal(GQA / "model")
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                     use_rslora=True, task_type="CAUSAL_LM")
    torch.manual_seed(500)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    randomise_lora(pm, 501)
    d = OUT / "adapter_qv_rslora"
    pm.save_pretrained(str(d), safe_serialization=True)
    clean_adapter_dir(d)
    tensors = {}
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(d)).merge_and_unload()
    for k, v in merged.state_dict().items():
        if "q_proj" in k or "v_proj" in k:
            tensors[f"f32.{k}"] = v.detach().float().contiguous()
    bf16 = load_causal(GQA / "model_bf16", dtype=torch.bfloat16)
    merged16 = PeftModel.from_pretrained(bf16, str(d)).merge_and_unload()
    for k, v in merged16.state_dict().items():
        assert v.dtype == torch.bfloat16, k
        if "q_proj" in k or "v_proj" in k:
            tensors[f"bf16.{k}"] = v.detach().contiguous()
    save_file(tensors, str(OUT / "expected_qv_rslora.safetensors"))
    print(f"qv_rslora: {len(tensors)} tensors (f32 and bf16 merges of q/v)")


def seqcls_case():
    """A reward-model (SEQ_CLS) adapter as MedicalGPT's reward_modeling.py makes it, merged as
    merge_peft_adapter.py does: AutoModelForSequenceClassification(num_labels=1) + merge_and_unload."""
    base = AutoModelForSequenceClassification.from_pretrained(
        str(GQA / "model"), num_labels=1, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    cfg = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                     task_type="SEQ_CLS")
    torch.manual_seed(600)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    randomise_lora(pm, 601, score=True)
    d = OUT / "adapter_seqcls"
    pm.save_pretrained(str(d), safe_serialization=True)
    clean_adapter_dir(d)
    saved = load_file(str(d / "adapter_model.safetensors"))
    score_keys = [k for k in saved if "score" in k]
    assert score_keys == ["base_model.model.score.weight"], score_keys

    fresh = AutoModelForSequenceClassification.from_pretrained(
        str(GQA / "model"), num_labels=1, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    merged = PeftModel.from_pretrained(fresh, str(d)).merge_and_unload()
    sd = merged.state_dict()
    assert "score.weight" in sd and "lm_head.weight" not in sd
    tensors = {}
    for k, v in sd.items():
        if "q_proj" in k or "v_proj" in k or k == "score.weight":
            tensors[f"tensor.{k}"] = v.detach().float().contiguous()
    ids, _ = inputs()
    with torch.no_grad():
        tensors["scores"] = merged(input_ids=ids[:1]).logits.float().contiguous()  # [1, 1], last token of row 0
    save_file(tensors, str(OUT / "expected_seqcls.safetensors"))
    tmp = OUT / "_tmp_seqcls"
    merged.save_pretrained(str(tmp), safe_serialization=True)
    shutil.copy(tmp / "config.json", OUT / "transformers_seqcls_config.json")
    shutil.rmtree(tmp)
    print(f"seqcls: score head key {score_keys[0]}, {len(tensors)} tensors")


def fixed_value(name: str, i: int) -> float:
    """The interop adapter's tensors: exact binary fractions, identical in Rust
    (worker/tests/merge.rs `fixed_value`): ((i·7 + h) mod 17 − 8) / 64, h = len(name)."""
    return float(((i * 7 + len(name)) % 17) - 8) / 64.0


def interop_case():
    """Direction rlhf → PEFT: PEFT loads the adapter our code saved (rlhf_adapter/, written by
    the ignored Rust test write_rlhf_adapter_fixture) and its logits are committed. PEFT's own
    save of the same LoraConfig and tensors is the reference for names, shapes and config fields."""
    ours = OUT / "rlhf_adapter"
    if not (ours / "adapter_config.json").exists():
        sys.exit(f"{ours} is missing: run `cargo test -p rlhf-worker --test merge -- --ignored "
                 "write_rlhf_adapter_fixture` first")
    base = load_causal(GQA / "model")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(ours)).eval()
    logits_ours = logits_of(theirs)

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=list(LORA_TARGETS),
                     modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    pm = get_peft_model(copy.deepcopy(base), cfg)
    saved_names = set()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if not p.requires_grad:
                continue
            key = name.replace(".default", "").replace(".modules_to_save", "")
            saved_names.add(key)
            vals = torch.tensor([fixed_value(key, i) for i in range(p.numel())], dtype=torch.float32)
            p.copy_(vals.reshape(p.shape))
    pm.eval()
    ref = OUT / "_tmp_peft_reference"
    pm.save_pretrained(str(ref), safe_serialization=True)
    ref_tensors = load_file(str(ref / "adapter_model.safetensors"))
    assert set(ref_tensors) == saved_names, sorted(set(ref_tensors) ^ saved_names)
    logits_peft = logits_of(pm)
    err = (logits_peft - logits_ours).abs().max().item()
    assert err == 0.0, f"PEFT on its own save vs on rlhf's adapter: {err}"
    # The reference: PEFT's adapter_config.json and the names/shapes/dtypes it writes.
    shutil.copy(ref / "adapter_config.json", OUT / "peft_reference_adapter_config.json")
    shapes = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
              for k, v in sorted(ref_tensors.items())}
    (OUT / "peft_reference_tensors.json").write_text(json.dumps(shapes, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(ref)
    save_file({"logits": logits_ours}, str(OUT / "expected_interop.safetensors"))
    print(f"interop: PEFT loads rlhf_adapter; logits identical to PEFT's own adapter (max diff {err})")


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    for d in ["adapter_qv_rslora", "adapter_seqcls"]:
        if (OUT / d).exists():
            shutil.rmtree(OUT / d)
    causal_case()
    qv_rslora_case()
    seqcls_case()
    interop_case()
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    (OUT / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"fixtures in {OUT}: {total} bytes; versions {versions}")
    assert total < 300_000, total


if __name__ == "__main__":
    main()
