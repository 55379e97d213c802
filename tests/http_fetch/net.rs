//! The network side of `http_fetch.rs`: hooks that keep every fetch on
//! loopback (a connector that refuses and records any other address, a
//! resolver that answers from a table and never asks DNS) and a tiny HTTP
//! server on 127.0.0.1 serving fixture images, redirects, stalls, lying
//! lengths and errors.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use vlembed::app::Hooks;
use vlembed::fetch::{BoxFuture, Connector, Net, Resolver};

// ---------------------------------------------------------------- network hooks

/// Connects to loopback only; any other address is recorded (the test then
/// fails) and refused without a packet sent.
#[derive(Default)]
pub struct LoopbackOnly {
    pub violations: Mutex<Vec<SocketAddr>>,
    pub connects: AtomicUsize,
    /// Connections to these loopback ports hang (a black-holed SYN).
    pub hang_ports: Mutex<Vec<u16>>,
}

impl Connector for LoopbackOnly {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<TcpStream>> {
        Box::pin(async move {
            if !addr.ip().is_loopback() {
                self.violations.lock().unwrap().push(addr);
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("TEST FAILURE: asked to connect to non-loopback {addr}"),
                ));
            }
            if self.hang_ports.lock().unwrap().contains(&addr.port()) {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            self.connects.fetch_add(1, Ordering::SeqCst);
            TcpStream::connect(addr).await
        })
    }
}

/// Answers from a fixed table; records every query.
#[derive(Default)]
pub struct TableResolver {
    pub table: HashMap<String, Vec<IpAddr>>,
    pub queries: Mutex<Vec<String>>,
}

impl Resolver for TableResolver {
    fn resolve<'a>(&'a self, host: &'a str, _port: u16) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            self.queries.lock().unwrap().push(host.to_string());
            self.table
                .get(host)
                .cloned()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such test host"))
        })
    }
}

pub struct NetHooks {
    pub connector: Arc<LoopbackOnly>,
    pub resolver: Arc<TableResolver>,
}

impl NetHooks {
    pub fn new(table: &[(&str, &[&str])]) -> Self {
        let table = table
            .iter()
            .map(|(h, ips)| {
                (
                    h.to_string(),
                    ips.iter().map(|i| i.parse().unwrap()).collect(),
                )
            })
            .collect();
        NetHooks {
            connector: Arc::new(LoopbackOnly::default()),
            resolver: Arc::new(TableResolver {
                table,
                ..Default::default()
            }),
        }
    }

    pub fn hooks(&self) -> Hooks {
        Hooks {
            fetch_net: Some(Net {
                resolver: self.resolver.clone(),
                connector: self.connector.clone(),
            }),
            ..Default::default()
        }
    }

    pub fn assert_loopback_only(&self) {
        let v = self.connector.violations.lock().unwrap();
        assert!(
            v.is_empty(),
            "the fetcher tried to connect off loopback: {v:?}"
        );
    }

    pub fn queries(&self) -> Vec<String> {
        self.resolver.queries.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------- image server

#[derive(Clone)]
pub enum Route {
    /// 200 with this content type and body (correct Content-Length).
    Body(&'static str, Vec<u8>),
    /// A redirect with this status to this Location.
    Redirect(u16, String),
    /// Never answers.
    Stall,
    /// Sends the head with this Content-Length, then stalls.
    DeclaredThenStall(u64),
    /// A chunked body of this many bytes.
    Chunked(usize),
    /// A body without Content-Length, ended by closing, of this many bytes.
    UntilClose(usize),
    /// A bare status.
    Status(u16),
    /// Waits this long, then serves the body.
    Slow(Duration, Vec<u8>),
}

pub struct ImageServer {
    pub addr: SocketAddr,
    pub hits: Arc<Mutex<Vec<String>>>,
    pub active: Arc<AtomicUsize>,
    pub peak: Arc<AtomicUsize>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Drop for ImageServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ImageServer {
    pub async fn start(routes: Vec<(&str, Route)>) -> ImageServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let routes: Arc<HashMap<String, Route>> = Arc::new(
            routes
                .into_iter()
                .map(|(p, r)| (p.to_string(), r))
                .collect(),
        );
        let hits = Arc::new(Mutex::new(Vec::new()));
        let active = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (h, a, p) = (hits.clone(), active.clone(), peak.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let (routes, h, a, p) = (routes.clone(), h.clone(), a.clone(), p.clone());
                tokio::spawn(async move {
                    let _ = serve(conn, &routes, &h, (&a, &p)).await;
                });
            }
        });
        ImageServer {
            addr,
            hits,
            active,
            peak,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn hits(&self) -> Vec<String> {
        self.hits.lock().unwrap().clone()
    }
}

async fn serve(
    conn: TcpStream,
    routes: &HashMap<String, Route>,
    hits: &Mutex<Vec<String>>,
    (active, peak): (&AtomicUsize, &AtomicUsize),
) -> io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = read_some(&conn, &mut buf).await?;
        if n == 0 || head.len() > 65536 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head[0] == 0x16 {
            // A TLS ClientHello: answer plain text, which fails the handshake.
            write_all(&conn, b"HTTP/1.1 400 Not TLS\r\n\r\n").await?;
            return Ok(());
        }
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
    hits.lock().unwrap().push(text.clone());
    let route = routes.get(&path).cloned().unwrap_or(Route::Status(404));
    let status_line = |code: u16| format!("HTTP/1.1 {code} X\r\n");
    match route {
        Route::Body(ct, body) => {
            let h = format!(
                "{}Content-Type: {ct}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                status_line(200),
                body.len()
            );
            write_all(&conn, h.as_bytes()).await?;
            write_all(&conn, &body).await?;
        }
        Route::Slow(d, body) => {
            // Requests being answered at once, counted while they wait (the
            // count drops before the answer, so before the fetch can end).
            let now = active.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(d).await;
            active.fetch_sub(1, Ordering::SeqCst);
            let h = format!(
                "{}Content-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                status_line(200),
                body.len()
            );
            write_all(&conn, h.as_bytes()).await?;
            write_all(&conn, &body).await?;
        }
        Route::Redirect(code, loc) => {
            let h = format!(
                "{}Location: {loc}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                status_line(code)
            );
            write_all(&conn, h.as_bytes()).await?;
        }
        Route::Stall => {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Route::DeclaredThenStall(n) => {
            let h = format!(
                "{}Content-Type: image/png\r\nContent-Length: {n}\r\n\r\n",
                status_line(200)
            );
            write_all(&conn, h.as_bytes()).await?;
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Route::Chunked(total) => {
            let h = format!(
                "{}Content-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n",
                status_line(200)
            );
            write_all(&conn, h.as_bytes()).await?;
            let chunk = vec![0x42u8; 8192];
            let mut sent = 0;
            while sent < total {
                let n = chunk.len().min(total - sent);
                write_all(&conn, format!("{n:x}\r\n").as_bytes()).await?;
                write_all(&conn, &chunk[..n]).await?;
                write_all(&conn, b"\r\n").await?;
                sent += n;
            }
            write_all(&conn, b"0\r\n\r\n").await?;
        }
        Route::UntilClose(total) => {
            let h = format!(
                "{}Content-Type: image/png\r\nConnection: close\r\n\r\n",
                status_line(200)
            );
            write_all(&conn, h.as_bytes()).await?;
            let chunk = vec![0x42u8; 8192];
            let mut sent = 0;
            while sent < total {
                let n = chunk.len().min(total - sent);
                write_all(&conn, &chunk[..n]).await?;
                sent += n;
            }
        }
        Route::Status(code) => {
            let h = format!(
                "{}Content-Type: text/plain\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope",
                status_line(code)
            );
            write_all(&conn, h.as_bytes()).await?;
        }
    }
    // Dropping the stream closes it (ends close-delimited bodies).
    drop(conn);
    Ok(())
}

/// Reads what has arrived (tokio's `io-util` extension traits are not
/// built for this crate).
async fn read_some(c: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        c.readable().await?;
        match c.try_read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn write_all(c: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        c.writable().await?;
        match c.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
