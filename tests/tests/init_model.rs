//! `rlhf init-model`: a complete, self-consistent Hugging Face model dir.

use crate::rlhf;
use rlhf_tests::*;

#[test]
fn init_model_writes_a_complete_model_dir() {
    let ws = Workspace::new();
    let corpus = ws.write("corpus.txt", corpus_text(200, 3));
    let out = ws.path("model");
    let r = rlhf().init_tiny_model(&corpus, &out);
    assert_eq!(r.json()["output_dir"], out.to_str().unwrap());
    assert_eq!(
        list_tree(&out),
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ],
        "exactly these files, no temp files left"
    );
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["hidden_size"], TINY_HIDDEN);
    assert_eq!(cfg["num_hidden_layers"], TINY_LAYERS);
    assert_eq!(cfg["max_position_embeddings"], 128);
}

#[test]
fn init_model_vocab_size_equals_the_tokenizer_size() {
    let ws = Workspace::new();
    let corpus = ws.write("corpus.txt", corpus_text(200, 3));
    let out = ws.path("model");
    rlhf().init_tiny_model(&corpus, &out);
    let cfg = read_json(&out.join("config.json"));
    let vocab = cfg["vocab_size"].as_u64().unwrap() as usize;
    // Ids are dense 0..n: every embedding row is a real token and every
    // token id has a row.
    let (distinct, max_plus_one) = tokenizer_size(&out);
    assert_eq!(vocab, distinct, "config vocab_size vs tokenizer.json");
    assert_eq!(vocab, max_plus_one, "token ids are not dense");
    assert!(vocab <= 300, "BPE target was 300, got {vocab}");
    let w = read_safetensors(&out.join("model.safetensors"));
    assert_eq!(w["model.embed_tokens.weight"].shape, [vocab, TINY_HIDDEN]);
    assert_eq!(w["lm_head.weight"].shape, [vocab, TINY_HIDDEN]);
    // EOS in config.json, generation_config.json and the tokenizer agree.
    let tok_cfg = read_json(&out.join("tokenizer_config.json"));
    let eos = tok_cfg["eos_token"]
        .as_str()
        .expect("tokenizer_config has eos_token");
    let eos_id = token_id(&out, eos).expect("eos_token is in tokenizer.json");
    assert_eq!(cfg["eos_token_id"], eos_id);
    assert_eq!(
        read_json(&out.join("generation_config.json"))["eos_token_id"],
        eos_id
    );
}

#[test]
fn init_model_is_deterministic_for_a_seed() {
    // Same corpus and seed: byte-identical weights and tokenizer.
    let ws = Workspace::new();
    let corpus = ws.write("corpus.txt", corpus_text(200, 3));
    let (a, b) = (ws.path("a"), ws.path("b"));
    rlhf().init_tiny_model(&corpus, &a);
    rlhf().init_tiny_model(&corpus, &b);
    for f in ["model.safetensors", "tokenizer.json", "config.json"] {
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{f} differs between two runs with the same seed"
        );
    }
}
