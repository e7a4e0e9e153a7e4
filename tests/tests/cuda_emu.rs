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

use crate::setup;
use rlhf_kernels::cuda::loader;
use rlhf_tests::{num, read_jsonl, train_lines};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The folder of the fake libraries, or None (SKIPPED).
fn fake_libraries(test: &str) -> Option<PathBuf> {
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
        let join = |var: &str| match std::env::var(var) {
            Ok(old) if !old.is_empty() => format!("{}:{old}", dir.display()),
            _ => dir.display().to_string(),
        };
        c.env("LD_LIBRARY_PATH", join("LD_LIBRARY_PATH"))
            .env("RLHF_CUDA_LIB_DIRS", join("RLHF_CUDA_LIB_DIRS"));
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
