#!/usr/bin/env python3
"""Generate the PyTorch reference fixture for DPO (TRL DPOTrainer,
loss_type="sigmoid", written out by hand here so that TRL is not needed):

    loss = mean_i -logsigmoid(beta * ((pc_i - rc_i) - (pr_i - rr_i)))

pc/pr: summed log-probabilities of the chosen/rejected answer tokens under
the policy (the llama_gqa model with its PEFT adapter), rc/rr: the same with
the adapter disabled (`with peft_model.disable_adapter()`, TRL's reference
under PEFT). Two pairs of token ids (prompt, chosen, rejected) of different
lengths; outputs the loss, the rewards beta*(p - r), the sequence log-probs
and the gradient of the loss for every LoRA tensor.

Usage (from the repository root):

    python scripts/make_dpo_fixtures.py            # writes worker/tests/fixtures/dpo/

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
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import peft  # noqa: E402
import transformers  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
FIX = REPO_ROOT / "worker" / "tests" / "fixtures"
OUT = FIX / "dpo"
VOCAB = 96
PAD = 0
EOS = 2
BETA = 0.1
# (prompt, chosen, rejected) lengths of each pair; answers end with EOS.
LENGTHS = [(4, 3, 5), (6, 4, 2)]


def make_pairs(seed: int = 2024):
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    pairs = []
    for p, c, r in LENGTHS:
        pairs.append(
            {
                "prompt": rand(p),
                "chosen": rand(c - 1) + [EOS],
                "rejected": rand(r - 1) + [EOS],
            }
        )
    return pairs


def rows(pairs):
    """[chosen rows; rejected rows] as TRL's concatenated_forward, right-padded,
    labels only on the answer tokens."""
    seqs = [(p["prompt"], p["chosen"]) for p in pairs] + [(p["prompt"], p["rejected"]) for p in pairs]
    t = max(len(a) + len(b) for a, b in seqs)
    ids = torch.full((len(seqs), t), PAD, dtype=torch.long)
    labels = torch.full((len(seqs), t), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, (prompt, answer) in enumerate(seqs):
        n = len(prompt) + len(answer)
        ids[i, :n] = torch.tensor(prompt + answer)
        labels[i, len(prompt) : n] = torch.tensor(answer)
        mask[i, :n] = 1
    return ids, mask, labels


def sequence_logps(logits, labels):
    """TRL's get_batch_logps: sum over the answer tokens of log p(label)."""
    logits = logits[:, :-1]
    labels = labels[:, 1:]
    valid = labels != -100
    per_token = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (per_token * valid).sum(-1)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        str(FIX / "llama_gqa" / "model"), dtype=torch.float32, attn_implementation="eager"
    )
    pm = peft.PeftModel.from_pretrained(base, str(FIX / "llama_gqa" / "adapter"), is_trainable=True)
    assert pm.peft_config["default"].lora_dropout == 0.0
    pm.train()
    pairs = make_pairs()
    ids, mask, labels = rows(pairs)
    n = len(pairs)

    logps = sequence_logps(pm(input_ids=ids, attention_mask=mask).logits, labels)
    pc, pr = logps[:n], logps[n:]
    with torch.no_grad(), pm.disable_adapter():
        ref = sequence_logps(pm(input_ids=ids, attention_mask=mask).logits, labels)
    rc, rr = ref[:n], ref[n:]
    logits = (pc - pr) - (rc - rr)
    losses = -F.logsigmoid(BETA * logits)
    loss = losses.mean()
    loss.backward()
    chosen_rewards = BETA * (pc - rc).detach()
    rejected_rewards = BETA * (pr - rr).detach()

    tensors = {
        "loss": loss.detach().reshape(1),
        "policy_chosen_logps": pc.detach().contiguous(),
        "policy_rejected_logps": pr.detach().contiguous(),
        "reference_chosen_logps": rc.contiguous(),
        "reference_rejected_logps": rr.contiguous(),
        "chosen_rewards": chosen_rewards.contiguous(),
        "rejected_rewards": rejected_rewards.contiguous(),
    }
    n_lora = 0
    for name, p in pm.named_parameters():
        if p.requires_grad and "lora_" in name:
            assert p.grad is not None and p.grad.abs().max() > 1e-7, name
            key = name.replace(".default.weight", ".weight")
            tensors[f"grad.{key}"] = p.grad.detach().contiguous()
            n_lora += 1
    assert n_lora == 2 * 7 * 2, n_lora
    # The adapter moves the policy away from the reference: a real test of both.
    assert (pc - rc).abs().min() > 1e-3 and (pr - rr).abs().min() > 1e-3
    save_file(tensors, str(OUT / "expected.safetensors"))
    doc = {
        "beta": BETA,
        "pad_token_id": PAD,
        "pairs": pairs,
        "loss": "mean_i -logsigmoid(beta * ((pc_i - rc_i) - (pr_i - rr_i))); p/r = summed log-probs of the answer tokens, r with the adapter disabled",
    }
    (OUT / "inputs.json").write_text(json.dumps(doc, indent=1) + "\n")
    (OUT / "versions.json").write_text(
        json.dumps(
            {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {OUT}: loss {loss.item():.6f}, rewards {chosen_rewards.tolist()} / {rejected_rewards.tolist()}")


if __name__ == "__main__":
    main()
