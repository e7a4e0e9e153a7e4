//! Attention of new queries over a key/value cache (generation's prefill and
//! decode steps). Layouts: q, out: [B,TQ,NH,HD]; k_cache, v_cache:
//! [B,CAP,NKV,HD]; key_mask: [B,LEN] with LEN = START+TQ (0 = padding).
//! Query i of row b sits at cache slot START+i and sees key j iff
//! j ≤ START+i and the key is not padding. Each query row is independent, so
//! rows are spread over the rayon pool; a row's softmax is in f32 with its
//! scores kept in a scratch row (LEN ≤ a few thousand).

use super::check::{expect_len, product, shape_err};
use super::simd::exp;
use crate::backend::{KvAttnShape, Result};
use rayon::prelude::*;

const OP: &str = "attention_kv_forward";

/// Checks head counts, the filled length against the capacity, and every
/// buffer's length.
pub(crate) fn check(
    s: KvAttnShape,
    out: usize,
    q: usize,
    k: usize,
    v: usize,
    mask: usize,
) -> Result<()> {
    let KvAttnShape {
        b,
        tq,
        cap,
        nh,
        nkv,
        hd,
        ..
    } = s;
    if nh == 0 || nkv == 0 || hd == 0 || nh % nkv != 0 {
        return Err(shape_err(
            OP,
            format!("need NH, NKV, HD > 0 and NKV dividing NH, got {s:?}"),
        ));
    }
    if s.keys() > cap {
        return Err(shape_err(
            OP,
            format!(
                "start {} + {tq} new queries exceed the cache capacity {cap}",
                s.start
            ),
        ));
    }
    let q_len = product(OP, &[b, tq, nh, hd])?;
    let kv_len = product(OP, &[b, cap, nkv, hd])?;
    expect_len(OP, "out", out, q_len)?;
    expect_len(OP, "q", q, q_len)?;
    expect_len(OP, "k_cache", k, kv_len)?;
    expect_len(OP, "v_cache", v, kv_len)?;
    expect_len(OP, "key_mask", mask, product(OP, &[b, s.keys()])?)
}

/// out[B,TQ,NH,HD] = attention of q over the cache (see the module doc).
pub fn forward(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: &[u8],
    s: KvAttnShape,
) -> Result<()> {
    check(s, out.len(), q.len(), k.len(), v.len(), key_mask.len())?;
    let KvAttnShape {
        tq,
        cap,
        start,
        nh,
        nkv,
        hd,
        ..
    } = s;
    let len = s.keys();
    let group = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    // One task per query row of one head: out[b, i, h, :].
    let min_rows = (4096 / (len * hd).max(1)).max(1);
    out.par_chunks_mut(hd)
        .with_min_len(min_rows)
        .enumerate()
        .for_each_init(
            || vec![0f32; len],
            |scores, (row, o)| {
                let (h, i, bi) = (row % nh, (row / nh) % tq, row / (nh * tq));
                let kvh = h / group;
                let qr = &q[row * hd..(row + 1) * hd];
                let mask = &key_mask[bi * len..(bi + 1) * len];
                let kv_at = |j: usize| ((bi * cap + j) * nkv + kvh) * hd;
                let last = start + i; // the query's own slot: keys 0..=last
                let mut max = f32::NEG_INFINITY;
                for j in 0..=last {
                    scores[j] = if mask[j] != 0 {
                        dot(qr, &k[kv_at(j)..kv_at(j) + hd]) * scale
                    } else {
                        f32::NEG_INFINITY
                    };
                    max = max.max(scores[j]);
                }
                o.fill(0.0);
                if max == f32::NEG_INFINITY {
                    return; // no visible key (a padding query): out = 0
                }
                let mut sum = 0f32;
                for j in 0..=last {
                    if mask[j] == 0 {
                        continue;
                    }
                    let p = exp(scores[j] - max);
                    sum += p;
                    let vr = &v[kv_at(j)..kv_at(j) + hd];
                    for (o, &x) in o.iter_mut().zip(vr) {
                        *o += p * x;
                    }
                }
                let inv = 1.0 / sum;
                o.iter_mut().for_each(|x| *x *= inv);
            },
        );
    Ok(())
}

/// q·k with 8 partial sums (vectorised; a fixed order, so the same bits on
/// every run and thread count).
#[inline]
fn dot(q: &[f32], k: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (qc, kc) = (q.chunks_exact(8), k.chunks_exact(8));
    let (qr, kr) = (qc.remainder(), kc.remainder());
    for (a, b) in qc.zip(kc) {
        for i in 0..8 {
            acc[i] += a[i] * b[i];
        }
    }
    let mut tail = 0f32;
    for (a, b) in qr.iter().zip(kr) {
        tail += a * b;
    }
    acc.iter().sum::<f32>() + tail
}

/// Reference: plain loops in f64, probabilities materialised per row.
pub mod naive {
    use crate::backend::KvAttnShape;

    /// out[B,TQ,NH,HD] in f64.
    pub fn forward(q: &[f64], k: &[f64], v: &[f64], mask: &[u8], s: KvAttnShape) -> Vec<f64> {
        let KvAttnShape {
            b,
            tq,
            cap,
            start,
            nh,
            nkv,
            hd,
        } = s;
        let len = start + tq;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = vec![0.0; b * tq * nh * hd];
        for bi in 0..b {
            for i in 0..tq {
                for h in 0..nh {
                    let kvh = h / (nh / nkv);
                    let qo = ((bi * tq + i) * nh + h) * hd;
                    let ko = |j: usize| ((bi * cap + j) * nkv + kvh) * hd;
                    let vis: Vec<usize> = (0..=start + i)
                        .filter(|&j| mask[bi * len + j] != 0)
                        .collect();
                    let scores: Vec<f64> = vis
                        .iter()
                        .map(|&j| (0..hd).map(|d| q[qo + d] * k[ko(j) + d]).sum::<f64>() * scale)
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                    for (&j, sc) in vis.iter().zip(&scores) {
                        let p = (sc - max).exp() / z;
                        for d in 0..hd {
                            out[qo + d] += p * v[ko(j) + d];
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::AttnShape;
    use crate::cpu::testutil::{assert_close, rng, to64, uniform};
    use crate::KernelError;

    fn shape(
        b: usize,
        tq: usize,
        cap: usize,
        start: usize,
        nh: usize,
        nkv: usize,
        hd: usize,
    ) -> KvAttnShape {
        KvAttnShape {
            b,
            tq,
            cap,
            start,
            nh,
            nkv,
            hd,
        }
    }

    /// Left padding on row 0 (its first queries see nothing), a hole in the last row.
    fn mask(s: KvAttnShape) -> Vec<u8> {
        let len = s.keys();
        let mut m = vec![1u8; s.b * len];
        m[..len / 3].fill(0);
        if s.b > 1 && len > 2 {
            m[(s.b - 1) * len + 1] = 0;
        }
        m
    }

    #[test]
    fn matches_naive_for_prefill_and_decode_shapes() {
        for (seed, s) in [
            (1, shape(2, 7, 9, 0, 4, 2, 8)),   // prefill, spare capacity
            (2, shape(3, 1, 20, 12, 6, 2, 5)), // decode step, GQA 3
            (3, shape(1, 4, 16, 5, 2, 2, 16)), // several new tokens mid-cache
            (4, shape(2, 1, 1, 0, 1, 1, 1)),   // a single key
        ] {
            let mut r = rng(seed);
            let nq = s.b * s.tq * s.nh * s.hd;
            let nk = s.b * s.cap * s.nkv * s.hd;
            let (q, k, v) = (
                uniform(&mut r, nq),
                uniform(&mut r, nk),
                uniform(&mut r, nk),
            );
            let m = mask(s);
            let mut out = vec![f32::NAN; nq];
            forward(&mut out, &q, &k, &v, &m, s).unwrap();
            let want = naive::forward(&to64(&q), &to64(&k), &to64(&v), &m, s);
            assert_close(&format!("{s:?}"), &out, &want, 1e-5);
        }
    }

    /// The training op on T tokens and this op (prefill of T−D tokens, then D
    /// single-token steps over the same cache) give the same rows: the cache
    /// path is the training attention computed incrementally.
    #[test]
    fn incremental_steps_equal_full_causal_attention() {
        let (b, t, nh, nkv, hd) = (2, 11, 4, 2, 8);
        let a = AttnShape { b, t, nh, nkv, hd };
        let mut r = rng(7);
        let (q, k, v) = (
            uniform(&mut r, b * t * nh * hd),
            uniform(&mut r, b * t * nkv * hd),
            uniform(&mut r, b * t * nkv * hd),
        );
        let mut full_mask = vec![1u8; b * t];
        full_mask[..3].fill(0); // row 0 left-padded by 3
        let mut want = vec![0.0; q.len()];
        let mut lse = vec![0.0; b * nh * t];
        super::super::attention::forward(&mut want, &mut lse, &q, &k, &v, Some(&full_mask), a)
            .unwrap();
        // The cache holds all T positions (layout [B,CAP,NKV,HD] = k's).
        let qrow = |bi: usize, i0: usize, n: usize| {
            let w = nh * hd;
            (bi * t + i0) * w..(bi * t + i0 + n) * w
        };
        let prefill = 8;
        let step = |start: usize, tq: usize| {
            let s = shape(b, tq, t, start, nh, nkv, hd);
            let qs: Vec<f32> = (0..b)
                .flat_map(|bi| q[qrow(bi, start, tq)].to_vec())
                .collect();
            let m: Vec<u8> = (0..b)
                .flat_map(|bi| full_mask[bi * t..bi * t + start + tq].to_vec())
                .collect();
            let mut out = vec![f32::NAN; qs.len()];
            forward(&mut out, &qs, &k, &v, &m, s).unwrap();
            for bi in 0..b {
                let w = nh * hd;
                let got = &out[bi * tq * w..(bi + 1) * tq * w];
                let exp = &want[qrow(bi, start, tq)];
                for (g, e) in got.iter().zip(exp) {
                    assert!((g - e).abs() < 1e-5, "start {start}: {g} vs {e}");
                }
            }
        };
        step(0, prefill);
        for start in prefill..t {
            step(start, 1);
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let s = shape(1, 2, 3, 2, 2, 1, 4); // 2 + 2 > capacity 3
        let err = forward(
            &mut [0.0; 16],
            &[0.0; 16],
            &[0.0; 12],
            &[0.0; 12],
            &[1; 4],
            s,
        )
        .unwrap_err();
        assert!(matches!(err, KernelError::Shape { .. }), "{err}");
        let s = shape(1, 1, 3, 2, 2, 1, 4);
        let err =
            forward(&mut [0.0; 8], &[0.0; 8], &[0.0; 12], &[0.0; 12], &[1; 2], s).unwrap_err();
        assert!(err.to_string().contains("key_mask"), "{err}");
    }
}
