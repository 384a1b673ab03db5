//! The node plugin's client for the guest agent: one request, one response, over vsock in
//! production and a unix socket in tests.
//!
//! The client checks what it can without trusting the guest's host path: the response
//! version, the size limit, and that `report_data` binds the challenge it sent and the
//! instance key the agent names (`cvm_attest::binding`). The signature over the report is
//! the verifier's business (`cvm-attest`), not this module's.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;

use crate::agent_proto::{
    b64_decode, read_frame, write_frame, Challenge, ErrorCode, ProtoError, ProviderInfo, Request,
    Response, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES,
};

/// Default time for one request and its response.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Evidence as the agent returned it, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestEvidence {
    /// configfs-tsm provider: `sev_guest` or `tdx_guest`.
    pub provider: String,
    pub report_data: [u8; 64],
    /// The guest instance's public key, whose hash `report_data` binds.
    pub instance_key: Vec<u8>,
    /// SNP report or TDX quote.
    pub outblob: Vec<u8>,
    /// SNP certificate table, when the host provided one.
    pub auxblob: Option<Vec<u8>>,
    pub generation: u64,
}

/// What can go wrong talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentClientError {
    #[error("cannot connect to the guest agent at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("guest agent protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("guest agent closed the connection without answering")]
    NoAnswer,
    #[error("guest agent error {}: {message}", code.as_str())]
    Agent { code: ErrorCode, message: String },
    #[error("guest agent answered {got} to a {asked} request")]
    UnexpectedResponse {
        asked: &'static str,
        got: &'static str,
    },
    #[error("guest agent returned evidence for other report_data (expected {expected}… for our challenge and its instance key, got {got}…): stale or replayed evidence")]
    ReportDataMismatch { expected: String, got: String },
    #[error("guest agent returned an empty report from provider {0}")]
    EmptyReport(String),
}

/// A connected client.
pub struct AgentClient<S> {
    stream: S,
    timeout: Duration,
}

/// The error for an answer other than the one `asked` for: the agent's own error, or an
/// unexpected response type.
fn not_answered(asked: &'static str, r: Response) -> AgentClientError {
    match r {
        Response::Error(e) => AgentClientError::Agent {
            code: e.code,
            message: e.message,
        },
        other => AgentClientError::UnexpectedResponse {
            asked,
            got: other.kind(),
        },
    }
}

impl AgentClient<UnixStream> {
    /// Connects over a unix socket (tests, or a host-side vsock proxy).
    pub async fn connect_unix(path: &Path) -> Result<Self, AgentClientError> {
        let stream =
            UnixStream::connect(path)
                .await
                .map_err(|source| AgentClientError::Connect {
                    addr: path.display().to_string(),
                    source,
                })?;
        Ok(Self::new(stream))
    }
}

impl AgentClient<tokio_vsock::VsockStream> {
    /// Connects to the agent in the guest with context ID `cid` (QEMU's
    /// `vhost-vsock-pci,guest-cid=…`).
    pub async fn connect_vsock(cid: u32, port: u32) -> Result<Self, AgentClientError> {
        let stream = tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(cid, port))
            .await
            .map_err(|source| AgentClientError::Connect {
                addr: format!("vsock:{cid}:{port}"),
                source,
            })?;
        Ok(Self::new(stream))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AgentClient<S> {
    pub fn new(stream: S) -> Self {
        AgentClient {
            stream,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Sets the time allowed for each request and its response.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends one request and reads its response.
    pub async fn call(&mut self, req: &Request) -> Result<Response, AgentClientError> {
        let body = req.encode()?;
        let timeout = self.timeout;
        let exchange = async {
            write_frame(&mut self.stream, &body, MAX_REQUEST_BYTES).await?;
            read_frame(&mut self.stream, MAX_RESPONSE_BYTES).await
        };
        let reply = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| AgentClientError::Timeout(timeout))??
            .ok_or(AgentClientError::NoAnswer)?;
        Ok(Response::decode(&reply)?)
    }

    /// Asks which TEE provider the guest has.
    pub async fn provider_info(&mut self) -> Result<ProviderInfo, AgentClientError> {
        match self.call(&Request::GetProviderInfo).await? {
            Response::ProviderInfo(info) => Ok(info),
            other => Err(not_answered("get-provider-info", other)),
        }
    }

    /// Asks for the `report_data` the agent binds for `challenge` and its instance key
    /// (simulated TEEs only: they sign it in the firmware's place), and checks the binding.
    pub async fn get_report_data(
        &mut self,
        challenge: &Challenge,
    ) -> Result<GuestReportData, AgentClientError> {
        let resp = match self.call(&Request::get_report_data(challenge)).await? {
            Response::ReportData(r) => r,
            other => return Err(not_answered("get-report-data", other)),
        };
        let instance_key = b64_decode("instanceKey", &resp.instance_key)?;
        let report_data = checked_report_data(challenge, &instance_key, &resp.report_data)?;
        Ok(GuestReportData {
            report_data,
            instance_key,
        })
    }

    /// Asks for fresh evidence bound to `challenge` and checks the binding.
    pub async fn get_evidence(
        &mut self,
        challenge: &Challenge,
    ) -> Result<GuestEvidence, AgentClientError> {
        let resp = match self.call(&Request::get_evidence(challenge)).await? {
            Response::Evidence(ev) => ev,
            other => return Err(not_answered("get-evidence", other)),
        };
        let instance_key = b64_decode("instanceKey", &resp.instance_key)?;
        let expected = checked_report_data(challenge, &instance_key, &resp.report_data)?;
        let outblob = b64_decode("outblob", &resp.outblob)?;
        if outblob.is_empty() {
            return Err(AgentClientError::EmptyReport(resp.provider));
        }
        let auxblob = match &resp.auxblob {
            Some(a) => Some(b64_decode("auxblob", a)?),
            None => None,
        };
        Ok(GuestEvidence {
            provider: resp.provider,
            report_data: expected,
            instance_key,
            outblob,
            auxblob,
            generation: resp.generation,
        })
    }
}

/// What `get-report-data` answered, checked against the challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestReportData {
    pub report_data: [u8; 64],
    pub instance_key: Vec<u8>,
}

/// The binding of `challenge` and `instance_key`, if `got` (hex) is exactly it.
fn checked_report_data(
    challenge: &Challenge,
    instance_key: &[u8],
    got: &str,
) -> Result<[u8; 64], AgentClientError> {
    let expected = challenge.report_data(instance_key);
    if hex::decode(got).unwrap_or_default().as_slice() != expected.as_slice() {
        return Err(AgentClientError::ReportDataMismatch {
            expected: hex::encode(&expected[..8]),
            got: got.chars().take(16).collect(),
        });
    }
    Ok(expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent_proto::{b64_encode, EvidenceResponse};

    /// A one-shot fake agent that answers the first request with `resp`.
    async fn fake_agent(resp: Response) -> AgentClient<tokio::io::DuplexStream> {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let _ = read_frame(&mut server, MAX_REQUEST_BYTES).await;
            let body = resp.encode().unwrap();
            let _ = write_frame(&mut server, &body, MAX_RESPONSE_BYTES).await;
        });
        AgentClient::new(client)
    }

    #[tokio::test]
    async fn evidence_for_another_nonce_is_refused() {
        let old = Challenge::cvm("u", Some(b"old nonce"));
        let resp = Response::Evidence(EvidenceResponse {
            provider: "sev_guest".into(),
            report_data: hex::encode(old.report_data(b"key")),
            instance_key: b64_encode(b"key"),
            outblob: b64_encode(b"report"),
            auxblob: None,
            generation: 1,
        });
        let e = fake_agent(resp)
            .await
            .get_evidence(&Challenge::cvm("u", Some(b"new nonce")))
            .await
            .unwrap_err();
        assert!(
            matches!(e, AgentClientError::ReportDataMismatch { .. }),
            "{e}"
        );
    }

    #[tokio::test]
    async fn silent_agent_times_out() {
        let (client, _server) = tokio::io::duplex(1024);
        let e = AgentClient::new(client)
            .with_timeout(Duration::from_millis(50))
            .provider_info()
            .await
            .unwrap_err();
        assert!(matches!(e, AgentClientError::Timeout(_)), "{e}");
    }

    #[tokio::test]
    async fn agent_errors_surface_code_and_message() {
        let resp = Response::error(ErrorCode::ProviderMissing, "no /sys/kernel/config/tsm");
        let e = fake_agent(resp).await.provider_info().await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "guest agent error provider-missing: no /sys/kernel/config/tsm"
        );
    }
}
