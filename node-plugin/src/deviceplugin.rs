//! The node plugin as kubelet's device plugin (`deviceplugin/v1beta1`): it advertises the
//! host's TEE keys (`sev-snp.amd.com/esids`, `sev.amd.com/asids`, `tdx.intel.com/keys`)
//! and `devices.cvmp.io/kvm` to kubelet, which then puts them in the Node's capacity and
//! counts them for every pod that asks: no double booking, whoever the consumer. One gRPC
//! server per resource on a unix socket in kubelet's device-plugin directory, registered
//! with kubelet's `Registration` service there; registered again whenever kubelet
//! restarts (it removes every plugin socket when it starts).
//!
//! Decisions (which resources, which devices a container gets) are plain functions; the
//! servers and the registration loop are the I/O around them.

use crate::platform::HostCapabilities;
pub use cvm_crds::wellknown::RESOURCE_KVM;
use cvm_crds::wellknown::{RESOURCE_SEV_ASIDS, RESOURCE_SNP_ESIDS, RESOURCE_TDX_KEYS};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::{info, warn};

/// The generated API (`proto/deviceplugin_v1beta1.proto`).
#[allow(clippy::all, missing_docs)]
pub mod api {
    tonic::include_proto!("v1beta1");
}

/// The API version kubelet expects in a registration.
pub const API_VERSION: &str = "v1beta1";
/// kubelet's registration socket, in its device-plugin directory.
pub const KUBELET_SOCKET: &str = "kubelet.sock";
/// kubelet's device-plugin directory on a standard node.
pub const DEFAULT_DIR: &str = "/var/lib/kubelet/device-plugins";
/// `/dev/kvm` shares advertised ([`RESOURCE_KVM`]): one per pod that may run a guest.
/// 110 is kubelet's default pod limit, so it never limits on its own.
pub const KVM_SHARES: u32 = 110;
/// How often the loop checks that kubelet still has our socket (kubelet deletes the
/// sockets of its directory when it restarts; then we register again).
const SOCKET_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DevicePluginError {
    #[error("cannot serve {resource} on {path}: {source}; is kubelet's device-plugin directory mounted into the plugin (--device-plugin-dir)?")]
    Bind {
        resource: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("registering {resource} with kubelet at {path}: {message}")]
    Register {
        resource: String,
        path: PathBuf,
        message: String,
    },
}

/// One advertised resource and how many units the host has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub name: String,
    pub count: u32,
}

/// The resources this host advertises: its TEE keys as detected (the simulator's
/// configured counts on a simulated host) and `/dev/kvm` shares when it can launch any
/// guest. Resources with no units are left out (kubelet then shows none).
pub fn resources(caps: &HostCapabilities) -> Vec<Resource> {
    let mut out = Vec::new();
    let mut add = |name: &str, count: u32| {
        if count > 0 {
            out.push(Resource {
                name: name.to_string(),
                count,
            });
        }
    };
    add(RESOURCE_SNP_ESIDS, caps.es_asids);
    add(RESOURCE_SEV_ASIDS, caps.sev_asids);
    add(RESOURCE_TDX_KEYS, caps.tdx_keys);
    if !caps.tees.is_empty() {
        add(RESOURCE_KVM, KVM_SHARES);
    }
    out
}

/// The devices of `r`: `<short name>-<index>`, e.g. `esid-0`, each `Healthy` or
/// `Unhealthy` (kubelet then admits no new pod for them).
pub fn devices(r: &Resource, healthy: bool) -> Vec<api::Device> {
    let short = r.name.rsplit('/').next().unwrap_or(&r.name);
    let short = short.strip_suffix('s').unwrap_or(short);
    let health = if healthy { "Healthy" } else { "Unhealthy" };
    (0..r.count)
        .map(|i| api::Device {
            id: format!("{short}-{i}"),
            health: health.into(),
            topology: None,
        })
        .collect()
}

/// Whether `resource` is still usable: the device node it needs, if the host had it at
/// start (`at_start`), is still there `now` (a driver unloaded, a device reset). TEE keys
/// need `/dev/sev` (AMD) or `/dev/kvm` (TDX); KVM shares need `/dev/kvm`.
pub fn healthy(resource: &str, at_start: HostDevices, now: HostDevices) -> bool {
    let kept = |had: bool, has: bool| !had || has;
    match resource {
        RESOURCE_SNP_ESIDS | RESOURCE_SEV_ASIDS => kept(at_start.sev, now.sev),
        RESOURCE_TDX_KEYS | RESOURCE_KVM => kept(at_start.kvm, now.kvm),
        _ => true,
    }
}

/// How often the host's devices are looked at again for health.
const HEALTH_CHECK: Duration = Duration::from_secs(5);

/// The socket file of `resource` in kubelet's directory (no '/' in a file name).
pub fn socket_name(resource: &str) -> String {
    format!("cvm-{}.sock", resource.replace('/', "_"))
}

/// The host's device nodes a guest launcher may need.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostDevices {
    pub sev: bool,
    pub kvm: bool,
    pub vhost_vsock: bool,
}

impl HostDevices {
    /// Which of `/dev/sev`, `/dev/kvm`, `/dev/vhost-vsock` exist under `root`.
    pub fn detect(root: &Path) -> HostDevices {
        let has = |p: &str| root.join(p).exists();
        HostDevices {
            sev: has("dev/sev"),
            kvm: has("dev/kvm"),
            vhost_vsock: has("dev/vhost-vsock"),
        }
    }
}

/// The environment variable that tells a launcher which units of `resource` it got,
/// e.g. `CVM_SEV_SNP_ESIDS=esid-3`.
pub fn env_name(resource: &str) -> String {
    let short = resource.split('.').next().unwrap_or(resource);
    let last = resource.rsplit('/').next().unwrap_or(resource);
    let name = if resource == RESOURCE_KVM {
        "kvm".to_string()
    } else {
        format!("{short}_{last}")
    };
    format!(
        "CVM_{}",
        name.replace(['-', '.', '/'], "_").to_ascii_uppercase()
    )
}

/// What a container granted `ids` of `resource` receives: the IDs in its environment and
/// the device nodes that resource needs where the host has them (a simulated host has
/// none), so its pod needs no `privileged` and no hostPath of `/dev`.
pub fn container_response(
    resource: &str,
    ids: &[String],
    host: HostDevices,
) -> api::ContainerAllocateResponse {
    let dev = |p: &str| api::DeviceSpec {
        container_path: p.to_string(),
        host_path: p.to_string(),
        permissions: "rw".into(),
    };
    let mut devices = Vec::new();
    match resource {
        // SEV, SEV-ES and SEV-SNP guests: the firmware's device, for launch and reports.
        RESOURCE_SNP_ESIDS | RESOURCE_SEV_ASIDS if host.sev => devices.push(dev("/dev/sev")),
        // KVM for the guest, vhost-vsock for the guest agent's channel.
        RESOURCE_KVM => {
            if host.kvm {
                devices.push(dev("/dev/kvm"));
            }
            if host.vhost_vsock {
                devices.push(dev("/dev/vhost-vsock"));
            }
        }
        _ => {}
    }
    api::ContainerAllocateResponse {
        envs: HashMap::from([(env_name(resource), ids.join(","))]),
        mounts: Vec::new(),
        devices,
        annotations: HashMap::new(),
        cdi_devices: Vec::new(),
    }
}

/// The gRPC service of one resource.
struct Service {
    resource: Resource,
    host: HostDevices,
    /// The resource's health; ListAndWatch sends the devices again when it changes.
    health: tokio::sync::watch::Receiver<bool>,
    /// Ends open ListAndWatch streams when the server is replaced or stops.
    stop: tokio::sync::watch::Receiver<bool>,
}

type ListStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<api::ListAndWatchResponse, tonic::Status>> + Send>,
>;

#[tonic::async_trait]
impl api::device_plugin_server::DevicePlugin for Service {
    type ListAndWatchStream = ListStream;

    async fn get_device_plugin_options(
        &self,
        _: tonic::Request<api::Empty>,
    ) -> Result<tonic::Response<api::DevicePluginOptions>, tonic::Status> {
        Ok(tonic::Response::new(api::DevicePluginOptions::default()))
    }

    async fn list_and_watch(
        &self,
        _: tonic::Request<api::Empty>,
    ) -> Result<tonic::Response<Self::ListAndWatchStream>, tonic::Status> {
        // The devices now and again whenever their health changes; the stream stays open
        // (kubelet reads an ended stream as the plugin gone) until this server stops.
        let resource = self.resource.clone();
        let state = (self.health.clone(), self.stop.clone(), true);
        let stream = futures::stream::unfold(state, move |(mut health, mut stop, first)| {
            let resource = resource.clone();
            async move {
                if !first {
                    tokio::select! {
                        changed = health.changed() => changed.ok()?,
                        _ = stop.wait_for(|s| *s) => return None,
                    }
                }
                let ok = *health.borrow_and_update();
                let reply = api::ListAndWatchResponse {
                    devices: devices(&resource, ok),
                };
                Some((Ok(reply), (health, stop, false)))
            }
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        _: tonic::Request<api::PreferredAllocationRequest>,
    ) -> Result<tonic::Response<api::PreferredAllocationResponse>, tonic::Status> {
        Ok(tonic::Response::new(
            api::PreferredAllocationResponse::default(),
        ))
    }

    async fn allocate(
        &self,
        req: tonic::Request<api::AllocateRequest>,
    ) -> Result<tonic::Response<api::AllocateResponse>, tonic::Status> {
        let container_responses = req
            .into_inner()
            .container_requests
            .iter()
            .map(|c| container_response(&self.resource.name, &c.devices_ids, self.host))
            .collect();
        Ok(tonic::Response::new(api::AllocateResponse {
            container_responses,
        }))
    }

    async fn pre_start_container(
        &self,
        _: tonic::Request<api::PreStartContainerRequest>,
    ) -> Result<tonic::Response<api::PreStartContainerResponse>, tonic::Status> {
        Ok(tonic::Response::new(api::PreStartContainerResponse {}))
    }
}

/// Serves every resource in `dir` and keeps each registered with kubelet until
/// `shutdown` resolves. Errors are logged and retried (kubelet may start after us).
/// `host_root`'s devices are looked at again every few seconds: a resource whose device
/// went away is reported Unhealthy, and Healthy again when it is back.
pub async fn run(
    dir: PathBuf,
    node: String,
    resources: Vec<Resource>,
    host_root: PathBuf,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let host = HostDevices::detect(&host_root);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut health_tx = Vec::new();
    let loops: Vec<_> = resources
        .into_iter()
        .map(|r| {
            let (tx, health) = tokio::sync::watch::channel(true);
            health_tx.push((r.name.clone(), tx));
            let (dir, node, stop) = (dir.clone(), node.clone(), stop_rx.clone());
            async move { keep_registered(&dir, &node, r, host, health, stop).await }
        })
        .collect();
    let watch_health = async {
        loop {
            tokio::time::sleep(HEALTH_CHECK).await;
            let now = HostDevices::detect(&host_root);
            for (name, tx) in &health_tx {
                let ok = healthy(name, host, now);
                if *tx.borrow() != ok {
                    warn!(node = %node, resource = %name, healthy = ok, devices = ?now, "device health changed");
                    let _ = tx.send(ok);
                }
            }
        }
    };
    tokio::select! {
        _ = futures::future::join_all(loops) => {}
        _ = watch_health => {}
        _ = shutdown => {}
    }
    let _ = stop_tx.send(true);
}

/// One resource: serve, register, and start over when kubelet drops our socket.
async fn keep_registered(
    dir: &Path,
    node: &str,
    resource: Resource,
    host: HostDevices,
    health: tokio::sync::watch::Receiver<bool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut delay = Duration::from_millis(500);
    loop {
        if *stop.borrow() {
            return;
        }
        match serve_once(dir, node, &resource, host, health.clone(), stop.clone()).await {
            Ok(()) => delay = Duration::from_millis(500),
            Err(e) => {
                warn!(node = %node, resource = %resource.name, error = %e, retry_in = ?delay, "device plugin");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Binds the socket, starts the server, registers, and returns once kubelet has dropped
/// the socket (it restarted) or `stop` is set.
async fn serve_once(
    dir: &Path,
    node: &str,
    resource: &Resource,
    host: HostDevices,
    health: tokio::sync::watch::Receiver<bool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), DevicePluginError> {
    let name = socket_name(&resource.name);
    let path = dir.join(&name);
    let bind_err = |source| DevicePluginError::Bind {
        resource: resource.name.clone(),
        path: path.clone(),
        source,
    };
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    let listener = tokio::net::UnixListener::bind(&path).map_err(bind_err)?;
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let svc = Service {
        resource: resource.clone(),
        host,
        health,
        stop: done_rx,
    };
    let mut server_stop = stop.clone();
    let mut server_done = done_tx.subscribe();
    let server = tonic::transport::Server::builder()
        .add_service(api::device_plugin_server::DevicePluginServer::new(svc))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            async move {
                tokio::select! {
                    _ = server_stop.wait_for(|s| *s) => {}
                    _ = server_done.wait_for(|d| *d) => {}
                }
            },
        );
    let server = tokio::spawn(server);
    let result = async {
        register(dir, &name, &resource.name).await?;
        info!(node = %node, resource = %resource.name, count = resource.count, socket = %path.display(), "registered with kubelet");
        // kubelet removes the plugin sockets of its directory when it (re)starts.
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SOCKET_CHECK) => {}
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
            if !path.exists() {
                info!(node = %node, resource = %resource.name, "kubelet dropped our socket (it restarted): registering again");
                return Ok(());
            }
        }
    }
    .await;
    let _ = done_tx.send(true);
    let _ = server.await;
    result
}

/// `Register` with kubelet's registration service on `dir/kubelet.sock`.
async fn register(dir: &Path, endpoint: &str, resource: &str) -> Result<(), DevicePluginError> {
    let kubelet = dir.join(KUBELET_SOCKET);
    let err = |message: String| DevicePluginError::Register {
        resource: resource.to_string(),
        path: kubelet.clone(),
        message,
    };
    let socket = kubelet.clone();
    // The URI is required by the API and ignored: the connector dials the socket.
    let channel = tonic::transport::Endpoint::from_static("http://kubelet.invalid")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| {
            err(format!(
                "cannot connect ({e}); is kubelet running on this node?"
            ))
        })?;
    let mut client = api::registration_client::RegistrationClient::new(channel);
    client
        .register(api::RegisterRequest {
            version: API_VERSION.into(),
            endpoint: endpoint.into(),
            resource_name: resource.into(),
            options: Some(api::DevicePluginOptions::default()),
        })
        .await
        .map_err(|s| err(format!("{}: {}", s.code(), s.message())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SimConfig;
    use cvm_crds::TeeType;
    use futures::StreamExt as _;

    #[test]
    fn a_simulated_snp_host_advertises_its_configured_keys_and_kvm() {
        let caps = SimConfig {
            tees: vec![TeeType::SevSnp],
            slots: 9,
            sev_asids: Some(3),
            ..Default::default()
        }
        .capabilities();
        let r = resources(&caps);
        assert_eq!(
            r,
            vec![
                Resource {
                    name: RESOURCE_SNP_ESIDS.into(),
                    count: 9
                },
                Resource {
                    name: RESOURCE_SEV_ASIDS.into(),
                    count: 3
                },
                Resource {
                    name: RESOURCE_KVM.into(),
                    count: KVM_SHARES
                },
            ]
        );
        let d = devices(&r[0], true);
        assert_eq!(d.len(), 9);
        assert_eq!(d[0].id, "esid-0");
        assert!(d.iter().all(|d| d.health == "Healthy"));
        assert!(devices(&r[0], false)
            .iter()
            .all(|d| d.health == "Unhealthy"));
        assert_eq!(
            socket_name(RESOURCE_SNP_ESIDS),
            "cvm-sev-snp.amd.com_esids.sock"
        );
    }

    #[test]
    fn a_resource_is_unhealthy_while_the_device_it_had_is_gone() {
        let all = HostDevices {
            sev: true,
            kvm: true,
            vhost_vsock: true,
        };
        let no_sev = HostDevices { sev: false, ..all };
        let none = HostDevices::default();
        assert!(healthy(RESOURCE_SNP_ESIDS, all, all));
        assert!(!healthy(RESOURCE_SNP_ESIDS, all, no_sev));
        assert!(!healthy(RESOURCE_SEV_ASIDS, all, no_sev));
        assert!(healthy(RESOURCE_KVM, all, no_sev));
        assert!(!healthy(RESOURCE_KVM, all, none));
        assert!(!healthy(RESOURCE_TDX_KEYS, all, none));
        // A host that never had the device (a simulated one) does not lose it.
        assert!(healthy(RESOURCE_SNP_ESIDS, none, none));
        assert!(healthy(RESOURCE_KVM, none, none));
    }

    #[tokio::test]
    async fn list_and_watch_sends_the_devices_again_when_their_health_changes() {
        use api::device_plugin_server::DevicePlugin as _;
        let (health_tx, health) = tokio::sync::watch::channel(true);
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let svc = Service {
            resource: Resource {
                name: RESOURCE_KVM.into(),
                count: 2,
            },
            host: HostDevices::default(),
            health,
            stop,
        };
        let mut stream = svc
            .list_and_watch(tonic::Request::new(api::Empty {}))
            .await
            .unwrap()
            .into_inner();
        async fn next(s: &mut ListStream) -> Option<Vec<String>> {
            let r = s.next().await?.ok()?;
            Some(r.devices.iter().map(|d| d.health.clone()).collect())
        }
        assert_eq!(
            next(&mut stream).await,
            Some(vec!["Healthy".to_string(); 2])
        );
        health_tx.send(false).unwrap();
        assert_eq!(
            next(&mut stream).await,
            Some(vec!["Unhealthy".to_string(); 2])
        );
        health_tx.send(true).unwrap();
        assert_eq!(
            next(&mut stream).await,
            Some(vec!["Healthy".to_string(); 2])
        );
        stop_tx.send(true).unwrap();
        assert_eq!(
            next(&mut stream).await,
            None,
            "the stream ends with the server"
        );
    }

    #[test]
    fn a_tdx_host_advertises_keys_only_and_no_host_no_kvm() {
        let caps = SimConfig {
            tees: vec![TeeType::Tdx],
            slots: 4,
            ..Default::default()
        }
        .capabilities();
        let names: Vec<String> = resources(&caps).into_iter().map(|r| r.name).collect();
        assert_eq!(names, vec![RESOURCE_TDX_KEYS, RESOURCE_KVM]);
        let none = HostCapabilities {
            tees: vec![],
            sev_asids: 0,
            es_asids: 0,
            tdx_keys: 0,
            firmware_version: None,
            snp_tcb: None,
            tdx_tcb_status: None,
            simulated: true,
        };
        assert!(resources(&none).is_empty());
    }

    #[test]
    fn a_launcher_gets_the_ids_and_only_the_devices_the_host_has() {
        let ids = vec!["esid-3".to_string()];
        let none = container_response(RESOURCE_SNP_ESIDS, &ids, HostDevices::default());
        assert!(none.devices.is_empty(), "a simulated host passes no device");
        assert_eq!(
            none.envs.get("CVM_SEV_SNP_ESIDS").map(String::as_str),
            Some("esid-3")
        );
        let all = HostDevices {
            sev: true,
            kvm: true,
            vhost_vsock: true,
        };
        let snp = container_response(RESOURCE_SNP_ESIDS, &ids, all);
        let paths: Vec<&str> = snp.devices.iter().map(|d| d.host_path.as_str()).collect();
        assert_eq!(paths, vec!["/dev/sev"]);
        let kvm = container_response(RESOURCE_KVM, &["kvm-0".into()], all);
        let paths: Vec<&str> = kvm.devices.iter().map(|d| d.host_path.as_str()).collect();
        assert_eq!(paths, vec!["/dev/kvm", "/dev/vhost-vsock"]);
        assert_eq!(kvm.envs.get("CVM_KVM").map(String::as_str), Some("kvm-0"));
        let tdx = container_response(RESOURCE_TDX_KEYS, &["tdx-key-0".into()], all);
        assert!(tdx.devices.is_empty(), "TDX guests need only /dev/kvm");
        assert!(tdx.envs.contains_key("CVM_TDX_KEYS"));
    }

    #[test]
    fn host_devices_are_read_from_the_root() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(HostDevices::detect(root.path()), HostDevices::default());
        std::fs::create_dir_all(root.path().join("dev")).unwrap();
        std::fs::write(root.path().join("dev/kvm"), "").unwrap();
        assert!(HostDevices::detect(root.path()).kvm);
    }
}
