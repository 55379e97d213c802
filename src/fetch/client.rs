//! One image fetch over HTTP/1.1: resolve once, check every address,
//! connect to a checked address through the [`Connector`], TLS with the
//! URL's name, GET, follow redirects (each one checked again), and stream
//! the body under the byte cap.
//!
//! Owns the wire side of a fetch and its errors ([`FetchError`]). The
//! address policy is [`super::guard`]'s; timeouts, slots and metrics are
//! [`super::Fetcher`]'s.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::guard::{self, AddressPolicy, HostAllowlist, Refused, Target, UrlRefused};
use super::shorten;

/// A boxed future, as the [`Resolver`] and [`Connector`] hooks return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Turns a host name into addresses. Called once per URL (and per redirect
/// target) with a name, never with a numeric host.
pub trait Resolver: Send + Sync + 'static {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> BoxFuture<'a, io::Result<Vec<IpAddr>>>;
}

/// The system resolver (getaddrinfo through tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host, port)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    }
}

/// Opens TCP connections. Every connection a fetch makes goes through it,
/// to an address the policy has already checked.
pub trait Connector: Send + Sync + 'static {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<TcpStream>>;
}

/// Plain `TcpStream::connect`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpConnector;

impl Connector for TcpConnector {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<TcpStream>> {
        Box::pin(async move {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(s)
        })
    }
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Url(#[from] UrlRefused),
    #[error("refused: {0}")]
    Refused(#[from] Refused),
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} resolved to no address")]
    NoAddress(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {addr} took longer than {ms} ms (fetch.connect_timeout_ms)")]
    ConnectTimeout { addr: SocketAddr, ms: u64 },
    #[error("the TLS handshake with {host} failed: {source}")]
    Tls {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("HTTP error: {0}")]
    Http(#[source] hyper::Error),
    #[error("the server answered HTTP {0}")]
    Status(u16),
    #[error("more than {0} redirects (fetch.max_redirects)")]
    TooManyRedirects(usize),
    #[error("a redirect (HTTP {0}) without a valid Location")]
    BadRedirect(u16),
    #[error("the image is {size} bytes, over the limit of {limit} bytes ({key})")]
    TooLarge {
        size: String,
        limit: usize,
        key: &'static str,
    },
    #[error("the fetch took longer than {0} ms (fetch.timeout_ms)")]
    Timeout(u64),
    #[error("not an image: {0}")]
    BadContent(String),
    #[error("no fetch slot became free within {0} ms (fetch.max_concurrent_fetches)")]
    Busy(u64),
}

impl FetchError {
    /// The `outcome` label of `vlembed_image_fetches_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            FetchError::Url(_) => "refused_url",
            FetchError::Refused(_) => "refused_address",
            FetchError::Resolve { .. } | FetchError::NoAddress(_) => "resolve_failed",
            FetchError::Connect { .. } | FetchError::Tls { .. } | FetchError::Http(_) => {
                "connect_failed"
            }
            FetchError::ConnectTimeout { .. } | FetchError::Timeout(_) => "timeout",
            FetchError::Status(_) => "http_status",
            FetchError::TooManyRedirects(_) | FetchError::BadRedirect(_) => "redirects",
            FetchError::TooLarge { .. } => "too_large",
            FetchError::BadContent(_) => "bad_content",
            FetchError::Busy(_) => "busy",
        }
    }
}

/// What a fetch may do, from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub policy: AddressPolicy,
    pub hosts: HostAllowlist,
    pub connect_timeout: Duration,
    pub max_bytes: usize,
    /// The configuration key that set `max_bytes` (for messages).
    pub max_bytes_key: &'static str,
    pub max_redirects: usize,
    pub user_agent: HeaderValue,
}

/// The network side of fetches: how names are resolved and connections
/// opened (the system's by default; tests install their own).
#[derive(Clone)]
pub struct Net {
    pub resolver: Arc<dyn Resolver>,
    pub connector: Arc<dyn Connector>,
}

impl Default for Net {
    fn default() -> Self {
        Net {
            resolver: Arc::new(SystemResolver),
            connector: Arc::new(TcpConnector),
        }
    }
}

/// TLS client settings: Mozilla's roots (webpki-roots), rustls with ring.
pub fn tls_connector() -> Result<TlsConnector, rustls::Error> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Aborts the connection task when the fetch ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One fetch, without the overall timeout (the caller's).
pub async fn fetch(
    settings: &Settings,
    net: &Net,
    tls: &TlsConnector,
    url: &str,
) -> Result<Vec<u8>, FetchError> {
    let mut url = guard::parse_url(url, &settings.hosts)?;
    let mut redirects = 0usize;
    loop {
        let addrs = resolve(settings, net, &url).await?;
        let io = connect(settings, net, tls, &url, &addrs).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(FetchError::Http)?;
        let _conn = AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "image fetch connection ended");
            }
        }));
        let res = sender
            .send_request(request(settings, &url)?)
            .await
            .map_err(FetchError::Http)?;
        let status = res.status();
        if matches!(
            status,
            StatusCode::MOVED_PERMANENTLY
                | StatusCode::FOUND
                | StatusCode::SEE_OTHER
                | StatusCode::TEMPORARY_REDIRECT
                | StatusCode::PERMANENT_REDIRECT
        ) {
            redirects += 1;
            if redirects > settings.max_redirects {
                return Err(FetchError::TooManyRedirects(settings.max_redirects));
            }
            let next = res
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .filter(|l| !l.trim().is_empty())
                .and_then(|l| url.join(l.trim()).ok())
                .ok_or(FetchError::BadRedirect(status.as_u16()))?;
            guard::check_url(&next, &settings.hosts)?;
            tracing::debug!(to = %shorten(next.as_str()), "image fetch redirected");
            url = next;
            continue;
        }
        if !status.is_success() {
            return Err(FetchError::Status(status.as_u16()));
        }
        check_content_type(res.headers().get(header::CONTENT_TYPE))?;
        let too_large = |size: String| FetchError::TooLarge {
            size,
            limit: settings.max_bytes,
            key: settings.max_bytes_key,
        };
        let declared = res
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let Some(n) = declared {
            if n > settings.max_bytes as u64 {
                return Err(too_large(format!("declared as {n}")));
            }
        }
        let cap = settings.max_bytes;
        let mut buf = Vec::with_capacity(declared.map_or(0, |n| n as usize).min(cap));
        let mut body = res.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(FetchError::Http)?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > cap {
                    return Err(too_large(format!("more than {cap}")));
                }
                buf.extend_from_slice(&data);
            }
        }
        if buf.is_empty() {
            return Err(FetchError::BadContent("the response body is empty".into()));
        }
        return Ok(buf);
    }
}

/// Refuses responses that say they are not images (HTML error pages and the
/// like); a missing type, `image/*` and octet streams are accepted and the
/// decoder decides.
fn check_content_type(v: Option<&HeaderValue>) -> Result<(), FetchError> {
    let Some(v) = v else { return Ok(()) };
    let t = v.to_str().unwrap_or("").trim().to_ascii_lowercase();
    let essence = t.split(';').next().unwrap_or("").trim();
    if essence.is_empty()
        || essence.starts_with("image/")
        || essence == "application/octet-stream"
        || essence == "binary/octet-stream"
    {
        return Ok(());
    }
    Err(FetchError::BadContent(format!(
        "the server sent Content-Type {}",
        shorten(essence)
    )))
}

fn request(settings: &Settings, url: &url::Url) -> Result<Request<Empty<Bytes>>, FetchError> {
    let host = url.host_str().ok_or(UrlRefused::NoHost)?;
    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let path = &url[url::Position::BeforePath..url::Position::AfterQuery];
    Request::get(if path.is_empty() { "/" } else { path })
        .header(header::HOST, authority)
        .header(header::USER_AGENT, settings.user_agent.clone())
        .header(header::ACCEPT, "image/*")
        .header(header::ACCEPT_ENCODING, "identity")
        .body(Empty::new())
        .map_err(|e| FetchError::BadContent(format!("cannot build the request: {e}")))
}

/// The URL's addresses, each checked; a numeric host is never resolved.
async fn resolve(
    settings: &Settings,
    net: &Net,
    url: &url::Url,
) -> Result<Vec<IpAddr>, FetchError> {
    let port = url.port_or_known_default().unwrap_or(80);
    let addrs =
        match guard::target(url)? {
            Target::Ip(ip) => vec![ip],
            Target::Localhost => vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ],
            Target::Name(name) => {
                let addrs = net.resolver.resolve(&name, port).await.map_err(|source| {
                    FetchError::Resolve {
                        host: shorten(&name),
                        source,
                    }
                })?;
                if addrs.is_empty() {
                    return Err(FetchError::NoAddress(shorten(&name)));
                }
                addrs
            }
        };
    // Every answer must pass: a name that also resolves to a refused address
    // is refused (one could be picked later, or rebinding could pick it).
    for &ip in &addrs {
        settings.policy.check(ip)?;
    }
    Ok(addrs)
}

/// Connects to the first checked address that answers, then TLS for https
/// with the URL's host as the server name.
async fn connect(
    settings: &Settings,
    net: &Net,
    tls: &TlsConnector,
    url: &url::Url,
    addrs: &[IpAddr],
) -> Result<Box<dyn Io>, FetchError> {
    let port = url.port_or_known_default().unwrap_or(80);
    let mut last = None;
    let mut stream = None;
    for &ip in addrs {
        let addr = SocketAddr::new(guard::connect_address(ip), port);
        match tokio::time::timeout(settings.connect_timeout, net.connector.connect(addr)).await {
            Ok(Ok(s)) => {
                stream = Some(s);
                break;
            }
            Ok(Err(source)) => last = Some(FetchError::Connect { addr, source }),
            Err(_) => {
                last = Some(FetchError::ConnectTimeout {
                    addr,
                    ms: settings.connect_timeout.as_millis() as u64,
                })
            }
        }
    }
    let Some(stream) = stream else {
        return Err(last.unwrap_or_else(|| FetchError::NoAddress(shorten(url.as_str()))));
    };
    if url.scheme() != "https" {
        return Ok(Box::new(stream));
    }
    let name = match guard::target(url)? {
        Target::Ip(ip) => ServerName::IpAddress(ip.into()),
        _ => {
            let host = url
                .host_str()
                .unwrap_or("")
                .trim_end_matches('.')
                .to_string();
            ServerName::try_from(host.clone()).map_err(|e| FetchError::Tls {
                host: shorten(&host),
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            })?
        }
    };
    let host = shorten(url.host_str().unwrap_or(""));
    let tls_stream = tls
        .connect(name, stream)
        .await
        .map_err(|source| FetchError::Tls { host, source })?;
    Ok(Box::new(tls_stream))
}
