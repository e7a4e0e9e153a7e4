#!/usr/bin/env python3
"""The PyTorch side of the PPO memory benchmark (bench/ppo_memory.sh), its inputs and its report.

    python bench/ppo_memory_torch.py data DIR           # DIR/corpus.txt, DIR/pairs/, DIR/prompts/ (deterministic)
    python bench/ppo_memory_torch.py run DIR LAYOUT     # PPO iterations in PyTorch on DIR/base, one JSON line
    python bench/ppo_memory_torch.py bytes DIR          # parameter-byte arithmetic of DIR/base, JSON
    python bench/ppo_memory_torch.py report DIR OUT     # DIR/times/*.txt -> OUT.json + OUT.md

LAYOUT (how the four PPO roles hold the base weights; everything f32, CPU, one thread):
  four-copies   policy = base + LoRA (r 8, alpha 32, all seven linears) + value head; reference, reward
                model and value model each a separate copy; trainable: the LoRA and the value model's
                score head (the same trainable set as `rlhf ppo`, so only the copies differ)
  ppov2-lora    TRL 0.15 PPOv2 as MedicalGPT ran it with --use_peft: reference = the policy with its
                adapter disabled; reward model and value model separate; the value model fully trained
                (PPOv2 optimises PolicyAndValueWrapper.parameters(): LoRA + every value-model weight)
  classic-peft  TRL 0.7 + PEFT (MedicalGPT's classic ppo_training.py): policy = base + LoRA + value head,
                reference = adapter disabled, reward model separate (two copies, like `rlhf ppo` with
                --reward_base_model_name_or_path on a copy of the base)
  floor         import torch, transformers and peft, nothing else (the interpreter's own memory)

Each iteration: sample `batch` responses of exactly `new` tokens (top_k 0, temperature 1), score them
with the reward model, log-probabilities of the policy and the reference and values with no grad, then
`epochs` passes of mini-batches of `mini`: policy + value forward with grad, clipped PPO loss, backward,
AdamW step. The numbers are not PPO-exact (no KL controller, plain advantages): the work is the same in
kind, which is what memory and time depend on.
"""
import json
import random
import sys
import time
from pathlib import Path

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

WORDS_SEED = 0


def data(d: Path):
    """A corpus rich enough for an 8000-token BPE, preference pairs and prompts (ShareGPT)."""
    rng = random.Random(WORDS_SEED)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(30000)]
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "corpus.txt", "w") as f:
        for _ in range(12000):
            f.write(" ".join(rng.choice(words) for _ in range(rng.randint(8, 24))) + ".\n")

    def sentence(n):
        return " ".join(rng.choice(words[:2000]) for _ in range(n))

    (d / "pairs").mkdir(exist_ok=True)
    with open(d / "pairs" / "train.jsonl", "w") as f:
        for _ in range(16):
            q = sentence(10) + "?"
            f.write(json.dumps({"conversations": [{"from": "human", "value": q}],
                                "chosen": sentence(12), "rejected": sentence(4)}) + "\n")
    (d / "prompts").mkdir(exist_ok=True)
    with open(d / "prompts" / "train.jsonl", "w") as f:
        for _ in range(32):
            f.write(json.dumps({"conversations": [{"from": "human", "value": sentence(12) + "?"},
                                                  {"from": "gpt", "value": "x"}]}) + "\n")


def vicuna(q: str) -> str:
    # MedicalGPT's vicuna template (the one `rlhf ppo --template_name vicuna` formats prompts with).
    return ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
            "helpful, detailed, and polite answers to the user's questions. USER: " + q + " ASSISTANT:")


def param_count(cfg) -> dict:
    c, f, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (c // cfg["num_attention_heads"])
    per_layer = c * c * 2 + c * kv * 2 + 3 * c * f + 2 * c
    heads = v * c * (1 if cfg.get("tie_word_embeddings") else 2)
    base = L * per_layer + c + heads
    r = 8
    shapes = [(c, c), (c, kv), (c, kv), (c, c), (c, f), (c, f), (f, c)]  # (in, out) of each linear
    lora = L * sum(r * (i + o) for i, o in shapes)
    # A *ForSequenceClassification copy has the score head in place of lm_head.
    seq_cls = base - v * c + c if not cfg.get("tie_word_embeddings") else base + c
    return {"base": base, "seq_cls_copy": seq_cls, "lora_r8_all_linear": lora, "value_head": c + 1,
            "score_head": c}


def bytes_(d: Path):
    cfg = json.loads((d / "base" / "config.json").read_text())
    p = param_count(cfg)
    mib = lambda n: round(n * 4 / 2**20, 2)  # f32
    out = {
        "config": {k: cfg[k] for k in ["hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads", "vocab_size"]},
        "params": p,
        "f32_MiB": {
            "base": mib(p["base"]),
            "base_x1_shared": mib(p["base"]),
            "seq_cls_copy": mib(p["seq_cls_copy"]),
            "rm_on_own_copy_total": mib(p["base"] + p["seq_cls_copy"]),
            "ppov2_lora_total_policy_rm_value": mib(p["base"] + 2 * p["seq_cls_copy"]),
            "four_copies_total_policy_ref_rm_value": mib(2 * p["base"] + 2 * p["seq_cls_copy"]),
            "lora_adapter": mib(p["lora_r8_all_linear"]),
            "lora_adapter_with_grad_and_adamw": mib(4 * p["lora_r8_all_linear"]),
            "value_head_bytes": p["value_head"] * 4,
            "full_value_model_grad_and_adamw": mib(3 * p["seq_cls_copy"]),
        },
    }
    print(json.dumps(out, indent=1))
    return out


def run(d: Path, layout: str, iters=2, batch=8, mini=4, epochs=2, new=64, seed=0):
    t0 = time.perf_counter()
    import torch
    import transformers
    import peft
    torch.set_num_threads(1)
    if layout == "floor":
        print(json.dumps({"layout": layout, "torch": torch.__version__, "wall_s": time.perf_counter() - t0}))
        return
    from peft import LoraConfig, get_peft_model
    from transformers import (LlamaForCausalLM, LlamaForSequenceClassification,
                              PreTrainedTokenizerFast)
    torch.manual_seed(seed)
    base = d / "base"
    tok = PreTrainedTokenizerFast(tokenizer_file=str(base / "tokenizer.json"))
    pad = tok.convert_tokens_to_ids("<unk>") if tok.convert_tokens_to_ids("<unk>") is not None else 0
    f32 = dict(dtype=torch.float32)

    def causal():
        m = LlamaForCausalLM.from_pretrained(base, **f32)
        m.config.pad_token_id = pad
        return m

    def seq_cls():
        m = LlamaForSequenceClassification.from_pretrained(base, num_labels=1, **f32)
        m.config.pad_token_id = pad
        return m

    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    policy = get_peft_model(causal(), lora)
    hidden = policy.config.hidden_size
    reward = seq_cls().eval().requires_grad_(False)
    ref = None
    value_model = None
    value_head = None
    if layout == "four-copies":
        ref = causal().eval().requires_grad_(False)
        value_model = seq_cls()
        value_model.model.requires_grad_(False)  # backbone frozen: only the score head trains
    elif layout == "ppov2-lora":
        value_model = seq_cls()  # every weight trains, as in PPOv2
    elif layout == "classic-peft":
        value_head = torch.nn.Linear(hidden, 1)
    else:
        raise SystemExit(f"unknown layout {layout!r}")
    trainable = [p for p in policy.parameters() if p.requires_grad]
    if value_model is not None:
        trainable += [p for p in value_model.parameters() if p.requires_grad]
    if value_head is not None:
        trainable += list(value_head.parameters())
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    n_trainable = sum(p.numel() for p in trainable)

    prompts = [json.loads(l)["conversations"][0]["value"]
               for l in (d / "prompts" / "train.jsonl").read_text().splitlines()]
    tok.padding_side = "left"
    tok.pad_token = tok.convert_ids_to_tokens(pad)

    def policy_outputs(ids, mask):
        """Per-token log-probs of ids[:, 1:] and per-token values (grad as the caller's context allows)."""
        out = policy(input_ids=ids, attention_mask=mask, output_hidden_states=value_head is not None)
        logp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        if value_head is not None:
            values = value_head(out.hidden_states[-1])[:, :-1, 0]
        else:
            h = value_model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            values = value_model.score(h)[:, :-1, 0]
        return logp, values

    def ref_logp(ids, mask):
        if ref is not None:
            logits = ref(input_ids=ids, attention_mask=mask).logits
        else:
            with policy.disable_adapter():
                logits = policy(input_ids=ids, attention_mask=mask).logits
        return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]

    t_load = time.perf_counter() - t0
    for it in range(iters):
        qs = [vicuna(prompts[(it * batch + i) % len(prompts)]) for i in range(batch)]
        enc = tok(qs, return_tensors="pt", padding=True)
        with torch.no_grad():
            seqs = policy.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                   max_new_tokens=new, min_new_tokens=new, pad_token_id=pad)
            mask = torch.cat([enc["attention_mask"], torch.ones(batch, new, dtype=torch.long)], 1)
            scores = reward(input_ids=seqs, attention_mask=mask).logits[:, 0]
            old_logp, old_values = policy_outputs(seqs, mask)
            ref_lp = ref_logp(seqs, mask)
        resp = slice(seqs.shape[1] - new - 1, None)  # positions predicting the response tokens
        rewards = -0.2 * (old_logp - ref_lp)[:, resp]
        rewards[:, -1] += scores
        adv = rewards.flip(1).cumsum(1).flip(1) - old_values[:, resp]
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        returns = adv + old_values[:, resp]
        for _ in range(epochs):
            for idx in torch.randperm(batch).split(mini):
                logp, values = policy_outputs(seqs[idx], mask[idx])
                ratio = torch.exp(logp[:, resp] - old_logp[idx][:, resp])
                pg = torch.max(-adv[idx] * ratio, -adv[idx] * ratio.clamp(0.8, 1.2)).mean()
                vf = 0.5 * ((values[:, resp] - returns[idx]) ** 2).mean()
                (pg + 0.1 * vf).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
    print(json.dumps({"layout": layout, "torch": torch.__version__, "transformers": transformers.__version__,
                      "peft": peft.__version__, "load_s": round(t_load, 2),
                      "wall_s": round(time.perf_counter() - t0, 2), "trainable_params": n_trainable,
                      "prompt_tokens": int(enc["input_ids"].shape[1]), "iterations": iters}))


def report(d: Path, out: Path):
    """DIR/times/<round>-<config>.txt (`/usr/bin/time -f '%e %M'` output, last line) -> JSON + markdown."""
    import statistics
    runs = {}
    for f in sorted((d / "times").glob("*.txt")):
        rnd, cfg = f.stem.split("-", 1)
        wall, kb = f.read_text().strip().splitlines()[-1].split()
        log = d / f"{f.stem}.log"
        printed = [l for l in log.read_text().splitlines() if l.startswith("{")] if log.exists() else []
        runs.setdefault(cfg, []).append({"round": int(rnd), "wall_s": float(wall), "peak_rss_MiB": int(kb) / 1024,
                                         "printed": json.loads(printed[-1]) if printed else None})
    arith = bytes_(d)
    copies = {"rlhf-shared": 1, "rlhf-shared-fb4": 1, "rlhf-rm-copy": 2, "torch-classic-peft": 2, "torch-ppov2-lora": 3,
              "torch-four-copies": 4, "torch-floor": 0}
    med = {c: {k: statistics.median(r[k] for r in rs) for k in ["wall_s", "peak_rss_MiB"]} for c, rs in runs.items()}
    json.dump({"runs": runs, "medians": med, "bytes": arith}, open(out.with_suffix(".json"), "w"), indent=1)
    ref = med.get("rlhf-shared")
    floor = med.get("torch-floor", {}).get("peak_rss_MiB")
    lines = ["| config | copies of the base | peak RSS MiB (median) | × rlhf shared | above the interpreter floor MiB "
             "| wall s (median) | rounds (RSS MiB / s) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for c in ["rlhf-shared", "rlhf-shared-fb4", "rlhf-rm-copy", "torch-classic-peft", "torch-ppov2-lora", "torch-four-copies", "torch-floor"]:
        if c not in med:
            continue
        m = med[c]
        ratio = f"{m['peak_rss_MiB'] / ref['peak_rss_MiB']:.2f}×" if ref else ""
        rounds = ", ".join(f"{r['peak_rss_MiB']:.0f} / {r['wall_s']:.1f}" for r in sorted(runs[c], key=lambda r: r["round"]))
        above = f"{m['peak_rss_MiB'] - floor:.0f}" if floor and c.startswith("torch-") and c != "torch-floor" else ""
        lines.append(f"| {c} | {copies[c]} | {m['peak_rss_MiB']:.0f} | {ratio} | {above} | {m['wall_s']:.1f} | {rounds} |")
    text = "\n".join(lines) + "\n\nParameter bytes (f32, MiB):\n\n```\n" + json.dumps(arith, indent=1) + "\n```\n"
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    cmd, d = sys.argv[1], Path(sys.argv[2])
    if cmd == "data":
        data(d)
    elif cmd == "run":
        run(d, sys.argv[3])
    elif cmd == "bytes":
        bytes_(d)
    elif cmd == "report":
        report(d, Path(sys.argv[3]))
    else:
        raise SystemExit(__doc__)
