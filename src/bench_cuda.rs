//! `rlhf bench --device cuda`: training throughput and MFU of the CUDA
//! backend, and `--lora_linear`: the fused LoRA linear against the base
//! weight's cuBLAS GEMM alone. The FLOP counts and the peak are measured
//! exactly as `bench/gpu_anchor_pytorch.py` does for PyTorch + PEFT, so the two
//! MFU figures compare:
//!   6N   convention: (6·N + 12·L·h·s) FLOPs per token (PaLM, appendix B);
//!   LoRA convention: 4·N + 3·(2·L·h·s) — what LoRA training needs (frozen
//!                    weights get no weight gradient; causal attention).
//! The peak is this GPU's rate on an 8192³ GEMM in the compute type, through
//! the backend's own GEMM (cuBLAS), median of 10 after 3 warm-ups.

use crate::bench::{median, mode_name, train, BenchArgs, Flops, Setup};
use anyhow::{bail, Result};
use rlhf_kernels::cuda::{Cuda, CudaBuf, Dtype};
use rlhf_kernels::{Backend, Gemm, LoraDropout, LoraShape, Precision};
use rlhf_worker::model::TrainMode;
use serde_json::json;
use std::time::Instant;

pub fn run(a: &BenchArgs, s: &Setup, ordinal: usize) -> Result<()> {
    let dtype = match (a.bf16, a.fp16) {
        (true, true) => bail!("--bf16 and --fp16 are both set; choose one"),
        (true, false) => Dtype::Bf16,
        (false, true) => Dtype::F16,
        (false, false) => Dtype::F32,
    };
    if a.profile {
        bail!("--profile times CPU ops; it is not available on CUDA");
    }
    let cu = Cuda::new(ordinal, dtype)?;
    let peak = measure_peak(&cu)?;
    if a.lora_linear {
        return lora_linear(a, s, &cu, peak);
    }
    if a.steps == 0 {
        bail!("--steps must be ≥ 1");
    }
    let (times, losses, _model) = train(a, s, cu.clone(), |_| ())?;
    let cfg = &s.cfg;
    let (h, l) = (cfg.hidden_size as f64, cfg.num_hidden_layers as f64);
    let flops = Flops::new(s);
    let n = flops.matmul_params as f64;
    let seq = s.t as f64;
    let six_n = 6.0 * n + 12.0 * l * h * seq;
    let lora = 4.0 * n + 3.0 * (2.0 * l * h * seq);
    let tok = (s.b * s.t) as f64;
    let step = median(&times);
    let tps = tok / step;
    let (free, total) = cu.mem_info().unwrap_or((0, 0));
    let out = json!({
        "impl": "rlhf",
        "device": cu.device_name(),
        "arch": cu.arch(),
        "dtype": dtype.name(),
        "model": s.name,
        "mode": mode_name(a.mode),
        "batch_size": s.b,
        "seq_len": s.t,
        "steps": a.steps,
        "warmup": a.warmup,
        "step_s_median": step,
        "step_s_all": times,
        "tokens_per_s": tps,
        "matmul_params": flops.matmul_params,
        "lora_params": flops.lora_params,
        "measured_peak_tflops": peak,
        "tflops_6n": tps * six_n / 1e12,
        "tflops_lora": tps * lora / 1e12,
        "mfu_6n": tps * six_n / 1e12 / peak,
        "mfu_lora": tps * lora / 1e12 / peak,
        "device_mem_used_gib": (total - free) as f64 / (1u64 << 30) as f64,
        "loss_first": losses.first(),
        "loss_last": losses.last(),
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "rlhf bench {} {} on {} ({}): B={} T={}  {:.0} tokens/s  step {:.3} s  \
             MFU {:.1}% (6N) / {:.1}% (LoRA FLOPs) of {:.0} TFLOP/s measured  loss {:.3} -> {:.3}",
            s.name,
            mode_name(a.mode),
            cu.device_name(),
            dtype.name(),
            s.b,
            s.t,
            tps,
            step,
            100.0 * tps * six_n / 1e12 / peak,
            100.0 * tps * lora / 1e12 / peak,
            peak,
            losses.first().copied().unwrap_or(f64::NAN),
            losses.last().copied().unwrap_or(f64::NAN),
        );
    }
    Ok(())
}

/// Median seconds of `f` over rounds, synchronised before and after.
fn time(cu: &Cuda, rounds: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut ts = Vec::with_capacity(rounds);
    for _ in 0..rounds.max(1) {
        cu.synchronize()?;
        let t0 = Instant::now();
        f()?;
        cu.synchronize()?;
        ts.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(&ts))
}

fn random(cu: &Cuda, n: usize, scale: f32, p: Precision, seed: u64) -> Result<CudaBuf> {
    let mut x = seed | 1;
    let host: Vec<f32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Ok(cu.upload(&host, p)?)
}

fn all<'a>(cu: &Cuda, b: &'a CudaBuf) -> rlhf_kernels::cuda::CudaView<'a> {
    cu.view(b, 0..cu.len(b))
}

/// The GPU's rate on an 8192³ GEMM in the compute type, TFLOP/s.
fn measure_peak(cu: &Cuda) -> Result<f64> {
    let n = 8192;
    let a = random(cu, n * n, 1.0, Precision::Compute, 1)?;
    let b = random(cu, n * n, 1.0, Precision::Compute, 2)?;
    let mut c = cu.zeros(n * n, Precision::Compute)?;
    let g = Gemm {
        m: n,
        n,
        k: n,
        trans_a: false,
        trans_b: false,
        alpha: 1.0,
        accumulate: false,
    };
    let t = time(cu, 10, || {
        Ok(cu.gemm(
            cu.view_mut(&mut c, 0..n * n),
            cu.view(&a, 0..n * n),
            cu.view(&b, 0..n * n),
            g,
        )?)
    })?;
    Ok(2.0 * (n as f64).powi(3) / t / 1e12)
}

/// Fused LoRA linear vs the base GEMM alone, per distinct linear shape.
fn lora_linear(a: &BenchArgs, s: &Setup, cu: &Cuda, peak: f64) -> Result<()> {
    let TrainMode::Lora(lc) = &s.mode else {
        bail!("--lora_linear needs --mode lora");
    };
    let cfg = &s.cfg;
    let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let mut shapes = vec![(c, qd), (c, kvd), (qd, c), (c, f), (f, c)];
    shapes.dedup();
    let n = s.b * s.t;
    let r = lc.r;
    let seeds: Vec<u64> = (0..s.b as u64).map(|i| 0x5EED ^ i).collect();
    let rounds = a.rounds.max(5);
    let mut rows = Vec::new();
    for (ni, no) in shapes {
        let x = random(cu, n * ni, 1.0, Precision::Compute, 3)?;
        let w = random(cu, no * ni, 0.02, Precision::Compute, 4)?;
        let la = random(cu, r * ni, 0.02, Precision::F32, 5)?;
        let lb = random(cu, no * r, 0.02, Precision::F32, 6)?;
        let dy = random(cu, n * no, 1.0, Precision::Compute, 7)?;
        let mut y = cu.zeros(n * no, Precision::Compute)?;
        let mut dx = cu.zeros(n * ni, Precision::Compute)?;
        let mut xa = cu.zeros(n * r, Precision::Compute)?;
        let mut sx = cu.zeros(n * ni, Precision::Compute)?;
        let mut sdxa = cu.zeros(n * r, Precision::Compute)?;
        let mut da = cu.zeros(r * ni, Precision::F32)?;
        let mut db = cu.zeros(no * r, Precision::F32)?;
        let shape = LoraShape {
            n,
            n_in: ni,
            n_out: no,
            r,
            scaling: lc.scaling(),
        };
        let drop = (lc.dropout > 0.0).then_some(LoraDropout {
            p: lc.dropout,
            seeds: &seeds,
            rows_per_sample: s.t,
        });
        let base_fwd = time(cu, rounds, || {
            let len = cu.len(&y);
            Ok(cu.gemm(
                cu.view_mut(&mut y, 0..len),
                all(cu, &x),
                all(cu, &w),
                Gemm::linear(n, no, ni),
            )?)
        })?;
        let base_bwd = time(cu, rounds, || {
            let len = cu.len(&dx);
            let g = Gemm {
                m: n,
                n: ni,
                k: no,
                trans_a: false,
                trans_b: false,
                alpha: 1.0,
                accumulate: true,
            };
            Ok(cu.gemm(cu.view_mut(&mut dx, 0..len), all(cu, &dy), all(cu, &w), g)?)
        })?;
        let fused_fwd = time(cu, rounds, || {
            let (ly, lxa, lsx) = (cu.len(&y), cu.len(&xa), cu.len(&sx));
            Ok(cu.lora_linear_forward(
                cu.view_mut(&mut y, 0..ly),
                cu.view_mut(&mut xa, 0..lxa),
                cu.view_mut(&mut sx, 0..lsx),
                all(cu, &x),
                all(cu, &w),
                all(cu, &la),
                all(cu, &lb),
                drop,
                shape,
                false,
            )?)
        })?;
        let fused_bwd = time(cu, rounds, || {
            let (ldx, lda, ldb, lsx, lsd) = (
                cu.len(&dx),
                cu.len(&da),
                cu.len(&db),
                cu.len(&sx),
                cu.len(&sdxa),
            );
            Ok(cu.lora_linear_backward(
                cu.view_mut(&mut dx, 0..ldx),
                Some(cu.view_mut(&mut da, 0..lda)),
                Some(cu.view_mut(&mut db, 0..ldb)),
                cu.view_mut(&mut sx, 0..lsx),
                cu.view_mut(&mut sdxa, 0..lsd),
                all(cu, &dy),
                all(cu, &x),
                all(cu, &xa),
                all(cu, &w),
                all(cu, &la),
                all(cu, &lb),
                drop,
                shape,
            )?)
        })?;
        let gemm_tflops = 2.0 * (n * ni * no) as f64 / base_fwd / 1e12;
        rows.push(json!({
            "n": n, "in": ni, "out": no, "r": r,
            "base_fwd_ms": base_fwd * 1e3, "fused_fwd_ms": fused_fwd * 1e3,
            "base_bwd_ms": base_bwd * 1e3, "fused_bwd_ms": fused_bwd * 1e3,
            "fwd_ratio": fused_fwd / base_fwd,
            "fwd_bwd_ratio": (fused_fwd + fused_bwd) / (base_fwd + base_bwd),
            "base_gemm_tflops": gemm_tflops,
        }));
    }
    let out = json!({
        "impl": "rlhf", "kind": "lora_linear", "device": cu.device_name(),
        "dtype": cu.dtype().name(), "model": s.name, "measured_peak_tflops": peak,
        "dropout": lc.dropout, "shapes": rows,
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "fused LoRA linear vs base GEMM on {} ({}), N={n}, r={r}, dropout {}:",
            cu.device_name(),
            cu.dtype().name(),
            lc.dropout
        );
        for row in &rows {
            println!(
                "  {:>5} -> {:<5}  fwd {:.3} ms vs {:.3} ms ({:.2}x)  fwd+bwd {:.2}x  (GEMM {:.0} TFLOP/s)",
                row["in"],
                row["out"],
                row["fused_fwd_ms"].as_f64().unwrap_or(f64::NAN),
                row["base_fwd_ms"].as_f64().unwrap_or(f64::NAN),
                row["fwd_ratio"].as_f64().unwrap_or(f64::NAN),
                row["fwd_bwd_ratio"].as_f64().unwrap_or(f64::NAN),
                row["base_gemm_tflops"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    Ok(())
}
