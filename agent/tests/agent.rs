//! The agent against a fake configfs-tsm tree, and the node plugin's client against the
//! agent over a unix socket.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cvm_agent::server::{serve_unix, EvidenceSource, ServerConfig};
use cvm_agent::tsm::{ConfigfsTsm, RealFs, TsmError, TsmFs};
use cvm_host::agent_client::{AgentClient, AgentClientError};
use cvm_host::agent_proto::{
    read_frame, write_frame, Challenge, ErrorCode, Response, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES,
};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

/// A fake kernel over a real directory: `mkdir` adds the attribute files, writing
/// `inblob` produces `outblob` (a marker plus the inblob) and `auxblob`, and bumps
/// `generation`, as configfs-tsm does.
struct FakeKernel {
    provider: Option<&'static str>,
    auxblob: Option<Vec<u8>>,
    /// Simulates another writer touching the entry while the agent reads it.
    race: AtomicBool,
    /// Simulates the TEE failing to produce a report.
    fail_outblob: bool,
}

impl FakeKernel {
    fn snp() -> Self {
        FakeKernel {
            provider: Some("sev_guest"),
            auxblob: Some(b"CERT-TABLE".to_vec()),
            race: AtomicBool::new(false),
            fail_outblob: false,
        }
    }

    fn bump(&self, entry: &Path) -> io::Result<()> {
        let g: u64 = std::fs::read_to_string(entry.join("generation"))?
            .trim()
            .parse()
            .unwrap_or(0);
        std::fs::write(entry.join("generation"), format!("{}\n", g + 1))
    }
}

impl TsmFs for FakeKernel {
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        RealFs.create_dir(path)?;
        if let Some(p) = self.provider {
            std::fs::write(path.join("provider"), format!("{p}\n"))?;
        }
        std::fs::write(path.join("generation"), "0\n")
    }
    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        RealFs.write(path, data)?;
        if path.file_name().is_some_and(|n| n == "inblob") {
            let entry = path.parent().unwrap();
            if !self.fail_outblob {
                let mut out = b"REPORT:".to_vec();
                out.extend_from_slice(data);
                std::fs::write(entry.join("outblob"), out)?;
            }
            if let Some(a) = &self.auxblob {
                std::fs::write(entry.join("auxblob"), a)?;
            }
            self.bump(entry)?;
        }
        Ok(())
    }
    fn read(&self, path: &Path, max: u64) -> io::Result<Vec<u8>> {
        let data = RealFs.read(path, max)?;
        if path.file_name().is_some_and(|n| n == "outblob") && self.race.load(Ordering::SeqCst) {
            self.bump(path.parent().unwrap())?;
        }
        Ok(data)
    }
    fn remove_entry(&self, path: &Path) -> io::Result<()> {
        // configfs removes attributes with the directory; a plain directory needs this.
        std::fs::remove_dir_all(path)
    }
}

fn tsm_tree() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let tsm = dir.path().join("tsm");
    std::fs::create_dir_all(tsm.join("report")).unwrap();
    (dir, tsm)
}

fn entries(tsm: &Path) -> usize {
    std::fs::read_dir(tsm.join("report")).unwrap().count()
}

#[test]
fn report_writes_inblob_reads_blobs_and_removes_the_entry() {
    let (_d, tsm) = tsm_tree();
    let src = ConfigfsTsm::with_fs(&tsm, Arc::new(FakeKernel::snp()));
    let rd = Challenge::cvm("u", Some(b"nonce")).report_data(b"k");
    let r = src.report(&rd).unwrap();
    assert_eq!(r.provider, "sev_guest");
    assert_eq!(&r.outblob[..7], b"REPORT:");
    assert_eq!(&r.outblob[7..], &rd[..]);
    assert_eq!(r.auxblob.as_deref(), Some(&b"CERT-TABLE"[..]));
    assert_eq!(r.generation, 1);
    assert_eq!(entries(&tsm), 0, "the report entry was left behind");
    assert_eq!(src.provider().unwrap(), "sev_guest");
    assert_eq!(entries(&tsm), 0);
}

#[test]
fn tdx_without_auxblob_gives_none() {
    let (_d, tsm) = tsm_tree();
    let fake = FakeKernel {
        provider: Some("tdx_guest"),
        auxblob: None,
        ..FakeKernel::snp()
    };
    let r = ConfigfsTsm::with_fs(&tsm, Arc::new(fake))
        .report(&[7; 64])
        .unwrap();
    assert_eq!(r.provider, "tdx_guest");
    assert_eq!(r.auxblob, None);
}

#[test]
fn concurrent_writer_is_detected_by_generation() {
    let (_d, tsm) = tsm_tree();
    let fake = FakeKernel::snp();
    fake.race.store(true, Ordering::SeqCst);
    let e = ConfigfsTsm::with_fs(&tsm, Arc::new(fake))
        .report(&[1; 64])
        .unwrap_err();
    assert!(
        matches!(
            e,
            TsmError::Conflict {
                before: 1,
                after: 2,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(entries(&tsm), 0);
}

#[test]
fn missing_configfs_and_missing_provider_are_named() {
    // No report directory at all, on the real filesystem code.
    let dir = tempfile::tempdir().unwrap();
    let e = ConfigfsTsm::new(dir.path().join("tsm"))
        .report(&[0; 64])
        .unwrap_err();
    assert!(matches!(e, TsmError::ProviderMissing(_)), "{e}");
    assert!(e.to_string().contains("configfs is not mounted"), "{e}");

    // configfs is there but no driver registered a provider.
    let (_d, tsm) = tsm_tree();
    let fake = FakeKernel {
        provider: None,
        ..FakeKernel::snp()
    };
    let e = ConfigfsTsm::with_fs(&tsm, Arc::new(fake))
        .provider()
        .unwrap_err();
    assert!(
        e.to_string().contains("sev-guest (SEV-SNP) or tdx-guest"),
        "{e}"
    );
    assert_eq!(entries(&tsm), 0);
}

#[test]
fn a_missing_provider_names_the_guest_devices_it_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let present = dir.path().join("sev-guest");
    std::fs::write(&present, b"").unwrap();
    let absent = dir.path().join("tdx_guest");
    let e = ConfigfsTsm::new(dir.path().join("tsm"))
        .with_devices(vec![present.clone(), absent.clone()])
        .provider()
        .unwrap_err();
    let m = e.to_string();
    assert!(m.contains("configfs is not mounted"), "{m}");
    assert!(
        m.contains(&format!("the guest has no {}", absent.display())),
        "{m}"
    );
    assert!(m.contains(&format!("{} exists", present.display())), "{m}");
    // Other failures are passed on as they are.
    let (_d, tsm) = tsm_tree();
    let fake = FakeKernel {
        fail_outblob: true,
        ..FakeKernel::snp()
    };
    let e = ConfigfsTsm::with_fs(&tsm, Arc::new(fake))
        .with_devices(vec![absent])
        .report(&[0; 64])
        .unwrap_err();
    assert!(!e.to_string().contains("the guest has no"), "{e}");
}

#[test]
fn real_fs_on_a_plain_tree_fails_cleanly_without_a_kernel() {
    // Real file operations on a plain directory: mkdir works, but no kernel fills in the
    // attributes, so the provider is missing and the entry is cleaned up... by rmdir,
    // which only works on an empty directory: the agent must not leave files of its own.
    let (_d, tsm) = tsm_tree();
    let e = ConfigfsTsm::new(&tsm).report(&[0; 64]).unwrap_err();
    assert!(matches!(e, TsmError::ProviderMissing(_)), "{e}");
    assert_eq!(entries(&tsm), 0);
}

#[test]
fn tee_failure_is_report_failed() {
    let (_d, tsm) = tsm_tree();
    let fake = FakeKernel {
        fail_outblob: true,
        ..FakeKernel::snp()
    };
    let e = ConfigfsTsm::with_fs(&tsm, Arc::new(fake))
        .report(&[0; 64])
        .unwrap_err();
    assert!(matches!(e, TsmError::ReportFailed(_)), "{e}");
    assert!(e.to_string().contains("outblob"), "{e}");
}

/// Starts an agent on a unix socket and waits (bounded) until it accepts.
async fn agent(source: Arc<dyn EvidenceSource>, cfg: ServerConfig) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    tokio::spawn(serve_unix(listener, source, cfg));
    let deadline = Instant::now() + Duration::from_secs(5);
    while UnixStream::connect(&sock).await.is_err() {
        assert!(Instant::now() < deadline, "agent socket never accepted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (dir, sock)
}

fn snp_source() -> (tempfile::TempDir, Arc<dyn EvidenceSource>) {
    let (d, tsm) = tsm_tree();
    (
        d,
        Arc::new(ConfigfsTsm::with_fs(&tsm, Arc::new(FakeKernel::snp()))),
    )
}

#[tokio::test]
async fn client_gets_bound_evidence_from_the_agent() {
    let (_t, src) = snp_source();
    let cfg = ServerConfig::with_new_key().unwrap();
    let key = cfg.instance_key.public().to_vec();
    let (_d, sock) = agent(src, cfg).await;
    let mut c = AgentClient::connect_unix(&sock).await.unwrap();
    let info = c.provider_info().await.unwrap();
    assert_eq!(info.provider, "sev_guest");
    assert_eq!(info.protocol_versions, vec![2]);
    // Several requests on one connection; every answer names the same instance key.
    for nonce in [&b"feedfacecafebeef"[..], b"\x00", &[0xaa; 1024], b""] {
        let ch = Challenge::cvm("cvm-uid", Some(nonce));
        let ev = c.get_evidence(&ch).await.unwrap();
        assert_eq!(ev.instance_key, key);
        assert_eq!(ev.report_data, ch.report_data(&key));
        assert_eq!(&ev.outblob[7..], &ch.report_data(&key)[..]);
        assert_eq!(ev.auxblob.as_deref(), Some(&b"CERT-TABLE"[..]));
    }
    // Another agent (another instance) answers the same challenge with other report data.
    let (_t2, src2) = snp_source();
    let (_d2, sock2) = agent(src2, ServerConfig::with_new_key().unwrap()).await;
    let mut other = AgentClient::connect_unix(&sock2).await.unwrap();
    let ch = Challenge::cvm("cvm-uid", Some(b"n"));
    let a = c.get_evidence(&ch).await.unwrap();
    let b = other.get_evidence(&ch).await.unwrap();
    assert_ne!(a.instance_key, b.instance_key);
    assert_ne!(a.report_data, b.report_data);
}

#[tokio::test]
async fn report_data_is_the_binding_of_the_challenge_and_this_instance() {
    // Without any TEE: a simulated firmware signs what the agent of a real guest binds.
    let dir = tempfile::tempdir().unwrap();
    let src: Arc<dyn EvidenceSource> = Arc::new(ConfigfsTsm::new(dir.path().join("none")));
    let cfg = ServerConfig::with_new_key().unwrap();
    let key = cfg.instance_key.public().to_vec();
    let (_d, sock) = agent(src, cfg).await;
    let mut c = AgentClient::connect_unix(&sock).await.unwrap();
    let ch = Challenge::cvm("cvm-uid", Some(b"nonce"));
    let rd = c.get_report_data(&ch).await.unwrap();
    assert_eq!(rd.instance_key, key);
    assert_eq!(rd.report_data, ch.report_data(&key));
    let other = Challenge::cvm("other-uid", Some(b"nonce"));
    assert_ne!(
        c.get_report_data(&other).await.unwrap().report_data,
        rd.report_data
    );
}

#[tokio::test]
async fn provider_missing_reaches_the_client_as_a_code() {
    let dir = tempfile::tempdir().unwrap();
    let src: Arc<dyn EvidenceSource> = Arc::new(ConfigfsTsm::new(dir.path().join("none")));
    let (_d, sock) = agent(src, ServerConfig::with_new_key().unwrap()).await;
    let mut c = AgentClient::connect_unix(&sock).await.unwrap();
    let e = c
        .get_evidence(&Challenge::cvm("u", Some(b"n")))
        .await
        .unwrap_err();
    match e {
        AgentClientError::Agent { code, message } => {
            assert_eq!(code, ErrorCode::ProviderMissing);
            assert!(message.contains("configfs"), "{message}");
        }
        other => panic!("{other}"),
    }
}

/// Sends raw bytes, returns the decoded response (if any) and whether the agent then
/// closed the connection.
async fn raw(sock: &Path, bytes: &[u8]) -> (Option<Response>, bool) {
    let mut s = UnixStream::connect(sock).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        read_frame(&mut s, MAX_RESPONSE_BYTES),
    )
    .await
    .unwrap()
    .unwrap()
    .map(|b| Response::decode(&b).unwrap());
    // A second request tells whether the connection is still served.
    let ping = br#"{"version":2,"type":"get-provider-info"}"#;
    let open = write_frame(&mut s, ping, MAX_REQUEST_BYTES).await.is_ok()
        && matches!(
            tokio::time::timeout(
                Duration::from_secs(5),
                read_frame(&mut s, MAX_RESPONSE_BYTES)
            )
            .await,
            Ok(Ok(Some(_)))
        );
    (resp, !open)
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn code(r: &Option<Response>) -> ErrorCode {
    match r {
        Some(Response::Error(e)) => e.code,
        other => panic!("expected an error response, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_bodies_get_errors_and_the_connection_stays_open() {
    let (_t, src) = snp_source();
    let (_d, sock) = agent(src, ServerConfig::with_new_key().unwrap()).await;

    let (r, closed) = raw(&sock, &frame(b"this is not json")).await;
    assert_eq!(code(&r), ErrorCode::BadRequest);
    assert!(!closed);

    let (r, closed) = raw(
        &sock,
        &frame(br#"{"version":1,"type":"get-evidence","nonce":"00"}"#),
    )
    .await;
    assert_eq!(code(&r), ErrorCode::UnsupportedVersion);
    assert!(!closed);

    let (r, _) = raw(
        &sock,
        &frame(
            br#"{"version":2,"type":"get-evidence","purpose":"cvm","subject":"u","nonce":"xyz"}"#,
        ),
    )
    .await;
    assert_eq!(code(&r), ErrorCode::BadRequest);

    let (r, _) = raw(&sock, &frame(br#"{"version":2,"type":"launch-missiles"}"#)).await;
    assert_eq!(code(&r), ErrorCode::BadRequest);
}

#[tokio::test]
async fn oversize_and_empty_frames_get_an_error_then_close() {
    let (_t, src) = snp_source();
    let (_d, sock) = agent(src, ServerConfig::with_new_key().unwrap()).await;

    // Only the header is sent: the agent must refuse without waiting for 64 KiB + 1.
    let (r, closed) = raw(&sock, &(MAX_REQUEST_BYTES + 1).to_be_bytes()).await;
    assert_eq!(code(&r), ErrorCode::FrameTooLarge);
    assert!(closed);

    let (r, closed) = raw(&sock, &0u32.to_be_bytes()).await;
    assert_eq!(code(&r), ErrorCode::BadRequest);
    assert!(closed);
}

#[tokio::test]
async fn torn_and_idle_connections_are_closed_without_answer() {
    let (_t, src) = snp_source();
    let cfg = ServerConfig {
        idle_timeout: Duration::from_millis(200),
        ..ServerConfig::with_new_key().unwrap()
    };
    let (_d, sock) = agent(src, cfg).await;

    // Half a frame, then silence: the idle timeout closes it (EOF, no response).
    let mut s = UnixStream::connect(&sock).await.unwrap();
    s.write_all(&100u32.to_be_bytes()).await.unwrap();
    s.write_all(b"{\"vers").await.unwrap();
    let got = tokio::time::timeout(
        Duration::from_secs(5),
        read_frame(&mut s, MAX_RESPONSE_BYTES),
    )
    .await
    .expect("agent kept a silent connection open");
    assert!(matches!(got, Ok(None)), "{got:?}");

    // The agent still serves others afterwards.
    let mut c = AgentClient::connect_unix(&sock).await.unwrap();
    assert_eq!(c.provider_info().await.unwrap().provider, "sev_guest");
}

#[tokio::test]
async fn agent_binary_serves_a_unix_socket() {
    // The built binary, end to end: flags, socket, a provider-missing answer on this host.
    let bin = env!("CARGO_BIN_EXE_cvm-agent");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("a.sock");
    let mut child = tokio::process::Command::new(bin)
        .arg("--unix")
        .arg(&sock)
        .arg("--tsm-root")
        .arg(dir.path().join("no-tsm"))
        .kill_on_drop(true)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        if let Ok(c) = AgentClient::connect_unix(&sock).await {
            break c;
        }
        assert!(child.try_wait().unwrap().is_none(), "cvm-agent exited");
        assert!(Instant::now() < deadline, "cvm-agent never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let e = c.provider_info().await.unwrap_err();
    assert!(
        matches!(
            e,
            AgentClientError::Agent {
                code: ErrorCode::ProviderMissing,
                ..
            }
        ),
        "{e}"
    );
    child.kill().await.unwrap();
}

#[tokio::test]
async fn vsock_loopback_when_the_kernel_offers_it() {
    // AF_VSOCK with the loopback transport (CID 1) exists on many kernels but not in every
    // sandbox; without it the test says so and checks nothing else.
    use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY, VMADDR_CID_LOCAL};
    let port = 40_000 + (std::process::id() % 20_000);
    let listener = match VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("SKIP: AF_VSOCK unavailable here: {e}");
            return;
        }
    };
    let (_t, src) = snp_source();
    tokio::spawn(cvm_agent::server::serve_vsock(
        listener,
        src,
        ServerConfig::with_new_key().unwrap(),
    ));
    let mut c = match AgentClient::connect_vsock(VMADDR_CID_LOCAL, port).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("SKIP: no vsock loopback transport: {e}");
            return;
        }
    };
    let ev = c
        .get_evidence(&Challenge::cvm("u", Some(b"over vsock")))
        .await
        .unwrap();
    assert_eq!(ev.provider, "sev_guest");
}
