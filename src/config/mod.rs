//! Server configuration: the structs, their layering and their validation.
//!
//! Owns reading `config/default.toml` (compiled in), an optional `--config`
//! file, `VLEMBED_*` environment variables and command-line overrides, in that
//! order of precedence, into one validated [`Config`]. It touches no model
//! files and no network; it may not depend on the HTTP, batching or worker
//! modules.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::{Table, Value};

use crate::models::{CpuBackend, DeviceSpec, ModelSource, Precision};

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

/// Checks a `fetch.allowed_cidrs` entry: `ADDRESS[/PREFIX]`.
fn check_cidr(s: &str) -> Result<(), String> {
    let (addr, len) = s.trim().split_once('/').unwrap_or((s.trim(), ""));
    let addr: std::net::IpAddr = addr
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| format!("{s:?} is not an IP network like \"10.1.0.0/16\""))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if !len.is_empty() && !matches!(len.parse::<u32>(), Ok(n) if n <= max) {
        return Err(format!("{s:?}: the prefix length must be 0 to {max}"));
    }
    Ok(())
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
    pub max_image_pixels: u64,
    /// Most pixels the images of one request may declare in all.
    pub max_request_image_pixels: u64,
    /// The longest prompt an MLLM takes, in tokens (image tokens included);
    /// `None` (0 in the config): the model's default. CLIP models ignore it
    /// (their limit is the text tower's).
    pub max_input_tokens: Option<usize>,
    /// Bytes of the model's embedding cache; 0: no cache.
    pub embedding_cache_bytes: usize,
    /// A golden-vectors file (`vlembed probe --out`): the startup probes
    /// must match it within its tolerance, else the model is not ready.
    pub golden_vectors: Option<PathBuf>,
}

impl ModelConfig {
    /// A model with the built-in defaults, named after its source.
    pub fn with_defaults(source: &str) -> Result<Self, ConfigError> {
        let defaults = Config::builtin()?.model_defaults;
        let mut table = defaults;
        table.insert("source".into(), Value::String(source.to_string()));
        resolve_model(table, "built-in defaults")
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
    model_defaults: Table,
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

/// Environment variables read by other parts of the program, not by the
/// configuration layers.
const ENV_NOT_CONFIG: &[&str] = &["VLEMBED_LOG", "VLEMBED_JSON_LOGS", "VLEMBED_CONFIG"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: ServerConfig,
    fetch: FetchConfig,
    model_defaults: Table,
    #[serde(default)]
    models: Vec<Table>,
}

/// The precision `dtype = "auto"` picks: bf16 when every device is a CUDA
/// device (tensor cores, half the memory, cosine >= 0.999 to f32), else f32
/// (the reference, and the fastest on CPU).
pub fn auto_precision(devices: &[DeviceSpec]) -> Precision {
    if !devices.is_empty() && devices.iter().all(|d| matches!(d, DeviceSpec::Cuda(_))) {
        Precision::Bf16
    } else {
        Precision::F32
    }
}

/// `dtype` as written in a config layer: a precision or `"auto"`.
#[derive(Debug, Clone, Copy)]
enum DtypeSetting {
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
struct RawModel {
    name: Option<String>,
    source: String,
    revision: String,
    dtype: DtypeSetting,
    cpu_backend: CpuBackend,
    devices: Vec<String>,
    max_batch_size: usize,
    max_batch_cost: usize,
    max_queue_inputs: usize,
    max_delay_ms: u64,
    refill_wait_ms: u64,
    max_image_pixels: u64,
    max_request_image_pixels: u64,
    max_input_tokens: usize,
    embedding_cache_bytes: usize,
    golden_vectors: String,
}

impl Config {
    /// The built-in defaults alone (no models).
    pub fn builtin() -> Result<Self, ConfigError> {
        let table = parse_toml(DEFAULT_TOML, "config/default.toml (built in)")?;
        Self::from_table(table, "config/default.toml (built in)")
    }

    /// Builds the configuration from every layer and validates it.
    pub fn load(layers: &Layers) -> Result<Self, ConfigError> {
        let mut table = parse_toml(DEFAULT_TOML, "config/default.toml (built in)")?;
        let mut origin = "config/default.toml".to_string();
        if let Some(path) = &layers.file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let file = parse_toml(&text, &path.display().to_string())?;
            merge(&mut table, file);
            origin = path.display().to_string();
        }
        let (env_table, env_overrides) = env_layer(&layers.env)?;
        if !env_table.is_empty() {
            merge(&mut table, env_table);
            origin.push_str(" + environment");
        }
        let mut config = Self::from_table(table, &origin)?;
        config.apply(env_overrides.overlay(layers.flags.clone()))?;
        config.validate()?;
        Ok(config)
    }

    fn from_table(table: Table, origin: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = deserialize(Value::Table(table), origin)?;
        let models = raw
            .models
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let mut t = raw.model_defaults.clone();
                merge(&mut t, m);
                resolve_model(t, &format!("{origin}, models[{i}]"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The defaults must be valid on their own too (they are what --model uses).
        let mut probe = raw.model_defaults.clone();
        probe.insert("source".into(), Value::String("probe".into()));
        resolve_model(probe, &format!("{origin}, [model_defaults]"))?;
        Ok(Config {
            server: raw.server,
            fetch: raw.fetch,
            models,
            model_defaults: raw.model_defaults,
        })
    }

    /// Applies command-line style overrides.
    pub fn apply(&mut self, o: Overrides) -> Result<(), ConfigError> {
        if let Some(host) = o.host {
            self.server.host = host;
        }
        if let Some(port) = o.port {
            self.server.port = port;
        }
        if let Some(keys) = o.api_keys {
            if keys.is_empty() {
                return Err(invalid("api keys", EMPTY_KEYS));
            }
            self.server.api_keys = keys;
        }
        if let Some(e) = o.otlp_endpoint {
            self.server.otlp_endpoint = e;
        }
        if let Some(source) = o.model {
            let mut t = self.model_defaults.clone();
            t.insert("source".into(), Value::String(source));
            if let Some(name) = &o.model_name {
                t.insert("name".into(), Value::String(name.clone()));
            }
            if let Some(rev) = &o.revision {
                t.insert("revision".into(), Value::String(rev.clone()));
            }
            self.models = vec![resolve_model(t, "--model")?];
        } else if let Some(name) = o.model_name {
            match self.models.as_mut_slice() {
                [only] => only.name = name,
                _ => {
                    return Err(invalid(
                        "--model-name",
                        format!(
                            "--model-name needs --model or exactly one configured model, found {}",
                            self.models.len()
                        ),
                    ))
                }
            }
        }
        for m in &mut self.models {
            if let Some(rev) = &o.revision {
                m.revision.clone_from(rev);
            }
            if let Some(devices) = &o.devices {
                m.devices.clone_from(devices);
                if m.dtype_auto {
                    m.dtype = auto_precision(&m.devices);
                }
            }
            if let Some(dtype) = o.dtype {
                m.dtype = dtype;
                m.dtype_auto = false;
            }
            if let Some(b) = o.cpu_backend {
                m.cpu_backend = b;
            }
        }
        Ok(())
    }

    /// Checks the `[fetch]` section (whether or not fetching is on).
    fn validate_fetch(&self) -> Result<(), ConfigError> {
        let f = &self.fetch;
        for (key, value) in [
            ("fetch.connect_timeout_ms", f.connect_timeout_ms),
            ("fetch.timeout_ms", f.timeout_ms),
            ("fetch.max_bytes", f.max_bytes as u64),
            (
                "fetch.max_concurrent_fetches",
                f.max_concurrent_fetches as u64,
            ),
            (
                "fetch.max_fetches_per_request",
                f.max_fetches_per_request as u64,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if f.max_redirects > 20 {
            return Err(invalid("fetch.max_redirects", "must be at most 20"));
        }
        if f.allowed_hosts.iter().any(|h| h.trim().is_empty()) {
            return Err(invalid("fetch.allowed_hosts", "entries must not be empty"));
        }
        for c in &f.allowed_cidrs {
            check_cidr(c).map_err(|e| invalid("fetch.allowed_cidrs", e))?;
        }
        if f.user_agent.trim().is_empty()
            || f.user_agent
                .chars()
                .any(|c| c.is_control() || !c.is_ascii())
        {
            return Err(invalid(
                "fetch.user_agent",
                "must be a non-empty line of printable ASCII",
            ));
        }
        Ok(())
    }

    /// Checks values that are valid TOML but make no sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.host.trim().is_empty() {
            return Err(invalid("server.host", "must not be empty"));
        }
        if s.api_keys.iter().any(|k| k.trim().is_empty()) {
            return Err(invalid("server.api_keys", "keys must not be empty"));
        }
        if s.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes", "must be at least 1"));
        }
        if s.max_concurrent_requests == 0 {
            return Err(invalid(
                "server.max_concurrent_requests",
                "must be at least 1",
            ));
        }
        if s.max_inputs_per_request == 0 {
            return Err(invalid(
                "server.max_inputs_per_request",
                "must be at least 1",
            ));
        }
        if s.max_text_chars == 0 {
            return Err(invalid("server.max_text_chars", "must be at least 1"));
        }
        if s.max_image_bytes == 0 {
            return Err(invalid("server.max_image_bytes", "must be at least 1"));
        }
        if s.request_timeout_ms == 0 {
            return Err(invalid("server.request_timeout_ms", "must be at least 1"));
        }
        for (key, value) in [
            ("server.max_connections", s.max_connections as u64),
            ("server.header_read_timeout_ms", s.header_read_timeout_ms),
            ("server.keep_alive_timeout_ms", s.keep_alive_timeout_ms),
            ("server.body_read_timeout_ms", s.body_read_timeout_ms),
            (
                "server.body_min_rate_bytes_per_s",
                s.body_min_rate_bytes_per_s,
            ),
            ("server.shutdown_timeout_ms", s.shutdown_timeout_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if s.max_buffered_body_bytes < s.max_body_bytes {
            return Err(invalid(
                "server.max_buffered_body_bytes",
                format!(
                    "({}) must be at least server.max_body_bytes ({}), or no full-size body \
                     could ever be received",
                    s.max_buffered_body_bytes, s.max_body_bytes
                ),
            ));
        }
        if s.drain_delay_ms >= s.shutdown_timeout_ms {
            return Err(invalid(
                "server.drain_delay_ms",
                format!(
                    "({}) must be below server.shutdown_timeout_ms ({}), which bounds the whole \
                     shutdown including the delay",
                    s.drain_delay_ms, s.shutdown_timeout_ms
                ),
            ));
        }
        if s.cors_allowed_origins.iter().any(|o| o.trim().is_empty())
            || (s.cors_allowed_origins.len() > 1 && s.cors_allowed_origins.iter().any(|o| o == "*"))
        {
            return Err(invalid(
                "server.cors_allowed_origins",
                "list origins such as \"https://app.example.com\", or [\"*\"] alone for any origin; \
                 entries must not be empty",
            ));
        }
        let otlp = s.otlp_endpoint.trim();
        if !otlp.is_empty() && !otlp.starts_with("http://") && !otlp.starts_with("https://") {
            return Err(invalid(
                "server.otlp_endpoint",
                format!("{otlp:?} is not an http:// or https:// URL (OTLP over HTTP, e.g. \"http://collector:4318\")"),
            ));
        }
        self.validate_fetch()?;
        if self.models.is_empty() {
            return Err(invalid(
                "models",
                "no model to serve: give --model SOURCE or list [[models]] in a --config file",
            ));
        }
        for (i, m) in self.models.iter().enumerate() {
            let at = format!("models[{i}] ({})", m.name);
            if m.name.trim().is_empty() {
                return Err(invalid(at, "name must not be empty"));
            }
            if self.models[..i].iter().any(|o| o.name == m.name) {
                return Err(invalid(
                    at,
                    format!(
                        "two models are named {:?}; give each a distinct name",
                        m.name
                    ),
                ));
            }
            if m.devices.is_empty() {
                return Err(invalid(at, "devices must list at least one device"));
            }
            let b = &m.batching;
            if b.max_batch_size == 0 || b.max_batch_cost == 0 || b.max_queue_inputs == 0 {
                return Err(invalid(
                    at,
                    "max_batch_size, max_batch_cost and max_queue_inputs must be at least 1",
                ));
            }
            if b.max_queue_inputs < s.max_inputs_per_request {
                return Err(invalid(
                    at,
                    format!(
                        "max_queue_inputs ({}) is below server.max_inputs_per_request ({}): \
                         a full-size request could never be admitted",
                        b.max_queue_inputs, s.max_inputs_per_request
                    ),
                ));
            }
            if m.max_image_pixels == 0 {
                return Err(invalid(at, "max_image_pixels must be at least 1"));
            }
            if m.max_request_image_pixels == 0 {
                return Err(invalid(at, "max_request_image_pixels must be at least 1"));
            }
        }
        Ok(())
    }

    /// Looks a model up by name.
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }
}

fn parse_toml(text: &str, origin: &str) -> Result<Table, ConfigError> {
    text.parse::<Table>().map_err(|e| ConfigError::Parse {
        origin: origin.to_string(),
        message: e.to_string(),
    })
}

fn deserialize<T: serde::de::DeserializeOwned>(
    value: Value,
    origin: &str,
) -> Result<T, ConfigError> {
    T::deserialize(value).map_err(|e| invalid(origin, e.to_string().trim().to_string()))
}

fn resolve_model(table: Table, origin: &str) -> Result<ModelConfig, ConfigError> {
    let raw: RawModel = deserialize(Value::Table(table), origin)?;
    if raw.source.trim().is_empty() {
        return Err(invalid(origin, "source must not be empty"));
    }
    let devices = raw
        .devices
        .iter()
        .map(|d| d.parse::<DeviceSpec>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(origin, e))?;
    let name = match raw.name {
        Some(n) => n,
        None => ModelSource::parse(&raw.source, Some(&raw.revision)).default_name(),
    };
    let (dtype, dtype_auto) = match raw.dtype {
        DtypeSetting::Auto => (auto_precision(&devices), true),
        DtypeSetting::Fixed(p) => (p, false),
    };
    Ok(ModelConfig {
        name,
        source: raw.source,
        revision: raw.revision,
        dtype,
        dtype_auto,
        cpu_backend: raw.cpu_backend,
        devices,
        batching: BatchLimits {
            max_batch_size: raw.max_batch_size,
            max_batch_cost: raw.max_batch_cost,
            max_queue_inputs: raw.max_queue_inputs,
            max_delay: Duration::from_millis(raw.max_delay_ms),
            refill_wait: Duration::from_millis(raw.refill_wait_ms),
        },
        max_image_pixels: raw.max_image_pixels,
        max_request_image_pixels: raw.max_request_image_pixels,
        max_input_tokens: (raw.max_input_tokens > 0).then_some(raw.max_input_tokens),
        embedding_cache_bytes: raw.embedding_cache_bytes,
        golden_vectors: (!raw.golden_vectors.trim().is_empty())
            .then(|| PathBuf::from(raw.golden_vectors.trim())),
    })
}

/// Deep-merges `over` into `base`: tables merge key by key, anything else
/// (arrays included) replaces.
fn merge(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// A value from the environment: TOML when it parses as a TOML value, else a
/// plain string.
fn env_value(raw: &str) -> Value {
    let doc = format!("v = {raw}");
    match doc.parse::<Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| Value::String(raw.to_string())),
        Err(_) => Value::String(raw.to_string()),
    }
}

fn comma_list(raw: &str) -> Vec<String> {
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Why an empty key list from the environment is refused: it would silently
/// replace the config file's keys and switch authentication off.
const EMPTY_KEYS: &str = "the API key list is empty; this would switch authentication off. \
     Unset the variable to keep the keys of the config file, or set server.api_keys = [] \
     in a config file to serve without authentication";

/// Splits the environment into a TOML patch (`VLEMBED_SECTION__KEY`) and the
/// flags' short forms.
fn env_layer(env: &[(String, String)]) -> Result<(Table, Overrides), ConfigError> {
    let mut table = Table::new();
    let mut o = Overrides::default();
    let mut sorted: Vec<&(String, String)> = env.iter().collect();
    sorted.sort();
    for (name, value) in sorted {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if ENV_NOT_CONFIG.contains(&name.as_str()) {
            continue;
        }
        if let Some((section, key)) = rest.split_once("__") {
            let section = section.to_ascii_lowercase();
            let key = key.to_ascii_lowercase();
            if !matches!(section.as_str(), "server" | "model_defaults" | "fetch") || key.is_empty()
            {
                return Err(invalid(
                    name.clone(),
                    "expected VLEMBED_SERVER__<KEY>, VLEMBED_MODEL_DEFAULTS__<KEY> or VLEMBED_FETCH__<KEY>",
                ));
            }
            let mut v = env_value(value);
            if matches!(
                key.as_str(),
                "api_keys" | "devices" | "allowed_hosts" | "allowed_cidrs"
            ) {
                if let Value::String(s) = &v {
                    v = Value::Array(comma_list(s).into_iter().map(Value::String).collect());
                }
            }
            if key == "api_keys" && matches!(&v, Value::Array(a) if a.is_empty()) {
                return Err(invalid(name.clone(), EMPTY_KEYS));
            }
            let entry = table
                .entry(section)
                .or_insert_with(|| Value::Table(Table::new()));
            if let Value::Table(t) = entry {
                t.insert(key, v);
            }
            continue;
        }
        let bad = |e: String| invalid(name.clone(), e);
        match rest {
            "HOST" => o.host = Some(value.clone()),
            "PORT" => {
                o.port = Some(
                    value
                        .trim()
                        .parse()
                        .map_err(|_| bad(format!("{value:?} is not a port number")))?,
                )
            }
            "API_KEYS" => {
                let keys = comma_list(value);
                if keys.is_empty() {
                    return Err(invalid(name.clone(), EMPTY_KEYS));
                }
                o.api_keys = Some(keys)
            }
            "MODEL" => o.model = Some(value.clone()),
            "MODEL_NAME" => o.model_name = Some(value.clone()),
            "REVISION" => o.revision = Some(value.clone()),
            "DEVICES" => o.devices = Some(parse_devices(value).map_err(bad)?),
            "DTYPE" => o.dtype = Some(value.parse().map_err(bad)?),
            "CPU_BACKEND" => {
                o.cpu_backend = Some(
                    value
                        .parse::<CpuBackend>()
                        .map_err(|e| bad(e.to_string()))?,
                )
            }
            "OTLP_ENDPOINT" => o.otlp_endpoint = Some(value.clone()),
            _ => tracing::warn!(variable = %name, "ignoring unknown VLEMBED_ environment variable"),
        }
    }
    Ok((table, o))
}

/// Parses a comma-separated device list (`cpu`, `cuda:0,cuda:1`).
pub fn parse_devices(s: &str) -> Result<Vec<DeviceSpec>, String> {
    let devices = comma_list(s)
        .iter()
        .map(|d| d.parse::<DeviceSpec>())
        .collect::<Result<Vec<_>, _>>()?;
    if devices.is_empty() {
        return Err("the device list is empty".into());
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn write_file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vlembed-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn builtin_defaults_parse_and_need_a_model() {
        let c = Config::builtin().unwrap();
        assert_eq!(c.server.port, 8080);
        assert!(c.models.is_empty());
        let err = Config::load(&Layers::default()).unwrap_err().to_string();
        assert!(err.contains("--model"), "{err}");
    }

    #[test]
    fn model_flag_serves_one_model_with_defaults() {
        let layers = Layers {
            flags: Overrides {
                model: Some("BAAI/BGE-VL-base".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = Config::load(&layers).unwrap();
        assert_eq!(c.models.len(), 1);
        let m = &c.models[0];
        assert_eq!(m.name, "BAAI/BGE-VL-base");
        assert_eq!(m.devices, vec![DeviceSpec::Cpu]);
        assert_eq!(m.dtype, Precision::F32);
        assert_eq!(m.batching.max_batch_size, 32);
        assert_eq!(m.batching.max_delay, Duration::ZERO);
    }

    #[test]
    fn layers_apply_in_order_file_env_flags() {
        let file = write_file(
            "layers.toml",
            r#"
            [server]
            port = 9000
            host = "127.0.0.1"
            request_timeout_ms = 1234
            [model_defaults]
            max_batch_size = 8
            [[models]]
            name = "a"
            source = "org/a"
            dtype = "f16"
            [[models]]
            name = "b"
            source = "org/b"
            max_batch_size = 4
            devices = ["cuda:0", "cuda:1"]
            "#,
        );
        let layers = Layers {
            file: Some(file),
            env: env(&[
                ("VLEMBED_SERVER__PORT", "9100"),
                ("VLEMBED_SERVER__REQUEST_TIMEOUT_MS", "5000"),
                ("VLEMBED_HOST", "10.0.0.1"),
                ("VLEMBED_SERVER__API_KEYS", "k1, k2"),
                ("VLEMBED_LOG", "debug"),
                ("PATH", "/bin"),
            ]),
            flags: Overrides {
                port: Some(9200),
                ..Default::default()
            },
        };
        let c = Config::load(&layers).unwrap();
        // flags > env > file > defaults
        assert_eq!(c.server.port, 9200);
        assert_eq!(c.server.host, "10.0.0.1");
        assert_eq!(c.server.request_timeout_ms, 5000);
        assert_eq!(c.server.api_keys, vec!["k1", "k2"]);
        assert_eq!(c.server.max_body_bytes, 16777216);
        let a = c.model("a").unwrap();
        assert_eq!((a.dtype, a.batching.max_batch_size), (Precision::F16, 8));
        let b = c.model("b").unwrap();
        assert_eq!(b.batching.max_batch_size, 4);
        assert_eq!(b.devices, vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)]);
        // dtype "auto" (the default) on CUDA devices.
        assert_eq!(b.dtype, Precision::Bf16);
    }

    #[test]
    fn fetch_keys_come_from_files_and_the_environment() {
        let c = Config::builtin().unwrap();
        assert!(!c.server.fetch_image_urls, "URL fetching is off by default");
        assert!(!c.fetch.allow_loopback && !c.fetch.allow_private);
        assert!(c.fetch.allowed_hosts.is_empty() && c.fetch.allowed_cidrs.is_empty());
        assert_eq!(c.fetch.max_redirects, 3);
        let file = write_file(
            "fetch.toml",
            "[server]\nfetch_image_urls = true\n[fetch]\nallow_private = true\n\
             [[models]]\nsource = \"a/b\"\n",
        );
        let c = Config::load(&Layers {
            file: Some(file),
            env: env(&[
                (
                    "VLEMBED_FETCH__ALLOWED_HOSTS",
                    "img.example.com, *.cdn.example.net",
                ),
                ("VLEMBED_FETCH__ALLOWED_CIDRS", "10.1.0.0/16"),
                ("VLEMBED_FETCH__TIMEOUT_MS", "2500"),
            ]),
            ..Default::default()
        })
        .unwrap();
        assert!(c.server.fetch_image_urls && c.fetch.allow_private);
        assert_eq!(
            c.fetch.allowed_hosts,
            vec!["img.example.com", "*.cdn.example.net"]
        );
        assert_eq!(c.fetch.allowed_cidrs, vec!["10.1.0.0/16"]);
        assert_eq!(c.fetch.timeout(), Duration::from_millis(2500));
    }

    #[test]
    fn auto_dtype_follows_the_devices_and_explicit_wins() {
        let load = |file_text: &str, flags: Overrides| {
            let file = write_file("auto-dtype.toml", file_text);
            Config::load(&Layers {
                file: Some(file),
                flags,
                ..Default::default()
            })
            .unwrap()
        };
        let one = "[[models]]\nsource = \"org/a\"\n";
        assert_eq!(
            load(one, Overrides::default()).models[0].dtype,
            Precision::F32
        );
        let cuda = Overrides {
            devices: Some(vec![DeviceSpec::Cuda(0)]),
            ..Default::default()
        };
        let c = load(one, cuda.clone());
        assert_eq!(c.models[0].dtype, Precision::Bf16);
        // An explicit dtype wins, in the file or as a flag.
        let c = load(
            "[[models]]\nsource = \"org/a\"\ndtype = \"f32\"\n",
            cuda.clone(),
        );
        assert_eq!(c.models[0].dtype, Precision::F32);
        let c = load(
            one,
            Overrides {
                dtype: Some(Precision::F16),
                ..cuda
            },
        );
        assert_eq!(c.models[0].dtype, Precision::F16);
        // A model spread over CPU and GPU stays f32.
        let c = load(
            "[[models]]\nsource = \"org/a\"\ndevices = [\"cpu\", \"cuda:0\"]\n",
            Overrides::default(),
        );
        assert_eq!(c.models[0].dtype, Precision::F32);
        assert_eq!(auto_precision(&[]), Precision::F32);
    }

    /// `cpu_backend`: `auto` by default, set per model in a file, for every
    /// model by `VLEMBED_CPU_BACKEND` and by the flag (which wins); a bad
    /// value names the variable and the choices.
    #[test]
    fn cpu_backend_layers() {
        let file = write_file(
            "cpu-backend.toml",
            "[[models]]\nname = \"a\"\nsource = \"org/a\"\ncpu_backend = \"native\"\n\
             [[models]]\nname = \"b\"\nsource = \"org/b\"\n",
        );
        let load = |env_pairs: &[(&str, &str)], flag: Option<CpuBackend>| {
            Config::load(&Layers {
                file: Some(file.clone()),
                env: env(env_pairs),
                flags: Overrides {
                    cpu_backend: flag,
                    ..Default::default()
                },
            })
        };
        let c = load(&[], None).unwrap();
        let got: Vec<CpuBackend> = c.models.iter().map(|m| m.cpu_backend).collect();
        assert_eq!(got, [CpuBackend::Native, CpuBackend::Auto]);
        let c = load(&[("VLEMBED_CPU_BACKEND", "onednn")], None).unwrap();
        assert!(c.models.iter().all(|m| m.cpu_backend == CpuBackend::Onednn));
        let c = load(
            &[("VLEMBED_CPU_BACKEND", "onednn")],
            Some(CpuBackend::Native),
        )
        .unwrap();
        assert!(c.models.iter().all(|m| m.cpu_backend == CpuBackend::Native));
        let err = load(&[("VLEMBED_CPU_BACKEND", "mkl")], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("VLEMBED_CPU_BACKEND") && err.contains("auto, native or onednn"),
            "{err}"
        );
        let bad = write_file(
            "cpu-backend-bad.toml",
            "[[models]]\nsource = \"org/a\"\ncpu_backend = \"gpu\"\n",
        );
        let err = Config::load(&Layers {
            file: Some(bad),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("auto, native or onednn"), "{err}");
    }

    #[test]
    fn flags_override_models_and_env_short_forms() {
        let file = write_file(
            "flags.toml",
            "[[models]]\nname = \"a\"\nsource = \"org/a\"\n",
        );
        let layers = Layers {
            file: Some(file.clone()),
            env: env(&[("VLEMBED_DTYPE", "bf16"), ("VLEMBED_DEVICES", "cuda:1")]),
            flags: Overrides {
                devices: Some(vec![DeviceSpec::Cuda(0)]),
                model_name: Some("renamed".into()),
                ..Default::default()
            },
        };
        let c = Config::load(&layers).unwrap();
        assert_eq!(c.models[0].name, "renamed");
        assert_eq!(c.models[0].dtype, Precision::Bf16);
        assert_eq!(c.models[0].devices, vec![DeviceSpec::Cuda(0)]);

        let layers = Layers {
            file: Some(file),
            env: env(&[("VLEMBED_MODEL", "org/from-env")]),
            flags: Overrides::default(),
        };
        let c = Config::load(&layers).unwrap();
        assert_eq!(c.models.len(), 1);
        assert_eq!(c.models[0].name, "org/from-env");
        assert_eq!(c.server.otlp_endpoint, "");

        let c = Config::load(&Layers {
            env: env(&[("VLEMBED_OTLP_ENDPOINT", "http://env:4318")]),
            flags: Overrides {
                model: Some("a/b".into()),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.server.otlp_endpoint, "http://env:4318");
        let c = Config::load(&Layers {
            env: env(&[("VLEMBED_OTLP_ENDPOINT", "http://env:4318")]),
            flags: Overrides {
                model: Some("a/b".into()),
                otlp_endpoint: Some("http://flag:4318".into()),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.server.otlp_endpoint, "http://flag:4318");
    }

    #[test]
    fn rejects_bad_values_with_their_place() {
        let cases: &[(&str, &str)] = &[
            ("[server]\nprot = 1\n", "prot"),
            ("[server]\nport = \"x\"\n", "port"),
            ("[[models]]\nsource = \"a/b\"\ndevices = [\"tpu\"]\n", "tpu"),
            ("[[models]]\nsource = \"a/b\"\ndtype = \"f64\"\n", "f64"),
            ("[[models]]\nsource = \"a/b\"\nmax_batch_size = 0\n", "max_batch_size"),
            ("[[models]]\nsource = \"a/b\"\nmax_queue_inputs = 4\n", "max_queue_inputs"),
            (
                "[[models]]\nname = \"x\"\nsource = \"a/b\"\n[[models]]\nname = \"x\"\nsource = \"a/c\"\n",
                "distinct",
            ),
            ("[fetch]\ntimeout_ms = 0\n[[models]]\nsource = \"a/b\"\n", "fetch.timeout_ms"),
            ("[fetch]\nallowed_cidrs = [\"10.0.0.0/40\"]\n[[models]]\nsource = \"a/b\"\n", "fetch.allowed_cidrs"),
            ("[fetch]\nallowed_cidrs = [\"ten\"]\n[[models]]\nsource = \"a/b\"\n", "fetch.allowed_cidrs"),
            ("[fetch]\nmax_redirect = 1\n[[models]]\nsource = \"a/b\"\n", "max_redirect"),
            ("[[models]]\nname = \"x\"\n", "source"),
            ("[server\n", "TOML"),
            ("[server]\notlp_endpoint = \"collector:4318\"\n[[models]]\nsource = \"a/b\"\n", "otlp_endpoint"),
            ("[server]\ncors_allowed_origins = [\"*\", \"https://a.b\"]\n[[models]]\nsource = \"a/b\"\n", "cors_allowed_origins"),
            ("[server]\ncors_allowed_origins = [\"\"]\n[[models]]\nsource = \"a/b\"\n", "cors_allowed_origins"),
        ];
        for (i, (text, needle)) in cases.iter().enumerate() {
            let file = write_file(&format!("bad{i}.toml"), text);
            let err = Config::load(&Layers {
                file: Some(file),
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
            assert!(err.contains(needle), "case {i}: {err}");
        }
        let err = Config::load(&Layers {
            env: env(&[("VLEMBED_PORT", "eighty")]),
            flags: Overrides {
                model: Some("a/b".into()),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("VLEMBED_PORT"), "{err}");
        let err = Config::load(&Layers {
            env: env(&[("VLEMBED_NOPE__X", "1")]),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("VLEMBED_NOPE__X"), "{err}");
    }

    #[test]
    fn max_input_tokens_is_per_model_and_zero_means_the_models_default() {
        let file = write_file(
            "tokens.toml",
            r#"
            [model_defaults]
            max_input_tokens = 3500
            [[models]]
            name = "a"
            source = "org/a"
            [[models]]
            name = "b"
            source = "org/b"
            max_input_tokens = 8192
            [[models]]
            name = "c"
            source = "org/c"
            max_input_tokens = 0
            "#,
        );
        let c = Config::load(&Layers {
            file: Some(file.clone()),
            ..Default::default()
        })
        .unwrap();
        let tokens = |name: &str| c.model(name).unwrap().max_input_tokens;
        assert_eq!(tokens("a"), Some(3500));
        assert_eq!(tokens("b"), Some(8192));
        assert_eq!(tokens("c"), None);
        // Unset everywhere: the model's default.
        assert_eq!(
            ModelConfig::with_defaults("org/x")
                .unwrap()
                .max_input_tokens,
            None
        );
        // The environment sets it like any model_defaults key.
        let c = Config::load(&Layers {
            env: env(&[("VLEMBED_MODEL_DEFAULTS__MAX_INPUT_TOKENS", "5000")]),
            flags: Overrides {
                model: Some("org/x".into()),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.models[0].max_input_tokens, Some(5000));
        let file = write_file(
            "tokens-bad.toml",
            "[[models]]\nsource = \"a/b\"\nmax_input_tokens = -1\n",
        );
        let err = Config::load(&Layers {
            file: Some(file),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("max_input_tokens") || err.contains("-1"),
            "{err}"
        );
    }

    #[test]
    fn env_values_are_toml_or_strings() {
        assert_eq!(env_value("12"), Value::Integer(12));
        assert_eq!(env_value("true"), Value::Boolean(true));
        assert_eq!(env_value("0.0.0.0"), Value::String("0.0.0.0".into()));
        assert_eq!(env_value("\"q\""), Value::String("q".into()));
        assert_eq!(
            parse_devices("cpu, cuda:2").unwrap(),
            vec![DeviceSpec::Cpu, DeviceSpec::Cuda(2)]
        );
        assert!(parse_devices(" , ").is_err());
    }

    #[test]
    fn empty_key_lists_from_the_environment_are_errors() {
        for (name, value) in [
            ("VLEMBED_API_KEYS", ""),
            ("VLEMBED_API_KEYS", ","),
            ("VLEMBED_API_KEYS", " , "),
            ("VLEMBED_SERVER__API_KEYS", ""),
            ("VLEMBED_SERVER__API_KEYS", ","),
            ("VLEMBED_SERVER__API_KEYS", "[]"),
        ] {
            let layers = Layers {
                env: env(&[(name, value), ("VLEMBED_MODEL", "org/m")]),
                ..Default::default()
            };
            let err = Config::load(&layers).unwrap_err().to_string();
            assert!(
                err.contains(name) && err.contains("switch authentication off"),
                "{name}={value:?}: {err}"
            );
        }
        let mut c = Config::builtin().unwrap();
        let err = c
            .apply(Overrides {
                api_keys: Some(vec![]),
                ..Default::default()
            })
            .unwrap_err();
        assert!(err.to_string().contains("authentication off"), "{err}");
    }

    #[test]
    fn connection_limits_are_validated() {
        let base = || {
            let mut c = Config::builtin().unwrap();
            c.models = vec![ModelConfig::with_defaults("org/m").unwrap()];
            c
        };
        assert!(base().validate().is_ok());
        let mut c = base();
        c.server.max_connections = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_connections"));
        let mut c = base();
        c.server.max_buffered_body_bytes = c.server.max_body_bytes - 1;
        assert!(c.validate().is_err());
        let mut c = base();
        c.server.drain_delay_ms = c.server.shutdown_timeout_ms;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("drain_delay_ms"));
    }
}
