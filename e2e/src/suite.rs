//! The cluster e2e suite: one list of checks that runs on a kind cluster the harness makes
//! (chart installed by `helm install --wait`) and on any existing cluster with the chart
//! installed, given its kubeconfig (`CVM_E2E_KUBECONFIG`). Checks that need the harness's
//! internals (a node's filesystem, images loaded into nodes, deleting the release) say so
//! and are skipped on a foreign cluster; nothing else is.
//!
//! The suite's own CVMs live in namespace [`SUITE_NAMESPACE`], which it removes at the
//! end; the examples go to `default` as their headers say and stay.

use crate::demo::{apply_examples, kubectl, wait_verified, KubectlCmd};
use crate::kind::{Kind, KindError};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Namespace of the suite's own CVMs.
pub const SUITE_NAMESPACE: &str = "cvm-e2e";
/// kubeconfig of an existing cluster to run the suite against instead of kind.
pub const ENV_KUBECONFIG: &str = "CVM_E2E_KUBECONFIG";
/// The chart's release namespace there (default `cvm-system`).
pub const ENV_NAMESPACE: &str = "CVM_E2E_NAMESPACE";
/// The chart's release name there (default `cvm-operator`).
pub const ENV_RELEASE: &str = "CVM_E2E_RELEASE";

/// Why a check failed: each names what it saw.
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    #[error("{0}")]
    Kubectl(String),
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("{0}")]
    Check(String),
    #[error(transparent)]
    Kind(#[from] KindError),
    #[error(transparent)]
    Gitops(#[from] crate::gitops::GitopsError),
    #[error("{0}")]
    Harness(String),
}

pub type Result<T> = std::result::Result<T, SuiteError>;

/// The cluster under test.
#[derive(Debug)]
pub struct Cluster {
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
    /// The chart's release namespace and name.
    pub namespace: String,
    pub release: String,
    /// The kind harness that made the cluster; `None` on a foreign cluster.
    pub kind: Option<Kind>,
}

impl KubectlCmd for Cluster {
    fn kubectl_cmd(&self) -> Command {
        let mut c = Command::new(&self.kubectl);
        c.env("KUBECONFIG", &self.kubeconfig);
        c
    }
}

impl Cluster {
    /// The cluster kind made, chart installed by the harness.
    pub fn from_kind(kind: Kind) -> Cluster {
        Cluster {
            kubeconfig: kind.kubeconfig.clone(),
            kubectl: kind.kubectl.clone(),
            helm: kind.helm.clone(),
            namespace: crate::kind::NAMESPACE.into(),
            release: crate::kind::RELEASE.into(),
            kind: Some(kind),
        }
    }

    /// An existing cluster with the chart installed (release and namespace from
    /// [`ENV_RELEASE`] / [`ENV_NAMESPACE`], or the chart's defaults).
    pub fn existing(kubeconfig: &Path) -> Result<Cluster> {
        if !kubeconfig.is_file() {
            return Err(SuiteError::Harness(format!(
                "{ENV_KUBECONFIG}={} is not a file",
                kubeconfig.display()
            )));
        }
        let bin = crate::tools::bin_dir().map_err(|e| SuiteError::Harness(e.to_string()))?;
        let c = Cluster {
            kubeconfig: kubeconfig.to_path_buf(),
            kubectl: bin.join("kubectl"),
            helm: bin.join("helm"),
            namespace: std::env::var(ENV_NAMESPACE).unwrap_or_else(|_| "cvm-system".into()),
            release: std::env::var(ENV_RELEASE).unwrap_or_else(|_| "cvm-operator".into()),
            kind: None,
        };
        let deploy = format!("deploy/{}-operator", c.release);
        c.get(&["get", &deploy, "-n", &c.namespace, "-o", "name"])
            .map_err(|e| {
                SuiteError::Harness(format!(
                    "no cvm-operator release {} in namespace {} ({e}); install the chart first (docs/install.md) or set {ENV_RELEASE} / {ENV_NAMESPACE}",
                    c.release, c.namespace
                ))
            })?;
        Ok(c)
    }

    /// `kubectl ARGS`; stdout.
    pub fn get(&self, args: &[&str]) -> Result<String> {
        kubectl(self, args).map_err(SuiteError::Kubectl)
    }

    fn jsonpath(&self, args: &[&str], path: &str) -> Result<String> {
        let out = format!("jsonpath={path}");
        let mut all = args.to_vec();
        all.extend_from_slice(&["-o", &out]);
        Ok(self.get(&all)?.trim().to_string())
    }

    /// `kubectl apply -f -` of `manifest`.
    pub fn apply(&self, manifest: &str) -> Result<()> {
        use std::io::Write;
        let mut child = self
            .kubectl_cmd()
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| SuiteError::Kubectl(format!("running kubectl: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(manifest.as_bytes())
                .map_err(|e| SuiteError::Kubectl(format!("writing to kubectl: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| SuiteError::Kubectl(format!("kubectl apply: {e}")))?;
        if !out.status.success() {
            return Err(SuiteError::Kubectl(format!(
                "kubectl apply failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    fn operator_deploy(&self) -> String {
        format!("deploy/{}-operator", self.release)
    }

    fn plugin_ds(&self) -> String {
        format!("ds/{}-node-plugin", self.release)
    }

    /// Whether the chart's node plugin serves kubelet's device-plugin API.
    fn plugin_serves_kubelet(&self) -> bool {
        self.jsonpath(
            &["get", &self.plugin_ds(), "-n", &self.namespace],
            "{.spec.template.spec.containers[0].args}",
        )
        .is_ok_and(|a| a.contains("--device-plugin-dir"))
    }

    /// The Lease holder: the leading operator pod.
    fn leader(&self) -> String {
        self.jsonpath(
            &[
                "get",
                "lease",
                "-n",
                &self.namespace,
                &format!("{}-operator-leader", self.release),
            ],
            "{.spec.holderIdentity}",
        )
        .unwrap_or_default()
    }
}

/// Polls `f` every 200 ms until it holds or `within` passes; how long it took.
pub fn until(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let t0 = Instant::now();
    while !f() {
        if t0.elapsed() >= within {
            return Err(SuiteError::Timeout {
                what: what.to_string(),
                after: within,
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(t0.elapsed())
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(SuiteError::Check(what()))
    }
}

fn figure(what: &str, value: String) {
    println!("figure: {what}: {value}");
}

/// How one check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    /// Needs the harness's internals; the reason says which.
    Skipped(String),
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    pub passed: Vec<&'static str>,
    pub skipped: Vec<(&'static str, String)>,
    pub took: Duration,
}

type Check = fn(&Cluster) -> Result<Outcome>;

/// The checks in the order they run (later ones rely on the examples and leave the
/// release uninstalled last).
pub const CHECKS: [(&str, Check); 13] = [
    ("install", check_install),
    ("examples", check_examples),
    ("gitops-health", check_gitops_health),
    ("apply-to-verified", check_apply_to_verified),
    ("capacity-burst", check_capacity_burst),
    ("node-restriction-projected-token", check_projected_token),
    ("plugin-pod-recreated", check_plugin_pod_recreated),
    ("kubelet-restart", check_kubelet_restart),
    ("evict-and-drain", check_evict_and_drain),
    ("kill-during-launch", check_kill_during_launch),
    ("leader-failover", check_leader_failover),
    ("helm-upgrade", check_upgrade),
    ("helm-uninstall", check_uninstall),
];

/// Runs every check in order, printing each outcome; stops at the first failure.
pub fn run(c: &Cluster) -> Result<Report> {
    let t0 = Instant::now();
    c.apply(&format!(
        "{{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{{\"name\":\"{SUITE_NAMESPACE}\"}}}}"
    ))?;
    let mut report = Report::default();
    let result = (|| {
        for (name, f) in CHECKS {
            let t = Instant::now();
            match f(c) {
                Ok(Outcome::Passed) => {
                    println!(
                        "suite: {name}: passed in {:.1} s",
                        t.elapsed().as_secs_f64()
                    );
                    report.passed.push(name);
                }
                Ok(Outcome::Skipped(why)) => {
                    println!("suite: {name}: skipped: {why}");
                    report.skipped.push((name, why));
                }
                Err(e) => {
                    diagnose(c, name);
                    return Err(SuiteError::Check(format!("check {name} failed: {e}")));
                }
            }
        }
        Ok(())
    })();
    // The suite's namespace goes however the run ended (the cluster may be someone's).
    let _ = c.get(&["delete", "ns", SUITE_NAMESPACE, "--wait=false"]);
    result?;
    report.took = t0.elapsed();
    Ok(report)
}

/// What the cluster looked like when a check failed, so a failure in CI can be read
/// after its cluster is gone: the suite's CVMs (status in full), every pod, the suite's
/// events, and the last lines of the operator's and the plugins' logs.
fn diagnose(c: &Cluster, check: &str) {
    println!("suite: {check} failed; the cluster at that moment:");
    let ns = c.namespace.as_str();
    let labels = format!("app.kubernetes.io/instance={}", c.release);
    let dumps: [(&str, Vec<&str>); 6] = [
        ("CVMs", vec!["get", "cvm", "-A", "-o", "wide"]),
        (
            "suite CVMs",
            vec!["get", "cvm", "-n", SUITE_NAMESPACE, "-o", "yaml"],
        ),
        ("pods", vec!["get", "pods", "-A", "-o", "wide"]),
        ("nodes", vec!["get", "nodes", "-o", "wide"]),
        (
            "suite events",
            vec![
                "get",
                "events",
                "-n",
                SUITE_NAMESPACE,
                "--sort-by=.lastTimestamp",
            ],
        ),
        (
            "operator and plugin logs",
            vec![
                "logs",
                "-n",
                ns,
                "-l",
                &labels,
                "--prefix",
                "--tail=60",
                "--max-log-requests=10",
            ],
        ),
    ];
    for (what, args) in dumps {
        let text = c.get(&args).unwrap_or_else(|e| format!("({e})"));
        println!(
            "--- {what}: kubectl {}\n{}",
            args.join(" "),
            text.trim_end()
        );
    }
}

fn needs_kind(c: &Cluster, why: &str) -> Option<Outcome> {
    c.kind
        .is_none()
        .then(|| Outcome::Skipped(format!("needs the kind harness: {why}")))
}

// --- the checks ----------------------------------------------------------------------

/// Every operator replica ready, a plugin ready on every node it is scheduled to, and
/// each simulated TDX node labelled by its own plugin (no NFD).
fn check_install(c: &Cluster) -> Result<Outcome> {
    let ns = c.namespace.as_str();
    // helm's --wait counts a DaemonSet ready with maxUnavailable pods still starting.
    for (what, object, counts) in [
        (
            "every operator replica ready",
            c.operator_deploy(),
            "{.spec.replicas} {.status.readyReplicas}",
        ),
        (
            "a ready plugin on every node",
            c.plugin_ds(),
            "{.status.desiredNumberScheduled} {.status.numberReady}",
        ),
    ] {
        until(Duration::from_secs(120), what, || {
            c.jsonpath(&["get", &object, "-n", ns], counts)
                .is_ok_and(|s| {
                    let v: Vec<&str> = s.split_whitespace().collect();
                    v.len() == 2 && v[0] == v[1] && v[0] != "0"
                })
        })?;
    }
    let tdx_nodes: Vec<String> = c
        .jsonpath(
            &["get", "nodes"],
            r#"{range .items[*]}{.metadata.name}={.metadata.labels.sim\.cvmp\.io/tees}{"\n"}{end}"#,
        )?
        .lines()
        .filter(|l| {
            l.split('=')
                .nth(1)
                .is_some_and(|t| t.split('.').any(|x| x == "tdx"))
        })
        .filter_map(|l| l.split('=').next().map(String::from))
        .collect();
    // kubelet advertises the keys and the KVM shares the plugin serves it through the
    // device-plugin API (no one else writes devices.cvmp.io/kvm).
    let advertised_by_kubelet = if c.plugin_serves_kubelet() {
        sim_nodes(c)?
    } else {
        Vec::new()
    };
    for node in advertised_by_kubelet {
        until(
            Duration::from_secs(60),
            &format!("kubelet on {node} advertising devices.cvmp.io/kvm"),
            || {
                c.jsonpath(
                    &["get", "node", &node],
                    r#"{.status.allocatable.devices\.cvmp\.io/kvm}"#,
                )
                .is_ok_and(|v| v == "110")
            },
        )?;
    }
    for node in &tdx_nodes {
        until(
            Duration::from_secs(60),
            &format!("node {node} labelled TDX by its plugin"),
            || {
                c.jsonpath(
                    &["get", "node", node],
                    r#"{.metadata.labels.feature\.node\.kubernetes\.io/cpu-security\.tdx\.enabled}"#,
                )
                .is_ok_and(|v| v == "true")
            },
        )?;
    }
    Ok(Outcome::Passed)
}

/// Nodes with simulated TEEs (the chart's sim label).
fn sim_nodes(c: &Cluster) -> Result<Vec<String>> {
    Ok(c.jsonpath(
        &["get", "nodes", "-l", "sim.cvmp.io/tees"],
        r#"{range .items[*]}{.metadata.name}{"\n"}{end}"#,
    )?
    .lines()
    .map(String::from)
    .collect())
}

/// Restart kubelet on a node: the plugin registers its resources again (kubelet drops
/// every plugin socket when it starts) and kubelet advertises them again; the node's
/// CVMs stay Verified.
fn check_kubelet_restart(c: &Cluster) -> Result<Outcome> {
    if let Some(skip) = needs_kind(c, "it restarts kubelet inside a node") {
        return Ok(skip);
    }
    let Some(kind) = &c.kind else {
        return Ok(Outcome::Skipped("no kind harness".into()));
    };
    let cvms = verified_examples(c)?;
    let Some((name, node)) = cvms.first().cloned() else {
        return Err(SuiteError::Check("no Verified example CVM".into()));
    };
    let socket = format!(
        "/var/lib/kubelet/device-plugins/{}",
        cvm_node_plugin::deviceplugin::socket_name(cvm_node_plugin::deviceplugin::RESOURCE_KVM)
    );
    let inode = |k: &Kind| {
        k.node_exec(&node, &["stat", "-c", "%i %y", &socket])
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let before = inode(kind);
    check(!before.is_empty(), || {
        format!("no plugin socket {socket} on {node}")
    })?;
    let t0 = Instant::now();
    kind.node_exec(&node, &["systemctl", "restart", "kubelet"])?;
    until(
        Duration::from_secs(90),
        &format!("the plugin on {node} registered again after kubelet restarted"),
        || {
            let now = inode(kind);
            !now.is_empty() && now != before
        },
    )?;
    until(
        Duration::from_secs(90),
        &format!("{node} Ready and advertising again"),
        || {
            c.jsonpath(
            &["get", "node", &node],
            r#"{.status.conditions[?(@.type=="Ready")].status} {.status.allocatable.devices\.cvmp\.io/kvm}"#,
        )
        .is_ok_and(|v| v == "True 110")
        },
    )?;
    figure(
        "kubelet restarted -> the plugin registered and advertised again",
        format!("{:.1} s", t0.elapsed().as_secs_f64()),
    );
    check(verified(c, "default", &name), || {
        format!("{name} on {node} stays Verified across the kubelet restart")
    })?;
    Ok(Outcome::Passed)
}

/// `kubectl apply -f examples/` as the headers say; each example reaches its verdict.
fn check_examples(c: &Cluster) -> Result<Outcome> {
    let applied = apply_examples(c).map_err(SuiteError::Kubectl)?;
    for (file, tee) in &applied.skipped {
        println!("suite: example {file} not applied: no node hosts {tee}");
    }
    check(!applied.names.is_empty(), || {
        "no example CVM could be applied".into()
    })?;
    wait_verified(c, &applied.names, 180).map_err(SuiteError::Check)?;
    Ok(Outcome::Passed)
}

/// The SEV-SNP example as a suite CVM: `name` in the suite's namespace, one vCPU (kind
/// nodes report the machine's cores, which the examples hold some of), its expected
/// measurement recomputed; `edit` changes it further.
pub fn snp_cvm(name: &str, edit: impl FnOnce(&mut cvm_crds::ConfidentialVM)) -> Result<String> {
    use serde::Deserialize as _;
    let path = crate::demo::examples_dir().join("sev-snp-cvm.yaml");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| SuiteError::Harness(format!("reading {}: {e}", path.display())))?;
    let doc = serde_yaml::Deserializer::from_str(&text)
        .next()
        .ok_or_else(|| SuiteError::Harness(format!("{} holds no manifest", path.display())))?;
    let mut cvm = cvm_crds::ConfidentialVM::deserialize(doc)
        .map_err(|e| SuiteError::Harness(format!("{}: {e}", path.display())))?;
    cvm.metadata.name = Some(name.to_string());
    cvm.metadata.namespace = Some(SUITE_NAMESPACE.to_string());
    cvm.spec.resources.vcpus = 1;
    let m = cvm_node_plugin::measure::simulated_measurement(&cvm.spec);
    if let Some(a) = cvm.spec.attestation.as_mut() {
        a.expected_measurements = vec![m];
    }
    edit(&mut cvm);
    serde_json::to_string(&cvm).map_err(|e| SuiteError::Harness(format!("encoding {name}: {e}")))
}

fn condition(c: &Cluster, ns: &str, name: &str, ty: &str) -> (String, String) {
    let got = c
        .jsonpath(
            &["get", "cvm", name, "-n", ns],
            &format!(
                r#"{{.status.conditions[?(@.type=="{ty}")].status}} {{.status.conditions[?(@.type=="{ty}")].reason}}"#
            ),
        )
        .unwrap_or_default();
    let mut parts = got.split_whitespace();
    (
        parts.next().unwrap_or_default().to_string(),
        parts.next().unwrap_or_default().to_string(),
    )
}

fn verified(c: &Cluster, ns: &str, name: &str) -> bool {
    condition(c, ns, name, "Verified").0 == "True"
}

fn delete_cvm(c: &Cluster, name: &str) -> Result<()> {
    c.get(&[
        "delete",
        "cvm",
        name,
        "-n",
        SUITE_NAMESPACE,
        "--timeout=90s",
    ])
    .map(|_| ())
}

/// Flux's kstatus and Argo CD's health script, run on the objects the API server really
/// served: a new CVM reads InProgress / Progressing until it is Verified, then Current /
/// Healthy; a CVM whose evidence is rejected and one no node can host read Failed /
/// Degraded; an SEV-ES guest handed to its owner reads Current / Healthy.
fn check_gitops_health(c: &Cluster) -> Result<Outcome> {
    let ns = SUITE_NAMESPACE;
    // A list's own resourceVersion (kubectl's table of a list has none).
    let list: serde_json::Value = serde_json::from_str(&c.get(&[
        "get",
        "--raw",
        &format!("/apis/cvmp.io/v1alpha1/namespaces/{ns}/confidentialvms?limit=1"),
    ])?)
    .map_err(|e| SuiteError::Check(format!("the CVM list is not JSON: {e}")))?;
    let rv0 = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    check(!rv0.is_empty(), || {
        "the CVM list has no resourceVersion".into()
    })?;
    let name = "gitops-ok";
    c.apply(&snp_cvm(name, |_| {})?)?;
    until(Duration::from_secs(120), "gitops-ok Verified", || {
        verified(c, ns, name)
    })?;
    // Every revision of the object since before it existed, replayed by a watch from
    // the list's resourceVersion (the server closes it after a second).
    let events = c.get(&[
        "get",
        "--raw",
        &format!(
            "/apis/cvmp.io/v1alpha1/namespaces/{ns}/confidentialvms?watch=1&resourceVersion={rv0}&timeoutSeconds=1&fieldSelector=metadata.name%3D{name}"
        ),
    ])?;
    let mut seen = Vec::new();
    for ev in serde_json::Deserializer::from_str(&events).into_iter::<serde_json::Value>() {
        let ev = ev.map_err(|e| SuiteError::Check(format!("watch event is not JSON: {e}")))?;
        let Some(obj) = ev.get("object") else {
            continue;
        };
        let text = obj.to_string();
        let k = crate::gitops::kstatus(&text)?;
        let a = crate::gitops::argocd_health(&text)?;
        seen.push((k.status, a.status, k.message));
    }
    let first = seen.first().cloned().unwrap_or_default();
    let last = seen.last().cloned().unwrap_or_default();
    let trail: Vec<String> = seen.iter().map(|(k, a, _)| format!("{k}/{a}")).collect();
    check(seen.len() >= 2, || {
        format!("the watch replayed {} revisions of {name}", seen.len())
    })?;
    check(first.0 == "InProgress" && first.1 == "Progressing", || {
        format!(
            "a new CVM reads {}/{} ({}); want InProgress/Progressing",
            first.0, first.1, first.2
        )
    })?;
    check(last.0 == "Current" && last.1 == "Healthy", || {
        format!(
            "a Verified CVM reads {}/{} ({}); want Current/Healthy",
            last.0, last.1, last.2
        )
    })?;
    check(
        seen.iter()
            .all(|(k, a, _)| k != "Failed" && a != "Degraded"),
        || {
            format!(
                "a CVM on its way to Verified never reads Failed: {}",
                trail.join(" → ")
            )
        },
    )?;
    println!(
        "suite: kstatus/argocd over {name}'s revisions: {}",
        trail.join(" → ")
    );

    // The demo fleet's nodes have the machine's cores, which the examples hold some of:
    // one suite CVM at a time.
    delete_cvm(c, name)?;
    // Stuck until someone acts: evidence rejected, and nothing can host it.
    let rejected = snp_cvm("gitops-rejected", |cvm| {
        if let Some(a) = cvm.spec.attestation.as_mut() {
            a.expected_measurements = vec!["00".repeat(48)];
        }
    })?;
    let unplaceable = snp_cvm("gitops-unplaceable", |cvm| {
        cvm.spec.node_selector = [("cvmp.io/e2e".to_string(), "no-such-node".to_string())].into();
    })?;
    for (name, manifest, reason) in [
        ("gitops-rejected", rejected, "EvidenceRejected"),
        ("gitops-unplaceable", unplaceable, "Unschedulable"),
    ] {
        c.apply(&manifest)?;
        until(
            Duration::from_secs(120),
            &format!("{name} Stalled={reason}"),
            || condition(c, ns, name, "Stalled") == ("True".into(), reason.into()),
        )?;
        let obj = c.get(&["get", "cvm", name, "-n", ns, "-o", "json"])?;
        let (k, a) = (
            crate::gitops::kstatus(&obj)?,
            crate::gitops::argocd_health(&obj)?,
        );
        check(k.status == "Failed" && a.status == "Degraded", || {
            format!(
                "{name} reads {}/{}; want Failed/Degraded",
                k.status, a.status
            )
        })?;
        check(a.message.contains(reason), || {
            format!("Argo CD's message for {name} names {reason}: {}", a.message)
        })?;
        delete_cvm(c, name)?;
    }
    // Handed to its owner: done as far as the operator goes.
    let sev_es = c.jsonpath(
        &["get", "cvm", "-n", "default"],
        r#"{range .items[?(@.spec.tee.type=="SEV-ES")]}{.metadata.name}{"\n"}{end}"#,
    )?;
    if let Some(es) = sev_es.lines().next() {
        let obj = c.get(&["get", "cvm", es, "-n", "default", "-o", "json"])?;
        let (k, a) = (
            crate::gitops::kstatus(&obj)?,
            crate::gitops::argocd_health(&obj)?,
        );
        check(k.status == "Current" && a.status == "Healthy", || {
            format!(
                "SEV-ES {es} reads {}/{}; want Current/Healthy",
                k.status, a.status
            )
        })?;
    }
    Ok(Outcome::Passed)
}

fn p50(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// apply → Verified through the installed pods, one CVM at a time (each deleted, its
/// guest stopped, before the next).
fn check_apply_to_verified(c: &Cluster) -> Result<Outcome> {
    let mut took = Vec::new();
    for i in 0..5 {
        let name = format!("snp-{i}");
        let t = Instant::now();
        c.apply(&snp_cvm(&name, |_| {})?)?;
        until(
            Duration::from_secs(120),
            &format!("{name} Verified"),
            || verified(c, SUITE_NAMESPACE, &name),
        )?;
        took.push(t.elapsed().as_secs_f64());
        delete_cvm(c, &name)?;
    }
    figure(
        "apply -> Verified through pods",
        format!(
            "p50 {:.2} s, max {:.2} s (n={})",
            p50(took.clone()),
            took.iter().cloned().fold(0.0, f64::max),
            took.len()
        ),
    );
    if let Some(kind) = &c.kind {
        for comm in ["cvm-operator", "cvm-node-plugin"] {
            let rss = kind.rss_mb(comm);
            check(!rss.is_empty(), || format!("no {comm} process on any node"))?;
            let list: Vec<String> = rss
                .iter()
                .map(|(n, mb)| format!("{n} {mb:.1} MB"))
                .collect();
            figure(&format!("RSS {comm}"), list.join(", "));
        }
    }
    Ok(Outcome::Passed)
}

/// Three times the fleet's SEV-SNP key capacity applied at once (two operator replicas
/// run): no node's keys are ever handed out twice (kubelet, which counts them for the
/// launcher pods, admits every pod it is given), the CVMs that fit verify, the rest say
/// why they wait. Then all are deleted and their keys come back.
fn check_capacity_burst(c: &Cluster) -> Result<Outcome> {
    if let Some(skip) = needs_kind(c, "it fills every node's TEE keys for a while") {
        return Ok(skip);
    }
    let ns = SUITE_NAMESPACE;
    let nodes = c.jsonpath(
        &["get", "nodes"],
        r#"{range .items[*]}{.metadata.name} {.status.allocatable.sev-snp\.amd\.com/esids}{"\n"}{end}"#,
    )?;
    let capacity: Vec<(String, u32)> = nodes
        .lines()
        .filter_map(|l| {
            let mut p = l.split_whitespace();
            Some((p.next()?.to_string(), p.next()?.parse().ok()?))
        })
        .collect();
    let total: u32 = capacity.iter().map(|(_, n)| n).sum();
    check(total > 0, || {
        "no node advertises sev-snp.amd.com/esids".into()
    })?;
    // Thirty at once (about the fleet's keys), then three times the keys.
    for (what, n) in [("30-CVM burst", 30), ("burst of 3 x capacity", 3 * total)] {
        let mut items = Vec::new();
        for i in 0..n {
            let m = snp_cvm(&format!("burst-{i}"), |cvm| {
                cvm.spec.resources.memory_mib = 256;
                let m = cvm_node_plugin::measure::simulated_measurement(&cvm.spec);
                if let Some(a) = cvm.spec.attestation.as_mut() {
                    a.expected_measurements = vec![m];
                }
                cvm.metadata
                    .labels
                    .get_or_insert_with(Default::default)
                    .insert("e2e.cvmp.io/burst".into(), "true".into());
            })?;
            items.push(
                serde_json::from_str::<serde_json::Value>(&m)
                    .map_err(|e| SuiteError::Harness(format!("burst manifest: {e}")))?,
            );
        }
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
        let t0 = Instant::now();
        c.apply(&list.to_string())?;
        // Settled: each burst CVM Verified, or waiting with a reason (no key left for the
        // operator, or kube-scheduler's words for its launcher pod).
        let states = || {
            c.jsonpath(
                &["get", "cvm", "-n", ns, "-l", "e2e.cvmp.io/burst"],
                r#"{range .items[*]}{.metadata.name}|{.status.nodeName}|{.status.conditions[?(@.type=="Verified")].status}|{.status.conditions[?(@.type=="Scheduled")].reason}|{.status.conditions[?(@.type=="Ready")].reason}{"\n"}{end}"#,
            )
            .unwrap_or_default()
        };
        let settled = |text: &str| {
            let lines: Vec<&str> = text.lines().collect();
            lines.len() == n as usize
                && lines.iter().all(|l| {
                    let v: Vec<&str> = l.split('|').collect();
                    v.len() == 5
                        && (v[2] == "True"
                            || v[3] == "Unschedulable"
                            || v[4] == "LauncherUnschedulable")
                })
        };
        let mut last = String::new();
        until(
            Duration::from_secs(300),
            &format!("{n} burst CVMs settled"),
            || {
                last = states();
                settled(&last)
            },
        )
        .map_err(|e| SuiteError::Check(format!("{e}; last seen:\n{last}")))?;
        let took = t0.elapsed();
        let field = |l: &str, i: usize| l.split('|').nth(i).unwrap_or_default().to_string();
        let verified = last.lines().filter(|l| field(l, 2) == "True").count();
        let placed = last.lines().filter(|l| !field(l, 1).is_empty()).count();
        // Why the others wait, counted by the words they were given.
        let why = c.jsonpath(
            &["get", "cvm", "-n", ns, "-l", "e2e.cvmp.io/burst"],
            r#"{range .items[*]}{.status.conditions[?(@.type=="Ready")].reason}: {.status.conditions[?(@.type=="Ready")].message}{"\n"}{end}"#,
        )?;
        let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
        for l in why.lines() {
            *reasons.entry(l.to_string()).or_default() += 1;
        }
        for (r, k) in &reasons {
            println!("suite: burst: {k} x {r}");
        }
        // Keys per node: every CVM bound there (examples and the suite's own included) holds one.
        for (node, keys) in &capacity {
            let bound = c
                .jsonpath(
                    &["get", "cvm", "-A"],
                    &format!(
                        r#"{{range .items[?(@.status.nodeName=="{node}")]}}{{.spec.tee.type}}{{"\n"}}{{end}}"#
                    ),
                )?
                .lines()
                .filter(|t| *t == "SEV-SNP" || *t == "SEV-ES")
                .count();
            check(bound as u32 <= *keys, || {
                format!("{bound} SEV-SNP/SEV-ES CVMs bound to {node}, which has {keys} keys")
            })?;
        }
        // kubelet refused no launcher pod: it never had to hand out a key it did not have.
        let refused = c.jsonpath(
            &["get", "pods", "-n", ns, "-l", "e2e.cvmp.io/burst"],
            r#"{range .items[?(@.status.phase=="Failed")]}{.metadata.name} {.status.reason}{"\n"}{end}"#,
        )?;
        check(refused.trim().is_empty(), || {
            format!("kubelet refused launcher pods: {refused}")
        })?;
        check(verified > 0, || "no burst CVM verified".into())?;
        check(placed <= total as usize, || {
            format!("{placed} burst CVMs placed with {total} keys in the fleet")
        })?;
        figure(
            &format!("{what} settled (two operator replicas)"),
            format!(
                "{n} CVMs in {:.1} s: {placed} placed, {verified} of them Verified, {} waiting with a reason ({total} SEV-SNP keys in the fleet)",
                took.as_secs_f64(),
                n as usize - verified
            ),
        );
        let t = Instant::now();
        c.get(&[
            "delete",
            "cvm",
            "-n",
            ns,
            "-l",
            "e2e.cvmp.io/burst",
            "--wait=false",
        ])?;
        until(
            Duration::from_secs(300),
            "the burst CVMs and their pods gone",
            || {
                c.get(&[
                    "get",
                    "cvm,pods",
                    "-n",
                    ns,
                    "-l",
                    "e2e.cvmp.io/burst",
                    "-o",
                    "name",
                ])
                .is_ok_and(|s| s.trim().is_empty())
            },
        )?;
        figure(
            &format!("{what} deleted (guests stopped, pods gone, finalizers removed)"),
            format!("{:.1} s", t.elapsed().as_secs_f64()),
        );
    }
    Ok(Outcome::Passed)
}

/// (name, nodeName) of the Verified example CVMs in `default`.
fn verified_examples(c: &Cluster) -> Result<Vec<(String, String)>> {
    let out = c.jsonpath(
        &["get", "cvm", "-n", "default"],
        r#"{range .items[*]}{.metadata.name} {.status.nodeName} {.status.conditions[?(@.type=="Verified")].status}{"\n"}{end}"#,
    )?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let v: Vec<&str> = l.split_whitespace().collect();
            (v.len() == 3 && v[2] == "True").then(|| (v[0].to_string(), v[1].to_string()))
        })
        .collect())
}

/// The node plugin pod on `node`: (name, uid).
fn plugin_pod(c: &Cluster, node: &str) -> Result<(String, String)> {
    let out = c.jsonpath(
        &[
            "get",
            "pods",
            "-n",
            &c.namespace,
            "-l",
            "app.kubernetes.io/component=node-plugin",
            "--field-selector",
            &format!("spec.nodeName={node}"),
        ],
        r#"{range .items[*]}{.metadata.name} {.metadata.uid} {.metadata.deletionTimestamp}{"\n"}{end}"#,
    )?;
    out.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|v| v.len() == 2)
        .map(|v| (v[0].to_string(), v[1].to_string()))
        .ok_or_else(|| SuiteError::Check(format!("no running node plugin pod on {node}")))
}

/// The node restriction holds for the token kubelet really projects into the plugin
/// pod: its node-name claim comes from kubelet, it may write the status of a CVM bound
/// to its node and not of one bound to another (server-side dry runs: nothing changes).
fn check_projected_token(c: &Cluster) -> Result<Outcome> {
    if let Some(skip) = needs_kind(c, "it reads the projected token from the node's filesystem") {
        return Ok(skip);
    }
    let Some(kind) = &c.kind else {
        return Ok(Outcome::Skipped("no kind harness".into()));
    };
    let cvms = verified_examples(c)?;
    let Some((mine, node)) = cvms.first().cloned() else {
        return Err(SuiteError::Check("no Verified example CVM".into()));
    };
    let Some((theirs, other)) = cvms.iter().find(|(_, n)| *n != node).cloned() else {
        return Err(SuiteError::Check(format!(
            "every Verified example runs on {node}; the check needs two nodes"
        )));
    };
    let (pod, uid) = plugin_pod(c, &node)?;
    let token = kind.node_exec(
        &node,
        &[
            "sh",
            "-c",
            &format!("cat /var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~projected/*/token"),
        ],
    )?;
    let token = token.trim();
    check(token.split('.').count() == 3, || {
        format!("the token projected into {pod} is not a JWT")
    })?;
    let as_plugin = TokenClient::new(c, token)?;
    let who: serde_json::Value =
        serde_json::from_str(&as_plugin.run(&["auth", "whoami", "-o", "json"])?.1)
            .map_err(|e| SuiteError::Check(format!("kubectl auth whoami: {e}")))?;
    let user = &who["status"]["userInfo"];
    let claim = &user["extra"]["authentication.kubernetes.io/node-name"];
    check(claim == &serde_json::json!([node]), || {
        format!("kubelet's token for {pod} claims node {claim}, want [{node}]: {user}")
    })?;
    check(
        user["extra"]["authentication.kubernetes.io/pod-name"] == serde_json::json!([pod]),
        || format!("the token names pod {pod}: {user}"),
    )?;
    let (ok, out) = as_plugin.dry_run_status_patch(&mine)?;
    check(ok, || {
        format!("the plugin on {node} may write {mine}'s status: {out}")
    })?;
    let (ok, out) = as_plugin.dry_run_status_patch(&theirs)?;
    check(
        !ok && out.contains("Forbidden") && out.contains("may only write CVMs bound to that node"),
        || {
            format!(
                "the plugin on {node} writing {theirs} (bound to {other}) must be Forbidden: {out}"
            )
        },
    )?;
    let (ok, out) = as_plugin.run(&[
        "label",
        "node",
        &other,
        "cvmp.io/e2e=forged",
        "--dry-run=server",
    ])?;
    check(!ok && out.contains("Forbidden"), || {
        format!("the plugin on {node} labelling node {other} must be Forbidden: {out}")
    })?;
    Ok(Outcome::Passed)
}

/// kubectl with only a bearer token: no client certificate of the admin's beside it.
struct TokenClient<'a> {
    c: &'a Cluster,
    server: String,
    ca: tempfile::NamedTempFile,
    token: String,
}

impl<'a> TokenClient<'a> {
    fn new(c: &'a Cluster, token: &str) -> Result<TokenClient<'a>> {
        let server = c.get(&[
            "config",
            "view",
            "--minify",
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ])?;
        let ca_b64 = c.get(&[
            "config",
            "view",
            "--minify",
            "--raw",
            "-o",
            "jsonpath={.clusters[0].cluster.certificate-authority-data}",
        ])?;
        use base64::Engine as _;
        let ca_pem = base64::engine::general_purpose::STANDARD
            .decode(ca_b64.trim())
            .map_err(|e| SuiteError::Harness(format!("the kubeconfig's CA is not base64: {e}")))?;
        let ca = tempfile::NamedTempFile::new()
            .map_err(|e| SuiteError::Harness(format!("temp file: {e}")))?;
        std::fs::write(ca.path(), ca_pem)
            .map_err(|e| SuiteError::Harness(format!("writing the CA: {e}")))?;
        Ok(TokenClient {
            c,
            server: server.trim().to_string(),
            ca,
            token: token.to_string(),
        })
    }

    /// A server-side dry run of the merge patch a plugin writes to a CVM's status in
    /// `default` (kubectl would first GET the status, which the plugin may not):
    /// (admitted, the refusal).
    fn dry_run_status_patch(&self, name: &str) -> Result<(bool, String)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| SuiteError::Harness(format!("a tokio runtime: {e}")))?;
        rt.block_on(async {
            let client = crate::tokens::token_client(&self.c.kubeconfig, &self.token)
                .await
                .map_err(|e| {
                    SuiteError::Harness(format!("a client with the plugin's token: {e}"))
                })?;
            let api: kube::Api<cvm_crds::ConfidentialVM> = kube::Api::namespaced(client, "default");
            let pp = kube::api::PatchParams {
                dry_run: true,
                ..Default::default()
            };
            let patch = serde_json::json!({"status": {"platform": {"message": "e2e dry run"}}});
            match api
                .patch_status(name, &pp, &kube::api::Patch::Merge(&patch))
                .await
            {
                Ok(_) => Ok((true, String::new())),
                Err(kube::Error::Api(e)) => {
                    Ok((false, format!("{} {}: {}", e.code, e.reason, e.message)))
                }
                Err(e) => Err(SuiteError::Kubectl(format!(
                    "patching {name}'s status: {e}"
                ))),
            }
        })
    }

    /// (success, stdout + stderr).
    fn run(&self, args: &[&str]) -> Result<(bool, String)> {
        let out = Command::new(&self.c.kubectl)
            .env_remove("KUBECONFIG")
            .arg("--kubeconfig=/dev/null")
            .arg(format!("--server={}", self.server))
            .arg(format!(
                "--certificate-authority={}",
                self.ca.path().display()
            ))
            .arg(format!("--token={}", self.token))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| SuiteError::Kubectl(format!("running kubectl: {e}")))?;
        Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }
}

/// One plugin metric of the pod, read through the API server's pod proxy.
fn plugin_metric(c: &Cluster, pod: &str, series: &str) -> Result<f64> {
    let port = c.jsonpath(
        &["get", "pod", pod, "-n", &c.namespace],
        r#"{.spec.containers[0].ports[?(@.name=="metrics")].containerPort}"#,
    )?;
    let text = c.get(&[
        "get",
        "--raw",
        &format!(
            "/api/v1/namespaces/{}/pods/{pod}:{port}/proxy/metrics",
            c.namespace
        ),
    ])?;
    text.lines()
        .find(|l| l.starts_with(series) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| SuiteError::Check(format!("{pod} serves no {series}")))
}

/// Delete a node plugin pod: the DaemonSet recreates it, the new plugin takes over its
/// node's guests without launching any again (same launch IDs, none launched by the new
/// pod, none orphaned), and answers a fresh attestation request for each.
fn check_plugin_pod_recreated(c: &Cluster) -> Result<Outcome> {
    let cvms = verified_examples(c)?;
    let Some((_, node)) = cvms.first().cloned() else {
        return Err(SuiteError::Check("no Verified example CVM".into()));
    };
    let on_node: Vec<String> = cvms
        .iter()
        .filter(|(_, n)| *n == node)
        .map(|(name, _)| name.clone())
        .collect();
    let launch_ids = |names: &[String]| -> Result<Vec<String>> {
        names
            .iter()
            .map(|n| {
                c.jsonpath(
                    &["get", "cvm", n, "-n", "default"],
                    "{.status.platform.launchId}/{.status.guestInstance.relaunches}",
                )
            })
            .collect()
    };
    let before = launch_ids(&on_node)?;
    let (pod, uid) = plugin_pod(c, &node)?;
    let t0 = Instant::now();
    c.get(&["delete", "pod", &pod, "-n", &c.namespace, "--wait=false"])?;
    let mut new_pod = String::new();
    until(
        Duration::from_secs(120),
        &format!("a new ready plugin pod on {node}"),
        || match plugin_pod(c, &node) {
            Ok((p, u)) if u != uid => {
                let ready = c
                    .jsonpath(
                        &["get", "pod", &p, "-n", &c.namespace],
                        "{.status.containerStatuses[0].ready}",
                    )
                    .is_ok_and(|r| r == "true");
                if ready {
                    new_pod = p;
                }
                ready
            }
            _ => false,
        },
    )?;
    let recreated = t0.elapsed();
    // Ask each CVM on the node for fresh evidence: only the new plugin can answer.
    reattest(c, "default", &on_node)?;
    let reconciled = t0.elapsed();
    let after = launch_ids(&on_node)?;
    check(before == after, || {
        format!("launch IDs / relaunches of {on_node:?} changed across the plugin restart: {before:?} → {after:?}")
    })?;
    let launched = plugin_metric(c, &new_pod, "cvm_node_plugin_guests_launched_total")?;
    check(launched == 0.0, || {
        format!("the new plugin pod {new_pod} launched {launched} guests; it must adopt them")
    })?;
    let owned = plugin_metric(c, &new_pod, "cvm_node_plugin_guests_held{owned=\"true\"")?;
    let orphans = plugin_metric(c, &new_pod, "cvm_node_plugin_guests_held{owned=\"false\"")?;
    let bound_here = c
        .jsonpath(
            &["get", "cvm", "-A"],
            &format!(r#"{{range .items[?(@.status.nodeName=="{node}")]}}{{.metadata.name}}{{"\n"}}{{end}}"#),
        )?
        .lines()
        .count();
    check(orphans == 0.0, || {
        format!("{new_pod} holds {orphans} orphaned guests")
    })?;
    check(owned as usize == bound_here, || {
        format!("{new_pod} holds {owned} guests for the {bound_here} CVMs bound to {node}")
    })?;
    figure(
        "plugin pod deleted -> new pod Ready",
        format!("{:.1} s", recreated.as_secs_f64()),
    );
    figure(
        "plugin pod deleted -> its CVMs Verified on fresh evidence",
        format!(
            "{:.1} s ({} CVMs on {node})",
            reconciled.as_secs_f64(),
            on_node.len()
        ),
    );
    Ok(Outcome::Passed)
}

/// Asks each CVM for fresh evidence (`cvmp.io/reattest`) and waits until each is Verified
/// on evidence collected after the request.
fn reattest(c: &Cluster, ns: &str, names: &[String]) -> Result<()> {
    let collected = |n: &str| {
        c.jsonpath(
            &["get", "cvm", n, "-n", ns],
            "{.status.attestation.evidenceCollectedAt}",
        )
        .unwrap_or_default()
    };
    let before: Vec<String> = names.iter().map(|n| collected(n)).collect();
    let stamp = t0_stamp();
    for n in names {
        c.get(&[
            "annotate",
            "cvm",
            n,
            "-n",
            ns,
            &format!("cvmp.io/reattest={stamp}"),
            "--overwrite",
        ])?;
    }
    for (n, was) in names.iter().zip(&before) {
        until(
            Duration::from_secs(120),
            &format!("{n} Verified on fresh evidence"),
            || verified(c, ns, n) && collected(n) != *was,
        )?;
    }
    Ok(())
}

fn t0_stamp() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos().to_string())
        .unwrap_or_default()
}

fn status_field(c: &Cluster, name: &str, path: &str) -> String {
    c.jsonpath(&["get", "cvm", name, "-n", SUITE_NAMESPACE], path)
        .unwrap_or_default()
}

fn launch_id(c: &Cluster, name: &str) -> String {
    status_field(c, name, "{.status.platform.launchId}")
}

/// Evicts a pod through the Eviction API, as `kubectl drain` does.
fn evict(c: &Cluster, ns: &str, pod: &str) -> Result<()> {
    use std::io::Write;
    let body = format!(
        r#"{{"apiVersion":"policy/v1","kind":"Eviction","metadata":{{"name":"{pod}","namespace":"{ns}"}}}}"#
    );
    let mut f = tempfile::NamedTempFile::new()
        .map_err(|e| SuiteError::Harness(format!("a temporary file: {e}")))?;
    f.write_all(body.as_bytes())
        .map_err(|e| SuiteError::Harness(format!("writing the eviction: {e}")))?;
    let path = f.path().display().to_string();
    c.get(&[
        "create",
        "--raw",
        &format!("/api/v1/namespaces/{ns}/pods/{pod}/eviction"),
        "-f",
        &path,
    ])?;
    Ok(())
}

/// What a CVM's launch shows at one moment: its pod's phase and the guest's state.
fn launch_view(c: &Cluster, name: &str) -> (String, String, bool) {
    let pod = c
        .jsonpath(
            &[
                "get",
                "pods",
                "-n",
                SUITE_NAMESPACE,
                "-l",
                &format!("cvmp.io/cvm={name}"),
            ],
            "{.items[*].status.phase}",
        )
        .unwrap_or_default();
    let guest = status_field(c, name, "{.status.platform.guestState}");
    (pod, guest, verified(c, SUITE_NAMESPACE, name))
}

/// Kill -9 of the leading operator and of the CVM's node plugin at each step of a launch
/// through a launcher pod (the simulated launch slowed to 2 s by a `helm upgrade`, so
/// each step lasts long enough to be seen): the pod created but not running, the guest
/// launching in it, the guest running. Each CVM converges to Verified with one pod; a
/// guest that ran before the kill is not launched again; once they are deleted no
/// launcher pod and no guest is left.
fn check_kill_during_launch(c: &Cluster) -> Result<Outcome> {
    if let Some(skip) = needs_kind(c, "it kills processes inside the nodes") {
        return Ok(skip);
    }
    let Some(kind) = &c.kind else {
        return Ok(Outcome::Skipped("no kind harness".into()));
    };
    let delay = |ms: u64| {
        helm_upgrade_setting(c, kind, &format!("nodePlugin.sim.launchDelayMs={ms}"))?;
        c.get(&[
            "rollout",
            "status",
            &c.plugin_ds(),
            "-n",
            &c.namespace,
            "--timeout=180s",
        ])
        .map(|_| ())
    };
    type Step = fn(&(String, String, bool)) -> bool;
    let steps: [(&str, Step); 3] = [
        ("launcher pod created, not running yet", |v| {
            v.0 == "Pending"
        }),
        ("guest launching in its pod", |v| v.1 == "Launching"),
        ("guest running", |v| v.1 == "Running"),
    ];
    delay(2000)?;
    let result: Result<()> = (|| {
        let mut names = Vec::new();
        for (i, (step, at)) in steps.iter().enumerate() {
            let name = format!("kill-{i}");
            c.apply(&snp_cvm(&name, |_| {})?)?;
            until(Duration::from_secs(90), &format!("{name}: {step}"), || {
                at(&launch_view(c, &name))
            })?;
            let node = status_field(c, &name, "{.status.nodeName}");
            let before = launch_id(c, &name);
            let leader_node = c.jsonpath(
                &["get", "pod", "-n", &c.namespace, &c.leader()],
                "{.spec.nodeName}",
            )?;
            let t = Instant::now();
            for (n, comm) in [(&leader_node, "cvm-operator"), (&node, "cvm-node-plugin")] {
                kind.node_exec(n, &["pkill", "-9", "-x", comm])
                    .map_err(|e| SuiteError::Harness(format!("kill -9 {comm} on {n}: {e}")))?;
            }
            until(
                Duration::from_secs(180),
                &format!("{name} Verified after the kill at: {step}"),
                || verified(c, SUITE_NAMESPACE, &name),
            )?;
            let pods = c.get(&[
                "get",
                "pods",
                "-n",
                SUITE_NAMESPACE,
                "-l",
                &format!("cvmp.io/cvm={name}"),
                "-o",
                "name",
            ])?;
            check(pods.lines().count() == 1, || {
                format!("{name} has these launcher pods after the kill: {pods:?}")
            })?;
            if *step == "guest running" {
                let after = launch_id(c, &name);
                check(after == before, || {
                    format!("{name} ran before the kill (launch {before}) and was launched again ({after})")
                })?;
            }
            figure(
                &format!("kill -9 of operator and plugin at: {step}"),
                format!(
                    "Verified {:.1} s after the kill, one pod",
                    t.elapsed().as_secs_f64()
                ),
            );
            names.push(name);
        }
        for n in &names {
            delete_cvm(c, n)?;
        }
        let left = c.get(&[
            "get",
            "pods",
            "-n",
            SUITE_NAMESPACE,
            "-l",
            "cvmp.io/cvm",
            "-o",
            "name",
        ])?;
        let orphan_pods: Vec<&str> = left
            .lines()
            .filter(|l| names.iter().any(|n| l.ends_with(&format!("/{n}-launcher"))))
            .collect();
        check(orphan_pods.is_empty(), || {
            format!("launcher pods left after the CVMs were deleted: {orphan_pods:?}")
        })?;
        for node in sim_nodes(c)? {
            let (pod, _) = plugin_pod(c, &node)?;
            let orphans = plugin_metric(c, &pod, "cvm_node_plugin_guests_held{owned=\"false\"")?;
            check(orphans == 0.0, || {
                format!("{pod} holds {orphans} orphaned guests")
            })?;
        }
        Ok(())
    })();
    let restored = delay(0);
    result?;
    restored?;
    Ok(Outcome::Passed)
}

/// A launcher pod evicted, and a node drained: with `runStrategy: Always` the guest comes
/// back (a new launch, Verified; off the drained node, which the status names), with
/// `Manual` the CVM says its pod went and nothing replaces it.
fn check_evict_and_drain(c: &Cluster) -> Result<Outcome> {
    let always = "evict-always";
    let manual = "evict-manual";
    c.apply(&snp_cvm(always, |_| {})?)?;
    c.apply(&snp_cvm(manual, |v| {
        v.spec.run_strategy = cvm_crds::cvm::RunStrategy::Manual;
    })?)?;
    for n in [always, manual] {
        until(Duration::from_secs(120), &format!("{n} Verified"), || {
            verified(c, SUITE_NAMESPACE, n)
        })?;
    }
    let pod = |n: &str| cvm_operator::launcher::pod_name(n);

    // Evicted (no drain): Always relaunches in a new pod on the same node.
    let (first, node) = (
        launch_id(c, always),
        status_field(c, always, "{.status.nodeName}"),
    );
    let t = Instant::now();
    evict(c, SUITE_NAMESPACE, &pod(always))?;
    until(
        Duration::from_secs(120),
        "the evicted Always CVM Verified on a new launch",
        || {
            let id = launch_id(c, always);
            !id.is_empty() && id != first && verified(c, SUITE_NAMESPACE, always)
        },
    )?;
    figure(
        "launcher pod evicted -> Verified again (runStrategy Always)",
        format!("{:.1} s", t.elapsed().as_secs_f64()),
    );

    // Evicted under Manual: the CVM says so, and no pod comes back.
    evict(c, SUITE_NAMESPACE, &pod(manual))?;
    until(
        Duration::from_secs(120),
        "the Manual CVM saying its launcher pod went",
        || {
            condition(c, SUITE_NAMESPACE, manual, "Ready")
                == (
                    "False".into(),
                    cvm_crds::wellknown::REASON_LAUNCHER_GONE.into(),
                )
                && condition(c, SUITE_NAMESPACE, manual, "Launched").1
                    == cvm_crds::wellknown::REASON_LAUNCHER_GONE
        },
    )?;
    // The operator has read the plugin's report (Ready says so): had it made a pod, the
    // pod would exist by now.
    let left = c.get(&[
        "get",
        "pod",
        "-n",
        SUITE_NAMESPACE,
        &pod(manual),
        "--ignore-not-found",
        "-o",
        "name",
    ])?;
    check(left.trim().is_empty(), || {
        format!("runStrategy Manual got a new launcher pod after an eviction: {left}")
    })?;

    // Drained: the Always CVM moves off the node and says which node refused it.
    let node = {
        let now = status_field(c, always, "{.status.nodeName}");
        if now.is_empty() {
            node
        } else {
            now
        }
    };
    let t = Instant::now();
    let drained = c.get(&[
        "drain",
        &node,
        "--pod-selector",
        &format!("cvmp.io/cvm={always}"),
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--timeout=120s",
    ]);
    let moved = drained.and_then(|_| {
        until(
            Duration::from_secs(120),
            "the drained CVM Verified on another node",
            || {
                let on = status_field(c, always, "{.status.nodeName}");
                !on.is_empty() && on != node && verified(c, SUITE_NAMESPACE, always)
            },
        )
    });
    let _ = c.get(&["uncordon", &node]);
    moved?;
    figure(
        "node drained -> Verified on another node",
        format!("{:.1} s", t.elapsed().as_secs_f64()),
    );
    let refused = status_field(
        c,
        always,
        "{.status.refusedNodes[*].node} {.status.refusedNodes[*].reason}",
    );
    check(refused == format!("{node} NodeCordoned"), || {
        format!("status.refusedNodes after the drain: {refused:?}, wanted {node} NodeCordoned")
    })?;
    for n in [always, manual] {
        delete_cvm(c, n)?;
    }
    Ok(Outcome::Passed)
}

/// Delete the leader's pod: a standby takes the Lease and CVMs keep reconciling.
fn check_leader_failover(c: &Cluster) -> Result<Outcome> {
    let first = c.leader();
    check(!first.is_empty(), || "no operator holds the Lease".into())?;
    let t0 = Instant::now();
    c.get(&["delete", "pod", "-n", &c.namespace, &first, "--wait=false"])?;
    // A leader stopped by SIGTERM hands the Lease over before it exits: once its pod is
    // gone the Lease is no longer its own (it would be for up to the Lease's 15 s if it
    // had only stopped renewing).
    until(Duration::from_secs(90), "the old leader's pod gone", || {
        c.get(&["get", "pod", "-n", &c.namespace, &first, "-o", "name"])
            .is_err_and(|e| e.to_string().contains("NotFound"))
    })?;
    let held = c.leader();
    check(held != first, || {
        format!("{first} is gone but still holds the Lease: it did not release it on SIGTERM")
    })?;
    until(Duration::from_secs(90), "a new leader", || {
        let l = c.leader();
        !l.is_empty() && l != first
    })?;
    let failover = t0.elapsed();
    figure(
        "leader failover after its pod was deleted",
        format!("{:.1} s", failover.as_secs_f64()),
    );
    c.apply(&snp_cvm("after-failover", |_| {})?)?;
    let t = until(
        Duration::from_secs(120),
        "a CVM Verified under the new leader",
        || verified(c, SUITE_NAMESPACE, "after-failover"),
    )?;
    figure(
        "apply -> Verified under the new leader",
        format!("{:.2} s", t.as_secs_f64()),
    );
    Ok(Outcome::Passed)
}

/// `helm upgrade --wait` of the release from the local chart, keeping its values but one.
fn helm_upgrade_setting(c: &Cluster, kind: &Kind, set: &str) -> Result<()> {
    kind.helm_ok(&[
        "upgrade",
        &c.release,
        &crate::tools::chart_dir().display().to_string(),
        "-n",
        &c.namespace,
        "--wait",
        "--timeout",
        "5m",
        "--reuse-values",
        "--set",
        set,
    ])?;
    Ok(())
}

/// `helm upgrade` to a new image tag: the pods roll, every SEV-SNP/TDX CVM stays
/// Verified and answers fresh evidence through the new pods.
fn check_upgrade(c: &Cluster) -> Result<Outcome> {
    if let Some(skip) = needs_kind(c, "it loads a new image tag into the nodes") {
        return Ok(skip);
    }
    let Some(kind) = &c.kind else {
        return Ok(Outcome::Skipped("no kind harness".into()));
    };
    let before = verified_examples(c)?;
    // Ten more Verified guests: none may be relaunched by the upgrade.
    let ten: Vec<String> = (0..10).map(|i| format!("upg-{i}")).collect();
    for n in &ten {
        c.apply(&snp_cvm(n, |_| {})?)?;
    }
    for n in &ten {
        until(Duration::from_secs(180), &format!("{n} Verified"), || {
            verified(c, SUITE_NAMESPACE, n)
        })?;
    }
    let launches: Vec<String> = ten.iter().map(|n| launch_id(c, n)).collect();
    let tag = format!("{}-next", kind.image_tag);
    let mut images = Vec::new();
    for image in ["cvm-operator", "cvm-node-plugin", "cvm-launcher"] {
        let to = format!("{image}:{tag}");
        kind.tag_image(&format!("{image}:{}", kind.image_tag), &to)?;
        images.push(to);
    }
    kind.load(&images.iter().map(String::as_str).collect::<Vec<_>>())?;
    let t = Instant::now();
    helm_upgrade_setting(c, kind, &format!("image.tag={tag}"))?;
    figure(
        "helm upgrade --wait",
        format!("{:.1} s", t.elapsed().as_secs_f64()),
    );
    let rolled = until(Duration::from_secs(120), "only new-tag pods left", || {
        c.jsonpath(
            &["get", "pods", "-n", &c.namespace],
            "{.items[*].spec.containers[0].image}",
        )
        .is_ok_and(|images| {
            !images.is_empty()
                && images
                    .split_whitespace()
                    .all(|i| i.ends_with(&format!(":{tag}")))
        })
    })?;
    figure(
        "old pods gone after the upgrade",
        format!("{:.1} s", rolled.as_secs_f64()),
    );
    let after = verified_examples(c)?;
    check(before == after, || {
        format!("Verified CVMs before the upgrade {before:?}, after {after:?}")
    })?;
    check(verified(c, SUITE_NAMESPACE, "after-failover"), || {
        "after-failover stays Verified across the upgrade".into()
    })?;
    let still: Vec<String> = ten.iter().map(|n| launch_id(c, n)).collect();
    check(still == launches, || {
        format!("the upgrade relaunched guests: launch IDs before {launches:?}, after {still:?}")
    })?;
    check(ten.iter().all(|n| verified(c, SUITE_NAMESPACE, n)), || {
        "the ten CVMs stay Verified across the upgrade".into()
    })?;
    figure(
        "guests relaunched by the upgrade",
        format!("0 of {} (launch IDs unchanged)", ten.len()),
    );
    let t = Instant::now();
    reattest(c, SUITE_NAMESPACE, &ten)?;
    figure(
        "after the upgrade, fresh evidence (cvmp.io/reattest) verified",
        format!("{:.1} s ({} CVMs)", t.elapsed().as_secs_f64(), ten.len()),
    );
    // And the new pods answer: fresh evidence for each, verified again.
    let t = Instant::now();
    let names: Vec<String> = after.into_iter().map(|(n, _)| n).collect();
    reattest(c, "default", &names)?;
    figure(
        "after the upgrade, fresh evidence verified for every example",
        format!("{:.1} s ({} CVMs)", t.elapsed().as_secs_f64(), names.len()),
    );
    Ok(Outcome::Passed)
}

/// `helm uninstall`: the workloads go, the CRDs and the CVMs stay.
fn check_uninstall(c: &Cluster) -> Result<Outcome> {
    if let Some(skip) = needs_kind(
        c,
        "it removes the release (not done to a cluster it did not make)",
    ) {
        return Ok(skip);
    }
    let Some(kind) = &c.kind else {
        return Ok(Outcome::Skipped("no kind harness".into()));
    };
    kind.helm_ok(&["uninstall", &c.release, "-n", &c.namespace, "--wait"])?;
    let left = c.get(&["get", "deploy,ds", "-n", &c.namespace, "-o", "name"])?;
    check(left.trim().is_empty(), || {
        format!("left after uninstall: {left}")
    })?;
    let cvms = c.get(&["get", "cvm", "-n", SUITE_NAMESPACE, "-o", "name"])?;
    check(cvms.contains("after-failover"), || {
        format!("the CVMs stay after uninstall: {cvms}")
    })?;
    Ok(Outcome::Passed)
}
