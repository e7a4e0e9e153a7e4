//! KV-cache generation against transformers' `generate` (greedy, left-padded
//! batches, repetition penalty, EOS; fixtures by
//! scripts/make_generate_fixtures.py), against our own full forward
//! (recomputing every step), and the sampling / stop-string / streaming rules.

use rlhf_kernels::Cpu;
use rlhf_worker::model::generate::{
    generate, numbered_word_tokenizer, FinishReason, Generated, GenerationConfig, Step, TextStream,
};
use rlhf_worker::model::pretrained::{load_model, read_adapter_config};
use rlhf_worker::model::{Batch, Llama, TrainMode};
use rlhf_worker::tokenizer::{train_byte_level_bpe, Tokenizer};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn model(case: &str, adapter: bool) -> Llama<Cpu> {
    let dir = fixtures().join(case);
    if adapter {
        let lora = read_adapter_config(&dir.join("adapter")).unwrap();
        let mut m = load_model(Cpu, &dir.join("model"), TrainMode::Lora(lora), 0).unwrap();
        m.load_adapter(&dir.join("adapter")).unwrap();
        m
    } else {
        load_model(Cpu, &dir.join("model"), TrainMode::Full, 0).unwrap()
    }
}

/// The fixture models have no tokenizer: token i is the word "t{i}".
fn word_tokenizer(vocab: usize) -> Tokenizer {
    numbered_word_tokenizer(vocab).unwrap()
}

fn greedy(max_new_tokens: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens,
        eos_token_ids: Vec::new(),
        ..GenerationConfig::default()
    }
}

/// Runs `generate`, collecting the streamed text of every row.
fn run(
    m: &mut Llama<Cpu>,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> (Vec<Generated>, Vec<String>) {
    let mut streamed = vec![String::new(); prompts.len()];
    let out = generate(m, tok, prompts, cfg, &mut |r, s| streamed[r].push_str(s)).unwrap();
    (out, streamed)
}

#[test]
fn greedy_generation_matches_transformers_token_for_token() {
    let text = std::fs::read_to_string(fixtures().join("generate/cases.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 15);
    let ids = |x: &serde_json::Value| -> Vec<Vec<u32>> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect()
    };
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let mut m = model(
            case["model"].as_str().unwrap(),
            case["adapter"].as_bool().unwrap(),
        );
        let tok = word_tokenizer(m.cfg.vocab_size);
        let prompts = ids(&case["prompts"]);
        let expected = ids(&case["expected"]);
        let eos: Vec<u32> = case["eos_token_id"]
            .as_u64()
            .map(|e| vec![e as u32])
            .unwrap_or_default();
        let max_new = case["max_new_tokens"].as_u64().unwrap() as usize;
        let cfg = GenerationConfig {
            repetition_penalty: case["repetition_penalty"].as_f64().unwrap() as f32,
            eos_token_ids: eos.clone(),
            ..greedy(max_new)
        };
        let (out, streamed) = run(&mut m, &tok, &prompts, &cfg);
        for (r, (g, want)) in out.iter().zip(&expected).enumerate() {
            assert_eq!(&g.token_ids, want, "{name}: row {r}");
            let reason = if want.len() < max_new || eos.contains(want.last().unwrap()) {
                FinishReason::Eos
            } else {
                FinishReason::Length
            };
            assert_eq!(g.finish_reason, reason, "{name}: row {r}");
            assert_eq!(
                g.text,
                tok.decode(&g.token_ids, true).unwrap(),
                "{name}: row {r}"
            );
            assert_eq!(streamed[r], g.text, "{name}: row {r} streamed text");
        }
        // The EOS cases really stop a row early.
        if !eos.is_empty() {
            assert!(out.iter().any(|g| g.token_ids.len() < max_new), "{name}");
        }
    }
}

/// The cached path gives the same next-token logits as running the full
/// forward over prompt + generated tokens at every step (no padding: the
/// training forward numbers positions 0..T).
#[test]
fn kv_cache_logits_equal_full_recompute_each_step() {
    for (case, adapter) in [("llama_gqa", true), ("qwen2", false), ("llama_tied", false)] {
        let mut m = model(case, adapter);
        let v = m.cfg.vocab_size;
        let (b, t0, steps) = (2, 6, 10);
        let mut rows: Vec<Vec<u32>> = (0..b)
            .map(|r| (0..t0).map(|j| ((r * 31 + j * 7 + 3) % v) as u32).collect())
            .collect();
        let mut cache = m.new_kv_cache(b, t0 + steps).unwrap();
        let flat = |rows: &[Vec<u32>], from: usize| -> Vec<u32> {
            rows.iter().flat_map(|r| r[from..].to_vec()).collect()
        };
        let positions = |from: usize, n: usize| -> Vec<u32> {
            (0..b)
                .flat_map(|_| from as u32..(from + n) as u32)
                .collect()
        };
        let mut cached = m
            .forward_cached(
                &mut cache,
                &flat(&rows, 0),
                &vec![1; b * t0],
                &positions(0, t0),
            )
            .unwrap();
        for step in 0..steps {
            let t = t0 + step;
            let batch = Batch {
                b,
                t,
                input_ids: flat(&rows, 0),
                attention_mask: None,
                labels: vec![-100; b * t],
                sample_keys: (0..b as u64).collect(),
            };
            let (_, full) = m.forward(&batch, true).unwrap();
            let full = full.unwrap();
            for r in 0..b {
                let want = &full[(r * t + t - 1) * v..(r * t + t) * v];
                let got = &cached[r * v..(r + 1) * v];
                let diff = want
                    .iter()
                    .zip(got)
                    .fold(0f32, |d, (a, b)| d.max((a - b).abs()));
                assert!(diff < 1e-5, "{case} step {step} row {r}: max diff {diff}");
            }
            // Next token: the greedy choice, then one cached step.
            let next: Vec<u32> = (0..b)
                .map(|r| {
                    let row = &cached[r * v..(r + 1) * v];
                    rlhf_worker::model::generate::sampling::argmax(row)
                })
                .collect();
            for (r, &id) in next.iter().enumerate() {
                rows[r].push(id);
            }
            cached = m
                .forward_cached(&mut cache, &next, &[1; 2], &positions(t, 1))
                .unwrap();
        }
    }
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![1, 10, 20, 30, 40],
        vec![1, 50, 60],
        vec![1, 5, 9, 13, 17, 21, 25],
    ]
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let mut m = model("llama_gqa", false);
    let tok = word_tokenizer(m.cfg.vocab_size);
    let cfg = GenerationConfig {
        do_sample: true,
        temperature: 1.5,
        top_k: 40,
        top_p: 0.95,
        seed: 7,
        ..greedy(12)
    };
    let (a, _) = run(&mut m, &tok, &prompts(), &cfg);
    let (b, _) = run(&mut m, &tok, &prompts(), &cfg);
    assert_eq!(a, b, "same seed, same completions");
    let (c, _) = run(
        &mut m,
        &tok,
        &prompts(),
        &GenerationConfig {
            seed: 8,
            ..cfg.clone()
        },
    );
    assert_ne!(a, c, "another seed, other completions");
    // top_k = 1 leaves only the argmax: sampling then equals greedy.
    let (g, _) = run(&mut m, &tok, &prompts(), &greedy(12));
    let (k1, _) = run(
        &mut m,
        &tok,
        &prompts(),
        &GenerationConfig { top_k: 1, ..cfg },
    );
    assert_eq!(g, k1);
}

#[test]
fn stop_string_ends_a_row_and_is_cut_from_its_text() {
    let mut m = model("llama_gqa", false);
    let tok = word_tokenizer(m.cfg.vocab_size);
    let (free, _) = run(&mut m, &tok, &prompts(), &greedy(12));
    // Row 0's fourth token's word as the stop string (first occurrence).
    let stop_tok = free[0].token_ids[3];
    let first = free[0]
        .token_ids
        .iter()
        .position(|&t| t == stop_tok)
        .unwrap();
    let stop = format!("t{stop_tok}");
    let cfg = GenerationConfig {
        stop_strings: vec![stop.clone()],
        ..greedy(12)
    };
    let (out, streamed) = run(&mut m, &tok, &prompts(), &cfg);
    let row = &out[0];
    assert_eq!(row.finish_reason, FinishReason::Stop);
    assert_eq!(row.token_ids, free[0].token_ids[..=first]);
    let before = tok.decode(&free[0].token_ids[..first], true).unwrap();
    let want = if before.is_empty() {
        String::new()
    } else {
        format!("{before} ")
    };
    assert_eq!(row.text, want, "text cut before {stop:?}");
    assert!(!streamed[0].contains(&stop), "the stop string was streamed");
    assert_eq!(streamed[0], row.text);
    // Other rows are unaffected unless they produce the same word.
    for r in 1..3 {
        if !out[r].text.contains(&stop) && out[r].finish_reason != FinishReason::Stop {
            assert_eq!(out[r].token_ids, free[r].token_ids, "row {r}");
        }
    }
}

#[test]
fn empty_prompt_is_an_error() {
    let mut m = model("llama_gqa", false);
    let tok = word_tokenizer(m.cfg.vocab_size);
    let err = generate(
        &mut m,
        &tok,
        &[vec![1, 2], vec![]],
        &greedy(4),
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("prompt 1 has no tokens"), "{err}");
}

/// Byte-level BPE splits CJK characters over several tokens: the stream
/// only ever hands out whole characters, and in the end all of the text.
#[test]
fn streaming_never_splits_a_utf8_character() {
    let texts: Vec<String> = vec!["hello world 你好世界 ok".to_string(); 3];
    let tok = train_byte_level_bpe(&texts, 300).unwrap();
    let ids = tok.encode("你好 hello 世界! 🙂", false).unwrap();
    let mut s = TextStream::default();
    let mut chunks = Vec::new();
    for &id in &ids {
        match s.push(&tok, id, &[]).unwrap() {
            Step::Text(t) => chunks.push(t),
            Step::Stopped(_) => panic!("no stop strings"),
        }
    }
    chunks.push(s.finish());
    assert!(
        ids.len() > 12,
        "characters should span several tokens: {ids:?}"
    );
    assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')), "{chunks:?}");
    assert_eq!(chunks.concat(), "你好 hello 世界! 🙂");
    // A stop string spanning tokens is found and held back until decided.
    let mut s = TextStream::default();
    let mut shown = String::new();
    let mut stopped = None;
    for &id in &ids {
        match s.push(&tok, id, &["世界".to_string()]).unwrap() {
            Step::Text(t) => shown.push_str(&t),
            Step::Stopped(rest) => {
                shown.push_str(&rest);
                stopped = Some(s.text().to_string());
                break;
            }
        }
    }
    assert_eq!(stopped.as_deref(), Some("你好 hello "));
    assert_eq!(shown, "你好 hello ");
}
