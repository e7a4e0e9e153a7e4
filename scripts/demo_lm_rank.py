#!/usr/bin/env python3
"""How often does a model's own likelihood rank the demo's held-out reward pairs
right? Writes each held-out answer and wrong answer (both sentences of the PT
corpus's form) to a file, has `rlhf eval` compute its loss, and compares the
total log-likelihoods. A reference for the reward model: what the knowledge it
starts from can tell apart.

    python3 scripts/demo_lm_rank.py RLHF_BINARY MODEL_DIR out/pipeline/demo/data/heldout_qa.jsonl

Standard library only.
"""
import json
import os
import subprocess
import sys
import tempfile


def total_nll(rlhf, model, text, tmp):
    path = os.path.join(tmp, "one.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    run = subprocess.run([rlhf, "eval", "--model_name_or_path", model, "--validation_file", path],
                         capture_output=True, text=True, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return result["loss"] * result["tokens"]


def main(rlhf, model, heldout):
    items = [json.loads(l) for l in open(heldout, encoding="utf-8")]
    with tempfile.TemporaryDirectory() as tmp:
        right = sum(total_nll(rlhf, model, i["answer"], tmp) < total_nll(rlhf, model, i["wrong"], tmp)
                    for i in items)
    print(f"{model}: the LM's likelihood ranks {right}/{len(items)} held-out pairs right "
          f"({right / len(items):.3f})")


if __name__ == "__main__":
    main(*sys.argv[1:])
