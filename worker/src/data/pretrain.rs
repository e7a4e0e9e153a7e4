//! PT (continued pre-training) input, as MedicalGPT `training/pretraining.py`
//! prepares it with `--packing True` (the default):
//!
//! 1. read every `.txt` / `.json` / `.jsonl` file under `train_file_dir`
//!    (`read_text_dir`), one document per `.txt` line or JSON record;
//! 2. split off validation documents when there is no `validation_file_dir`
//!    (`split_train_validation`);
//! 3. tokenize each document with the tokenizer's own special tokens, append
//!    EOS, concatenate per batch of 1000 documents and cut `block_size` blocks
//!    (`pack_documents`);
//! 4. truncate the *blocks* to `max_train_samples` / `max_eval_samples`.
//!
//! Differences from MedicalGPT, all deliberate: files are read in sorted path
//! order (Python's `glob` order is the file system's), `.json` files are also
//! read (MedicalGPT globs only `.txt` and `.jsonl`), a directory may mix the
//! three types (MedicalGPT refuses), and a UTF-8 byte-order mark is dropped.

use crate::tokenizer::{json_kind, Tokenizer};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Rows per `datasets.map(batched=True)` call: packing drops a remainder per batch.
pub const MAP_BATCH_SIZE: usize = 1000;

/// File extensions read as PT data.
pub const EXTENSIONS: [&str; 3] = ["txt", "json", "jsonl"];

/// One PT sample: a line of a `.txt` file or one JSON record's `"text"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub source: PathBuf,
    /// 1-based line of the sample in `source` (for a JSON array, the line
    /// where the element starts).
    pub line: usize,
    pub text: String,
}

/// The `.json`/`.jsonl` files among [`list_data_files`] (the JSON data of
/// SFT, reward pairs and RL prompts).
pub fn list_json_files(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(list_data_files(dir)?
        .into_iter()
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("json" | "jsonl")
            )
        })
        .collect())
}

/// All data files under `dir` (recursive, following symlinks, skipping hidden
/// files and folders like Python's `glob`), sorted by path. `dir` may also be
/// a single data file.
pub fn list_data_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(dir).with_context(|| {
        format!(
            "PT data directory {} does not exist or cannot be read",
            dir.display()
        )
    })?;
    if meta.is_file() {
        if !has_data_extension(dir) {
            bail!("{} is not a .txt/.json/.jsonl file", dir.display());
        }
        return Ok(vec![dir.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut seen = HashSet::new();
    walk(dir, &mut files, &mut seen)?;
    if files.is_empty() {
        bail!("no .txt/.json/.jsonl files in {}", dir.display());
    }
    files.sort();
    Ok(files)
}

fn has_data_extension(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e))
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>, seen: &mut HashSet<PathBuf>) -> Result<()> {
    // Canonical paths guard against symlink cycles.
    let canon =
        std::fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
    if !seen.insert(canon) {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let meta = std::fs::metadata(&path)
            .with_context(|| format!("reading metadata of {}", path.display()))?;
        if meta.is_dir() {
            walk(&path, files, seen)?;
        } else if meta.is_file() && has_data_extension(&path) {
            files.push(path);
        }
    }
    Ok(())
}

/// Read every PT document under `dir` (see `list_data_files`), in file order.
/// `keep_linebreaks` applies to `.txt` lines as in HF's `text` loader.
pub fn read_text_dir(dir: &Path, keep_linebreaks: bool) -> Result<Vec<Document>> {
    let mut docs = Vec::new();
    for file in list_data_files(dir)? {
        docs.extend(read_data_file(&file, keep_linebreaks)?);
    }
    Ok(docs)
}

/// Read one `.txt`, `.json` or `.jsonl` file.
pub fn read_data_file(path: &Path, keep_linebreaks: bool) -> Result<Vec<Document>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = decode_utf8(path, &bytes)?;
    match path.extension().and_then(|e| e.to_str()) {
        Some("txt") => Ok(read_txt(path, text, keep_linebreaks)),
        Some("jsonl") => read_json_lines(path, text),
        Some("json") => {
            if text.trim_start().starts_with('[') {
                read_json_array(path, text)
            } else {
                read_json_lines(path, text)
            }
        }
        _ => bail!(
            "{}: unsupported extension; expected .txt, .json or .jsonl",
            path.display()
        ),
    }
}

/// Strict UTF-8 (as Python's `open(encoding="utf-8")`); the error names the
/// line and byte offset of the first bad byte. A leading BOM is dropped.
pub(crate) fn decode_utf8<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str> {
    let bytes = bytes
        .strip_prefix(b"\xEF\xBB\xBF".as_slice())
        .unwrap_or(bytes);
    std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        anyhow::anyhow!(
            "{}:{line}: not valid UTF-8 (bad byte at offset {at}); PT data files must be UTF-8",
            path.display()
        )
    })
}

/// HF `text` loader, `sample_by="line"`: universal newlines (`\r\n` and a lone
/// `\r` become `\n`), one sample per line including empty lines, the `\n`
/// kept or stripped by `keep_linebreaks`; no sample after a final newline.
fn read_txt(path: &Path, text: &str, keep_linebreaks: bool) -> Vec<Document> {
    let mut docs = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (content, terminated, next) = match rest.find(['\n', '\r']) {
            None => (rest, false, ""),
            Some(i) => {
                let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                (&rest[..i], true, &rest[i + skip..])
            }
        };
        let mut line = content.to_string();
        if terminated && keep_linebreaks {
            line.push('\n');
        }
        docs.push(Document {
            source: path.to_path_buf(),
            line: docs.len() + 1,
            text: line,
        });
        rest = next;
    }
    docs
}

/// JSON lines: one object with a string `"text"` per line; blank lines are skipped.
fn read_json_lines(path: &Path, text: &str) -> Result<Vec<Document>> {
    let mut docs = Vec::new();
    for (i, raw) in text.split('\n').enumerate() {
        let line_no = i + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if raw.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(raw).with_context(|| {
            format!(
                "{}:{line_no}: invalid JSON (expected one object per line)",
                path.display()
            )
        })?;
        let text = text_field(path, line_no, &value)?;
        docs.push(Document {
            source: path.to_path_buf(),
            line: line_no,
            text,
        });
    }
    Ok(docs)
}

/// A `.json` file holding one top-level array of `{"text": ...}` objects.
fn read_json_array(path: &Path, text: &str) -> Result<Vec<Document>> {
    let values: Vec<Value> = serde_json::from_str(text).map_err(|e| {
        anyhow::anyhow!(
            "{}:{}: invalid JSON (expected an array of {{\"text\": ...}} objects): {e}",
            path.display(),
            e.line()
        )
    })?;
    let lines = array_element_lines(text);
    let mut docs = Vec::with_capacity(values.len());
    for (i, value) in values.iter().enumerate() {
        let line = lines.get(i).copied().unwrap_or(1);
        let text = text_field(path, line, value)
            .with_context(|| format!("element {i} of the top-level array"))?;
        docs.push(Document {
            source: path.to_path_buf(),
            line,
            text,
        });
    }
    Ok(docs)
}

/// 1-based start line of each element of a valid top-level JSON array.
pub(crate) fn array_element_lines(text: &str) -> Vec<usize> {
    let (mut depth, mut in_string, mut escaped, mut expect_element) = (0usize, false, false, false);
    let mut line = 1;
    let mut out = Vec::new();
    for c in text.chars() {
        if c == '\n' {
            line += 1;
        }
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if expect_element && !c.is_whitespace() && c != ']' {
            out.push(line);
            expect_element = false;
        }
        match c {
            '"' => in_string = true,
            '[' | '{' => {
                depth += 1;
                expect_element = depth == 1;
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            ',' if depth == 1 => expect_element = true,
            _ => {}
        }
    }
    out
}

/// The string `"text"` field of one record.
fn text_field(path: &Path, line: usize, value: &Value) -> Result<String> {
    let obj = match value {
        Value::Object(o) => o,
        other => bail!(
            "{}:{line}: expected a JSON object with a \"text\" field, found {}",
            path.display(),
            json_kind(other)
        ),
    };
    match obj.get("text") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => bail!(
            "{}:{line}: field \"text\" is {}; expected a string",
            path.display(),
            json_kind(other)
        ),
        None => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            bail!(
                "{}:{line}: missing field \"text\" (fields present: {})",
                path.display(),
                keys.join(", ")
            )
        }
    }
}

/// MedicalGPT HEAD packing (`group_text_function`): per batch of
/// `MAP_BATCH_SIZE` documents, append `eos_id` to every document that does not
/// already end with it, concatenate, and cut consecutive `block_size` blocks.
/// The remainder of each batch is dropped, except that a batch shorter than
/// `block_size` yields one short block. Attention is not reset at document
/// boundaries downstream, so blocks freely span documents.
/// `block_size == 0` yields no blocks (callers validate it first).
pub fn pack_documents(docs_tokens: &[Vec<u32>], eos_id: u32, block_size: usize) -> Vec<Vec<u32>> {
    let mut blocks = Vec::new();
    if block_size == 0 {
        return blocks;
    }
    for batch in docs_tokens.chunks(MAP_BATCH_SIZE) {
        let mut stream = Vec::with_capacity(batch.iter().map(|d| d.len() + 1).sum());
        for ids in batch {
            stream.extend_from_slice(ids);
            if ids.last() != Some(&eos_id) {
                stream.push(eos_id);
            }
        }
        let mut total = stream.len();
        if total >= block_size {
            total = (total / block_size) * block_size;
        }
        blocks.extend(stream[..total].chunks(block_size).map(<[u32]>::to_vec));
    }
    blocks
}

/// Rows that `load_dataset(split=f"train[:{pct}%]")` takes: Python's
/// `round(pct * n / 100)` (`datasets`' default "closest" rounding, half to even).
pub fn validation_split_len(n_rows: usize, pct: u32) -> usize {
    let x = pct as u128 * n_rows as u128;
    let (q, r) = (x / 100, x % 100);
    let q = if r > 50 || (r == 50 && q % 2 == 1) {
        q + 1
    } else {
        q
    };
    q as usize
}

/// MedicalGPT without `validation_file_dir`: the FIRST `pct`% of the rows
/// (`train[:pct%]`) are validation and the rest (`train[pct%:]`) training, in
/// file order and without shuffling. Returns `(train, validation)`.
pub fn split_train_validation<T>(mut rows: Vec<T>, pct: u32) -> Result<(Vec<T>, Vec<T>)> {
    if pct > 100 {
        bail!("validation_split_percentage is {pct}; expected 0..=100");
    }
    let n_val = validation_split_len(rows.len(), pct);
    let train = rows.split_off(n_val);
    Ok((train, rows))
}

/// PT data options (MedicalGPT `DataArguments`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtDataArgs {
    /// Tokens per block; capped at the tokenizer's `model_max_length`.
    pub block_size: usize,
    /// Used only when no validation documents are given.
    pub validation_split_percentage: u32,
    /// Keep at most this many packed train blocks (`None` or 0: all).
    pub max_train_samples: Option<usize>,
    /// Keep at most this many packed eval blocks (`None` or 0: all).
    pub max_eval_samples: Option<usize>,
}

impl Default for PtDataArgs {
    fn default() -> Self {
        PtDataArgs {
            block_size: 1024,
            validation_split_percentage: 1,
            max_train_samples: None,
            max_eval_samples: None,
        }
    }
}

/// Packed PT data ready for the trainer (`labels = input_ids`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtBlocks {
    pub train: Vec<Vec<u32>>,
    pub eval: Vec<Vec<u32>>,
    /// The block size actually used (after the `model_max_length` cap).
    pub block_size: usize,
    pub train_docs: usize,
    pub eval_docs: usize,
}

/// Split (when `validation` is `None`), pack and truncate already tokenized
/// documents. `max_*_samples` apply to packed blocks, after grouping, as in
/// MedicalGPT (`lm_datasets[...].select(range(n))`).
pub fn pt_blocks_from_tokens(
    train: Vec<Vec<u32>>,
    validation: Option<Vec<Vec<u32>>>,
    eos_id: u32,
    block_size: usize,
    args: &PtDataArgs,
) -> Result<PtBlocks> {
    if block_size == 0 {
        bail!("block_size must be > 0");
    }
    let (train, eval) = match validation {
        Some(v) => (train, v),
        None => split_train_validation(train, args.validation_split_percentage)?,
    };
    if train.is_empty() {
        bail!(
            "no training documents left (validation_split_percentage={} took all of them)",
            args.validation_split_percentage
        );
    }
    let truncate = |mut blocks: Vec<Vec<u32>>, max: Option<usize>| {
        if let Some(n) = max.filter(|&n| n > 0) {
            blocks.truncate(n);
        }
        blocks
    };
    Ok(PtBlocks {
        train: truncate(
            pack_documents(&train, eos_id, block_size),
            args.max_train_samples,
        ),
        eval: truncate(
            pack_documents(&eval, eos_id, block_size),
            args.max_eval_samples,
        ),
        block_size,
        train_docs: train.len(),
        eval_docs: eval.len(),
    })
}

/// The whole PT input pipeline on documents: tokenize (with the tokenizer's
/// special tokens, like HF `tokenizer(text)`), split, pack, truncate.
/// The separator is EOS, or PAD when the tokenizer has no EOS (as MedicalGPT).
pub fn build_pt_blocks(
    tokenizer: &Tokenizer,
    train_docs: &[Document],
    validation_docs: Option<&[Document]>,
    args: &PtDataArgs,
) -> Result<PtBlocks> {
    let eos_id = tokenizer
        .eos_id()
        .or(tokenizer.pad_id())
        .context("the tokenizer has neither eos_token nor pad_token; PT packing needs one as the document separator")?;
    let mut block_size = args.block_size;
    if let Some(max) = tokenizer.model_max_length().filter(|&m| m < block_size) {
        tracing::warn!("block_size {block_size} is larger than the tokenizer's model_max_length {max}; using {max}");
        block_size = max;
    }
    let encode = |docs: &[Document]| -> Result<Vec<Vec<u32>>> {
        let texts: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
        tokenizer.encode_batch(&texts, true)
    };
    let train = encode(train_docs).context("tokenizing the PT training documents")?;
    let validation = validation_docs
        .map(encode)
        .transpose()
        .context("tokenizing the PT validation documents")?;
    pt_blocks_from_tokens(train, validation, eos_id, block_size, args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::write_atomic;

    const SAMPLE_DIR: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/medicalgpt/pretrain"
    );

    /// Python `readlines()` count: newlines, plus a final unterminated line.
    fn python_line_count(bytes: &[u8]) -> usize {
        let n = bytes.iter().filter(|&&b| b == b'\n').count();
        n + usize::from(bytes.last().is_some_and(|&b| b != b'\n'))
    }

    #[test]
    fn reads_the_medicalgpt_sample_files() {
        let dir = Path::new(SAMPLE_DIR);
        let files = list_data_files(dir).unwrap();
        assert!(!files.is_empty());
        let docs = read_text_dir(dir, true).unwrap();
        let expected: usize = files
            .iter()
            .map(|f| python_line_count(&std::fs::read(f).unwrap()))
            .sum();
        assert_eq!(docs.len(), expected);
        // Files in sorted order, lines numbered 1.. within each file.
        let mut prev: Option<&Document> = None;
        for d in &docs {
            if let Some(p) = prev.filter(|p| p.source == d.source) {
                assert_eq!(d.line, p.line + 1);
            } else {
                assert_eq!(d.line, 1);
                assert!(prev.is_none_or(|p| p.source < d.source));
            }
            prev = Some(d);
        }
        // keep_linebreaks: every line but possibly the last of a file ends with "\n".
        assert!(docs.iter().filter(|d| d.text.ends_with('\n')).count() >= docs.len() - files.len());
        let stripped = read_text_dir(dir, false).unwrap();
        assert_eq!(stripped.len(), docs.len());
        assert!(stripped.iter().all(|d| !d.text.ends_with('\n')));
        assert!(
            stripped.iter().any(|d| d.text.is_empty()),
            "empty lines are kept as samples"
        );
    }

    #[test]
    fn packing_invariants_on_sample_data() {
        let docs = read_text_dir(Path::new(SAMPLE_DIR), true).unwrap();
        // Byte-level "tokenization" keeps this test independent of any tokenizer.
        let eos = 256;
        let toks: Vec<Vec<u32>> = docs
            .iter()
            .map(|d| d.text.bytes().map(u32::from).collect())
            .collect();
        for block_size in [7, 128, 1000] {
            let blocks = pack_documents(&toks, eos, block_size);
            assert!(
                blocks.iter().all(|b| b.len() == block_size),
                "sample batches are longer than a block"
            );
            // Per batch: blocks are a prefix of the EOS-joined stream, missing less than one block.
            let mut it = blocks.iter();
            for batch in toks.chunks(MAP_BATCH_SIZE) {
                let stream: Vec<u32> = batch
                    .iter()
                    .flat_map(|d| d.iter().copied().chain([eos]))
                    .collect();
                let n = stream.len() / block_size;
                let got: Vec<u32> = it.by_ref().take(n).flatten().copied().collect();
                assert_eq!(got, stream[..n * block_size]);
            }
            assert!(it.next().is_none());
        }
    }

    #[test]
    fn packing_edge_cases() {
        // EOS not doubled; a short batch keeps one short block; empty docs give just EOS.
        let docs = vec![vec![1, 2, 9], vec![], vec![3]];
        assert_eq!(pack_documents(&docs, 9, 100), vec![vec![1, 2, 9, 9, 3, 9]]);
        assert_eq!(pack_documents(&docs, 9, 4), vec![vec![1, 2, 9, 9]]);
        assert_eq!(pack_documents(&docs, 9, 0), Vec::<Vec<u32>>::new());
        // The remainder is dropped per 1000-document batch, not globally.
        let many = vec![vec![5u32]; 1001]; // batch 1: 2000 tokens, batch 2: 2 tokens
        let blocks = pack_documents(&many, 9, 3);
        assert_eq!(blocks.len(), 666 + 1);
        assert_eq!(blocks.last().unwrap(), &vec![5, 9]);
    }

    #[test]
    fn split_matches_hf_percent_slicing() {
        assert_eq!(validation_split_len(1496, 1), 15); // 14.96 -> 15
        assert_eq!(validation_split_len(50, 1), 0); // 0.5 -> 0 (half to even)
        assert_eq!(validation_split_len(150, 1), 2); // 1.5 -> 2
        assert_eq!(validation_split_len(250, 1), 2); // 2.5 -> 2
        assert_eq!(validation_split_len(7, 100), 7);
        let (train, val) = split_train_validation((0..10).collect(), 20).unwrap();
        assert_eq!(val, vec![0, 1], "validation is the FIRST pct%");
        assert_eq!(train, (2..10).collect::<Vec<_>>());
        assert!(split_train_validation(vec![1], 101).is_err());
    }

    #[test]
    fn blocks_split_pack_and_truncate() {
        let docs: Vec<Vec<u32>> = (0..100).map(|i| vec![i; 5]).collect();
        let args = PtDataArgs {
            block_size: 4,
            validation_split_percentage: 10,
            max_train_samples: Some(3),
            max_eval_samples: None,
        };
        let b = pt_blocks_from_tokens(docs.clone(), None, 999, 4, &args).unwrap();
        assert_eq!((b.train_docs, b.eval_docs), (90, 10));
        assert_eq!(b.train.len(), 3, "max_train_samples counts blocks");
        assert_eq!(b.train[0], vec![10, 10, 10, 10]);
        assert_eq!(b.eval.len(), 60 / 4);
        assert_eq!(b.eval[0], vec![0, 0, 0, 0]);
        let b = pt_blocks_from_tokens(docs.clone(), Some(vec![vec![1]]), 999, 4, &args).unwrap();
        assert_eq!(
            (b.train_docs, b.eval_docs),
            (100, 1),
            "given validation: no split"
        );
        assert_eq!(b.eval, vec![vec![1, 999]]);
        let args0 = PtDataArgs {
            max_train_samples: Some(0),
            ..args.clone()
        };
        assert_eq!(
            pt_blocks_from_tokens(docs.clone(), None, 999, 4, &args0)
                .unwrap()
                .train
                .len(),
            90 * 6 / 4
        );
        assert!(pt_blocks_from_tokens(docs.clone(), None, 999, 0, &args).is_err());
        let all = PtDataArgs {
            validation_split_percentage: 100,
            ..args
        };
        assert!(pt_blocks_from_tokens(docs, None, 999, 4, &all).is_err());
    }

    #[test]
    fn build_with_a_real_tokenizer() {
        let docs = read_text_dir(Path::new(SAMPLE_DIR), true).unwrap();
        let texts: Vec<String> = docs.iter().take(300).map(|d| d.text.clone()).collect();
        let mut tok = crate::tokenizer::train_byte_level_bpe(&texts, 600).unwrap();
        tok.set_model_max_length(Some(64));
        let args = PtDataArgs {
            block_size: 128,
            ..Default::default()
        };
        let b = build_pt_blocks(&tok, &docs, None, &args).unwrap();
        assert_eq!(b.block_size, 64, "capped at model_max_length");
        assert_eq!(b.eval_docs, validation_split_len(docs.len(), 1));
        assert!(b.train.iter().chain(&b.eval).all(|blk| blk.len() == 64));
        // The first eval block decodes to the start of the first document.
        let first = tok.decode(&b.eval[0], false).unwrap();
        assert!(docs[0].text.starts_with(&first) || first.starts_with(&docs[0].text));
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        write_atomic(&p, bytes).unwrap();
        p
    }

    fn err(dir: &Path) -> String {
        format!("{:#}", read_text_dir(dir, true).unwrap_err())
    }

    #[test]
    fn txt_line_semantics() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "a.txt", b"one\r\ntwo\n\nthree\rfour");
        let texts = |keep| {
            read_data_file(&p, keep)
                .unwrap()
                .into_iter()
                .map(|d| d.text)
                .collect::<Vec<_>>()
        };
        assert_eq!(texts(true), ["one\n", "two\n", "\n", "three\n", "four"]);
        assert_eq!(texts(false), ["one", "two", "", "three", "four"]);
        let p = write(d.path(), "b.txt", b"\xEF\xBB\xBFx\n");
        assert_eq!(read_data_file(&p, true).unwrap()[0].text, "x\n");
    }

    #[test]
    fn json_formats() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "sub/b.jsonl",
            b"{\"text\": \"b1\"}\n\n{\"text\": \"b2\", \"x\": 1}\r\n",
        );
        write(
            d.path(),
            "a.json",
            b"[\n  {\"text\": \"a1 [,]\"},\n  {\"text\": \"a2\"}\n]",
        );
        write(
            d.path(),
            "c.json",
            b"{\"text\": \"c1\"}\n{\"text\": \"c2\"}\n",
        );
        write(d.path(), ".hidden.txt", b"ignored\n");
        write(d.path(), "notes.md", b"ignored\n");
        let docs = read_text_dir(d.path(), true).unwrap();
        let got: Vec<(String, usize)> = docs.iter().map(|d| (d.text.clone(), d.line)).collect();
        let want = [
            ("a1 [,]", 2),
            ("a2", 3),
            ("c1", 1),
            ("c2", 2),
            ("b1", 1),
            ("b2", 3),
        ];
        assert_eq!(got, want.map(|(t, l)| (t.to_string(), l)));
    }

    #[test]
    fn error_cases_name_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let e = err(&d.path().join("missing"));
        assert!(e.contains("missing") && e.contains("does not exist"), "{e}");
        let e = err(d.path());
        assert!(e.contains("no .txt/.json/.jsonl files in"), "{e}");

        write(
            d.path(),
            "bad.jsonl",
            b"{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": oops}\n",
        );
        let e = err(d.path());
        assert!(
            e.contains("bad.jsonl:3") && e.contains("expected value"),
            "{e}"
        );

        write(
            d.path(),
            "bad.jsonl",
            b"{\"text\": \"a\"}\n{\"content\": \"b\"}\n",
        );
        let e = err(d.path());
        assert!(
            e.contains("bad.jsonl:2")
                && e.contains("missing field \"text\"")
                && e.contains("content"),
            "{e}"
        );

        write(d.path(), "bad.jsonl", b"{\"text\": 5}\n");
        let e = err(d.path());
        assert!(e.contains("bad.jsonl:1") && e.contains("a number"), "{e}");

        write(d.path(), "bad.jsonl", b"[1]\n");
        assert!(err(d.path()).contains("expected a JSON object"));

        write(d.path(), "bad.jsonl", b"{\"text\": \"a\"}\n");
        write(d.path(), "bin.txt", b"fine\nstill fine\nbad \xff byte\n");
        let e = err(d.path());
        assert!(e.contains("bin.txt:3") && e.contains("UTF-8"), "{e}");

        std::fs::remove_file(d.path().join("bin.txt")).unwrap();
        write(
            d.path(),
            "arr.json",
            b"[\n {\"text\": \"a\"},\n {\"txt\": \"b\"}\n]",
        );
        let e = err(d.path());
        assert!(e.contains("arr.json:3") && e.contains("element 1"), "{e}");
        write(
            d.path(),
            "arr.json",
            b"[\n {\"text\": \"a\"},\n {\"text\": \n]",
        );
        let e = err(d.path());
        assert!(
            e.contains("arr.json:4") && e.contains("invalid JSON"),
            "{e}"
        );
    }
}
