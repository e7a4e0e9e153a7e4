//! `rlhf launch`: the ssh commands it runs for a hostfile (through a fake
//! ssh that records its arguments), output prefixes, failures and bad
//! hostfiles.

use crate::rlhf;
use rlhf_tests::*;
use std::path::{Path, PathBuf};

/// A fake ssh (run as `sh fake-ssh -p 2222 HOST COMMAND`): writes its
/// arguments, one per line, to a new file in `calls/`, prints a line on
/// stdout and one on stderr, and fails for hosts named `bad*`.
fn fake_ssh(ws: &Workspace) -> (String, PathBuf) {
    let calls = ws.mkdir("calls");
    let script = ws.write(
        "fake-ssh",
        format!(
            r#"out=$(mktemp "{}/call.XXXXXX")
printf '%s\n' "$@" > "$out"
echo "hello from $3"
echo "log line from $3" >&2
case "$3" in bad*) exit 3;; esac
exit 0
"#,
            calls.display()
        ),
    );
    (format!("sh {} -p 2222", script.display()), calls)
}

/// Every recorded ssh call: its argument lines.
fn recorded(calls: &Path) -> Vec<Vec<String>> {
    let mut v: Vec<Vec<String>> = std::fs::read_dir(calls)
        .unwrap()
        .map(|e| {
            std::fs::read_to_string(e.unwrap().path())
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect()
        })
        .collect();
    v.sort();
    v
}

fn launch(hostfile: &Path, ssh: &str) -> Cmd {
    rlhf()
        .cmd("launch")
        .opt("--hostfile", hostfile)
        .opt("--coordinator", "http://head:50051")
        .opt("--ssh", ssh)
        .opt("--rlhf", "/opt/rlhf/bin/rlhf")
}

#[test]
fn launch_runs_one_ssh_per_slot() {
    let ws = Workspace::new();
    let (ssh, calls) = fake_ssh(&ws);
    let hostfile = ws.write(
        "hostfile",
        "# two hosts\n\nnode1 slots=2\nnode2 slots=1   # one GPU\n",
    );
    let token = ws.write("token", "secret\n");
    let root = ws.mkdir("shared");
    let r = launch(&hostfile, &ssh)
        .opt("--token-file", &token)
        .opt("--root", &root)
        .flag("--")
        .opt("--listen", "0.0.0.0:0")
        .ok();
    let remote = format!(
        "/opt/rlhf/bin/rlhf worker --coordinator http://head:50051 --token-file {} --root {} --listen 0.0.0.0:0",
        token.display(),
        root.display()
    );
    let call = |host: &str| -> Vec<String> {
        vec!["-p".into(), "2222".into(), host.into(), remote.clone()]
    };
    assert_eq!(
        recorded(&calls),
        vec![call("node1"), call("node1"), call("node2")],
        "{r}"
    );
    // Each worker's output, prefixed with its host and slot.
    for p in [
        "node1[0]: hello from node1",
        "node1[1]: hello from node1",
        "node2[0]: hello from node2",
    ] {
        assert!(r.stdout.contains(p), "stdout lacks {p:?}\n{r}");
    }
    r.assert_stderr_has(&["node2[0]: log line from node2"]);
}

#[test]
fn launch_fails_when_a_worker_fails() {
    let ws = Workspace::new();
    let (ssh, calls) = fake_ssh(&ws);
    let hostfile = ws.write("hostfile", "good slots=1\nbadhost slots=1\n");
    let r = launch(&hostfile, &ssh).fails();
    r.assert_stderr_has(&["badhost[0]", "1 of 2 workers failed"]);
    assert_eq!(
        recorded(&calls).len(),
        2,
        "the other worker still runs\n{r}"
    );
}

#[test]
fn bad_hostfile_line_is_named() {
    let ws = Workspace::new();
    let (ssh, calls) = fake_ssh(&ws);
    let hostfile = ws.write("hostfile", "# hosts\nnode1 slots=2\nnode2 slots=two\n");
    let r = launch(&hostfile, &ssh).fails();
    r.assert_stderr_has(&["hostfile:3", "slots", "two"]);
    let hostfile = ws.write("hostfile2", "node1 slots=1\nnode2 gpus=4\n");
    let r = launch(&hostfile, &ssh).fails();
    r.assert_stderr_has(&["hostfile2:2", "gpus=4"]);
    let hostfile = ws.write("hostfile3", "node1 slots=1\n\nnode1 slots=1\n");
    let r = launch(&hostfile, &ssh).fails();
    r.assert_stderr_has(&["hostfile3:3", "listed twice", "line 1"]);
    let hostfile = ws.write("hostfile4", "# nothing\n\n");
    launch(&hostfile, &ssh)
        .fails()
        .assert_stderr_has(&["no hosts"]);
    assert!(recorded(&calls).is_empty(), "no ssh for a bad hostfile");
}
