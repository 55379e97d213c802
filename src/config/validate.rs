//! Validation: values that are valid TOML of the right types but cannot be
//! served, alone or together (a zero limit, a drain delay longer than the
//! shutdown, a queue smaller than one request), refused with the key named.

use super::cidr::Cidr;
use super::{invalid, Config, ConfigError};

impl Config {
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
            c.parse::<Cidr>()
                .map_err(|e| invalid("fetch.allowed_cidrs", e.to_string()))?;
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
            if m.pass.decoder_group_tokens == 0 || m.pass.vision_tile_chunk == 0 {
                return Err(invalid(
                    at,
                    "decoder_group_tokens and vision_tile_chunk must be at least 1 (or \"auto\")",
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
            if let (Some(min), Some(max)) = (m.min_pixels, m.max_pixels) {
                if min > max {
                    return Err(invalid(
                        at,
                        format!("min_pixels ({min}) is above max_pixels ({max})"),
                    ));
                }
            }
        }
        Ok(())
    }
}
