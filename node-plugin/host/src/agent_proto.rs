//! Messages between the node plugin (client) and the guest agent (server).
//!
//! Wire format (see `docs/agent-protocol.md`): each message is one frame, a 4-byte
//! big-endian length followed by that many bytes of UTF-8 JSON. Every body carries
//! `"version": 1`. Requests are at most [`MAX_REQUEST_BYTES`], responses at most
//! [`MAX_RESPONSE_BYTES`]; a peer that announces a longer frame gets an error (the server
//! answers `frame-too-large`) and the connection is closed, because the rest of the stream
//! can no longer be trusted to be aligned on frames.
//!
//! Evidence is bound to the caller's challenge *and* to the guest instance: the agent adds
//! the SHA-256 of its own instance key (made at boot) and writes the result of
//! `cvm_attest::binding` (docs/evidence-binding.md) as the 64 bytes of `report_data`
//! (configfs-tsm `inblob`). The caller chooses the purpose, the subject UID and the nonce,
//! never the key, so one guest cannot answer as another instance.

use std::time::Duration;

use base64::Engine as _;
pub use cvm_attest::binding::{Challenge, Purpose};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol version this build speaks (2: the instance-bound challenge).
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest request frame body (64 KiB).
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;
/// Largest response frame body (1 MiB): an SNP report is ~1.2 KiB, a TDX quote ~5-8 KiB,
/// the SNP certificate table a few KiB; base64 adds a third.
pub const MAX_RESPONSE_BYTES: u32 = 1024 * 1024;
/// Longest nonce a client may send, in bytes (it is hashed, so length only costs time).
pub const MAX_NONCE_BYTES: usize = cvm_attest::binding::MAX_NONCE_BYTES;
/// Longest subject UID, in characters (Kubernetes UIDs are 36).
pub const MAX_SUBJECT_CHARS: usize = 128;
/// Default vsock port of the agent.
pub const DEFAULT_VSOCK_PORT: u32 = 4050;

/// A request as the client sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Request {
    /// Which TEE provider the guest has, and what the agent speaks.
    GetProviderInfo,
    /// Fresh evidence whose `report_data` binds purpose, subject, nonce and the agent's
    /// own instance key (`cvm_attest::binding`).
    GetEvidence(ChallengeFields),
    /// The `report_data` the agent would write for this challenge, and its instance key,
    /// without a report. Only a simulated TEE asks this: it stands in for the firmware and
    /// signs what the agent in a real (non-confidential) guest computed, so the simulated
    /// report still names that guest instance. A real host asks for `get-evidence`.
    GetReportData(ChallengeFields),
}

/// The challenge of a `get-evidence` or `get-report-data` request, as on the wire
/// (validated by [`Request::challenge`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeFields {
    /// `cvm` or `migration`.
    pub purpose: String,
    /// UID of the CVM (or migration) the report is for, 1 to [`MAX_SUBJECT_CHARS`].
    pub subject: String,
    /// The owner's challenge, lowercase hex, 0 to [`MAX_NONCE_BYTES`] bytes.
    #[serde(default)]
    pub nonce: String,
    /// UID of the live migration that last moved the CVM (empty: none).
    #[serde(default)]
    pub epoch: String,
}

impl ChallengeFields {
    fn of(c: &Challenge) -> Self {
        ChallengeFields {
            purpose: c.purpose.as_str().into(),
            subject: c.subject_uid.clone(),
            nonce: hex::encode(&c.nonce),
            epoch: c.epoch.clone(),
        }
    }
}

/// A response as the agent sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Response {
    ProviderInfo(ProviderInfo),
    Evidence(EvidenceResponse),
    ReportData(ReportDataResponse),
    Error(ErrorResponse),
}

/// Answer to [`Request::GetReportData`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportDataResponse {
    /// The 64 bytes `get-evidence` would write to `inblob`, hex.
    pub report_data: String,
    /// The agent's instance public key (Ed25519, 32 bytes), base64.
    pub instance_key: String,
}

/// Answer to [`Request::GetProviderInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderInfo {
    /// configfs-tsm provider name: `sev_guest` (SEV-SNP) or `tdx_guest` (TDX).
    pub provider: String,
    /// The agent's own version (its crate version).
    pub agent_version: String,
    /// Protocol versions the agent accepts.
    pub protocol_versions: Vec<u32>,
}

/// Answer to [`Request::GetEvidence`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EvidenceResponse {
    /// configfs-tsm provider that produced `outblob`.
    pub provider: String,
    /// The 64 bytes written to `inblob`, hex: `cvm_attest::binding` of the request and
    /// `instanceKey`.
    pub report_data: String,
    /// The agent's instance public key (Ed25519, 32 bytes), base64.
    pub instance_key: String,
    /// The report (SNP) or quote (TDX), base64.
    pub outblob: String,
    /// Supplemental data (the SNP certificate table: VCEK/VLEK, ASK, ARK), base64, when the
    /// provider gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auxblob: Option<String>,
    /// configfs-tsm `generation` the report was read at.
    pub generation: u64,
}

/// Machine-readable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The body is not JSON, or not a known request.
    BadRequest,
    /// The `version` is not one the agent speaks.
    UnsupportedVersion,
    /// The frame is longer than the limit; the agent closes the connection after this.
    FrameTooLarge,
    /// The guest has no configfs-tsm provider (no `sev_guest`/`tdx_guest` driver, or
    /// configfs not mounted).
    ProviderMissing,
    /// The kernel refused or failed to produce a report.
    ReportFailed,
    /// Another writer changed the report entry while it was read (`generation` moved).
    Conflict,
    /// The agent failed in a way not covered above.
    Internal,
}

impl ErrorCode {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad-request",
            ErrorCode::UnsupportedVersion => "unsupported-version",
            ErrorCode::FrameTooLarge => "frame-too-large",
            ErrorCode::ProviderMissing => "provider-missing",
            ErrorCode::ReportFailed => "report-failed",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Internal => "internal",
        }
    }
}

/// An error the agent reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorResponse {
    pub code: ErrorCode,
    /// Human-readable detail, meant for a CVM condition message.
    pub message: String,
}

/// Errors of framing and decoding, on either side.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: u32, max: u32 },
    #[error("empty frame: a message body is at least `{{}}`")]
    EmptyFrame,
    #[error("connection closed by peer")]
    Closed,
    #[error("connection closed in the middle of a frame ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    #[error("timed out after {0:?} waiting for the peer")]
    Timeout(Duration),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("message body is not valid JSON: {0}")]
    Json(String),
    #[error("message has no numeric `version` field")]
    MissingVersion,
    #[error("protocol version {got} is not supported (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion { got: u64 },
    #[error("message is not a known {what}: {detail}")]
    Unknown { what: &'static str, detail: String },
    #[error("invalid field {field}: {detail}")]
    Invalid { field: &'static str, detail: String },
}

impl ProtoError {
    /// The code a server answers with for this decoding error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtoError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            ProtoError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            ProtoError::Io(_) | ProtoError::Timeout(_) => ErrorCode::Internal,
            _ => ErrorCode::BadRequest,
        }
    }
}

/// Reads one frame's body. `Ok(None)` when the peer closed cleanly between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: u32,
) -> Result<Option<Vec<u8>>, ProtoError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(ProtoError::Truncated { got, want: 4 })
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(header);
    if len > max {
        return Err(ProtoError::FrameTooLarge { len, max });
    }
    if len == 0 {
        return Err(ProtoError::EmptyFrame);
    }
    let want = len as usize;
    // Allocation is bounded by `max`, checked above.
    let mut body = vec![0u8; want];
    let mut got = 0;
    while got < want {
        let n = r.read(&mut body[got..]).await?;
        if n == 0 {
            return Err(ProtoError::Truncated { got, want });
        }
        got += n;
    }
    Ok(Some(body))
}

/// Writes one frame; refuses bodies over `max` so a sender never emits what its peer must
/// reject.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    body: &[u8],
    max: u32,
) -> Result<(), ProtoError> {
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    if len > max {
        return Err(ProtoError::FrameTooLarge { len, max });
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Adds `"version"` to a tagged message.
fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtoError> {
    let mut v = serde_json::to_value(msg).map_err(|e| ProtoError::Json(e.to_string()))?;
    if let Some(obj) = v.as_object_mut() {
        obj.insert("version".into(), PROTOCOL_VERSION.into());
    }
    serde_json::to_vec(&v).map_err(|e| ProtoError::Json(e.to_string()))
}

/// Checks `"version"` first, so a future version's request gets `unsupported-version`
/// rather than a confusing `bad-request`.
fn decode<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &'static str,
) -> Result<T, ProtoError> {
    let mut v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ProtoError::Json(e.to_string()))?;
    let obj = v.as_object_mut().ok_or(ProtoError::Unknown {
        what,
        detail: "the body is not a JSON object".into(),
    })?;
    let version = obj
        .remove("version")
        .and_then(|v| v.as_u64())
        .ok_or(ProtoError::MissingVersion)?;
    if version != u64::from(PROTOCOL_VERSION) {
        return Err(ProtoError::UnsupportedVersion { got: version });
    }
    serde_json::from_value(v).map_err(|e| ProtoError::Unknown {
        what,
        detail: e.to_string(),
    })
}

impl Request {
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        encode(self)
    }

    /// Decodes and validates a request body.
    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        let req: Request = decode(body, "request")?;
        req.challenge()?;
        Ok(req)
    }

    /// A `get-evidence` request for this challenge.
    pub fn get_evidence(c: &Challenge) -> Self {
        Request::GetEvidence(ChallengeFields::of(c))
    }

    /// A `get-report-data` request for this challenge.
    pub fn get_report_data(c: &Challenge) -> Self {
        Request::GetReportData(ChallengeFields::of(c))
    }

    /// The validated challenge of a `get-evidence` or `get-report-data` request (`None`
    /// for other requests).
    pub fn challenge(&self) -> Result<Option<Challenge>, ProtoError> {
        let (Request::GetEvidence(f) | Request::GetReportData(f)) = self else {
            return Ok(None);
        };
        let ChallengeFields {
            purpose,
            subject,
            nonce,
            epoch,
        } = f;
        let purpose = Purpose::parse(purpose).ok_or_else(|| ProtoError::Invalid {
            field: "purpose",
            detail: format!("{purpose:?}; must be \"cvm\" or \"migration\""),
        })?;
        if subject.is_empty() || subject.chars().count() > MAX_SUBJECT_CHARS {
            return Err(ProtoError::Invalid {
                field: "subject",
                detail: format!(
                    "{} characters; must be 1 to {MAX_SUBJECT_CHARS}",
                    subject.chars().count()
                ),
            });
        }
        if epoch.chars().count() > MAX_SUBJECT_CHARS {
            return Err(ProtoError::Invalid {
                field: "epoch",
                detail: format!("longer than {MAX_SUBJECT_CHARS} characters"),
            });
        }
        Ok(Some(Challenge {
            purpose,
            subject_uid: subject.clone(),
            nonce: decode_nonce(nonce)?,
            epoch: epoch.clone(),
        }))
    }
}

impl Response {
    /// The wire `type`, for messages about an unexpected answer.
    pub fn kind(&self) -> &'static str {
        match self {
            Response::ProviderInfo(_) => "provider-info",
            Response::Evidence(_) => "evidence",
            Response::ReportData(_) => "report-data",
            Response::Error(_) => "error",
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        encode(self)
    }

    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        decode(body, "response")
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Response::Error(ErrorResponse {
            code,
            message: message.into(),
        })
    }
}

/// Decodes a hex nonce and enforces its length bounds.
pub fn decode_nonce(nonce: &str) -> Result<Vec<u8>, ProtoError> {
    let bytes = hex::decode(nonce).map_err(|e| ProtoError::Invalid {
        field: "nonce",
        detail: format!("not hex: {e}"),
    })?;
    if bytes.len() > MAX_NONCE_BYTES {
        return Err(ProtoError::Invalid {
            field: "nonce",
            detail: format!(
                "{} bytes; must be at most {MAX_NONCE_BYTES} bytes",
                bytes.len()
            ),
        });
    }
    Ok(bytes)
}

/// Standard base64 with padding, the encoding of `outblob` and `auxblob`.
pub fn b64_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes a base64 field, naming it in the error.
pub fn b64_decode(field: &'static str, s: &str) -> Result<Vec<u8>, ProtoError> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| ProtoError::Invalid {
            field,
            detail: format!("not base64: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_carries_version() {
        let c = Challenge::cvm("uid-1", Some(&[0x00, 0xff])).after_migration(Some("m-1"));
        let req = Request::get_evidence(&c);
        let body = req.encode().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["version"], 2);
        assert_eq!(v["type"], "get-evidence");
        assert_eq!(v["purpose"], "cvm");
        assert_eq!(v["subject"], "uid-1");
        assert_eq!(v["nonce"], "00ff");
        assert_eq!(v["epoch"], "m-1");
        let back = Request::decode(&body).unwrap();
        assert_eq!(back, req);
        assert_eq!(back.challenge().unwrap(), Some(c));
    }

    #[test]
    fn wrong_or_missing_version_is_refused() {
        let e = Request::decode(br#"{"version":1,"type":"get-provider-info"}"#).unwrap_err();
        assert!(
            matches!(e, ProtoError::UnsupportedVersion { got: 1 }),
            "{e}"
        );
        assert_eq!(e.code(), ErrorCode::UnsupportedVersion);
        let e = Request::decode(br#"{"type":"get-provider-info"}"#).unwrap_err();
        assert!(matches!(e, ProtoError::MissingVersion), "{e}");
    }

    #[test]
    fn bad_nonce_and_unknown_type_are_bad_requests() {
        for body in [
            &br#"{"version":2,"type":"get-evidence","purpose":"cvm","subject":"u","nonce":"zz"}"#[..],
            br#"{"version":2,"type":"get-evidence","purpose":"cvm","subject":"","nonce":""}"#,
            br#"{"version":2,"type":"get-evidence","purpose":"attack","subject":"u"}"#,
            br#"{"version":2,"type":"get-evidence","nonce":"00"}"#,
            br#"{"version":2,"type":"format-disk"}"#,
            br#"[1,2]"#,
            b"not json",
        ] {
            let e = Request::decode(body).unwrap_err();
            assert_eq!(e.code(), ErrorCode::BadRequest, "{e}");
        }
        let long = "ab".repeat(MAX_NONCE_BYTES + 1);
        let body = format!(
            r#"{{"version":2,"type":"get-evidence","purpose":"cvm","subject":"u","nonce":"{long}"}}"#
        );
        assert!(Request::decode(body.as_bytes()).is_err());
        // No nonce is a valid challenge: the CVM's UID and the instance key still bind it.
        let ok = br#"{"version":2,"type":"get-evidence","purpose":"migration","subject":"m"}"#;
        assert_eq!(
            Request::decode(ok).unwrap().challenge().unwrap(),
            Some(Challenge::migration("m"))
        );
    }

    #[tokio::test]
    async fn frames_round_trip_and_limits_hold() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_frame(&mut a, b"{\"x\":1}", 100).await.unwrap();
        let got = read_frame(&mut b, 100).await.unwrap().unwrap();
        assert_eq!(got, b"{\"x\":1}");

        // A sender refuses what the receiver would refuse.
        assert!(matches!(
            write_frame(&mut a, &[b'x'; 101], 100).await,
            Err(ProtoError::FrameTooLarge { len: 101, max: 100 })
        ));

        // A receiver refuses a too-long header without reading (or allocating) the body.
        a.write_all(&1_000_000u32.to_be_bytes()).await.unwrap();
        let e = read_frame(&mut b, 100).await.unwrap_err();
        assert!(matches!(
            e,
            ProtoError::FrameTooLarge { len: 1_000_000, .. }
        ));

        // Clean close between frames is not an error; a torn frame is.
        a.write_all(&10u32.to_be_bytes()).await.unwrap();
        a.write_all(b"abc").await.unwrap();
        drop(a);
        let e = read_frame(&mut b, 100).await.unwrap_err();
        assert!(
            matches!(e, ProtoError::Truncated { got: 3, want: 10 }),
            "{e}"
        );
        assert!(read_frame(&mut b, 100).await.unwrap().is_none());
    }
}
