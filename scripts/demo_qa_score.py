#!/usr/bin/env python3
"""Score `rlhf generate` replies to the demo's held-out questions, per kind of
question, as `rlhf sft --eval_qa_file` does (the short answer, whole words,
case-insensitive), and strictly (the reply is exactly the right sentence).
Use it for sampled replies, which the SFT stage does not measure:

    python3 -c "import json,sys
    for l in open(sys.argv[1]): print(json.dumps({'prompt': json.loads(l)['question']}))" \\
        out/pipeline/demo/data/heldout_qa.jsonl > questions.jsonl
    rlhf generate --model_name_or_path MODEL [--peft_path ADAPTER] --template_name chat_template \\
        --prompts_file questions.jsonl --output_file replies.jsonl --max_new_tokens 40 \\
        --do_sample true --temperature 1.0 --top_k 0 --top_p 1.0 --seed 1
    python3 scripts/demo_qa_score.py out/pipeline/demo/data/heldout_qa.jsonl replies.jsonl

Standard library only.
"""
import json
import sys
from collections import Counter

# The question forms of worker/src/demo.rs, by a phrase only that form has.
KINDS = [("dose", "dose of"), ("drug", "drug of choice"), ("symptoms", "symptoms of"),
         ("organ", "which organ"), ("cause", "cause of"), ("course", "course of"),
         ("contra", "contraindicated")]


def kind(question):
    q = question.lower()
    return next((k for k, phrase in KINDS if phrase in q), "other")


def answered(short, text):
    """Whole-word containment: " 50 mg" must not match inside " 250 mg"."""
    text, short = " " + text.lower(), " " + short.lower()
    i = text.find(short)
    while i >= 0:
        end = i + len(short)
        if end >= len(text) or not text[end].isalnum():
            return True
        i = text.find(short, i + 1)
    return False


def main(heldout, replies):
    items = [json.loads(l) for l in open(heldout, encoding="utf-8")]
    outs = [json.loads(l) for l in open(replies, encoding="utf-8")]
    if len(items) != len(outs):
        sys.exit(f"{replies}: {len(outs)} replies for {len(items)} questions in {heldout}")
    right, total, strict = Counter(), Counter(), 0
    for item, out in zip(items, outs):
        k = kind(item["question"])
        total[k] += 1
        right[k] += answered(item["short"], out["completion"])
        strict += out["completion"].strip() == item["answer"].strip()
    n = len(items)
    per_kind = " ".join(f"{k}:{right[k]}/{total[k]}" for k in total)
    print(f"{sum(right.values())}/{n} = {sum(right.values()) / n:.3f} right "
          f"(exact sentence {strict}/{n} = {strict / n:.3f}) | {per_kind}")


if __name__ == "__main__":
    main(*sys.argv[1:])
