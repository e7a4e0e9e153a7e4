//! Paths the coordinator sends resolve under the worker's root: a coordinator
//! (or whoever holds the token) cannot make a worker read or write elsewhere.

use anyhow::{bail, Result};
use std::path::{Component, Path, PathBuf};

/// `root`/`p` for a relative `p`, or `p` itself when it is absolute and inside
/// `root`. Refuses `..`, and absolute paths outside the root. `root` must be
/// absolute and normalised (canonicalize it once at start-up).
pub fn resolve_under(root: &Path, p: &str) -> Result<PathBuf> {
    let path = Path::new(p);
    if p.is_empty() {
        bail!("empty path");
    }
    for c in path.components() {
        match c {
            Component::ParentDir => bail!(
                "path {p:?} has '..': paths must stay under the worker root {}",
                root.display()
            ),
            Component::Prefix(_) => bail!("path {p:?} has a drive prefix"),
            _ => {}
        }
    }
    if path.is_absolute() {
        if !path.starts_with(root) {
            bail!(
                "path {p:?} is outside the worker root {} (start the worker with --root covering it)",
                root.display()
            );
        }
        return Ok(path.to_path_buf());
    }
    Ok(root.join(path))
}

/// Rewrite the values of `path_flags` in `argv` (`--flag value` or
/// `--flag=value`) to paths under `root`.
pub fn resolve_args(root: &Path, argv: &[String], path_flags: &[&str]) -> Result<Vec<String>> {
    let mut out = Vec::with_capacity(argv.len());
    let mut i = 0;
    while i < argv.len() {
        let a = &argv[i];
        let flag = a.trim_start_matches("--");
        if let Some((name, value)) = flag.split_once('=') {
            if a.starts_with("--") && path_flags.contains(&name) {
                let r = resolve(root, name, value)?;
                out.push(format!("--{name}={r}"));
                i += 1;
                continue;
            }
        }
        out.push(a.clone());
        if a.starts_with("--") && path_flags.contains(&flag) {
            if let Some(v) = argv.get(i + 1) {
                out.push(resolve(root, flag, v)?);
                i += 1;
            }
        }
        i += 1;
    }
    Ok(out)
}

fn resolve(root: &Path, flag: &str, value: &str) -> Result<String> {
    let p = resolve_under(root, value).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))?;
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("--{flag}: path is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_join_the_root_and_escapes_are_refused() {
        let root = Path::new("/srv/rlhf");
        assert_eq!(
            resolve_under(root, "out/pt").unwrap(),
            Path::new("/srv/rlhf/out/pt")
        );
        assert_eq!(
            resolve_under(root, "/srv/rlhf/data").unwrap(),
            Path::new("/srv/rlhf/data")
        );
        for bad in ["../etc", "out/../../etc", "/etc/passwd", "/srv/rlhfx/a", ""] {
            assert!(resolve_under(root, bad).is_err(), "{bad} accepted");
        }
        let e = resolve_under(root, "/etc/passwd").unwrap_err().to_string();
        assert!(e.contains("outside the worker root"), "{e}");
    }

    #[test]
    fn only_path_flags_are_rewritten() {
        let root = Path::new("/r");
        let argv: Vec<String> = [
            "--output_dir",
            "o",
            "--learning_rate",
            "1e-3",
            "--train_file_dir=d",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = resolve_args(root, &argv, &["output_dir", "train_file_dir"]).unwrap();
        assert_eq!(
            out,
            [
                "--output_dir",
                "/r/o",
                "--learning_rate",
                "1e-3",
                "--train_file_dir=/r/d"
            ]
        );
        let bad: Vec<String> = ["--output_dir", "../x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let e = resolve_args(root, &bad, &["output_dir"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--output_dir") && e.contains(".."), "{e}");
    }
}
