//! `rlhf launch`: start workers on the hosts of a DeepSpeed-style hostfile
//! over ssh, as `deepspeed --hostfile` / `torchrun` users expect.
//!
//! For each line `hostname slots=N` it runs, N times,
//! `ssh <hostname> '<rlhf> worker --coordinator URL [--token-file F] [--root DIR] [extra...]'`,
//! streams each worker's output prefixed with `hostname[i]: `, and exits
//! non-zero if any worker fails. Ctrl-C (SIGINT) or SIGTERM stops them all.
//!
//! Paths (the token file, the root) are made absolute against the launch
//! directory, since a remote command starts in the user's home directory: the
//! hosts are expected to share a filesystem with the launching machine.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Args, Clone, Debug)]
pub struct LaunchArgs {
    /// DeepSpeed-style hostfile: `hostname slots=N` per line, `#` comments.
    #[arg(long = "hostfile")]
    pub hostfile: PathBuf,
    /// The coordinator's URL, as the workers reach it (http://head:50051).
    #[arg(long = "coordinator")]
    pub coordinator: String,
    /// The shared-secret token file, passed to every worker (same path on every host).
    #[arg(long = "token-file")]
    pub token_file: Option<PathBuf>,
    /// The ssh command, split on whitespace (e.g. "ssh -p 2222").
    #[arg(long = "ssh", default_value = "ssh")]
    pub ssh: String,
    /// The rlhf binary on the hosts (default: this binary's path).
    #[arg(long = "rlhf")]
    pub rlhf: Option<String>,
    /// The workers' root directory (passed as `rlhf worker --root`).
    #[arg(long = "root")]
    pub root: Option<PathBuf>,
    /// Extra `rlhf worker` arguments (after `--`).
    #[arg(last = true)]
    pub extra: Vec<String>,
}

/// One hostfile line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub slots: usize,
    /// 1-based line in the hostfile.
    pub line: usize,
}

/// Parse a DeepSpeed hostfile: `hostname slots=N` (slots defaults to 1 when
/// absent), `#` comments, blank lines. Errors name `file:line`.
pub fn parse_hostfile(text: &str, file: &str) -> Result<Vec<Host>> {
    let mut hosts: Vec<Host> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.split('#').next().unwrap_or_default().trim();
        if content.is_empty() {
            continue;
        }
        let mut words = content.split_whitespace();
        let name = words.next().unwrap_or_default();
        if name.contains('=') {
            bail!("{file}:{line}: expected `hostname slots=N`, found {content:?}");
        }
        let mut slots = None;
        for w in words {
            let Some(v) = w.strip_prefix("slots=") else {
                bail!("{file}:{line}: unexpected {w:?} (expected `hostname slots=N`)");
            };
            if slots.is_some() {
                bail!("{file}:{line}: slots given twice");
            }
            match v.parse::<usize>() {
                Ok(n) if n > 0 => slots = Some(n),
                _ => bail!("{file}:{line}: slots must be a positive integer, found {v:?}"),
            }
        }
        if let Some(prev) = hosts.iter().find(|h| h.name == name) {
            bail!(
                "{file}:{line}: host '{name}' is listed twice (first on line {})",
                prev.line
            );
        }
        hosts.push(Host {
            name: name.to_string(),
            slots: slots.unwrap_or(1),
            line,
        });
    }
    if hosts.is_empty() {
        bail!("{file}: no hosts in the hostfile");
    }
    Ok(hosts)
}

/// Quote a word for the remote shell (left bare when it is safe).
pub fn shell_quote(w: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-./:=@,+%".contains(c);
    if !w.is_empty() && w.chars().all(safe) {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()
            .context("cannot read the working directory")?
            .join(p))
    }
}

/// The remote command line every worker runs.
pub fn worker_command(args: &LaunchArgs) -> Result<Vec<String>> {
    let rlhf = match &args.rlhf {
        Some(r) => r.clone(),
        None => std::env::current_exe()
            .context("cannot find this binary's path (pass --rlhf)")?
            .to_string_lossy()
            .into_owned(),
    };
    let mut cmd = vec![
        rlhf,
        "worker".into(),
        "--coordinator".into(),
        args.coordinator.clone(),
    ];
    if let Some(t) = &args.token_file {
        cmd.push("--token-file".into());
        cmd.push(absolute(t)?.to_string_lossy().into_owned());
    }
    if let Some(r) = &args.root {
        cmd.push("--root".into());
        cmd.push(absolute(r)?.to_string_lossy().into_owned());
    }
    cmd.extend(args.extra.iter().cloned());
    Ok(cmd)
}

static STOP: AtomicBool = AtomicBool::new(false);

/// Ctrl-C and SIGTERM set STOP instead of ending this process, so that
/// the ssh children are stopped first (tokio's signal handling, on a thread).
fn watch_signals() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            #[cfg(unix)]
            let term = async {
                use tokio::signal::unix::{signal, SignalKind};
                match signal(SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let term = std::future::pending::<()>();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term => {}
            }
            STOP.store(true, Ordering::SeqCst);
        })
    });
    Ok(())
}

struct Worker {
    label: String,
    child: Child,
    status: Option<ExitStatus>,
}

/// Copy `r` line by line to stdout or stderr, each line prefixed.
fn pump(r: impl std::io::Read + Send + 'static, prefix: String, to_stderr: bool) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf);
                    let line = text.trim_end_matches(['\n', '\r']);
                    // Ignore a closed stdout/stderr: the workers keep running.
                    let _ = if to_stderr {
                        writeln!(std::io::stderr().lock(), "{prefix}{line}")
                    } else {
                        writeln!(std::io::stdout().lock(), "{prefix}{line}")
                    };
                }
            }
        }
    });
}

pub fn run(args: &LaunchArgs) -> Result<()> {
    let file = args.hostfile.display().to_string();
    let text = std::fs::read_to_string(&args.hostfile)
        .with_context(|| format!("cannot read hostfile {file}"))?;
    let hosts = parse_hostfile(&text, &file)?;
    let mut ssh = args.ssh.split_whitespace().map(str::to_string);
    let Some(ssh_prog) = ssh.next() else {
        bail!("--ssh is empty");
    };
    let ssh_opts: Vec<String> = ssh.collect();
    let remote = worker_command(args)?
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ");

    watch_signals()?;
    let mut workers: Vec<Worker> = Vec::new();
    for h in &hosts {
        for i in 0..h.slots {
            let label = format!("{}[{i}]", h.name);
            let spawned = Command::new(&ssh_prog)
                .args(&ssh_opts)
                .arg(&h.name)
                .arg(&remote)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn();
            let mut child = match spawned {
                Ok(c) => c,
                Err(e) => {
                    stop_all(&mut workers);
                    return Err(e).with_context(|| format!("cannot run {ssh_prog:?} for {label}"));
                }
            };
            let shown: Vec<&str> = std::iter::once(ssh_prog.as_str())
                .chain(ssh_opts.iter().map(String::as_str))
                .chain([h.name.as_str(), remote.as_str()])
                .collect();
            eprintln!("launch: {label}: {}", shown.join(" "));
            if let Some(o) = child.stdout.take() {
                pump(o, format!("{label}: "), false);
            }
            if let Some(e) = child.stderr.take() {
                pump(e, format!("{label}: "), true);
            }
            workers.push(Worker {
                label,
                child,
                status: None,
            });
        }
    }

    loop {
        if STOP.load(Ordering::SeqCst) {
            eprintln!("launch: interrupted, stopping {} workers", workers.len());
            stop_all(&mut workers);
            bail!("interrupted");
        }
        let mut running = 0;
        for w in &mut workers {
            if w.status.is_none() {
                match w.child.try_wait() {
                    Ok(Some(s)) => {
                        if !s.success() {
                            eprintln!("launch: {} exited with {s}", w.label);
                        }
                        w.status = Some(s);
                    }
                    Ok(None) => running += 1,
                    Err(e) => {
                        eprintln!("launch: cannot wait for {}: {e}", w.label);
                        running += 1;
                    }
                }
            }
        }
        if running == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let the output threads drain what the workers printed last.
    std::thread::sleep(Duration::from_millis(50));
    let failed: Vec<String> = workers
        .iter()
        .filter(|w| !w.status.is_some_and(|s| s.success()))
        .map(|w| {
            format!(
                "{} ({})",
                w.label,
                w.status.map(|s| s.to_string()).unwrap_or_default()
            )
        })
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} workers failed: {}",
            failed.len(),
            workers.len(),
            failed.join(", ")
        );
    }
    eprintln!("launch: all {} workers finished", workers.len());
    Ok(())
}

/// Stop every running worker (its ssh: the remote worker sees its
/// connection close) and reap them.
fn stop_all(workers: &mut [Worker]) {
    for w in workers.iter_mut().filter(|w| w.status.is_none()) {
        let _ = w.child.kill();
        w.status = w.child.wait().ok();
    }
}
