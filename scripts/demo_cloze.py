#!/usr/bin/env python3
"""Does a demo model know the held-out facts? Turns the held-out questions of
four kinds (dose, drug, organ, cause) into statements to complete, as the PT
corpus states them, and scores `rlhf generate`'s completions.

    python3 scripts/demo_cloze.py prompts out/pipeline/demo/data/heldout_qa.jsonl > cloze.jsonl
    target/release/rlhf generate --model_name_or_path out/pipeline/pt \\
        --prompts_file cloze.jsonl --output_file cloze_out.jsonl --max_new_tokens 12
    python3 scripts/demo_cloze.py score cloze.jsonl cloze_out.jsonl

Standard library only.
"""
import json
import re
import sys

FORMS = [
    (r"What is the dose of (\S+) for (.+)\?", "The dose of {0} for {1} is"),
    (r"Which drug is used to treat (.+)\?", "{0} is treated with"),
    (r"Which organ does (.+) affect\?", "{0} is a disease of the"),
    (r"What causes (.+)\?", "{0} is caused by"),
]


def prompts(heldout):
    for line in open(heldout, encoding="utf-8"):
        item = json.loads(line)
        for pattern, statement in FORMS:
            m = re.fullmatch(pattern, item["question"])
            if m:
                print(json.dumps({"prompt": statement.format(*m.groups()), "short": item["short"]}))


def score(cloze, completions):
    items = [json.loads(l) for l in open(cloze, encoding="utf-8")]
    outs = [json.loads(l) for l in open(completions, encoding="utf-8")]
    right = sum(i["short"].lower() in o["completion"].lower() for i, o in zip(items, outs))
    print(f"{right} of {len(items)} held-out facts completed correctly")


if __name__ == "__main__":
    {"prompts": prompts, "score": score}[sys.argv[1]](*sys.argv[2:])
