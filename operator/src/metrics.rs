//! Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoints.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub errors: IntCounterVec,
    pub phases: IntGaugeVec,
    pub time_to_verified: Histogram,
    pub verifications: IntCounterVec,
    pub ready: Arc<AtomicBool>,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new("cvm_operator_reconciles_total", "Reconciliations by result"),
            &["result"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "cvm_operator_reconcile_errors_total",
                "Reconcile errors by kind",
            ),
            &["error"],
        )?;
        let phases = IntGaugeVec::new(
            Opts::new("cvm_operator_cvms", "ConfidentialVMs by phase"),
            &["phase"],
        )?;
        let time_to_verified = Histogram::with_opts(
            HistogramOpts::new(
                "cvm_operator_time_to_verified_seconds",
                "Seconds from creation to the first Verified=True",
            )
            .buckets(vec![
                0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0,
            ]),
        )?;
        let verifications = IntCounterVec::new(
            Opts::new(
                "cvm_operator_verifications_total",
                "Evidence appraisals by EAR status",
            ),
            &["status"],
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(phases.clone()))?;
        registry.register(Box::new(time_to_verified.clone()))?;
        registry.register(Box::new(verifications.clone()))?;
        Ok(Metrics {
            registry,
            reconciles,
            errors,
            phases,
            time_to_verified,
            verifications,
            ready: Arc::new(AtomicBool::new(false)),
        })
    }

    fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Serves the endpoints until the task is dropped. A deliberately tiny HTTP/1.0
    /// responder: three fixed GET routes need no web framework.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    sock.read(&mut buf),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("/");
                let (code, body) = match path {
                    "/metrics" => ("200 OK", me.render()),
                    "/healthz" | "/livez" => ("200 OK", "ok\n".to_string()),
                    "/readyz" if me.ready.load(Ordering::SeqCst) => ("200 OK", "ok\n".to_string()),
                    "/readyz" => (
                        "503 Service Unavailable",
                        "not leading or caches not synced\n".to_string(),
                    ),
                    _ => ("404 Not Found", "not found\n".to_string()),
                };
                let resp = format!(
                    "HTTP/1.0 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    }
}
