//! `rlhf bench`: training throughput of the CPU backend on two fixed model
//! shapes, built in-process with random weights (no files).
//!
//! One timed step is exactly what the trainer does per optimizer step:
//! `zero_grads` + `forward_backward` + AdamW (`train::optim::Optimizer`, with
//! global-norm clipping). `bench/pytorch_step.py` runs the same step in PyTorch
//! (+PEFT), and `bench/run.sh` interleaves the two; see BENCHMARKS.md.
//!
//! Model FLOPs per step (the same formula is in `bench/pytorch_step.py`), with
//! tok = B·T tokens, N = every matmul weight (the 7 linears of each layer and
//! lm_head; the embedding is a lookup), N_lora = Σ r·(in+out) over adapted linears:
//!   full: 6·N·tok                + 6·L·T·(NH·HD)·tok
//!   LoRA: 4·N·tok + 6·N_lora·tok + 6·L·T·(NH·HD)·tok
//! (2 forward + 2 dX + 2 dW per weight and token; frozen weights need no dW;
//! attention counts the causal half of QKᵀ and P·V, forward + 2× for backward.)

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use rlhf_kernels::{AdamW, AttnShape, Backend, Cpu, Gemm, Precision};
use rlhf_worker::model::params::{TensorKind, LINEAR_MODULES};
use rlhf_worker::model::{Batch, Llama, LoraConfig, ModelConfig, TrainMode};
use rlhf_worker::stages::args::Device;
use rlhf_worker::train::optim::{OptimConfig, Optimizer};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchModel {
    /// hidden 64, intermediate 176, 2 layers, 4 heads, 2 kv heads, vocab 8000; seq 128, batch 4.
    Tiny,
    /// hidden 512, intermediate 1376, 8 layers, 8 heads, 4 kv heads, vocab 8000; seq 256, batch 4.
    Medium,
    /// Llama-3.2-1B's shape (hidden 2048, intermediate 8192, 16 layers, 32 heads,
    /// 8 kv heads, vocab 128256, tied embeddings); seq 2048, batch 8. For GPUs.
    Llama1b,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchMode {
    /// LoRA r=8, alpha=32, dropout 0.05 on all 7 linear modules (MedicalGPT's defaults).
    Lora,
    /// Every weight trained.
    Full,
}

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    #[arg(long = "model", value_enum, default_value = "tiny")]
    pub model: BenchModel,
    #[arg(long = "mode", value_enum, default_value = "lora")]
    pub mode: BenchMode,
    /// Timed training steps (the reported figures are medians over them).
    #[arg(long = "steps", default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long = "warmup", default_value_t = 2)]
    pub warmup: usize,
    /// Override the batch size of the preset.
    #[arg(long = "batch_size")]
    pub batch_size: Option<usize>,
    /// Override the sequence length of the preset.
    #[arg(long = "seq_len")]
    pub seq_len: Option<usize>,
    #[arg(long = "seed", default_value_t = 42)]
    pub seed: u64,
    /// Print one JSON line instead of text.
    #[arg(long = "json")]
    pub json: bool,
    /// Instead of training: the gemm crate's f32 GFLOP/s through the CPU
    /// backend's gemm op, on square 512 and 1024 and on the model's own GEMMs.
    #[arg(long = "gemm_peak")]
    pub gemm_peak: bool,
    /// Rounds of the GEMM measurement (the median is reported).
    #[arg(long = "rounds", default_value_t = 5)]
    pub rounds: usize,
    /// Time every backend op of the timed steps and print where the time goes
    /// (adds a clock read per op, so the step is a little slower). CPU only.
    #[arg(long = "profile")]
    pub profile: bool,
    /// Instead of training: generation with the KV cache, prefill and decode
    /// tokens/s at batch 1 and 8 (--steps rounds, --warmup untimed; greedy).
    #[arg(long = "generate")]
    pub generate: bool,
    /// --generate: prompt tokens per row.
    #[arg(long = "prompt_len", default_value_t = 128)]
    pub prompt_len: usize,
    /// --generate: new tokens per row (no EOS).
    #[arg(long = "gen_tokens", default_value_t = 128)]
    pub gen_tokens: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long = "device", default_value = "cpu")]
    pub device: Device,
    /// CUDA compute type bf16 (else f32).
    #[arg(long = "bf16")]
    pub bf16: bool,
    /// CUDA compute type fp16 (with loss scaling).
    #[arg(long = "fp16")]
    pub fp16: bool,
    /// CUDA: instead of training, time the fused LoRA linear (forward,
    /// forward+backward) against the base weight's cuBLAS GEMMs alone, on the
    /// model's linear shapes.
    #[arg(long = "lora_linear")]
    pub lora_linear: bool,
}

/// The benchmark's model, batch shape and training mode.
pub(crate) struct Setup {
    pub(crate) name: &'static str,
    pub(crate) cfg: ModelConfig,
    pub(crate) mode: TrainMode,
    pub(crate) b: usize,
    pub(crate) t: usize,
}

pub(crate) fn setup(a: &BenchArgs) -> Result<Setup> {
    // Intermediate sizes follow Llama's rule, 8/3·hidden rounded up to a
    // multiple of 16: 1376 for 512 and 176 for 64.
    let (name, c, f, l, nh, nkv, b, t) = match a.model {
        BenchModel::Tiny => ("tiny", 64, 176, 2, 4, 2, 4, 128),
        BenchModel::Medium => ("medium", 512, 1376, 8, 8, 4, 4, 256),
        BenchModel::Llama1b => ("llama3.2-1b", 2048, 8192, 16, 32, 8, 8, 2048),
    };
    let (vocab, tied, theta) = match a.model {
        BenchModel::Llama1b => (128_256, true, 500_000.0),
        _ => (8000, false, 10_000.0),
    };
    let (b, t) = (a.batch_size.unwrap_or(b), a.seq_len.unwrap_or(t));
    if b == 0 || t < 2 {
        bail!("need batch_size ≥ 1 and seq_len ≥ 2");
    }
    let cfg = ModelConfig::from_json(json!({
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": c,
        "intermediate_size": f,
        "num_hidden_layers": l,
        "num_attention_heads": nh,
        "num_key_value_heads": nkv,
        "max_position_embeddings": t.max(256),
        "rms_norm_eps": 1e-6,
        "rope_theta": theta,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
    }))?;
    let mode = match a.mode {
        BenchMode::Full => TrainMode::Full,
        BenchMode::Lora => TrainMode::Lora(LoraConfig {
            r: 8,
            alpha: 32.0,
            dropout: 0.05,
            target_modules: LINEAR_MODULES.iter().map(|m| m.to_string()).collect(),
            modules_to_save: vec![],
        }),
    };
    Ok(Setup {
        name,
        cfg,
        mode,
        b,
        t,
    })
}

/// Model FLOPs of one training step; see the module doc.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Flops {
    pub(crate) matmul_params: usize,
    pub(crate) lora_params: usize,
    pub(crate) linear: f64,
    pub(crate) attention: f64,
}

impl Flops {
    pub(crate) fn new(s: &Setup) -> Flops {
        let cfg = &s.cfg;
        let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (qd, kvd, l) = (cfg.q_dim(), cfg.kv_dim(), cfg.num_hidden_layers);
        // (in, out) of q, k, v, o, gate, up, down.
        let linears = [(c, qd), (c, kvd), (c, kvd), (qd, c), (c, f), (c, f), (f, c)];
        let matmul_params = l * linears.iter().map(|(i, o)| i * o).sum::<usize>() + v * c;
        let lora_params = match &s.mode {
            TrainMode::Full => 0,
            TrainMode::Lora(lc) => {
                l * LINEAR_MODULES
                    .iter()
                    .zip(linears)
                    .filter(|(m, _)| lc.target_modules.iter().any(|t| t == *m))
                    .map(|(_, (i, o))| lc.r * (i + o))
                    .sum::<usize>()
            }
        };
        let tok = (s.b * s.t) as f64;
        let per_weight = match s.mode {
            TrainMode::Full => 6.0,
            TrainMode::Lora(_) => 4.0,
        };
        Flops {
            matmul_params,
            lora_params,
            linear: per_weight * matmul_params as f64 * tok + 6.0 * lora_params as f64 * tok,
            attention: 6.0 * (l * s.t * qd) as f64 * tok,
        }
    }

    pub(crate) fn total(&self) -> f64 {
        self.linear + self.attention
    }
}

/// A small deterministic generator (splitmix64): the bench needs no rand crate.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn sym(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Random weights: base weights uniform with std 0.02 (transformers'
/// initializer_range), norm weights 1, LoRA A as PEFT (U(±1/√in)), LoRA B 0.
fn build<B: Backend>(be: B, s: &Setup, seed: u64) -> Result<Llama<B>> {
    let mut rng = Rng(seed);
    let a_std = 0.02 * 3f32.sqrt();
    Llama::from_tensors(be, s.cfg.clone(), s.mode.clone(), |e| {
        Ok(match e.kind {
            TensorKind::Base if e.shape.len() == 1 => vec![1.0; e.slot.len],
            TensorKind::Base => (0..e.slot.len).map(|_| a_std * rng.sym()).collect(),
            TensorKind::LoraA => {
                let bound = 1.0 / (e.shape[1] as f32).sqrt();
                (0..e.slot.len).map(|_| bound * rng.sym()).collect()
            }
            TensorKind::LoraB | TensorKind::ValueHead => vec![0.0; e.slot.len],
        })
    })
}

/// Random token rows, labels = inputs (as in pre-training).
fn batches(s: &Setup, n: usize, seed: u64) -> Vec<Batch> {
    let mut rng = Rng(seed ^ 0x0B47_C4E5);
    (0..n)
        .map(|_| {
            let ids: Vec<u32> = (0..s.b * s.t)
                .map(|_| rng.below(s.cfg.vocab_size) as u32)
                .collect();
            Batch {
                b: s.b,
                t: s.t,
                labels: ids.iter().map(|&i| i as i32).collect(),
                input_ids: ids,
                attention_mask: None,
                sample_keys: (0..s.b as u64).collect(),
            }
        })
        .collect()
}

fn optim_config() -> OptimConfig {
    // transformers' TrainingArguments defaults (MedicalGPT keeps them).
    OptimConfig {
        weight_decay: 0.0,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        max_grad_norm: 1.0,
    }
}

/// One optimizer step as the trainer does it; returns the mean loss.
fn train_step<B: Backend>(
    model: &mut Llama<B>,
    opt: &mut Optimizer<B>,
    batch: &Batch,
    seed: u64,
) -> Result<f64> {
    model.zero_grads()?;
    let predicted = batch.b * (batch.t - 1);
    let stats = model.forward_backward(batch, 1.0 / predicted as f32, Some(seed))?;
    opt.step(model, 1e-4, 1.0)?;
    Ok(stats.loss_sum / stats.tokens.max(1) as f64)
}

/// The process's peak resident set (VmHWM), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub(crate) fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

pub fn run(a: &BenchArgs) -> Result<()> {
    let s = setup(a)?;
    if a.generate {
        if a.profile {
            // Every op of the whole run (warm-up rounds included), in ms per run.
            let mut m = build(Prof::new(Cpu, &s), &s, a.seed)?;
            m.be.set_on(true);
            let t0 = Instant::now();
            crate::bench_generate::run(a, &s, &mut m)?;
            m.be.report().print(1, t0.elapsed().as_secs_f64());
            return Ok(());
        }
        return match a.device {
            Device::Cpu => crate::bench_generate::run(a, &s, &mut build(Cpu, &s, a.seed)?),
            Device::Cuda(n) => {
                let dt = if a.bf16 {
                    rlhf_kernels::cuda::Dtype::Bf16
                } else {
                    rlhf_kernels::cuda::Dtype::F32
                };
                let be = rlhf_kernels::cuda::Cuda::new(n, dt)?;
                crate::bench_generate::run(a, &s, &mut build(be, &s, a.seed)?)
            }
        };
    }
    if let Device::Cuda(ordinal) = a.device {
        return crate::bench_cuda::run(a, &s, ordinal);
    }
    if a.lora_linear {
        bail!("--lora_linear times CUDA kernels: add --device cuda");
    }
    if a.gemm_peak {
        return gemm_peak(a, &s);
    }
    if a.steps == 0 {
        bail!("--steps must be ≥ 1");
    }
    let flops = Flops::new(&s);
    let (step_times, losses, profile) = if a.profile {
        let be = Prof::new(Cpu, &s);
        let (times, losses, model) = train(a, &s, be, |m| m.be.set_on(true))?;
        (times, losses, Some(model.be.report()))
    } else {
        let (times, losses, _) = train(a, &s, Cpu, |_| ())?;
        (times, losses, None)
    };
    let tok = (s.b * s.t) as f64;
    let step = median(&step_times);
    let tps: Vec<f64> = step_times.iter().map(|t| tok / t).collect();
    let mut out = json!({
        "impl": "rlhf",
        "model": s.name,
        "mode": mode_name(a.mode),
        "batch_size": s.b,
        "seq_len": s.t,
        "tokens_per_step": s.b * s.t,
        "steps": a.steps,
        "warmup": a.warmup,
        "threads": threads(),
        "tokens_per_sec": median(&tps),
        "step_time_s": step,
        "step_times_s": step_times,
        "peak_rss_mib": peak_rss_mib(),
        "matmul_params": flops.matmul_params,
        "lora_params": flops.lora_params,
        "model_flops_per_step": flops.total(),
        "achieved_gflops": flops.total() / step / 1e9,
        "first_loss": losses.first(),
        "last_loss": losses.last(),
    });
    if let Some(p) = &profile {
        out["profile"] = p.to_json(a.steps, step_times.iter().sum());
    }
    if a.json {
        println!("{out}");
    } else {
        println!(
            "rlhf bench {} {}: B={} T={} threads={}  {:.0} tokens/s  step {:.3} s  \
             {:.1} GFLOP/s ({:.3} GFLOP/step)  peak RSS {:.0} MiB  loss {:.3} -> {:.3}",
            s.name,
            mode_name(a.mode),
            s.b,
            s.t,
            threads(),
            median(&tps),
            step,
            flops.total() / step / 1e9,
            flops.total() / 1e9,
            peak_rss_mib().unwrap_or(f64::NAN),
            losses.first().copied().unwrap_or(f64::NAN),
            losses.last().copied().unwrap_or(f64::NAN),
        );
        if let Some(p) = &profile {
            p.print(a.steps, step_times.iter().sum());
        }
    }
    Ok(())
}

pub(crate) fn mode_name(m: BenchMode) -> &'static str {
    match m {
        BenchMode::Lora => "lora",
        BenchMode::Full => "full",
    }
}

/// Warm up, then time `a.steps` steps. `start_timing` runs once before the
/// timed steps (the profiler switches itself on there).
#[allow(clippy::type_complexity)]
pub(crate) fn train<B: Backend>(
    a: &BenchArgs,
    s: &Setup,
    be: B,
    start_timing: impl FnOnce(&Llama<B>),
) -> Result<(Vec<f64>, Vec<f64>, Llama<B>)> {
    let mut model = build(be, s, a.seed)?;
    let mut opt = Optimizer::new(&model, optim_config())?;
    let data = batches(s, a.warmup + a.steps, a.seed);
    let mut losses = Vec::new();
    for (i, batch) in data[..a.warmup].iter().enumerate() {
        losses.push(train_step(&mut model, &mut opt, batch, a.seed + i as u64)?);
    }
    start_timing(&model);
    let mut times = Vec::with_capacity(a.steps);
    for (i, batch) in data[a.warmup..].iter().enumerate() {
        let seed = a.seed + (a.warmup + i) as u64;
        let t0 = Instant::now();
        let loss = train_step(&mut model, &mut opt, batch, seed)?;
        times.push(t0.elapsed().as_secs_f64());
        losses.push(loss);
    }
    if losses.iter().any(|l| !l.is_finite()) {
        bail!("non-finite loss during the benchmark: {losses:?}");
    }
    Ok((times, losses, model))
}

// ---- GEMM peak --------------------------------------------------------------

/// One GEMM's f32 GFLOP/s through the CPU backend: rounds of reps (enough for
/// ≥ 50 ms each), the median over rounds.
fn time_gemm(be: &Cpu, g: Gemm, rounds: usize, rng: &mut Rng) -> Result<f64> {
    let a: Vec<f32> = (0..g.m * g.k).map(|_| rng.sym()).collect();
    let b: Vec<f32> = (0..g.k * g.n).map(|_| rng.sym()).collect();
    let mut out = vec![0f32; g.m * g.n];
    be.gemm(&mut out, &a, &b, g)?; // warm
    let flop = 2.0 * (g.m * g.n * g.k) as f64;
    let t0 = Instant::now();
    be.gemm(&mut out, &a, &b, g)?;
    let once = t0.elapsed().as_secs_f64().max(1e-7);
    let reps = ((0.05 / once).ceil() as usize).clamp(1, 10_000);
    let mut rates = Vec::with_capacity(rounds);
    for _ in 0..rounds.max(1) {
        let t0 = Instant::now();
        for _ in 0..reps {
            be.gemm(&mut out, &a, &b, g)?;
        }
        rates.push(flop * reps as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    Ok(median(&rates))
}

fn gemm_peak(a: &BenchArgs, s: &Setup) -> Result<()> {
    let be = Cpu;
    let mut rng = Rng(a.seed);
    let mut square = BTreeMap::new();
    for n in [512usize, 1024] {
        let g = Gemm {
            m: n,
            n,
            k: n,
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            accumulate: false,
        };
        square.insert(n.to_string(), time_gemm(&be, g, a.rounds, &mut rng)?);
    }
    let peak = square.values().copied().fold(0.0, f64::max);

    // The GEMMs one training step issues through the backend (linears, LoRA,
    // lm_head; attention's own GEMMs are inside the attention op), recorded
    // from a real step and grouped by shape.
    let calls = {
        let prof = Prof::new(Cpu, s);
        prof.set_record(true);
        let mut model = build(prof, s, a.seed)?;
        let mut opt = Optimizer::new(&model, optim_config())?;
        let data = batches(s, 1, a.seed);
        train_step(&mut model, &mut opt, &data[0], a.seed)?;
        model.be.take_gemms()
    };
    let mut shapes: BTreeMap<(usize, usize, usize, bool, bool, bool), usize> = BTreeMap::new();
    for g in &calls {
        *shapes
            .entry((g.m, g.n, g.k, g.trans_a, g.trans_b, g.accumulate))
            .or_default() += 1;
    }
    let mut rows = Vec::new();
    let (mut total_flop, mut total_time) = (0.0, 0.0);
    for (&(m, n, k, trans_a, trans_b, accumulate), &count) in &shapes {
        let g = Gemm {
            m,
            n,
            k,
            trans_a,
            trans_b,
            alpha: 1.0,
            accumulate,
        };
        let gf = time_gemm(&be, g, a.rounds, &mut rng)?;
        let flop = 2.0 * (m * n * k) as f64 * count as f64;
        total_flop += flop;
        total_time += flop / (gf * 1e9);
        rows.push(json!({
            "m": m, "n": n, "k": k, "trans_a": trans_a, "trans_b": trans_b,
            "accumulate": accumulate, "calls_per_step": count, "gflops": gf,
            "gflop_per_step": flop / 1e9,
        }));
    }
    let flops = Flops::new(s);
    let model_shapes = total_flop / total_time / 1e9;
    let out = json!({
        "impl": "rlhf",
        "kind": "gemm_peak",
        "model": s.name,
        "mode": mode_name(a.mode),
        "threads": threads(),
        "rounds": a.rounds,
        "square_gflops": square,
        "peak_gflops": peak,
        "model_gemm_gflops": model_shapes,
        "model_gemm_gflop_per_step": total_flop / 1e9,
        "model_formula_linear_gflop_per_step": flops.linear / 1e9,
        "shapes": rows,
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "gemm peak (f32, {} threads, median of {} rounds): square {}",
            threads(),
            a.rounds,
            square
                .iter()
                .map(|(n, g)| format!("{n}: {g:.1} GFLOP/s"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "{} {} step's GEMMs ({:.2} GFLOP/step, formula's linear part {:.2}): {:.1} GFLOP/s overall",
            s.name,
            mode_name(a.mode),
            total_flop / 1e9,
            flops.linear / 1e9,
            model_shapes
        );
        for r in &rows {
            println!(
                "  m={:<5} n={:<5} k={:<5} tA={:<5} tB={:<5} acc={:<5} ×{:<3} {:>7.1} GFLOP/s",
                r["m"],
                r["n"],
                r["k"],
                r["trans_a"],
                r["trans_b"],
                r["accumulate"],
                r["calls_per_step"],
                r["gflops"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

// ---- profiler: a backend that times every op of the one it wraps ------------

#[derive(Clone, Copy, Default)]
struct OpStat {
    calls: u64,
    secs: f64,
    flops: f64,
}

#[derive(Default)]
struct ProfState {
    ops: BTreeMap<&'static str, OpStat>,
    gemms: Vec<Gemm>,
}

/// Wraps a backend; when on, adds each op's wall time (and the FLOPs of the
/// GEMMs and attention) to a per-category table. Ops run on the caller's
/// thread, so the mutex is never contended. Clones share the table.
#[derive(Clone)]
struct Prof<B> {
    inner: B,
    rank: usize,
    vocab: usize,
    on: Arc<AtomicBool>,
    record: Arc<AtomicBool>,
    state: Arc<Mutex<ProfState>>,
}

struct Report {
    ops: BTreeMap<&'static str, OpStat>,
}

impl<B: Backend> Prof<B> {
    fn new(inner: B, s: &Setup) -> Self {
        Prof {
            inner,
            rank: match &s.mode {
                TrainMode::Lora(l) => l.r,
                TrainMode::Full => 0,
            },
            vocab: s.cfg.vocab_size,
            on: Arc::new(AtomicBool::new(false)),
            record: Arc::new(AtomicBool::new(false)),
            state: Arc::new(Mutex::new(ProfState::default())),
        }
    }
    fn set_on(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }
    fn set_record(&self, on: bool) {
        self.record.store(on, Ordering::Relaxed);
    }
    fn take_gemms(&self) -> Vec<Gemm> {
        std::mem::take(&mut self.state.lock().unwrap().gemms)
    }
    fn report(&self) -> Report {
        Report {
            ops: self.state.lock().unwrap().ops.clone(),
        }
    }
    fn time<T>(&self, key: &'static str, flops: f64, f: impl FnOnce() -> T) -> T {
        if !self.on.load(Ordering::Relaxed) {
            return f();
        }
        let t0 = Instant::now();
        let r = f();
        let dt = t0.elapsed().as_secs_f64();
        let mut st = self.state.lock().unwrap();
        let e = st.ops.entry(key).or_default();
        e.calls += 1;
        e.secs += dt;
        e.flops += flops;
        r
    }
    fn gemm_key(&self, g: &Gemm) -> &'static str {
        let dims = [g.m, g.n, g.k];
        let lora = self.rank > 0 && dims.contains(&self.rank);
        match (lora, dims.contains(&self.vocab), g.trans_a, g.trans_b) {
            (true, ..) => "gemm lora (r=8 factors)",
            (false, true, _, true) => "gemm lm_head forward",
            (false, true, true, _) => "gemm lm_head dW",
            (false, true, ..) => "gemm lm_head dX",
            (false, false, _, true) => "gemm linear forward",
            (false, false, true, _) => "gemm linear dW",
            (false, false, ..) => "gemm linear dX",
        }
    }
}

/// Groups for the summary: (group, op-category prefix).
const GROUPS: [(&str, &[&str]); 10] = [
    ("GEMM (linears, lm_head)", &["gemm linear", "gemm lm_head"]),
    ("GEMM (LoRA factors)", &["gemm lora"]),
    ("attention", &["attention"]),
    (
        "cross-entropy, entropy",
        &["cross_entropy", "softmax_entropy"],
    ),
    ("rmsnorm", &["rmsnorm"]),
    ("rope", &["rope"]),
    ("swiglu", &["swiglu"]),
    ("dropout (LoRA)", &["dropout"]),
    ("embedding", &["embedding"]),
    (
        "optimizer (adamw, grad norm, clip)",
        &["adamw", "sum_squares", "scale"],
    ),
];

impl Report {
    fn group_of(key: &str) -> &'static str {
        for (g, prefixes) in GROUPS {
            if prefixes.iter().any(|p| key.starts_with(p)) {
                return g;
            }
        }
        "memory (fill, copy, zeros, ...)"
    }

    fn groups(&self) -> Vec<(&'static str, OpStat)> {
        let mut m: BTreeMap<&'static str, OpStat> = BTreeMap::new();
        for (k, v) in &self.ops {
            let e = m.entry(Self::group_of(k)).or_default();
            e.calls += v.calls;
            e.secs += v.secs;
            e.flops += v.flops;
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.secs.total_cmp(&a.1.secs));
        v
    }

    fn to_json(&self, steps: usize, total: f64) -> Value {
        let per = |x: f64| x / steps as f64;
        let tracked: f64 = self.ops.values().map(|o| o.secs).sum();
        let row = |name: &str, o: &OpStat| {
            json!({
                "name": name,
                "ms_per_step": per(o.secs) * 1e3,
                "share": o.secs / total,
                "calls_per_step": o.calls as f64 / steps as f64,
                "gflops": if o.flops > 0.0 { o.flops / o.secs / 1e9 } else { f64::NAN },
            })
        };
        json!({
            "step_ms": per(total) * 1e3,
            "untracked_ms_per_step": per(total - tracked) * 1e3,
            "groups": self.groups().iter().map(|(g, o)| row(g, o)).collect::<Vec<_>>(),
            "ops": self.ops.iter().map(|(k, o)| row(k, o)).collect::<Vec<_>>(),
        })
    }

    fn print(&self, steps: usize, total: f64) {
        let tracked: f64 = self.ops.values().map(|o| o.secs).sum();
        let line = |name: &str, o: &OpStat| {
            let gf = if o.flops > 0.0 {
                format!("{:7.1}", o.flops / o.secs / 1e9)
            } else {
                "       ".into()
            };
            println!(
                "  {:<38} {:9.2} ms {:6.1}%  {:7.1} calls  {} GFLOP/s",
                name,
                o.secs / steps as f64 * 1e3,
                100.0 * o.secs / total,
                o.calls as f64 / steps as f64,
                gf
            );
        };
        println!(
            "profile, per step (mean over {steps} steps of {:.2} ms):",
            total / steps as f64 * 1e3
        );
        for (g, o) in self.groups() {
            line(g, &o);
        }
        line(
            "untracked (host code, allocation, ...)",
            &OpStat {
                calls: 0,
                secs: total - tracked,
                flops: 0.0,
            },
        );
        println!("by op:");
        let mut ops: Vec<_> = self.ops.iter().collect();
        ops.sort_by(|a, b| b.1.secs.total_cmp(&a.1.secs));
        for (k, o) in ops {
            line(k, o);
        }
    }
}

/// Causal attention FLOPs of one forward: 2 GEMMs × 2·(T²/2)·HD per head.
fn attn_flops(s: &AttnShape) -> f64 {
    2.0 * (s.b * s.nh * s.t * s.t * s.hd) as f64
}

impl<B: Backend> Backend for Prof<B> {
    type Buf = B::Buf;
    type View<'a>
        = B::View<'a>
    where
        Self: 'a;
    type ViewMut<'a>
        = B::ViewMut<'a>
    where
        Self: 'a;

    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn needs_loss_scaling(&self) -> bool {
        self.inner.needs_loss_scaling()
    }
    fn zeros(&self, n: usize, p: Precision) -> rlhf_kernels::backend::Result<B::Buf> {
        self.time("zeros", 0.0, || self.inner.zeros(n, p))
    }
    fn upload(&self, host: &[f32], p: Precision) -> rlhf_kernels::backend::Result<B::Buf> {
        self.time("upload", 0.0, || self.inner.upload(host, p))
    }
    fn len(&self, buf: &B::Buf) -> usize {
        self.inner.len(buf)
    }
    fn view<'a>(&self, buf: &'a B::Buf, range: Range<usize>) -> B::View<'a> {
        self.inner.view(buf, range)
    }
    fn view_mut<'a>(&self, buf: &'a mut B::Buf, range: Range<usize>) -> B::ViewMut<'a> {
        self.inner.view_mut(buf, range)
    }
    fn slice<'a>(&self, v: Self::View<'a>, range: Range<usize>) -> Self::View<'a> {
        self.inner.slice(v, range)
    }
    fn slice_mut<'a>(
        &self,
        v: &'a mut Self::ViewMut<'_>,
        range: Range<usize>,
    ) -> Self::ViewMut<'a> {
        self.inner.slice_mut(v, range)
    }
    fn split_mut<'a>(
        &self,
        v: Self::ViewMut<'a>,
        mid: usize,
    ) -> (Self::ViewMut<'a>, Self::ViewMut<'a>) {
        self.inner.split_mut(v, mid)
    }
    fn freeze<'a>(&self, v: Self::ViewMut<'a>) -> Self::View<'a> {
        self.inner.freeze(v)
    }
    fn view_len(&self, v: Self::View<'_>) -> usize {
        self.inner.view_len(v)
    }
    fn download(&self, src: B::View<'_>) -> rlhf_kernels::backend::Result<Vec<f32>> {
        self.time("download", 0.0, || self.inner.download(src))
    }
    fn copy(&self, dst: B::ViewMut<'_>, src: B::View<'_>) -> rlhf_kernels::backend::Result<()> {
        self.time("copy", 0.0, || self.inner.copy(dst, src))
    }
    fn write(&self, dst: B::ViewMut<'_>, host: &[f32]) -> rlhf_kernels::backend::Result<()> {
        self.time("write", 0.0, || self.inner.write(dst, host))
    }
    fn fill(&self, dst: B::ViewMut<'_>, value: f32) -> rlhf_kernels::backend::Result<()> {
        self.time("fill", 0.0, || self.inner.fill(dst, value))
    }
    fn axpy(
        &self,
        y: B::ViewMut<'_>,
        alpha: f32,
        x: B::View<'_>,
    ) -> rlhf_kernels::backend::Result<()> {
        self.time("axpy", 0.0, || self.inner.axpy(y, alpha, x))
    }
    fn scale(&self, x: B::ViewMut<'_>, s: f32) -> rlhf_kernels::backend::Result<()> {
        self.time("scale", 0.0, || self.inner.scale(x, s))
    }
    fn sum_squares(&self, x: B::View<'_>) -> rlhf_kernels::backend::Result<f64> {
        self.time("sum_squares", 0.0, || self.inner.sum_squares(x))
    }
    fn gemm(
        &self,
        out: B::ViewMut<'_>,
        a: B::View<'_>,
        b: B::View<'_>,
        g: Gemm,
    ) -> rlhf_kernels::backend::Result<()> {
        if self.record.load(Ordering::Relaxed) {
            self.state.lock().unwrap().gemms.push(g);
        }
        let flops = 2.0 * (g.m * g.n * g.k) as f64;
        self.time(self.gemm_key(&g), flops, || self.inner.gemm(out, a, b, g))
    }
    fn add_bias(
        &self,
        x: B::ViewMut<'_>,
        bias: B::View<'_>,
        c: usize,
    ) -> rlhf_kernels::backend::Result<()> {
        self.time("add_bias", 0.0, || self.inner.add_bias(x, bias, c))
    }
    fn bias_backward(
        &self,
        dbias: B::ViewMut<'_>,
        dout: B::View<'_>,
        c: usize,
    ) -> rlhf_kernels::backend::Result<()> {
        self.time("bias_backward", 0.0, || {
            self.inner.bias_backward(dbias, dout, c)
        })
    }
    fn embedding_forward(
        &self,
        out: B::ViewMut<'_>,
        table: B::View<'_>,
        ids: &[u32],
        c: usize,
    ) -> rlhf_kernels::backend::Result<()> {
        self.time("embedding_forward", 0.0, || {
            self.inner.embedding_forward(out, table, ids, c)
        })
    }
    fn embedding_backward(
        &self,
        dtable: B::ViewMut<'_>,
        dout: B::View<'_>,
        ids: &[u32],
        c: usize,
    ) -> rlhf_kernels::backend::Result<()> {
        self.time("embedding_backward", 0.0, || {
            self.inner.embedding_backward(dtable, dout, ids, c)
        })
    }
    fn rmsnorm_forward(
        &self,
        out: B::ViewMut<'_>,
        rstd: B::ViewMut<'_>,
        x: B::View<'_>,
        w: B::View<'_>,
        c: usize,
        eps: f32,
    ) -> rlhf_kernels::backend::Result<()> {
        self.time("rmsnorm_forward", 0.0, || {
            self.inner.rmsnorm_forward(out, rstd, x, w, c, eps)
        })
    }
    fn rmsnorm_backward(
        &self,
        dx: B::ViewMut<'_>,
        dw: Option<B::ViewMut<'_>>,
        dout: B::View<'_>,
        x: B::View<'_>,
        w: B::View<'_>,
        rstd: B::View<'_>,
        c: usize,
    ) -> rlhf_kernels::backend::Result<()> {
        self.time("rmsnorm_backward", 0.0, || {
            self.inner.rmsnorm_backward(dx, dw, dout, x, w, rstd, c)
        })
    }
    fn rope_forward(
        &self,
        x: B::ViewMut<'_>,
        cos: B::View<'_>,
        sin: B::View<'_>,
        positions: &[u32],
        heads: usize,
        hd: usize,
    ) -> rlhf_kernels::backend::Result<()> {
        self.time("rope_forward", 0.0, || {
            self.inner.rope_forward(x, cos, sin, positions, heads, hd)
        })
    }
    fn rope_backward(
        &self,
        dx: B::ViewMut<'_>,
        cos: B::View<'_>,
        sin: B::View<'_>,
        positions: &[u32],
        heads: usize,
        hd: usize,
    ) -> rlhf_kernels::backend::Result<()> {
        self.time("rope_backward", 0.0, || {
            self.inner.rope_backward(dx, cos, sin, positions, heads, hd)
        })
    }
    fn attention_forward(
        &self,
        out: B::ViewMut<'_>,
        lse: B::ViewMut<'_>,
        q: B::View<'_>,
        k: B::View<'_>,
        v: B::View<'_>,
        key_mask: Option<&[u8]>,
        s: AttnShape,
    ) -> rlhf_kernels::backend::Result<()> {
        self.time("attention_forward", attn_flops(&s), || {
            self.inner.attention_forward(out, lse, q, k, v, key_mask, s)
        })
    }
    fn attention_kv_forward(
        &self,
        out: B::ViewMut<'_>,
        q: B::View<'_>,
        k_cache: B::View<'_>,
        v_cache: B::View<'_>,
        key_mask: &[u8],
        s: rlhf_kernels::backend::KvAttnShape,
    ) -> rlhf_kernels::backend::Result<()> {
        // 2 GEMM-like products of TQ·LEN·HD per head (causal half ignored).
        let flops = 4.0 * (s.b * s.nh * s.tq * s.keys() * s.hd) as f64;
        self.time("attention_kv_forward", flops, || {
            self.inner
                .attention_kv_forward(out, q, k_cache, v_cache, key_mask, s)
        })
    }
    fn attention_backward(
        &self,
        dq: B::ViewMut<'_>,
        dk: B::ViewMut<'_>,
        dv: B::ViewMut<'_>,
        dout: B::View<'_>,
        q: B::View<'_>,
        k: B::View<'_>,
        v: B::View<'_>,
        out: B::View<'_>,
        lse: B::View<'_>,
        key_mask: Option<&[u8]>,
        s: AttnShape,
    ) -> rlhf_kernels::backend::Result<()> {
        self.time("attention_backward", 2.0 * attn_flops(&s), || {
            self.inner
                .attention_backward(dq, dk, dv, dout, q, k, v, out, lse, key_mask, s)
        })
    }
    fn swiglu_forward(
        &self,
        out: B::ViewMut<'_>,
        gate: B::View<'_>,
        up: B::View<'_>,
    ) -> rlhf_kernels::backend::Result<()> {
        self.time("swiglu_forward", 0.0, || {
            self.inner.swiglu_forward(out, gate, up)
        })
    }
    fn swiglu_backward(
        &self,
        dgate: B::ViewMut<'_>,
        dup: B::ViewMut<'_>,
        dout: B::View<'_>,
        gate: B::View<'_>,
        up: B::View<'_>,
    ) -> rlhf_kernels::backend::Result<()> {
        self.time("swiglu_backward", 0.0, || {
            self.inner.swiglu_backward(dgate, dup, dout, gate, up)
        })
    }
    fn dropout_forward(
        &self,
        out: B::ViewMut<'_>,
        x: B::View<'_>,
        p: f32,
        seed: u64,
    ) -> rlhf_kernels::backend::Result<()> {
        self.time("dropout_forward", 0.0, || {
            self.inner.dropout_forward(out, x, p, seed)
        })
    }
    fn dropout_backward(
        &self,
        dx: B::ViewMut<'_>,
        dout: B::View<'_>,
        p: f32,
        seed: u64,
    ) -> rlhf_kernels::backend::Result<()> {
        self.time("dropout_backward", 0.0, || {
            self.inner.dropout_backward(dx, dout, p, seed)
        })
    }
    fn cross_entropy(
        &self,
        logits: B::ViewMut<'_>,
        targets: &[i32],
        v: usize,
        grad_scales: Option<&[f32]>,
    ) -> rlhf_kernels::backend::Result<Vec<f32>> {
        self.time("cross_entropy", 0.0, || {
            self.inner.cross_entropy(logits, targets, v, grad_scales)
        })
    }
    fn softmax_entropy(
        &self,
        logits: B::View<'_>,
        v: usize,
    ) -> rlhf_kernels::backend::Result<Vec<f32>> {
        self.time("softmax_entropy", 0.0, || {
            self.inner.softmax_entropy(logits, v)
        })
    }
    fn adamw(
        &self,
        params: B::ViewMut<'_>,
        grads: B::View<'_>,
        m: B::ViewMut<'_>,
        v: B::ViewMut<'_>,
        h: AdamW,
    ) -> rlhf_kernels::backend::Result<()> {
        self.time("adamw", 0.0, || self.inner.adamw(params, grads, m, v, h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(model: BenchModel, mode: BenchMode) -> BenchArgs {
        BenchArgs {
            model,
            mode,
            steps: 1,
            warmup: 0,
            batch_size: None,
            seq_len: None,
            seed: 1,
            json: true,
            gemm_peak: false,
            rounds: 1,
            profile: false,
            device: Device::Cpu,
            bf16: false,
            fp16: false,
            lora_linear: false,
            generate: false,
            prompt_len: 8,
            gen_tokens: 4,
        }
    }

    /// The generation bench runs and counts B·(N−1) decode tokens per round
    /// (it fails otherwise), with LoRA adapters unmerged.
    #[test]
    fn generation_bench_runs_on_the_tiny_model() {
        let mut a = args(BenchModel::Tiny, BenchMode::Lora);
        a.generate = true;
        a.warmup = 1;
        run(&a).unwrap();
    }

    #[test]
    fn flops_formula_matches_the_gemms_a_step_issues() {
        // The backend GEMMs of one step (everything but attention) must add up
        // to the formula's linear part, in both modes.
        for mode in [BenchMode::Full, BenchMode::Lora] {
            let mut a = args(BenchModel::Tiny, mode);
            a.seq_len = Some(16);
            let s = setup(&a).unwrap();
            let prof = Prof::new(Cpu, &s);
            prof.set_record(true);
            let mut model = build(prof, &s, 1).unwrap();
            let mut opt = Optimizer::new(&model, optim_config()).unwrap();
            let data = batches(&s, 1, 1);
            let loss = train_step(&mut model, &mut opt, &data[0], 1).unwrap();
            assert!(loss.is_finite());
            let issued: f64 = model
                .be
                .take_gemms()
                .iter()
                .map(|g| 2.0 * (g.m * g.n * g.k) as f64)
                .sum();
            let f = Flops::new(&s);
            assert_eq!(issued, f.linear, "{mode:?}");
        }
    }
}
