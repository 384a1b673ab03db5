//! The operator's and node plugin's `/metrics`, `/healthz` and `/readyz` endpoints, and
//! how their watches retry ([`watch`]).
//!
//! A deliberately tiny HTTP/1.0 responder: three fixed GET routes need no web framework.
//! It reads the whole request head before answering, because a client may send it in
//! several pieces (answering early and closing would reset the connection under it).

pub mod cli;
pub mod watch;

use prometheus::{Encoder, Registry, TextEncoder};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Largest request head read; anything longer is answered from what was read.
const MAX_HEAD: usize = 8192;
/// A client gets this long to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What the endpoints serve.
#[derive(Clone)]
pub struct Endpoints {
    pub registry: Registry,
    /// `/readyz` answers 200 only while this is true.
    pub ready: Arc<AtomicBool>,
}

/// The response to a request for `path`: (status line, body).
pub fn respond(e: &Endpoints, path: &str) -> (&'static str, String) {
    match path {
        "/metrics" => {
            let mut buf = Vec::new();
            // Encoding only fails on a broken metric family; serve what we have.
            let _ = TextEncoder::new().encode(&e.registry.gather(), &mut buf);
            ("200 OK", String::from_utf8_lossy(&buf).into_owned())
        }
        "/healthz" | "/livez" => ("200 OK", "ok\n".into()),
        "/readyz" if e.ready.load(Ordering::SeqCst) => ("200 OK", "ok\n".into()),
        "/readyz" => ("503 Service Unavailable", "not ready\n".into()),
        _ => ("404 Not Found", "not found\n".into()),
    }
}

/// The path of a request head (`GET /metrics HTTP/1.1` → `/metrics`).
pub fn request_path(head: &[u8]) -> String {
    let text = String::from_utf8_lossy(head);
    text.split_whitespace().nth(1).unwrap_or("/").to_string()
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, endpoints: Endpoints) {
    loop {
        let (mut sock, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a metrics connection failed");
                continue;
            }
        };
        let e = endpoints.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(512);
            let mut chunk = [0u8; 512];
            let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
                match tokio::time::timeout_at(deadline, sock.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => head.extend_from_slice(&chunk[..n]),
                    _ => break,
                }
            }
            let (code, body) = respond(&e, &request_path(&head));
            let resp = format!(
                "HTTP/1.0 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(ready: bool) -> Endpoints {
        let registry = Registry::new();
        let c = prometheus::IntCounter::new("probe_total", "a probe").unwrap();
        registry.register(Box::new(c.clone())).unwrap();
        c.inc();
        Endpoints {
            registry,
            ready: Arc::new(AtomicBool::new(ready)),
        }
    }

    #[test]
    fn routes() {
        let e = endpoints(false);
        assert!(respond(&e, "/metrics").1.contains("probe_total 1"));
        assert_eq!(respond(&e, "/healthz").0, "200 OK");
        assert_eq!(respond(&e, "/readyz").0, "503 Service Unavailable");
        e.ready.store(true, Ordering::SeqCst);
        assert_eq!(respond(&e, "/readyz").0, "200 OK");
        assert_eq!(respond(&e, "/x").0, "404 Not Found");
        assert_eq!(request_path(b"GET /metrics HTTP/1.1\r\n"), "/metrics");
        assert_eq!(request_path(b""), "/");
    }

    #[tokio::test]
    async fn a_request_sent_in_pieces_is_answered_whole() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, endpoints(true)));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        for piece in ["GET ", "/metrics", " HTTP/1.0\r\n", "\r\n"] {
            s.write_all(piece.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.0 200 OK"), "{out}");
        assert!(out.contains("probe_total 1"), "{out}");
    }
}
