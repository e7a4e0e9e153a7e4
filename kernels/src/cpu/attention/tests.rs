use super::*;
use crate::cpu::testutil::{assert_close, assert_close64, dot, fd_grad, plus, rng, to64, uniform};
use crate::KernelError;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

fn shape(b: usize, t: usize, nh: usize, nkv: usize, hd: usize) -> AttnShape {
    AttnShape { b, t, nh, nkv, hd }
}

/// Shapes covering: a single token, GQA groups of 2 and 3, MHA, T crossing
/// the QB block boundary (70, 130), odd head dims.
const SHAPES: [AttnShape; 6] = [
    AttnShape {
        b: 1,
        t: 1,
        nh: 1,
        nkv: 1,
        hd: 1,
    },
    AttnShape {
        b: 2,
        t: 7,
        nh: 4,
        nkv: 2,
        hd: 8,
    },
    AttnShape {
        b: 1,
        t: 70,
        nh: 3,
        nkv: 1,
        hd: 5,
    },
    AttnShape {
        b: 2,
        t: 130,
        nh: 2,
        nkv: 2,
        hd: 16,
    },
    AttnShape {
        b: 1,
        t: 65,
        nh: 6,
        nkv: 2,
        hd: 4,
    },
    AttnShape {
        b: 3,
        t: 9,
        nh: 2,
        nkv: 1,
        hd: 33,
    },
];

/// A key mask [B,T] with left padding (so early query rows see no key at all)
/// and a few interior holes.
fn padding_mask(r: &mut ChaCha8Rng, b: usize, t: usize) -> Vec<u8> {
    let mut m = vec![1u8; b * t];
    for bi in 0..b {
        let pad = r.random_range(0..=t / 2);
        for j in 0..t {
            if j < pad || r.random_range(0.0..1.0) < 0.15 {
                m[bi * t + j] = 0;
            }
        }
    }
    m
}

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn inputs(r: &mut ChaCha8Rng, s: AttnShape) -> Inputs {
    let (nq, nkv) = (s.b * s.t * s.nh * s.hd, s.b * s.t * s.nkv * s.hd);
    // Scaled up so the softmax is far from uniform.
    let big = |x: Vec<f32>| x.into_iter().map(|x| 2.0 * x).collect::<Vec<_>>();
    Inputs {
        q: big(uniform(r, nq)),
        k: big(uniform(r, nkv)),
        v: uniform(r, nkv),
    }
}

fn run_forward(x: &Inputs, mask: Option<&[u8]>, s: AttnShape) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![f32::NAN; x.q.len()]; // stale NaNs must be overwritten
    let mut lse = vec![f32::NAN; s.b * s.nh * s.t];
    forward(&mut out, &mut lse, &x.q, &x.k, &x.v, mask, s).unwrap();
    (out, lse)
}

/// Fast backward starting from the given gradient buffers.
fn run_backward(
    grads: (&[f32], &[f32], &[f32]),
    dout: &[f32],
    x: &Inputs,
    fwd: &(Vec<f32>, Vec<f32>),
    mask: Option<&[u8]>,
    s: AttnShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut dq, mut dk, mut dv) = (grads.0.to_vec(), grads.1.to_vec(), grads.2.to_vec());
    backward(
        &mut dq, &mut dk, &mut dv, dout, &x.q, &x.k, &x.v, &fwd.0, &fwd.1, mask, s,
    )
    .unwrap();
    (dq, dk, dv)
}

/// lse compared where finite; −inf must match exactly.
fn assert_lse(got: &[f32], want: &[f64]) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w == f64::NEG_INFINITY {
            assert_eq!(g, f32::NEG_INFINITY, "lse[{i}]");
        } else {
            assert!(
                (g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "lse[{i}]: {g} vs {w}"
            );
        }
    }
}

#[test]
fn forward_and_backward_match_naive() {
    let mut r = rng(100);
    for s in SHAPES {
        for masked in [false, true] {
            let x = inputs(&mut r, s);
            let mask = masked.then(|| padding_mask(&mut r, s.b, s.t));
            let mask = mask.as_deref();
            let fwd = run_forward(&x, mask, s);
            let (want_out, want_lse) =
                naive::forward(&to64(&x.q), &to64(&x.k), &to64(&x.v), mask, s);
            let what = format!("{s:?} masked={masked}");
            assert_close(&format!("out {what}"), &fwd.0, &want_out, 1e-5);
            assert_lse(&fwd.1, &want_lse);

            let dout = uniform(&mut r, x.q.len());
            let g0 = (
                uniform(&mut r, x.q.len()),
                uniform(&mut r, x.k.len()),
                uniform(&mut r, x.v.len()),
            );
            let (dq, dk, dv) = run_backward((&g0.0, &g0.1, &g0.2), &dout, &x, &fwd, mask, s);
            let (gq, gk, gv) =
                naive::backward(&to64(&dout), &to64(&x.q), &to64(&x.k), &to64(&x.v), mask, s);
            assert_close(&format!("dq {what}"), &dq, &plus(&g0.0, &gq), 1e-4);
            assert_close(&format!("dk {what}"), &dk, &plus(&g0.1, &gk), 1e-4);
            assert_close(&format!("dv {what}"), &dv, &plus(&g0.2, &gv), 1e-4);
        }
    }
}

#[test]
fn backward_matches_finite_differences() {
    let mut r = rng(101);
    let s = shape(2, 5, 4, 2, 3);
    // Batch 1 is left-padded by 2: its first two query rows see no key.
    let mask: Vec<u8> = vec![1, 1, 0, 1, 1, 0, 0, 1, 1, 1];
    for mask in [None, Some(&mask[..])] {
        let x = inputs(&mut r, s);
        let dout = uniform(&mut r, x.q.len());
        let (q, k, v, d) = (to64(&x.q), to64(&x.k), to64(&x.v), to64(&dout));
        let loss = |q: &[f64], k: &[f64], v: &[f64]| dot(&d, &naive::forward(q, k, v, mask, s).0);
        let fd_q = fd_grad(&q, |q| loss(q, &k, &v));
        let fd_k = fd_grad(&k, |k| loss(&q, k, &v));
        let fd_v = fd_grad(&v, |v| loss(&q, &k, v));

        let (gq, gk, gv) = naive::backward(&d, &q, &k, &v, mask, s);
        assert_close64("naive dq vs fd", &gq, &fd_q, 1e-6);
        assert_close64("naive dk vs fd", &gk, &fd_k, 1e-6);
        assert_close64("naive dv vs fd", &gv, &fd_v, 1e-6);

        let fwd = run_forward(&x, mask, s);
        let zeros = (
            vec![0.0; x.q.len()],
            vec![0.0; x.k.len()],
            vec![0.0; x.v.len()],
        );
        let (dq, dk, dv) = run_backward((&zeros.0, &zeros.1, &zeros.2), &dout, &x, &fwd, mask, s);
        assert_close("dq vs fd", &dq, &fd_q, 1e-4);
        assert_close("dk vs fd", &dk, &fd_k, 1e-4);
        assert_close("dv vs fd", &dv, &fd_v, 1e-4);
    }
}

#[test]
fn rows_without_visible_keys_give_zeros_not_nan() {
    let mut r = rng(102);
    let s = shape(2, 6, 2, 1, 4);
    // Batch 0: first three keys are padding. Batch 1: everything is padding.
    let mask: Vec<u8> = vec![0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0];
    let x = inputs(&mut r, s);
    let fwd = run_forward(&x, Some(&mask), s);
    let d = Dims::check("test", s, &[], &[], fwd.1.len(), None).unwrap();
    for (b, i) in (0..3).map(|i| (0, i)).chain((0..6).map(|i| (1, i))) {
        for h in 0..s.nh {
            assert!(
                fwd.0[d.q_off(b, i, h)..][..s.hd].iter().all(|&o| o == 0.0),
                "out b={b} i={i} h={h}"
            );
            assert_eq!(fwd.1[(b * s.nh + h) * s.t + i], f32::NEG_INFINITY);
        }
    }
    let dout = uniform(&mut r, x.q.len());
    let zeros = (
        vec![0.0; x.q.len()],
        vec![0.0; x.k.len()],
        vec![0.0; x.v.len()],
    );
    let (dq, dk, dv) = run_backward(
        (&zeros.0, &zeros.1, &zeros.2),
        &dout,
        &x,
        &fwd,
        Some(&mask),
        s,
    );
    assert!(dq.iter().chain(&dk).chain(&dv).all(|g| g.is_finite()));
    // Fully padded batch 1: no gradient at all.
    let half_q = x.q.len() / 2;
    let half_kv = x.k.len() / 2;
    assert!(dq[half_q..]
        .iter()
        .chain(&dk[half_kv..])
        .chain(&dv[half_kv..])
        .all(|&g| g == 0.0));
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let mut r = rng(103);
    let s = shape(2, 70, 4, 2, 8);
    let x = inputs(&mut r, s);
    let mask = padding_mask(&mut r, s.b, s.t);
    let dout = uniform(&mut r, x.q.len());
    let zeros = (
        vec![0.0; x.q.len()],
        vec![0.0; x.k.len()],
        vec![0.0; x.v.len()],
    );
    let run = |threads| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let fwd = run_forward(&x, Some(&mask), s);
            let grads = run_backward(
                (&zeros.0, &zeros.1, &zeros.2),
                &dout,
                &x,
                &fwd,
                Some(&mask),
                s,
            );
            (fwd, grads)
        })
    };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let (a, b) = (run(1), run(3));
    assert_eq!(bits(&a.0 .0), bits(&b.0 .0));
    assert_eq!(bits(&a.1 .0), bits(&b.1 .0));
    assert_eq!(bits(&a.1 .1), bits(&b.1 .1));
    assert_eq!(bits(&a.1 .2), bits(&b.1 .2));
}

#[test]
fn bad_shapes_are_errors() {
    let s = shape(1, 2, 3, 2, 4); // NKV does not divide NH
    let (mut out, mut lse, q) = (vec![0.0f32; 24], vec![0.0f32; 6], vec![0.0f32; 24]);
    let kv = vec![0.0f32; 16];
    let r = forward(&mut out, &mut lse, &q, &kv, &kv, None, s);
    assert!(matches!(
        r,
        Err(KernelError::Shape {
            op: "attention_forward",
            ..
        })
    ));

    let s = shape(1, 2, 2, 1, 4);
    let (mut out, mut lse, q, kv) = (
        vec![0.0f32; 16],
        vec![0.0f32; 4],
        vec![0.0f32; 16],
        vec![0.0f32; 8],
    );
    assert!(forward(&mut out, &mut lse, &q, &kv, &kv, None, s).is_ok());
    assert!(matches!(
        forward(&mut out, &mut lse, &q, &kv[..7], &kv, None, s),
        Err(KernelError::Shape { .. })
    ));
    assert!(matches!(
        forward(&mut out, &mut lse[..3], &q, &kv, &kv, None, s),
        Err(KernelError::Shape { .. })
    ));
    assert!(matches!(
        forward(&mut out, &mut lse, &q, &kv, &kv, Some(&[1]), s),
        Err(KernelError::Shape { .. })
    ));
    let (mut dq, mut dk, mut dv) = (vec![0.0f32; 16], vec![0.0f32; 8], vec![0.0f32; 9]);
    let r = backward(
        &mut dq, &mut dk, &mut dv, &q, &q, &kv, &kv, &q, &lse, None, s,
    );
    assert!(matches!(
        r,
        Err(KernelError::Shape {
            op: "attention_backward",
            ..
        })
    ));
}
