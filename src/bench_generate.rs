//! `rlhf bench --generate`: generation speed of the KV-cache generator on a
//! bench model shape with random weights: prefill tokens/s (the prompts'
//! tokens through the model once) and decode tokens/s (the steps after it,
//! one token per row each), at batch 1 and 8 (or --batch_size), greedy, no EOS, medians over
//! rounds. `bench/generate_pytorch.py` measures transformers' `generate` on
//! the same shapes.

use crate::bench::{median, BenchArgs, Setup};
use anyhow::{bail, Result};
use rlhf_kernels::Backend;
use rlhf_worker::model::generate::{generate_timed, numbered_word_tokenizer, GenerationConfig};
use rlhf_worker::model::Llama;
use serde_json::json;

/// Batch sizes measured.
const BATCHES: [usize; 2] = [1, 8];

pub fn run<B: Backend>(a: &BenchArgs, s: &Setup, model: &mut Llama<B>) -> Result<()> {
    if a.steps == 0 {
        bail!("--steps (generation rounds) must be ≥ 1");
    }
    let (p, n) = (a.prompt_len, a.gen_tokens);
    if p == 0 || n < 2 {
        bail!("need --prompt_len ≥ 1 and --gen_tokens ≥ 2");
    }
    // Every new token is decoded for streaming, as a chat would.
    let tok = numbered_word_tokenizer(s.cfg.vocab_size)?;
    let cfg = GenerationConfig {
        max_new_tokens: n,
        eos_token_ids: Vec::new(),
        ..GenerationConfig::default()
    };
    let mut rows = Vec::new();
    // --batch_size picks one batch size instead of both.
    let batches = a.batch_size.map_or(BATCHES.to_vec(), |b| vec![b]);
    for b in batches {
        // Deterministic prompts of P tokens (no padding).
        let prompts: Vec<Vec<u32>> = (0..b)
            .map(|r| {
                (0..p)
                    .map(|j| ((r * 7919 + j * 104_729 + 17) % s.cfg.vocab_size) as u32)
                    .collect()
            })
            .collect();
        let (mut pre, mut dec) = (Vec::new(), Vec::new());
        for round in 0..a.warmup + a.steps {
            let (_, t) = generate_timed(model, &tok, &prompts, &cfg, &mut |_, _| {})?;
            if t.decode_tokens != b * (n - 1) {
                bail!(
                    "expected {} decode tokens, got {}",
                    b * (n - 1),
                    t.decode_tokens
                );
            }
            if round >= a.warmup {
                pre.push(t.prefill_tokens as f64 / t.prefill_s);
                dec.push(t.decode_tokens as f64 / t.decode_s);
            }
        }
        let row = json!({
            "model": s.name,
            "backend": model.be.name(),
            "batch": b,
            "prompt_len": p,
            "new_tokens": n,
            "rounds": a.steps,
            "prefill_tokens_per_sec": median(&pre),
            "decode_tokens_per_sec": median(&dec),
        });
        if a.json {
            println!("{row}");
        } else {
            println!(
                "generate {} b={b} prompt {p} + {n} new: prefill {:.0} tokens/s, decode {:.1} tokens/s (median of {})",
                s.name,
                median(&pre),
                median(&dec),
                a.steps
            );
        }
        rows.push(row);
    }
    Ok(())
}
