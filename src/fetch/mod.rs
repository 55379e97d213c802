//! Fetching images named by URL (`{"image": {"url": "https://..."}}`), safe
//! by default, for requests when `server.fetch_image_urls` is on.
//!
//! Owns the [`Fetcher`]: the address policy ([`guard`]: which schemes, hosts
//! and IP ranges may be reached, every redirect checked again), the HTTP/1.1
//! client ([`client`]: one resolution per host through the [`Resolver`]
//! hook, connections only to checked addresses through the [`Connector`]
//! hook, TLS with rustls, a byte cap enforced while the body streams), the
//! connect and total timeouts, the server-wide and per-request concurrency
//! bounds, and the `vlembed_image_fetch*` metrics. It returns encoded image
//! bytes; decoding and the pixel limits stay with preprocessing (fetched
//! bytes take the same path as uploaded ones). It knows nothing of axum,
//! handlers, models or tensors, and never reads the request body.

pub mod client;
pub mod guard;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use hyper::header::HeaderValue;
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;

pub use client::{BoxFuture, Connector, FetchError, Net, Resolver, SystemResolver, TcpConnector};
pub use guard::{AddressPolicy, Cidr, HostAllowlist, Refused, Rule, UrlRefused};

use crate::config::FetchConfig;
use crate::metrics::Metrics;

/// Longest part of a URL shown in messages and logs.
pub const SHOWN_URL_CHARS: usize = 120;

/// `s` cut to [`SHOWN_URL_CHARS`] characters (with "..." when cut), so a
/// huge URL is never echoed back whole.
pub fn shorten(s: &str) -> String {
    match s.char_indices().nth(SHOWN_URL_CHARS) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// Why a [`Fetcher`] could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("fetch.allowed_cidrs: {0}")]
    Cidr(#[source] crate::config::cidr::BadCidr),
    #[error("fetch.user_agent is not a valid header value")]
    UserAgent(#[source] hyper::header::InvalidHeaderValue),
    #[error("cannot set up TLS for image fetches: {0}")]
    Tls(#[source] tokio_rustls::rustls::Error),
}

/// Fetches images by URL under the configured policy and bounds; shared by
/// every request.
pub struct Fetcher {
    settings: client::Settings,
    net: Net,
    tls: TlsConnector,
    timeout: Duration,
    per_request: usize,
    slots: Arc<Semaphore>,
    metrics: Metrics,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("settings", &self.settings)
            .field("timeout", &self.timeout)
            .field("per_request", &self.per_request)
            .finish_non_exhaustive()
    }
}

impl Fetcher {
    /// A fetcher for `cfg`; fetched images are also capped at
    /// `max_image_bytes` (`server.max_image_bytes`), like uploaded ones.
    pub fn new(
        cfg: &FetchConfig,
        max_image_bytes: usize,
        net: Net,
        metrics: Metrics,
    ) -> Result<Self, SetupError> {
        let allowed = cfg
            .allowed_cidrs
            .iter()
            .map(|c| c.parse::<Cidr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(SetupError::Cidr)?;
        let (max_bytes, max_bytes_key) = if cfg.max_bytes <= max_image_bytes {
            (cfg.max_bytes, "fetch.max_bytes")
        } else {
            (max_image_bytes, "server.max_image_bytes")
        };
        let settings = client::Settings {
            policy: AddressPolicy {
                allow_loopback: cfg.allow_loopback,
                allow_private: cfg.allow_private,
                allowed,
            },
            hosts: HostAllowlist::new(&cfg.allowed_hosts),
            connect_timeout: cfg.connect_timeout(),
            max_bytes,
            max_bytes_key,
            max_redirects: cfg.max_redirects,
            user_agent: HeaderValue::from_str(cfg.user_agent.trim())
                .map_err(SetupError::UserAgent)?,
        };
        Ok(Fetcher {
            settings,
            net,
            tls: client::tls_connector().map_err(SetupError::Tls)?,
            timeout: cfg.timeout(),
            per_request: cfg.max_fetches_per_request.max(1),
            slots: Arc::new(Semaphore::new(cfg.max_concurrent_fetches.max(1))),
            metrics,
        })
    }

    /// Fetches one image: waits for a server-wide slot (at most
    /// `fetch.timeout_ms`, else [`FetchError::Busy`]), then fetches under
    /// the total timeout (`fetch.timeout_ms` again, from the slot).
    pub async fn fetch(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        let start = Instant::now();
        let ms = self.timeout.as_millis() as u64;
        let result = match tokio::time::timeout(self.timeout, self.slots.acquire()).await {
            Err(_) | Ok(Err(_)) => Err(FetchError::Busy(ms)),
            Ok(Ok(_permit)) => {
                let fetch = client::fetch(&self.settings, &self.net, &self.tls, url);
                match tokio::time::timeout(self.timeout, fetch).await {
                    Ok(r) => r,
                    Err(_) => Err(FetchError::Timeout(ms)),
                }
            }
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        self.metrics
            .image_fetches
            .with_label_values(&[outcome])
            .inc();
        self.metrics
            .image_fetch_duration
            .with_label_values(&[outcome])
            .observe(start.elapsed().as_secs_f64());
        match &result {
            Ok(bytes) => {
                tracing::debug!(url = %shorten(url), bytes = bytes.len(), "image fetched")
            }
            Err(e) => tracing::info!(url = %shorten(url), error = %e, "image fetch failed"),
        }
        result
    }

    /// Fetches every `(index, url)`, at most `fetch.max_fetches_per_request`
    /// at a time; the first failure (with its index) stops the rest.
    pub async fn fetch_all(
        &self,
        urls: Vec<(usize, String)>,
    ) -> Result<Vec<(usize, Vec<u8>)>, (usize, FetchError)> {
        let mut pending = stream::iter(urls)
            .map(|(i, url)| async move { (i, self.fetch(&url).await) })
            .buffer_unordered(self.per_request);
        let mut out = Vec::new();
        while let Some((i, r)) = pending.next().await {
            match r {
                Ok(bytes) => out.push((i, bytes)),
                Err(e) => return Err((i, e)),
            }
        }
        Ok(out)
    }
}
