#!/usr/bin/env python3
"""Generate PyTorch reference fixtures for the Rust Llama-family trainer.

Usage (from the repository root):

    python scripts/make_fixtures.py            # writes worker/tests/fixtures/
    python scripts/make_fixtures.py --out DIR  # somewhere else

Needs: torch, transformers, peft, safetensors (CPU torch is enough).
Deterministic: fixed seeds, float32 on CPU, eager attention. Re-running
deletes and rewrites the fixture case directories.

See worker/tests/fixtures/README.md for what every file contains.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path

# PEFT stores target_modules as a Python set, so its order in adapter_config.json
# depends on string hashing. Re-exec with a fixed hash seed for byte-stable output.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
from safetensors.torch import load_file, save_file

import peft
import transformers
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "worker" / "tests" / "fixtures"

VOCAB = 96
B, T = 2, 12
PAD_TAIL = 3  # row 1: last 3 positions are padding
WEIGHT_STD = 0.2  # matrices, embeddings, biases
NORM_STD = 0.1  # RMSNorm weights = 1 + NORM_STD * randn
LORA_B_STD = 0.1
MTS_DELTA_STD = 0.05  # modules_to_save copies = base weight + this * randn
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,  # deliberately not a multiple of hidden_size
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    attention_dropout=0.0,
)


def make_config(case: str):
    if case == "llama_gqa":
        return LlamaConfig(
            **COMMON,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        )
    if case == "llama_tied":
        return LlamaConfig(
            **COMMON,
            num_key_value_heads=4,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            tie_word_embeddings=True,
        )
    if case == "qwen2":
        return Qwen2Config(
            **COMMON,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=False,
            use_sliding_window=False,
        )
    raise ValueError(case)


def build_model(case: str, seed: int):
    cfg = make_config(case)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    cls = Qwen2ForCausalLM if case == "qwen2" else LlamaForCausalLM
    model = cls(cfg).to(torch.float32)
    # Re-initialise every parameter so logits/gradients are far above float noise.
    # named_parameters() de-duplicates tied weights, so a tied embedding is set once.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, model.norm
                p.copy_(1.0 + NORM_STD * torch.randn(p.shape, generator=g))
            else:  # weights, embeddings and (qwen2) q/k/v biases
                p.copy_(WEIGHT_STD * torch.randn(p.shape, generator=g))
    model.eval()
    return model


def make_inputs(seed: int = 1234):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, T - PAD_TAIL:] = 0
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    position_ids = torch.arange(T).unsqueeze(0).expand(B, T).clone()
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        position_ids=position_ids,
    )


def forward_backward(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        labels=inputs["labels"],
    )
    out.loss.backward()
    return out.logits.detach().float().contiguous(), out.loss.detach().float().reshape(1)


def check_loss(logits, loss, labels):
    """Recompute HF's shifted causal-LM loss by hand to pin down the convention."""
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="mean",
    )
    assert torch.allclose(ref, loss[0], rtol=1e-6, atol=1e-6), (ref, loss)


def write_inputs(case_dir: Path, inputs):
    doc = {
        "batch": B,
        "seq_len": T,
        "vocab_size": VOCAB,
        "input_ids": inputs["input_ids"].tolist(),
        "attention_mask": inputs["attention_mask"].tolist(),
        "labels": inputs["labels"].tolist(),
        "position_ids": inputs["position_ids"].tolist(),
        "ignore_index": -100,
        "loss": "mean over non-ignored of CE(logits[:, :-1], labels[:, 1:])",
    }
    # One row per line keeps the file readable and diffable.
    lines = []
    for k, v in doc.items():
        if isinstance(v, list):
            rows = ",\n".join("    " + json.dumps(r) for r in v)
            lines.append(f'  "{k}": [\n{rows}\n  ]')
        else:
            lines.append(f"  {json.dumps(k)}: {json.dumps(v)}")
    text = "{\n" + ",\n".join(lines) + "\n}\n"
    assert json.loads(text) == doc
    (case_dir / "inputs.json").write_text(text)


def save_full_expected(case_dir: Path, model, inputs):
    logits, loss = forward_backward(model, inputs)
    check_loss(logits, loss, inputs["labels"])
    tensors = {"logits": logits, "loss": loss}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().max() > 1e-4, f"gradient of {name} is ~zero"
        tensors[f"grad.{name}"] = p.grad.detach().float().contiguous()
    save_file(tensors, str(case_dir / "expected.safetensors"))
    model.zero_grad(set_to_none=True)
    return logits, loss


def lora_case(case_dir: Path, base_model, inputs, seed: int, modules_to_save=None, suffix=""):
    """Wrap a copy of the base model with PEFT LoRA, randomise lora_B, save adapter and grads."""
    model = copy.deepcopy(base_model)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)  # lora_A uses PEFT's default (kaiming-uniform) init under this seed
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_B." in name:
                p.copy_(LORA_B_STD * torch.randn(p.shape, generator=g))
            elif ".modules_to_save." in name:
                # Make the trainable copies differ from the frozen originals, so
                # loading the adapter must actually apply them.
                p.add_(MTS_DELTA_STD * torch.randn(p.shape, generator=g))
    pm.eval()

    logits, loss = forward_backward(pm, inputs)
    check_loss(logits, loss, inputs["labels"])

    adapter_dir = case_dir / f"adapter{suffix}"
    pm.save_pretrained(str(adapter_dir), safe_serialization=True)
    (adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template

    # Map PEFT's saved key names to parameters by storage identity, so the grad
    # keys are exactly the keys of adapter_model.safetensors.
    by_ptr = {p.data_ptr(): (n, p) for n, p in pm.named_parameters() if p.requires_grad}
    saved_sd = get_peft_model_state_dict(pm)
    on_disk = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert set(saved_sd) == set(on_disk), (sorted(saved_sd), sorted(on_disk))

    tensors = {"logits": logits, "loss": loss}
    used = set()
    for key, t in saved_sd.items():
        pname, p = by_ptr[t.data_ptr()]
        used.add(pname)
        assert torch.equal(on_disk[key], p.detach()), key
        assert p.grad is not None and p.grad.abs().max() > 1e-5, f"gradient of {key} is ~zero"
        tensors[f"grad.{key}"] = p.grad.detach().float().contiguous()
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert used == trainable, (trainable - used, used - trainable)

    out_name = f"expected_lora{suffix}.safetensors"
    save_file(tensors, str(case_dir / out_name))

    # Round-trip: the saved adapter loaded with PeftModel.from_pretrained must
    # reproduce the logits.
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter_dir))
    reloaded.eval()
    with torch.no_grad():
        l2 = reloaded(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert torch.allclose(l2, logits, atol=1e-5, rtol=1e-5), (l2 - logits).abs().max()
    return sorted(tensors)


def save_model(model, path: Path, dtype=None, keep_generation_config=False, **kw):
    m = copy.deepcopy(model)
    if dtype is not None:
        m = m.to(dtype)
    m.save_pretrained(str(path), safe_serialization=True, **kw)
    if not keep_generation_config:
        (path / "generation_config.json").unlink(missing_ok=True)


def reload_check(path: Path, inputs, ref_logits, tol, attn="eager"):
    cls = transformers.AutoModelForCausalLM
    m = cls.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attn)
    m.eval()
    with torch.no_grad():
        l2 = m(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    err = (l2 - ref_logits).abs().max().item()
    assert err <= tol, (path, err)
    return err


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    inputs = make_inputs()
    cases = {"llama_gqa": 100, "llama_tied": 200, "qwen2": 300}
    for case, seed in cases.items():
        case_dir = out / case
        if case_dir.exists():
            shutil.rmtree(case_dir)
        case_dir.mkdir(parents=True)

        model = build_model(case, seed)
        write_inputs(case_dir, inputs)
        save_model(model, case_dir / "model", keep_generation_config=True)
        logits, loss = save_full_expected(case_dir, model, inputs)
        err = reload_check(case_dir / "model", inputs, logits, 1e-6)
        err_sdpa = reload_check(case_dir / "model", inputs, logits, 2e-5, attn="sdpa")
        print(f"{case}: loss={loss.item():.6f} reload max|dlogits| eager={err:.2e} sdpa={err_sdpa:.2e}")

        if case == "llama_gqa":
            save_model(model, case_dir / "model_f16", dtype=torch.float16)
            save_model(model, case_dir / "model_bf16", dtype=torch.bfloat16)
            save_model(model, case_dir / "model_sharded", max_shard_size="20KB")
            print(f"  f16  reload max|dlogits|={reload_check(case_dir / 'model_f16', inputs, logits, 0.05):.2e}")
            print(f"  bf16 reload max|dlogits|={reload_check(case_dir / 'model_bf16', inputs, logits, 0.5):.2e}")
            print(f"  sharded reload max|dlogits|={reload_check(case_dir / 'model_sharded', inputs, logits, 1e-6):.2e}")

        if case in ("llama_gqa", "qwen2"):
            keys = lora_case(case_dir, model, inputs, seed + 10)
            print(f"  lora: {len(keys)} tensors in expected_lora.safetensors")
        if case == "llama_gqa":
            keys = lora_case(
                case_dir, model, inputs, seed + 20, modules_to_save=["embed_tokens", "lm_head"], suffix="_mts"
            )
            print(f"  lora+modules_to_save: {len(keys)} tensors in expected_lora_mts.safetensors")

    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": __import__("safetensors").__version__,
    }
    (out / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    print("versions:", versions)

    for f in sorted(out.rglob("*")):
        if f.is_file():
            size = f.stat().st_size
            assert size < 1_000_000, f"{f} is {size} bytes"


if __name__ == "__main__":
    main()
