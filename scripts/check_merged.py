#!/usr/bin/env python3
"""Check a dir written by `rlhf merge` with transformers itself (manual, not run in CI).

    rlhf merge --model_name_or_path worker/tests/fixtures/llama_gqa/model \
               --peft_path worker/tests/fixtures/llama_gqa/adapter_mts --output_dir /tmp/merged
    python scripts/check_merged.py /tmp/merged

    rlhf merge --model_name_or_path worker/tests/fixtures/llama_gqa/model \
               --peft_path worker/tests/fixtures/merge/adapter_seqcls --output_dir /tmp/merged_rm
    python scripts/check_merged.py /tmp/merged_rm --seqcls

Loads MERGED_DIR with AutoModelForCausalLM (or AutoModelForSequenceClassification
with --seqcls), runs the fixture batch (worker/tests/fixtures/llama_gqa/inputs.json)
and compares with what PEFT's merge_and_unload gave in
worker/tests/fixtures/merge/expected_{causal,seqcls}.safetensors. Also checks that
the loader reported no missing or unexpected weights. Exit 1 if
max|diff| / max|reference| > --tol (default 1e-4).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

FIXTURES = Path(__file__).resolve().parent.parent / "worker" / "tests" / "fixtures"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("merged_dir")
    ap.add_argument("--seqcls", action="store_true", help="a merged reward (SEQ_CLS) adapter")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    doc = json.loads((FIXTURES / "llama_gqa" / "inputs.json").read_text())
    ids, mask = torch.tensor(doc["input_ids"]), torch.tensor(doc["attention_mask"])
    cls = AutoModelForSequenceClassification if args.seqcls else AutoModelForCausalLM
    model, info = cls.from_pretrained(
        args.merged_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    model.eval()
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        print("loading problems:", bad)
        return 1
    with torch.no_grad():
        if args.seqcls:
            got = model(input_ids=ids[:1]).logits
            ref = load_file(str(FIXTURES / "merge" / "expected_seqcls.safetensors"))["scores"]
        else:
            got = model(input_ids=ids, attention_mask=mask).logits
            ref = load_file(str(FIXTURES / "merge" / "expected_causal.safetensors"))["logits"]
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    print(f"{type(model).__name__} from {args.merged_dir}: max|diff|/max|ref| = {err:.3e} (tol {args.tol})")
    return 0 if err <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
