#!/usr/bin/env python3
"""Generate PyTorch reference fixtures for the model as an RL policy
(PPO/DPO/GRPO): per-token log-probabilities, entropies, values from a value
head (TRL's AutoModelForCausalLMWithValueHead: Linear(hidden, 1) with bias on
the last hidden state), the reference log-probabilities with the LoRA adapter
disabled, and the gradients of sum(w * logp) + sum(u * values).

Usage (from the repository root):

    python scripts/make_policy_fixtures.py            # writes worker/tests/fixtures/policy/

Needs: torch, transformers, peft, safetensors (CPU). Deterministic: fixed
seeds, float32, eager attention. The model and adapter are the committed
worker/tests/fixtures/llama_gqa/{model,adapter} (scripts/make_fixtures.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import peft  # noqa: E402
import transformers  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
FIX = REPO_ROOT / "worker" / "tests" / "fixtures"
OUT = FIX / "policy"
VOCAB = 96
PAD = 0
T = 12
# Row r: QUERY[r] prompt tokens, then RESPONSE[r] response tokens, then padding.
QUERY = [4, 6]
RESPONSE = [8, 3]


def make_inputs(seed: int = 777):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((2, T), PAD, dtype=torch.long)
    labels = torch.full((2, T), -100, dtype=torch.long)
    mask = torch.zeros((2, T), dtype=torch.long)
    for r in range(2):
        n = QUERY[r] + RESPONSE[r]
        ids[r, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        labels[r, QUERY[r]:n] = ids[r, QUERY[r]:n]
        mask[r, :n] = 1
    return ids, mask, labels


def per_token(logits, labels):
    """logp[b,t] of labels[b,t+1] (0 where ignored or t = T-1), entropy[b,t]."""
    logp_all = torch.log_softmax(logits, dim=-1)
    tgt = labels[:, 1:]
    valid = tgt != -100
    gathered = logp_all[:, :-1].gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = torch.zeros(labels.shape, dtype=logits.dtype)
    logp[:, :-1] = torch.where(valid, gathered, torch.zeros_like(gathered))
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        str(FIX / "llama_gqa" / "model"), dtype=torch.float32, attn_implementation="eager"
    )
    pm = peft.PeftModel.from_pretrained(base, str(FIX / "llama_gqa" / "adapter"), is_trainable=True)
    pm.eval()
    hidden = base.config.hidden_size
    g = torch.Generator().manual_seed(99)
    v_head = torch.nn.Linear(hidden, 1)
    with torch.no_grad():
        v_head.weight.copy_(0.3 * torch.randn(1, hidden, generator=g))
        v_head.bias.copy_(0.3 * torch.randn(1, generator=g))
    ids, mask, labels = make_inputs()
    w = torch.randn(2, T, generator=g)
    u = torch.randn(2, T, generator=g) * mask

    out = pm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    logp, entropy = per_token(out.logits, labels)
    # TRL's ValueHead reads hidden_states[-1] (after the final norm).
    values = v_head(out.hidden_states[-1])[..., 0]
    objective = (w * logp).sum() + (u * values).sum()
    objective.backward()

    with torch.no_grad(), pm.disable_adapter():
        ref_logits = pm(input_ids=ids, attention_mask=mask).logits
        ref_logp, _ = per_token(ref_logits, labels)
        plain = base.__class__.from_pretrained(
            str(FIX / "llama_gqa" / "model"), dtype=torch.float32, attn_implementation="eager"
        )(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(ref_logits, plain, atol=1e-6), "disable_adapter is not the base model"

    tensors = {
        "logp": logp.detach().contiguous(),
        "entropy": entropy.detach().contiguous(),
        "values": values.detach().contiguous(),
        "ref_logp": ref_logp.contiguous(),
        "w": w.contiguous(),
        "u": u.contiguous(),
        "grad.v_head.summary.weight": v_head.weight.grad.contiguous(),
        "grad.v_head.summary.bias": v_head.bias.grad.contiguous(),
    }
    n_lora = 0
    for name, p in pm.named_parameters():
        if p.requires_grad and "lora_" in name:
            assert p.grad is not None and p.grad.abs().max() > 1e-6, name
            key = name.replace(".default.weight", ".weight")
            tensors[f"grad.{key}"] = p.grad.detach().contiguous()
            n_lora += 1
    assert n_lora == 2 * 7 * 2, n_lora
    assert (logp != 0).sum() == sum(RESPONSE), (logp != 0).sum()
    save_file(tensors, str(OUT / "expected.safetensors"))
    save_file(
        {
            "v_head.summary.weight": v_head.weight.detach().contiguous(),
            "v_head.summary.bias": v_head.bias.detach().contiguous(),
        },
        str(OUT / "value_head.safetensors"),
    )
    doc = {
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "labels": labels.tolist(),
        "objective": "sum(w * logp) + sum(u * values); logp[b,t] = log p(labels[b,t+1]) (0 where ignored)",
    }
    (OUT / "inputs.json").write_text(json.dumps(doc, indent=1) + "\n")
    (OUT / "versions.json").write_text(
        json.dumps(
            {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
