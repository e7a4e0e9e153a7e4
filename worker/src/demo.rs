//! A small, deterministic, entirely FICTIONAL medical domain for demos and
//! end-to-end tests of every stage.
//!
//! Why fictional: a model can only know these facts by learning them from the
//! generated corpus, so held-out perplexity (PT), QA accuracy (SFT),
//! preference accuracy (RM/DPO) and verifiable rewards (RL) measure what the
//! pipeline taught, not what a base model already knew. The same seed always
//! yields the same diseases, drugs, doses and documents.
//!
//! Every disease has an organ, three symptoms, a cause, one drug with a
//! disease-specific dose (mg, times a day) and course length; every drug has a
//! class and a contraindication (another fictional disease).
//!
//! Questions and answers (SFT, RM, held-out evaluation) are shaped by what a
//! small model can do with what PT taught it. Each answer is one sentence of
//! the PT corpus, word for word ("The cause of Busar palsy is the Koskos
//! prion."), so the fact sits exactly where the PT model already predicts it,
//! and each question starts like its answer ("What is the cause of Busar
//! palsy?") so the answer's opening is a copy of the question's. An answer
//! that names only the value ("The Koskos prion.") has to be recalled right
//! after the chat template's turn markers, which the PT model never saw: that
//! design got a third of the held-out questions right, this one most of them
//! (bench/results/demo-rm-experiments.md). A wrong answer is the same
//! sentence with another value of the same kind.

use crate::fsutil::write_atomic;
use anyhow::{bail, Result};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashSet;
use std::path::Path;

/// 100 diseases and 75 drugs: 675 facts. With 40 and 30, SFT memorised its
/// 216 training answers and got 87 % of the held-out questions right; with
/// this many it learns the general skill, 98.5 %
/// (bench/results/demo-rm-experiments.md).
pub const N_DISEASES: usize = 100;
pub const N_DRUGS: usize = 75;

const ONSETS: &[&str] = &[
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kl",
    "pr", "tr", "qu", "sk", "th",
];
const VOWELS: &[&str] = &["a", "e", "i", "o", "u", "ai", "ou", "y"];
const CODAS: &[&str] = &["", "", "n", "r", "l", "x", "s", "m", "th"];
const DISEASE_KINDS: &[&str] = &[
    "fever",
    "syndrome",
    "palsy",
    "disease",
    "blight",
    "pox",
    "sclerosis",
    "fatigue",
];
const DRUG_SUFFIXES: &[&str] = &[
    "azole", "ivir", "amine", "oxin", "umab", "afen", "idol", "otrex", "astat", "icillin",
];
const DRUG_CLASSES: &[&str] = &[
    "an antiviral",
    "an antibiotic",
    "an antifungal",
    "an anti-inflammatory drug",
    "an immune modulator",
    "an enzyme inhibitor",
    "a nerve stabilizer",
];
const ORGANS: &[&str] = &[
    "liver", "lungs", "kidneys", "heart", "skin", "stomach", "spleen", "eyes", "joints", "brain",
    "pancreas", "bladder", "bones", "throat",
];
const SYMPTOMS: &[&str] = &[
    "fever",
    "cough",
    "fatigue",
    "headache",
    "nausea",
    "dizziness",
    "joint pain",
    "blurred vision",
    "night sweats",
    "a rash",
    "itching",
    "chest pain",
    "shortness of breath",
    "abdominal pain",
    "muscle cramps",
    "hair loss",
    "insomnia",
    "a tremor",
    "dry mouth",
    "swollen ankles",
    "hiccups",
    "pale skin",
    "loss of appetite",
    "ringing in the ears",
    "blue fingernails",
    "a metallic taste",
    "hoarseness",
    "nosebleeds",
    "back pain",
    "sneezing",
];
const CAUSE_KINDS: &[&str] = &["virus", "bacterium", "parasite", "fungus", "prion"];
const DOSES_MG: &[u32] = &[
    5, 10, 20, 25, 50, 100, 150, 200, 250, 300, 400, 500, 750, 1000,
];
const COURSE_DAYS: &[u32] = &[3, 5, 7, 10, 14, 21, 28];

/// One fictional disease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disease {
    pub name: String,
    pub organ: String,
    pub symptoms: [String; 3],
    pub cause: String,
    /// Index into `DemoDomain::drugs`.
    pub drug: usize,
    pub dose_mg: u32,
    pub times_per_day: u32,
    pub course_days: u32,
}

/// One fictional drug.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drug {
    pub name: String,
    pub class: String,
    /// Name of a disease in which the drug must not be used (never one it treats).
    pub contraindication: String,
}

/// The fictional pharmacopoeia, fully determined by `seed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoDomain {
    pub seed: u64,
    pub diseases: Vec<Disease>,
    pub drugs: Vec<Drug>,
}

/// "once a day", "twice a day", ...
pub fn frequency(times_per_day: u32) -> String {
    match times_per_day {
        1 => "once a day".into(),
        2 => "twice a day".into(),
        3 => "three times a day".into(),
        4 => "four times a day".into(),
        n => format!("{n} times a day"),
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// "a, b and c"
fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

fn pick<'a>(rng: &mut ChaCha8Rng, xs: &'a [&'a str]) -> &'a str {
    // The constant tables above are never empty.
    xs.choose(rng).copied().unwrap_or_default()
}

/// A pronounceable made-up word of `syllables` syllables, unique in `used`.
fn fresh_word(rng: &mut ChaCha8Rng, syllables: usize, used: &mut HashSet<String>) -> String {
    loop {
        let mut w = String::new();
        for i in 0..syllables {
            w.push_str(pick(rng, ONSETS));
            w.push_str(pick(rng, VOWELS));
            if i + 1 == syllables {
                w.push_str(pick(rng, CODAS));
            }
        }
        if w.len() >= 4 && used.insert(w.clone()) {
            return w;
        }
    }
}

impl DemoDomain {
    /// Build the domain: [`N_DISEASES`] diseases and [`N_DRUGS`] drugs (some drugs treat two
    /// diseases, at different doses).
    pub fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut used = HashSet::new();
        let mut drug_names = Vec::with_capacity(N_DRUGS);
        for _ in 0..N_DRUGS {
            let stem = fresh_word(&mut rng, 2, &mut used);
            drug_names.push(format!("{stem}{}", pick(&mut rng, DRUG_SUFFIXES)));
        }
        let mut diseases = Vec::with_capacity(N_DISEASES);
        for i in 0..N_DISEASES {
            let stem = capitalize(&fresh_word(&mut rng, 2, &mut used));
            let name = format!("{stem} {}", pick(&mut rng, DISEASE_KINDS));
            let mut symptoms: Vec<&str> = SYMPTOMS.choose_multiple(&mut rng, 3).copied().collect();
            symptoms.shuffle(&mut rng);
            let pathogen = capitalize(&fresh_word(&mut rng, 2, &mut used));
            let cause = format!("the {pathogen} {}", pick(&mut rng, CAUSE_KINDS));
            diseases.push(Disease {
                name,
                organ: pick(&mut rng, ORGANS).to_string(),
                symptoms: [
                    symptoms[0].to_string(),
                    symptoms[1].to_string(),
                    symptoms[2].to_string(),
                ],
                cause,
                drug: i % N_DRUGS,
                dose_mg: *DOSES_MG.choose(&mut rng).unwrap_or(&100),
                times_per_day: rng.random_range(1..=4),
                course_days: *COURSE_DAYS.choose(&mut rng).unwrap_or(&7),
            });
        }
        // Randomize which drug treats which disease, keeping every drug in use.
        let mut perm: Vec<usize> = (0..N_DRUGS).collect();
        perm.shuffle(&mut rng);
        for d in &mut diseases {
            d.drug = perm[d.drug];
        }
        let drugs = drug_names
            .into_iter()
            .enumerate()
            .map(|(j, name)| {
                let others: Vec<&Disease> = diseases.iter().filter(|d| d.drug != j).collect();
                let contraindication = others
                    .choose(&mut rng)
                    .map(|d| d.name.clone())
                    .unwrap_or_default();
                Drug {
                    name,
                    class: pick(&mut rng, DRUG_CLASSES).to_string(),
                    contraindication,
                }
            })
            .collect();
        DemoDomain {
            seed,
            diseases,
            drugs,
        }
    }

    /// Sentences stating one disease's facts, one per fact, each in a random template.
    fn disease_sentences(&self, d: &Disease, rng: &mut ChaCha8Rng) -> Vec<String> {
        let n = &d.name;
        let drug = &self.drugs[d.drug].name;
        let [s1, s2, s3] = &d.symptoms;
        let (organ, cause, mg, freq, days) = (
            &d.organ,
            &d.cause,
            d.dose_mg,
            frequency(d.times_per_day),
            d.course_days,
        );
        let facts: [Vec<String>; 6] = [
            vec![
                format!("{n} is a disease of the {organ}."),
                format!("{n} mainly affects the {organ}."),
                format!("In {n}, the {organ} is the organ most affected."),
            ],
            vec![
                format!("The symptoms of {n} are {s1}, {s2} and {s3}."),
                format!("Patients with {n} usually present with {s1}, {s2} and {s3}."),
                format!("{n} causes {s1}, {s2} and {s3}."),
                format!("Typical signs of {n} include {s1}, {s2} and {s3}."),
            ],
            vec![
                format!("{n} is caused by {cause}."),
                format!("The cause of {n} is {cause}."),
            ],
            vec![
                format!("{n} is treated with {drug}."),
                format!("The drug of choice for {n} is {drug}."),
            ],
            vec![
                format!("The dose of {drug} for {n} is {mg} mg {freq}."),
                format!("For {n}, {drug} is given at {mg} mg {freq}."),
                format!("Adults with {n} take {mg} mg of {drug} {freq}."),
            ],
            vec![
                format!("A course of {drug} for {n} lasts {days} days."),
                format!("Treatment of {n} with {drug} continues for {days} days."),
            ],
        ];
        facts
            .iter()
            .filter_map(|t| t.choose(rng))
            .map(|s| capitalize(s))
            .collect()
    }

    fn drug_sentences(&self, g: &Drug, rng: &mut ChaCha8Rng) -> Vec<String> {
        let (name, class, contra) = (&g.name, &g.class, &g.contraindication);
        let treats: Vec<String> = self
            .diseases
            .iter()
            .filter(|d| self.drugs[d.drug].name == *name)
            .map(|d| d.name.clone())
            .collect();
        let facts: [Vec<String>; 3] = [
            vec![
                format!("{name} is {class}."),
                format!(
                    "{name} belongs to the drugs known as {}.",
                    class_plural(class)
                ),
            ],
            vec![
                format!("{name} must not be given to patients with {contra}."),
                format!("{name} is contraindicated in {contra}."),
                format!("Patients with {contra} should not take {name}."),
                format!("The use of {name} is contraindicated in {contra}."),
            ],
            vec![
                format!("{name} is used to treat {}.", join_and(&treats)),
                format!("{name} is prescribed for {}.", join_and(&treats)),
            ],
        ];
        facts
            .iter()
            .filter_map(|t| t.choose(rng))
            .map(|s| capitalize(s))
            .collect()
    }

    /// `n_docs` one-line encyclopedic documents, each 3-6 sentences about one
    /// disease or drug in shuffled order and random phrasing. Deterministic in
    /// `(self.seed, seed)`.
    pub fn pretrain_corpus(&self, n_docs: usize, seed: u64) -> Vec<String> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ self.seed.rotate_left(32));
        (0..n_docs)
            .map(|_| {
                let mut sentences = if rng.random_bool(0.75) {
                    let i = rng.random_range(0..self.diseases.len());
                    self.disease_sentences(&self.diseases[i], &mut rng)
                } else {
                    let j = rng.random_range(0..self.drugs.len());
                    self.drug_sentences(&self.drugs[j], &mut rng)
                };
                sentences.shuffle(&mut rng);
                let keep = rng.random_range(3.min(sentences.len())..=sentences.len());
                sentences.truncate(keep);
                sentences.join(" ")
            })
            .collect()
    }

    /// Every fact as a question, its full answer (a PT corpus sentence), a
    /// short checkable answer (the value) and a plausible wrong answer (the
    /// same sentence with another value of the same kind).
    pub fn fact_questions(&self) -> Vec<FactQuestion> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed.wrapping_add(0x5eed_0f0a));
        let mut out = Vec::new();
        for (i, d) in self.diseases.iter().enumerate() {
            let drug = &self.drugs[d.drug].name;
            let n = &d.name;
            let other = loop {
                let j = rng.random_range(0..self.diseases.len());
                if j != i {
                    break &self.diseases[j];
                }
            };
            let dose = format!("{} mg {}", d.dose_mg, frequency(d.times_per_day));
            let wrong_dose = loop {
                let mg = *DOSES_MG.choose(&mut rng).unwrap_or(&1);
                let w = format!("{mg} mg {}", frequency(rng.random_range(1..=4)));
                if w != dose {
                    break w;
                }
            };
            let wrong_drug = loop {
                let g = &self.drugs[rng.random_range(0..self.drugs.len())].name;
                if g != drug {
                    break g.clone();
                }
            };
            let wrong_organ = loop {
                let o = pick(&mut rng, ORGANS);
                if o != d.organ {
                    break o.to_string();
                }
            };
            let wrong_days = loop {
                let x = *COURSE_DAYS.choose(&mut rng).unwrap_or(&1);
                if x != d.course_days {
                    break x;
                }
            };
            let wrong_symptoms = if other.symptoms == d.symptoms {
                [
                    "fever".to_string(),
                    "cough".to_string(),
                    "a rash".to_string(),
                ]
            } else {
                other.symptoms.clone()
            };
            let wrong_cause = if other.cause == d.cause {
                "a lack of sleep".to_string()
            } else {
                other.cause.clone()
            };
            // Each answer is one PT-corpus sentence (a statement, see the
            // module doc), `said(value)` that sentence with any value.
            let mut q =
                |question: String, said: &dyn Fn(&str) -> String, short: String, wrong: &str| {
                    out.push(FactQuestion {
                        question,
                        answer: capitalize(&said(&short)),
                        wrong: capitalize(&said(wrong)),
                        short,
                    });
                };
            q(
                format!("What is the dose of {drug} for {n}?"),
                &|v| format!("The dose of {drug} for {n} is {v}."),
                dose.clone(),
                &wrong_dose,
            );
            q(
                format!("What is the drug of choice for {n}?"),
                &|v| format!("The drug of choice for {n} is {v}."),
                drug.clone(),
                &wrong_drug,
            );
            q(
                format!("What are the symptoms of {n}?"),
                &|v| format!("The symptoms of {n} are {v}."),
                join_and(&d.symptoms),
                &join_and(&wrong_symptoms),
            );
            q(
                format!("In {n}, which organ is most affected?"),
                &|v| format!("In {n}, the {v} is the organ most affected."),
                d.organ.clone(),
                &wrong_organ,
            );
            q(
                format!("What is the cause of {n}?"),
                &|v| format!("The cause of {n} is {v}."),
                d.cause.clone(),
                &wrong_cause,
            );
            q(
                format!("How long does a course of {drug} for {n} last?"),
                &|v| format!("A course of {drug} for {n} lasts {v}."),
                format!("{} days", d.course_days),
                &format!("{wrong_days} days"),
            );
        }
        for g in &self.drugs {
            let wrong = loop {
                let d = &self.diseases[rng.random_range(0..self.diseases.len())];
                if d.name != g.contraindication && self.drugs[d.drug].name != g.name {
                    break d.name.clone();
                }
            };
            let said = |v: &str| format!("The use of {} is contraindicated in {v}.", g.name);
            out.push(FactQuestion {
                question: format!("In which disease is the use of {} contraindicated?", g.name),
                answer: said(&g.contraindication),
                short: g.contraindication.clone(),
                wrong: said(&wrong),
            });
        }
        out
    }

    /// (question, answer) for every fact, e.g. "What is the dose of X for Y?"
    /// → "The dose of X for Y is 250 mg twice a day.". Material for SFT.
    pub fn qa_pairs(&self) -> Vec<(String, String)> {
        self.fact_questions()
            .into_iter()
            .map(|f| (f.question, f.answer))
            .collect()
    }

    /// (prompt, chosen, rejected): chosen is the correct answer, rejected a
    /// plausible wrong one of the same shape. Material for RM / DPO.
    pub fn preference_pairs(&self) -> Vec<(String, String, String)> {
        self.fact_questions()
            .into_iter()
            .map(|f| (f.question, f.answer, f.wrong))
            .collect()
    }

    /// (prompt, known_answer): the short fact a correct completion must
    /// contain (e.g. "250 mg twice a day", "zorvazole", "14 days"). Material
    /// for RL with verifiable rewards.
    pub fn rl_prompts(&self) -> Vec<(String, String)> {
        self.fact_questions()
            .into_iter()
            .map(|f| (f.question, f.short))
            .collect()
    }

    /// The fact questions split into (train, held out): a seeded fifth of the
    /// questions is held out. Held-out questions ask about facts the PT corpus
    /// states, but neither SFT nor RM training ever sees them as questions, so
    /// answering them measures what the pipeline taught, not memorised QA.
    pub fn qa_split(&self) -> (Vec<FactQuestion>, Vec<FactQuestion>) {
        let mut all = self.fact_questions();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x0a11_5911_7000);
        all.shuffle(&mut rng);
        let n_heldout = all.len() / 5;
        let train = all.split_off(n_heldout);
        (train, all)
    }

    /// SFT and reward data of the QA split, in MedicalGPT's formats:
    /// `sft/{train,valid}/qa.jsonl` (ShareGPT `conversations`),
    /// `reward/{train,valid}/pairs.jsonl` (HEAD: `conversations` ending with the
    /// question, `chosen` = the right answer, `rejected` = the plausible wrong one),
    /// and `heldout_qa.jsonl` (the held-out questions with their short answers).
    /// The `valid` files hold the held-out questions.
    pub fn write_qa_datasets(&self, out_dir: &Path) -> Result<QaDatasets> {
        use serde_json::json;
        let (train, heldout) = self.qa_split();
        let sft_line = |f: &FactQuestion, answer: &str| {
            json!({"conversations": [
                {"from": "human", "value": f.question},
                {"from": "gpt", "value": answer},
            ]})
            .to_string()
        };
        let sft_train = self.sft_training_answers(&train);
        let rm_line = |f: &FactQuestion| {
            json!({
                "conversations": [{"from": "human", "value": f.question}],
                "chosen": f.answer,
                "rejected": f.wrong,
            })
            .to_string()
        };
        let lines = |items: &[FactQuestion], f: &dyn Fn(&FactQuestion) -> String| {
            items.iter().map(|x| f(x) + "\n").collect::<String>()
        };
        let train_pairs = self.reward_training_pairs(&train);
        let out = QaDatasets {
            sft: out_dir.join("sft"),
            reward: out_dir.join("reward"),
            heldout: out_dir.join("heldout_qa.jsonl"),
        };
        let sft_valid: Vec<String> = heldout.iter().map(|f| f.answer.clone()).collect();
        for (split, items, answers, pairs) in [
            ("train", &train, &sft_train, &train_pairs),
            ("valid", &heldout, &sft_valid, &heldout),
        ] {
            let sft: String = items
                .iter()
                .zip(answers)
                .map(|(f, a)| sft_line(f, a) + "\n")
                .collect();
            write_atomic(&out.sft.join(split).join("qa.jsonl"), sft.as_bytes())?;
            write_atomic(
                &out.reward.join(split).join("pairs.jsonl"),
                lines(pairs, &rm_line).as_bytes(),
            )?;
        }
        let heldout_lines = lines(&heldout, &|f| {
            json!({"question": f.question, "answer": f.answer, "short": f.short, "wrong": f.wrong})
                .to_string()
        });
        write_atomic(&out.heldout, heldout_lines.as_bytes())?;
        Ok(out)
    }

    /// The SFT answer of each training question: the fact, or for a seeded
    /// [`EVASIVE_SFT_PERCENT`] % of them one of the [`EVASIONS`] — SFT data
    /// gathered from people has such replies, and removing them is a job
    /// RLHF does: the reward model ranks the fact above them, and PPO learns
    /// from sampled evasions to stop giving them.
    pub fn sft_training_answers(&self, train: &[FactQuestion]) -> Vec<String> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x0e7a_5107);
        train
            .iter()
            .map(|f| {
                if rng.random_range(0..100) < EVASIVE_SFT_PERCENT {
                    EVASIONS[rng.random_range(0..EVASIONS.len())].to_string()
                } else {
                    f.answer.clone()
                }
            })
            .collect()
    }

    /// Reward training pairs of the training questions: each question's own
    /// wrong answer, plus up to [`EXTRA_NEGATIVES`] more wrong answers: this
    /// question's statement with the value of another question of the same
    /// kind (another disease's drug, dose, ...) — the same subject, the same
    /// sentence, only the value wrong. Varied negatives teach the RM to check
    /// the answer against the question rather than to memorise which of two
    /// strings won. And up to [`OFF_QUESTION_NEGATIVES`] true sentences about
    /// the same subject that answer another question (held-out pairs keep
    /// only the same-sentence, other-value kind). And the fact against one of
    /// the [`EVASIONS`].
    fn reward_training_pairs(&self, train: &[FactQuestion]) -> Vec<FactQuestion> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x4e6e_9a71);
        let mut out = Vec::new();
        for f in train {
            out.push(f.clone());
            out.push(FactQuestion {
                wrong: EVASIONS[rng.random_range(0..EVASIONS.len())].to_string(),
                ..f.clone()
            });
            let mut others: Vec<&FactQuestion> = train
                .iter()
                .filter(|o| {
                    question_kind(&o.question) == question_kind(&f.question) && o.short != f.short
                })
                .collect();
            // Another question can have the same value: each wrong value once.
            others.sort_by(|a, b| a.short.cmp(&b.short));
            others.dedup_by(|a, b| a.short == b.short);
            others.shuffle(&mut rng);
            let wrongs = others
                .iter()
                .filter_map(|o| f.stated_with(&o.short))
                .filter(|w| *w != f.wrong && !f.is_answered_by(w));
            for wrong in wrongs.take(EXTRA_NEGATIVES) {
                out.push(FactQuestion { wrong, ..f.clone() });
            }
            // A true sentence about the same subject that answers another
            // question: an answer must answer the question asked.
            let subject = subject_words(&f.answer);
            let mut off: Vec<&FactQuestion> = train
                .iter()
                .filter(|o| {
                    question_kind(&o.question) != question_kind(&f.question)
                        && subject_words(&o.answer).iter().any(|w| subject.contains(w))
                        && !f.is_answered_by(&o.answer)
                })
                .collect();
            off.shuffle(&mut rng);
            for o in off.into_iter().take(OFF_QUESTION_NEGATIVES) {
                out.push(FactQuestion {
                    wrong: o.answer.clone(),
                    ..f.clone()
                });
            }
        }
        out
    }

    /// Write a PT dataset: `out_dir/train/corpus.txt` and
    /// `out_dir/valid/corpus.txt`, one document per line. Validation documents
    /// state the same facts in other sentence combinations and are never
    /// identical to a training document.
    pub fn write_pt_dataset(
        &self,
        out_dir: &Path,
        train_docs: usize,
        valid_docs: usize,
    ) -> Result<()> {
        let train = self.pretrain_corpus(train_docs, 1);
        let seen: HashSet<&str> = train.iter().map(String::as_str).collect();
        let mut valid = Vec::with_capacity(valid_docs);
        let mut round = 0u64;
        while valid.len() < valid_docs {
            if round == 100 {
                bail!("could not generate {valid_docs} held-out documents distinct from the {train_docs} training documents");
            }
            round += 1;
            for doc in self.pretrain_corpus(valid_docs, 1_000_000 + round) {
                if valid.len() < valid_docs && !seen.contains(doc.as_str()) {
                    valid.push(doc);
                }
            }
        }
        let lines = |docs: &[String]| docs.iter().map(|d| format!("{d}\n")).collect::<String>();
        write_atomic(
            &out_dir.join("train").join("corpus.txt"),
            lines(&train).as_bytes(),
        )?;
        write_atomic(
            &out_dir.join("valid").join("corpus.txt"),
            lines(&valid).as_bytes(),
        )?;
        Ok(())
    }
}

/// Replies that answer nothing, as some human-written SFT answers do.
pub const EVASIONS: [&str; 4] = [
    "I am not sure.",
    "I do not know the answer to that.",
    "Please ask a doctor about that.",
    "Sorry, I cannot answer that.",
];

/// The share of SFT training answers that are evasions.
pub const EVASIVE_SFT_PERCENT: u32 = 25;

/// Extra rejected answers per training question in the reward data.
pub const EXTRA_NEGATIVES: usize = 4;

/// Reward training pairs per question whose rejected side is a true sentence
/// about the same subject answering another question.
pub const OFF_QUESTION_NEGATIVES: usize = 2;

/// The capitalised names in a sentence (the subject's, for diseases), without
/// the words that open the answer forms.
fn subject_words(sentence: &str) -> Vec<&str> {
    const OPENERS: [&str; 8] = [
        "The",
        "In",
        "A",
        "For",
        "Patients",
        "Treatment",
        "Typical",
        "Adults",
    ];
    sentence
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() >= 3 && w.starts_with(char::is_uppercase) && !OPENERS.contains(w))
        .collect()
}

/// Which of the seven question forms a question has (its fixed opening and closing words).
fn question_kind(q: &str) -> usize {
    const FORMS: [(&str, &str); 7] = [
        ("What is the dose of", "?"),
        ("What is the drug of choice for", "?"),
        ("What are the symptoms of", "?"),
        ("In ", ", which organ is most affected?"),
        ("What is the cause of", "?"),
        ("How long does a course of", " last?"),
        ("In which disease is the use of", " contraindicated?"),
    ];
    // The contraindication question also starts with "In ": longest match first.
    FORMS
        .iter()
        .enumerate()
        .filter(|(_, (head, tail))| q.starts_with(head) && q.ends_with(tail))
        .max_by_key(|(_, (head, tail))| head.len() + tail.len())
        .map_or(FORMS.len(), |(i, _)| i)
}

fn class_plural(class: &str) -> String {
    let c = class
        .strip_prefix("an ")
        .or_else(|| class.strip_prefix("a "))
        .unwrap_or(class);
    match c.strip_suffix(" drug") {
        Some(stem) => format!("{stem} drugs"),
        None => format!("{c}s"),
    }
}

/// One fact as a question: its full answer, the short checkable answer a
/// correct completion must contain, and a plausible wrong answer of the same shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FactQuestion {
    pub question: String,
    pub answer: String,
    pub short: String,
    pub wrong: String,
}

impl FactQuestion {
    /// The right answer's statement with `value` in place of the short answer
    /// (its last occurrence: the value comes after the subject in every form).
    /// None when the answer does not contain the short answer.
    pub fn stated_with(&self, value: &str) -> Option<String> {
        let i = self.answer.rfind(&self.short)?;
        Some(format!(
            "{}{value}{}",
            &self.answer[..i],
            &self.answer[i + self.short.len()..]
        ))
    }

    /// Whether `text` states this question's short answer (whole-word, case
    /// insensitive: " 50 mg" does not match inside " 250 mg").
    pub fn is_answered_by(&self, text: &str) -> bool {
        mentions_answer(text, &self.short)
    }
}

/// Whether `text` states `short` as whole words, case insensitive: it must
/// follow a space (or open the text) and end at a word boundary, so " 50 mg"
/// does not match inside " 250 mg" (the demo's exact-answer rule, also GRPO's
/// accuracy reward).
pub fn mentions_answer(text: &str, short: &str) -> bool {
    let text = format!(" {}", text.to_lowercase());
    let short = format!(" {}", short.to_lowercase());
    text.match_indices(&short).any(|(i, m)| {
        // The match must end at a word boundary too ("14 days" vs "14 daysx").
        text[i + m.len()..]
            .chars()
            .next()
            .is_none_or(|c| !c.is_alphanumeric())
    })
}

/// Where [`DemoDomain::write_qa_datasets`] put things.
#[derive(Clone, Debug)]
pub struct QaDatasets {
    /// ShareGPT jsonl: `train/qa.jsonl`, `valid/qa.jsonl`.
    pub sft: std::path::PathBuf,
    /// MedicalGPT HEAD reward jsonl (conversations + chosen/rejected): `train/`, `valid/`.
    pub reward: std::path::PathBuf,
    /// Held-out questions with their short answers (`{"question","answer","short","wrong"}` per line).
    pub heldout: std::path::PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_domain_and_corpus() {
        let a = DemoDomain::new(7);
        assert_eq!(a, DemoDomain::new(7));
        assert_ne!(a, DemoDomain::new(8));
        assert_eq!(
            a.pretrain_corpus(200, 3),
            DemoDomain::new(7).pretrain_corpus(200, 3)
        );
        assert_ne!(a.pretrain_corpus(50, 3), a.pretrain_corpus(50, 4));
        assert_eq!(a.qa_pairs(), DemoDomain::new(7).qa_pairs());
        assert_eq!(a.preference_pairs(), DemoDomain::new(7).preference_pairs());
    }

    #[test]
    fn domain_is_well_formed() {
        let dom = DemoDomain::new(1);
        assert_eq!(dom.diseases.len(), N_DISEASES);
        let names: HashSet<&str> = dom.diseases.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names.len(), N_DISEASES, "disease names are unique");
        let drugs: HashSet<&str> = dom.drugs.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(drugs.len(), N_DRUGS);
        for (j, g) in dom.drugs.iter().enumerate() {
            assert!(
                dom.diseases.iter().any(|d| d.drug == j),
                "{} treats something",
                g.name
            );
            let contra = dom
                .diseases
                .iter()
                .find(|d| d.name == g.contraindication)
                .unwrap();
            assert_ne!(
                contra.drug, j,
                "a drug is not contraindicated in a disease it treats"
            );
        }
        for d in &dom.diseases {
            assert!((1..=4).contains(&d.times_per_day));
            let uniq: HashSet<_> = d.symptoms.iter().collect();
            assert_eq!(uniq.len(), 3);
        }
        for doc in dom.pretrain_corpus(100, 0) {
            assert!(
                !doc.contains('\n') && doc.ends_with('.') && doc.matches(". ").count() >= 2,
                "{doc}"
            );
        }
    }

    #[test]
    fn answers_agree_with_the_facts() {
        let dom = DemoDomain::new(42);
        let qa = dom.qa_pairs();
        let prefs = dom.preference_pairs();
        let rl = dom.rl_prompts();
        assert_eq!(qa.len(), N_DISEASES * 6 + N_DRUGS);
        assert_eq!(prefs.len(), qa.len());
        assert_eq!(rl.len(), qa.len());
        for ((q, a), ((pq, chosen, rejected), (rq, short))) in qa.iter().zip(prefs.iter().zip(&rl))
        {
            assert_eq!((q, q), (pq, rq));
            assert_eq!(a, chosen);
            assert_ne!(chosen, rejected, "{q}");
            // Whole-word containment: " 50 mg" must not match inside " 250 mg".
            let has = |text: &str| {
                format!(" {}", text.to_lowercase()).contains(&format!(" {}", short.to_lowercase()))
            };
            assert!(has(a), "{a} / {short}");
            assert!(!has(rejected), "{q}: {rejected} contains {short}");
        }
        let mut checked = 0;
        for d in &dom.diseases {
            let drug = &dom.drugs[d.drug];
            let ask = |q: String| {
                qa.iter()
                    .find(|(x, _)| *x == q)
                    .map(|(_, a)| a.clone())
                    .unwrap_or_else(|| panic!("no question {q:?}"))
            };
            let (n, g) = (&d.name, &drug.name);
            assert_eq!(
                ask(format!("What is the dose of {g} for {n}?")),
                format!(
                    "The dose of {g} for {n} is {} mg {}.",
                    d.dose_mg,
                    frequency(d.times_per_day)
                )
            );
            assert_eq!(
                ask(format!("What is the drug of choice for {n}?")),
                format!("The drug of choice for {n} is {g}.")
            );
            assert_eq!(
                ask(format!("In {n}, which organ is most affected?")),
                format!("In {n}, the {} is the organ most affected.", d.organ)
            );
            assert_eq!(
                ask(format!("What are the symptoms of {n}?")),
                format!("The symptoms of {n} are {}.", join_and(&d.symptoms))
            );
            assert_eq!(
                ask(format!("What is the cause of {n}?")),
                format!("The cause of {n} is {}.", d.cause)
            );
            assert_eq!(
                ask(format!("How long does a course of {g} for {n} last?")),
                format!("A course of {g} for {n} lasts {} days.", d.course_days)
            );
            assert_eq!(
                ask(format!(
                    "In which disease is the use of {g} contraindicated?"
                )),
                format!(
                    "The use of {g} is contraindicated in {}.",
                    drug.contraindication
                )
            );
            checked += 1;
        }
        assert_eq!(checked, N_DISEASES);
    }

    #[test]
    fn answers_are_corpus_sentences_and_wrong_answers_differ_only_in_the_value() {
        let dom = DemoDomain::new(42);
        // Every answer is said word for word by the PT corpus (the model
        // learns it there; SFT only has to restate it).
        let sentences: HashSet<String> = dom
            .pretrain_corpus(20_000, 0)
            .iter()
            .flat_map(|doc| doc.split(". ").map(|s| s.trim_end_matches('.').to_string()))
            .collect();
        for f in dom.fact_questions() {
            assert!(
                sentences.contains(f.answer.trim_end_matches('.')),
                "{:?} is not a corpus sentence",
                f.answer
            );
            // The wrong answer is the same sentence with another value.
            let i = f.answer.rfind(&f.short).unwrap();
            let (head, tail) = (&f.answer[..i], &f.answer[i + f.short.len()..]);
            assert!(
                f.wrong.starts_with(head) && f.wrong.ends_with(tail) && f.wrong != f.answer,
                "{f:?}"
            );
            assert_eq!(f.stated_with(&f.short).as_deref(), Some(f.answer.as_str()));
        }
    }

    #[test]
    fn question_kinds_are_the_seven_forms() {
        let dom = DemoDomain::new(42);
        let mut per_kind = [0usize; 8];
        for f in dom.fact_questions() {
            per_kind[question_kind(&f.question)] += 1;
        }
        // 6 questions per disease, 1 per drug, none unrecognised.
        assert_eq!(
            per_kind,
            [N_DISEASES, N_DISEASES, N_DISEASES, N_DISEASES, N_DISEASES, N_DISEASES, N_DRUGS, 0]
        );
    }

    #[test]
    fn reward_training_negatives_are_same_sentence_other_value() {
        let dom = DemoDomain::new(9);
        let (train, _) = dom.qa_split();
        let pairs = dom.reward_training_pairs(&train);
        assert!(pairs.len() > train.len() * (2 + EXTRA_NEGATIVES) * 9 / 10);
        let mut seen = HashSet::new();
        let answers: HashSet<&str> = train.iter().map(|f| f.answer.as_str()).collect();
        let (mut off_question, mut evasive) = (0, 0);
        for p in &pairs {
            assert!(!p.is_answered_by(&p.wrong), "{p:?}");
            assert!(
                seen.insert((p.question.clone(), p.wrong.clone())),
                "duplicate {p:?}"
            );
            if EVASIONS.contains(&p.wrong.as_str()) {
                evasive += 1;
                continue;
            }
            if answers.contains(p.wrong.as_str()) {
                // Another question's true answer, about the same subject.
                off_question += 1;
                let subject = subject_words(&p.answer);
                assert!(
                    subject_words(&p.wrong).iter().any(|w| subject.contains(w)),
                    "{p:?}"
                );
                continue;
            }
            let i = p.answer.rfind(&p.short).unwrap();
            assert!(p.wrong.starts_with(&p.answer[..i]), "{p:?}");
            assert!(p.wrong.ends_with(&p.answer[i + p.short.len()..]), "{p:?}");
        }
        assert!(
            off_question > train.len(),
            "{off_question} off-question negatives"
        );
        assert_eq!(
            evasive,
            train.len(),
            "one fact-over-evasion pair per question"
        );
    }

    #[test]
    fn a_quarter_of_the_sft_answers_evade_and_the_rest_state_the_fact() {
        let dom = DemoDomain::new(9);
        let (train, _) = dom.qa_split();
        let answers = dom.sft_training_answers(&train);
        assert_eq!(answers, dom.sft_training_answers(&train), "seeded");
        let evasive = answers
            .iter()
            .zip(&train)
            .filter(|(a, f)| {
                if EVASIONS.contains(&a.as_str()) {
                    assert!(!f.is_answered_by(a));
                    true
                } else {
                    assert_eq!(*a, &f.answer);
                    false
                }
            })
            .count();
        let share = 100.0 * evasive as f64 / train.len() as f64;
        assert!((20.0..30.0).contains(&share), "{share:.1} % evasive");
        // Every evasion is used.
        for e in EVASIONS {
            assert!(answers.iter().any(|a| a == e), "{e}");
        }
    }

    #[test]
    fn qa_split_holds_out_a_fifth_and_writes_medicalgpt_formats() {
        let dom = DemoDomain::new(5);
        let (train, heldout) = dom.qa_split();
        assert_eq!(heldout.len(), (N_DISEASES * 6 + N_DRUGS) / 5);
        assert_eq!(train.len() + heldout.len(), N_DISEASES * 6 + N_DRUGS);
        let train_q: HashSet<&str> = train.iter().map(|f| f.question.as_str()).collect();
        assert!(heldout
            .iter()
            .all(|f| !train_q.contains(f.question.as_str())));
        // Every kind of question is held out somewhere.
        for kind in [
            "dose",
            "drug of choice",
            "symptoms",
            "organ",
            "cause of",
            "course",
            "contraindicated",
        ] {
            assert!(heldout.iter().any(|f| f.question.contains(kind)), "{kind}");
        }
        for f in heldout.iter().chain(&train) {
            assert!(f.is_answered_by(&f.answer), "{f:?}");
            assert!(!f.is_answered_by(&f.wrong), "{f:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dom.write_qa_datasets(dir.path()).unwrap();
        let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap();
        let sft: Vec<serde_json::Value> = read(out.sft.join("valid/qa.jsonl"))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(sft.len(), heldout.len());
        assert_eq!(sft[0]["conversations"][0]["from"], "human");
        assert_eq!(
            sft[0]["conversations"][0]["value"],
            heldout[0].question.as_str()
        );
        assert_eq!(sft[0]["conversations"][1]["from"], "gpt");
        assert_eq!(
            sft[0]["conversations"][1]["value"],
            heldout[0].answer.as_str()
        );
        let rm: serde_json::Value = serde_json::from_str(
            read(out.reward.join("train/pairs.jsonl"))
                .lines()
                .next()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(rm["chosen"], train[0].answer.as_str());
        assert_eq!(rm["rejected"], train[0].wrong.as_str());
        assert_eq!(read(out.heldout).lines().count(), heldout.len());
    }

    #[test]
    fn answer_check_is_whole_word() {
        let f = FactQuestion {
            question: "q".into(),
            answer: "50 mg once a day.".into(),
            short: "50 mg once a day".into(),
            wrong: "250 mg once a day.".into(),
        };
        assert!(f.is_answered_by("It is 50 mg once a day."));
        assert!(f.is_answered_by("50 MG ONCE A DAY"));
        assert!(!f.is_answered_by("250 mg once a day."));
        assert!(!f.is_answered_by("50 mg once a days"));
        assert!(!f.is_answered_by(""));
        assert_eq!(
            f.stated_with("20 mg twice a day").as_deref(),
            Some("20 mg twice a day.")
        );
        let unstated = FactQuestion {
            answer: "Something else.".into(),
            ..f
        };
        assert_eq!(unstated.stated_with("20 mg twice a day"), None);
    }

    #[test]
    fn held_out_docs_are_not_in_train() {
        let dom = DemoDomain::new(3);
        let dir = tempfile::tempdir().unwrap();
        dom.write_pt_dataset(dir.path(), 500, 50).unwrap();
        let read = |p: &str| std::fs::read_to_string(dir.path().join(p)).unwrap();
        let (train, valid) = (read("train/corpus.txt"), read("valid/corpus.txt"));
        let train: HashSet<&str> = train.lines().collect();
        let valid: Vec<&str> = valid.lines().collect();
        assert_eq!(valid.len(), 50);
        assert!(train.len() > 400);
        assert!(valid.iter().all(|v| !train.contains(v)));
        // Readable by the PT reader, one document per line.
        let docs = crate::data::pretrain::read_text_dir(&dir.path().join("valid"), true).unwrap();
        assert_eq!(docs.len(), 50);
    }
}

/// The demo's inputs in `dir`: `data/train`, `data/valid` (the pharmacopoeia
/// corpus) and `base-model` (a small random Llama with a BPE tokenizer trained
/// on the corpus). Deterministic in `seed`; used by `rlhf demo` and by the
/// pipeline's `demo` stage.
pub fn write_demo_assets(dir: &Path, seed: u64, train_docs: usize) -> Result<DemoAssets> {
    use crate::init_model::{init_model, InitModelArgs};
    let domain = DemoDomain::new(seed);
    let assets = DemoAssets {
        data: dir.join("data"),
        base_model: dir.join("base-model"),
        qa: domain.write_qa_datasets(&dir.join("data"))?,
    };
    tracing::info!(dir = %assets.data.display(), "writing the demo corpus");
    domain.write_pt_dataset(&assets.data, train_docs, train_docs / 10)?;
    let model_args = InitModelArgs {
        vocab_size: 2048,
        hidden_size: 128,
        intermediate_size: 344,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 256,
        seed,
        ..InitModelArgs::default()
    };
    tracing::info!(dir = %assets.base_model.display(), "initialising a small random Llama");
    init_model(
        &[assets.data.join("train/corpus.txt")],
        &assets.base_model,
        &model_args,
    )?;
    Ok(assets)
}

/// Where [`write_demo_assets`] put things.
#[derive(Clone, Debug)]
pub struct DemoAssets {
    /// `train/` and `valid/` text dirs (PT), and the QA data below.
    pub data: std::path::PathBuf,
    pub base_model: std::path::PathBuf,
    /// SFT / reward / held-out QA files (under `data/`).
    pub qa: QaDatasets,
}
