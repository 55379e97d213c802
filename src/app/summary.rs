//! The one line an operator reads once the server is ready.
//!
//! Owns composing the startup summary (address, models with their
//! architecture, devices, dtype, fingerprint and CPU backend, auth, UI
//! routes) from the registry. It
//! changes nothing; [`super::server`] logs it when every model is loaded.

use std::net::SocketAddr;

use super::Registry;

/// The summary of a ready server listening on `addr`.
pub fn ready_line(registry: &Registry, addr: SocketAddr) -> String {
    let models: Vec<String> = registry
        .models()
        .iter()
        .map(|slot| {
            let c = &slot.config;
            let loaded = slot.loaded();
            let arch = loaded
                .as_ref()
                .map_or("not loaded", |s| s.info.architecture);
            let fingerprint = loaded
                .as_ref()
                .map_or_else(String::new, |s| format!(", {}", s.info.fingerprint.id));
            let backend = loaded
                .as_ref()
                .and_then(|s| s.info.cpu_backend.as_ref())
                .map_or_else(String::new, |b| format!(", cpu backend {}", b.backend));
            let devices: Vec<String> = c.devices.iter().map(|d| d.to_string()).collect();
            format!(
                "{} ({arch}, {} on {}, {}{fingerprint}{backend})",
                c.name,
                c.dtype.as_str(),
                devices.join("+"),
                c.model_source().describe()
            )
        })
        .collect();
    let s = &registry.server;
    let host = if addr.ip().is_unspecified() {
        format!("localhost:{}", addr.port())
    } else {
        addr.to_string()
    };
    let mut pages = Vec::new();
    if s.playground {
        pages.push(format!("playground http://{host}/"));
    }
    if s.docs {
        pages.push(format!("docs http://{host}/docs"));
    }
    format!(
        "ready on {addr}: serving {}; auth {}{}{}",
        models.join(", "),
        if s.api_keys.is_empty() {
            "off".to_string()
        } else {
            format!("on ({} keys)", s.api_keys.len())
        },
        if s.cors_allowed_origins.is_empty() {
            String::new()
        } else {
            format!("; CORS {}", s.cors_allowed_origins.join(" "))
        },
        if pages.is_empty() {
            String::new()
        } else {
            format!("; {}", pages.join(", "))
        },
    )
}
