#!/usr/bin/env python3
"""Check `rlhf eval`'s loss against PyTorch + transformers (+ PEFT).

Loads MODEL_DIR with AutoModelForCausalLM and AutoTokenizer (and, with
--adapter, applies it with peft.PeftModel.from_pretrained), packs FILE as
`rlhf pt`/`rlhf eval` do (one document per .txt line with its "\\n", or per
{"text": ...} JSONL record; tokenizer(text) + EOS unless already last;
concatenated and cut into block_size blocks, the remainder dropped), and
computes the token-weighted mean next-token loss. Compares it with the JSON
that `rlhf eval` printed (--rlhf-json FILE or - for stdin).

    rlhf eval --model_name_or_path M [--peft_path A] --validation_file F --block_size 32 > ours.json
    python scripts/check_eval_loss.py M F --block-size 32 [--adapter A] --rlhf-json ours.json

Exits 1 if the token counts differ or |loss diff| / loss > --tol (1e-4).
For manual verification only (CI has no Python). Needs torch, transformers, peft.
A single batch of up to 1000 documents (MedicalGPT packs per 1000).
"""

import argparse
import json
import math
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def documents(path: str) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    if path.endswith(".txt"):
        return text.replace("\r\n", "\n").replace("\r", "\n").splitlines(keepends=True)
    return [json.loads(line)["text"] for line in text.split("\n") if line.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("file", help=".txt or .jsonl validation file")
    ap.add_argument("--block-size", type=int, required=True)
    ap.add_argument("--adapter", help="PEFT adapter dir")
    ap.add_argument("--rlhf-json", required=True, help="rlhf eval's output (- for stdin)")
    ap.add_argument("--tol", type=float, default=1e-4, help="max relative loss difference")
    args = ap.parse_args()

    ours = json.load(sys.stdin if args.rlhf_json == "-" else open(args.rlhf_json))
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    docs = documents(args.file)
    assert len(docs) <= 1000, "one packing batch only"
    stream: list[int] = []
    for d in docs:
        ids = tok(d)["input_ids"]
        stream += ids if ids and ids[-1] == tok.eos_token_id else ids + [tok.eos_token_id]
    bs = args.block_size
    n = len(stream) // bs if len(stream) >= bs else 1
    blocks = torch.tensor([stream[i * bs:(i + 1) * bs] for i in range(n)])

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for chunk in blocks.split(8):
            logits = model(input_ids=chunk).logits[:, :-1].double()
            targets = chunk[:, 1:]
            loss_sum += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            ).item()
            tokens += targets.numel()
    loss = loss_sum / tokens
    rel = abs(loss - ours["loss"]) / loss
    print(f"torch:  loss {loss:.10f}  perplexity {math.exp(loss):.6f}  tokens {tokens}  blocks {len(blocks)}")
    print(f"rlhf:   loss {ours['loss']:.10f}  perplexity {ours['perplexity']:.6f}  tokens {ours['tokens']}  blocks {ours['blocks']}")
    print(f"rel. loss diff {rel:.3e}  (tol {args.tol:.0e})")
    if tokens != ours["tokens"] or rel > args.tol:
        print("FAIL")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
