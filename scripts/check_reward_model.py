#!/usr/bin/env python3
"""Check reward models that `rlhf` saved with transformers + PEFT.

    RLHF_REWARD_CHECK_OUT=/tmp/rm cargo test -p rlhf-worker --test reward
    python scripts/check_reward_model.py /tmp/rm

For each `<case>_adapter/` (a PEFT SEQ_CLS adapter) the base model of the case
is loaded with AutoModelForSequenceClassification and the adapter with
PeftModel.from_pretrained; for each `<case>_model/` (a full seq-cls model dir)
AutoModelForSequenceClassification loads the dir itself. The scores of the
fixture batch (worker/tests/fixtures/reward/inputs.json) must equal the
`scores` in the dir's scores.safetensors (ours) within 1e-4.

Or one dir: python scripts/check_reward_model.py --model DIR [--adapter DIR]
--inputs inputs.json --scores scores.safetensors

Or a whole `rlhf rm` run (2023-format pairs, no --template_name):
python scripts/check_reward_model.py --model BASE [--adapter OUT] --pairs VALID.jsonl
--results OUT/all_results.json — transformers scores each side alone (no
padding) from the text "Question: q\n\nAnswer: a" tokenised with the model dir's
tokenizer.json, and the eval loss and accuracy must equal ours.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "worker" / "tests" / "fixtures"
# The base each case's adapter was trained on (see worker/tests/reward.rs).
BASES = {"llama_gqa": FIXTURES / "reward" / "llama_gqa" / "model", "qwen2": FIXTURES / "qwen2" / "model"}


def scores_of(model_dir: Path, adapter: Path | None, inputs: dict) -> torch.Tensor:
    # A causal-LM base has no pad_token_id: give it the batch's, as the Rust side does.
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=1, pad_token_id=inputs["pad_token_id"], dtype=torch.float32,
        attn_implementation="eager",
    )
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    ids = torch.tensor(inputs["input_ids"])
    mask = torch.tensor(inputs["attention_mask"])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, 0]


def check(model_dir: Path, adapter: Path | None, inputs: dict, ours_file: Path) -> float:
    ours = load_file(str(ours_file))["scores"]
    theirs = scores_of(model_dir, adapter, inputs)
    err = (ours - theirs).abs().max().item()
    what = f"{model_dir}" + (f" + {adapter}" if adapter else "")
    print(f"{what}: ours {ours.tolist()} transformers/PEFT {theirs.tolist()} max|diff| {err:.2e}")
    return err


def check_run(a) -> int:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(a.model / "tokenizer.json"))
    ours = json.loads(a.results.read_text())
    cfg = json.loads((a.model / "config.json").read_text())
    pad = cfg.get("pad_token_id")
    model = AutoModelForSequenceClassification.from_pretrained(
        str(a.model), num_labels=1, pad_token_id=0 if pad is None else pad, dtype=torch.float32
    )
    if a.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(a.adapter))
    model.eval()
    losses, correct = [], []
    for line in a.pairs.read_text().splitlines():
        if not line.strip():
            continue
        p = json.loads(line)
        s = []
        for side in ("response_chosen", "response_rejected"):
            text = "Question: " + p["question"] + "\n\nAnswer: " + p[side]
            ids = torch.tensor([tok(text)["input_ids"]])
            with torch.no_grad():
                s.append(model(input_ids=ids).logits[0, 0])
        losses.append(-torch.nn.functional.logsigmoid(s[0] - s[1]).item())
        correct.append(float(s[0] > s[1]))
    loss, acc = sum(losses) / len(losses), sum(correct) / len(correct)
    print(f"transformers eval_loss {loss:.8f} accuracy {acc}; ours {ours['eval_loss']:.8f} {ours['eval_accuracy']}")
    ok = abs(loss - ours["eval_loss"]) <= a.tol and acc == ours["eval_accuracy"]
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", type=Path, help="RLHF_REWARD_CHECK_OUT of the Rust test")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--inputs", type=Path, default=FIXTURES / "reward" / "inputs.json")
    ap.add_argument("--scores", type=Path)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--pairs", type=Path)
    ap.add_argument("--results", type=Path)
    a = ap.parse_args()
    if a.pairs is not None:
        return check_run(a)
    inputs = json.loads(a.inputs.read_text())
    errs = []
    if a.model is not None:
        errs.append(check(a.model, a.adapter, inputs, a.scores))
    else:
        if a.out is None:
            ap.error("give OUT or --model")
        for case, base in BASES.items():
            ad = a.out / f"{case}_adapter"
            if ad.is_dir():
                errs.append(check(base, ad, inputs, ad / "scores.safetensors"))
            md = a.out / f"{case}_model"
            if md.is_dir():
                cfg = json.loads((md / "config.json").read_text())
                assert cfg["architectures"][0].endswith("ForSequenceClassification"), cfg["architectures"]
                errs.append(check(md, None, inputs, md / "scores.safetensors"))
    if not errs:
        print("nothing checked")
        return 1
    bad = [e for e in errs if not e <= a.tol]
    print(f"{len(errs)} checked, {len(bad)} over {a.tol}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
