//! An async QMP client over a unix socket.
//!
//! QMP is newline-delimited JSON: QEMU greets with `{"QMP": …}`, the client must send
//! `qmp_capabilities` before any other command, and every command gets exactly one
//! `{"return": …}` or `{"error": {"class", "desc"}}` carrying the `id` the client sent.
//! Asynchronous `{"event": …}` messages can arrive between them; they are kept (up to a
//! bound) for the caller. Lines are read with a size limit and every wait has a timeout, so
//! a misbehaving QEMU cannot make the node plugin buffer without end or hang.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Longest QMP line accepted (a `query-sev-capabilities` reply with its cert chain is a
/// few KiB; attestation reports are smaller).
pub const MAX_LINE_BYTES: usize = 1024 * 1024;
/// Events kept for [`QmpClient::take_events`]; older ones are dropped.
pub const MAX_EVENTS: usize = 256;
/// Default time for one command and its reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("QMP i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("QEMU closed the QMP connection")]
    Closed,
    #[error("QMP line longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    #[error("QMP {what} timed out after {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    /// QEMU answered `query-sev` but the guest has no SEV context (QEMU before 9.1 says so
    /// with `enabled: false` instead of an error).
    #[error("SEV is not enabled for this guest (query-sev: enabled=false, state {state}): the host lacks SEV or the guest was started without a sev-guest object")]
    SevNotEnabled { state: String },
    #[error("malformed QMP message: {0}")]
    Malformed(String),
    #[error("unexpected QMP greeting: {0}")]
    Greeting(String),
    /// QEMU refused the command; `class` is QMP's error class (`GenericError`,
    /// `CommandNotFound`, …) and `desc` its human-readable text.
    #[error("QMP {command} failed ({class}): {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// The greeting's version block.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
    /// Distribution suffix, e.g. `Debian 1:7.2+dfsg-7`.
    pub package: String,
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct QmpEvent {
    pub event: String,
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub timestamp: Value,
}

/// `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct StatusInfo {
    pub running: bool,
    /// `prelaunch`, `paused`, `running`, `shutdown`, …
    pub status: String,
}

/// `query-sev` (fields common to QEMU 7.x and 9.x; SNP adds `snp-policy`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SevInfo {
    pub enabled: bool,
    pub api_major: u8,
    pub api_minor: u8,
    pub build_id: u8,
    #[serde(default)]
    pub policy: Option<u32>,
    #[serde(default)]
    pub snp_policy: Option<u64>,
    pub state: String,
    pub handle: u32,
    /// `sev` or `sev-snp` (QEMU 9.1+).
    #[serde(default)]
    pub sev_type: Option<String>,
}

/// `query-sev-capabilities`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SevCapabilities {
    pub pdh: String,
    pub cert_chain: String,
    #[serde(default)]
    pub cpu0_id: Option<String>,
    pub cbitpos: u32,
    pub reduced_phys_bits: u32,
}

/// A connected, negotiated QMP session.
pub struct QmpClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    events: VecDeque<QmpEvent>,
    version: QemuVersion,
    timeout: Duration,
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        Self::connect_with_timeout(path, DEFAULT_TIMEOUT).await
    }

    pub async fn connect_with_timeout(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut client = QmpClient {
            reader: BufReader::new(r),
            writer: w,
            next_id: 1,
            events: VecDeque::new(),
            version: QemuVersion {
                major: 0,
                minor: 0,
                micro: 0,
                package: String::new(),
            },
            timeout,
        };
        let greeting = client.read_message("greeting").await?;
        client.version = parse_greeting(&greeting)?;
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// The QEMU version from the greeting.
    pub fn version(&self) -> &QemuVersion {
        &self.version
    }

    /// Events received so far, oldest first; the buffer is emptied.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = serde_json::to_vec(&msg).map_err(|e| QmpError::Malformed(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        self.writer.flush().await?;
        loop {
            let reply = self.read_message(command).await?;
            if reply.get("event").is_some() {
                self.push_event(reply);
                continue;
            }
            // A reply to another id (a command abandoned after a timeout) is stale.
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                tracing::debug!(%command, "skipping QMP reply with another id: {reply}");
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: err
                        .get("class")
                        .and_then(Value::as_str)
                        .unwrap_or("Unknown")
                        .to_string(),
                    desc: err
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                });
            }
            return Err(QmpError::Malformed(format!(
                "reply to {command} has neither return nor error: {reply}"
            )));
        }
    }

    /// Runs a command and decodes its return value.
    pub async fn execute_as<T: DeserializeOwned>(
        &mut self,
        command: &str,
        args: Option<Value>,
    ) -> Result<T, QmpError> {
        let v = self.execute(command, args).await?;
        serde_json::from_value(v)
            .map_err(|e| QmpError::Malformed(format!("reply to {command}: {e}")))
    }

    pub async fn query_status(&mut self) -> Result<StatusInfo, QmpError> {
        self.execute_as("query-status", None).await
    }

    /// `query-sev` as QEMU answers it (possibly `enabled: false`).
    pub async fn query_sev(&mut self) -> Result<SevInfo, QmpError> {
        self.execute_as("query-sev", None).await
    }

    /// `query-sev`, with a guest that has no SEV context reported as an error, as newer
    /// QEMUs do themselves.
    pub async fn query_sev_enabled(&mut self) -> Result<SevInfo, QmpError> {
        let info = self.query_sev().await?;
        if info.enabled {
            Ok(info)
        } else {
            Err(QmpError::SevNotEnabled { state: info.state })
        }
    }

    /// The SEV/SEV-ES launch measurement, base64 (measurement then 16-byte mnonce).
    pub async fn query_sev_launch_measure(&mut self) -> Result<String, QmpError> {
        let v: Value = self.execute("query-sev-launch-measure", None).await?;
        string_field(&v, "data", "query-sev-launch-measure")
    }

    pub async fn query_sev_capabilities(&mut self) -> Result<SevCapabilities, QmpError> {
        self.execute_as("query-sev-capabilities", None).await
    }

    /// An SEV attestation report for a base64 `mnonce` (16 bytes), base64.
    pub async fn query_sev_attestation_report(
        &mut self,
        mnonce_b64: &str,
    ) -> Result<String, QmpError> {
        let v = self
            .execute(
                "query-sev-attestation-report",
                Some(json!({ "mnonce": mnonce_b64 })),
            )
            .await?;
        string_field(&v, "data", "query-sev-attestation-report")
    }

    /// Resumes a guest started with `-S`.
    pub async fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(|_| ())
    }

    /// Asks QEMU to exit. QEMU may close the socket before or after answering; both count
    /// as success.
    pub async fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn push_event(&mut self, v: Value) {
        match serde_json::from_value::<QmpEvent>(v) {
            Ok(ev) => {
                if self.events.len() >= MAX_EVENTS {
                    self.events.pop_front();
                }
                self.events.push_back(ev);
            }
            Err(e) => tracing::debug!("ignoring malformed QMP event: {e}"),
        }
    }

    async fn read_message(&mut self, what: &str) -> Result<Value, QmpError> {
        let timeout = self.timeout;
        let line = tokio::time::timeout(timeout, read_line_limited(&mut self.reader))
            .await
            .map_err(|_| QmpError::Timeout {
                what: what.to_string(),
                timeout,
            })??;
        serde_json::from_slice(&line).map_err(|e| QmpError::Malformed(e.to_string()))
    }
}

fn string_field(v: &Value, field: &str, command: &str) -> Result<String, QmpError> {
    v.get(field)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| QmpError::Malformed(format!("reply to {command} has no string {field}")))
}

fn parse_greeting(v: &Value) -> Result<QemuVersion, QmpError> {
    let q = v
        .get("QMP")
        .ok_or_else(|| QmpError::Greeting(v.to_string()))?;
    let ver = q
        .get("version")
        .ok_or_else(|| QmpError::Greeting(v.to_string()))?;
    let qemu = ver
        .get("qemu")
        .ok_or_else(|| QmpError::Greeting(v.to_string()))?;
    let num = |k: &str| qemu.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
    Ok(QemuVersion {
        major: num("major"),
        minor: num("minor"),
        micro: num("micro"),
        package: ver
            .get("package")
            .and_then(Value::as_str)
            .unwrap_or("")
            .trim()
            .to_string(),
    })
}

/// Reads one `\n`-terminated line of at most [`MAX_LINE_BYTES`], without the newline.
async fn read_line_limited<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> Result<Vec<u8>, QmpError> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Err(QmpError::Closed);
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > MAX_LINE_BYTES + 1 {
            return Err(QmpError::LineTooLong);
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                line.clear();
                continue;
            }
            return Ok(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    /// A scripted QMP server: sends `lines` in order, reading one client line before each
    /// entry that starts with `<`.
    async fn scripted(dir: &Path, script: Vec<String>) -> std::path::PathBuf {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            for item in script {
                if let Some(rest) = item.strip_prefix('<') {
                    let mut l = String::new();
                    r.read_line(&mut l).await.unwrap();
                    assert!(l.contains(rest), "client sent {l}, expected {rest}");
                } else {
                    w.write_all(item.as_bytes()).await.unwrap();
                    w.write_all(b"\n").await.unwrap();
                }
            }
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest).await;
        });
        path
    }

    const GREETING: &str = r#"{"QMP":{"version":{"qemu":{"micro":1,"minor":2,"major":9},"package":" x "},"capabilities":["oob"]}}"#;

    #[tokio::test]
    async fn events_are_collected_and_stale_ids_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = scripted(
            dir.path(),
            vec![
                GREETING.into(),
                "<qmp_capabilities".into(),
                r#"{"return":{},"id":1}"#.into(),
                "<query-status".into(),
                r#"{"event":"STOP","data":{},"timestamp":{"seconds":1,"microseconds":2}}"#.into(),
                r#"{"return":{"running":true,"status":"running"},"id":99}"#.into(),
                r#"{"return":{"running":false,"status":"prelaunch"},"id":2}"#.into(),
            ],
        )
        .await;
        let mut c = QmpClient::connect(&path).await.unwrap();
        assert_eq!(c.version().major, 9);
        assert_eq!(c.version().package, "x");
        let st = c.query_status().await.unwrap();
        assert_eq!(st.status, "prelaunch");
        let ev = c.take_events();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].event, "STOP");
        assert!(c.take_events().is_empty());
    }

    #[tokio::test]
    async fn oversized_line_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let huge = format!(r#"{{"QMP":"{}"}}"#, "a".repeat(MAX_LINE_BYTES + 10));
        let path = scripted(dir.path(), vec![huge]).await;
        let e = QmpClient::connect(&path).await.err().unwrap();
        assert!(matches!(e, QmpError::LineTooLong), "{e}");
    }

    #[tokio::test]
    async fn silent_server_times_out_and_bad_greeting_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = scripted(dir.path(), vec![]).await;
        let e = QmpClient::connect_with_timeout(&path, Duration::from_millis(100))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let path = scripted(dir.path(), vec![r#"{"hello":1}"#.into()]).await;
        let e = QmpClient::connect(&path).await.err().unwrap();
        assert!(matches!(e, QmpError::Greeting(_)), "{e}");
    }

    #[tokio::test]
    async fn command_error_keeps_class_and_desc() {
        let dir = tempfile::tempdir().unwrap();
        let path = scripted(
            dir.path(),
            vec![
                GREETING.into(),
                "<qmp_capabilities".into(),
                r#"{"return":{},"id":1}"#.into(),
                "<mnonce".into(),
                r#"{"error":{"class":"GenericError","desc":"SEV: guest is not running"},"id":2}"#
                    .into(),
            ],
        )
        .await;
        let mut c = QmpClient::connect(&path).await.unwrap();
        let e = c.query_sev_attestation_report("AAAA").await.unwrap_err();
        match e {
            QmpError::Command { class, desc, .. } => {
                assert_eq!(class, "GenericError");
                assert_eq!(desc, "SEV: guest is not running");
            }
            other => panic!("{other}"),
        }
    }
}
