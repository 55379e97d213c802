//! The resolved configuration as TOML (`vlembed config`): every key with the
//! value a server started from the same layers would use, `"auto"` keys
//! resolved for the models' devices and this machine's cores.
//!
//! Why: the effective batch limits, pass sizes and thread counts depend on
//! devices and cores, so reading the layers is not enough to know them; this
//! prints them without opening a device, reading a model file or touching
//! the network. The output is itself a valid `--config` file that gives the
//! same models (with every auto key fixed to its value); a comment header
//! says which keys were auto and for which device class. API keys are
//! secrets and are not written: the header gives their number (give them
//! through `VLEMBED_API_KEYS` when the output is used as a config file).

use serde::Serialize;

use super::{Config, FetchConfig, ModelConfig, ServerConfig};
use crate::models::CpuBackend;

/// One `[[models]]` entry with every key resolved.
#[derive(Debug, Serialize)]
struct ResolvedModel {
    name: String,
    source: String,
    revision: String,
    dtype: &'static str,
    devices: Vec<String>,
    max_batch_size: usize,
    max_batch_cost: usize,
    decoder_group_tokens: usize,
    vision_tile_chunk: usize,
    max_queue_inputs: usize,
    max_delay_ms: u64,
    refill_wait_ms: u64,
    max_image_pixels: u64,
    max_request_image_pixels: u64,
    max_input_tokens: usize,
    embedding_cache_bytes: usize,
    golden_vectors: String,
    cpu_backend: CpuBackend,
    prompt_format: String,
    min_pixels: u64,
    max_pixels: u64,
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl From<&ModelConfig> for ResolvedModel {
    fn from(m: &ModelConfig) -> Self {
        ResolvedModel {
            name: m.name.clone(),
            source: m.source.clone(),
            revision: m.revision.clone(),
            dtype: m.dtype.as_str(),
            devices: m.devices.iter().map(|d| d.to_string()).collect(),
            max_batch_size: m.batching.max_batch_size,
            max_batch_cost: m.batching.max_batch_cost,
            decoder_group_tokens: m.pass.decoder_group_tokens,
            vision_tile_chunk: m.pass.vision_tile_chunk,
            max_queue_inputs: m.batching.max_queue_inputs,
            max_delay_ms: millis(m.batching.max_delay),
            refill_wait_ms: millis(m.batching.refill_wait),
            max_image_pixels: m.max_image_pixels,
            max_request_image_pixels: m.max_request_image_pixels,
            max_input_tokens: m.max_input_tokens.unwrap_or(0),
            embedding_cache_bytes: m.embedding_cache_bytes,
            golden_vectors: m
                .golden_vectors
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            cpu_backend: m.cpu_backend,
            prompt_format: m.prompt_format.clone().unwrap_or_default(),
            min_pixels: m.min_pixels.unwrap_or(0),
            max_pixels: m.max_pixels.unwrap_or(0),
        }
    }
}

#[derive(Debug, Serialize)]
struct Resolved<'a> {
    server: ServerConfig,
    fetch: &'a FetchConfig,
    models: Vec<ResolvedModel>,
}

/// Why the configuration could not be written as TOML (a value TOML cannot
/// hold; not expected for a validated configuration).
#[derive(Debug, thiserror::Error)]
#[error("cannot write the configuration as TOML: {0}")]
pub struct PrintError(#[from] toml::ser::Error);

impl Config {
    /// The resolved configuration as a TOML document (see the module doc).
    pub fn to_resolved_toml(&self) -> Result<String, PrintError> {
        self.to_resolved_toml_on(super::auto::cores())
    }

    /// [`Self::to_resolved_toml`] as on a machine of `cores` cores.
    pub fn to_resolved_toml_on(&self, cores: usize) -> Result<String, PrintError> {
        let mut server = self.server.clone();
        server.preprocess_threads = self.preprocess_threads_on(cores);
        let doc = Resolved {
            server,
            fetch: &self.fetch,
            models: self.models.iter().map(ResolvedModel::from).collect(),
        };
        let body = toml::to_string(&doc)?;
        Ok(format!("{}\n{body}", self.header(cores)))
    }

    /// The comment block: what was resolved, from what.
    fn header(&self, cores: usize) -> String {
        let mut lines = vec![
            "# vlembed configuration, resolved (`vlembed config`): what `vlembed serve` with"
                .into(),
            "# the same --config file, environment and flags runs with. No device, model".into(),
            "# file or network was opened to write it. Keys that were \"auto\" are resolved".into(),
            "# for their model's devices (gpu: every device is a GPU; else cpu).".into(),
        ];
        let threads = if self.server.preprocess_threads == 0 {
            format!("auto for {} on {cores} cores", self.device_class().as_str())
        } else {
            "set".into()
        };
        lines.push(format!(
            "# server.preprocess_threads = {} ({threads})",
            self.preprocess_threads_on(cores)
        ));
        if !self.server.api_keys.is_empty() {
            lines.push(format!(
                "# server.api_keys: {} keys set, not written here (give them through \
                 VLEMBED_API_KEYS; without them this file serves without authentication)",
                self.server.api_keys.len()
            ));
        }
        for (i, m) in self.models.iter().enumerate() {
            let devices: Vec<String> = m.devices.iter().map(|d| d.to_string()).collect();
            let auto = m.auto_keys();
            lines.push(format!(
                "# models[{i}] {}: {} ({}); auto: {}",
                m.name,
                devices.join(", "),
                m.device_class().as_str(),
                if auto.is_empty() {
                    "none".to_string()
                } else {
                    auto.join(", ")
                }
            ));
        }
        lines.join("\n")
    }
}
