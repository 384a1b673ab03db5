//! Serves the agent protocol on any byte stream (vsock in the guest, unix sockets in
//! tests).
//!
//! Framing errors close the connection (after an error frame when the peer can still read
//! one): once a length is wrong, the stream is no longer aligned on frames. A well-framed
//! but bad body (not JSON, unknown request, wrong version) gets an error response and the
//! connection stays open.

use std::sync::Arc;
use std::time::Duration;

use cvm_attest::binding::{InstanceKey, KeyError};
use cvm_host::agent_proto::{
    b64_encode, read_frame, write_frame, ErrorCode, EvidenceResponse, ProtoError, ProviderInfo,
    ReportDataResponse, Request, Response, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

use crate::tsm::{ConfigfsTsm, TsmError, TsmReport};

/// Where evidence comes from.
pub trait EvidenceSource: Send + Sync + 'static {
    fn provider(&self) -> Result<String, TsmError>;
    fn report(&self, report_data: &[u8; 64]) -> Result<TsmReport, TsmError>;
}

impl EvidenceSource for ConfigfsTsm {
    fn provider(&self) -> Result<String, TsmError> {
        ConfigfsTsm::provider(self)
    }
    fn report(&self, report_data: &[u8; 64]) -> Result<TsmReport, TsmError> {
        ConfigfsTsm::report(self, report_data)
    }
}

/// Server limits and the guest instance's key.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// This guest instance's key: its hash goes into every report's data, so evidence
    /// names the instance that produced it (docs/evidence-binding.md).
    pub instance_key: Arc<InstanceKey>,
    /// How long a connection may stay silent (between or inside frames) before it is closed.
    pub idle_timeout: Duration,
    /// How long one report may take (SNP certificate fetches and TDX quoting go through
    /// the host).
    pub report_timeout: Duration,
    /// Connections served at once; more wait in the accept queue.
    pub max_connections: usize,
}

impl ServerConfig {
    /// Default limits for an instance with this key.
    pub fn new(instance_key: InstanceKey) -> Self {
        ServerConfig {
            instance_key: Arc::new(instance_key),
            idle_timeout: Duration::from_secs(60),
            report_timeout: Duration::from_secs(60),
            max_connections: 8,
        }
    }

    /// Default limits and a fresh instance key.
    pub fn with_new_key() -> Result<Self, KeyError> {
        Ok(Self::new(InstanceKey::generate()?))
    }
}

fn tsm_error_response(e: TsmError) -> Response {
    let code = match &e {
        TsmError::ProviderMissing(_) => ErrorCode::ProviderMissing,
        TsmError::ReportFailed(_) => ErrorCode::ReportFailed,
        TsmError::Conflict { .. } => ErrorCode::Conflict,
    };
    Response::error(code, e.to_string())
}

/// Runs blocking configfs work off the async threads, bounded in time.
async fn blocking<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> Result<T, TsmError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::time::timeout(timeout, tokio::task::spawn_blocking(f)).await {
        Err(_) => Err(Response::error(
            ErrorCode::ReportFailed,
            format!("the TEE did not produce a report within {timeout:?}"),
        )),
        Ok(Err(join)) => Err(Response::error(
            ErrorCode::Internal,
            format!("report task failed: {join}"),
        )),
        Ok(Ok(r)) => r.map_err(tsm_error_response),
    }
}

/// Answers one decoded request.
pub async fn handle(
    req: Request,
    source: &Arc<dyn EvidenceSource>,
    cfg: &ServerConfig,
) -> Response {
    match req {
        Request::GetProviderInfo => {
            let s = source.clone();
            match blocking(cfg.report_timeout, move || s.provider()).await {
                Ok(provider) => Response::ProviderInfo(ProviderInfo {
                    provider,
                    agent_version: env!("CARGO_PKG_VERSION").to_string(),
                    protocol_versions: vec![PROTOCOL_VERSION],
                }),
                Err(r) => r,
            }
        }
        req @ (Request::GetEvidence(_) | Request::GetReportData(_)) => {
            let challenge = match req.challenge() {
                Ok(Some(c)) => c,
                Ok(None) => return Response::error(ErrorCode::BadRequest, "not a challenge"),
                Err(e) => return Response::error(ErrorCode::BadRequest, e.to_string()),
            };
            // The caller picks purpose, subject and nonce; the key is always our own.
            let key = cfg.instance_key.public().to_vec();
            let rd = challenge.report_data(&key);
            if matches!(req, Request::GetReportData(_)) {
                return Response::ReportData(ReportDataResponse {
                    report_data: hex::encode(rd),
                    instance_key: b64_encode(&key),
                });
            }
            let s = source.clone();
            match blocking(cfg.report_timeout, move || s.report(&rd)).await {
                Ok(r) => Response::Evidence(EvidenceResponse {
                    provider: r.provider,
                    report_data: hex::encode(rd),
                    instance_key: b64_encode(&key),
                    outblob: b64_encode(&r.outblob),
                    auxblob: r.auxblob.as_deref().map(b64_encode),
                    generation: r.generation,
                }),
                Err(r) => r,
            }
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, resp: &Response) -> Result<(), ProtoError> {
    let body = match resp.encode() {
        Ok(b) => b,
        Err(e) => Response::error(ErrorCode::Internal, e.to_string()).encode()?,
    };
    match write_frame(stream, &body, MAX_RESPONSE_BYTES).await {
        Err(ProtoError::FrameTooLarge { len, max }) => {
            let e = Response::error(
                ErrorCode::Internal,
                format!("response of {len} bytes exceeds the {max}-byte limit"),
            )
            .encode()?;
            write_frame(stream, &e, MAX_RESPONSE_BYTES).await
        }
        other => other,
    }
}

/// Serves one connection until the peer closes it, goes idle, or breaks framing.
pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    source: Arc<dyn EvidenceSource>,
    cfg: ServerConfig,
) {
    loop {
        let frame = match tokio::time::timeout(
            cfg.idle_timeout,
            read_frame(&mut stream, MAX_REQUEST_BYTES),
        )
        .await
        {
            Err(_) => {
                tracing::debug!("closing idle connection");
                return;
            }
            Ok(f) => f,
        };
        let body = match frame {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e @ (ProtoError::FrameTooLarge { .. } | ProtoError::EmptyFrame)) => {
                tracing::warn!("closing connection: {e}");
                let _ = send(&mut stream, &Response::error(e.code(), e.to_string())).await;
                return;
            }
            Err(e) => {
                tracing::debug!("closing connection: {e}");
                return;
            }
        };
        let resp = match Request::decode(&body) {
            Ok(req) => handle(req, &source, &cfg).await,
            Err(e) => Response::error(e.code(), e.to_string()),
        };
        if let Err(e) = send(&mut stream, &resp).await {
            tracing::debug!("closing connection: {e}");
            return;
        }
    }
}

/// Accept loop on a unix socket (tests; a host-side proxy).
pub async fn serve_unix(
    listener: tokio::net::UnixListener,
    source: Arc<dyn EvidenceSource>,
    cfg: ServerConfig,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(cfg.max_connections.max(1)));
    loop {
        let (stream, _) = listener.accept().await?;
        spawn_conn(stream, &slots, &source, &cfg).await;
    }
}

/// Serves a virtio-serial port (`/dev/virtio-ports/NAME`, guests without vsock): the
/// port is one stream for the guest's whole life, so each host connection is one session.
/// The port reads end-of-file while no host side is connected; the agent then reopens it
/// after a pause, which also realigns frames after a host that left mid-frame.
pub async fn serve_serial(
    path: std::path::PathBuf,
    source: Arc<dyn EvidenceSource>,
    cfg: ServerConfig,
) -> std::io::Result<()> {
    // No idle timeout: dropping a pending read would leave it holding the port (which
    // opens once at a time) and eat the host's next frame. A host that leaves ends the
    // read with end-of-file instead.
    let cfg = ServerConfig {
        idle_timeout: Duration::from_secs(365 * 24 * 3600),
        ..cfg
    };
    let mut logged = false;
    loop {
        match tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .await
        {
            Ok(port) => {
                if !logged {
                    tracing::info!("serving virtio-serial port {}", path.display());
                    logged = true;
                }
                serve_connection(port, source.clone(), cfg.clone()).await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(e),
            Err(e) => tracing::debug!("opening {}: {e}", path.display()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Accept loop on vsock (inside the guest).
pub async fn serve_vsock(
    listener: tokio_vsock::VsockListener,
    source: Arc<dyn EvidenceSource>,
    cfg: ServerConfig,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(cfg.max_connections.max(1)));
    loop {
        let (stream, peer) = listener.accept().await?;
        tracing::debug!("connection from vsock cid {}", peer.cid());
        spawn_conn(stream, &slots, &source, &cfg).await;
    }
}

async fn spawn_conn<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    slots: &Arc<Semaphore>,
    source: &Arc<dyn EvidenceSource>,
    cfg: &ServerConfig,
) {
    // Waiting here stops accepting, so excess clients queue in the kernel's backlog.
    let Ok(permit) = slots.clone().acquire_owned().await else {
        return;
    };
    let source = source.clone();
    let cfg = cfg.clone();
    tokio::spawn(async move {
        serve_connection(stream, source, cfg).await;
        drop(permit);
    });
}
