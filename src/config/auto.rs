//! Device-dependent defaults: the keys whose default is `"auto"` and that
//! resolve per model from its devices, as `dtype = "auto"` does
//! ([`super::auto_precision`]).
//!
//! Why: the sizes that make a 2-core CPU responsive make a GPU idle. On a
//! CPU a batch's run time grows with its size while throughput barely does,
//! so batches are kept small (a text never waits long behind images); a GPU
//! needs large batches to fill it, and an MLLM image (cost ~5,100) must be
//! able to share a batch. One fixed default served neither. Each key here is
//! `"auto"` by default; an explicit value in any layer wins, and `--devices`
//! re-resolves the keys that stayed auto.
//!
//! The values, one table for both classes ([`DeviceDefaults::for_class`],
//! README "Device-dependent defaults"):
//!
//! | key | cpu | gpu |
//! |---|---|---|
//! | `max_batch_size` | 32 | 256 |
//! | `max_batch_cost` | 1,024 | 65,536 |
//! | `decoder_group_tokens` | 4,096 | 16,384 |
//! | `vision_tile_chunk` | 16 | 32 |
//! | `server.preprocess_threads` | cores / 4 | cores − HTTP − device workers |
//!
//! A model is of the GPU class when every one of its devices is a GPU
//! ([`DeviceClass::of`]); the server's preprocessing threads take the GPU
//! value when every served model is. This module holds the rules and the
//! `"auto"` spelling; the values are set on the configuration by
//! [`super::ModelConfig::resolve_auto`] and [`super::Config::preprocess_threads`].

use serde::de::{self, Deserializer, Visitor};

use crate::models::{DeviceClass, PassLimits};

/// A count as written in a config layer: `"auto"` or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCount {
    Auto,
    Fixed(usize),
}

impl AutoCount {
    pub fn is_auto(self) -> bool {
        self == AutoCount::Auto
    }

    /// The fixed value, or `auto` when it is auto.
    pub fn or(self, auto: usize) -> usize {
        match self {
            AutoCount::Auto => auto,
            AutoCount::Fixed(n) => n,
        }
    }
}

struct AutoCountVisitor;

impl Visitor<'_> for AutoCountVisitor {
    type Value = AutoCount;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a non-negative integer or \"auto\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<AutoCount, E> {
        usize::try_from(v)
            .map(AutoCount::Fixed)
            .map_err(|_| E::custom(format!("{v} is too large")))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<AutoCount, E> {
        u64::try_from(v)
            .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            .and_then(|v| self.visit_u64(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<AutoCount, E> {
        if v.trim().eq_ignore_ascii_case("auto") {
            Ok(AutoCount::Auto)
        } else {
            Err(E::invalid_value(de::Unexpected::Str(v), &self))
        }
    }
}

impl<'de> serde::Deserialize<'de> for AutoCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AutoCountVisitor)
    }
}

/// `server.preprocess_threads`: `"auto"` (or `0`, its older spelling) is
/// stored as 0 and resolved by [`super::Config::preprocess_threads`].
pub(super) fn threads<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    Ok(d.deserialize_any(AutoCountVisitor)?.or(0))
}

/// The device-dependent model defaults of one device class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceDefaults {
    pub max_batch_size: usize,
    pub max_batch_cost: usize,
    pub pass: PassLimits,
}

impl DeviceDefaults {
    /// A CPU's: a batch of BGE-VL-base images of cost 1,024 (4 images) runs
    /// in ~0.7 s on 2 cores, where batch size barely changes throughput, so a
    /// text waits little behind images.
    pub const CPU: DeviceDefaults = DeviceDefaults {
        max_batch_size: 32,
        max_batch_cost: 1024,
        pass: PassLimits::CPU,
    };
    /// A GPU's: 256 CLIP images or texts, or 12 MLLM images, per batch.
    pub const GPU: DeviceDefaults = DeviceDefaults {
        max_batch_size: 256,
        max_batch_cost: 65536,
        pass: PassLimits::GPU,
    };

    pub fn for_class(class: DeviceClass) -> DeviceDefaults {
        match class {
            DeviceClass::Cpu => DeviceDefaults::CPU,
            DeviceClass::Gpu => DeviceDefaults::GPU,
        }
    }
}

/// Which of a model's device-dependent keys were `"auto"` (and so follow
/// its devices); `dtype` is [`super::ModelConfig::dtype_auto`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AutoKeys {
    pub max_batch_size: bool,
    pub max_batch_cost: bool,
    pub decoder_group_tokens: bool,
    pub vision_tile_chunk: bool,
}

/// Cores kept for the HTTP runtime when preprocessing takes the rest: an
/// eighth, at least one.
pub fn http_cores(cores: usize) -> usize {
    (cores / 8).max(1)
}

/// `server.preprocess_threads = "auto"` on `cores` cores serving models of
/// `class` with `device_workers` worker threads in all. CPU: a quarter of
/// the cores (more threads preempt the model's own; on 2 cores one thread
/// gave 9.6 images/s at 32 clients, two 8.4). GPU: every core but those of
/// the HTTP runtime and the device workers (which feed the GPUs), as the
/// CPU then only decodes and resizes.
pub fn preprocess_threads(class: DeviceClass, cores: usize, device_workers: usize) -> usize {
    match class {
        DeviceClass::Cpu => (cores / 4).max(1),
        DeviceClass::Gpu => cores
            .saturating_sub(http_cores(cores) + device_workers)
            .max(1),
    }
}

/// The machine's cores as the process sees them.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocessing_threads_follow_the_class() {
        assert_eq!(preprocess_threads(DeviceClass::Cpu, 2, 1), 1);
        assert_eq!(preprocess_threads(DeviceClass::Cpu, 16, 1), 4);
        assert_eq!(preprocess_threads(DeviceClass::Gpu, 16, 1), 13);
        assert_eq!(preprocess_threads(DeviceClass::Gpu, 64, 8), 48);
        assert_eq!(preprocess_threads(DeviceClass::Gpu, 2, 1), 1);
    }

    #[test]
    fn counts_read_auto_or_a_number() {
        #[derive(serde::Deserialize)]
        struct T {
            n: AutoCount,
        }
        let read = |s: &str| toml::from_str::<T>(s).map(|t| t.n);
        assert_eq!(read("n = \"auto\"").unwrap(), AutoCount::Auto);
        assert_eq!(read("n = \" AUTO \"").unwrap(), AutoCount::Auto);
        assert_eq!(read("n = 7").unwrap(), AutoCount::Fixed(7));
        let e = read("n = -1").unwrap_err().to_string();
        assert!(e.contains("\"auto\""), "{e}");
        assert!(read("n = \"many\"").is_err());
        assert_eq!(AutoCount::Auto.or(3), 3);
        assert_eq!(AutoCount::Fixed(5).or(3), 5);
    }
}
