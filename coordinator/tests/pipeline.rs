//! The pipeline file: a good file's argv, references, defaults and global
//! batch, and every kind of bad file reported with its file, line and key.

use rlhf_coordinator::pipeline::{Pipeline, StageKind};
use std::path::{Path, PathBuf};

fn parse(text: &str) -> anyhow::Result<Pipeline> {
    Pipeline::parse(text, Path::new("p.toml"))
}

/// The error message of a bad file (panics if it loads).
fn error(text: &str) -> String {
    match parse(text) {
        Ok(p) => panic!("expected an error, loaded {p:#?}"),
        Err(e) => {
            let m = format!("{e:#}");
            eprintln!("{m}");
            m
        }
    }
}

fn assert_has(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "{n:?} not in error message:\n{msg}");
    }
}

const GOOD: &str = r#"# a comment
[cluster]
workers = 4
heartbeat_interval_ms = 500

[[stage]]
name = "demo"
kind = "demo"
output_dir = "out/p/demo"

[[stage]]
name = "pt"
kind = "pt"
model_name_or_path = "{demo.output_dir}/model"
train_file_dir = "{demo.output_dir}/data/pt/train"
output_dir = "out/p/pt"
block_size = 64
use_peft = true
target_modules = ["q_proj", "v_proj"]
learning_rate = 2e-4
num_train_epochs = 1.5
gradient_accumulation_steps = 0x3
max_steps = -1
seed = "{demo.seed}"

[[stage]]
name = "pt2"
kind = "pt"
model_name_or_path = "{demo.output_dir}/model"
peft_path = "{pt.output_dir}"
train_file_dir = "{pt.train_file_dir}"
output_dir = "out/p/pt2"
per_device_train_batch_size = 2
learning_rate = "{pt.learning_rate}"
"#;

#[test]
fn good_file_argv_references_and_defaults() {
    let p = parse(GOOD).unwrap();
    assert_eq!(p.source, PathBuf::from("p.toml"));
    assert_eq!(p.stages.len(), 3);
    assert_eq!(p.stages[0].kind, StageKind::Demo);
    assert_eq!(p.stages[1].kind, StageKind::Pt);
    assert_eq!(p.stage_index("pt2"), Some(2));

    assert_eq!(p.cluster.workers, 4);
    assert_eq!(p.cluster.min_workers, 4, "min_workers defaults to workers");
    assert_eq!(p.cluster.heartbeat_interval_ms, 500);
    assert_eq!(p.cluster.heartbeat_timeout_ms, 10_000);
    assert_eq!(p.cluster.state_dir, PathBuf::from("out/p/.coordinator"));

    assert_eq!(p.stage_argv(0).unwrap(), ["--output_dir", "out/p/demo"]);
    let argv = p.stage_argv(1).unwrap();
    let expected = [
        "--model_name_or_path",
        "out/p/demo/model",
        "--train_file_dir",
        "out/p/demo/data/pt/train",
        "--output_dir",
        "out/p/pt",
        "--block_size",
        "64",
        "--use_peft",
        "true",
        "--target_modules",
        "q_proj,v_proj",
        "--learning_rate",
        "2e-4",
        "--num_train_epochs",
        "1.5",
        "--gradient_accumulation_steps",
        "3",
        "--max_steps",
        "-1",
        "--seed",
        "42", // the demo stage's default seed
    ];
    assert_eq!(argv, expected);
    // The argv parses as `rlhf pt` would parse it.
    use clap::{Args, Command};
    let cmd = rlhf_worker::stages::pt::PtArgs::augment_args(Command::new("pt"));
    let m = cmd
        .try_get_matches_from(std::iter::once("pt".to_string()).chain(argv))
        .unwrap();
    assert_eq!(*m.get_one::<usize>("block_size").unwrap(), 64);

    // A reference to a reference, and to a float as written.
    let argv2 = p.stage_argv(2).unwrap();
    assert!(argv2
        .windows(2)
        .any(|w| w == ["--train_file_dir", "out/p/demo/data/pt/train"]));
    assert!(argv2.windows(2).any(|w| w == ["--peft_path", "out/p/pt"]));
    assert!(argv2.windows(2).any(|w| w == ["--learning_rate", "2e-4"]));

    assert_eq!(p.output_dir(0).unwrap(), "out/p/demo");
    assert_eq!(p.output_dir(2).unwrap(), "out/p/pt2");
    // workers × per_device_train_batch_size (default 8) × gradient_accumulation_steps.
    assert_eq!(p.global_batch(1).unwrap(), 4 * 8 * 3);
    // gradient_accumulation_steps defaults to 1.
    assert_eq!(p.global_batch(2).unwrap(), 4 * 2);
    assert!(p.global_batch(0).is_err(), "a demo stage does not train");
    assert!(p.stage_argv(3).is_err());
}

#[test]
fn cluster_defaults() {
    let p = parse(
        r#"
[[stage]]
name = "d"
kind = "demo"
output_dir = "runs/a/demo"
seed = 7
"#,
    )
    .unwrap();
    assert_eq!(p.cluster.workers, 1);
    assert_eq!(p.cluster.min_workers, 1);
    assert_eq!(p.cluster.heartbeat_interval_ms, 1000);
    assert_eq!(p.cluster.heartbeat_timeout_ms, 10_000);
    assert_eq!(p.cluster.state_dir, PathBuf::from("runs/a/.coordinator"));
    assert_eq!(
        p.stage_argv(0).unwrap(),
        ["--output_dir", "runs/a/demo", "--seed", "7"]
    );
}

#[test]
fn the_example_pipeline_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pipeline.toml");
    let p = Pipeline::load(&path).unwrap();
    assert_eq!(p.cluster.workers, 2);
    assert_eq!(p.cluster.min_workers, 2);
    assert_eq!(
        p.cluster.state_dir,
        PathBuf::from("out/pipeline/.coordinator")
    );
    let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["demo", "pt", "sft", "sft_merged", "rm", "ppo"]);
    let kinds: Vec<StageKind> = p.stages.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        [
            StageKind::Demo,
            StageKind::Pt,
            StageKind::Sft,
            StageKind::Merge,
            StageKind::Rm,
            StageKind::Ppo
        ]
    );
    // PPO's rollouts per iteration: batch_size per planned worker.
    assert_eq!(p.global_batch(5).unwrap(), 2 * 8);
    let ppo = p.stage_argv(5).unwrap();
    assert!(ppo
        .windows(2)
        .any(|w| w == ["--reward_model_name_or_path", "out/pipeline/rm"]));
    let argv = p.stage_argv(1).unwrap();
    assert!(argv
        .windows(2)
        .any(|w| w == ["--model_name_or_path", "out/pipeline/demo/base-model"]));
    assert!(argv
        .windows(2)
        .any(|w| w == ["--train_file_dir", "out/pipeline/demo/data/train"]));
    assert_eq!(p.output_dir(1).unwrap(), "out/pipeline/pt");
    // The same global batch as the single-process `rlhf demo` (8).
    assert_eq!(p.global_batch(1).unwrap(), 8);
    // SFT starts from the PT output, RM from the merged SFT model; both read
    // the demo's QA data.
    for (i, data, base, batch) in [
        (2, "sft", "out/pipeline/pt", 8),
        (4, "reward", "out/pipeline/sft-merged", 16),
    ] {
        let argv = p.stage_argv(i).unwrap();
        assert!(argv.windows(2).any(|w| w == ["--model_name_or_path", base]));
        let train = format!("out/pipeline/demo/data/{data}/train");
        assert!(argv
            .windows(2)
            .any(|w| w[0] == "--train_file_dir" && w[1] == train));
        assert_eq!(p.global_batch(i).unwrap(), batch);
    }
    assert!(p
        .stage_argv(2)
        .unwrap()
        .windows(2)
        .any(|w| w == ["--eval_qa_file", "out/pipeline/demo/data/heldout_qa.jsonl"]));
}

#[test]
fn unknown_stage_key_names_key_line_and_suggestion() {
    let msg = error(
        r#"[[stage]]
name = "d"
kind = "demo"
output_dir = "o/d"

[[stage]]
name = "pt"
kind = "pt"
model_name_or_path = "m"
train_file_dir = "t"
output_dir = "o/pt"
learning_rat = 1e-3
"#,
    );
    assert_has(
        &msg,
        &[
            "p.toml:12:",
            "unknown key 'learning_rat'",
            "stage 'pt'",
            "did you mean 'learning_rate'?",
        ],
    );
}

#[test]
fn unknown_demo_key() {
    let msg =
        error("[[stage]]\nname = \"d\"\nkind = \"demo\"\noutput_dir = \"o\"\nblock_size = 3\n");
    assert_has(
        &msg,
        &["p.toml:5:", "unknown key 'block_size'", "stage 'd'"],
    );
}

#[test]
fn unknown_top_level_and_cluster_keys() {
    let stage = "\n[[stage]]\nname = \"d\"\nkind = \"demo\"\noutput_dir = \"o\"\n";
    let msg = error(&format!("title = \"x\"\n{stage}"));
    assert_has(&msg, &["p.toml:1:", "unknown key 'title'"]);
    let msg = error(&format!("[stages]\nx = 1\n{stage}"));
    assert_has(
        &msg,
        &["p.toml:1:", "unknown key 'stages'", "did you mean 'stage'?"],
    );
    let msg = error(&format!("[cluster]\nworkers = 2\nworkrs = 3\n{stage}"));
    assert_has(
        &msg,
        &[
            "p.toml:3:",
            "unknown key 'workrs' in [cluster]",
            "did you mean 'workers'?",
        ],
    );
}

#[test]
fn bad_cluster_values() {
    let stage = "\n[[stage]]\nname = \"d\"\nkind = \"demo\"\noutput_dir = \"o\"\n";
    let msg = error(&format!("[cluster]\nworkers = 0\n{stage}"));
    assert_has(&msg, &["p.toml:2:", "workers", "positive integer"]);
    let msg = error(&format!("[cluster]\n\nworkers = \"two\"\n{stage}"));
    assert_has(&msg, &["p.toml:3:", "workers", "positive integer"]);
    let msg = error(&format!("[cluster]\nworkers = 2\nmin_workers = 3\n{stage}"));
    assert_has(
        &msg,
        &["p.toml:3:", "min_workers (3) is more than workers (2)"],
    );
    let msg = error(&format!(
        "[cluster]\nheartbeat_interval_ms = 5000\nheartbeat_timeout_ms = 2000\n{stage}"
    ));
    assert_has(&msg, &["p.toml:3:", "heartbeat_timeout_ms"]);
}

#[test]
fn bad_value_names_stage_key_and_line() {
    let msg = error(
        r#"[[stage]]
name = "pt"
kind = "pt"
model_name_or_path = "m"
train_file_dir = "t"
output_dir = "o"
block_size = "big"
"#,
    );
    assert_has(&msg, &["p.toml:7:", "block_size", "stage 'pt'", "big"]);
    let msg = error(
        "[[stage]]\nname = \"pt\"\nkind = \"pt\"\nmodel_name_or_path = \"m\"\ntrain_file_dir = \"t\"\noutput_dir = \"o\"\nuse_peft = \"maybe\"\n",
    );
    assert_has(&msg, &["p.toml:7:", "use_peft", "maybe"]);
    // An array for a flag that takes one value.
    let msg = error(
        "[[stage]]\nname = \"pt\"\nkind = \"pt\"\nmodel_name_or_path = \"m\"\ntrain_file_dir = \"t\"\noutput_dir = [\"a\", \"b\"]\n",
    );
    assert_has(&msg, &["p.toml:6:", "output_dir", "not an array"]);
    // A nested table.
    let msg = error(
        "[[stage]]\nname = \"pt\"\nkind = \"pt\"\nmodel_name_or_path = \"m\"\ntrain_file_dir = \"t\"\noutput_dir = \"o\"\nseed = { a = 1 }\n",
    );
    assert_has(&msg, &["p.toml:7:", "seed"]);
}

#[test]
fn missing_required_argument() {
    let msg = error(
        "\n[[stage]]\nname = \"pt\"\nkind = \"pt\"\ntrain_file_dir = \"t\"\noutput_dir = \"o\"\n",
    );
    assert_has(&msg, &["p.toml:3:", "stage 'pt'", "model_name_or_path"]);
    let msg = error("[[stage]]\nname = \"d\"\nkind = \"demo\"\n");
    assert_has(&msg, &["p.toml:2:", "output_dir"]);
}

#[test]
fn missing_name_or_kind_and_unknown_kind() {
    let msg = error("[[stage]]\nkind = \"demo\"\noutput_dir = \"o\"\n");
    assert_has(&msg, &["p.toml:", "without a name"]);
    let line = msg.split(':').nth(1).unwrap();
    assert!(line == "1" || line == "2", "{msg}");
    let msg = error("[[stage]]\nname = \"a\"\noutput_dir = \"o\"\n");
    assert_has(&msg, &["p.toml:2:", "stage 'a' has no kind"]);
    let msg = error("[[stage]]\nname = \"a\"\nkind = \"ptt\"\noutput_dir = \"o\"\n");
    assert_has(
        &msg,
        &["p.toml:3:", "unknown kind 'ptt'", "did you mean 'pt'?"],
    );
    let msg = error("[[stage]]\nname = 3\nkind = \"demo\"\noutput_dir = \"o\"\n");
    assert_has(&msg, &["p.toml:2:", "name must be a string"]);
}

#[test]
fn duplicate_stage_names_and_output_dirs() {
    let msg = error(
        "[[stage]]\nname = \"d\"\nkind = \"demo\"\noutput_dir = \"o1\"\n\n[[stage]]\nname = \"d\"\nkind = \"demo\"\noutput_dir = \"o2\"\n",
    );
    assert_has(&msg, &["p.toml:7:", "duplicate stage name 'd'", "line 2"]);
    let msg = error(
        "[[stage]]\nname = \"a\"\nkind = \"demo\"\noutput_dir = \"o\"\n\n[[stage]]\nname = \"b\"\nkind = \"demo\"\noutput_dir = \"o\"\n",
    );
    assert_has(&msg, &["p.toml:7:", "same output_dir", "'a'"]);
}

#[test]
fn references_to_missing_or_later_stages() {
    let later = r#"[[stage]]
name = "pt"
kind = "pt"
model_name_or_path = "{demo.output_dir}/model"
train_file_dir = "t"
output_dir = "o/pt"

[[stage]]
name = "demo"
kind = "demo"
output_dir = "o/demo"
"#;
    let msg = error(later);
    assert_has(
        &msg,
        &[
            "p.toml:4:",
            "model_name_or_path",
            "{demo.output_dir}",
            "no earlier stage 'demo'",
        ],
    );
    let missing = r#"[[stage]]
name = "demo"
kind = "demo"
output_dir = "o/demo"

[[stage]]
name = "pt"
kind = "pt"
model_name_or_path = "{dmo.output_dir}/model"
train_file_dir = "t"
output_dir = "o/pt"
"#;
    let msg = error(missing);
    assert_has(
        &msg,
        &[
            "p.toml:9:",
            "no earlier stage 'dmo'",
            "did you mean 'demo'?",
        ],
    );
    let no_key = r#"[[stage]]
name = "demo"
kind = "demo"
output_dir = "o/demo"

[[stage]]
name = "pt"
kind = "pt"
model_name_or_path = "{demo.model}"
train_file_dir = "t"
output_dir = "o/pt"
"#;
    let msg = error(no_key);
    assert_has(&msg, &["p.toml:9:", "stage 'demo' (line 2) has no 'model'"]);
    // A brace that is not a reference stays as written.
    let literal = "[[stage]]\nname = \"d\"\nkind = \"demo\"\noutput_dir = \"o/{x}/{y\"\n";
    assert_eq!(parse(literal).unwrap().output_dir(0).unwrap(), "o/{x}/{y");
}

#[test]
fn toml_syntax_errors_keep_the_parsers_message() {
    let msg = error("[cluster]\nworkers = 2\n\n[[stage]\nname = \"d\"\n");
    assert_has(&msg, &["p.toml:4:", "TOML parse error at line 4"]);
    let msg = error("[cluster]\nworkers = 2\nworkers = 3\n");
    assert_has(&msg, &["p.toml:3:", "duplicate key"]);
}

#[test]
fn no_stages_and_missing_file() {
    assert_has(
        &error("[cluster]\nworkers = 1\n"),
        &["p.toml", "no [[stage]]"],
    );
    let e = Pipeline::load(Path::new("/no/such/pipeline.toml")).unwrap_err();
    assert_has(&format!("{e:#}"), &["/no/such/pipeline.toml"]);
}

#[test]
fn device_key_selects_cuda_and_bad_devices_are_named() {
    let p = parse(
        "[[stage]]\nname = \"pt\"\nkind = \"pt\"\nmodel_name_or_path = \"m\"\ntrain_file_dir = \"t\"\noutput_dir = \"o\"\ndevice = \"cuda:1\"\nbf16 = true\n",
    )
    .unwrap();
    let argv = p.stage_argv(0).unwrap();
    let at = argv
        .iter()
        .position(|a| a == "--device")
        .expect("--device passed on");
    assert_eq!(argv[at + 1], "cuda:1");
    assert!(argv.iter().any(|a| a == "--bf16"), "{argv:?}");
    let msg = error(
        "[[stage]]\nname = \"pt\"\nkind = \"pt\"\nmodel_name_or_path = \"m\"\ntrain_file_dir = \"t\"\noutput_dir = \"o\"\ndevice = \"tpu\"\n",
    );
    assert_has(&msg, &["p.toml:7:", "device", "tpu", "cpu, cuda or cuda:N"]);
}

#[test]
fn a_dpo_stage_takes_medicalgpt_dpo_defaults_for_its_global_batch() {
    let p = parse(
        r#"[cluster]
workers = 2

[[stage]]
name = "dpo"
kind = "dpo"
model_name_or_path = "m"
train_file_dir = "pairs"
output_dir = "out/dpo"
beta = 0.2
"#,
    )
    .unwrap();
    assert_eq!(p.stages[0].kind, StageKind::Dpo);
    // workers × per_device_train_batch_size 4 × gradient_accumulation_steps 4.
    assert_eq!(p.global_batch(0).unwrap(), 2 * 4 * 4);
    let msg =
        error("[[stage]]\nname = \"dpo\"\nkind = \"dpo\"\noutput_dir = \"o\"\nbeta_typo = 1\n");
    assert_has(&msg, &["beta_typo"]);
}

#[test]
fn a_grpo_stage_parses_and_its_global_batch_counts_completions() {
    let p = parse(
        r#"[cluster]
workers = 2

[[stage]]
name = "grpo"
kind = "grpo"
model_name_or_path = "m"
train_file_dir = "d"
output_dir = "out/grpo"
num_generations = 4
per_device_train_batch_size = 4
gradient_accumulation_steps = 2
reward_funcs = ["accuracy"]
beta = 0.001
"#,
    )
    .unwrap();
    assert_eq!(p.stages[0].kind, StageKind::Grpo);
    // 2 workers × 4 completions × 2 accumulation steps: 16 completions, 4 prompts.
    assert_eq!(p.global_batch(0).unwrap(), 16);
    assert_has(
        &error(
            "[[stage]]\nname = \"g\"\nkind = \"grpo\"\nmodel_name_or_path = \"m\"\ntrain_file_dir = \"d\"\noutput_dir = \"o\"\nloss_type = \"ppo\"\n",
        ),
        &["p.toml:7", "loss_type"],
    );
}

#[test]
fn a_ppo_split_counts_only_trainers_in_its_batch_and_must_leave_one() {
    let text = |workers: usize, rollout: usize| {
        format!(
            "[cluster]\nworkers = {workers}\n\n[[stage]]\nname = \"ppo\"\nkind = \"ppo\"\nmodel_name_or_path = \"m\"\nreward_model_name_or_path = \"rm\"\ntrain_file_dir = \"d\"\noutput_dir = \"o\"\nbatch_size = 4\nrollout_workers = {rollout}\n"
        )
    };
    let p = Pipeline::parse(&text(3, 1), Path::new("split.toml")).unwrap();
    assert_eq!(p.global_batch(0).unwrap(), 2 * 4, "two trainers' shares");
    let e = Pipeline::parse(&text(2, 2), Path::new("split.toml")).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("split.toml") && msg.contains("rollout_workers = 2 leaves no trainer"),
        "{msg}"
    );
}
