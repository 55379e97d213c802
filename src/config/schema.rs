//! The configuration's sections as typed values: what each key means and
//! its type, and the keys that follow the devices resolved from them
//! ([`ModelConfig::resolve_auto`], [`Config::preprocess_threads`], by the
//! rules of [`super::auto`]). Defaults live in `config/default.toml`; how the
//! sources are merged is [`super::layering`], what is checked beyond types
//! [`super::validate`].

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Table;

use super::auto::{self, AutoCount, AutoKeys, DeviceDefaults};
use super::{auto_precision, ENV_PREFIX};
use crate::models::{CpuBackend, DeviceClass, DeviceSpec, ModelSource, PassLimits, Precision};

/// The `[server]` section.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Secrets: never written out (`vlembed config` names only their count).
    #[serde(skip_serializing)]
    pub api_keys: Vec<String>,
    pub max_body_bytes: usize,
    pub max_concurrent_requests: usize,
    pub max_inputs_per_request: usize,
    /// Longest text (or instruction) in one input, in characters, checked
    /// while the body is read (413 above it).
    pub max_text_chars: usize,
    /// Largest encoded image in one input, in bytes (after base64 decoding),
    /// checked while the body is read (413 above it).
    pub max_image_bytes: usize,
    pub request_timeout_ms: u64,
    /// Inputs preprocessed at once; 0 (`"auto"` in a layer): resolved from
    /// the cores and the models' devices ([`super::Config::preprocess_threads`]).
    #[serde(deserialize_with = "super::auto::threads")]
    pub preprocess_threads: usize,
    pub retry_after_s: u64,
    pub shutdown_timeout_ms: u64,
    pub fetch_image_urls: bool,
    /// After SIGTERM, how long `/ready` answers 503 while requests are still
    /// served, before the server stops accepting (load balancers move away).
    pub drain_delay_ms: u64,
    pub max_connections: usize,
    pub header_read_timeout_ms: u64,
    pub keep_alive_timeout_ms: u64,
    pub body_read_timeout_ms: u64,
    pub body_min_rate_bytes_per_s: u64,
    pub max_buffered_body_bytes: usize,
    /// Rebuilds of a panicked worker in a row (without a batch served in
    /// between) before it is given up and `/health` turns unhealthy.
    pub worker_restart_limit: u32,
    /// Back-off before the first rebuild; doubles with each one in a row.
    pub worker_restart_backoff_ms: u64,
    /// Log one line per request (target `vlembed::access`).
    pub access_log: bool,
    /// Routes (as routed, e.g. "/health") left out of the access log.
    pub access_log_exclude: Vec<String>,
    /// Origins allowed by CORS; empty: CORS off; `["*"]`: any origin.
    pub cors_allowed_origins: Vec<String>,
    /// Serve the playground page at `/`.
    pub playground: bool,
    /// Serve the rendered API documentation at `/docs`.
    pub docs: bool,
    /// OTLP/HTTP endpoint traces are exported to (e.g.
    /// "http://collector:4318"); empty: no export.
    pub otlp_endpoint: String,
    /// Let cuBLAS compute f32 matmuls with TF32 tensor cores (CUDA only; a
    /// process-wide switch). Off: f32 stays the parity reference.
    pub allow_tf32: bool,
}

impl ServerConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    pub fn worker_restart_backoff(&self) -> Duration {
        Duration::from_millis(self.worker_restart_backoff_ms)
    }

    pub fn drain_delay(&self) -> Duration {
        Duration::from_millis(self.drain_delay_ms)
    }
}

/// The `[fetch]` section: how image URLs are fetched when
/// `server.fetch_image_urls` is on (see `crate::fetch`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FetchConfig {
    /// Hosts that may be fetched from (exact names, `*.example.com`,
    /// `.example.com`); empty: any host whose addresses pass the checks.
    pub allowed_hosts: Vec<String>,
    /// Allow loopback addresses (127.0.0.0/8, ::1).
    pub allow_loopback: bool,
    /// Allow private addresses (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7).
    pub allow_private: bool,
    /// Networks allowed whatever range they fall in (e.g. "10.1.0.0/16").
    pub allowed_cidrs: Vec<String>,
    pub connect_timeout_ms: u64,
    /// The whole fetch (resolution, connection, redirects, body).
    pub timeout_ms: u64,
    /// Largest fetched image in bytes (also capped by `server.max_image_bytes`).
    pub max_bytes: usize,
    pub max_redirects: usize,
    /// Fetches in progress at once over the whole server.
    pub max_concurrent_fetches: usize,
    /// Fetches in progress at once for one request.
    pub max_fetches_per_request: usize,
    pub user_agent: String,
}

impl FetchConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// Batching limits of one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_batch_size: usize,
    pub max_batch_cost: usize,
    pub max_queue_inputs: usize,
    pub max_delay: Duration,
    /// After a batch, how long a worker may wait for as much work as it
    /// had to come back (at most a quarter of its run time; see
    /// [`crate::batching::Refill`]). Zero: never.
    pub refill_wait: Duration,
}

/// One served model, after defaults are applied and values validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The name clients use in requests.
    pub name: String,
    /// A Hub id or a local directory, as configured.
    pub source: String,
    pub revision: String,
    pub dtype: Precision,
    /// `dtype = "auto"` (the default): `dtype` follows the devices (see
    /// [`auto_precision`]), also when `--devices` changes them.
    pub dtype_auto: bool,
    /// What the CPU replicas' matrix products run on (`auto`: measured at load).
    pub cpu_backend: CpuBackend,
    pub devices: Vec<DeviceSpec>,
    pub batching: BatchLimits,
    /// How much of a batch one step of the forward pass holds
    /// (`decoder_group_tokens`, `vision_tile_chunk`).
    pub pass: PassLimits,
    /// Which device-dependent keys were `"auto"`: they follow `devices`
    /// (see [`super::auto`]), also when `--devices` changes them.
    pub auto: AutoKeys,
    pub max_image_pixels: u64,
    /// Most pixels the images of one request may declare in all.
    pub max_request_image_pixels: u64,
    /// The longest prompt an MLLM takes, in tokens (image tokens included);
    /// `None` (0 in the config): the model's default. CLIP models ignore it
    /// (their limit is the text tower's).
    pub max_input_tokens: Option<usize>,
    /// The prompt format of a model whose family offers several (Qwen2-VL:
    /// "chat-template", "screenshot", "gme"); `None` (empty in the config):
    /// the one its Hub id names, else the family's default.
    pub prompt_format: Option<String>,
    /// The least / most pixels images are resized to, for families whose
    /// processed size follows the image (Qwen2-VL); `None` (0 in the
    /// config): the model's own (its prompt format's, else
    /// `preprocessor_config.json`).
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
    /// Bytes of the model's embedding cache; 0: no cache.
    pub embedding_cache_bytes: usize,
    /// A golden-vectors file (`vlembed probe --out`): the startup probes
    /// must match it within its tolerance, else the model is not ready.
    pub golden_vectors: Option<PathBuf>,
}

impl ModelConfig {
    /// The class of the model's devices.
    pub fn device_class(&self) -> DeviceClass {
        DeviceClass::of(&self.devices)
    }

    /// Sets every key that was `"auto"` from the model's devices.
    pub fn resolve_auto(&mut self) {
        let d = DeviceDefaults::for_class(self.device_class());
        if self.dtype_auto {
            self.dtype = auto_precision(&self.devices);
        }
        let a = self.auto;
        if a.max_batch_size {
            self.batching.max_batch_size = d.max_batch_size;
        }
        if a.max_batch_cost {
            self.batching.max_batch_cost = d.max_batch_cost;
        }
        if a.decoder_group_tokens {
            self.pass.decoder_group_tokens = d.pass.decoder_group_tokens;
        }
        if a.vision_tile_chunk {
            self.pass.vision_tile_chunk = d.pass.vision_tile_chunk;
        }
    }

    /// The keys resolved from the devices, in the order of the config file.
    pub fn auto_keys(&self) -> Vec<&'static str> {
        let a = self.auto;
        [
            ("dtype", self.dtype_auto),
            ("max_batch_size", a.max_batch_size),
            ("max_batch_cost", a.max_batch_cost),
            ("decoder_group_tokens", a.decoder_group_tokens),
            ("vision_tile_chunk", a.vision_tile_chunk),
        ]
        .into_iter()
        .filter_map(|(k, on)| on.then_some(k))
        .collect()
    }

    /// Where the model's files come from.
    pub fn model_source(&self) -> ModelSource {
        ModelSource::parse(&self.source, Some(&self.revision))
    }
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    /// `[fetch]`: image URL fetching (used when `server.fetch_image_urls`).
    pub fetch: FetchConfig,
    pub models: Vec<ModelConfig>,
    /// `[model_defaults]` as merged from every layer (for models added later).
    pub(super) model_defaults: Table,
}

/// Overrides given on the command line or through the flags' short
/// environment variables. `None` leaves the layers below untouched.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub api_keys: Option<Vec<String>>,
    /// Serve this one model instead of the configured list.
    pub model: Option<String>,
    pub model_name: Option<String>,
    pub revision: Option<String>,
    pub devices: Option<Vec<DeviceSpec>>,
    pub dtype: Option<Precision>,
    pub cpu_backend: Option<CpuBackend>,
    pub otlp_endpoint: Option<String>,
}

impl Overrides {
    /// `self` with every field that `higher` sets replaced by `higher`'s.
    pub fn overlay(self, higher: Overrides) -> Overrides {
        Overrides {
            host: higher.host.or(self.host),
            port: higher.port.or(self.port),
            api_keys: higher.api_keys.or(self.api_keys),
            model: higher.model.or(self.model),
            model_name: higher.model_name.or(self.model_name),
            revision: higher.revision.or(self.revision),
            devices: higher.devices.or(self.devices),
            dtype: higher.dtype.or(self.dtype),
            cpu_backend: higher.cpu_backend.or(self.cpu_backend),
            otlp_endpoint: higher.otlp_endpoint.or(self.otlp_endpoint),
        }
    }
}

/// Every source of configuration, lowest precedence first (after the
/// built-in defaults).
#[derive(Debug, Clone, Default)]
pub struct Layers {
    /// A TOML file (`--config`).
    pub file: Option<PathBuf>,
    /// Environment variables (name, value); names without the `VLEMBED_`
    /// prefix are ignored.
    pub env: Vec<(String, String)>,
    /// Command-line flags.
    pub flags: Overrides,
}

impl Layers {
    /// Layers with the process's environment.
    pub fn from_process_env(file: Option<PathBuf>, flags: Overrides) -> Self {
        let env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        Layers { file, env, flags }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) server: ServerConfig,
    pub(super) fetch: FetchConfig,
    pub(super) model_defaults: Table,
    #[serde(default)]
    pub(super) models: Vec<Table>,
}

/// `dtype` as written in a config layer: a precision or `"auto"`.
#[derive(Debug, Clone, Copy)]
pub(super) enum DtypeSetting {
    Auto,
    Fixed(Precision),
}

impl<'de> Deserialize<'de> for DtypeSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(DtypeSetting::Auto);
        }
        s.parse::<Precision>()
            .map(DtypeSetting::Fixed)
            .map_err(|e| serde::de::Error::custom(format!("{e} or auto")))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    pub(super) name: Option<String>,
    pub(super) source: String,
    pub(super) revision: String,
    pub(super) dtype: DtypeSetting,
    pub(super) cpu_backend: CpuBackend,
    pub(super) devices: Vec<String>,
    pub(super) max_batch_size: AutoCount,
    pub(super) max_batch_cost: AutoCount,
    pub(super) decoder_group_tokens: AutoCount,
    pub(super) vision_tile_chunk: AutoCount,
    pub(super) max_queue_inputs: usize,
    pub(super) max_delay_ms: u64,
    pub(super) refill_wait_ms: u64,
    pub(super) max_image_pixels: u64,
    pub(super) max_request_image_pixels: u64,
    pub(super) max_input_tokens: usize,
    pub(super) prompt_format: String,
    pub(super) min_pixels: u64,
    pub(super) max_pixels: u64,
    pub(super) embedding_cache_bytes: usize,
    pub(super) golden_vectors: String,
}

impl Config {
    /// Looks a model up by name.
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The class of the whole server: GPU when every device of every model
    /// is a GPU.
    pub fn device_class(&self) -> DeviceClass {
        let all: Vec<DeviceSpec> = self
            .models
            .iter()
            .flat_map(|m| m.devices.iter().copied())
            .collect();
        DeviceClass::of(&all)
    }

    /// Preprocessing concurrency: `server.preprocess_threads`, or when it is
    /// auto ([`auto::preprocess_threads`]) resolved for this machine and the
    /// served models' devices.
    pub fn preprocess_threads(&self) -> usize {
        self.preprocess_threads_on(auto::cores())
    }

    /// [`Self::preprocess_threads`] on a machine of `cores` cores.
    pub fn preprocess_threads_on(&self, cores: usize) -> usize {
        if self.server.preprocess_threads > 0 {
            return self.server.preprocess_threads;
        }
        let workers = self.models.iter().map(|m| m.devices.len()).sum();
        auto::preprocess_threads(self.device_class(), cores, workers)
    }
}
