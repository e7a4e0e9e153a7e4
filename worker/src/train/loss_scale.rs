//! Dynamic loss scaling for fp16 (torch.cuda.amp.GradScaler's rule): the loss
//! gradient is multiplied by `scale` so small gradients survive fp16; a step
//! whose gradients overflowed (non-finite norm) is skipped and the scale
//! halved; after `GROWTH_INTERVAL` clean steps it doubles. bf16 and f32 have
//! f32's range and need none (scale 1, never skips).

use serde::{Deserialize, Serialize};

/// GradScaler's defaults: init_scale 2¹⁶, growth 2, backoff 0.5, every 2000 steps.
pub const INIT_SCALE: f32 = 65536.0;
pub const GROWTH_INTERVAL: u32 = 2000;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub enabled: bool,
    pub scale: f32,
    /// Clean steps since the last change of scale.
    pub good_steps: u32,
}

impl LossScaler {
    pub fn new(enabled: bool) -> Self {
        LossScaler {
            enabled,
            scale: if enabled { INIT_SCALE } else { 1.0 },
            good_steps: 0,
        }
    }

    /// Record one step's outcome; true when the step may be applied.
    pub fn update(&mut self, grads_finite: bool) -> bool {
        if !self.enabled {
            return grads_finite;
        }
        if !grads_finite {
            self.scale = (self.scale * 0.5).max(f32::MIN_POSITIVE);
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps >= GROWTH_INTERVAL {
            let grown = self.scale * 2.0;
            if grown.is_finite() {
                self.scale = grown;
            }
            self.good_steps = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_halves_and_skips_then_clean_steps_double() {
        let mut s = LossScaler::new(true);
        assert_eq!(s.scale, 65536.0);
        assert!(!s.update(false), "an overflowed step must be skipped");
        assert_eq!(s.scale, 32768.0);
        for i in 0..GROWTH_INTERVAL - 1 {
            assert!(s.update(true));
            assert_eq!(s.scale, 32768.0, "grew early at clean step {i}");
        }
        assert!(s.update(true));
        assert_eq!(
            s.scale, 65536.0,
            "doubles after GROWTH_INTERVAL clean steps"
        );
        assert_eq!(s.good_steps, 0);
    }

    #[test]
    fn disabled_scaler_keeps_scale_one_and_refuses_non_finite() {
        let mut s = LossScaler::new(false);
        assert!(s.update(true));
        assert!(!s.update(false), "a non-finite gradient is never applied");
        assert_eq!(s.scale, 1.0);
    }
}
