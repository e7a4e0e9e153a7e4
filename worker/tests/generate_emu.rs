//! KV-cache generation on the REAL CUDA backend running on the CPU emulator
//! (fake libcuda/libcublas, see `rlhf_kernels::emu`): greedy completions of a
//! left-padded batch, with a LoRA adapter unmerged, equal the CPU backend's
//! token for token in f32 (the CPU's are checked against transformers in
//! generate.rs), and a bf16 run stays close to them. NVRTC must be present
//! (`eval "$(scripts/fetch-nvrtc.sh)"`); else SKIPPED (a failure when
//! RLHF_REQUIRE_NVRTC is set). Its own test binary: the fake libraries are
//! opened once per process.

use rlhf_kernels::cuda::{Cuda, Dtype};
use rlhf_kernels::{Backend, Cpu};
use rlhf_worker::model::generate::{generate, numbered_word_tokenizer, GenerationConfig};
use rlhf_worker::model::pretrained::{load_model, read_adapter_config};
use rlhf_worker::model::TrainMode;
use std::path::Path;

fn completions<B: Backend>(be: B) -> Vec<Vec<u32>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_gqa");
    let lora = read_adapter_config(&dir.join("adapter")).unwrap();
    let mut m = load_model(be, &dir.join("model"), TrainMode::Lora(lora), 0).unwrap();
    m.load_adapter(&dir.join("adapter")).unwrap();
    let tok = numbered_word_tokenizer(m.cfg.vocab_size).unwrap();
    let prompts = vec![
        vec![1, 10, 20, 30, 40],
        vec![1, 50, 60],
        vec![1, 5, 9, 13, 17, 21, 25],
    ];
    let cfg = GenerationConfig {
        max_new_tokens: 10,
        repetition_penalty: 1.3,
        eos_token_ids: Vec::new(),
        ..GenerationConfig::default()
    };
    generate(&mut m, &tok, &prompts, &cfg, &mut |_, _| {})
        .unwrap()
        .into_iter()
        .map(|g| g.token_ids)
        .collect()
}

#[test]
fn greedy_generation_on_emulated_cuda_matches_cpu() {
    if !rlhf_kernels::emu::use_fake_cuda(
        "greedy_generation_on_emulated_cuda_matches_cpu",
        Path::new(env!("CARGO_TARGET_TMPDIR")),
    ) {
        return;
    }
    let want = completions(Cpu);
    assert_eq!(completions(Cuda::new(0, Dtype::F32).unwrap()), want, "f32");
    // bf16 rounds every activation: the first tokens must still agree.
    let bf16 = completions(Cuda::new(0, Dtype::Bf16).unwrap());
    for (r, (g, w)) in bf16.iter().zip(&want).enumerate() {
        assert_eq!(g[..2], w[..2], "bf16 row {r}: {g:?} vs {w:?}");
    }
}
