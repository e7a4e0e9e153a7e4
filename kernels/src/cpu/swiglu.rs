//! SiLU-gated activation of the MLP: h = silu(gate) · up, silu(g) = g·σ(g).
//! silu'(g) = σ(g)·(1 + g·(1 − σ(g))).

use super::check::expect_len;
use super::par::CHUNK;
use crate::backend::Result;
use rayon::prelude::*;

use super::simd::{sigmoid, simd_fn};

simd_fn! {
    /// out = silu(gate)·up on one chunk.
    fn forward_chunk(out: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g * sigmoid(g) * u;
        }
    }
}

simd_fn! {
    /// dgate += dout·up·silu'(gate), dup += dout·silu(gate) on one chunk.
    fn backward_chunk(dg: &mut [f32], du: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
        for ((dg, du), ((&d, &g), &u)) in dg.iter_mut().zip(du).zip(dout.iter().zip(gate).zip(up)) {
            let s = sigmoid(g);
            *dg += d * u * s * (1.0 + g * (1.0 - s));
            *du += d * g * s;
        }
    }
}

/// out[N,F] = silu(gate) · up.
pub fn forward(out: &mut [f32], gate: &[f32], up: &[f32]) -> Result<()> {
    expect_len("swiglu_forward", "gate", gate.len(), out.len())?;
    expect_len("swiglu_forward", "up", up.len(), out.len())?;
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((out, gate), up)| forward_chunk(out, gate, up));
    Ok(())
}

/// dgate += dout · up · silu'(gate); dup += dout · silu(gate).
pub fn backward(
    dgate: &mut [f32],
    dup: &mut [f32],
    dout: &[f32],
    gate: &[f32],
    up: &[f32],
) -> Result<()> {
    const OP: &str = "swiglu_backward";
    let n = dout.len();
    for (what, len) in [
        ("dgate", dgate.len()),
        ("dup", dup.len()),
        ("gate", gate.len()),
        ("up", up.len()),
    ] {
        expect_len(OP, what, len, n)?;
    }
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(dout.par_chunks(CHUNK))
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(((dg, du), dout), (gate, up))| backward_chunk(dg, du, dout, gate, up));
    Ok(())
}

/// References: plain loops in f64.
pub mod naive {
    fn silu(g: f64) -> f64 {
        g / (1.0 + (-g).exp())
    }

    pub fn forward(gate: &[f64], up: &[f64]) -> Vec<f64> {
        gate.iter().zip(up).map(|(&g, &u)| silu(g) * u).collect()
    }

    /// (dgate, dup), not accumulated.
    pub fn backward(dout: &[f64], gate: &[f64], up: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let mut dg = vec![0.0; dout.len()];
        let mut du = vec![0.0; dout.len()];
        for i in 0..dout.len() {
            let s = 1.0 / (1.0 + (-gate[i]).exp());
            dg[i] = dout[i] * up[i] * (s + gate[i] * s * (1.0 - s));
            du[i] = dout[i] * silu(gate[i]);
        }
        (dg, du)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, dot, fd_grad, plus, rng, to64, uniform};
    use crate::KernelError;

    #[test]
    fn forward_and_backward_match_naive() {
        let mut r = rng(60);
        for n in [0, 1, 7, 1001, CHUNK + 3] {
            // gates spread over [−8, 8) to cover both tails of σ.
            let gate: Vec<f32> = uniform(&mut r, n).iter().map(|g| 8.0 * g).collect();
            let up = uniform(&mut r, n);
            let mut out = vec![0.0f32; n];
            forward(&mut out, &gate, &up).unwrap();
            assert_close(
                "swiglu_forward",
                &out,
                &naive::forward(&to64(&gate), &to64(&up)),
                1e-6,
            );

            let dout = uniform(&mut r, n);
            let mut dg = uniform(&mut r, n);
            let mut du = uniform(&mut r, n);
            let (gg, gu) = naive::backward(&to64(&dout), &to64(&gate), &to64(&up));
            let (want_g, want_u) = (plus(&dg, &gg), plus(&du, &gu));
            backward(&mut dg, &mut du, &dout, &gate, &up).unwrap();
            assert_close("dgate", &dg, &want_g, 1e-5);
            assert_close("dup", &du, &want_u, 1e-5);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut r = rng(61);
        let n = 9;
        let gate: Vec<f32> = uniform(&mut r, n).iter().map(|g| 4.0 * g).collect();
        let up = uniform(&mut r, n);
        let dout = uniform(&mut r, n);
        let (g64, u64_, d64) = (to64(&gate), to64(&up), to64(&dout));
        let fd_g = fd_grad(&g64, |g| dot(&d64, &naive::forward(g, &u64_)));
        let fd_u = fd_grad(&u64_, |u| dot(&d64, &naive::forward(&g64, u)));
        let (mut dg, mut du) = (vec![0.0f32; n], vec![0.0f32; n]);
        backward(&mut dg, &mut du, &dout, &gate, &up).unwrap();
        assert_close("dgate vs fd", &dg, &fd_g, 1e-5);
        assert_close("dup vs fd", &du, &fd_u, 1e-5);
    }

    #[test]
    fn extreme_gates_stay_finite() {
        let gate = [-1e4f32, -100.0, 100.0, 1e4];
        let mut out = [0.0f32; 4];
        forward(&mut out, &gate, &[1.0; 4]).unwrap();
        assert!(out.iter().all(|v| v.is_finite()), "{out:?}");
        let (mut dg, mut du) = ([0.0f32; 4], [0.0f32; 4]);
        backward(&mut dg, &mut du, &[1.0; 4], &gate, &[1.0; 4]).unwrap();
        assert!(dg.iter().chain(&du).all(|v| v.is_finite()), "{dg:?} {du:?}");
    }

    #[test]
    fn bad_lengths_are_errors() {
        let mut out = vec![0.0f32; 3];
        assert!(matches!(
            forward(&mut out, &[0.0; 3], &[0.0; 2]),
            Err(KernelError::Shape { .. })
        ));
        let mut dg = vec![0.0f32; 3];
        let r = backward(&mut dg, &mut out, &[0.0; 3], &[0.0; 4], &[0.0; 3]);
        assert!(matches!(
            r,
            Err(KernelError::Shape {
                op: "swiglu_backward",
                ..
            })
        ));
    }
}
