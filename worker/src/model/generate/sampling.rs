//! Choosing the next token from one row's logits, with transformers' logits
//! processors in transformers' order: repetition penalty, then (sampling
//! only) temperature, top-k, top-p; greedy is the argmax after the penalty.
//! Filtered-out logits become −inf, as in transformers.

use rand::Rng;

/// transformers' `RepetitionPenaltyLogitsProcessor`: for every token id
/// present in `seen` (prompt and generated so far), a positive logit is
/// divided by `penalty` and a negative one multiplied by it.
pub fn repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = vec![false; logits.len()];
    for &id in seen {
        let i = id as usize;
        if i < logits.len() && !done[i] {
            done[i] = true;
            let x = logits[i];
            logits[i] = if x < 0.0 { x * penalty } else { x / penalty };
        }
    }
}

/// `TemperatureLogitsWarper`: logits / temperature.
pub fn temperature(logits: &mut [f32], t: f32) {
    if t != 1.0 {
        logits.iter_mut().for_each(|x| *x /= t);
    }
}

/// `TopKLogitsWarper`: keep the logits ≥ the k-th largest (ties at the
/// threshold are kept, as `scores < topk(...)[-1]` does); k = 0 keeps all.
pub fn top_k(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let mut sorted: Vec<f32> = logits.to_vec();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let threshold = sorted[k - 1];
    for x in logits.iter_mut() {
        if *x < threshold {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// `TopPLogitsWarper`: sort ascending, drop the tokens whose cumulative
/// probability is ≤ 1 − p; the most likely token always stays.
pub fn top_p(logits: &mut [f32], p: f32) {
    if p >= 1.0 {
        return;
    }
    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Stable ascending sort, like torch.sort on CPU for distinct values.
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
    let mut cum = 0f64;
    let last = order.len() - 1;
    for (rank, &i) in order.iter().enumerate() {
        cum += probs[i];
        if rank < last && cum <= 1.0 - p as f64 {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

/// softmax in f64 (−inf logits get probability 0).
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let e: Vec<f64> = logits.iter().map(|&x| (x as f64 - max).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

/// The first index of the largest logit (torch.argmax's tie rule).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// One draw from softmax(logits) (the multinomial of transformers' sampling).
pub fn sample(logits: &[f32], rng: &mut impl Rng) -> u32 {
    let probs = softmax(logits);
    let u: f64 = rng.random();
    let mut cum = 0.0;
    let mut last_nonzero = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            cum += p;
            last_nonzero = i;
            if u < cum {
                return i as u32;
            }
        }
    }
    last_nonzero as u32 // u within rounding of 1
}

/// The settings the processors read.
#[derive(Clone, Copy, Debug)]
pub struct Processors {
    pub do_sample: bool,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub repetition_penalty: f32,
}

impl Processors {
    /// The next token of one row: processors in transformers' order, then
    /// argmax (greedy) or a draw.
    pub fn next_token(&self, logits: &mut [f32], seen: &[u32], rng: &mut impl Rng) -> u32 {
        repetition_penalty(logits, seen, self.repetition_penalty);
        if !self.do_sample {
            return argmax(logits);
        }
        temperature(logits, self.temperature);
        top_k(logits, self.top_k);
        top_p(logits, self.top_p);
        sample(logits, rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    const NEG: f32 = f32::NEG_INFINITY;

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_once() {
        let mut l = [2.0, -1.0, 3.0, 0.5];
        repetition_penalty(&mut l, &[0, 1, 1, 0], 2.0);
        assert_eq!(l, [1.0, -2.0, 3.0, 0.5]);
    }

    #[test]
    fn top_k_keeps_the_k_largest_and_ties() {
        let mut l = [1.0, 4.0, 3.0, 3.0, 0.0];
        top_k(&mut l, 2);
        assert_eq!(l, [NEG, 4.0, 3.0, 3.0, NEG]); // tie at the threshold kept
        let mut l = [1.0, 4.0, 2.0];
        top_k(&mut l, 1);
        assert_eq!(l, [NEG, 4.0, NEG]);
        let mut l = [1.0, 4.0, 2.0];
        top_k(&mut l, 0);
        assert_eq!(l, [1.0, 4.0, 2.0]);
    }

    /// Probabilities 0.5, 0.25, 0.125, 0.125 (logits ln of them): top_p 0.7
    /// drops what the two smallest sum to (0.25 ≤ 0.3), keeps 0.25 + 0.5.
    #[test]
    fn top_p_drops_the_tail_up_to_one_minus_p() {
        let ln = |p: f32| p.ln();
        let base = [ln(0.125), ln(0.5), ln(0.125), ln(0.25)];
        let mut l = base;
        top_p(&mut l, 0.7);
        assert_eq!(l, [NEG, base[1], NEG, base[3]]);
        // p = 0.8: cumulative 0.125, 0.25 ≤ 0.2? only the first 0.125 goes.
        let mut l = base;
        top_p(&mut l, 0.8);
        assert_eq!(l.iter().filter(|x| **x == NEG).count(), 1);
        // p tiny: the most likely token always stays.
        let mut l = base;
        top_p(&mut l, 0.01);
        assert_eq!(l, [NEG, base[1], NEG, NEG]);
    }

    #[test]
    fn temperature_then_softmax_matches_hand_computed_distribution() {
        let mut l = [0.0f32, 2.0f32.ln() * 2.0];
        temperature(&mut l, 2.0);
        let p = softmax(&l);
        assert!(
            (p[0] - 1.0 / 3.0).abs() < 1e-6 && (p[1] - 2.0 / 3.0).abs() < 1e-6,
            "{p:?}"
        );
    }

    #[test]
    fn sampling_follows_the_distribution_and_is_reproducible() {
        let l = [0.0f32, 3.0f32.ln(), NEG];
        let mut r = ChaCha8Rng::seed_from_u64(5);
        let draws: Vec<u32> = (0..4000).map(|_| sample(&l, &mut r)).collect();
        let ones = draws.iter().filter(|&&d| d == 1).count() as f64 / 4000.0;
        assert!((ones - 0.75).abs() < 0.03, "P(1) = {ones}");
        assert!(!draws.contains(&2), "a −inf logit was drawn");
        let mut r2 = ChaCha8Rng::seed_from_u64(5);
        let again: Vec<u32> = (0..4000).map(|_| sample(&l, &mut r2)).collect();
        assert_eq!(draws, again);
    }

    #[test]
    fn greedy_ignores_the_warpers() {
        let p = Processors {
            do_sample: false,
            temperature: 0.1,
            top_k: 1,
            top_p: 0.1,
            repetition_penalty: 1.0,
        };
        let mut r = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(p.next_token(&mut [1.0, 5.0, 5.0], &[], &mut r), 1); // first max
    }
}
