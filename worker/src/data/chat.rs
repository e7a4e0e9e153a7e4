//! SFT conversations: reading MedicalGPT's ShareGPT and Alpaca files into
//! checked lists of messages.
//!
//! Formats (one record per line of a `.jsonl`; a `.json` file is either a
//! JSON array or JSON lines, like the 2023 `Belle_open_source_1k.json`):
//! - ShareGPT: `{"conversations": [{"from": ..., "value": ...}, ...],
//!   "system_prompt"?: "..."}`. `from` is `system`, `human`/`user`/
//!   `observation` (a user turn) or `gpt`/`assistant`/`function_call` (an
//!   assistant turn).
//! - Alpaca: `{"instruction", "input"?, "output"}`; the user turn is
//!   `instruction + "\n\n" + input` when `input` has non-blank text, as
//!   MedicalGPT's `tools/convert_dataset.py` builds it.
//!
//! Role handling, compared with MedicalGPT HEAD (`supervised_finetuning.py`
//! `get_dialog`), which silently repairs or drops whatever does not fit:
//! - kept: consecutive user turns are joined with `"\n"` (tool-call data has
//!   `observation` after `human`; joining is how HEAD feeds them);
//! - kept: `observation` becomes `"Observation: {value}"` and a
//!   `function_call` whose value is `{"name", "arguments"}` becomes
//!   `"Action: {name}\nAction Input: {arguments as json.dumps}"` (HEAD without
//!   `--tool_format`; the `tools` field is then unused, as in HEAD);
//! - kept: a system turn's text wins over the top-level `system_prompt`;
//! - kept but reported: a trailing user turn with no answer is dropped and
//!   counted (`dropped_trailing_user`), since it has nothing to train on;
//! - errors instead of repairs: an empty conversation, a conversation with no
//!   assistant turn, an assistant turn before any user turn (HEAD drops it),
//!   two assistant turns in a row (HEAD silently drops the second: its
//!   "append with \n" branch is unreachable), a system turn that is not the
//!   first, an empty user prompt, an unknown `from`, and any missing or
//!   ill-typed field. With `skip_invalid` these records are skipped and
//!   counted per reason instead.

use crate::data::pretrain::{array_element_lines, decode_utf8, list_json_files};
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Who speaks a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role name chat templates see (`message['role']`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// One checked conversation: an optional system message first, then
/// (user, assistant) pairs; never empty, always ending with an assistant turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversation {
    pub messages: Vec<Message>,
    pub source: PathBuf,
    /// 1-based line where the record starts.
    pub line: usize,
}

impl Conversation {
    /// The system message's text, if any.
    pub fn system(&self) -> Option<&str> {
        match self.messages.first() {
            Some(m) if m.role == Role::System => Some(&m.content),
            _ => None,
        }
    }

    /// (user, assistant) pairs, in order.
    pub fn turns(&self) -> Vec<(&str, &str)> {
        let body = match self.system() {
            Some(_) => &self.messages[1..],
            None => &self.messages[..],
        };
        body.chunks(2)
            .map(|p| (p[0].content.as_str(), p[1].content.as_str()))
            .collect()
    }
}

/// Why a record is not a usable conversation (the key counted under
/// `skipped_invalid` with `--skip_invalid`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InvalidReason {
    InvalidJson,
    MissingField,
    WrongType,
    UnknownRole,
    EmptyConversation,
    EmptyPrompt,
    NoAssistantTurn,
    AssistantFirst,
    ConsecutiveAssistant,
    SystemNotFirst,
}

impl InvalidReason {
    pub fn key(self) -> &'static str {
        match self {
            InvalidReason::InvalidJson => "invalid_json",
            InvalidReason::MissingField => "missing_field",
            InvalidReason::WrongType => "wrong_type",
            InvalidReason::UnknownRole => "unknown_role",
            InvalidReason::EmptyConversation => "empty_conversation",
            InvalidReason::EmptyPrompt => "empty_prompt",
            InvalidReason::NoAssistantTurn => "no_assistant_turn",
            InvalidReason::AssistantFirst => "assistant_first",
            InvalidReason::ConsecutiveAssistant => "consecutive_assistant",
            InvalidReason::SystemNotFirst => "system_not_first",
        }
    }
}

/// A bad record: where it is, which field, what was expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidRecord {
    pub file: PathBuf,
    pub line: usize,
    pub field: String,
    pub reason: InvalidReason,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for InvalidRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: field \"{}\": {} [{}]",
            self.file.display(),
            self.line,
            self.field,
            self.message,
            self.reason.key()
        )
    }
}

impl std::error::Error for InvalidRecord {}

/// Everything read from an SFT data folder.
#[derive(Clone, Debug, Default)]
pub struct SftRecords {
    pub conversations: Vec<Conversation>,
    /// Records skipped by `skip_invalid`, per reason key.
    pub skipped_invalid: BTreeMap<String, usize>,
    /// Conversations whose final user turn had no answer and was dropped.
    pub dropped_trailing_user: usize,
    pub files: Vec<PathBuf>,
}

impl SftRecords {
    pub fn skipped_total(&self) -> usize {
        self.skipped_invalid.values().sum()
    }
}

/// Read every `.json` / `.jsonl` file under `dir` (recursively, sorted by
/// path). Bad records are errors unless `skip_invalid`, then counted.
pub fn read_sft_dir(dir: &Path, skip_invalid: bool) -> Result<SftRecords> {
    let files: Vec<PathBuf> =
        list_json_files(dir).with_context(|| format!("SFT data {}", dir.display()))?;
    if files.is_empty() {
        bail!(
            "no .json/.jsonl files in {} (SFT data is ShareGPT or Alpaca JSON)",
            dir.display()
        );
    }
    let mut out = SftRecords::default();
    for file in &files {
        read_sft_file(file, skip_invalid, &mut out)?;
    }
    out.files = files;
    if out.skipped_total() > 0 {
        tracing::warn!(
            dir = %dir.display(),
            skipped = out.skipped_total(),
            reasons = ?out.skipped_invalid,
            "--skip_invalid: skipped invalid SFT records"
        );
    }
    if out.dropped_trailing_user > 0 {
        tracing::info!(
            count = out.dropped_trailing_user,
            "dropped a final user turn that has no answer (as MedicalGPT does)"
        );
    }
    Ok(out)
}

/// Read one file's records into `out`.
pub fn read_sft_file(path: &Path, skip_invalid: bool, out: &mut SftRecords) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = decode_utf8(path, &bytes)?;
    let is_array = path.extension().and_then(|e| e.to_str()) == Some("json")
        && text.trim_start().starts_with('[');
    let records: Vec<(usize, std::result::Result<Value, String>)> = if is_array {
        let values: Vec<Value> = serde_json::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}: invalid JSON (expected an array of conversation objects): {e}",
                path.display(),
                e.line()
            )
        })?;
        let lines = array_element_lines(text);
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| (lines.get(i).copied().unwrap_or(1), Ok(v)))
            .collect()
    } else {
        text.split('\n')
            .enumerate()
            .filter(|(_, raw)| !raw.trim().is_empty())
            .map(|(i, raw)| {
                let raw = raw.strip_suffix('\r').unwrap_or(raw);
                (
                    i + 1,
                    serde_json::from_str::<Value>(raw).map_err(|e| e.to_string()),
                )
            })
            .collect()
    };
    for (line, value) in records {
        let parsed = match value {
            Ok(v) => parse_record(&v, path, line),
            Err(e) => Err(InvalidRecord {
                file: path.to_path_buf(),
                line,
                field: "<record>".into(),
                reason: InvalidReason::InvalidJson,
                message: format!("invalid JSON ({e}); expected one JSON object per line"),
            }),
        };
        match parsed {
            Ok(p) => {
                out.dropped_trailing_user += usize::from(p.dropped_trailing_user);
                out.conversations.push(p.conversation);
            }
            Err(bad) if skip_invalid => {
                tracing::debug!(%bad, "skipping invalid SFT record");
                *out.skipped_invalid
                    .entry(bad.reason.key().to_string())
                    .or_default() += 1;
            }
            Err(bad) => {
                return Err(anyhow::Error::new(bad).context(
                    "invalid SFT record (pass --skip_invalid True to skip and count such records)",
                ))
            }
        }
    }
    Ok(())
}

/// A record parsed into a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedRecord {
    pub conversation: Conversation,
    /// The record ended with an unanswered user turn, which was dropped.
    pub dropped_trailing_user: bool,
}

/// Parse one JSON record (ShareGPT if it has `conversations`, Alpaca if it
/// has `instruction`).
pub fn parse_record(
    value: &Value,
    file: &Path,
    line: usize,
) -> std::result::Result<ParsedRecord, InvalidRecord> {
    let bad = |field: &str, reason: InvalidReason, message: String| InvalidRecord {
        file: file.to_path_buf(),
        line,
        field: field.to_string(),
        reason,
        message,
    };
    let obj = match value {
        Value::Object(o) => o,
        other => {
            return Err(bad(
                "<record>",
                InvalidReason::WrongType,
                format!(
                    "the record is {}; expected a JSON object",
                    crate::tokenizer::json_kind(other)
                ),
            ))
        }
    };
    let raw_turns = if obj.contains_key("conversations") {
        sharegpt_turns(obj, &bad)?
    } else if obj.contains_key("instruction") {
        alpaca_turns(obj, &bad)?
    } else {
        return Err(bad(
            "conversations",
            InvalidReason::MissingField,
            "missing; expected a ShareGPT \"conversations\" list or an Alpaca \"instruction\"/\"output\" record".into(),
        ));
    };
    let (messages, dropped_trailing_user) = normalise(raw_turns, obj, &bad)?;
    Ok(ParsedRecord {
        conversation: Conversation {
            messages,
            source: file.to_path_buf(),
            line,
        },
        dropped_trailing_user,
    })
}

type Bad<'a> = dyn Fn(&str, InvalidReason, String) -> InvalidRecord + 'a;

/// One turn as read: its role, text and field path (for errors).
struct RawTurn {
    role: Role,
    content: String,
    field: String,
}

fn string_field<'v>(
    obj: &'v Map<String, Value>,
    key: &str,
    field: &str,
    bad: &Bad,
) -> std::result::Result<&'v str, InvalidRecord> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        None => Err(bad(
            field,
            InvalidReason::MissingField,
            "missing; expected a string".into(),
        )),
        Some(other) => Err(bad(
            field,
            InvalidReason::WrongType,
            format!(
                "is {}; expected a string",
                crate::tokenizer::json_kind(other)
            ),
        )),
    }
}

fn sharegpt_turns(
    obj: &Map<String, Value>,
    bad: &Bad,
) -> std::result::Result<Vec<RawTurn>, InvalidRecord> {
    let list = match &obj["conversations"] {
        Value::Array(a) => a,
        other => {
            return Err(bad(
                "conversations",
                InvalidReason::WrongType,
                format!(
                    "is {}; expected a list of {{\"from\", \"value\"}} objects",
                    crate::tokenizer::json_kind(other)
                ),
            ))
        }
    };
    let mut turns = Vec::with_capacity(list.len());
    for (i, turn) in list.iter().enumerate() {
        let at = format!("conversations[{i}]");
        let t = match turn {
            Value::Object(t) => t,
            other => {
                return Err(bad(
                    &at,
                    InvalidReason::WrongType,
                    format!(
                        "is {}; expected an object {{\"from\", \"value\"}}",
                        crate::tokenizer::json_kind(other)
                    ),
                ))
            }
        };
        let from = string_field(t, "from", &format!("{at}.from"), bad)?;
        let value = string_field(t, "value", &format!("{at}.value"), bad)?;
        let field = format!("{at}.value");
        let (role, content) = match from {
            "system" => (Role::System, value.to_string()),
            "human" | "user" => (Role::User, value.to_string()),
            "observation" => (Role::User, format!("Observation: {value}")),
            "gpt" | "assistant" => (Role::Assistant, value.to_string()),
            "function_call" => (Role::Assistant, function_call_text(value)),
            other => {
                return Err(bad(
                    &format!("{at}.from"),
                    InvalidReason::UnknownRole,
                    format!("is {other:?}; expected one of system, human, user, observation, gpt, assistant, function_call"),
                ))
            }
        };
        turns.push(RawTurn {
            role,
            content,
            field,
        });
    }
    Ok(turns)
}

fn alpaca_turns(
    obj: &Map<String, Value>,
    bad: &Bad,
) -> std::result::Result<Vec<RawTurn>, InvalidRecord> {
    let instruction = string_field(obj, "instruction", "instruction", bad)?;
    let input = match obj.get("input") {
        None | Some(Value::Null) => "",
        Some(_) => string_field(obj, "input", "input", bad)?,
    };
    let output = string_field(obj, "output", "output", bad)?;
    let human = if input.trim().is_empty() {
        instruction.to_string()
    } else {
        format!("{instruction}\n\n{input}")
    };
    Ok(vec![
        RawTurn {
            role: Role::User,
            content: human,
            field: "instruction".into(),
        },
        RawTurn {
            role: Role::Assistant,
            content: output.to_string(),
            field: "output".into(),
        },
    ])
}

/// Check the role order and apply the kept normalisations (module docs).
fn normalise(
    turns: Vec<RawTurn>,
    obj: &Map<String, Value>,
    bad: &Bad,
) -> std::result::Result<(Vec<Message>, bool), InvalidRecord> {
    if turns.is_empty() {
        return Err(bad(
            "conversations",
            InvalidReason::EmptyConversation,
            "is empty; expected user and assistant turns".into(),
        ));
    }
    let mut system: Option<String> = None;
    let mut body: Vec<Message> = Vec::new();
    for (i, t) in turns.into_iter().enumerate() {
        match t.role {
            Role::System if i == 0 => system = Some(t.content),
            Role::System => {
                return Err(bad(
                    &t.field.replace(".value", ".from"),
                    InvalidReason::SystemNotFirst,
                    format!("a system turn at position {i}; expected the system turn first"),
                ))
            }
            Role::User => {
                if t.content.trim().is_empty() {
                    return Err(bad(
                        &t.field,
                        InvalidReason::EmptyPrompt,
                        "is an empty user prompt; expected text".into(),
                    ));
                }
                match body.last_mut() {
                    Some(prev) if prev.role == Role::User => {
                        prev.content.push('\n');
                        prev.content.push_str(&t.content);
                    }
                    _ => body.push(Message::user(t.content)),
                }
            }
            Role::Assistant => {
                match body.last() {
                    None => return Err(bad(
                        &t.field.replace(".value", ".from"),
                        InvalidReason::AssistantFirst,
                        "an assistant turn comes before any user turn; expected a user turn first"
                            .into(),
                    )),
                    Some(prev) if prev.role == Role::Assistant => {
                        return Err(bad(
                            &t.field.replace(".value", ".from"),
                            InvalidReason::ConsecutiveAssistant,
                            "a second assistant turn in a row; expected a user turn between them"
                                .into(),
                        ))
                    }
                    Some(_) => body.push(Message::assistant(t.content)),
                }
            }
        }
    }
    if !body.iter().any(|m| m.role == Role::Assistant) {
        return Err(bad(
            "conversations",
            InvalidReason::NoAssistantTurn,
            "has no assistant turn; expected at least one gpt/assistant answer".into(),
        ));
    }
    let dropped = body.last().is_some_and(|m| m.role == Role::User);
    if dropped {
        body.pop();
    }
    let system = match system {
        Some(s) => Some(s),
        None => match obj.get("system_prompt") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(bad(
                    "system_prompt",
                    InvalidReason::WrongType,
                    format!(
                        "is {}; expected a string",
                        crate::tokenizer::json_kind(other)
                    ),
                ))
            }
        },
    };
    let mut messages = Vec::with_capacity(body.len() + 1);
    // An empty system text means "none", as in MedicalGPT (`system_prompt or ...`).
    if let Some(s) = system.filter(|s| !s.is_empty()) {
        messages.push(Message::system(s));
    }
    messages.extend(body);
    Ok((messages, dropped))
}

/// MedicalGPT's text for a `function_call` turn without `--tool_format`:
/// `Action: {name}\nAction Input: {json.dumps(arguments, ensure_ascii=False)}`
/// when the value is an object with `name` and `arguments`, else the value.
pub(crate) fn function_call_text(value: &str) -> String {
    let parsed: Value = match serde_json::from_str(value) {
        Ok(v) => v,
        Err(_) => return value.to_string(),
    };
    let (Some(Value::String(name)), Some(_)) = (parsed.get("name"), parsed.get("arguments")) else {
        return value.to_string();
    };
    // Re-serialise the raw `arguments` text so its key order survives.
    match raw_member(value, "arguments") {
        Some(raw) => format!("Action: {name}\nAction Input: {}", python_json(raw)),
        None => value.to_string(),
    }
}

/// The raw JSON text of a top-level member of an object (key order kept).
fn raw_member<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let map: BTreeMap<String, &serde_json::value::RawValue> = serde_json::from_str(json).ok()?;
    map.get(key).map(|r| r.get())
}

/// Re-emit JSON text as Python's `json.dumps(ensure_ascii=False)` writes it:
/// `", "` and `": "` separators, strings unescaped except `"`, `\\` and
/// control characters. Member order is kept; numbers are kept as written.
pub fn python_json(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len() + 16);
    let mut chars = raw.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => {
                // Find the end of this string token, then decode and re-encode it.
                let mut end = i + 1;
                let mut escaped = false;
                for (j, d) in chars.by_ref() {
                    end = j + d.len_utf8();
                    match (escaped, d) {
                        (true, _) => escaped = false,
                        (false, '\\') => escaped = true,
                        (false, '"') => break,
                        _ => {}
                    }
                }
                let s: String = serde_json::from_str(&raw[i..end]).unwrap_or_default();
                python_string(&s, &mut out);
            }
            ',' => out.push_str(", "),
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

/// A JSON string literal as Python's `json.dumps(ensure_ascii=False)` writes it.
pub fn python_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> std::result::Result<ParsedRecord, InvalidRecord> {
        parse_record(&v, Path::new("d/x.jsonl"), 7)
    }

    #[test]
    fn sharegpt_roles_and_system_prompt() {
        let p = parse(json!({"conversations": [
            {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
            {"from": "user", "value": "q2"}, {"from": "observation", "value": "{\"t\": 1}"},
            {"from": "assistant", "value": "a2"}],
            "system_prompt": "S"}))
        .unwrap();
        let m = &p.conversation.messages;
        assert_eq!(m[0], Message::system("S"));
        assert_eq!(
            p.conversation.turns(),
            vec![("q1", "a1"), ("q2\nObservation: {\"t\": 1}", "a2")]
        );
        assert!(!p.dropped_trailing_user);
    }

    #[test]
    fn function_call_is_formatted_like_python_json_dumps() {
        let p = parse(json!({"conversations": [
            {"from": "human", "value": "q"},
            {"from": "function_call", "value": "{\"name\": \"f\", \"arguments\": {\"zeta\":\"北京\",\"alpha\":[1,2]}}"},
            {"from": "observation", "value": "r"}, {"from": "gpt", "value": "a"}]}))
        .unwrap();
        assert_eq!(
            p.conversation.turns()[0].1,
            "Action: f\nAction Input: {\"zeta\": \"北京\", \"alpha\": [1, 2]}"
        );
    }

    #[test]
    fn alpaca_joins_instruction_and_input() {
        let p = parse(json!({"instruction": "I", "input": "X", "output": "O"})).unwrap();
        assert_eq!(p.conversation.turns(), vec![("I\n\nX", "O")]);
        let p = parse(json!({"instruction": "I", "input": "  ", "output": "O"})).unwrap();
        assert_eq!(p.conversation.turns(), vec![("I", "O")]);
    }

    #[test]
    fn trailing_user_is_dropped_and_flagged() {
        let p = parse(json!({"conversations": [
            {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
            {"from": "human", "value": "q2"}]}))
        .unwrap();
        assert!(p.dropped_trailing_user);
        assert_eq!(p.conversation.turns(), vec![("q", "a")]);
    }

    fn reason(v: Value) -> (InvalidReason, String, String) {
        let e = parse(v).unwrap_err();
        (e.reason, e.field.clone(), e.to_string())
    }

    #[test]
    fn each_error_class_names_file_line_and_field() {
        let cases = [
            (
                json!({"conversations": []}),
                InvalidReason::EmptyConversation,
                "conversations",
            ),
            (
                json!({"conversations": [{"from": "human", "value": "q"}]}),
                InvalidReason::NoAssistantTurn,
                "conversations",
            ),
            (
                json!({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}),
                InvalidReason::AssistantFirst,
                "conversations[0].from",
            ),
            (
                json!({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]}),
                InvalidReason::ConsecutiveAssistant,
                "conversations[2].from",
            ),
            (
                json!({"conversations": [{"from": "human", "value": "q"}, {"from": "system", "value": "s"}, {"from": "gpt", "value": "a"}]}),
                InvalidReason::SystemNotFirst,
                "conversations[1].from",
            ),
            (
                json!({"conversations": [{"from": "human", "value": " "}, {"from": "gpt", "value": "a"}]}),
                InvalidReason::EmptyPrompt,
                "conversations[0].value",
            ),
            (
                json!({"conversations": [{"from": "bot", "value": "q"}]}),
                InvalidReason::UnknownRole,
                "conversations[0].from",
            ),
            (
                json!({"conversations": [{"from": "human"}]}),
                InvalidReason::MissingField,
                "conversations[0].value",
            ),
            (
                json!({"conversations": [{"from": "human", "value": 3}]}),
                InvalidReason::WrongType,
                "conversations[0].value",
            ),
            (
                json!({"conversations": "x"}),
                InvalidReason::WrongType,
                "conversations",
            ),
            (
                json!({"text": "x"}),
                InvalidReason::MissingField,
                "conversations",
            ),
            (
                json!({"instruction": "i"}),
                InvalidReason::MissingField,
                "output",
            ),
            (
                json!({"instruction": "i", "input": 1, "output": "o"}),
                InvalidReason::WrongType,
                "input",
            ),
            (
                json!({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system_prompt": 1}),
                InvalidReason::WrongType,
                "system_prompt",
            ),
            (json!([1]), InvalidReason::WrongType, "<record>"),
        ];
        for (v, want, field) in cases {
            let (got, got_field, msg) = reason(v.clone());
            assert_eq!((got, got_field.as_str()), (want, field), "{v}");
            assert!(msg.starts_with("d/x.jsonl:7: field"), "{msg}");
            assert!(msg.contains("expected"), "{msg}");
        }
    }

    #[test]
    fn files_error_or_skip_with_counts() {
        let dir = tempfile::tempdir().unwrap();
        let good = r#"{"conversations":[{"from":"human","value":"q"},{"from":"gpt","value":"a"}]}"#;
        let text = format!(
            "{good}\n\n{}\n{}\nnot json\n{good}\n",
            r#"{"conversations":[{"from":"gpt","value":"a"}]}"#, r#"{"conversations":[]}"#
        );
        std::fs::create_dir_all(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b.jsonl"), &text).unwrap();
        std::fs::write(
            dir.path().join("a.json"),
            format!("[\n{good},\n  {good}\n]"),
        )
        .unwrap();
        std::fs::write(dir.path().join("c.txt"), "ignored").unwrap();

        let e = format!("{:#}", read_sft_dir(dir.path(), false).unwrap_err());
        assert!(
            e.contains("sub/b.jsonl:3: field \"conversations[0].from\""),
            "{e}"
        );
        assert!(e.contains("--skip_invalid"), "{e}");

        let r = read_sft_dir(dir.path(), true).unwrap();
        assert_eq!(r.conversations.len(), 4);
        assert_eq!(r.conversations[0].line, 2, "array elements keep their line");
        assert_eq!(r.conversations[1].line, 3);
        assert_eq!(r.conversations[3].line, 6);
        let want: BTreeMap<String, usize> = [
            ("assistant_first".to_string(), 1),
            ("empty_conversation".to_string(), 1),
            ("invalid_json".to_string(), 1),
        ]
        .into();
        assert_eq!(r.skipped_invalid, want);
        assert_eq!(r.files.len(), 2);
    }

    #[test]
    fn python_json_matches_json_dumps() {
        assert_eq!(
            python_json(r#"{"b":1,"a":{"x":"\u4e2d\"\n","y":[true,null,1.5]}}"#),
            "{\"b\": 1, \"a\": {\"x\": \"中\\\"\\n\", \"y\": [true, null, 1.5]}}"
        );
    }
}
