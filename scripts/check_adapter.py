#!/usr/bin/env python3
"""Check a LoRA adapter written by our Rust trainer against PyTorch + PEFT.

Loads BASE_DIR with transformers, applies ADAPTER_DIR with
peft.PeftModel.from_pretrained, runs one forward pass on the given token ids
and compares the logits with the `logits` tensor in LOGITS_FILE (safetensors,
shape [T, V] or [1, T, V], as written by the Rust side for the same tokens).

    python scripts/check_adapter.py BASE_DIR ADAPTER_DIR LOGITS_FILE --tokens 1,2,3,4

Prints max |diff| and the relative error max|diff| / max|torch logits|;
exits 1 if the relative error exceeds --tol (default 1e-4).
For manual verification only (CI has no Python). Needs torch, transformers,
peft, safetensors.
"""

import argparse
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def parse_tokens(s: str) -> list[int]:
    return [int(t) for t in s.replace(",", " ").split()]


def compare(ref: torch.Tensor, path: str, tol: float) -> int:
    got = load_file(path)["logits"].float()
    ref = ref.float().reshape(-1, ref.shape[-1])  # [T, V]
    got = got.reshape(-1, got.shape[-1])
    if got.shape != ref.shape:
        print(f"shape mismatch: torch {tuple(ref.shape)} vs file {tuple(got.shape)}")
        return 1
    diff = (got - ref).abs().max().item()
    rel = diff / max(ref.abs().max().item(), 1e-12)
    print(f"max|diff| = {diff:.3e}  rel = {rel:.3e}  (tol {tol:.0e})")
    if rel > tol:
        print("FAIL")
        return 1
    print("OK")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base_dir")
    ap.add_argument("adapter_dir")
    ap.add_argument("logits_file", help="safetensors file with key 'logits'")
    ap.add_argument("--tokens", required=True, help="token ids, comma or space separated")
    ap.add_argument("--tol", type=float, default=1e-4, help="max relative error")
    args = ap.parse_args()

    base = AutoModelForCausalLM.from_pretrained(args.base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.adapter_dir).eval()
    ids = torch.tensor([parse_tokens(args.tokens)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    return compare(logits, args.logits_file, args.tol)


if __name__ == "__main__":
    sys.exit(main())
