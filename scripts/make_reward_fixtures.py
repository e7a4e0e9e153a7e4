#!/usr/bin/env python3
"""Generate PyTorch reference fixtures for the reward model (`rlhf rm`).

Usage (from the repository root):

    python scripts/make_reward_fixtures.py            # writes worker/tests/fixtures/reward/
    python scripts/make_reward_fixtures.py --out DIR  # somewhere else

Needs: torch, transformers, peft, safetensors (CPU torch is enough).
Deterministic: fixed seeds, float32 on CPU, eager attention. The base weights
are those of scripts/make_fixtures.py (same builder, same seeds), so the
`qwen2` case runs on worker/tests/fixtures/qwen2/model.

See worker/tests/fixtures/reward/README.md for what every file contains.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path

if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import peft  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from transformers import LlamaForSequenceClassification, Qwen2ForSequenceClassification  # noqa: E402

from make_fixtures import LORA_TARGETS, build_model  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "worker" / "tests" / "fixtures" / "reward"
VOCAB = 96
PAD = 0  # pad_token_id; content tokens are drawn from 1..VOCAB
T = 10
# Rows: chosen0, rejected0, chosen1, rejected1 (pairs interleaved, as `rlhf rm`
# batches them); right-padded to T with PAD.
ROW_LENS = [10, 7, 5, 8]
SCORE_STD = 0.2
LORA_B_STD = 0.1
SCORE_DELTA_STD = 0.1
# Full fine-tuning gradients stored (the rest of the trunk's backward is
# covered by the causal-LM fixtures; these span head, final norm, a block, embedding).
FULL_GRADS = [
    "score.weight",
    "model.norm.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.embed_tokens.weight",
]


def make_inputs(seed: int = 4321):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(ROW_LENS), T), PAD, dtype=torch.long)
    for r, n in enumerate(ROW_LENS):
        ids[r, :n] = torch.randint(1, VOCAB, (n,), generator=g)
    mask = (ids != PAD).long()
    return ids, mask


def pairwise_loss(scores):
    """MedicalGPT's RewardTrainer loss: -logsigmoid(r_chosen - r_rejected).mean()."""
    return -torch.nn.functional.logsigmoid(scores[0::2] - scores[1::2]).mean()


def last_non_pad(ids):
    """transformers' rule in GenericForSequenceClassification.forward."""
    idx = torch.arange(ids.shape[-1], dtype=torch.int32)
    return (idx * (ids != PAD).int()).argmax(-1)


def seq_cls_model(case: str, seed: int):
    """The causal-LM fixture's trunk under a random score head."""
    base = build_model(case, seed)
    cfg = copy.deepcopy(base.config)
    cfg.num_labels = 1
    cfg.pad_token_id = PAD
    cfg.architectures = None
    cls = Qwen2ForSequenceClassification if case == "qwen2" else LlamaForSequenceClassification
    torch.manual_seed(seed + 5)
    m = cls(cfg).to(torch.float32)
    sd = {k: v for k, v in base.state_dict().items() if not k.startswith("lm_head")}
    # The trunk must be the committed causal-LM fixture's (the qwen2 tests load that dir).
    committed = load_file(str(REPO_ROOT / "worker" / "tests" / "fixtures" / case / "model" / "model.safetensors"))
    for k, v in sd.items():
        assert torch.equal(committed[k], v), k
    g = torch.Generator().manual_seed(seed + 6)
    sd["score.weight"] = SCORE_STD * torch.randn(1, cfg.hidden_size, generator=g)
    m.load_state_dict(sd, strict=True)
    m.eval()
    return m


def run(model, ids, mask):
    model.zero_grad(set_to_none=True)
    scores = model(input_ids=ids, attention_mask=mask).logits  # [B, 1]
    assert scores.shape == (ids.shape[0], 1), scores.shape
    scores = scores[:, 0]
    loss = pairwise_loss(scores)
    loss.backward()
    return scores.detach().contiguous(), loss.detach().reshape(1)


def write_inputs(d: Path, ids, mask):
    doc = {
        "pad_token_id": PAD,
        "seq_len": T,
        "rows": "chosen0, rejected0, chosen1, rejected1",
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "last_non_pad": last_non_pad(ids).tolist(),
        "loss": "-logsigmoid(scores[0::2] - scores[1::2]).mean()",
    }
    lines = []
    for k, v in doc.items():
        if isinstance(v, list) and v and isinstance(v[0], list):
            rows = ",\n".join("    " + json.dumps(r) for r in v)
            lines.append(f'  "{k}": [\n{rows}\n  ]')
        else:
            lines.append(f"  {json.dumps(k)}: {json.dumps(v)}")
    text = "{\n" + ",\n".join(lines) + "\n}\n"
    assert json.loads(text) == doc
    (d / "inputs.json").write_text(text)


def full_case(d: Path, model, ids, mask, save_dir: bool):
    scores, loss = run(model, ids, mask)
    named = dict(model.named_parameters())
    tensors = {"scores": scores, "loss": loss, "score.weight": named["score.weight"].detach().clone()}
    for name in FULL_GRADS:
        gr = named[name].grad
        assert gr is not None and gr.abs().max() > 1e-5, f"gradient of {name} is ~zero"
        tensors[f"grad.{name}"] = gr.detach().contiguous()
    save_file(tensors, str(d / "expected.safetensors"))
    if save_dir:
        model.save_pretrained(str(d / "model"), safe_serialization=True)
        (d / "model" / "generation_config.json").unlink(missing_ok=True)
        cls = transformers.AutoModelForSequenceClassification
        m2 = cls.from_pretrained(str(d / "model"), dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            s2 = m2(input_ids=ids, attention_mask=mask).logits[:, 0]
        assert torch.allclose(s2, scores, atol=1e-6), (s2 - scores).abs().max()
    return scores, loss


def lora_case(d: Path, model, ids, mask, seed: int):
    """PEFT SEQ_CLS LoRA: lora_B and the score copy randomised, adapter saved by PEFT."""
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(LORA_TARGETS), task_type="SEQ_CLS")
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_B." in name:
                p.copy_(LORA_B_STD * torch.randn(p.shape, generator=g))
            elif ".modules_to_save." in name:
                p.add_(SCORE_DELTA_STD * torch.randn(p.shape, generator=g))
    pm.eval()
    scores, loss = run(pm, ids, mask)
    adapter = d / "adapter"
    pm.save_pretrained(str(adapter), safe_serialization=True)
    (adapter / "README.md").unlink(missing_ok=True)
    by_ptr = {p.data_ptr(): (n, p) for n, p in pm.named_parameters() if p.requires_grad}
    saved = get_peft_model_state_dict(pm)
    on_disk = load_file(str(adapter / "adapter_model.safetensors"))
    assert set(saved) == set(on_disk)
    assert "base_model.model.score.weight" in on_disk, sorted(on_disk)
    tensors = {"scores": scores, "loss": loss}
    used = set()
    for key, t in saved.items():
        pname, p = by_ptr[t.data_ptr()]
        used.add(pname)
        assert p.grad is not None and p.grad.abs().max() > 1e-6, f"gradient of {key} is ~zero"
        tensors[f"grad.{key}"] = p.grad.detach().contiguous()
    assert used == {n for n, p in pm.named_parameters() if p.requires_grad}
    save_file(tensors, str(d / "expected_lora.safetensors"))
    # PeftModel.from_pretrained on a fresh seq-cls model (random score) reproduces the scores.
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        fresh.score.weight.normal_(generator=torch.Generator().manual_seed(seed + 2))
    re = peft.PeftModel.from_pretrained(fresh, str(adapter)).eval()
    with torch.no_grad():
        s2 = re(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert torch.allclose(s2, scores, atol=1e-6), (s2 - scores).abs().max()
    return scores, loss


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    out: Path = ap.parse_args().out
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    ids, mask = make_inputs()
    out.mkdir(parents=True, exist_ok=True)
    write_inputs(out, ids, mask)
    # Same seeds as make_fixtures.py, so the trunks equal the causal-LM fixtures.
    for case, seed in {"llama_gqa": 100, "qwen2": 300}.items():
        d = out / case
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        model = seq_cls_model(case, seed)
        # Only llama gets its own seq-cls model dir; qwen2 loads the causal-LM
        # fixture dir and takes score.weight from expected.safetensors.
        s, loss = full_case(d, model, ids, mask, save_dir=(case == "llama_gqa"))
        print(f"{case}: scores={s.tolist()} loss={loss.item():.6f}")
        s, loss = lora_case(d, model, ids, mask, seed + 30)
        print(f"  lora: scores={s.tolist()} loss={loss.item():.6f}")
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    (out / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"total {total} bytes")
    assert total < 300_000, total


if __name__ == "__main__":
    main()
