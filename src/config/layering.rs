//! Layering: the built-in defaults, a `--config` file, `VLEMBED_*`
//! environment variables and command-line flags, merged in that order into
//! one [`Config`] (then [`super::validate`]d).

use std::path::PathBuf;
use std::time::Duration;

use toml::{Table, Value};

use super::auto::AutoKeys;
use super::schema::{DtypeSetting, RawConfig, RawModel};
use super::{
    auto_precision, invalid, BatchLimits, Config, ConfigError, Layers, ModelConfig, Overrides,
};
use super::{DEFAULT_TOML, ENV_PREFIX};
use crate::models::{CpuBackend, DeviceSpec, ModelSource, PassLimits, UnknownPrecision};

/// Environment variables read by other parts of the program, not by the
/// configuration layers.
const ENV_NOT_CONFIG: &[&str] = &["VLEMBED_LOG", "VLEMBED_JSON_LOGS", "VLEMBED_CONFIG"];

impl ModelConfig {
    /// A model with the built-in defaults, named after its source.
    pub fn with_defaults(source: &str) -> Result<Self, ConfigError> {
        let defaults = Config::builtin()?.model_defaults;
        let mut table = defaults;
        table.insert("source".into(), Value::String(source.to_string()));
        resolve_model(table, "built-in defaults")
    }
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
                m.resolve_auto();
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

pub(super) fn resolve_model(table: Table, origin: &str) -> Result<ModelConfig, ConfigError> {
    let raw: RawModel = deserialize(Value::Table(table), origin)?;
    if raw.source.trim().is_empty() {
        return Err(invalid(origin, "source must not be empty"));
    }
    let devices = raw
        .devices
        .iter()
        .map(|d| d.parse::<DeviceSpec>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(origin, e.to_string()))?;
    let name = match raw.name {
        Some(n) => n,
        None => ModelSource::parse(&raw.source, Some(&raw.revision)).default_name(),
    };
    let (dtype, dtype_auto) = match raw.dtype {
        DtypeSetting::Auto => (auto_precision(&devices), true),
        DtypeSetting::Fixed(p) => (p, false),
    };
    let mut model = ModelConfig {
        name,
        source: raw.source,
        revision: raw.revision,
        dtype,
        dtype_auto,
        cpu_backend: raw.cpu_backend,
        devices,
        // Values left "auto" are set by `resolve_auto` below.
        batching: BatchLimits {
            max_batch_size: raw.max_batch_size.or(0),
            max_batch_cost: raw.max_batch_cost.or(0),
            max_queue_inputs: raw.max_queue_inputs,
            max_delay: Duration::from_millis(raw.max_delay_ms),
            refill_wait: Duration::from_millis(raw.refill_wait_ms),
        },
        pass: PassLimits {
            decoder_group_tokens: raw.decoder_group_tokens.or(0),
            vision_tile_chunk: raw.vision_tile_chunk.or(0),
        },
        auto: AutoKeys {
            max_batch_size: raw.max_batch_size.is_auto(),
            max_batch_cost: raw.max_batch_cost.is_auto(),
            decoder_group_tokens: raw.decoder_group_tokens.is_auto(),
            vision_tile_chunk: raw.vision_tile_chunk.is_auto(),
        },
        max_image_pixels: raw.max_image_pixels,
        max_request_image_pixels: raw.max_request_image_pixels,
        max_input_tokens: (raw.max_input_tokens > 0).then_some(raw.max_input_tokens),
        prompt_format: Some(raw.prompt_format.trim().to_string()).filter(|f| !f.is_empty()),
        min_pixels: (raw.min_pixels > 0).then_some(raw.min_pixels),
        max_pixels: (raw.max_pixels > 0).then_some(raw.max_pixels),
        embedding_cache_bytes: raw.embedding_cache_bytes,
        golden_vectors: (!raw.golden_vectors.trim().is_empty())
            .then(|| PathBuf::from(raw.golden_vectors.trim())),
    };
    model.resolve_auto();
    Ok(model)
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
pub(super) fn env_value(raw: &str) -> Value {
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
            "DEVICES" => {
                o.devices = Some(DeviceSpec::parse_list(value).map_err(|e| bad(e.to_string()))?)
            }
            "DTYPE" => {
                o.dtype = Some(
                    value
                        .parse()
                        .map_err(|e: UnknownPrecision| bad(e.to_string()))?,
                )
            }
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
