//! The fused CUDA LoRA linear (kernels/src/cuda/lora.rs, lora.cu) against the
//! CPU backend, which runs the reference composition (kernels/src/lora.rs).
//! Skipped without a GPU (see common/mod.rs).

mod common;

use rlhf_kernels::cuda::{Cuda, Dtype};
use rlhf_kernels::{Backend, Cpu, LoraDropout, LoraShape, Precision};

/// Host data of one case. Compute-type tensors are rounded to the GPU's
/// compute dtype so both backends see the same inputs; A, B and the
/// gradients dA, dB are f32 on both.
struct Case {
    s: LoraShape,
    accumulate: bool,
    /// (p, seeds, rows per sample)
    dropout: Option<(f32, Vec<u64>, usize)>,
    x: Vec<f32>,
    w: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    /// y before an accumulating forward
    y0: Vec<f32>,
    dy: Vec<f32>,
    /// the xa backward reads (independent of the forward's)
    xa: Vec<f32>,
    /// gradients before backward (it adds into them)
    dx0: Vec<f32>,
    da0: Vec<f32>,
    db0: Vec<f32>,
}

impl Case {
    fn new(
        cu: &Cuda,
        seed: u64,
        (n, n_in, n_out, r): (usize, usize, usize, usize),
        accumulate: bool,
        dropout: Option<(f32, usize)>,
    ) -> Self {
        let mut rng = common::rng(seed);
        let c = |v: Vec<f32>| common::rounded(cu, Precision::Compute, &v);
        let dropout = dropout.map(|(p, samples)| {
            assert_eq!(n % samples, 0);
            let seeds = (0..samples as u64)
                .map(|i| 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(seed + 7 * i + 1))
                .collect();
            (p, seeds, n / samples)
        });
        Case {
            s: LoraShape {
                n,
                n_in,
                n_out,
                r,
                scaling: 2.0,
            },
            accumulate,
            dropout,
            x: c(common::random(&mut rng, n * n_in, 1.0)),
            w: c(common::random(&mut rng, n_out * n_in, 0.05)),
            a: common::random(&mut rng, r * n_in, 0.1),
            b: common::random(&mut rng, n_out * r, 0.1),
            y0: c(common::random(&mut rng, n * n_out, 0.5)),
            dy: c(common::random(&mut rng, n * n_out, 1.0)),
            xa: c(common::random(&mut rng, n * r, 1.0)),
            dx0: c(common::random(&mut rng, n * n_in, 0.5)),
            da0: common::random(&mut rng, r * n_in, 1.0),
            db0: common::random(&mut rng, n_out * r, 1.0),
        }
    }

    fn drop(&self) -> Option<LoraDropout<'_>> {
        self.dropout.as_ref().map(|(p, seeds, rps)| LoraDropout {
            p: *p,
            seeds,
            rows_per_sample: *rps,
        })
    }

    fn label(&self, cu: &Cuda) -> String {
        let s = self.s;
        format!(
            "n={} in={} out={} r={} accumulate={} dropout={:?} [{}]",
            s.n,
            s.n_in,
            s.n_out,
            s.r,
            self.accumulate,
            self.dropout.as_ref().map(|d| d.0),
            cu.dtype().name()
        )
    }
}

fn nan_buf<B: Backend>(be: &B, n: usize, p: Precision) -> B::Buf {
    be.upload(&vec![f32::NAN; n], p).expect("upload")
}

fn up<B: Backend>(be: &B, x: &[f32], p: Precision) -> B::Buf {
    be.upload(x, p).expect("upload")
}

fn down<B: Backend>(be: &B, b: &B::Buf) -> Vec<f32> {
    be.download(be.view(b, 0..be.len(b))).expect("download")
}

/// (y, xa) of a forward on `be`; outputs start as NaN (y as y0 when accumulating).
fn forward<B: Backend>(be: &B, c: &Case) -> (Vec<f32>, Vec<f32>) {
    let s = c.s;
    let (n, ni, no, r) = (s.n, s.n_in, s.n_out, s.r);
    let x = up(be, &c.x, Precision::Compute);
    let w = up(be, &c.w, Precision::Compute);
    let a = up(be, &c.a, Precision::F32);
    let b = up(be, &c.b, Precision::F32);
    let mut y = if c.accumulate {
        up(be, &c.y0, Precision::Compute)
    } else {
        nan_buf(be, n * no, Precision::Compute)
    };
    let mut xa = nan_buf(be, n * r, Precision::Compute);
    let mut scratch_x = nan_buf(be, n * ni, Precision::Compute);
    be.lora_linear_forward(
        be.view_mut(&mut y, 0..n * no),
        be.view_mut(&mut xa, 0..n * r),
        be.view_mut(&mut scratch_x, 0..n * ni),
        be.view(&x, 0..n * ni),
        be.view(&w, 0..no * ni),
        be.view(&a, 0..r * ni),
        be.view(&b, 0..no * r),
        c.drop(),
        s,
        c.accumulate,
    )
    .expect("lora_linear_forward");
    (down(be, &y), down(be, &xa))
}

/// (dx, dA, dB) of a backward on `be`, added into dx0, da0, db0 (dA / dB
/// None when `frozen`).
fn backward<B: Backend>(
    be: &B,
    c: &Case,
    frozen: (bool, bool),
) -> (Vec<f32>, Option<Vec<f32>>, Option<Vec<f32>>) {
    let s = c.s;
    let (n, ni, no, r) = (s.n, s.n_in, s.n_out, s.r);
    let x = up(be, &c.x, Precision::Compute);
    let w = up(be, &c.w, Precision::Compute);
    let a = up(be, &c.a, Precision::F32);
    let b = up(be, &c.b, Precision::F32);
    let dy = up(be, &c.dy, Precision::Compute);
    let xa = up(be, &c.xa, Precision::Compute);
    let mut dx = up(be, &c.dx0, Precision::Compute);
    let mut da = up(be, &c.da0, Precision::F32);
    let mut db = up(be, &c.db0, Precision::F32);
    let mut scratch_x = nan_buf(be, n * ni, Precision::Compute);
    let mut scratch_dxa = nan_buf(be, n * r, Precision::Compute);
    be.lora_linear_backward(
        be.view_mut(&mut dx, 0..n * ni),
        (!frozen.0).then(|| be.view_mut(&mut da, 0..r * ni)),
        (!frozen.1).then(|| be.view_mut(&mut db, 0..no * r)),
        be.view_mut(&mut scratch_x, 0..n * ni),
        be.view_mut(&mut scratch_dxa, 0..n * r),
        be.view(&dy, 0..n * no),
        be.view(&x, 0..n * ni),
        be.view(&xa, 0..n * r),
        be.view(&w, 0..no * ni),
        be.view(&a, 0..r * ni),
        be.view(&b, 0..no * r),
        c.drop(),
        s,
    )
    .expect("lora_linear_backward");
    (
        down(be, &dx),
        (!frozen.0).then(|| down(be, &da)),
        (!frozen.1).then(|| down(be, &db)),
    )
}

fn check_case(cu: &Cuda, tol: f64, c: &Case) {
    let label = c.label(cu);
    let (y, xa) = forward(cu, c);
    let (y_ref, xa_ref) = forward(&Cpu, c);
    common::assert_rel(&format!("y {label}"), cu, &y, &y_ref, tol);
    common::assert_rel(&format!("xa {label}"), cu, &xa, &xa_ref, tol);

    let (dx, da, db) = backward(cu, c, (false, false));
    let (dx_ref, da_ref, db_ref) = backward(&Cpu, c, (false, false));
    common::assert_rel(&format!("dx {label}"), cu, &dx, &dx_ref, tol);
    common::assert_rel(
        &format!("dA {label}"),
        cu,
        &da.unwrap(),
        &da_ref.unwrap(),
        tol,
    );
    common::assert_rel(
        &format!("dB {label}"),
        cu,
        &db.unwrap(),
        &db_ref.unwrap(),
        tol,
    );
}

/// The shapes: two samples of 77 rows, IN 512, OUT 1376, R 8 and 16,
/// with and without dropout, overwriting and accumulating y.
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn lora_linear_matches_cpu() {
    for (cu, tol) in common::backends("lora_linear_matches_cpu") {
        let mut seed = 1;
        for r in [8, 16] {
            for dropout in [None, Some((0.1, 2))] {
                for accumulate in [false, true] {
                    seed += 1;
                    let c = Case::new(&cu, seed, (2 * 77, 512, 1376, r), accumulate, dropout);
                    check_case(&cu, tol, &c);
                }
            }
        }
    }
}

/// Ragged shapes: nothing a multiple of 16 (or of 8: the scalar load paths),
/// an odd OUT (no paired stores), R above one 64-column tile, several
/// samples, p = 1 (everything dropped).
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn lora_linear_ragged_shapes_match_cpu() {
    for (cu, tol) in common::backends("lora_linear_ragged_shapes_match_cpu") {
        let mut seed = 100;
        for (dims, dropout) in [
            ((38, 100, 71, 5), Some((0.25, 2))),
            ((38, 100, 71, 5), None),
            ((45, 72, 200, 72), Some((0.1, 3))),
            ((130, 136, 24, 24), Some((0.5, 5))),
            ((3, 24, 40, 1), Some((1.0, 1))),
        ] {
            for accumulate in [false, true] {
                seed += 1;
                let c = Case::new(&cu, seed, dims, accumulate, dropout);
                check_case(&cu, tol, &c);
            }
        }
    }
}

/// A rank-64 adapter over more rows than one reduction chunk (several chunks
/// of partials) and a wider IN (several column tiles).
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn lora_linear_many_rows_match_cpu() {
    for (cu, tol) in common::backends("lora_linear_many_rows_match_cpu") {
        let c = Case::new(&cu, 7, (4 * 300, 384, 256, 64), true, Some((0.1, 4)));
        check_case(&cu, tol, &c);
    }
}

/// Frozen A or B: the other gradients are unchanged by their absence.
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn lora_linear_backward_with_frozen_factors() {
    for (cu, tol) in common::backends("lora_linear_backward_with_frozen_factors") {
        let c = Case::new(&cu, 11, (2 * 77, 512, 1376, 16), false, Some((0.1, 2)));
        let label = c.label(&cu);
        let (dx_ref, da_ref, db_ref) = backward(&Cpu, &c, (false, false));
        let (dx, da, db) = backward(&cu, &c, (true, false));
        assert!(da.is_none());
        common::assert_rel(&format!("dx (A frozen) {label}"), &cu, &dx, &dx_ref, tol);
        common::assert_rel(
            &format!("dB (A frozen) {label}"),
            &cu,
            &db.unwrap(),
            db_ref.as_ref().unwrap(),
            tol,
        );
        let (dx, da, db) = backward(&cu, &c, (false, true));
        assert!(db.is_none());
        common::assert_rel(&format!("dx (B frozen) {label}"), &cu, &dx, &dx_ref, tol);
        common::assert_rel(
            &format!("dA (B frozen) {label}"),
            &cu,
            &da.unwrap(),
            da_ref.as_ref().unwrap(),
            tol,
        );
        let (dx, _, _) = backward(&cu, &c, (true, true));
        common::assert_rel(&format!("dx (both frozen) {label}"), &cu, &dx, &dx_ref, tol);
    }
}

/// Bitwise the same on every run (no atomics anywhere).
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn lora_linear_is_deterministic() {
    for (cu, _) in common::backends("lora_linear_is_deterministic") {
        let c = Case::new(&cu, 21, (4 * 300, 384, 1376, 16), true, Some((0.1, 4)));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (y1, xa1) = forward(&cu, &c);
        let (y2, xa2) = forward(&cu, &c);
        assert_eq!(bits(&y1), bits(&y2), "y differs between runs");
        assert_eq!(bits(&xa1), bits(&xa2), "xa differs between runs");
        let (dx1, da1, db1) = backward(&cu, &c, (false, false));
        let (dx2, da2, db2) = backward(&cu, &c, (false, false));
        assert_eq!(bits(&dx1), bits(&dx2), "dx differs between runs");
        assert_eq!(
            bits(&da1.unwrap()),
            bits(&da2.unwrap()),
            "dA differs between runs"
        );
        assert_eq!(
            bits(&db1.unwrap()),
            bits(&db2.unwrap()),
            "dB differs between runs"
        );
    }
}

/// Bad arguments are Shape errors, reported before anything is written.
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn lora_linear_rejects_bad_arguments() {
    for (cu, _) in common::backends("lora_linear_rejects_bad_arguments") {
        let (n, ni, no, r) = (8, 16, 24, 4);
        let s = LoraShape {
            n,
            n_in: ni,
            n_out: no,
            r,
            scaling: 1.0,
        };
        let x = cu.zeros(n * ni, Precision::Compute).unwrap();
        let w = cu.zeros(no * ni, Precision::Compute).unwrap();
        let a = cu.zeros(r * ni, Precision::F32).unwrap();
        let b = cu.zeros(no * r, Precision::F32).unwrap();
        let mut y = cu.zeros(n * no, Precision::Compute).unwrap();
        let mut xa = cu.zeros(n * r, Precision::Compute).unwrap();
        let mut sx = cu.zeros(n * ni, Precision::Compute).unwrap();
        let mut fwd = |drop: Option<LoraDropout<'_>>, s: LoraShape| {
            cu.lora_linear_forward(
                cu.view_mut(&mut y, 0..n * no),
                cu.view_mut(&mut xa, 0..n * r),
                cu.view_mut(&mut sx, 0..n * ni),
                cu.view(&x, 0..n * ni),
                cu.view(&w, 0..no * ni),
                cu.view(&a, 0..r * ni),
                cu.view(&b, 0..no * r),
                drop,
                s,
                false,
            )
        };
        // Seeds that do not cover the rows.
        let seeds = [1u64, 2, 3];
        let d = LoraDropout {
            p: 0.1,
            seeds: &seeds,
            rows_per_sample: 2,
        };
        assert!(
            fwd(Some(d), s).is_err(),
            "3 seeds × 2 rows accepted for 8 rows"
        );
        // A drop probability outside [0, 1].
        let d = LoraDropout {
            p: 1.5,
            seeds: &seeds[..2],
            rows_per_sample: 4,
        };
        assert!(fwd(Some(d), s).is_err(), "p = 1.5 accepted");
        // A shape that does not match the buffers.
        assert!(
            fwd(None, LoraShape { r: 5, ..s }).is_err(),
            "wrong r accepted"
        );
        // x in the wrong storage type (only testable when compute ≠ f32).
        if cu.dtype() != Dtype::F32 {
            let x32 = cu.zeros(n * ni, Precision::F32).unwrap();
            let err = cu.lora_linear_forward(
                cu.view_mut(&mut y, 0..n * no),
                cu.view_mut(&mut xa, 0..n * r),
                cu.view_mut(&mut sx, 0..n * ni),
                cu.view(&x32, 0..n * ni),
                cu.view(&w, 0..no * ni),
                cu.view(&a, 0..r * ni),
                cu.view(&b, 0..no * r),
                None,
                s,
                false,
            );
            assert!(
                err.is_err(),
                "an f32 x accepted by a {} backend",
                cu.dtype().name()
            );
        }
    }
}
