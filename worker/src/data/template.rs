//! Chat formats: MedicalGPT's named templates (`training/template.py`) and a
//! model's own Jinja `chat_template`, rendered as transformers'
//! `apply_chat_template` renders it.
//!
//! Named templates follow `Conversation._format_example`: the system text
//! (the data's, else the template's) plus `sep` if non-empty, then turn 0 is
//! `system + prompt.format(query=q)` and turn k>0 is `sep + prompt.format(..)`;
//! answers are appended raw. `prompt.format` is Python's `str.format`, so
//! `{{`/`}}` print single braces: `deepseekcoder`'s prompt
//! `### Instruction:\n{{content}}\n### Response:\n` therefore renders the
//! literal text `{content}` and never the query — MedicalGPT's bug, kept so
//! that data prepared here matches data prepared there.
//!
//! Jinja templates run on minijinja with what transformers sets up
//! (`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`
//! with loop controls): `raise_exception`, `strftime_now`, a `tojson` that is
//! Python's `json.dumps(ensure_ascii=False)`, Python string/dict methods
//! (minijinja-contrib `pycompat`), and the context transformers passes:
//! `messages` (dicts with `role` and `content`), `add_generation_prompt`,
//! `tools`/`documents` = None and the tokenizer's named special tokens.

use crate::data::chat::{python_string, Message, Role};
use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, Result};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use std::sync::Arc;

/// One of MedicalGPT's registered templates (`template.py` `Conversation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamedTemplate {
    pub name: &'static str,
    pub system_prompt: &'static str,
    /// Python format string with `{query}`.
    pub prompt: &'static str,
    pub sep: &'static str,
    pub stop_str: &'static str,
}

const VICUNA_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";
const HUMAN_SYSTEM: &str = "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.";
const QWEN_SYSTEM: &str = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n";
const CHATML_PROMPT: &str = "<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n";
const LLAMA2_SYSTEM: &str = "<<SYS>>\nYou are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't know the answer to a question, please don't share false information.\n<</SYS>>\n\n";
const DEEPSEEKCODER_SYSTEM: &str = "You are an AI programming assistant, utilizing the Deepseek Coder model, developed by Deepseek Company, and you only answer questions related to computer science. For politically sensitive questions, security and privacy issues, and other non-computer science questions, you will refuse to answer\n";

const fn t(
    name: &'static str,
    system_prompt: &'static str,
    prompt: &'static str,
    sep: &'static str,
    stop_str: &'static str,
) -> NamedTemplate {
    NamedTemplate {
        name,
        system_prompt,
        prompt,
        sep,
        stop_str,
    }
}

const QWEN_LIKE: [&str; 5] = [
    "qwen",
    "qwen3",
    "qwen3_nothink",
    "qwen3_5",
    "qwen3_5_nothink",
];

/// The 33 templates MedicalGPT HEAD registers, in its registration order.
pub static NAMED_TEMPLATES: [NamedTemplate; 33] = [
    t("vicuna", VICUNA_SYSTEM, "USER: {query} ASSISTANT:", "</s>", "</s>"),
    t("base", "", "{query}", "</s>", "</s>"),
    t("alpaca", "Below is an instruction that describes a task. Write a response that appropriately completes the request.", "### Instruction:\n{query}\n\n### Response:\n", "\n\n", "</s>"),
    t("baichuan", "", "<reserved_102>{query}<reserved_103>", "</s>", "</s>"),
    t("baichuan2", "", "<reserved_106>{query}<reserved_107>", "</s>", "</s>"),
    t("ziya", "", "<human>:{query}\n<bot>:", "\n", "</s>"),
    t("linly", "", "User: {query}\nBot: ", "\n", "</s>"),
    t("chatglm", "", "问：{query}\n答：", "\n", "</s>"),
    t("chatglm2", "", "问：{query}\n\n答：", "\n\n", "</s>"),
    t("chatglm3", "", "<|user|>\n{query}<|assistant|>", "\n", "<|user|>"),
    t("phoenix", "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.\n\n", "Human: <s>{query}</s>Assistant: ", "</s>", "</s>"),
    t("belle", "", "Human: {query}\n\nBelle: ", "\n\n", "</s>"),
    t("aquila", HUMAN_SYSTEM, "Human: {query}###Assistant:", "###", "</s>"),
    t("intern", "", "<|User|>:{query}<eoh>\n<|Bot|>:", "<eoa>\n", "<eoa>"),
    t("intern2", "<|im_start|>system\nYou are an AI assistant whose name is InternLM (书生·浦语).\n<|im_end|>\n", CHATML_PROMPT, "<|im_end|>\n", "<|im_end|>"),
    t("starchat", "<system>\n", "<|user|>\n{query}<|end|>\n<|assistant|>\n", "<|end|>\n", "<|end|>"),
    t("llama2", LLAMA2_SYSTEM, "[INST] {query} [/INST]", "</s>", "</s>"),
    t("llama3", "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful, excellent and smart assistant.", "<|start_header_id|>user<|end_header_id|>\n\n{query}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>", "<|eot_id|>"),
    t("llama2-zh", "[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n [/INST]", "[INST] {query} [/INST]", "</s>", "</s>"),
    t("mistral", "", "[INST] {query} [/INST]", "</s>", "</s>"),
    t("xverse", "", "Human: {query}\n\nAssistant: ", "</s>", "</s>"),
    t("chatml", "You are a helpful assistant.", CHATML_PROMPT, "<|im_end|>\n", "<|im_end|>"),
    t("deepseek", "", "User: {query}\n\nAssistant:", "</s>", "</s>"),
    t("deepseek3", "", "<｜User｜>{query}<｜Assistant｜>", "</s>", "</s>"),
    t("deepseekcoder", DEEPSEEKCODER_SYSTEM, "### Instruction:\n{{content}}\n### Response:\n", "\n", "<|EOT|>"),
    t("yi", "", CHATML_PROMPT, "\n", "<|im_end|>"),
    t("orion", "", "Human: {query}\n\nAssistant: </s>", "</s>", "</s>"),
    t("cohere", "<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{query}<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", "</s>", "</s>"),
    t(QWEN_LIKE[0], QWEN_SYSTEM, CHATML_PROMPT, "\n", "<|im_end|>"),
    t(QWEN_LIKE[1], QWEN_SYSTEM, CHATML_PROMPT, "\n", "<|im_end|>"),
    t(QWEN_LIKE[2], QWEN_SYSTEM, CHATML_PROMPT, "\n", "<|im_end|>"),
    t(QWEN_LIKE[3], QWEN_SYSTEM, CHATML_PROMPT, "\n", "<|im_end|>"),
    t(QWEN_LIKE[4], QWEN_SYSTEM, CHATML_PROMPT, "\n", "<|im_end|>"),
];

/// Look a named template up; the error lists the known names.
pub fn named_template(name: &str) -> Result<&'static NamedTemplate> {
    NAMED_TEMPLATES
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = NAMED_TEMPLATES.iter().map(|t| t.name).collect();
            anyhow!(
                "unknown --template_name {name:?}; known templates: {}",
                names.join(", ")
            )
        })
}

/// Python `format_string.format(query=query)`: `{query}` is replaced,
/// `{{`/`}}` become `{`/`}`.
fn python_format(format_string: &str, query: &str) -> Result<String> {
    let mut out = String::with_capacity(format_string.len() + query.len());
    let mut rest = format_string;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("{{") {
            out.push('{');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("}}") {
            out.push('}');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{query}") {
            out.push_str(query);
            rest = after;
        } else {
            bail!("template prompt {format_string:?} has a replacement field other than {{query}}");
        }
    }
    out.push_str(rest);
    Ok(out)
}

impl NamedTemplate {
    /// `Conversation._format_example(pairs, system_prompt)`: [src_1, tgt_1, ...].
    pub fn format_example(
        &self,
        pairs: &[(&str, &str)],
        system_prompt: &str,
    ) -> Result<Vec<String>> {
        let system = if system_prompt.is_empty() {
            self.system_prompt
        } else {
            system_prompt
        };
        let system = if system.is_empty() {
            String::new()
        } else {
            format!("{system}{}", self.sep)
        };
        let mut convs = Vec::with_capacity(pairs.len() * 2);
        for (i, (query, answer)) in pairs.iter().enumerate() {
            let head = if i == 0 { system.as_str() } else { self.sep };
            convs.push(format!("{head}{}", python_format(self.prompt, query)?));
            convs.push(answer.to_string());
        }
        Ok(convs)
    }

    /// `Conversation.get_prompt`: the dialog joined.
    pub fn get_prompt(&self, pairs: &[(&str, &str)], system_prompt: &str) -> Result<String> {
        Ok(self.format_example(pairs, system_prompt)?.concat())
    }
}

/// A model's Jinja chat template with the special tokens it sees.
#[derive(Clone)]
pub struct JinjaTemplate {
    env: Arc<Environment<'static>>,
    /// Where the template came from, for errors.
    origin: String,
    /// `bos_token`, `eos_token`, ... as transformers' `special_tokens_map`.
    special_tokens: Vec<(&'static str, String)>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for JinjaTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JinjaTemplate")
            .field("origin", &self.origin)
            .field("special_tokens", &self.special_tokens)
            .finish()
    }
}

const TEMPLATE_NAME: &str = "chat_template";

impl JinjaTemplate {
    /// Compile `source`; the special tokens come from `tokenizer`.
    pub fn new(source: &str, origin: &str, tokenizer: &Tokenizer) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| {
                anyhow!(
                    "chat template of {origin} does not compile: {}",
                    engine_message(&e)
                )
            })?;
        Ok(JinjaTemplate {
            env: Arc::new(env),
            origin: origin.to_string(),
            special_tokens: tokenizer.special_tokens_map(),
            eos_token: tokenizer.eos_token().map(str::to_string),
        })
    }

    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=..)`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        #[derive(serde::Serialize)]
        struct Msg<'a> {
            role: &'a str,
            content: &'a str,
        }
        let msgs: Vec<Msg> = messages
            .iter()
            .map(|m| Msg {
                role: m.role.as_str(),
                content: &m.content,
            })
            .collect();
        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", Value::from_serialize(&msgs)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ];
        for (k, v) in &self.special_tokens {
            ctx.push((k, Value::from(v.as_str())));
        }
        let ctx: Value = ctx
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
            .into();
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| anyhow!("chat template of {}: {}", self.origin, engine_message(&e)))?;
        tmpl.render(ctx).map_err(|e| {
            anyhow!(
                "chat template of {} failed to render: {}",
                self.origin,
                engine_message(&e)
            )
        })
    }
}

/// The engine's message with the template line, and the causes.
fn engine_message(e: &Error) -> String {
    let mut s = match (e.detail(), e.line()) {
        (Some(d), Some(l)) => format!("{d} (line {l}; {})", e.kind()),
        (Some(d), None) => format!("{d} ({})", e.kind()),
        (None, _) => e.to_string(),
    };
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `datetime.now().strftime(format)` (local time is UTC here) for the
/// directives chat templates use.
fn strftime_now(format: String) -> Result<String, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&format, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Python `strftime` of a UTC Unix time, for %Y %y %m %d %e %B %b %A %a %H %I
/// %M %S %p %j %%; other directives are an error.
fn strftime(format: &str, unix_secs: i64) -> Result<String, Error> {
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let (h, m, s) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('I') => out.push_str(&format!("{:02}", (h + 11) % 12 + 1)),
            Some('M') => out.push_str(&format!("{m:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('p') => out.push_str(if h < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: unsupported directive %{}",
                        other.unwrap_or(' ')
                    ),
                ))
            }
        }
    }
    Ok(out)
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, not minijinja's HTML-safe one.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let _ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.kind() {
            ValueKind::Number => Some(" ".repeat(i64::try_from(v)?.max(0) as usize)),
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an int or a string",
                ))
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let a: Vec<Value> = v.try_iter()?.collect();
            if a.len() != 2 {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be a pair",
                ));
            }
            (a[0].to_string(), a[1].to_string())
        }
        // Python's defaults: ", " without indent, "," with it.
        _ => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
    };
    let opts = DumpOpts {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    dump(&value, &opts, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct DumpOpts {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn dump(v: &Value, o: &DumpOpts, depth: usize, out: &mut String) -> Result<(), Error> {
    let newline = |out: &mut String, d: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..d {
                out.push_str(ind);
            }
        }
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                // Integers print as they are (Python ints have no size limit).
                out.push_str(&v.to_string());
            } else {
                out.push_str(&python_float(f64::try_from(v.clone())?));
            }
        }
        ValueKind::String => python_string(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                dump(item, o, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if o.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                python_string(&k.to_string(), out);
                out.push_str(&o.key_sep);
                dump(&v.get_item(k)?, o, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialise a value of kind {}", v.kind()),
            ))
        }
    }
    Ok(())
}

/// Python `repr(float)` for the common cases (`1.0`, `0.5`, `1e+16`).
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if f.fract() == 0.0 && f.abs() < 1e16 {
        return format!("{f:.1}");
    }
    let s = format!("{f:?}");
    // Rust writes 1e16 / 1e-7; Python 1e+16 / 1e-07.
    match s.split_once('e') {
        Some((m, e)) => {
            let (sign, digits) = e.strip_prefix('-').map(|d| ("-", d)).unwrap_or(("+", e));
            format!("{m}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

/// The chat template renders a conversation so far differently from how it
/// renders it inside a longer one (Qwen3 drops past think blocks), so
/// MedicalGPT's character-offset split cuts later prompts in the wrong place.
/// Kept for parity; said once per process.
fn warn_not_prefix_once() {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            "chat template: the rendered history is not a prefix of the next rendering (e.g. Qwen3 drops past <think> blocks); \
             later turns' prompts are cut at MedicalGPT's character offset and may lose text; pass --template_name to avoid this"
        )
    });
}

/// How conversations become text: a named MedicalGPT template or the model's
/// Jinja chat template.
#[derive(Clone, Debug)]
pub enum ChatFormat {
    Named(&'static NamedTemplate),
    Jinja(JinjaTemplate),
}

/// Messages as MedicalGPT's templates take them.
struct SplitMessages<'a> {
    /// The system text, "" when there is none.
    system: &'a str,
    /// (user, assistant) pairs; a final user message gets `""`.
    pairs: Vec<(&'a str, &'a str)>,
    /// The last message is a user message (no answer yet).
    open: bool,
}

/// Split well-ordered messages: an optional system message, then alternating
/// user/assistant messages.
fn split_messages(messages: &[Message]) -> Result<SplitMessages<'_>> {
    let (system, body) = match messages.first() {
        Some(m) if m.role == Role::System => (m.content.as_str(), &messages[1..]),
        _ => ("", messages),
    };
    let mut pairs = Vec::new();
    let mut open = false;
    for (i, chunk) in body.chunks(2).enumerate() {
        let user = &chunk[0];
        if user.role != Role::User {
            bail!(
                "message {} is {}; named templates need an optional system message, then alternating user/assistant messages",
                2 * i + usize::from(system_present(messages)),
                user.role.as_str()
            );
        }
        match chunk.get(1) {
            Some(a) if a.role == Role::Assistant => {
                pairs.push((user.content.as_str(), a.content.as_str()))
            }
            Some(a) => bail!(
                "message {} is {}; named templates need alternating user/assistant messages",
                2 * i + 1 + usize::from(system_present(messages)),
                a.role.as_str()
            ),
            None => {
                pairs.push((user.content.as_str(), ""));
                open = true;
            }
        }
    }
    Ok(SplitMessages {
        system,
        pairs,
        open,
    })
}

fn system_present(messages: &[Message]) -> bool {
    messages.first().is_some_and(|m| m.role == Role::System)
}

impl ChatFormat {
    /// `--template_name` given: that named template. None: the tokenizer's
    /// `chat_template` (what MedicalGPT HEAD does then, through
    /// `apply_chat_template`); a tokenizer without one is an error asking for
    /// `--template_name`, rather than a silent fallback to some template.
    pub fn resolve(template_name: Option<&str>, tokenizer: &Tokenizer) -> Result<ChatFormat> {
        match template_name {
            Some(name) => Ok(ChatFormat::Named(named_template(name)?)),
            None => match tokenizer.chat_template() {
                Some(src) => Ok(ChatFormat::Jinja(JinjaTemplate::new(
                    src,
                    "the tokenizer (tokenizer_config.json / chat_template.jinja)",
                    tokenizer,
                )?)),
                None => bail!(
                    "the tokenizer has no chat_template; pass --template_name (one of: {})",
                    NAMED_TEMPLATES
                        .iter()
                        .map(|t| t.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
        }
    }

    /// Whole conversation text (messages may start with a system message);
    /// `add_generation_prompt` appends the assistant header for the next turn.
    /// Named templates put that header in every user prompt, so for them a
    /// final user message renders the same either way, and a generation
    /// prompt after an assistant message is an error (there is no query).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        match self {
            ChatFormat::Jinja(j) => j.render(messages, add_generation_prompt),
            ChatFormat::Named(t) => {
                let SplitMessages {
                    system,
                    pairs,
                    open,
                } = split_messages(messages)?;
                if add_generation_prompt && !open {
                    bail!(
                        "template {}: a generation prompt needs a final user message",
                        t.name
                    );
                }
                t.get_prompt(&pairs, system)
            }
        }
    }

    /// MedicalGPT's dialog: [(src_1, tgt_1), ...] for SFT masking; src
    /// includes the system prompt on turn 1. Jinja templates use HEAD's
    /// `apply_chat_template` differences: src_k = render(history + user_k,
    /// generation prompt)[len(render(history)):], tgt_k = the answer.
    pub fn dialog(&self, messages: &[Message]) -> Result<Vec<(String, String)>> {
        let SplitMessages {
            system,
            pairs,
            open,
        } = split_messages(messages)?;
        if open {
            bail!("dialog: the last message must be an assistant answer");
        }
        match self {
            ChatFormat::Named(t) => {
                let flat = t.format_example(&pairs, system)?;
                Ok(flat
                    .chunks(2)
                    .map(|p| (p[0].clone(), p[1].clone()))
                    .collect())
            }
            ChatFormat::Jinja(j) => {
                let mut acc: Vec<Message> = Vec::with_capacity(messages.len());
                if !system.is_empty() {
                    acc.push(Message::system(system));
                }
                let mut prev = String::new();
                let mut out = Vec::with_capacity(pairs.len());
                for (q, a) in pairs {
                    acc.push(Message::user(q));
                    let cur = j.render(&acc, true)?;
                    // Python slices by characters: cur_text[len(prev_text):].
                    let src: String = cur.chars().skip(prev.chars().count()).collect();
                    if !cur.starts_with(&prev) {
                        warn_not_prefix_once();
                    }
                    out.push((src, a.to_string()));
                    acc.push(Message::assistant(a));
                    prev = j.render(&acc, false)?;
                }
                Ok(out)
            }
        }
    }

    /// Strings that end an assistant turn in generation (stop_str for named
    /// templates; for Jinja, the eos token).
    pub fn stop_strings(&self) -> Vec<String> {
        match self {
            ChatFormat::Named(t) => vec![t.stop_str.to_string()],
            ChatFormat::Jinja(j) => j.eos_token.iter().cloned().collect(),
        }
    }

    pub fn name(&self) -> String {
        match self {
            ChatFormat::Named(t) => t.name.to_string(),
            ChatFormat::Jinja(_) => "chat_template".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_format_handles_braces() {
        assert_eq!(python_format("a{query}b", "Q").unwrap(), "aQb");
        assert_eq!(python_format("x{{content}}y", "Q").unwrap(), "x{content}y");
        assert!(python_format("{other}", "Q").is_err());
    }

    #[test]
    fn unknown_template_lists_names() {
        let e = named_template("nope").unwrap_err().to_string();
        assert!(
            e.contains("nope") && e.contains("vicuna") && e.contains("qwen3_5_nothink"),
            "{e}"
        );
    }

    #[test]
    fn strftime_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %I%p %%", t).unwrap(),
            "2024-02-29 13:05:09 Thu Thursday Feb February 060 24 01PM %"
        );
        assert_eq!(strftime("%d %b %Y", 0).unwrap(), "01 Jan 1970");
    }

    #[test]
    fn python_float_repr() {
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(0.5), "0.5");
        assert_eq!(python_float(1e16), "1e+16");
        assert_eq!(python_float(1e-7), "1e-07");
    }
}
