//! Learning-rate schedules, as transformers' `get_scheduler` defines them.
//! The lr of optimizer step k (0-based) is `base_lr * factor(k)`.

use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    Linear,
    Cosine,
    Constant,
    ConstantWithWarmup,
    Polynomial,
}

impl std::str::FromStr for ScheduleKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "linear" => ScheduleKind::Linear,
            "cosine" => ScheduleKind::Cosine,
            "constant" => ScheduleKind::Constant,
            "constant_with_warmup" => ScheduleKind::ConstantWithWarmup,
            "polynomial" => ScheduleKind::Polynomial,
            other => bail!(
                "lr_scheduler_type {other:?} is not one of linear, cosine, constant, constant_with_warmup, polynomial"
            ),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// `warmup_steps` wins over `warmup_ratio` when > 0, as in transformers.
    pub fn new(
        kind: ScheduleKind,
        base_lr: f64,
        total_steps: u64,
        warmup_steps: u64,
        warmup_ratio: f64,
    ) -> Self {
        let warmup = if warmup_steps > 0 {
            warmup_steps
        } else {
            (warmup_ratio * total_steps as f64).ceil() as u64
        };
        Schedule {
            kind,
            base_lr,
            warmup_steps: warmup,
            total_steps,
        }
    }

    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }

    fn factor(&self, step: u64) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if self.kind != ScheduleKind::Constant && step < self.warmup_steps {
            return s / w.max(1.0);
        }
        let progress = (s - w) / (t - w).max(1.0);
        match self.kind {
            ScheduleKind::Constant | ScheduleKind::ConstantWithWarmup => 1.0,
            ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
            ScheduleKind::Polynomial => {
                // transformers' defaults: lr_end = 1e-7, power = 1.0.
                let lr_end = 1e-7;
                if step > self.total_steps {
                    lr_end / self.base_lr
                } else {
                    let decay = (self.base_lr - lr_end) * (1.0 - progress) + lr_end;
                    decay / self.base_lr
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn linear_warms_up_then_decays_to_zero() {
        let s = Schedule::new(ScheduleKind::Linear, 1.0, 10, 2, 0.0);
        let lrs: Vec<f64> = (0..=10).map(|k| s.lr(k)).collect();
        // transformers: [0, .5, 1, .875, .75, ..., 0]
        assert!(close(lrs[0], 0.0) && close(lrs[1], 0.5) && close(lrs[2], 1.0));
        assert!(close(lrs[3], 7.0 / 8.0) && close(lrs[10], 0.0));
    }

    #[test]
    fn cosine_is_half_at_midpoint_and_ratio_rounds_up() {
        let s = Schedule::new(ScheduleKind::Cosine, 2.0, 10, 0, 0.15);
        assert_eq!(s.warmup_steps, 2); // ceil(1.5)
        assert!(close(s.lr(6), 1.0));
        assert!(close(s.lr(10), 0.0));
    }

    #[test]
    fn constant_ignores_warmup_and_polynomial_ends_at_lr_end() {
        let c = Schedule::new(ScheduleKind::Constant, 3.0, 10, 5, 0.0);
        assert!(close(c.lr(0), 3.0));
        let cw = Schedule::new(ScheduleKind::ConstantWithWarmup, 3.0, 10, 5, 0.0);
        assert!(close(cw.lr(0), 0.0) && close(cw.lr(5), 3.0));
        let p = Schedule::new(ScheduleKind::Polynomial, 1e-3, 10, 0, 0.0);
        assert!(close(p.lr(10), 1e-7) && close(p.lr(5), (1e-3 - 1e-7) * 0.5 + 1e-7));
        assert!("warmup_stable".parse::<ScheduleKind>().is_err());
    }
}
