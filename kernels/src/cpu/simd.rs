//! Vectorisable math for the CPU kernels: a polynomial `exp` that LLVM turns
//! into 8-wide AVX2 code (libm's `expf` is a scalar call, and it dominated
//! cross-entropy, softmax and SiLU), and `simd_fn!`, which compiles a loop
//! three times — for AVX-512, AVX2 and the x86-64 baseline — and picks one at
//! run time.
//!
//! No FMA contraction is used, so both versions give bitwise-identical results:
//! a run resumed on another machine of the same architecture replays exactly.

/// Define `pub fn name(args) -> ret { body }` compiled for AVX-512 or AVX2 when
/// the CPU has it (checked at run time), else for the baseline target.
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    inner($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    inner($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F, checked on the line above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2, checked on the line above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

/// Lanes of the accumulators below: one AVX2 register of f32.
const L: usize = 8;

/// e^x with a relative error below 2e-7 over the whole f32 range; exactly 0
/// for x < −87.3 (and −inf), +inf above 88.7, NaN for NaN. Cephes' expf: x = n·ln2 + r,
/// |r| ≤ ln2/2, e^r by a degree-7 polynomial, 2^n by building the exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4; // ln2 split in two for an exact n·ln2
    const C2: f32 = -2.121_944_4e-4;
    // max/min rather than clamp: clamp's NaN handling keeps LLVM from vectorising.
    #[allow(clippy::manual_clamp)]
    let xc = x.max(-87.0).min(88.0);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes' 5.0000001201e-1 rounds to 0.5 in f32
    let e = p * r * r + r + 1.0;
    // SAFETY: n is a whole number in [−126, 128] (x was clamped above), so the
    // conversion is exact; the unchecked form (no NaN/saturation handling) is
    // what lets LLVM vectorise it.
    let ni: i32 = unsafe { n.to_int_unchecked() };
    let pow2n = f32::from_bits(((ni + 127) as u32) << 23);
    let y = e * pow2n;
    if x < -87.3 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else if x.is_nan() {
        // The clamp above turned NaN into −87: give it back, so a NaN logit
        // shows as a NaN loss (as on CUDA) instead of a tiny probability.
        x
    } else {
        y
    }
}

/// max over `x` (−inf when empty). NaNs are ignored, like f32::max.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; L];
    let chunks = x.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..L {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    let mut m = rest.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for a in acc {
        m = m.max(a);
    }
    m
}

/// Σ x in f64, in a fixed order (8 lanes, then the lanes and the tail).
#[inline(always)]
pub fn sum_f64(x: &[f32]) -> f64 {
    let mut acc = [0f64; L];
    let chunks = x.chunks_exact(L);
    let tail: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
    for c in chunks {
        for j in 0..L {
            acc[j] += c[j] as f64;
        }
    }
    tail + acc.iter().sum::<f64>()
}

/// Σ x² in f64, in a fixed order (8 lanes, then the lanes and the tail).
#[inline(always)]
pub fn sum_squares_f64(x: &[f32]) -> f64 {
    let mut acc = [0f64; L];
    let chunks = x.chunks_exact(L);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum();
    for c in chunks {
        for j in 0..L {
            acc[j] += (c[j] as f64) * (c[j] as f64);
        }
    }
    tail + acc.iter().sum::<f64>()
}

/// Σ a·b·c (products in f32, sum in f64), in a fixed order.
#[inline(always)]
pub fn dot3_f64(a: &[f32], b: &[f32], c: &[f32]) -> f64 {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [0f64; L];
    let whole = n / L * L;
    for i in (0..whole).step_by(L) {
        for j in 0..L {
            acc[j] += (a[i + j] * b[i + j] * c[i + j]) as f64;
        }
    }
    let tail: f64 = (whole..n).map(|i| (a[i] * b[i] * c[i]) as f64).sum();
    tail + acc.iter().sum::<f64>()
}

/// x ← e^(x − shift), returning Σ in f64. Two simple passes, so that LLVM
/// vectorises each (a fused loop with an f64 accumulator stays scalar).
#[inline(always)]
pub fn exp_shift_sum(x: &mut [f32], shift: f32) -> f64 {
    for v in x.iter_mut() {
        *v = exp(*v - shift);
    }
    sum_f64(x)
}

/// Σ e^(x − shift) in f64, leaving x as it is.
#[inline(always)]
pub fn sum_exp_shift(x: &[f32], shift: f32) -> f64 {
    let mut buf = [0f32; 256];
    let mut sum = 0f64;
    for c in x.chunks(buf.len()) {
        let b = &mut buf[..c.len()];
        for (o, &v) in b.iter_mut().zip(c) {
            *o = exp(v - shift);
        }
        sum += sum_f64(b);
    }
    sum
}

/// σ(g) = 1/(1+e^−g), exactly 0 or 1 at the extremes (no NaN).
#[inline(always)]
pub fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + exp(-g))
}

simd_fn! {
    /// One attention row of query i: row[j] ← e^(row[j] − shift) for the keys it
    /// sees (j ≤ i and mask[j] ≠ 0), else 0. Returns Σ in f64.
    pub fn masked_exp_row(row: &mut [f32], i: usize, mask: Option<&[u8]>, shift: f32) -> f64 {
        let (seen, future) = row.split_at_mut(i + 1);
        future.fill(0.0);
        match mask {
            None => exp_shift_sum(seen, shift),
            Some(m) => {
                for (x, &keep) in seen.iter_mut().zip(&m[..=i]) {
                    let e = exp(*x - shift);
                    *x = if keep != 0 { e } else { 0.0 };
                }
                sum_f64(seen)
            }
        }
    }
}

simd_fn! {
    /// x ← e^(x − shift); returns Σ e^(x − shift) in f64.
    #[cfg(test)]
    pub fn exp_shift_sum_dispatch(x: &mut [f32], shift: f32) -> f64 {
        exp_shift_sum(x, shift)
    }
}

simd_fn! {
    /// max over x (−inf when empty).
    pub fn max_dispatch(x: &[f32]) -> f32 {
        max(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_f64_within_2e7_relative_over_the_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan(), "a NaN input must stay NaN");
        assert!(sigmoid(-1e4) == 0.0 && sigmoid(1e4) == 1.0);
    }

    #[test]
    fn dispatched_and_baseline_versions_agree_bitwise() {
        let base: Vec<f32> = (0..1003)
            .map(|i| ((i * 7919) % 2000) as f32 / 37.0 - 27.0)
            .collect();
        let (mut a, mut b) = (base.clone(), base.clone());
        let sa = exp_shift_sum_dispatch(&mut a, 3.0);
        let sb = exp_shift_sum(&mut b, 3.0);
        assert_eq!(a, b);
        assert_eq!(sa, sb);
        assert_eq!(
            max_dispatch(&base),
            base.iter().copied().fold(f32::NEG_INFINITY, f32::max)
        );
        let want: f64 = base.iter().map(|&x| ((x - 3.0) as f64).exp()).sum();
        assert!((sa - want).abs() / want < 1e-6);
    }
}
