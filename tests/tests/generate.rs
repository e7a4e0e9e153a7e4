//! `rlhf generate`: completions for a prompts file as JSON lines.

use crate::{rlhf, setup};
use rlhf_tests::*;

#[test]
fn generate_writes_one_json_line_per_prompt_in_order() {
    let s = setup();
    let prompts = s.ws.write(
        "prompts.jsonl",
        "{\"prompt\": \"the patient\"}\n\n{\"prompt\": \"a long prompt about the doctor and the clinic\"}\n{\"prompt\": \"x\"}\n",
    );
    let out = s.ws.path("out/completions.jsonl");
    let r = rlhf()
        .cmd("generate")
        .opt("--model_name_or_path", &s.model)
        .opt("--prompts_file", &prompts)
        .opt("--output_file", &out)
        .opt("--max_new_tokens", "5")
        .opt("--batch_size", "2")
        .ok();
    let summary = r.json();
    let lines = read_jsonl(&out);
    assert_eq!(lines.len(), 3, "{lines:?}");
    let want_prompts = [
        "the patient",
        "a long prompt about the doctor and the clinic",
        "x",
    ];
    let mut total = 0.0;
    for (line, want) in lines.iter().zip(want_prompts) {
        assert_eq!(line["prompt"], want);
        assert!(line["completion"].is_string(), "{line}");
        let tokens = num(line, "tokens");
        assert!((1.0..=5.0).contains(&tokens), "{line}");
        let reason = line["finish_reason"].as_str().unwrap();
        assert!(["eos", "stop", "length"].contains(&reason), "{line}");
        if reason == "length" {
            assert_eq!(tokens, 5.0, "{line}");
        }
        total += tokens;
    }
    assert_eq!(num(&summary, "prompts"), 3.0);
    assert_eq!(num(&summary, "generated_tokens"), total);
    assert!(num(&summary, "decode_tokens_per_sec") > 0.0, "{summary}");
    assert!(num(&summary, "prefill_tokens_per_sec") > 0.0, "{summary}");

    // Greedy decoding does not depend on the batch a prompt lands in (left
    // padding is masked): batch size 1 gives the same lines.
    let out1 = s.ws.path("out/one.jsonl");
    rlhf()
        .cmd("generate")
        .opt("--model_name_or_path", &s.model)
        .opt("--prompts_file", &prompts)
        .opt("--output_file", &out1)
        .opt("--max_new_tokens", "5")
        .opt("--batch_size", "1")
        .ok();
    assert_eq!(read_jsonl(&out1), lines);
}

#[test]
fn sampled_generation_is_reproducible_with_a_seed() {
    let s = setup();
    let prompts = s.ws.write("prompts.txt", "the patient\nthe doctor said\n");
    let run = |seed: &str, name: &str| {
        let out = s.ws.path(name);
        rlhf()
            .cmd("generate")
            .opt("--model_name_or_path", &s.model)
            .opt("--prompts_file", &prompts)
            .opt("--output_file", &out)
            .opt("--max_new_tokens", "8")
            .flag("--do_sample")
            .opt("--temperature", "1.5")
            .opt("--top_k", "0")
            .opt("--seed", seed)
            .ok();
        read_jsonl(&out)
    };
    let a = run("3", "a.jsonl");
    assert_eq!(a.len(), 2);
    assert_eq!(run("3", "b.jsonl"), a);
    assert_ne!(run("4", "c.jsonl"), a);
}

#[test]
fn bad_prompts_files_are_errors_naming_file_and_line() {
    let s = setup();
    let out = s.ws.path("out.jsonl");
    let gen = |prompts: &std::path::Path| {
        rlhf()
            .cmd("generate")
            .opt("--model_name_or_path", &s.model)
            .opt("--prompts_file", prompts)
            .opt("--output_file", &out)
            .opt("--max_new_tokens", "2")
            .fails()
    };
    let p = s.ws.write(
        "bad.jsonl",
        "{\"prompt\": \"ok\"}\n{\"text\": \"no prompt\"}\n",
    );
    gen(&p).assert_stderr_has(&["bad.jsonl:2", "\"prompt\""]);
    let p = s.ws.write(
        "notjson.jsonl",
        "{\"prompt\": \"ok\"}\n{\"prompt\": \"a\",\n",
    );
    gen(&p).assert_stderr_has(&["notjson.jsonl:2", "JSON"]);
    let p = s.ws.write("num.jsonl", "{\"prompt\": 7}\n");
    gen(&p).assert_stderr_has(&["num.jsonl:1", "must be a string"]);
    let p = s.ws.write(
        "empty.jsonl",
        "{\"prompt\": \"ok\"}\n{\"prompt\": \"  \"}\n",
    );
    gen(&p).assert_stderr_has(&["empty.jsonl:2", "empty"]);
    let p = s.ws.write("blank.txt", "first\n\nthird\n");
    gen(&p).assert_stderr_has(&["blank.txt:2", "empty"]);
    gen(&s.ws.path("missing.txt")).assert_stderr_has(&["missing.txt"]);
    assert!(!out.exists(), "nothing is written on error");
}
