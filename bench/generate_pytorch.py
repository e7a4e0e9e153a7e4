#!/usr/bin/env python3
"""The transformers side of `rlhf bench --generate`: the same model shape
(random weights), the same prompts shape, greedy `model.generate` with the KV
cache, fp32 on CPU, printing the same JSON lines.

    python bench/generate_pytorch.py --model medium --steps 3 --warmup 1 --json

prefill tokens/s: B·P prompt tokens / the time of one forward of the prompts
with use_cache=True (what generate's first step does).
decode tokens/s: B·(N−1) / (time of generate(max_new_tokens=N) − time of
generate(max_new_tokens=1)): the N−1 steps after the first token, as
`rlhf bench --generate` counts them.
"""

import argparse
import json
import os
import statistics
import time

MODELS = {
    # the same presets as src/bench.rs
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "medium": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=4),
}
VOCAB = 8000
BATCHES = [1, 8]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="medium", choices=MODELS)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompt_len", type=int, default=128)
    ap.add_argument("--gen_tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("RAYON_NUM_THREADS", "0")) or os.cpu_count())
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(42)
    p = MODELS[a.model]
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=max(256, a.prompt_len + a.gen_tokens),
                      rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                      attn_implementation=a.attn, **p)
    model = LlamaForCausalLM(cfg).eval()
    n, plen = a.gen_tokens, a.prompt_len
    for b in BATCHES:
        ids = torch.tensor([[(r * 7919 + j * 104729 + 17) % VOCAB for j in range(plen)] for r in range(b)])
        mask = torch.ones_like(ids)
        kw = dict(attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=0)

        def gen(k):
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=k, min_new_tokens=k, **kw)
            dt = time.perf_counter() - t0
            assert out.shape[1] == plen + k
            return dt

        def prefill():
            t0 = time.perf_counter()
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, use_cache=True)
            return time.perf_counter() - t0

        pre, dec = [], []
        for rnd in range(a.warmup + a.steps):
            tp = prefill()
            t1 = gen(1)
            tn = gen(n)
            if rnd >= a.warmup:
                pre.append(b * plen / tp)
                dec.append(b * (n - 1) / (tn - t1))
        row = dict(impl="transformers", model=a.model, batch=b, prompt_len=plen, new_tokens=n,
                   rounds=a.steps, threads=a.threads, attn=a.attn, torch=torch.__version__,
                   prefill_tokens_per_sec=statistics.median(pre),
                   decode_tokens_per_sec=statistics.median(dec))
        if a.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"transformers {a.model} b={b} prompt {plen} + {n} new: prefill "
                  f"{row['prefill_tokens_per_sec']:.0f} tokens/s, decode {row['decode_tokens_per_sec']:.1f} tokens/s",
                  flush=True)


if __name__ == "__main__":
    main()
