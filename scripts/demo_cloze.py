#!/usr/bin/env python3
"""Does a demo model know the held-out facts? Cuts each held-out answer (a
sentence of the PT corpus, e.g. "The cause of Busar palsy is the Koskos
prion.") before its value, lets `rlhf generate` complete it without any chat
template, and scores the completions.

    python3 scripts/demo_cloze.py prompts out/pipeline/demo/data/heldout_qa.jsonl > cloze.jsonl
    target/release/rlhf generate --model_name_or_path out/pipeline/pt \\
        --prompts_file cloze.jsonl --output_file cloze_out.jsonl --max_new_tokens 12
    python3 scripts/demo_cloze.py score cloze.jsonl cloze_out.jsonl

Standard library only.
"""
import json
import sys


def prompts(heldout):
    for n, line in enumerate(open(heldout, encoding="utf-8"), 1):
        item = json.loads(line)
        cut = item["answer"].rfind(item["short"])
        if cut <= 0:
            sys.exit(f"{heldout}:{n}: the answer does not state the short answer after its first word")
        print(json.dumps({"prompt": item["answer"][:cut].rstrip(), "short": item["short"]}))


def score(cloze, completions):
    items = [json.loads(l) for l in open(cloze, encoding="utf-8")]
    outs = [json.loads(l) for l in open(completions, encoding="utf-8")]
    right = sum(i["short"].lower() in o["completion"].lower() for i, o in zip(items, outs))
    print(f"{right} of {len(items)} held-out facts completed correctly")


if __name__ == "__main__":
    {"prompts": prompts, "score": score}[sys.argv[1]](*sys.argv[2:])
