//! `rlhf chat`: multi-turn chat through the chat template, replies streamed.

use crate::{rlhf, setup};
use rlhf_tests::*;

#[test]
fn chat_keeps_history_until_cleared_and_writes_a_sharegpt_transcript() {
    let s = setup();
    let transcript = s.ws.path("chat.jsonl");
    let chat = || {
        rlhf()
            .cmd("chat")
            .opt("--model_name_or_path", &s.model)
            .opt("--max_new_tokens", "6")
            .opt("--transcript", &transcript)
    };
    let r = chat()
        .ok_with_stdin("the patient\nthe doctor said\nclear\nthe patient\nexit\nnever read\n");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{r}");
    assert_eq!(lines[2], "(conversation cleared)", "{r}");
    // Greedy: the same question in a fresh conversation gets the same reply.
    assert_eq!(lines[0], lines[3], "{r}");
    let t = read_jsonl(&transcript);
    assert_eq!(t.len(), 1);
    let turns = t[0]["conversations"].as_array().unwrap();
    assert_eq!(turns.len(), 2, "only the turns after `clear`: {t:?}");
    assert_eq!(turns[0]["from"], "human");
    assert_eq!(turns[0]["value"], "the patient");
    assert_eq!(turns[1]["from"], "gpt");
    assert_eq!(turns[1]["value"], lines[3].trim());

    // A system prompt is the first turn of the transcript.
    let r = chat()
        .opt("--system_prompt", "Be brief.")
        .ok_with_stdin("the patient\n");
    assert_eq!(r.stdout.lines().count(), 1, "{r}");
    let turns = read_jsonl(&transcript)[0]["conversations"].clone();
    assert_eq!(turns[0]["from"], "system");
    assert_eq!(turns[0]["value"], "Be brief.");
    assert_eq!(turns.as_array().unwrap().len(), 3);
}

#[test]
fn chat_with_an_unknown_template_names_the_known_ones() {
    let s = setup();
    rlhf()
        .cmd("chat")
        .opt("--model_name_or_path", &s.model)
        .opt("--template_name", "nonesuch")
        .run_with_stdin("hello\n")
        .assert_failed_with(&["nonesuch", "vicuna", "qwen"]);
}

#[test]
fn a_first_chat_turn_replies_what_generate_gives_for_the_templated_prompt() {
    let s = setup();
    let prompts = s.ws.write("prompts.txt", "the patient\n");
    let out = s.ws.path("gen.jsonl");
    rlhf()
        .cmd("generate")
        .opt("--model_name_or_path", &s.model)
        .opt("--prompts_file", &prompts)
        .opt("--output_file", &out)
        .opt("--template_name", "chat_template")
        .opt("--max_new_tokens", "7")
        .ok();
    let generated = read_jsonl(&out)[0]["completion"]
        .as_str()
        .unwrap()
        .to_string();
    let r = rlhf()
        .cmd("chat")
        .opt("--model_name_or_path", &s.model)
        .opt("--max_new_tokens", "7")
        .ok_with_stdin("the patient\n");
    assert_eq!(r.stdout.lines().next().unwrap_or(""), generated, "{r}");
    // A system prompt only makes sense inside a chat template.
    let raw = s.ws.path("raw.jsonl");
    rlhf()
        .cmd("generate")
        .opt("--model_name_or_path", &s.model)
        .opt("--prompts_file", &prompts)
        .opt("--output_file", &raw)
        .opt("--system_prompt", "x")
        .fails()
        .assert_stderr_has(&["--system_prompt needs --template_name"]);
}
