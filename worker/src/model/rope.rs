//! Rotary position tables: cos/sin of position × inverse frequency, with the
//! rescalings transformers applies (`linear`, `llama3`).

use super::config::{ModelConfig, RopeScaling};

/// Inverse frequencies, one per rotated pair: [HD/2].
pub fn inv_freq(cfg: &ModelConfig) -> Vec<f64> {
    let hd = cfg.head_dim;
    let base: Vec<f64> = (0..hd / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / hd as f64))
        .collect();
    match cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            // transformers' _compute_llama3_parameters: long wavelengths are slowed by
            // `factor`, short ones kept, and the band between is interpolated.
            let low_freq_wavelen = old / low_freq_factor;
            let high_freq_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen > low_freq_wavelen {
                        f / factor
                    } else if wavelen < high_freq_wavelen {
                        f
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// (cos, sin), each [positions, HD/2] row-major.
pub fn tables(cfg: &ModelConfig, positions: usize) -> (Vec<f32>, Vec<f32>) {
    let inv = inv_freq(cfg);
    let half = inv.len();
    let mut cos = vec![0f32; positions * half];
    let mut sin = vec![0f32; positions * half];
    for p in 0..positions {
        for (i, &f) in inv.iter().enumerate() {
            // transformers forms the angle in f32; doing the same keeps long
            // positions bit-close to the reference.
            let angle = (p as f32) * (f as f32);
            cos[p * half + i] = angle.cos();
            sin[p * half + i] = angle.sin();
        }
    }
    (cos, sin)
}
