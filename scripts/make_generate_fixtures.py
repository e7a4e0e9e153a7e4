#!/usr/bin/env python3
"""Reference greedy generations from transformers for the Rust KV-cache generator.

Usage (from the repository root, after scripts/make_fixtures.py):

    python scripts/make_generate_fixtures.py   # writes worker/tests/fixtures/generate/cases.json

Uses the existing tiny fixture models (llama_gqa, qwen2, llama_tied) and their
LoRA adapters (PEFT, unmerged). Each case: a LEFT-padded batch of 3 prompts of
different lengths, `model.generate(do_sample=False)` in float32 with eager
attention, max_new_tokens 16; with and without repetition_penalty; and once
with eos_token_id set to a token that the unconstrained run produces mid-way
in row 0 (early stop of that row). Deterministic (fixed seeds, CPU).

Every prompt starts with token 1 and the padding id is 1, so the set of ids
transformers' repetition penalty sees in a padded row (it includes the pads)
is exactly the prompt's. Every greedy step's top-2 logit margin is checked to
be > 1e-4, so float rounding cannot flip an argmax.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "worker" / "tests" / "fixtures"
OUT = FIXTURES / "generate"

PAD = 1
MAX_NEW = 16
PROMPT_LENS = [5, 9, 3]
MIN_MARGIN = 1e-4


def prompts(seed: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in PROMPT_LENS:
        ids = torch.randint(3, vocab, (n - 1,), generator=g).tolist()
        out.append([PAD] + ids)
    return out


def left_pad(ps: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(p) for p in ps)
    ids = torch.full((len(ps), t), PAD, dtype=torch.long)
    mask = torch.zeros((len(ps), t), dtype=torch.long)
    for i, p in enumerate(ps):
        ids[i, t - len(p) :] = torch.tensor(p)
        mask[i, t - len(p) :] = 1
    return ids, mask


def load(case: str, adapter: bool):
    model = AutoModelForCausalLM.from_pretrained(
        FIXTURES / case / "model", dtype=torch.float32, attn_implementation="eager"
    )
    if adapter:
        model = PeftModel.from_pretrained(model, FIXTURES / case / "adapter")
    model.eval()
    return model


def run(model, ps, eos, penalty):
    ids, mask = left_pad(ps)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=MAX_NEW,
            repetition_penalty=penalty,
            eos_token_id=eos,
            pad_token_id=PAD,
            output_scores=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[:, ids.shape[1] :].tolist()
    rows = []
    for r, seq in enumerate(new):
        toks = []
        for tok in seq:
            toks.append(tok)
            if eos is not None and tok == eos:
                break
        rows.append(toks)
    # The margin of every step that chose a live row's token.
    for step, scores in enumerate(out.scores):
        for r in range(len(ps)):
            if step >= len(rows[r]):
                continue
            top = torch.topk(scores[r], 2).values
            margin = (top[0] - top[1]).item()
            assert margin > MIN_MARGIN, f"row {r} step {step}: top-2 margin {margin}"
    return rows


def main():
    torch.manual_seed(0)
    cases = []
    for i, (case, adapter) in enumerate(
        [("llama_gqa", False), ("llama_gqa", True), ("qwen2", False), ("qwen2", True), ("llama_tied", False)]
    ):
        model = load(case, adapter)
        # No EOS at all for the free runs (the models' configs name id 2 or none).
        model.generation_config.eos_token_id = None
        vocab = model.config.vocab_size
        ps = prompts(100 + i, vocab)
        name = case + ("+adapter" if adapter else "")
        for penalty in [1.0, 1.3]:
            free = run(model, ps, None, penalty)
            assert all(len(r) == MAX_NEW for r in free)
            cases.append(dict(name=f"{name} penalty={penalty}", model=case, adapter=adapter,
                              prompts=ps, repetition_penalty=penalty, eos_token_id=None,
                              max_new_tokens=MAX_NEW, expected=free))
        # EOS: the token row 0 produces at step 5 (its first occurrence there or later).
        eos = free[0][5]
        stopped = run(model, ps, eos, 1.3)
        assert len(stopped[0]) < MAX_NEW and stopped[0][-1] == eos, stopped
        cases.append(dict(name=f"{name} eos={eos}", model=case, adapter=adapter, prompts=ps,
                          repetition_penalty=1.3, eos_token_id=eos, max_new_tokens=MAX_NEW,
                          expected=stopped))
    OUT.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, transformers=transformers.__version__,
                made_by="scripts/make_generate_fixtures.py", pad_token_id=PAD, cases=cases)
    (OUT / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT / 'cases.json'}")


if __name__ == "__main__":
    main()
