//! Rule rewards for GRPO (MedicalGPT's `grpo_training.py` reward functions):
//! `accuracy` checks the completion against the data's answer, `format`
//! checks the R1 layout `<think>…</think><answer>…</answer>`.

use crate::demo::mentions_answer;

/// A rule reward function, by its `--reward_funcs` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleReward {
    Accuracy,
    Format,
}

impl std::str::FromStr for RuleReward {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "accuracy" => Ok(RuleReward::Accuracy),
            "format" => Ok(RuleReward::Format),
            _ => Err(format!(
                "unknown reward function {s:?} (expected accuracy or format; a reward model comes with --reward_model_name_or_path)"
            )),
        }
    }
}

impl RuleReward {
    pub fn name(self) -> &'static str {
        match self {
            RuleReward::Accuracy => "accuracy",
            RuleReward::Format => "format",
        }
    }

    /// The reward of `completion` (its text) for a prompt whose data answer
    /// is `reference` (None: the prompt has none, accuracy is 0).
    pub fn reward(self, completion: &str, reference: Option<&str>) -> f32 {
        match self {
            RuleReward::Accuracy => {
                reference.is_some_and(|r| is_correct(completion, r)) as u8 as f32
            }
            RuleReward::Format => has_r1_format(completion) as u8 as f32,
        }
    }
}

/// The answer a reference states: after its last "####" (GSM8K's final
/// answer marker) when it has one, else all of it; without the full stop
/// that ends a sentence answer ("The liver." is answered by "... the liver,").
pub fn final_answer(reference: &str) -> &str {
    let answer = match reference.rfind("####") {
        Some(i) => &reference[i + 4..],
        None => reference,
    };
    answer.trim().trim_end_matches(['.', '。']).trim_end()
}

/// What a completion answers: the inside of its `<answer>…</answer>` when it
/// has one (MedicalGPT's `extract_answer`), else all of it.
pub fn completion_answer(completion: &str) -> &str {
    if let Some(start) = completion.find("<answer>") {
        let rest = &completion[start + "<answer>".len()..];
        if let Some(end) = rest.find("</answer>") {
            return rest[..end].trim();
        }
    }
    completion.trim()
}

/// MedicalGPT's `normalize_for_match`: lower case, and only CJK ideographs,
/// ASCII letters and digits kept.
fn normalise(text: &str) -> String {
    text.to_lowercase()
        .chars()
        .filter(|&c| c.is_ascii_alphanumeric() || is_cjk(c))
        .collect()
}

/// CJK ideographs (U+4E00–U+9FFF, MedicalGPT's `\u4e00-\u9fff`).
fn is_cjk(c: char) -> bool {
    ('\u{4e00}'..='\u{9fff}').contains(&c)
}

/// Whether `completion` gives the reference's final answer: the answers
/// agree once normalised, or the completion's answer states it as whole
/// words (the demo's exact-answer rule: "50 mg" is not inside "250 mg"), or —
/// for answers in Chinese, which has no spaces between words — contains it
/// once both are normalised (MedicalGPT's containment rule).
pub fn is_correct(completion: &str, reference: &str) -> bool {
    let gold = final_answer(reference);
    let pred = completion_answer(completion);
    let (g, p) = (normalise(gold), normalise(pred));
    if g.is_empty() {
        return false;
    }
    g == p || mentions_answer(pred, gold) || (gold.chars().any(is_cjk) && p.contains(&g))
}

/// TRL/MedicalGPT's `format_reward`: Python's
/// `re.match(r"^<think>.*?</think><answer>.*?</answer>$", text, re.DOTALL)`.
/// `.*?` may hold anything, so the text matches when it opens with
/// `<think>`, closes with `</answer>` (Python's `$` also allows one final
/// newline) and has `</think><answer>` in between.
pub fn has_r1_format(text: &str) -> bool {
    let body = text.strip_suffix('\n').unwrap_or(text);
    body.strip_prefix("<think>")
        .and_then(|b| b.strip_suffix("</answer>"))
        .is_some_and(|mid| mid.contains("</think><answer>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_uses_the_final_answer_and_whole_words() {
        let gsm = "Natalia sold 48/2 = 24 clips in May.\n#### 72";
        assert_eq!(final_answer(gsm), "72");
        assert!(is_correct("So the total is 72.", gsm));
        assert!(!is_correct("So the total is 172.", gsm));
        assert!(!is_correct("So the total is 720", gsm));
        // The demo's rule: whole words, case insensitive.
        assert!(is_correct(
            "Zorvazole, 250 mg twice a day.",
            "250 mg twice a day"
        ));
        assert!(!is_correct("Take 250 mg twice a day.", "50 mg twice a day"));
        assert!(is_correct(
            "<think>hm</think><answer>Zorvazole</answer>",
            "zorvazole"
        ));
        // Inside <answer>, only the answer counts.
        assert!(!is_correct(
            "<think>not 72</think><answer>71</answer>",
            "#### 72"
        ));
        // Normalised equality (punctuation and case ignored).
        assert!(is_correct("(B)", "b"));
        // Chinese: containment after normalisation.
        assert!(is_correct("这可能是食管克罗恩病。", "食管克罗恩病"));
        assert!(!is_correct("这可能是胃炎。", "食管克罗恩病"));
        assert!(!is_correct("anything", "  "));
        // A sentence answer (SFT data) without its full stop.
        assert_eq!(final_answer("The liver."), "The liver");
        assert!(is_correct("It affects the liver, mostly.", "The liver."));
        assert_eq!(RuleReward::Accuracy.reward("72", Some("#### 72")), 1.0);
        assert_eq!(RuleReward::Accuracy.reward("72", None), 0.0);
    }

    #[test]
    fn format_is_the_r1_pattern() {
        assert!(has_r1_format("<think>a\nb</think><answer>c</answer>"));
        assert!(has_r1_format("<think></think><answer></answer>\n"));
        assert!(!has_r1_format("<think>a</think> <answer>c</answer>"));
        assert!(!has_r1_format(" <think>a</think><answer>c</answer>"));
        assert!(!has_r1_format("<think>a</think><answer>c</answer>."));
        assert!(!has_r1_format("<think>a</answer>"));
        assert_eq!(
            RuleReward::Format.reward("<think>x</think><answer>y</answer>", None),
            1.0
        );
        assert!("length".parse::<RuleReward>().is_err());
    }
}
