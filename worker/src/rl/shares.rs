//! Sums over the shares of an RL step that do not depend on which rank holds
//! which share. Each rank writes its shares' f64 values into the shares'
//! own slots of a zero buffer, each value as three f32 pieces that add back
//! to it exactly; one all-reduce then only ever adds zeros to a piece, so
//! every rank receives every share's values bit for bit, and adds them in
//! share order — as one process holding every share does.

use crate::collective::Collective;
use crate::model::Llama;
use anyhow::{bail, Result};
use rlhf_kernels::{Backend, Precision};

/// f64 → three f32s whose f64 sum is the value (for finite, normal values).
fn split(x: f64) -> [f32; 3] {
    let hi = x as f32;
    let r = x - hi as f64;
    let mid = r as f32;
    let lo = (r - mid as f64) as f32;
    [hi, mid, lo]
}

fn join(p: &[f32]) -> f64 {
    p[0] as f64 + p[1] as f64 + p[2] as f64
}

/// Every share's K values, from the shares this rank holds (`local`:
/// (share id, values)) and the other ranks'; `n_shares` over all ranks.
pub fn gather<B: Backend, const K: usize>(
    model: &Llama<B>,
    collective: &mut dyn Collective<B>,
    n_shares: usize,
    local: &[(usize, [f64; K])],
) -> Result<Vec<[f64; K]>> {
    let mut host = vec![0f32; n_shares * K * 3];
    for (s, vals) in local {
        if *s >= n_shares {
            bail!("share {s} of {n_shares}");
        }
        for (k, &v) in vals.iter().enumerate() {
            let at = (s * K + k) * 3;
            host[at..at + 3].copy_from_slice(&split(v));
        }
    }
    if collective.world_size() > 1 {
        let be = &model.be;
        let mut buf = be.upload(&host, Precision::F32)?;
        let n = host.len();
        collective.all_reduce_sum(be, &mut buf, 0..n)?;
        host = be.download(be.view(&buf, 0..n))?;
    }
    Ok((0..n_shares)
        .map(|s| {
            let mut out = [0f64; K];
            for (k, o) in out.iter_mut().enumerate() {
                let at = (s * K + k) * 3;
                *o = join(&host[at..at + 3]);
            }
            out
        })
        .collect())
}

/// The sum over all shares, added in share order.
pub fn sum<B: Backend, const K: usize>(
    model: &Llama<B>,
    collective: &mut dyn Collective<B>,
    n_shares: usize,
    local: &[(usize, [f64; K])],
) -> Result<[f64; K]> {
    let all = gather(model, collective, n_shares, local)?;
    let mut out = [0f64; K];
    for vals in &all {
        for (o, v) in out.iter_mut().zip(vals) {
            *o += v;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_f32_pieces_hold_an_f64_exactly() {
        for x in [
            0.0,
            1.0,
            std::f64::consts::PI,
            -1e-7 / 3.0,
            123_456_789.123_456_79,
            2.0f64.powi(40) + 1.0 / 3.0,
        ] {
            assert_eq!(join(&split(x)), x, "{x}");
        }
    }
}
