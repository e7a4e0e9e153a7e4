//! Reference attention: plain loops in f64, materialising every probability.
//! The backward uses the textbook D_i = Σ_j P_ij·dP_ij rather than the fast
//! path's dO·O identity, so the two cross-check each other.

use crate::backend::AttnShape;

/// P[b][h][i][j] for visible keys (0 elsewhere), and lse[b,h,i] (−inf when no
/// key is visible). Returned flat: p is [B,NH,T,T], lse [B,NH,T].
fn probabilities(q: &[f64], k: &[f64], mask: Option<&[u8]>, s: AttnShape) -> (Vec<f64>, Vec<f64>) {
    let AttnShape { b, t, nh, nkv, hd } = s;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut p = vec![0.0; b * nh * t * t];
    let mut lse = vec![f64::NEG_INFINITY; b * nh * t];
    for bi in 0..b {
        for h in 0..nh {
            let kvh = h / (nh / nkv);
            for i in 0..t {
                let row = ((bi * nh + h) * t + i) * t;
                let vis: Vec<usize> = (0..=i)
                    .filter(|&j| mask.is_none_or(|m| m[bi * t + j] != 0))
                    .collect();
                if vis.is_empty() {
                    continue;
                }
                let score = |j: usize| {
                    let mut acc = 0.0;
                    for d in 0..hd {
                        acc += q[((bi * t + i) * nh + h) * hd + d]
                            * k[((bi * t + j) * nkv + kvh) * hd + d];
                    }
                    acc * scale
                };
                let max = vis
                    .iter()
                    .map(|&j| score(j))
                    .fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = vis.iter().map(|&j| (score(j) - max).exp()).sum();
                let l = max + sum.ln();
                lse[(bi * nh + h) * t + i] = l;
                for &j in &vis {
                    p[row + j] = (score(j) - l).exp();
                }
            }
        }
    }
    (p, lse)
}

/// (out[B,T,NH,HD], lse[B,NH,T]).
pub fn forward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    mask: Option<&[u8]>,
    s: AttnShape,
) -> (Vec<f64>, Vec<f64>) {
    let AttnShape { b, t, nh, nkv, hd } = s;
    let (p, lse) = probabilities(q, k, mask, s);
    let mut out = vec![0.0; q.len()];
    for bi in 0..b {
        for h in 0..nh {
            let kvh = h / (nh / nkv);
            for i in 0..t {
                for j in 0..t {
                    let pij = p[((bi * nh + h) * t + i) * t + j];
                    for d in 0..hd {
                        out[((bi * t + i) * nh + h) * hd + d] +=
                            pij * v[((bi * t + j) * nkv + kvh) * hd + d];
                    }
                }
            }
        }
    }
    (out, lse)
}

/// (dq, dk, dv), not accumulated.
pub fn backward(
    dout: &[f64],
    q: &[f64],
    k: &[f64],
    v: &[f64],
    mask: Option<&[u8]>,
    s: AttnShape,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let AttnShape { b, t, nh, nkv, hd } = s;
    let scale = 1.0 / (hd as f64).sqrt();
    let (p, _) = probabilities(q, k, mask, s);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    let qi = |bi: usize, i: usize, h: usize, d: usize| ((bi * t + i) * nh + h) * hd + d;
    let ki = |bi: usize, j: usize, kvh: usize, d: usize| ((bi * t + j) * nkv + kvh) * hd + d;
    for bi in 0..b {
        for h in 0..nh {
            let kvh = h / (nh / nkv);
            for i in 0..t {
                let prow = &p[((bi * nh + h) * t + i) * t..][..t];
                // dP_ij = dO_i · V_j;  D_i = Σ_j P_ij dP_ij
                let dp: Vec<f64> = (0..t)
                    .map(|j| {
                        (0..hd)
                            .map(|d| dout[qi(bi, i, h, d)] * v[ki(bi, j, kvh, d)])
                            .sum()
                    })
                    .collect();
                let big_d: f64 = (0..t).map(|j| prow[j] * dp[j]).sum();
                for j in 0..t {
                    let ds = prow[j] * (dp[j] - big_d);
                    for d in 0..hd {
                        dv[ki(bi, j, kvh, d)] += prow[j] * dout[qi(bi, i, h, d)];
                        dq[qi(bi, i, h, d)] += scale * ds * k[ki(bi, j, kvh, d)];
                        dk[ki(bi, j, kvh, d)] += scale * ds * q[qi(bi, i, h, d)];
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}
