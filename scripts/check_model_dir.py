#!/usr/bin/env python3
"""Check a full model directory written by our Rust trainer against PyTorch.

Loads MODEL_DIR with AutoModelForCausalLM (and AutoTokenizer, when the
directory has tokenizer files), runs one forward pass and compares the logits
with the `logits` tensor in LOGITS_FILE (safetensors, shape [T, V] or
[1, T, V], written by the Rust side for the same tokens).

    python scripts/check_model_dir.py MODEL_DIR LOGITS_FILE --tokens 1,2,3,4
    python scripts/check_model_dir.py MODEL_DIR LOGITS_FILE --text "Hello world"

--text needs a loadable tokenizer; the ids used are printed so the Rust side
can be run on the same ones. Exits 1 if max|diff| / max|torch logits| > --tol
(default 1e-4). For manual verification only (CI has no Python).
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_adapter import compare, parse_tokens  # noqa: E402

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "tokenizer.model"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("logits_file", help="safetensors file with key 'logits'")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", help="token ids, comma or space separated")
    src.add_argument("--text", help="text to tokenize with the directory's tokenizer")
    ap.add_argument("--tol", type=float, default=1e-4, help="max relative error")
    args = ap.parse_args()

    # transformers 5 may build an empty tokenizer from config.json alone, so
    # only load one when the directory actually has tokenizer files.
    tok = None
    tok_files = [f for f in TOKENIZER_FILES if (Path(args.model_dir) / f).exists()]
    if tok_files:
        tok = AutoTokenizer.from_pretrained(args.model_dir)
        print(f"tokenizer: {type(tok).__name__}, {len(tok)} tokens (from {', '.join(tok_files)})")
    else:
        print("tokenizer: none in MODEL_DIR (fine for the test fixtures)")

    if args.text is not None:
        if tok is None:
            print("--text needs a tokenizer in MODEL_DIR")
            return 1
        ids = tok(args.text, return_tensors="pt").input_ids
    else:
        ids = torch.tensor([parse_tokens(args.tokens)])
    print("token ids:", ids[0].tolist())

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    return compare(logits, args.logits_file, args.tol)


if __name__ == "__main__":
    sys.exit(main())
