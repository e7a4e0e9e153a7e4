//! `rlhf pt --device cuda` on the emulated GPU: the real binary, trainer and
//! CUDA backend, with the fake libcuda/libcublas of kernels/emu/fake/ (see
//! `rlhf_kernels::emu`) running the kernels on the CPU emulator. The losses of
//! a short LoRA run match `--device cpu`: f32 to 1e-4 (relative), bf16 to
//! 3e-2; fp16 (dynamic loss scaling) trains without NaN. Needs NVRTC
//! (`eval "$(scripts/fetch-nvrtc.sh)"`) and a C++ compiler, else SKIPPED (a
//! failure when RLHF_REQUIRE_NVRTC is set).
//!
//! The fake libraries are only built here, never opened in this process
//! (errors.rs checks that this process finds no driver): the child finds
//! them through LD_LIBRARY_PATH (ahead of any real driver) and
//! RLHF_CUDA_LIB_DIRS.
//!
//! `rlhf run` of a PT stage on two local workers with `device = "cuda"`
//! all-reduces the gradients with NCCL — the fake libnccl.so.2, whose ranks
//! meet through files — and trains what the same pipeline on `device = "cpu"`
//! (the TCP ring) trains.

use crate::setup;
use rlhf_kernels::cuda::loader;
use rlhf_tests::{num, read_jsonl, read_safetensors, train_lines, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The folder of the fake libraries, or None (SKIPPED).
pub(crate) fn fake_libraries(test: &str) -> Option<PathBuf> {
    if let Err(e) = loader::require(loader::NVRTC) {
        if std::env::var_os("RLHF_REQUIRE_NVRTC").is_some() {
            panic!("RLHF_REQUIRE_NVRTC is set but NVRTC is unusable: {e}");
        }
        eprintln!("SKIPPED {test}: {e}");
        return None;
    }
    match rlhf_kernels::emu::build_fake_libraries(Path::new(env!("CARGO_TARGET_TMPDIR"))) {
        Ok(Some(dir)) => Some(dir),
        Ok(None) => {
            eprintln!("SKIPPED {test}: no C++ compiler");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// `rlhf pt` (6 LoRA steps, block 32, batch 2) with `extra` flags; the loss
/// of every step.
fn pt_losses(s: &crate::Setup, out: &str, extra: &[&str], fake: Option<&Path>) -> Vec<f64> {
    let out = s.ws.path(out);
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlhf"));
    c.arg("pt")
        .arg("--model_name_or_path")
        .arg(&s.model)
        .arg("--train_file_dir")
        .arg(&s.data)
        .arg("--output_dir")
        .arg(&out)
        .args(["--block_size", "32", "--max_steps", "6"])
        .args([
            "--per_device_train_batch_size",
            "2",
            "--learning_rate",
            "1e-2",
        ])
        .args(["--logging_steps", "1", "--save_steps", "100"])
        .args(extra)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    if let Some(dir) = fake {
        use_fake(&mut c, dir);
    }
    let o = c.output().expect("running rlhf");
    assert!(
        o.status.success(),
        "rlhf pt {extra:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    train_lines(&read_jsonl(&out.join("metrics.jsonl")))
        .iter()
        .map(|v| num(v, "loss"))
        .collect()
}

/// The child (and its children) find the fake libraries first: through
/// LD_LIBRARY_PATH (ahead of any real driver) and RLHF_CUDA_LIB_DIRS.
pub(crate) fn use_fake(c: &mut Command, dir: &Path) {
    let join = |var: &str| match std::env::var(var) {
        Ok(old) if !old.is_empty() => format!("{}:{old}", dir.display()),
        _ => dir.display().to_string(),
    };
    c.env("LD_LIBRARY_PATH", join("LD_LIBRARY_PATH"))
        .env("RLHF_CUDA_LIB_DIRS", join("RLHF_CUDA_LIB_DIRS"));
}

fn max_rel(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(1e-12))
        .fold(0.0, f64::max)
}

#[test]
fn lora_pt_on_emulated_cuda_matches_cpu() {
    let Some(fake) = fake_libraries("lora_pt_on_emulated_cuda_matches_cpu") else {
        return;
    };
    let s = setup();
    let want = pt_losses(&s, "cpu", &["--device", "cpu"], None);
    assert_eq!(want.len(), 6, "{want:?}");
    for (name, flags, tol) in [
        ("f32", &["--device", "cuda"][..], 1e-4),
        ("bf16", &["--device", "cuda", "--bf16", "true"][..], 3e-2),
        (
            "fp16",
            &["--device", "cuda:0", "--fp16", "true"][..],
            f64::INFINITY,
        ),
    ] {
        let got = pt_losses(&s, name, flags, Some(&fake));
        let e = max_rel(&got, &want);
        eprintln!("[{name}] cpu {want:.5?}\n       cuda {got:.5?}\n       max rel diff {e:.2e}");
        assert!(got.iter().all(|l| l.is_finite()), "[{name}] {got:?}");
        assert!(e <= tol, "[{name}] loss rel diff {e:.3e} > {tol:.0e}");
    }
}

/// `rlhf run` of a PT pipeline (LoRA, 4 steps, batch 2 per worker) on two
/// local workers on `device`; returns the adapter and the logged losses.
fn run_pipeline(
    s: &crate::Setup,
    name: &str,
    device: &str,
    fake: Option<&Path>,
) -> (BTreeMap<String, Tensor>, Vec<f64>) {
    let text = format!(
        r#"[cluster]
workers = 2
heartbeat_interval_ms = 200
heartbeat_timeout_ms = 5000
state_dir = "{name}/.coordinator"

[[stage]]
name = "pt"
kind = "pt"
model_name_or_path = "model"
train_file_dir = "data"
output_dir = "{name}/pt"
device = "{device}"
block_size = 32
per_device_train_batch_size = 2
max_steps = 4
learning_rate = 1e-2
logging_steps = 1
save_steps = 100
use_peft = true
"#
    );
    let file = s.ws.write(&format!("{name}.toml"), text);
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlhf"));
    c.current_dir(s.ws.path(""))
        .arg("run")
        .arg(&file)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info");
    if let Some(dir) = fake {
        use_fake(&mut c, dir);
        c.env("FAKE_NCCL_DIR", s.ws.mkdir(&format!("{name}/nccl")))
            .env("FAKE_NCCL_LOG", s.ws.path(&format!("{name}/nccl.log")))
            .env("FAKE_NCCL_TIMEOUT_S", "60");
    }
    let o = c.output().expect("running rlhf run");
    assert!(
        o.status.success(),
        "rlhf run ({device}) failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let out = s.ws.path(&format!("{name}/pt"));
    let losses = train_lines(&read_jsonl(&out.join("metrics.jsonl")))
        .iter()
        .map(|v| num(v, "loss"))
        .collect();
    (
        read_safetensors(&out.join("adapter_model.safetensors")),
        losses,
    )
}

/// The largest per-tensor relative error ‖a − b‖₂ / ‖b‖₂ (same tensor names).
fn max_tensor_rel(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f64 {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "different tensors"
    );
    let mut worst = 0f64;
    for (name, ta) in a {
        let (x, y) = (ta.f32s(), b[name].f32s());
        assert_eq!(x.len(), y.len(), "{name}");
        let norm = y.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        let diff = x
            .iter()
            .zip(&y)
            .map(|(p, q)| (*p as f64 - *q as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        worst = worst.max(diff / norm.max(1e-30));
    }
    worst
}

#[test]
fn two_cuda_workers_all_reduce_with_nccl_as_cpu_workers_do() {
    let Some(fake) = fake_libraries("two_cuda_workers_all_reduce_with_nccl_as_cpu_workers_do")
    else {
        return;
    };
    let s = setup();
    let (want, want_losses) = run_pipeline(&s, "cpu", "cpu", None);
    let (got, got_losses) = run_pipeline(&s, "cuda", "cuda", Some(&fake));
    assert_eq!(want_losses.len(), 4, "{want_losses:?}");
    let e = max_rel(&got_losses, &want_losses);
    let t = max_tensor_rel(&got, &want);
    eprintln!(
        "cpu  {want_losses:.5?}\ncuda {got_losses:.5?}\nmax loss rel diff {e:.2e}, \
         largest adapter tensor rel L2 diff {t:.2e}"
    );
    assert!(e <= 1e-4, "loss rel diff {e:.3e}");
    assert!(t <= 1e-4, "adapter rel L2 diff {t:.3e}");
    // It trained: lora_B moved away from 0.
    assert!(got
        .iter()
        .any(|(n, t)| n.contains("lora_B") && t.f32s().iter().any(|v| *v != 0.0)));
    // The fake NCCL was used: both ranks joined one communicator and each
    // made (the same number of, at least one per step) all-reduces.
    let log = std::fs::read_to_string(s.ws.path("cuda/nccl.log")).expect("no NCCL log");
    let mut joins: Vec<&str> = log.lines().filter(|l| l.starts_with("join ")).collect();
    joins.sort();
    assert_eq!(joins.len(), 2, "{log}");
    assert!(joins[0].starts_with("join rank 0 of 2"), "{log}");
    assert!(joins[1].starts_with("join rank 1 of 2"), "{log}");
    let calls: Vec<(String, u64)> = log
        .lines()
        .filter_map(|l| l.strip_prefix("destroy rank "))
        .map(|l| {
            let n = l.split(": ").nth(1).and_then(|r| r.split(' ').next());
            (l.to_string(), n.and_then(|n| n.parse().ok()).unwrap_or(0))
        })
        .collect();
    assert_eq!(calls.len(), 2, "{log}");
    assert_eq!(calls[0].1, calls[1].1, "{log}");
    assert!(calls[0].1 >= 4, "{log}");
    eprintln!("fake NCCL log:\n{log}");
    // Nothing is left in the rendezvous folders.
    let left: Vec<_> = std::fs::read_dir(s.ws.path("cuda/nccl"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
