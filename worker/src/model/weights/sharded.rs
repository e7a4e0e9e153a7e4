//! Writing model weights the way transformers' `save_pretrained` does: one
//! `model.safetensors` when everything fits in `max_shard_size`, otherwise
//! `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`
//! (`{"metadata": {"total_parameters", "total_size"}, "weight_map"}`).
//! Streaming: each tensor's bytes are produced on demand, written and dropped,
//! so a 70B model never has to fit in memory.

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// One tensor to write: its name, on-disk dtype and shape.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes on disk (what huggingface_hub's `get_storage_size` counts).
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.bitsize() / 8
    }
}

/// What was written.
#[derive(Clone, Debug, PartialEq)]
pub struct WrittenWeights {
    /// File names in order (one `model.safetensors`, or the shards).
    pub files: Vec<String>,
    /// Sum of tensor bytes (the index's `metadata.total_size`).
    pub total_size: u64,
    /// Sum of element counts (the index's `metadata.total_parameters`).
    pub total_parameters: u64,
}

/// `"5GB"`, `"500MB"`, `"20KB"`, `"1.5TB"` → bytes, with huggingface_hub's
/// decimal units (GB = 10⁹), or a plain number of bytes.
pub fn parse_shard_size(s: &str) -> Result<u64> {
    let t = s.trim();
    if let Ok(n) = t.parse::<u64>() {
        if n == 0 {
            bail!("max_shard_size {s:?} must be > 0");
        }
        return Ok(n);
    }
    let upper = t.to_ascii_uppercase();
    let units = [("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)];
    for (unit, mult) in units {
        if let Some(num) = upper.strip_suffix(unit) {
            let v: f64 = num.trim().parse().with_context(|| {
                format!("max_shard_size {s:?}: {:?} is not a number", num.trim())
            })?;
            let bytes = (v * mult) as u64;
            if !(v.is_finite() && bytes > 0) {
                bail!("max_shard_size {s:?} must be > 0");
            }
            return Ok(bytes);
        }
    }
    bail!("max_shard_size {s:?}: expected a number of bytes or a size like 5GB, 500MB, 20KB (units TB, GB, MB, KB)")
}

/// Group tensors (given by size, in save order) into shards exactly as
/// huggingface_hub's `split_state_dict_into_shards_factory`: fill in order,
/// start a new shard when the next tensor would tip the current one over the
/// limit; a tensor bigger than the limit gets a shard of its own, placed
/// before the shard being filled (which stays open).
pub fn plan_shards(sizes: &[usize], max_shard_size: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_size = 0u64;
    for (i, &size) in sizes.iter().enumerate() {
        let size = size as u64;
        if size > max_shard_size {
            shards.push(vec![i]);
            continue;
        }
        if current_size + size > max_shard_size && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// Write `tensors` (in save order) into `dir`, calling `produce` once per
/// tensor for its bytes (little-endian, `dtype`, `nbytes()` long).
pub fn write_model_weights(
    dir: &Path,
    tensors: &[PlannedTensor],
    max_shard_size: u64,
    produce: &mut dyn FnMut(&PlannedTensor) -> Result<Vec<u8>>,
) -> Result<WrittenWeights> {
    if tensors.is_empty() {
        bail!("no tensors to write into {}", dir.display());
    }
    let sizes: Vec<usize> = tensors.iter().map(PlannedTensor::nbytes).collect();
    let shards = plan_shards(&sizes, max_shard_size);
    let n = shards.len();
    let names: Vec<String> = if n == 1 {
        vec!["model.safetensors".into()]
    } else {
        (1..=n)
            .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
            .collect()
    };
    let mut weight_map = BTreeMap::new();
    for (members, file) in shards.iter().zip(&names) {
        let group: Vec<&PlannedTensor> = members.iter().map(|&i| &tensors[i]).collect();
        write_one_file(&dir.join(file), &group, produce)?;
        for t in &group {
            weight_map.insert(t.name.clone(), serde_json::Value::from(file.as_str()));
        }
    }
    let total_size: u64 = sizes.iter().map(|&s| s as u64).sum();
    let total_parameters: u64 = tensors.iter().map(|t| t.numel() as u64).sum();
    if n > 1 {
        let index = serde_json::json!({
            "metadata": { "total_parameters": total_parameters, "total_size": total_size },
            "weight_map": weight_map,
        });
        // transformers: json.dumps(index, indent=2, sort_keys=True) + "\n".
        let mut text = serde_json::to_string_pretty(&index)?;
        text.push('\n');
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(WrittenWeights {
        files: names,
        total_size,
        total_parameters,
    })
}

/// One safetensors file, laid out as the safetensors library lays it out
/// (entries sorted by dtype, descending, then name; header padded to 8 bytes;
/// `{"format": "pt"}` metadata as transformers writes), data streamed.
fn write_one_file(
    path: &Path,
    group: &[&PlannedTensor],
    produce: &mut dyn FnMut(&PlannedTensor) -> Result<Vec<u8>>,
) -> Result<()> {
    let mut sorted: Vec<&PlannedTensor> = group.to_vec();
    sorted.sort_by(|a, b| b.dtype.cmp(&a.dtype).then(a.name.cmp(&b.name)));
    let mut offset = 0;
    let mut infos = Vec::with_capacity(sorted.len());
    for t in &sorted {
        let len = t.nbytes();
        infos.push((
            t.name.clone(),
            TensorInfo {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data_offsets: (offset, offset + len),
            },
        ));
        offset += len;
    }
    let meta = Metadata::new(Some([("format".into(), "pt".into())].into()), infos)
        .map_err(|e| anyhow::anyhow!("{}: building the header: {e:?}", path.display()))?;
    let mut header = serde_json::to_string(&meta)?.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 22, file);
    let io = |e: std::io::Error| anyhow::anyhow!("writing {}: {e}", path.display());
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header).map_err(io)?;
    for t in sorted {
        let bytes = produce(t)?;
        if bytes.len() != t.nbytes() {
            bail!(
                "{}: tensor {:?} produced {} bytes, its shape {:?} and dtype {:?} need {}",
                path.display(),
                t.name,
                bytes.len(),
                t.shape,
                t.dtype,
                t.nbytes()
            );
        }
        w.write_all(&bytes).map_err(io)?;
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_sizes_parse_with_decimal_units() {
        assert_eq!(parse_shard_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_shard_size("20KB").unwrap(), 20_000);
        assert_eq!(parse_shard_size("1.5mb").unwrap(), 1_500_000);
        assert_eq!(parse_shard_size("4096").unwrap(), 4096);
        let e = format!("{:#}", parse_shard_size("5GiB").unwrap_err());
        assert!(e.contains("5GiB") && e.contains("KB"), "{e}");
        assert!(parse_shard_size("0MB").is_err());
    }

    #[test]
    fn oversized_tensors_get_their_own_shard_like_huggingface_hub() {
        // The docstring example of split_state_dict_into_shards_factory:
        // [6, 6, 2, 6, 2, 2] with limit 10 → [6], [6+2], [6+2+2].
        assert_eq!(
            plan_shards(&[6, 6, 2, 6, 2, 2], 10),
            vec![vec![0], vec![1, 2], vec![3, 4, 5]]
        );
        // A tensor over the limit is a shard by itself, before the open one.
        assert_eq!(
            plan_shards(&[3, 20, 3, 5], 10),
            vec![vec![1], vec![0, 2], vec![3]]
        );
    }

    #[test]
    fn written_shards_read_back_with_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let tensors: Vec<PlannedTensor> = (0..5)
            .map(|i| PlannedTensor {
                name: format!("t{i}"),
                dtype: if i % 2 == 0 { Dtype::F32 } else { Dtype::BF16 },
                shape: vec![2, 3],
            })
            .collect();
        let value = |t: &PlannedTensor| -> Vec<f32> {
            let k = t.name[1..].parse::<f32>().unwrap();
            (0..6).map(|j| k + j as f32 * 0.5).collect()
        };
        let w = write_model_weights(dir.path(), &tensors, 30, &mut |t| {
            let dt = super::super::SaveDtype::from_safetensors(t.dtype).unwrap();
            Ok(super::super::encode_f32(&value(t), dt))
        })
        .unwrap();
        assert_eq!(w.total_size, 24 * 3 + 12 * 2);
        assert!(w.files.len() > 1);
        let files = super::super::TensorFiles::open_model_dir(dir.path()).unwrap();
        for t in &tensors {
            assert_eq!(files.read_f32(&t.name, &[2, 3]).unwrap(), value(t));
            assert_eq!(files.info(&t.name).unwrap().0, t.dtype);
        }
    }
}
