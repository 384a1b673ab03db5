//! A real kind cluster, as users of operators run e2e tests and demos: Debian's dockerd
//! started by the harness with its own data root (`tools/docker.sh`), a kind node image
//! built here and cached by version (`tools/kind.sh image`), this repository's images built
//! from static binaries (`tools/images.sh`) and loaded into every node, and the chart
//! installed with `helm install --wait`. Nothing is pulled.

use crate::demo::KubectlCmd;
use crate::nodes::Tee;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The chart's release and namespace in a kind cluster.
pub const RELEASE: &str = "cvm-operator";
pub const NAMESPACE: &str = "cvm-system";
/// The Node label the simulated plugin reads its TEEs from (the chart's default).
pub const SIM_TEES_LABEL: &str = "sim.cvmp.io/tees";
/// The Node label the simulated plugin reads its guests' kind from (the chart's default).
pub const SIM_GUESTS_LABEL: &str = "sim.cvmp.io/guests";
/// Where a node's plugin finds boot artifacts (the chart's `nodePlugin.artifactsDir`).
pub const ARTIFACTS_DIR: &str = "/var/lib/cvm/artifacts";

/// What a node's launcher pods run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuestKind {
    /// The launcher's stand-in process (no VM).
    #[default]
    StandIn,
    /// Real QEMU guests (TCG) with simulated TEE evidence.
    Qemu,
    /// Test only: real QEMU guests, no TEE and no evidence (a lying host).
    QemuWithoutTee,
}

impl GuestKind {
    /// The label value the plugin reads.
    pub fn label_value(self) -> &'static str {
        match self {
            GuestKind::StandIn => "stand-in",
            GuestKind::Qemu => "qemu",
            GuestKind::QemuWithoutTee => "test-only-qemu-without-tee",
        }
    }
}

/// Errors of the kind harness: each says what to install or fix.
#[derive(Debug, thiserror::Error)]
pub enum KindError {
    #[error("running {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} failed ({status}): {detail}")]
    Failed {
        what: String,
        status: String,
        detail: String,
    },
    #[error("{0}")]
    Harness(String),
}

pub type Result<T> = std::result::Result<T, KindError>;

/// What cluster to make.
#[derive(Debug, Clone)]
pub struct KindOptions {
    /// kind cluster name (node containers are `NAME-control-plane`, `NAME-worker`, …).
    pub name: String,
    /// Where the kubeconfig and logs go.
    pub dir: PathBuf,
    /// The simulated TEEs of each node, in kind's node order (control plane first).
    pub fleet: Vec<Vec<Tee>>,
    /// Tag of the images built from this tree.
    pub image_tag: String,
    /// What each node's launcher pods run, in the fleet's order (missing: stand-in).
    pub guests: Vec<GuestKind>,
}

impl KindOptions {
    /// The demo fleet: two simulated SEV-SNP hosts and one TDX host.
    pub fn demo(name: &str, dir: &Path) -> KindOptions {
        KindOptions {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            fleet: vec![vec![Tee::SevSnp], vec![Tee::SevSnp], vec![Tee::Tdx]],
            image_tag: "dev".into(),
            guests: Vec::new(),
        }
    }
}

/// A running kind cluster with the chart installed. `delete` removes it; dropping it
/// does not (cvm-dev keeps its cluster until asked).
#[derive(Debug)]
pub struct Kind {
    pub name: String,
    pub kubeconfig: PathBuf,
    pub docker_host: String,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
    pub image_tag: String,
    /// Node names in kind's order (control plane first).
    pub nodes: Vec<String>,
    /// What each step took, in order: what `cvm-dev up` prints.
    pub timings: Vec<(String, Duration)>,
    /// The test guest's image (`e2e/guest/image.sh`) loaded into the QEMU nodes, if any.
    pub guest_image: Option<String>,
}

fn tools_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools")
}

/// Runs `bash tools/SCRIPT ARGS` with stderr passed through (progress) and returns its
/// stdout.
fn script(name: &str, args: &[&str], docker_host: Option<&str>) -> Result<String> {
    let path = tools_dir().join(name);
    let mut cmd = Command::new("bash");
    cmd.arg(&path)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(h) = docker_host {
        cmd.env("DOCKER_HOST", h);
    }
    run(cmd, format!("{} {}", path.display(), args.join(" ")))
}

/// Runs `cmd`; its stdout, or an error naming `what` with its stderr (when captured).
fn run(mut cmd: Command, what: String) -> Result<String> {
    let out = cmd.output().map_err(|source| KindError::Spawn {
        what: what.clone(),
        source,
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(KindError::Failed {
            what,
            status: out.status.to_string(),
            detail: if err.is_empty() {
                "see its messages above".into()
            } else {
                err
            },
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `sev-snp.tdx`: the label value naming a node's simulated TEEs.
pub fn tees_label_value(tees: &[Tee]) -> String {
    tees.iter()
        .map(|t| match t {
            Tee::Sev => "sev",
            Tee::SevEs => "sev-es",
            Tee::SevSnp => "sev-snp",
            Tee::Tdx => "tdx",
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// kind's node names for a cluster of `n` nodes.
pub fn node_names(cluster: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i {
            0 => format!("{cluster}-control-plane"),
            1 => format!("{cluster}-worker"),
            i => format!("{cluster}-worker{i}"),
        })
        .collect()
}

/// The private docker daemon's `DOCKER_HOST` (started if needed), or the daemon
/// `CVM_DOCKER_HOST` names (a docker of the user's own).
pub fn docker_host() -> Result<String> {
    if let Ok(host) = std::env::var("CVM_DOCKER_HOST") {
        if !host.is_empty() {
            return Ok(host);
        }
    }
    let out = script("docker.sh", &["start"], None)?;
    out.lines()
        .find_map(|l| l.trim().strip_prefix("export DOCKER_HOST="))
        .map(|h| h.trim_matches('"').to_string())
        .ok_or_else(|| KindError::Harness(format!("docker.sh printed no DOCKER_HOST: {out}")))
}

/// Deletes the kind cluster `name` if it exists.
/// The test guest's directory (vmlinuz, initrd.img): `e2e/guest/build.sh`, cached by
/// content.
pub fn build_guest() -> Result<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&path).stdin(Stdio::null()).stderr(Stdio::inherit());
    let out = run(cmd, path.display().to_string())?;
    out.lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
        .filter(|p| p.join("vmlinuz").is_file())
        .ok_or_else(|| KindError::Harness(format!("{} printed no guest directory", path.display())))
}

pub fn delete_cluster(name: &str) -> Result<()> {
    let host = docker_host()?;
    script("kind.sh", &["delete", name], Some(&host)).map(|_| ())
}

impl Kind {
    /// Builds what is missing (node image, our images), creates the cluster, labels each
    /// node with its simulated TEEs, loads the images and installs the chart with
    /// `helm install --wait`.
    pub fn up(opts: &KindOptions) -> Result<Kind> {
        std::fs::create_dir_all(&opts.dir).map_err(|source| KindError::Spawn {
            what: format!("creating {}", opts.dir.display()),
            source,
        })?;
        let bin = crate::tools::bin_dir().map_err(|e| KindError::Harness(e.to_string()))?;
        let mut timings = Vec::new();
        let mut step = |name: &str, t: Instant| timings.push((name.to_string(), t.elapsed()));

        let t = Instant::now();
        let host = docker_host()?;
        step("docker daemon", t);
        let t = Instant::now();
        // CVM_KIND_IMAGE names a node image (kind's published one, say): nothing to build.
        if std::env::var_os("CVM_KIND_IMAGE").is_none_or(|v| v.is_empty()) {
            script("kind.sh", &["image"], Some(&host))?;
            step("kind node image (built or cached)", t);
        }
        let t = Instant::now();
        let images: Vec<String> = script("images.sh", &[&opts.image_tag], Some(&host))?
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        step("cvm images", t);

        let kubeconfig = opts.dir.join("kubeconfig");
        let t = Instant::now();
        let n = opts.fleet.len().max(1).to_string();
        script(
            "kind.sh",
            &["create", &opts.name, &kubeconfig.display().to_string(), &n],
            Some(&host),
        )?;
        step("kind create (nodes Ready)", t);
        let kind = Kind {
            name: opts.name.clone(),
            kubeconfig,
            docker_host: host,
            kubectl: bin.join("kubectl"),
            helm: bin.join("helm"),
            image_tag: opts.image_tag.clone(),
            nodes: node_names(&opts.name, opts.fleet.len().max(1)),
            timings: Vec::new(),
            guest_image: None,
        };
        // Labels first: a simulated plugin reads its TEEs from its Node when it starts.
        for (node, tees) in kind.nodes.iter().zip(&opts.fleet) {
            let label = format!("{SIM_TEES_LABEL}={}", tees_label_value(tees));
            // One zone, as the examples' nodeSelector expects of the demo fleet.
            kind.kubectl_ok(&[
                "label",
                "node",
                node,
                &label,
                "topology.kubernetes.io/zone=zone-a",
                "--overwrite",
            ])?;
        }
        let qemu_nodes: Vec<(&String, GuestKind)> = kind
            .nodes
            .iter()
            .zip(opts.guests.iter().copied())
            .filter(|(_, g)| *g != GuestKind::StandIn)
            .collect();
        let mut guest_image = None;
        if !qemu_nodes.is_empty() {
            let t = Instant::now();
            let guest = build_guest()?;
            for (node, g) in &qemu_nodes {
                kind.kubectl_ok(&[
                    "label",
                    "node",
                    node,
                    &format!("{SIM_GUESTS_LABEL}={}", g.label_value()),
                    "--overwrite",
                ])?;
                kind.node_exec(node, &["mkdir", "-p", ARTIFACTS_DIR])?;
                for f in ["vmlinuz", "initrd.img"] {
                    let from = guest.join(f).display().to_string();
                    kind.docker(&["cp", &from, &format!("{node}:{ARTIFACTS_DIR}/{f}")])?;
                }
            }
            // Its containerDisk image too, as a registry would serve it to the nodes.
            let image = run(
                {
                    let mut c = Command::new("bash");
                    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/image.sh"))
                        .arg(&guest)
                        .env("DOCKER_HOST", &kind.docker_host)
                        .stdin(Stdio::null())
                        .stderr(Stdio::inherit());
                    c
                },
                "e2e/guest/image.sh".into(),
            )?;
            kind.load(&[image.trim()])?;
            guest_image = Some(image.trim().to_string());
            step("test guest (built or cached) on the QEMU nodes", t);
        }
        let t = Instant::now();
        kind.load(&images.iter().map(String::as_str).collect::<Vec<_>>())?;
        step("kind load images", t);
        let t = Instant::now();
        kind.install_chart("install", &[])?;
        step("helm install --wait", t);
        Ok(Kind {
            timings,
            guest_image,
            ..kind
        })
    }

    /// `helm install|upgrade` of the chart with the simulated platform and this cluster's
    /// images, `--wait` for every replica; `extra` are more helm arguments.
    pub fn install_chart(&self, verb: &str, extra: &[&str]) -> Result<String> {
        let chart = crate::tools::chart_dir();
        let tag = format!("image.tag={}", self.image_tag);
        let mut args = vec![
            verb,
            RELEASE,
            chart.to_str().unwrap_or_default(),
            "-n",
            NAMESPACE,
            "--wait",
            "--timeout",
            "5m",
            "--set",
            &tag,
            "--set",
            "image.pullPolicy=Never",
            "--set",
            "nodePlugin.platform=sim",
            "--set",
            "nodePlugin.selectNodesBy=candidates",
        ];
        if verb == "install" {
            args.push("--create-namespace");
        }
        args.extend_from_slice(extra);
        self.helm_ok(&args)
    }

    /// Runs helm against the cluster.
    pub fn helm_ok(&self, args: &[&str]) -> Result<String> {
        let out = crate::tools::helm_cmd(&self.helm, &self.kubeconfig)
            .args(args)
            .output()
            .map_err(|source| KindError::Spawn {
                what: "helm".into(),
                source,
            })?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            return Err(KindError::Failed {
                what: format!("helm {}", args.first().copied().unwrap_or_default()),
                status: out.status.to_string(),
                detail: text,
            });
        }
        Ok(text)
    }

    /// Runs kubectl against the cluster; stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        crate::demo::kubectl(self, args).map_err(KindError::Harness)
    }

    /// Runs a command in a node container (`docker exec NODE ARGS`); stdout.
    pub fn node_exec(&self, node: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["exec", node];
        all.extend_from_slice(args);
        self.docker(&all)
    }

    /// Runs the docker CLI against the harness's daemon; stdout.
    fn docker(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(docker_cli());
        cmd.args(args)
            .env("DOCKER_HOST", &self.docker_host)
            .stdin(Stdio::null());
        run(cmd, format!("docker {}", args.join(" ")))
    }

    /// Resident memory (MB) of every process named `comm` on every node.
    pub fn rss_mb(&self, comm: &str) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for node in &self.nodes {
            let Ok(text) = self.node_exec(node, &["ps", "-o", "rss=", "-C", comm]) else {
                continue;
            };
            for l in text.lines() {
                if let Ok(kb) = l.trim().parse::<f64>() {
                    out.push((node.clone(), kb / 1024.0));
                }
            }
        }
        out
    }

    /// `docker tag FROM TO` in the harness's daemon.
    pub fn tag_image(&self, from: &str, to: &str) -> Result<()> {
        self.docker(&["tag", from, to]).map(|_| ())
    }

    /// Loads local images into every node (as `kind load docker-image` does).
    pub fn load(&self, images: &[&str]) -> Result<()> {
        let mut args = vec!["load", self.name.as_str()];
        args.extend_from_slice(images);
        script("kind.sh", &args, Some(&self.docker_host)).map(|_| ())
    }

    /// Deletes the cluster (the docker daemon and its cached images stay).
    pub fn delete(&self) -> Result<()> {
        script("kind.sh", &["delete", &self.name], Some(&self.docker_host)).map(|_| ())
    }
}

fn docker_cli() -> &'static str {
    if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

impl KubectlCmd for Kind {
    fn kubectl_cmd(&self) -> Command {
        let mut c = Command::new(&self.kubectl);
        c.env("KUBECONFIG", &self.kubeconfig);
        c
    }
}

/// For the kind tests: whether to run `what` here. Without what kind needs, it is a
/// skip with the reason on stderr, except under `CI=true`, where CI must run it: a
/// failure naming `what` and what is missing.
pub fn run_or_skip(what: &str) -> bool {
    match available() {
        Ok(()) => true,
        Err(why) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI must run {what}: {why}"
            );
            eprintln!("skipped: {why}");
            false
        }
    }
}

/// Whether this machine can run kind clusters: a Debian dockerd and debootstrap (the
/// harness installs both with `e2e/tools/install-host-deps.sh`). `Err` says what is
/// missing.
pub fn available() -> std::result::Result<(), String> {
    let set = |v: &str| std::env::var_os(v).is_some_and(|x| !x.is_empty());
    // A docker of the user's own needs no dockerd here; a given node image no debootstrap.
    let missing: Vec<&str> = [
        ("/usr/sbin/dockerd", "docker.io", !set("CVM_DOCKER_HOST")),
        (
            "/usr/sbin/debootstrap",
            "debootstrap",
            !set("CVM_KIND_IMAGE"),
        ),
    ]
    .into_iter()
    .filter(|(p, _, needed)| *needed && !Path::new(p).exists())
    .map(|(_, pkg, _)| pkg)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "kind clusters need Debian's {} (run `bash e2e/tools/install-host-deps.sh`)",
            missing.join(" and ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_and_tee_labels_follow_kind() {
        assert_eq!(
            node_names("c", 3),
            vec!["c-control-plane", "c-worker", "c-worker2"]
        );
        assert_eq!(tees_label_value(&[Tee::SevSnp, Tee::Tdx]), "sev-snp.tdx");
        assert_eq!(tees_label_value(&[Tee::SevEs]), "sev-es");
    }
}
