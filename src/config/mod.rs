//! Server configuration: the structs, their layering and their validation.
//!
//! Owns reading `config/default.toml` (compiled in), an optional `--config`
//! file, `VLEMBED_*` environment variables and command-line overrides, in that
//! order of precedence, into one validated [`Config`]. It touches no model
//! files and no network; it may not depend on the HTTP, batching or worker
//! modules.
//!
//! Layout: [`schema`] (the sections and their fields), [`layering`] (the
//! sources merged in order), [`auto`] (the defaults that follow the
//! devices), [`validate`] (values that parse but cannot be served),
//! [`resolved`] (the resolved configuration as TOML, `vlembed config`),
//! [`cidr`] (IP networks).

pub mod auto;
pub mod cidr;
pub mod layering;
pub mod resolved;
pub mod schema;
#[cfg(test)]
mod tests;
pub mod validate;

use std::path::PathBuf;

use crate::models::{DeviceClass, DeviceSpec, Precision};
pub use schema::{BatchLimits, Config, FetchConfig, Layers, ModelConfig, Overrides, ServerConfig};

/// The built-in defaults, documented key by key.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Prefix of every environment variable the configuration reads.
pub const ENV_PREFIX: &str = "VLEMBED_";

/// Why a configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid TOML in {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid configuration ({origin}): {message}")]
    Invalid { origin: String, message: String },
}

fn invalid(origin: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin: origin.into(),
        message: message.into(),
    }
}

/// The precision `dtype = "auto"` picks: bf16 when every device is a CUDA
/// device (tensor cores, half the memory, cosine >= 0.999 to f32), else f32
/// (the reference, and the fastest on CPU).
pub fn auto_precision(devices: &[DeviceSpec]) -> Precision {
    match DeviceClass::of(devices) {
        DeviceClass::Gpu => Precision::Bf16,
        DeviceClass::Cpu => Precision::F32,
    }
}
