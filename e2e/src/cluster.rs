//! A real, throwaway Kubernetes control plane: etcd, kube-apiserver and
//! kube-controller-manager built from the pinned Go modules, on loopback ports.

use crate::error::{io, kube as kerr, HarnessError, Result};
use crate::nodes::{self, SimNode};
use crate::pki::{ClientCert, Pki};
use crate::process::{free_port, port_in_use, wait_until, Supervisor};
use crate::tools;
use base64::Engine;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How to start a control plane.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Where state, certificates, logs and the kubeconfig go. `None`: a temp dir removed on drop.
    pub dir: Option<PathBuf>,
    /// The API server's port. `None`: a free one.
    pub api_port: Option<u16>,
    /// Simulated TEE hosts to create.
    pub nodes: Vec<SimNode>,
    /// CRD manifests to install (multi-document YAML). `None`: every file in `crds/generated/`.
    pub crds: Option<Vec<PathBuf>>,
}

/// A running control plane. Dropping it stops every process and removes its temp dir.
pub struct ControlPlane {
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    bin: PathBuf,
    api_url: String,
    /// The API server's command line and log, to restart it as it was.
    api_args: Vec<String>,
    api_log: PathBuf,
    kubeconfig: PathBuf,
    supervisor: Supervisor,
    nodes: Arc<Mutex<Vec<SimNode>>>,
    heartbeat_stop: Arc<AtomicBool>,
    heartbeat: Option<std::thread::JoinHandle<()>>,
    /// Seconds from the first process start to all components ready.
    pub startup: Duration,
}

const READY_TIMEOUT: Duration = Duration::from_secs(90);
const API_SERVER: &str = "kube-apiserver";
/// A Lease renewal every 10 s keeps nodes well inside the 40 s grace period.
const HEARTBEAT: Duration = Duration::from_secs(10);

impl ControlPlane {
    /// Starts everything and waits until it is ready. Blocking; safe to call from inside
    /// an async runtime (the work runs on a thread of its own).
    pub fn start(opts: Options) -> Result<ControlPlane> {
        std::thread::scope(|s| {
            s.spawn(|| start_inner(opts))
                .join()
                .unwrap_or_else(|_| Err(HarnessError::Thread("start-up thread panicked".into())))
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }
    pub fn api_url(&self) -> &str {
        &self.api_url
    }
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }
    /// Path of `kubectl` built from the same release as the server.
    pub fn kubectl(&self) -> PathBuf {
        tools::tool(&self.bin, "kubectl")
    }
    pub fn helm(&self) -> PathBuf {
        tools::tool(&self.bin, "helm")
    }

    /// A `kubectl` command with this cluster's kubeconfig.
    pub fn kubectl_cmd(&self) -> std::process::Command {
        let mut c = std::process::Command::new(self.kubectl());
        c.env("KUBECONFIG", &self.kubeconfig);
        c
    }

    /// A fresh client for the caller's runtime (clients hold runtime-bound connections).
    pub async fn client(&self) -> Result<Client> {
        client_from(&self.kubeconfig).await
    }

    /// Adds a simulated node now; it is kept Ready from then on.
    pub async fn add_node(&self, node: SimNode) -> Result<()> {
        let client = self.client().await?;
        nodes::create(&client, &node).await?;
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(node);
        Ok(())
    }

    /// Stops heart-beating a node, so it goes NotReady after the grace period.
    pub fn stop_heartbeat(&self, name: &str) {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|n| n.name != name);
    }

    /// SIGKILLs the API server, as a crash would; etcd, the controller manager and the
    /// node heartbeats keep running (and fail until it is back).
    pub fn kill_apiserver(&self) {
        self.supervisor.kill(API_SERVER);
    }

    /// Starts the API server again with the command line (so the port and certificates)
    /// of the first start, after [`ControlPlane::kill_apiserver`]; its log goes on in the
    /// same file. Returns at once: see [`ControlPlane::wait_apiserver_ready`].
    pub fn start_apiserver(&self) -> Result<()> {
        self.supervisor.respawn(
            API_SERVER,
            &self.bin.join(API_SERVER),
            &self.api_args,
            &self.api_log,
        )?;
        Ok(())
    }

    /// Waits until the API server answers `/readyz` with `ok`; fails early if it exits.
    /// Blocking; safe to call from inside an async runtime, like [`ControlPlane::start`].
    pub fn wait_apiserver_ready(&self, timeout: Duration) -> Result<()> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| HarnessError::Thread(e.to_string()))?;
                // A fresh client: connections pooled before a crash are dead.
                let client = rt.block_on(client_from(&self.kubeconfig))?;
                wait_until(&self.supervisor, API_SERVER, &self.api_log, timeout, || {
                    rt.block_on(api_ready(&client))
                })
            })
            .join()
            .unwrap_or_else(|_| Err(HarnessError::Thread("readiness thread panicked".into())))
        })
    }

    /// Stops everything now (also done on drop). Idempotent.
    pub fn shutdown(&mut self) {
        self.heartbeat_stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
        self.supervisor.stop_all(Duration::from_secs(5));
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub(crate) async fn client_from(path: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(path).map_err(|e| HarnessError::Kubeconfig(e.to_string()))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| HarnessError::Kubeconfig(e.to_string()))?;
    Client::try_from(cfg).map_err(kerr("building a client"))
}

fn start_inner(opts: Options) -> Result<ControlPlane> {
    let bin = tools::bin_dir()?;
    let (dir, tmp) = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(io("creating", d))?;
            // A fresh etcd every time: state from an earlier run would surprise tests.
            let etcd = d.join("etcd");
            if etcd.exists() {
                std::fs::remove_dir_all(&etcd).map_err(io("removing old", &etcd))?;
            }
            (d.canonicalize().map_err(io("resolving", d))?, None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("cvm-dev-")
                .tempdir()
                .map_err(io("creating temp dir", std::env::temp_dir()))?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(io("creating", &logs))?;
    let pki = Pki::generate(&dir)?;
    let api_port = match opts.api_port {
        Some(p) if port_in_use(p) => {
            return Err(HarnessError::PortInUse {
                component: "kube-apiserver",
                port: p,
            })
        }
        Some(p) => p,
        None => free_port()?,
    };
    let etcd_port = free_port()?;
    let etcd_peer = free_port()?;
    let kcm_port = free_port()?;

    let started = Instant::now();
    let sup = Supervisor::new()?;

    // etcd
    let etcd_log = logs.join("etcd.log");
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{etcd_peer}");
    sup.spawn(
        "etcd",
        &bin.join("etcd"),
        &[
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            // Throwaway data: skipping fsync makes start-up and writes much faster.
            "--unsafe-no-fsync=true".into(),
            "--log-level=warn".into(),
        ],
        &etcd_log,
    )?;
    wait_until(&sup, "etcd", &etcd_log, READY_TIMEOUT, || {
        http_get_ok(etcd_port, "/health", "\"health\":\"true\"")
    })?;

    // kube-apiserver
    let api_log = logs.join("kube-apiserver.log");
    let p = |x: &Path| x.display().to_string();
    let api_args = vec![
        format!("--etcd-servers={etcd_url}"),
        "--bind-address=127.0.0.1".into(),
        "--advertise-address=127.0.0.1".into(),
        format!("--secure-port={api_port}"),
        format!("--tls-cert-file={}", p(&pki.server_cert)),
        format!("--tls-private-key-file={}", p(&pki.server_key)),
        format!("--client-ca-file={}", p(&pki.ca_cert)),
        "--authorization-mode=Node,RBAC".into(),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--service-account-key-file={}", p(&pki.sa_pub)),
        format!("--service-account-signing-key-file={}", p(&pki.sa_key)),
        "--service-cluster-ip-range=10.96.0.0/16".into(),
        "--enable-admission-plugins=NodeRestriction".into(),
        "--allow-privileged=true".into(),
        "--endpoint-reconciler-type=none".into(),
        "--v=1".into(),
    ];
    sup.spawn(API_SERVER, &bin.join(API_SERVER), &api_args, &api_log)?;
    let admin_kc = dir.join("kubeconfig");
    write_kubeconfig(
        &admin_kc,
        api_port,
        &pki.ca_pem,
        &pki.admin,
        "cvm-dev-admin",
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| HarnessError::Thread(e.to_string()))?;
    let client = rt.block_on(client_from(&admin_kc))?;
    wait_until(&sup, API_SERVER, &api_log, READY_TIMEOUT, || {
        !port_bound_by_other(&api_log) && rt.block_on(api_ready(&client))
    })
    .map_err(|e| {
        if port_bound_by_other(&api_log) {
            HarnessError::PortInUse {
                component: API_SERVER,
                port: api_port,
            }
        } else {
            e
        }
    })?;

    // kube-controller-manager: garbage collection, namespaces, service-account tokens.
    let kcm_kc = dir.join("controller-manager.kubeconfig");
    write_kubeconfig(
        &kcm_kc,
        api_port,
        &pki.ca_pem,
        &pki.controller_manager,
        "system:kube-controller-manager",
    )?;
    let kcm_log = logs.join("kube-controller-manager.log");
    sup.spawn(
        "kube-controller-manager",
        &bin.join("kube-controller-manager"),
        &[
            format!("--kubeconfig={}", p(&kcm_kc)),
            format!("--authentication-kubeconfig={}", p(&kcm_kc)),
            format!("--authorization-kubeconfig={}", p(&kcm_kc)),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={kcm_port}"),
            "--leader-elect=false".into(),
            format!("--service-account-private-key-file={}", p(&pki.sa_key)),
            format!("--root-ca-file={}", p(&pki.ca_cert)),
            "--use-service-account-credentials=true".into(),
            format!("--cluster-signing-cert-file={}", p(&pki.ca_cert)),
            format!("--cluster-signing-key-file={}", p(&pki.ca_key)),
            "--v=1".into(),
        ],
        &kcm_log,
    )?;
    // Ready when its service-account controller has done its first work.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    wait_until(
        &sup,
        "kube-controller-manager",
        &kcm_log,
        READY_TIMEOUT,
        || rt.block_on(async { matches!(sas.get_opt("default").await, Ok(Some(_))) }),
    )?;

    let crds = match opts.crds {
        Some(c) => c,
        None => default_crds(),
    };
    rt.block_on(install_crds(&client, &crds))?;
    for n in &opts.nodes {
        rt.block_on(nodes::create(&client, n))?;
    }
    let startup = started.elapsed();
    drop(client);
    drop(rt);

    let nodes = Arc::new(Mutex::new(opts.nodes.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let heartbeat = spawn_heartbeat(admin_kc.clone(), nodes.clone(), stop.clone())?;
    tracing::info!(
        api = %format!("https://127.0.0.1:{api_port}"),
        dir = %dir.display(),
        secs = startup.as_secs_f64(),
        "control plane ready"
    );
    Ok(ControlPlane {
        dir,
        _tmp: tmp,
        bin,
        api_url: format!("https://127.0.0.1:{api_port}"),
        api_args,
        api_log,
        kubeconfig: admin_kc,
        supervisor: sup,
        nodes,
        heartbeat_stop: stop,
        heartbeat: Some(heartbeat),
        startup,
    })
}

/// Whether the API server answers `/readyz` with `ok` within 2 s.
async fn api_ready(client: &Client) -> bool {
    let Ok(req) = http::Request::get("/readyz").body(Vec::new()) else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), client.request_text(req)).await,
        Ok(Ok(ref body)) if body.trim() == "ok"
    )
}

fn port_bound_by_other(log: &Path) -> bool {
    std::fs::read_to_string(log)
        .map(|t| t.contains("address already in use"))
        .unwrap_or(false)
}

fn spawn_heartbeat(
    kubeconfig: PathBuf,
    nodes: Arc<Mutex<Vec<SimNode>>>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("cvm-dev-heartbeat".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let mut client = None;
                let mut last = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if last.elapsed() < HEARTBEAT {
                        continue;
                    }
                    last = Instant::now();
                    if client.is_none() {
                        client = client_from(&kubeconfig).await.ok();
                    }
                    let Some(c) = &client else { continue };
                    let current = nodes.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    for n in &current {
                        if let Err(e) = nodes::heartbeat(c, n).await {
                            tracing::warn!(node = %n.name, error = %e, "heartbeat failed");
                        }
                    }
                }
            });
        })
        .map_err(|e| HarnessError::Thread(e.to_string()))
}

/// Every YAML file in the repo's `crds/generated/` (none yet is fine).
pub fn default_crds() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/generated");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Applies the CRDs server-side and waits until each is Established.
pub async fn install_crds(client: &Client, files: &[PathBuf]) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(io("reading", f))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: serde_json::Value =
                serde::Deserialize::deserialize(doc).map_err(|e| HarnessError::Manifest {
                    path: f.clone(),
                    message: e.to_string(),
                })?;
            if v.is_null() {
                continue;
            }
            let name = v["metadata"]["name"]
                .as_str()
                .ok_or_else(|| HarnessError::Manifest {
                    path: f.clone(),
                    message: "a CRD document has no metadata.name".into(),
                })?
                .to_string();
            api.patch(
                &name,
                &PatchParams::apply("cvm-dev").force(),
                &Patch::Apply(&v),
            )
            .await
            .map_err(kerr(format!("installing CRD {name} from {}", f.display())))?;
            names.push(name);
        }
    }
    for name in names {
        let cond = kube::runtime::wait::conditions::is_crd_established();
        tokio::time::timeout(
            Duration::from_secs(30),
            kube::runtime::wait::await_condition(api.clone(), &name, cond),
        )
        .await
        .map_err(|_| HarnessError::NotReady {
            component: format!("CRD {name}"),
            secs: 30,
            log: PathBuf::from("(kubectl describe crd)"),
        })?
        .map_err(|e| HarnessError::Kubeconfig(format!("waiting for CRD {name}: {e}")))?;
    }
    Ok(())
}

fn write_kubeconfig(
    path: &Path,
    port: u16,
    ca_pem: &str,
    user: &ClientCert,
    user_name: &str,
) -> Result<()> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let text = kubeconfig_yaml(
        &format!("https://127.0.0.1:{port}"),
        &b64(ca_pem),
        user_name,
        "cvm-dev",
        &user.cert_pem,
        &user.key_pem,
    );
    std::fs::write(path, text).map_err(io("writing kubeconfig", path))
}

/// A kubeconfig for one client-certificate user of `server` (cluster `cvm-dev`, namespace
/// `default`); `ca_data` is the CA's PEM, base64-encoded as kubeconfigs carry it.
pub fn kubeconfig_yaml(
    server: &str,
    ca_data: &str,
    user: &str,
    context: &str,
    cert_pem: &str,
    key_pem: &str,
) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: cvm-dev
  cluster:
    server: {server}
    certificate-authority-data: {ca_data}
users:
- name: {user}
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: {context}
  context:
    cluster: cvm-dev
    user: {user}
    namespace: default
current-context: {context}
",
        cert = b64(cert_pem),
        key = b64(key_pem),
    )
}

/// A plain-HTTP GET on loopback that succeeds when the body contains `needle`.
fn http_get_ok(port: u16, path: &str, needle: &str) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains(needle)
}
