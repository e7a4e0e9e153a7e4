//! Chat templates and SFT tokenisation against transformers and MedicalGPT.
//!
//! Fixtures (worker/tests/fixtures/chat/, made by scripts/make_chat_fixtures.py):
//! - jinja.json: transformers' `apply_chat_template(tokenize=False)` of real
//!   chat templates (or the error it raised);
//! - named.json: MedicalGPT's named templates rendered by Python (table
//!   checked against MedicalGPT's template.py);
//! - sft.json: MedicalGPT's SFT preprocess re-implemented in Python over the
//!   HF tokenizer.

use rlhf_worker::data::chat::{Conversation, Message, Role};
use rlhf_worker::data::sft::{
    fix_special_tokens, tokenize_conversations, SftTokenizeArgs, IGNORE_INDEX,
};
use rlhf_worker::data::template::{named_template, ChatFormat, JinjaTemplate, NAMED_TEMPLATES};
use rlhf_worker::tokenizer::Tokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat")
}

fn read(name: &str) -> Value {
    let p = fixtures().join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn tokenizer(name: &str) -> Tokenizer {
    Tokenizer::load(&fixtures().join(name)).unwrap()
}

fn messages(v: &Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                r => panic!("role {r}"),
            };
            Message::new(role, m["content"].as_str().unwrap())
        })
        .collect()
}

#[test]
fn jinja_templates_render_like_transformers() {
    let fx = read("jinja.json");
    let mut checked = 0;
    for case in fx["cases"].as_array().unwrap() {
        let tname = case["template"].as_str().unwrap();
        let tok = tokenizer(case["tokenizer"].as_str().unwrap());
        let src = fx["templates"][tname].as_str().unwrap();
        let msgs = messages(&fx["conversations"][case["conversation"].as_str().unwrap()]);
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let what = format!("{tname} / {} / agp={agp}", case["conversation"]);
        let j = JinjaTemplate::new(src, tname, &tok).unwrap();
        let got = j.render(&msgs, agp);
        match (case.get("expected"), case.get("error")) {
            (Some(want), _) => {
                let got = got.unwrap_or_else(|e| panic!("{what}: {e:#}"));
                assert_eq!(got, want.as_str().unwrap(), "{what}");
            }
            (None, Some(err)) => {
                let e = format!("{:#}", got.expect_err(&what));
                assert!(e.contains(err.as_str().unwrap()), "{what}: {e}");
                assert!(e.contains(tname), "the error names the template: {e}");
            }
            _ => panic!("bad fixture {case}"),
        }
        checked += 1;
    }
    assert_eq!(checked, 100);
}

#[test]
fn tokenizer_chat_template_is_the_default_format() {
    let tok = tokenizer("tok_qwen");
    let f = ChatFormat::resolve(None, &tok).unwrap();
    assert!(matches!(f, ChatFormat::Jinja(_)));
    assert_eq!(f.stop_strings(), vec!["<|im_end|>".to_string()]);
    let fx = read("jinja.json");
    let case = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["template"] == "qwen2_5"
                && c["conversation"] == "system_multi"
                && c["add_generation_prompt"] == true
        })
        .unwrap();
    let msgs = messages(&fx["conversations"]["system_multi"]);
    assert_eq!(
        f.render(&msgs, true).unwrap(),
        case["expected"].as_str().unwrap()
    );

    // Without a chat template and without --template_name: an error asking for one.
    let mut bare = tok.clone();
    bare.set_chat_template(None);
    let e = ChatFormat::resolve(None, &bare).unwrap_err().to_string();
    assert!(e.contains("--template_name") && e.contains("vicuna"), "{e}");
    let e = ChatFormat::resolve(Some("gpt5"), &bare)
        .unwrap_err()
        .to_string();
    assert!(e.contains("gpt5") && e.contains("chatglm3"), "{e}");
    // A template that does not compile names the engine's complaint.
    let e = format!(
        "{:#}",
        JinjaTemplate::new("{% for x in %}", "broken", &tok).unwrap_err()
    );
    assert!(e.contains("broken") && e.contains("line 1"), "{e}");
}

/// Rendered 2-turn `get_prompt([["Q1","A1"],["Q2",""]])` strings from the
/// reference notes (§5, "verified by running template.py").
#[test]
fn named_two_turn_prompts_match_the_reference_notes() {
    let two = |name: &str| {
        let f = ChatFormat::Named(named_template(name).unwrap());
        f.render(
            &[
                Message::user("Q1"),
                Message::assistant("A1"),
                Message::user("Q2"),
            ],
            true,
        )
        .unwrap()
    };
    assert_eq!(two("qwen"), "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n");
    let llama2 = two("llama2");
    assert!(
        llama2.starts_with("<<SYS>>\nYou are a helpful, respectful and honest assistant."),
        "{llama2}"
    );
    assert!(llama2.ends_with("please don't share false information.\n<</SYS>>\n\n</s>[INST] Q1 [/INST]A1</s>[INST] Q2 [/INST]"), "{llama2}");
    assert_eq!(
        two("chatglm3"),
        "<|user|>\nQ1<|assistant|>A1\n<|user|>\nQ2<|assistant|>"
    );
    assert_eq!(two("chatglm2"), "问：Q1\n\n答：A1\n\n问：Q2\n\n答：");
    let vicuna_system = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";
    assert_eq!(
        two("vicuna"),
        format!("{vicuna_system}</s>USER: Q1 ASSISTANT:A1</s>USER: Q2 ASSISTANT:")
    );
}

#[test]
fn every_named_template_matches_medicalgpt() {
    let fx = read("named.json");
    let names: Vec<&str> = NAMED_TEMPLATES.iter().map(|t| t.name).collect();
    let mut want_names: Vec<&str> = fx.as_object().unwrap().keys().map(String::as_str).collect();
    want_names.sort();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, want_names, "the 33 registered names");
    for name in names {
        let f = ChatFormat::resolve(Some(name), &tokenizer("tok_qwen")).unwrap();
        let want = &fx[name];
        let q = [Message::user("What is a fever?")];
        assert_eq!(
            f.render(&q, true).unwrap(),
            want["one_turn"].as_str().unwrap(),
            "{name}"
        );
        let qs = [
            Message::system("Be brief."),
            Message::user("What is a fever?"),
        ];
        assert_eq!(
            f.render(&qs, true).unwrap(),
            want["one_turn_system"].as_str().unwrap(),
            "{name}"
        );
        let two = [
            Message::user("Q1"),
            Message::assistant("A1"),
            Message::user("Q2"),
        ];
        assert_eq!(
            f.render(&two, false).unwrap(),
            want["two_turn"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(
            f.stop_strings(),
            vec![want["stop_str"].as_str().unwrap().to_string()],
            "{name}"
        );
        assert_eq!(f.name(), name);
    }
    // deepseekcoder keeps MedicalGPT's bug: the query never appears.
    let dc = fx["deepseekcoder"]["one_turn"].as_str().unwrap();
    assert!(
        dc.contains("{content}") && !dc.contains("What is a fever?"),
        "{dc}"
    );
}

#[test]
fn named_templates_reject_misordered_messages() {
    let f = ChatFormat::Named(named_template("qwen").unwrap());
    let e = f
        .render(&[Message::assistant("A"), Message::user("Q")], false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("alternating"), "{e}");
    let e = f
        .render(&[Message::user("Q"), Message::assistant("A")], true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("final user message"), "{e}");
}

#[test]
fn sft_tokenisation_matches_medicalgpt_preprocess() {
    let cases = read("sft.json");
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let mut tok = tokenizer(case["tokenizer"].as_str().unwrap());
        if let Some(t) = case["chat_template"].as_str() {
            let src = read("jinja.json")["templates"][t]
                .as_str()
                .unwrap()
                .to_string();
            tok.set_chat_template(Some(src));
        }
        let template_name = case["template_name"].as_str();
        let stop = template_name.map(|n| named_template(n).unwrap().stop_str);
        fix_special_tokens(&mut tok, stop).unwrap();
        assert_eq!(tok.bos_token(), case["bos_token"].as_str(), "{name}");
        assert_eq!(tok.pad_token(), case["pad_token"].as_str(), "{name}");
        let format = ChatFormat::resolve(template_name, &tok).unwrap();
        let msgs = messages(&case["messages"]);

        let want_dialog: Vec<String> = case["dialog"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        let got_dialog: Vec<String> = format
            .dialog(&msgs)
            .unwrap()
            .into_iter()
            .flat_map(|(s, t)| [s, t])
            .collect();
        assert_eq!(got_dialog, want_dialog, "{name}: dialog");

        let ignore_index = if case["ignore_pad_token_for_loss"].as_bool().unwrap() {
            IGNORE_INDEX
        } else {
            tok.pad_id().unwrap() as i32
        };
        let args = SftTokenizeArgs {
            model_max_length: case["model_max_length"].as_u64().unwrap() as usize,
            train_on_inputs: case["train_on_inputs"].as_bool().unwrap(),
            ignore_index,
        };
        let conv = Conversation {
            messages: msgs,
            source: PathBuf::from(name),
            line: 1,
        };
        let out =
            tokenize_conversations(std::slice::from_ref(&conv), &format, &tok, &args).unwrap();
        if case["all_labels_ignored"].as_bool().unwrap() {
            assert_eq!(out.all_labels_ignored, 1, "{name}");
            assert!(out.samples.is_empty(), "{name}");
            continue;
        }
        assert_eq!(out.samples.len(), 1, "{name}");
        let s = &out.samples[0];
        let want_ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let want_labels: Vec<i32> = serde_json::from_value(case["labels"].clone()).unwrap();
        assert_eq!(s.input_ids, want_ids, "{name}: input_ids");
        assert_eq!(s.labels, want_labels, "{name}: labels");
        assert!(s.input_ids.len() <= args.model_max_length, "{name}");
    }
}
