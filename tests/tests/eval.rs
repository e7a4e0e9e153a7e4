//! `rlhf eval`: loss and perplexity of a model (+ adapter) on a file.

use crate::{rlhf, setup};
use rlhf_tests::*;

#[test]
fn eval_prints_loss_perplexity_and_the_predicted_token_count() {
    let s = setup();
    let file = s.data.join("train.txt");
    let e = rlhf().eval(&s.model, None, &file);
    let (loss, ppl) = (num(&e, "loss"), num(&e, "perplexity"));
    assert!(
        (ppl - loss.exp()).abs() <= 1e-9 * ppl,
        "perplexity {ppl} != exp({loss})"
    );
    assert_eq!(e["block_size"], 32);
    assert_eq!(e["documents"], 300, "one document per line");
    // Packing drops the remainder, so every block is full and predicts
    // block_size − 1 tokens (the first token of a block has no target).
    let blocks = num(&e, "blocks");
    assert!(blocks >= 10.0, "{e}");
    assert_eq!(num(&e, "tokens"), blocks * 31.0);
    // Blocks of 64 cut the same token stream: half as many, rounded down.
    let e64 = rlhf()
        .cmd("eval")
        .opt("--model_name_or_path", &s.model)
        .opt("--validation_file", &file)
        .opt("--block_size", "64")
        .ok()
        .json();
    assert_eq!(num(&e64, "blocks"), (blocks / 2.0).floor(), "{e64}");
    assert_eq!(num(&e64, "tokens"), num(&e64, "blocks") * 63.0);
}

#[test]
fn eval_of_a_fresh_random_model_is_close_to_uniform() {
    // Weights ~ N(0, 0.02²) give near-zero logits: the loss is about
    // ln(vocab_size). A wrong normalisation (per block, or summed) would not be.
    let s = setup();
    let e = rlhf().eval(&s.model, None, &s.data.join("train.txt"));
    let vocab = read_json(&s.model.join("config.json"))["vocab_size"]
        .as_f64()
        .unwrap();
    let loss = num(&e, "loss");
    assert!(
        (loss - vocab.ln()).abs() < 0.05,
        "loss {loss} vs ln({vocab}) = {}",
        vocab.ln()
    );
}

#[test]
fn trained_adapter_has_lower_eval_loss_than_the_base_model() {
    let s = setup();
    let adapter = s.ws.path("adapter");
    rlhf()
        .pt(&s.model, &s.data, &adapter)
        .opt("--max_steps", "20")
        .opt("--learning_rate", "1e-2")
        .ok();
    let file = s.data.join("train.txt");
    let base = num(&rlhf().eval(&s.model, None, &file), "loss");
    let tuned = num(&rlhf().eval(&s.model, Some(&adapter), &file), "loss");
    // About 0.1 lower in practice; see peft_path_continues_training_from_the_adapter.
    assert!(tuned < base - 0.03, "adapter loss {tuned} vs base {base}");
}

#[test]
fn eval_reads_a_folder_and_jsonl_like_pt() {
    // The same text as .txt lines and as {"text": ...} records evaluates the same.
    let s = setup();
    let text = corpus_text(50, 9);
    let txt = s.ws.write("a/docs.txt", &text);
    let jsonl: String = text
        .lines()
        .map(|l| serde_json::json!({ "text": format!("{l}\n") }).to_string() + "\n")
        .collect();
    s.ws.write("b/docs.jsonl", jsonl);
    let a = rlhf().eval(&s.model, None, &txt);
    let b = rlhf().eval(&s.model, None, &s.ws.path("b"));
    assert_eq!(a["tokens"], b["tokens"]);
    assert_eq!(a["loss"], b["loss"]);
}
