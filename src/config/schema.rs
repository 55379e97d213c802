//! The configuration's sections as typed values: what each key means and
//! its type. Defaults live in `config/default.toml`; how the sources are
//! merged is [`super::layering`], what is checked beyond types
//! [`super::validate`].

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Table;

use super::ENV_PREFIX;
use crate::models::{DeviceSpec, ModelSource, Precision};

/// The `[server]` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
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

    /// Preprocessing concurrency; `0` means a quarter of the CPU cores (at
    /// least one), so preprocessing does not preempt the model's rayon
    /// threads: the pool's matmuls run at the speed of their slowest thread.
    pub fn preprocess_concurrency(&self) -> usize {
        if self.preprocess_threads > 0 {
            self.preprocess_threads
        } else {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / 4).max(1)
        }
    }
}

/// The `[fetch]` section: how image URLs are fetched when
/// `server.fetch_image_urls` is on (see `crate::fetch`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
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
    pub devices: Vec<DeviceSpec>,
    pub batching: BatchLimits,
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
    pub(super) devices: Vec<String>,
    pub(super) max_batch_size: usize,
    pub(super) max_batch_cost: usize,
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
}
