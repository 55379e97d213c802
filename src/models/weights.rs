//! Safetensors weights, memory-mapped, that leave memory as they are used.
//!
//! Owns reading the weight files for the [`candle_nn::VarBuilder`] that model
//! code builds from. candle's own mmap backend keeps every page it read
//! resident until the whole map is dropped, so while a model is being built
//! the process holds the weights twice (the owned tensors and the mapped
//! pages): 2.1x the weights' size at peak for BGE-VL-base. Here each tensor's
//! pages are released (`MADV_DONTNEED`) as soon as they have been copied into
//! the tensor, so loading peaks at the weights plus one tensor. Tensors no
//! model asks for (LLaVA's `lm_head`) are never read at all.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use memmap2::Mmap;

use super::ModelError;

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte range in the file.
    start: usize,
    end: usize,
}

/// Every tensor of one model's safetensors files (single or sharded).
pub struct MappedWeights {
    maps: Vec<Mmap>,
    entries: HashMap<String, Entry>,
}

fn dtype_of(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I64 => DType::I64,
        _ => return None,
    })
}

impl MappedWeights {
    /// Maps `paths` and reads their headers (no tensor data is touched).
    pub fn open(paths: &[PathBuf]) -> Result<Self, ModelError> {
        let mut maps = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let map = map_file(path)?;
            let (header, meta) =
                safetensors::SafeTensors::read_metadata(&map).map_err(|source| {
                    ModelError::Safetensors {
                        path: path.display().to_string(),
                        source,
                    }
                })?;
            let base = 8 + header;
            for (name, info) in meta.tensors() {
                let (start, end) = (base + info.data_offsets.0, base + info.data_offsets.1);
                if end > map.len() || start > end {
                    return Err(ModelError::Load(format!(
                        "tensor {name} lies outside {}",
                        path.display()
                    )));
                }
                // Unsupported element types are only an error if a model asks for them.
                let Some(dtype) = dtype_of(info.dtype) else {
                    continue;
                };
                entries.insert(
                    name,
                    Entry {
                        file: i,
                        dtype,
                        shape: info.shape.clone(),
                        start,
                        end,
                    },
                );
            }
            maps.push(map);
        }
        Ok(MappedWeights { maps, entries })
    }

    /// Copies tensor `name` out of the map, converted to `dtype` on `dev`,
    /// and releases its pages.
    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.into() })?;
        let map = &self.maps[e.file];
        let tensor =
            Tensor::from_raw_buffer(&map[e.start..e.end], e.dtype, &e.shape, &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(dev)?;
        // The map is a read-only private mapping of a file nobody
        // writes; the slice borrowed above is gone. DONTNEED only drops the
        // resident pages: a later read of the range faults them back in from
        // the file, so no data is lost and no reference dangles.
        let page = page_size();
        let start = e.start / page * page;
        // SAFETY: as above; `start` is the tensor's start rounded down to a
        // page boundary (madvise needs one), so the range may also cover
        // the end of the previous tensor, whose copy is already made or
        // which is faulted back in from the file when read.
        unsafe {
            let _ = map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                start,
                e.end - start,
            );
        }
        Ok(tensor)
    }
}

/// The system's memory page size (`sysconf(_SC_PAGESIZE)`), read once;
/// 4096 if the system does not say.
fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: `sysconf` only reads a system constant; it has no
        // preconditions and touches no memory of ours.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(page)
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096)
    })
}

fn map_file(path: &Path) -> Result<Mmap, ModelError> {
    let file = File::open(path).map_err(|source| ModelError::Io {
        what: format!("cannot open {}", path.display()),
        source,
    })?;
    // SAFETY: mapped read-only; like every safetensors loader we rely on the
    // weight files not being modified while the model loads.
    unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
        what: format!("cannot map {}", path.display()),
        source,
    })
}

impl candle_nn::var_builder::SimpleBackend for MappedWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.load(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            });
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::var_builder::SimpleBackend;

    #[test]
    fn loads_like_candle_and_checks_shapes() {
        let dir = std::env::temp_dir().join(format!("vlembed-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.safetensors");
        let a = Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let b = Tensor::new(&[1.5f32, -2.0], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        candle_core::safetensors::save(
            &HashMap::from([("a".to_string(), a.clone()), ("b".to_string(), b)]),
            &path,
        )
        .unwrap();
        let w = MappedWeights::open(std::slice::from_ref(&path)).unwrap();
        assert!(w.contains_tensor("a") && w.contains_tensor("b") && !w.contains_tensor("c"));
        let got = w
            .get(
                (3, 4).into(),
                "a",
                candle_nn::Init::Const(0.),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        // Loading twice works: released pages come back from the file.
        let again = w.get_unchecked("a", DType::F32, &Device::Cpu).unwrap();
        assert_eq!(again.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        let b = w.get_unchecked("b", DType::F32, &Device::Cpu).unwrap();
        assert_eq!(b.to_vec1::<f32>().unwrap(), vec![1.5, -2.0]);
        let err = w.get(
            (4, 3).into(),
            "a",
            candle_nn::Init::Const(0.),
            DType::F32,
            &Device::Cpu,
        );
        assert!(err.unwrap_err().to_string().contains("shape mismatch"));
        assert!(w.get_unchecked("c", DType::F32, &Device::Cpu).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn page_size_comes_from_the_system() {
        let p = page_size();
        assert!(p.is_power_of_two() && p >= 4096, "{p}");
    }

    #[test]
    fn garbage_is_a_load_error() {
        let dir = std::env::temp_dir().join(format!("vlembed-weights-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.safetensors");
        std::fs::write(&path, b"not a safetensors file").unwrap();
        let err = MappedWeights::open(std::slice::from_ref(&path))
            .err()
            .unwrap();
        assert!(err.to_string().contains("invalid safetensors"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
