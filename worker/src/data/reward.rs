//! Preference pairs for the reward model (MedicalGPT `reward_modeling.py`),
//! in the three formats MedicalGPT has used (JSON lines, one pair a line):
//!
//! - 2023: `{question, response_chosen, response_rejected}`
//! - 2024: `{system, history: [[q, a], ...], question, response_chosen, response_rejected}`
//! - HEAD: `{conversations: [{from, value}, ...], chosen, rejected, tools?}`,
//!   the conversation ending with the (human) question.
//!
//! Every format becomes a [`PreferencePair`]; how a side is rendered to text
//! (a chat template, or 2023's plain "Question/Answer") is the caller's choice
//! ([`pair_texts`]).

use super::chat::function_call_text;
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// One comparison: the same prompt (system, earlier turns, question) with a
/// preferred and a dispreferred answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreferencePair {
    pub system: Option<String>,
    /// Earlier (question, answer) turns, oldest first.
    pub history: Vec<(String, String)>,
    pub question: String,
    pub chosen: String,
    pub rejected: String,
}

/// A pair and where it was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourcedPair {
    pub pair: PreferencePair,
    pub source: PathBuf,
    /// 1-based line of the record.
    pub line: usize,
}

/// What reading a set of files gives: the pairs, and the invalid records
/// skipped (only with `skip_invalid`), one message each.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadPairs {
    pub pairs: Vec<SourcedPair>,
    pub skipped: Vec<String>,
}

/// The text of (chosen side, rejected side): `render(pair, answer)` renders
/// the pair's prompt followed by one answer.
pub fn pair_texts(
    pair: &PreferencePair,
    render: &dyn Fn(&PreferencePair, &str) -> Result<String>,
) -> Result<(String, String)> {
    Ok((render(pair, &pair.chosen)?, render(pair, &pair.rejected)?))
}

/// Why a record is not a valid pair: the field, what was expected, what was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub expected: String,
    pub found: String,
}

impl FieldError {
    fn new(
        field: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Self {
        FieldError {
            field: field.into(),
            expected: expected.into(),
            found: found.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "field {}: expected {}, found {}",
            self.field, self.expected, self.found
        )
    }
}

fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Number(_) => "a number".into(),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

fn string_field(obj: &Map<String, Value>, field: &str) -> Result<String, FieldError> {
    match obj.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(FieldError::new(field, "a string", kind(other))),
        None => Err(FieldError::new(field, "a string", "no such field")),
    }
}

/// Parse one record (any of the three formats) into a pair.
pub fn parse_pair(v: &Value) -> Result<PreferencePair, FieldError> {
    let Value::Object(obj) = v else {
        return Err(FieldError::new("(record)", "a JSON object", kind(v)));
    };
    let pair = if obj.contains_key("conversations") {
        parse_conversations_pair(obj)?
    } else if obj.contains_key("question") {
        parse_question_pair(obj)?
    } else {
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        return Err(FieldError::new(
            "conversations / question",
            "\"conversations\" + \"chosen\" + \"rejected\" (MedicalGPT HEAD) or \"question\" + \"response_chosen\" + \"response_rejected\" (2023/2024)",
            format!("fields {}", keys.join(", ")),
        ));
    };
    if pair.question.trim().is_empty() {
        return Err(FieldError::new(
            "question",
            "a non-empty question",
            "an empty one",
        ));
    }
    if pair.chosen == pair.rejected {
        let (c, r) = if obj.contains_key("conversations") {
            ("chosen", "rejected")
        } else {
            ("response_chosen", "response_rejected")
        };
        return Err(FieldError::new(
            format!("{c}/{r}"),
            "two different answers",
            "the same text twice",
        ));
    }
    Ok(pair)
}

/// 2023 / 2024: `{system?, history?, question, response_chosen, response_rejected}`.
fn parse_question_pair(obj: &Map<String, Value>) -> Result<PreferencePair, FieldError> {
    let system = match obj.get("system") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return Err(FieldError::new("system", "a string", kind(other))),
    };
    let mut history = Vec::new();
    match obj.get("history") {
        None | Some(Value::Null) => {}
        Some(Value::Array(turns)) => {
            for (i, turn) in turns.iter().enumerate() {
                let field = format!("history[{i}]");
                let pair = match turn {
                    Value::Array(qa) if qa.len() == 2 => match (&qa[0], &qa[1]) {
                        (Value::String(q), Value::String(a)) => (q.clone(), a.clone()),
                        _ => {
                            return Err(FieldError::new(
                                field,
                                "[question, answer] strings",
                                format!("[{}, {}]", kind(&qa[0]), kind(&qa[1])),
                            ))
                        }
                    },
                    Value::Array(qa) => {
                        return Err(FieldError::new(
                            field,
                            "a [question, answer] pair",
                            format!("an array of {}", qa.len()),
                        ))
                    }
                    other => {
                        return Err(FieldError::new(
                            field,
                            "a [question, answer] pair",
                            kind(other),
                        ))
                    }
                };
                history.push(pair);
            }
        }
        Some(other) => {
            return Err(FieldError::new(
                "history",
                "an array of [question, answer] pairs",
                kind(other),
            ))
        }
    }
    Ok(PreferencePair {
        system,
        history,
        question: string_field(obj, "question")?,
        chosen: string_field(obj, "response_chosen")?,
        rejected: string_field(obj, "response_rejected")?,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    User,
    Assistant,
}

/// HEAD: ShareGPT `conversations` (+ `chosen`, `rejected`, optional `tools`),
/// read as MedicalGPT's `_parse_conversations_to_messages` (without
/// `--tool_format`) and its template path: a `system` turn is the system
/// prompt; `human`/`user` are the user, `observation` a user turn
/// "Observation: ..."; `gpt`/`assistant` answer, `function_call`
/// "Action: name\nAction Input: {arguments}"; consecutive user turns are
/// joined with "\n", a second consecutive answer is appended to the previous
/// one with "\n", a leading answer is dropped. The last turn must be a user
/// turn: it is the question the two answers reply to.
fn parse_conversations_pair(obj: &Map<String, Value>) -> Result<PreferencePair, FieldError> {
    let turns = match obj.get("conversations") {
        Some(Value::Array(t)) => t,
        Some(other) => {
            return Err(FieldError::new(
                "conversations",
                "an array of {from, value} turns",
                kind(other),
            ))
        }
        None => unreachable!("checked by the caller"),
    };
    // "tools" is only rendered with MedicalGPT's --tool_format (not supported
    // here, MedicalGPT's default is None, which ignores it too); its type is still checked.
    match obj.get("tools") {
        None | Some(Value::Null | Value::String(_) | Value::Array(_)) => {}
        Some(other) => {
            return Err(FieldError::new(
                "tools",
                "a JSON string (or list) of tool definitions",
                kind(other),
            ))
        }
    }
    let mut system = None;
    let mut messages: Vec<(Side, String)> = Vec::new();
    for (i, turn) in turns.iter().enumerate() {
        let Value::Object(t) = turn else {
            return Err(FieldError::new(
                format!("conversations[{i}]"),
                "an object {from, value}",
                kind(turn),
            ));
        };
        let from = string_field(t, "from").map_err(|e| prefix(e, i))?;
        let value = string_field(t, "value").map_err(|e| prefix(e, i))?;
        match from.as_str() {
            "system" => system = Some(value),
            "human" | "user" => messages.push((Side::User, value)),
            "observation" => messages.push((Side::User, format!("Observation: {value}"))),
            "gpt" | "assistant" => messages.push((Side::Assistant, value)),
            "function_call" => messages.push((Side::Assistant, function_call_text(&value))),
            other => {
                return Err(FieldError::new(
                    format!("conversations[{i}].from"),
                    "one of system, human, user, observation, gpt, assistant, function_call",
                    format!("{other:?}"),
                ))
            }
        }
    }
    match messages.last() {
        Some((Side::User, _)) => {}
        Some((Side::Assistant, _)) => {
            return Err(FieldError::new(
                "conversations",
                "a conversation ending with a human turn (the question)",
                "one ending with an assistant turn",
            ))
        }
        None => {
            return Err(FieldError::new(
                "conversations",
                "at least one human turn",
                "no human or assistant turn",
            ))
        }
    }
    // MedicalGPT's pairing of turns into [question, answer] (template path).
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut open: Option<String> = None;
    for (side, text) in messages {
        match (side, open.as_mut()) {
            (Side::User, None) => open = Some(text),
            (Side::User, Some(q)) => {
                q.push('\n');
                q.push_str(&text);
            }
            (Side::Assistant, Some(_)) => pairs.push((open.take().unwrap_or_default(), text)),
            (Side::Assistant, None) => {
                if let Some(last) = pairs.last_mut() {
                    last.1.push('\n');
                    last.1.push_str(&text);
                }
            }
        }
    }
    let question = open.unwrap_or_default();
    Ok(PreferencePair {
        system: system.filter(|s| !s.is_empty()),
        history: pairs,
        question,
        chosen: string_field(obj, "chosen")?,
        rejected: string_field(obj, "rejected")?,
    })
}

fn prefix(mut e: FieldError, i: usize) -> FieldError {
    e.field = format!("conversations[{i}].{}", e.field);
    e
}

/// The .json/.jsonl files under `dir` (or `dir` itself when it is a file),
/// sorted by path, as MedicalGPT's glob finds them.
pub fn list_pair_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.exists() {
        bail!("reward data path {} does not exist", dir.display());
    }
    let files: Vec<PathBuf> = crate::data::pretrain::list_json_files(dir).unwrap_or_default();
    if files.is_empty() {
        bail!(
            "no .jsonl/.json files of preference pairs in {}",
            dir.display()
        );
    }
    Ok(files)
}

/// Read every pair under `dir` (see [`list_pair_files`]), in file order.
pub fn read_pair_dir(dir: &Path, skip_invalid: bool) -> Result<ReadPairs> {
    let mut out = ReadPairs::default();
    for f in list_pair_files(dir)? {
        let r = read_pair_file(&f, skip_invalid)?;
        out.pairs.extend(r.pairs);
        out.skipped.extend(r.skipped);
    }
    Ok(out)
}

/// Read one JSON-lines file of pairs (blank lines skipped). An invalid
/// record is an error naming file:line, the field and what was expected;
/// with `skip_invalid` it is skipped, counted and logged instead.
pub fn read_pair_file(path: &Path, skip_invalid: bool) -> Result<ReadPairs> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not valid UTF-8: {e}", path.display()))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if path.extension().and_then(|e| e.to_str()) == Some("json")
        && text.trim_start().starts_with('[')
    {
        bail!(
            "{}: a top-level JSON array; reward data is JSON lines (one pair object per line), as MedicalGPT reads it",
            path.display()
        );
    }
    let mut out = ReadPairs::default();
    for (i, raw) in text.split('\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if raw.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(raw)
            .map_err(|e| format!("invalid JSON ({e}); expected one pair object per line"))
            .and_then(|v| parse_pair(&v).map_err(|e| e.to_string()));
        match parsed {
            Ok(pair) => out.pairs.push(SourcedPair {
                pair,
                source: path.to_path_buf(),
                line,
            }),
            Err(e) => {
                let msg = format!("{}:{line}: {e}", path.display());
                if !skip_invalid {
                    bail!("{msg} (--skip_invalid skips such records)");
                }
                tracing::warn!("skipping an invalid pair: {msg}");
                out.skipped.push(msg);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shared(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/data/medicalgpt")
            .join(rel)
    }

    fn err_of(v: Value) -> FieldError {
        parse_pair(&v).unwrap_err()
    }

    #[test]
    fn reads_the_2023_sample_file() {
        let r = read_pair_file(&shared("legacy_2023/reward/test.json"), false).unwrap();
        assert_eq!(r.pairs.len(), 100);
        assert!(r.skipped.is_empty());
        // The line the reference notes quote.
        let p = &r.pairs[47];
        assert_eq!(p.line, 48);
        assert_eq!(
            p.pair,
            PreferencePair {
                system: None,
                history: vec![],
                question: "尺神经损伤的发病部位是什么？".into(),
                chosen: "手".into(),
                rejected: "尺神经起源于脊髓第5节。".into(),
            }
        );
    }

    #[test]
    fn reads_the_2024_sample_file() {
        let r = read_pair_file(&shared("legacy_2024/reward/dpo_zh_500.jsonl"), false).unwrap();
        assert_eq!(r.pairs.len(), 500); // the last line has no newline
        assert_eq!(r.pairs[0].pair.system, None, "an empty system is none");
        let p = &r.pairs[12].pair; // line 13, the one the reference notes quote
        assert_eq!(r.pairs[12].line, 13);
        assert_eq!(
            p.system.as_deref(),
            Some("你是一个非常聪明的AI助手，非常擅长按照指示行事。尽你所能地帮助。")
        );
        assert!(p.history.is_empty());
        assert_eq!(
            p.question,
            "期末考试 问题1. 罗伯特·P·凯利曾任CEO的公司是在哪一年成立的？"
        );
        assert!(p.rejected.starts_with("当然！罗伯特·P·凯利"));
    }

    #[test]
    fn reads_the_head_sample_files() {
        let r = read_pair_dir(&shared("reward"), false).unwrap();
        assert_eq!(r.pairs.len(), 511);
        // dpo_zh_500.jsonl is the 2024 file converted to the HEAD format:
        // every pair reads the same.
        let legacy = read_pair_file(&shared("legacy_2024/reward/dpo_zh_500.jsonl"), false).unwrap();
        let head: Vec<&PreferencePair> = r.pairs[..500].iter().map(|p| &p.pair).collect();
        let old: Vec<&PreferencePair> = legacy.pairs.iter().map(|p| &p.pair).collect();
        assert_eq!(head, old);
        // Tool calls: the function_call and observation turns become history.
        let tools: Vec<&SourcedPair> = r
            .pairs
            .iter()
            .filter(|p| p.source.ends_with("toolcall_dpo_zh_demo.jsonl"))
            .collect();
        assert_eq!(tools.len(), 11);
        assert!(tools[0].pair.history.is_empty());
        assert_eq!(tools[0].pair.question, "北京今天天气怎么样？");
        assert_eq!(
            tools[0].pair.chosen,
            "Action: get_weather\nAction Input: {\"city\": \"北京\"}\n"
        );
        let t = &tools[1].pair;
        assert_eq!(t.history.len(), 1);
        assert_eq!(t.history[0].0, "北京今天天气怎么样？");
        assert!(
            t.history[0]
                .1
                .starts_with("Action: get_weather\nAction Input: {\"city\": \"北京\"}"),
            "{:?}",
            t.history[0].1
        );
        assert!(t.question.starts_with("Observation: {"), "{:?}", t.question);
    }

    #[test]
    fn function_call_arguments_keep_their_order_and_python_spacing() {
        assert_eq!(
            function_call_text(r#"{"name":"f","arguments":{"z":1,"a":["x",true,null],"m":"é\n"}}"#),
            "Action: f\nAction Input: {\"z\": 1, \"a\": [\"x\", true, null], \"m\": \"é\\n\"}"
        );
        assert_eq!(function_call_text("not json"), "not json");
    }

    #[test]
    fn conversation_turns_merge_as_medicalgpt_pairs_them() {
        let p = parse_pair(&json!({
            "conversations": [
                {"from": "gpt", "value": "dropped"},
                {"from": "system", "value": "S"},
                {"from": "human", "value": "q1"},
                {"from": "human", "value": "q1b"},
                {"from": "gpt", "value": "a1"},
                {"from": "assistant", "value": "a1b"},
                {"from": "user", "value": "q2"}
            ],
            "chosen": "good", "rejected": "bad"
        }))
        .unwrap();
        assert_eq!(p.system.as_deref(), Some("S"));
        assert_eq!(p.history, vec![("q1\nq1b".into(), "a1\na1b".into())]);
        assert_eq!(p.question, "q2");
        let p = parse_pair(&json!({
            "system": "", "history": [["q", "a"]], "question": "q2",
            "response_chosen": "x", "response_rejected": "y"
        }))
        .unwrap();
        assert_eq!(p.system, None);
        assert_eq!(p.history, vec![("q".into(), "a".into())]);
    }

    #[test]
    fn each_kind_of_bad_record_names_its_field_and_expectation() {
        let e = err_of(json!({"question": "q", "response_chosen": "a", "response_rejected": "a"}));
        assert_eq!(e.field, "response_chosen/response_rejected");
        assert_eq!(e.expected, "two different answers");
        let e = err_of(
            json!({"conversations": [{"from": "human", "value": "q"}], "chosen": "a", "rejected": "a"}),
        );
        assert_eq!(e.field, "chosen/rejected");
        let e = err_of(json!({"question": "  ", "response_chosen": "a", "response_rejected": "b"}));
        assert_eq!(
            (e.field.as_str(), e.expected.as_str()),
            ("question", "a non-empty question")
        );
        let e = err_of(json!({"question": "q", "response_chosen": "a"}));
        assert_eq!(
            (e.field.as_str(), e.found.as_str()),
            ("response_rejected", "no such field")
        );
        let e = err_of(json!({"question": "q", "response_chosen": 3, "response_rejected": "b"}));
        assert_eq!(
            (e.field.as_str(), e.expected.as_str(), e.found.as_str()),
            ("response_chosen", "a string", "a number")
        );
        let e = err_of(
            json!({"question": "q", "history": [["q"]], "response_chosen": "a", "response_rejected": "b"}),
        );
        assert_eq!(e.field, "history[0]");
        let e = err_of(
            json!({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "chosen": "x", "rejected": "y"}),
        );
        assert_eq!(e.field, "conversations");
        assert!(e.expected.contains("ending with a human turn"), "{e}");
        let e = err_of(
            json!({"conversations": [{"from": "robot", "value": "q"}], "chosen": "x", "rejected": "y"}),
        );
        assert_eq!(e.field, "conversations[0].from");
        let e =
            err_of(json!({"conversations": [{"from": "human"}], "chosen": "x", "rejected": "y"}));
        assert_eq!(e.field, "conversations[0].value");
        let e = err_of(json!({"conversations": "q", "chosen": "x", "rejected": "y"}));
        assert_eq!(
            (e.field.as_str(), e.found.as_str()),
            ("conversations", "a string")
        );
        let e = err_of(json!({"text": "q"}));
        assert!(e.expected.contains("response_chosen"), "{e}");
        let e = err_of(json!([1]));
        assert_eq!(e.expected, "a JSON object");
    }

    #[test]
    fn bad_records_stop_the_read_with_file_and_line_unless_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pairs.jsonl");
        std::fs::write(
            &f,
            "{\"question\": \"q\", \"response_chosen\": \"a\", \"response_rejected\": \"b\"}\n\n{\"question\": \"q\", \"response_chosen\": \"a\", \"response_rejected\": \"a\"}\nnot json\n",
        )
        .unwrap();
        let err = read_pair_file(&f, false).unwrap_err().to_string();
        assert!(err.contains("pairs.jsonl:3: field response_chosen/response_rejected: expected two different answers"), "{err}");
        let r = read_pair_file(&f, true).unwrap();
        assert_eq!(r.pairs.len(), 1);
        assert_eq!(r.skipped.len(), 2);
        assert!(
            r.skipped[1].contains("pairs.jsonl:4: invalid JSON"),
            "{:?}",
            r.skipped
        );
        let err = read_pair_dir(&dir.path().join("missing"), false).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn pair_texts_renders_both_sides_with_the_same_prompt() {
        let p = PreferencePair {
            system: None,
            history: vec![],
            question: "q".into(),
            chosen: "c".into(),
            rejected: "r".into(),
        };
        let (c, r) = pair_texts(&p, &|p, a| Ok(format!("{}|{a}", p.question))).unwrap();
        assert_eq!((c.as_str(), r.as_str()), ("q|c", "q|r"));
    }
}
