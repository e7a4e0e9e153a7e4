//! Reading and writing safetensors: a single `model.safetensors`, or shards
//! listed by `model.safetensors.index.json`; f32, f16 or bf16 on disk, f32 in
//! memory. Files are memory-mapped, so only the tensors asked for are read.

pub mod sharded;

use crate::fsutil::write_atomic;
use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, Metadata, TensorView};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

struct MappedFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// A set of safetensors files seen as one name → tensor map.
pub struct TensorFiles {
    files: Vec<MappedFile>,
    /// tensor name → index into `files`
    index: BTreeMap<String, usize>,
}

impl TensorFiles {
    /// Open the weights of a Hugging Face model dir (`model.safetensors`, or the
    /// shards named by `model.safetensors.index.json`).
    pub fn open_model_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("reading {}", index_path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", index_path.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| {
                    format!("{}: missing object \"weight_map\"", index_path.display())
                })?;
            let mut shards: Vec<String> = map
                .values()
                .map(|f| f.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .with_context(|| {
                    format!(
                        "{}: weight_map values must be file names",
                        index_path.display()
                    )
                })?;
            shards.sort();
            shards.dedup();
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            let files = Self::open_files(&paths)?;
            // Every tensor the index promises must be in the shard it names.
            for (name, shard) in map {
                let shard = shard.as_str().unwrap_or_default();
                if files
                    .index
                    .get(name)
                    .map(|&i| files.files[i].path.file_name() != Some(shard.as_ref()))
                    != Some(false)
                {
                    bail!(
                        "{}: tensor {name:?} is listed in {shard} but that shard does not hold it",
                        index_path.display()
                    );
                }
            }
            Ok(files)
        } else if single.exists() {
            Self::open_files(&[single])
        } else {
            bail!(
                "no weights in {}: expected model.safetensors or model.safetensors.index.json (only safetensors is supported)",
                dir.display()
            )
        }
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for path in paths {
            let file =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: the file is opened read-only and not modified while mapped by this process;
            // a concurrent writer would be a user error we cannot guard against with mmap.
            let mmap = unsafe { memmap2::Mmap::map(&file) }
                .with_context(|| format!("mapping {}", path.display()))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                anyhow::anyhow!(
                    "{}: not a valid safetensors file ({e:?}); is it truncated or corrupt?",
                    path.display()
                )
            })?;
            for name in metadata.tensors().keys() {
                if index.insert(name.clone(), files.len()).is_some() {
                    bail!(
                        "tensor {name:?} appears in more than one file (second: {})",
                        path.display()
                    );
                }
            }
            files.push(MappedFile {
                path: path.clone(),
                mmap,
                header_len,
                metadata,
            });
        }
        Ok(TensorFiles { files, index })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The tensor's shape, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let f = &self.files[*self.index.get(name)?];
        f.metadata.info(name).map(|i| i.shape.clone())
    }

    /// The tensor's on-disk dtype and shape, if present.
    pub fn info(&self, name: &str) -> Option<(Dtype, Vec<usize>)> {
        let f = &self.files[*self.index.get(name)?];
        f.metadata.info(name).map(|i| (i.dtype, i.shape.clone()))
    }

    /// The file that holds `name` (for error messages).
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        Some(&self.files[*self.index.get(name)?].path)
    }

    /// The tensor's bytes exactly as stored (little-endian, its own dtype).
    pub fn raw_bytes(&self, name: &str) -> Result<&[u8]> {
        let &fi = self
            .index
            .get(name)
            .with_context(|| format!("missing tensor {name:?}"))?;
        let f = &self.files[fi];
        let info = f.metadata.info(name).context("index out of sync")?;
        let start = 8 + f.header_len + info.data_offsets.0;
        let end = 8 + f.header_len + info.data_offsets.1;
        Ok(&f.mmap[start..end])
    }

    /// Read a tensor as f32, checking its shape.
    pub fn read_f32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>> {
        let &fi = self.index.get(name).with_context(|| {
            let where_ = self
                .files
                .iter()
                .map(|f| f.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            format!("missing tensor {name:?} in {where_}")
        })?;
        let f = &self.files[fi];
        let info = f.metadata.info(name).context("index out of sync")?;
        if info.shape != expected_shape {
            bail!(
                "{}: tensor {name:?} has shape {:?} but the config implies {:?}",
                f.path.display(),
                info.shape,
                expected_shape
            );
        }
        let start = 8 + f.header_len + info.data_offsets.0;
        let end = 8 + f.header_len + info.data_offsets.1;
        let bytes = &f.mmap[start..end];
        decode_f32(bytes, info.dtype)
            .with_context(|| format!("{}: tensor {name:?}", f.path.display()))
    }
}

/// Little-endian f32/f16/bf16 bytes → f32.
fn decode_f32(bytes: &[u8], dtype: Dtype) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => bail!("dtype {other:?} is not supported (expected F32, F16 or BF16)"),
    })
}

/// A named tensor on the host: (name, shape, f32 data).
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// The on-disk dtype of tensors we write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    F16,
    BF16,
}

impl SaveDtype {
    /// From a `torch_dtype` string as in config.json / MedicalGPT's flag.
    pub fn from_torch_dtype(s: Option<&str>) -> Result<Self> {
        Ok(match s {
            None | Some("float32") | Some("auto") | Some("fp32") => SaveDtype::F32,
            Some("float16") | Some("fp16") => SaveDtype::F16,
            Some("bfloat16") | Some("bf16") => SaveDtype::BF16,
            Some(o) => bail!("torch_dtype {o:?} is not one of auto, float32, float16, bfloat16"),
        })
    }
    pub fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::F16 => "float16",
            SaveDtype::BF16 => "bfloat16",
        }
    }
}

impl SaveDtype {
    /// The safetensors dtype, or None for dtypes we do not convert (ints, fp8...).
    pub fn from_safetensors(d: Dtype) -> Option<Self> {
        match d {
            Dtype::F32 => Some(SaveDtype::F32),
            Dtype::F16 => Some(SaveDtype::F16),
            Dtype::BF16 => Some(SaveDtype::BF16),
            _ => None,
        }
    }
    pub fn to_safetensors(self) -> Dtype {
        match self {
            SaveDtype::F32 => Dtype::F32,
            SaveDtype::F16 => Dtype::F16,
            SaveDtype::BF16 => Dtype::BF16,
        }
    }
}

/// f32 values → little-endian bytes of `dtype` (round to nearest even).
pub fn encode_f32(data: &[f32], dtype: SaveDtype) -> Vec<u8> {
    match dtype {
        SaveDtype::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        SaveDtype::F16 => data
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        SaveDtype::BF16 => data
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
    }
}

/// Little-endian bytes of a float dtype → f32 (public form of the reader's decoder).
pub fn decode_to_f32(bytes: &[u8], dtype: Dtype) -> Result<Vec<f32>> {
    decode_f32(bytes, dtype)
}

/// Write named f32 tensors to one safetensors file, atomically.
pub fn save_tensors(
    path: &Path,
    tensors: &[NamedTensor],
    dtype: SaveDtype,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), encode_f32(d, dtype)))
        .collect();
    let st_dtype = dtype.to_safetensors();
    let views: Vec<(String, TensorView)> = encoded
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(st_dtype, s.clone(), b)?)))
        .collect::<std::result::Result<_, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow::anyhow!("building tensors for {}: {e:?}", path.display()))?;
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| anyhow::anyhow!("serializing {}: {e:?}", path.display()))?;
    write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_all_dtypes_and_reports_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![1.5f32, -2.25, 3.0, 0.125, 7.0, -0.5];
        for dt in [SaveDtype::F32, SaveDtype::F16, SaveDtype::BF16] {
            let p = dir.path().join("model.safetensors");
            save_tensors(
                &p,
                &[("a.weight".into(), vec![2, 3], data.clone())],
                dt,
                None,
            )
            .unwrap();
            let f = TensorFiles::open_model_dir(dir.path()).unwrap();
            assert_eq!(f.read_f32("a.weight", &[2, 3]).unwrap(), data, "{dt:?}");
            let e = format!("{:#}", f.read_f32("a.weight", &[3, 2]).unwrap_err());
            assert!(e.contains("shape [2, 3]") && e.contains("[3, 2]"), "{e}");
            let e = format!("{:#}", f.read_f32("b.weight", &[1]).unwrap_err());
            assert!(e.contains("missing tensor \"b.weight\""), "{e}");
        }
        // Truncated file: named, no panic.
        let p = dir.path().join("model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let e = format!(
            "{:#}",
            TensorFiles::open_model_dir(dir.path()).err().unwrap()
        );
        assert!(
            e.contains("model.safetensors") && e.contains("truncated"),
            "{e}"
        );
    }
}
