//! cuBLAS GEMMs of the CUDA backend against the CPU backend's, for every
//! transpose combination, accumulation, and mixed storage (f32 weights with
//! compute-type activations, f32 outputs for gradients).

mod common;

use common::{assert_rel, backends, download, poisoned, random, rng, rounded, upload};
use rlhf_kernels::{Backend, Cpu, Gemm, Precision};

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn gemm_matches_cpu_for_every_layout() {
    let (m, n, k) = (154, 344, 200);
    for (cu, tol) in backends("gemm_matches_cpu_for_every_layout") {
        let mut r = rng(11);
        for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
            for accumulate in [false, true] {
                // (a, b, out) precisions: all compute; f32 weights; f32 gradient output.
                for (pa, pb, po) in [
                    (Precision::Compute, Precision::Compute, Precision::Compute),
                    (Precision::Compute, Precision::F32, Precision::Compute),
                    (Precision::Compute, Precision::Compute, Precision::F32),
                ] {
                    let g = Gemm {
                        m,
                        n,
                        k,
                        trans_a,
                        trans_b,
                        alpha: 0.75,
                        accumulate,
                    };
                    let a = rounded(&cu, pa, &random(&mut r, m * k, 1.0));
                    let b = rounded(&cu, pb, &random(&mut r, k * n, 1.0));
                    let init = rounded(&cu, po, &random(&mut r, m * n, 1.0));
                    let mut want = init.clone();
                    Cpu.gemm(&mut want, &a, &b, g).unwrap();
                    let (da, db) = (upload(&cu, &a, pa), upload(&cu, &b, pb));
                    let mut out = if accumulate {
                        upload(&cu, &init, po)
                    } else {
                        poisoned(&cu, m * n, po)
                    };
                    cu.gemm(
                        cu.view_mut(&mut out, 0..m * n),
                        cu.view(&da, 0..m * k),
                        cu.view(&db, 0..k * n),
                        g,
                    )
                    .unwrap();
                    let what = format!(
                        "gemm tA={trans_a} tB={trans_b} acc={accumulate} a={pa:?} b={pb:?} out={po:?}"
                    );
                    assert_rel(&what, &cu, &download(&cu, &out), &want, tol);
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn gemm_rejects_wrong_lengths_before_launching() {
    for (cu, _) in backends("gemm_rejects_wrong_lengths_before_launching") {
        let a = cu.zeros(6, Precision::Compute).unwrap();
        let b = cu.zeros(6, Precision::Compute).unwrap();
        let mut out = cu.zeros(4, Precision::Compute).unwrap();
        let err = cu
            .gemm(
                cu.view_mut(&mut out, 0..4),
                cu.view(&a, 0..6),
                cu.view(&b, 0..6),
                Gemm::linear(2, 2, 4),
            )
            .expect_err("a [2,4] from 6 values");
        assert!(
            err.to_string().contains("has length 6, expected 8"),
            "{err}"
        );
    }
}
