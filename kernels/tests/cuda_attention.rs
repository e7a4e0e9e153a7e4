//! CUDA attention (forward and backward) against the CPU op, for every
//! compute dtype: GQA, head dims 64 and 128 (and an odd one), T not a
//! multiple of any tile, with and without a key padding mask. The CPU op is
//! fed the inputs rounded to the GPU's storage type, so only the kernels'
//! arithmetic differs. Without a GPU every test prints SKIPPED and passes.

mod common;

use common::{assert_rel, backends, download, poisoned, random, rng, rounded, upload};
use rlhf_kernels::cuda::Cuda;
use rlhf_kernels::{AttnShape, Backend, Cpu, KernelError, Precision};

fn shape(b: usize, t: usize, nh: usize, nkv: usize, hd: usize) -> AttnShape {
    AttnShape { b, t, nh, nkv, hd }
}

/// Sample 0 is left-padded (its first query rows see no key at all: out = 0,
/// lse = −inf), the last sample right-padded, and a few keys in between are
/// holes.
fn padding_mask(s: AttnShape) -> Vec<u8> {
    let t = s.t;
    let mut m = vec![1u8; s.b * t];
    m[..t / 3].fill(0);
    let last = (s.b - 1) * t;
    m[last + t - t / 4..last + t].fill(0);
    for bi in 0..s.b {
        for j in (bi + 5..t).step_by(11) {
            m[bi * t + j] = 0;
        }
    }
    m
}

/// (shape, with a key mask?)
fn cases() -> Vec<(AttnShape, bool)> {
    let mut v = Vec::new();
    for hd in [64, 128] {
        for masked in [false, true] {
            v.push((shape(2, 77, 8, 2, hd), masked));
        }
    }
    // HD not a multiple of 16 (zero-padded tiles): 40 and 36 (16-byte loads
    // for 16-bit types at 40 only), 33 (element loads for every type); a
    // group of 3 query heads per kv head.
    v.push((shape(2, 33, 6, 2, 40), true));
    v.push((shape(1, 50, 3, 1, 36), true));
    v.push((shape(1, 40, 2, 1, 33), false));
    v
}

fn rms(x: &[f32]) -> f32 {
    (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len().max(1) as f64).sqrt() as f32
}

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

fn inputs(seed: u64, s: AttnShape) -> Inputs {
    let mut r = rng(seed);
    let nq = s.b * s.t * s.nh * s.hd;
    let nk = s.b * s.t * s.nkv * s.hd;
    Inputs {
        q: random(&mut r, nq, 1.0),
        k: random(&mut r, nk, 1.0),
        v: random(&mut r, nk, 1.0),
        dout: random(&mut r, nq, 1.0),
    }
}

/// GPU forward: (out, lse), outputs poisoned with NaN before the run.
fn gpu_forward(cu: &Cuda, x: &Inputs, mask: Option<&[u8]>, s: AttnShape) -> (Vec<f32>, Vec<f32>) {
    let (q, k, v) = (
        upload(cu, &x.q, Precision::Compute),
        upload(cu, &x.k, Precision::Compute),
        upload(cu, &x.v, Precision::Compute),
    );
    let nl = s.b * s.nh * s.t;
    let mut out = poisoned(cu, x.q.len(), Precision::Compute);
    let mut lse = poisoned(cu, nl, Precision::F32);
    cu.attention_forward(
        cu.view_mut(&mut out, 0..x.q.len()),
        cu.view_mut(&mut lse, 0..nl),
        cu.view(&q, 0..x.q.len()),
        cu.view(&k, 0..x.k.len()),
        cu.view(&v, 0..x.v.len()),
        mask,
        s,
    )
    .expect("cuda attention_forward");
    (download(cu, &out), download(cu, &lse))
}

/// Everything the backward reads besides q, k, v, dout (same values on both
/// backends): out (rounded to the storage type), lse, and the gradients'
/// initial contents (rounded too).
struct BwdIn<'a> {
    out: &'a [f32],
    lse: &'a [f32],
    dq0: &'a [f32],
    dk0: &'a [f32],
    dv0: &'a [f32],
}

/// GPU backward: (dq, dk, dv) = initial values + gradients.
fn gpu_backward(
    cu: &Cuda,
    x: &Inputs,
    b: &BwdIn<'_>,
    mask: Option<&[u8]>,
    s: AttnShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = Precision::Compute;
    let (q, k, v, dout, out) = (
        upload(cu, &x.q, c),
        upload(cu, &x.k, c),
        upload(cu, &x.v, c),
        upload(cu, &x.dout, c),
        upload(cu, b.out, c),
    );
    let lse = upload(cu, b.lse, Precision::F32);
    let (mut dq, mut dk, mut dv) = (
        upload(cu, b.dq0, c),
        upload(cu, b.dk0, c),
        upload(cu, b.dv0, c),
    );
    let (nq, nk) = (x.q.len(), x.k.len());
    cu.attention_backward(
        cu.view_mut(&mut dq, 0..nq),
        cu.view_mut(&mut dk, 0..nk),
        cu.view_mut(&mut dv, 0..nk),
        cu.view(&dout, 0..nq),
        cu.view(&q, 0..nq),
        cu.view(&k, 0..nk),
        cu.view(&v, 0..nk),
        cu.view(&out, 0..nq),
        cu.view(&lse, 0..b.lse.len()),
        mask,
        s,
    )
    .expect("cuda attention_backward");
    (download(cu, &dq), download(cu, &dk), download(cu, &dv))
}

/// CPU backward on the same inputs: (dq, dk, dv) = initial values + gradients.
fn cpu_backward(
    x: &Inputs,
    b: &BwdIn<'_>,
    mask: Option<&[u8]>,
    s: AttnShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut dq, mut dk, mut dv) = (b.dq0.to_vec(), b.dk0.to_vec(), b.dv0.to_vec());
    Cpu.attention_backward(
        &mut dq, &mut dk, &mut dv, &x.dout, &x.q, &x.k, &x.v, b.out, b.lse, mask, s,
    )
    .expect("cpu attention_backward");
    (dq, dk, dv)
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn attention_matches_cpu() {
    for (cu, tol) in backends("attention_matches_cpu") {
        for (n, (s, masked)) in cases().into_iter().enumerate() {
            let what = |name: &str| format!("attention {name} {s:?} mask={masked}");
            let mask_v = masked.then(|| padding_mask(s));
            let mask = mask_v.as_deref();
            let raw = inputs(100 + n as u64, s);
            // What the GPU buffers hold, as the CPU sees it.
            let r = |x: &[f32]| rounded(&cu, Precision::Compute, x);
            let x = Inputs {
                q: r(&raw.q),
                k: r(&raw.k),
                v: r(&raw.v),
                dout: r(&raw.dout),
            };

            // ---- forward ----
            let nl = s.b * s.nh * s.t;
            let mut out_cpu = vec![0.0; x.q.len()];
            let mut lse_cpu = vec![0.0; nl];
            Cpu.attention_forward(&mut out_cpu, &mut lse_cpu, &x.q, &x.k, &x.v, mask, s)
                .expect("cpu attention_forward");
            let (out, lse) = gpu_forward(&cu, &raw, mask, s);
            assert_rel(&what("out"), &cu, &out, &out_cpu, tol);
            // lse: equal on rows with a visible key; −inf (and out = 0) on the others.
            let (mut got, mut want) = (Vec::new(), Vec::new());
            let mut hidden = 0;
            for (row, (&g, &w)) in lse.iter().zip(&lse_cpu).enumerate() {
                if w == f32::NEG_INFINITY {
                    hidden += 1;
                    assert_eq!(g, f32::NEG_INFINITY, "{}: lse[{row}]", what("lse"));
                    let (bh, i) = (row / s.t, row % s.t);
                    let (bi, h) = (bh / s.nh, bh % s.nh);
                    let o = ((bi * s.t + i) * s.nh + h) * s.hd;
                    assert!(
                        out[o..o + s.hd].iter().all(|&v| v == 0.0),
                        "{}: row {row} sees no key but its output is not 0",
                        what("out")
                    );
                } else {
                    got.push(g);
                    want.push(w);
                }
            }
            assert_eq!(
                hidden > 0,
                masked,
                "the mask must hide whole rows (and only then)"
            );
            // lse is f32 on both sides, from the same (rounded) inputs: a tighter bound.
            assert_rel(&what("lse"), &cu, &got, &want, tol.min(1e-4));

            // ---- backward: the same out/lse and initial gradients on both ----
            let out_r = r(&out_cpu);
            let zeros = BwdIn {
                out: &out_r,
                lse: &lse_cpu,
                dq0: &vec![0.0; x.q.len()],
                dk0: &vec![0.0; x.k.len()],
                dv0: &vec![0.0; x.v.len()],
            };
            // Initial contents about as large as the gradients themselves, so
            // that both a missing += and an overwrite would show.
            let (gq, gk, gv) = cpu_backward(&x, &zeros, mask, s);
            let mut ri = rng(900 + n as u64);
            let dq0 = r(&random(&mut ri, x.q.len(), rms(&gq)));
            let dk0 = r(&random(&mut ri, x.k.len(), rms(&gk)));
            let dv0 = r(&random(&mut ri, x.v.len(), rms(&gv)));
            let bin = BwdIn {
                out: &out_r,
                lse: &lse_cpu,
                dq0: &dq0,
                dk0: &dk0,
                dv0: &dv0,
            };
            let (wq, wk, wv) = cpu_backward(&x, &bin, mask, s);
            let (dq, dk, dv) = gpu_backward(&cu, &x, &bin, mask, s);
            assert_rel(&what("dq"), &cu, &dq, &wq, tol);
            assert_rel(&what("dk"), &cu, &dk, &wk, tol);
            assert_rel(&what("dv"), &cu, &dv, &wv, tol);

            // Same bits on a second run (no atomics, fixed summation order).
            let (out2, lse2) = gpu_forward(&cu, &raw, mask, s);
            assert!(
                bits(&out2) == bits(&out) && bits(&lse2) == bits(&lse),
                "{}",
                what("forward rerun")
            );
            let (dq2, dk2, dv2) = gpu_backward(&cu, &x, &bin, mask, s);
            assert!(
                bits(&dq2) == bits(&dq) && bits(&dk2) == bits(&dk) && bits(&dv2) == bits(&dv),
                "{}",
                what("backward rerun")
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-check.sh runs it)"]
fn attention_rejects_bad_shapes() {
    for (cu, _) in backends("attention_rejects_bad_shapes") {
        let is_shape = |r: Result<(), KernelError>| matches!(r, Err(KernelError::Shape { .. }));
        // HD > 128: beyond the kernels' tiles.
        let s = shape(1, 4, 2, 1, 136);
        let (nq, nk, nl) = (4 * 2 * 136, 4 * 136, 2 * 4);
        let q = cu.zeros(nq, Precision::Compute).unwrap();
        let k = cu.zeros(nk, Precision::Compute).unwrap();
        let mut out = cu.zeros(nq, Precision::Compute).unwrap();
        let mut lse = cu.zeros(nl, Precision::F32).unwrap();
        assert!(is_shape(cu.attention_forward(
            cu.view_mut(&mut out, 0..nq),
            cu.view_mut(&mut lse, 0..nl),
            cu.view(&q, 0..nq),
            cu.view(&k, 0..nk),
            cu.view(&k, 0..nk),
            None,
            s,
        )));
        // Wrong lengths, and a wrong mask length.
        let s = shape(1, 4, 2, 1, 8);
        let (nq, nk) = (4 * 2 * 8, 4 * 8);
        assert!(is_shape(cu.attention_forward(
            cu.view_mut(&mut out, 0..nq),
            cu.view_mut(&mut lse, 0..nl),
            cu.view(&q, 0..nq),
            cu.view(&k, 0..nk + 1),
            cu.view(&k, 0..nk),
            None,
            s,
        )));
        assert!(is_shape(cu.attention_forward(
            cu.view_mut(&mut out, 0..nq),
            cu.view_mut(&mut lse, 0..nl),
            cu.view(&q, 0..nq),
            cu.view(&k, 0..nk),
            cu.view(&k, 0..nk),
            Some(&[1, 1, 1]),
            s,
        )));
        // lse must be f32; on a 16-bit backend the tensors must all be of the compute type.
        let mut lse_c = cu.zeros(nl, Precision::Compute).unwrap();
        if cu.dtype() != rlhf_kernels::cuda::Dtype::F32 {
            assert!(is_shape(cu.attention_forward(
                cu.view_mut(&mut out, 0..nq),
                cu.view_mut(&mut lse_c, 0..nl),
                cu.view(&q, 0..nq),
                cu.view(&k, 0..nk),
                cu.view(&k, 0..nk),
                None,
                s,
            )));
            let k32 = cu.zeros(nk, Precision::F32).unwrap();
            assert!(is_shape(cu.attention_forward(
                cu.view_mut(&mut out, 0..nq),
                cu.view_mut(&mut lse, 0..nl),
                cu.view(&q, 0..nq),
                cu.view(&k, 0..nk),
                cu.view(&k32, 0..nk),
                None,
                s,
            )));
        }
    }
}
