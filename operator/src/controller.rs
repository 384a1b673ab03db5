//! The reconciler: dereference → (finalizer) → place → observe node → verify → write
//! status. Decisions are the pure functions of `schedule`, `state` and `verify`; this
//! module only reads snapshots and writes results.

use crate::error::{kube as kerr, Error, Result};
use crate::launcher;
use crate::metrics::Metrics;
use crate::migrate;
use crate::schedule::{self, Decision, NodeInfo, Placed, Request};
use crate::state::{self, NodeHealth, Observed, OperatorStatus, Placement, Verification};
use crate::verify;
use cvm_crds::conditions::{self, STATUS_TRUE};
use cvm_crds::cvm::GuestState;
use cvm_crds::policy::AttestationPolicySpec;
use cvm_crds::wellknown::{
    tee_resource, ANNOTATION_MIGRATED_AT, ANNOTATION_MIGRATION, FINALIZER, LABEL_NODE,
    MANAGER_OPERATOR,
};
use cvm_crds::{
    AttestationPolicy, ConditionType, ConfidentialVM, ConfidentialVMMigration, CvmPhase, HostPin,
    HostPinSpec, MigrationPhase, PinSource,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::error_boundary::InvalidObject;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Shared state of all reconciles (CVMs and migrations).
pub struct Context {
    pub client: Client,
    pub nodes: Store<Node>,
    /// AttestationPolicies as watched.
    pub policies: Store<AttestationPolicy>,
    /// Every CVM as watched; one the Rust type cannot read is kept as what it is
    /// (`Err`), so that it becomes a status instead of breaking the watch.
    pub cvms: Store<DeserializeGuard<ConfidentialVM>>,
    /// Each node's pinned hardware identity (docs/evidence-binding.md).
    pub host_pins: Store<HostPin>,
    /// Migrations, for the capacity their targets hold.
    pub migrations: Store<ConfidentialVMMigration>,
    /// Serialises placement (of CVMs and of migration targets), and remembers decisions
    /// the cache has not shown yet, so that two reconciles never hand out the same last ASID.
    pub assumed: tokio::sync::Mutex<Assumed>,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// Signals that capacity was freed, so pending CVMs are retried at once.
    pub freed: futures::channel::mpsc::UnboundedSender<()>,
    /// How long a migration may take to switch (`--migration-timeout`).
    pub migration_timeout: Duration,
    /// Launcher pods for placed CVMs (`--launcher-image`); `None`: none.
    pub launcher: Option<crate::launcher::LauncherOptions>,
    /// The CVMs whose time to Verified is observed, so that each counts once however
    /// many (stale) views reconcile its transition.
    pub verified_once: std::sync::Mutex<crate::metrics::VerifiedOnce>,
}

impl Context {
    /// A node as placement sees it. With launcher pods, kube-scheduler checks cpu and
    /// memory through the pod's requests (vCPUs at the allocation ratio, not one core
    /// each): placement decides TEE, keys, TCB and selectors only.
    pub fn for_placement(&self, mut n: NodeInfo) -> NodeInfo {
        if self.launcher.is_some() {
            n.cpus = u64::from(u32::MAX);
            n.memory_mib = u64::from(u32::MAX);
        }
        n
    }
}

/// Placement decisions not yet in the cache.
#[derive(Debug, Default)]
pub struct Assumed {
    /// CVM bindings, by CVM key.
    pub cvms: HashMap<String, Placed>,
    /// Migration targets, by migration key.
    pub targets: HashMap<String, Placed>,
}

/// The CVMs of the cache that deserialized (the others reconcile into a status only).
pub(crate) fn readable(all: &[Arc<DeserializeGuard<ConfidentialVM>>]) -> Vec<&ConfidentialVM> {
    all.iter().filter_map(|g| g.0.as_ref().ok()).collect()
}

pub(crate) fn key(cvm: &ConfidentialVM) -> String {
    format!(
        "{}/{}/{}",
        cvm.namespace().unwrap_or_default(),
        cvm.name_any(),
        cvm.metadata.uid.as_deref().unwrap_or_default()
    )
}

pub(crate) fn migration_key(m: &ConfidentialVMMigration) -> String {
    format!(
        "migration/{}/{}/{}",
        m.namespace().unwrap_or_default(),
        m.name_any(),
        m.metadata.uid.as_deref().unwrap_or_default()
    )
}

/// Reads a Node into the scheduler's plain view.
pub fn node_info(n: &Node) -> NodeInfo {
    let status = n.status.as_ref();
    let alloc = status.and_then(|s| s.allocatable.as_ref());
    let qty = |name: &str| alloc.and_then(|a| a.get(name)).map(|q| q.0.clone());
    let cpus = qty("cpu").and_then(|c| parse_cpu(&c)).unwrap_or(0);
    let memory_mib = qty("memory").and_then(|m| parse_mem_mib(&m)).unwrap_or(0);
    let mut slots = std::collections::BTreeMap::new();
    for r in [
        cvm_crds::wellknown::RESOURCE_SEV_ASIDS,
        cvm_crds::wellknown::RESOURCE_SNP_ESIDS,
        cvm_crds::wellknown::RESOURCE_TDX_KEYS,
    ] {
        if let Some(v) = qty(r).and_then(|v| v.parse::<u64>().ok()) {
            slots.insert(r.to_string(), v);
        }
    }
    NodeInfo {
        name: n.name_any(),
        ready: node_ready(n),
        unschedulable: n
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false),
        labels: n.labels().clone(),
        cpus,
        memory_mib,
        slots,
    }
}

fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == STATUS_TRUE)
}

/// Whole CPUs from a Kubernetes CPU quantity ("64", "3500m").
pub fn parse_cpu(q: &str) -> Option<u64> {
    match q.strip_suffix('m') {
        Some(milli) => milli.parse::<u64>().ok().map(|m| m / 1000),
        None => q.parse::<f64>().ok().map(|c| c.floor() as u64),
    }
}

/// MiB from a memory quantity ("256Gi", "1024Mi", "2147483648", "4G").
pub fn parse_mem_mib(q: &str) -> Option<u64> {
    const UNITS: [(&str, f64); 8] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    for (suffix, mult) in UNITS {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|v| (v * mult / 1048576.0) as u64);
        }
    }
    q.parse::<f64>().ok().map(|v| (v / 1048576.0) as u64)
}

fn placed_of(cvm: &ConfidentialVM) -> Option<Placed> {
    Some(Placed::of(cvm, cvm.node_name()?))
}

pub(crate) fn request(cvm: &ConfidentialVM) -> Request {
    Request {
        tee: cvm.tee_type(),
        vcpus: cvm.spec.resources.vcpus,
        memory_mib: u64::from(cvm.spec.resources.memory_mib),
        node_selector: cvm.spec.node_selector.clone(),
        avoid: launcher::avoided(cvm, Timestamp::now().as_second()),
    }
}

/// Capacity in use, for a decision under the placement lock: CVMs bound in the cache,
/// bindings and migration targets decided but not in the cache yet, and the targets that
/// migrations in progress hold. Leaves out `except` (the CVM or migration deciding).
pub(crate) fn occupied(ctx: &Context, assumed: &mut Assumed, except: &str) -> Vec<Placed> {
    let all = ctx.cvms.state();
    let cached = readable(&all);
    let bound_in_cache: HashMap<String, Placed> = cached
        .iter()
        .filter_map(|c| placed_of(c).map(|p| (key(c), p)))
        .collect();
    let live: HashSet<String> = cached.iter().map(|c| key(c)).collect();
    // Forget assumptions the cache now shows, or whose CVM is gone.
    assumed
        .cvms
        .retain(|k, _| live.contains(k) && !bound_in_cache.contains_key(k));

    let by_name: HashMap<(String, String), &ConfidentialVM> = cached
        .iter()
        .map(|c| ((c.namespace().unwrap_or_default(), c.name_any()), *c))
        .collect();
    let mut holds: HashMap<String, Placed> = HashMap::new();
    let mut target_unseen: HashSet<String> = HashSet::new();
    for m in ctx.migrations.state() {
        let st = m.status.as_ref();
        if st
            .and_then(|s| s.phase)
            .is_some_and(MigrationPhase::is_terminal)
        {
            continue;
        }
        let k = migration_key(&m);
        if st.and_then(|s| s.target_node.as_ref()).is_none() {
            target_unseen.insert(k.clone());
        }
        let cvm = by_name
            .get(&(m.namespace().unwrap_or_default(), m.spec.cvm_name.clone()))
            .copied();
        if let Some(p) = migrate::target_hold(&m, cvm) {
            holds.insert(k, p);
        }
    }
    // Forget assumed targets the cache now shows, or whose migration ended or is gone.
    assumed.targets.retain(|k, _| target_unseen.contains(k));

    bound_in_cache
        .into_iter()
        .chain(assumed.cvms.iter().map(|(k, p)| (k.clone(), p.clone())))
        .chain(holds)
        .chain(assumed.targets.iter().map(|(k, p)| (k.clone(), p.clone())))
        .filter(|(k, _)| k != except)
        .map(|(_, p)| p)
        .collect()
}

/// Decides where the CVM goes, under the placement lock.
/// Places an unbound CVM: a plain decision under the placement lock, remembered as an
/// assumption until the cache shows the binding, which this pass's status write carries
/// (so a pass that sees the CVM unbound again before that, or fails after deciding, keeps
/// the same node and never takes a second key).
async fn place(cvm: &ConfidentialVM, ctx: &Context) -> Placement {
    let mut assumed = ctx.assumed.lock().await;
    let me = key(cvm);
    let placed = occupied(ctx, &mut assumed, &me);
    let req = request(cvm);
    match assumed.cvms.get(&me) {
        Some(p) if !req.avoid.contains(&p.node) => return Placement::Bound(p.node.clone()),
        // A node that refused it since: decided again.
        Some(_) => {
            assumed.cvms.remove(&me);
        }
        None => {}
    }
    let nodes: Vec<NodeInfo> = ctx
        .nodes
        .state()
        .iter()
        .map(|n| ctx.for_placement(node_info(n)))
        .collect();
    match schedule::schedule(&req, &nodes, &placed) {
        Decision::Bind(node) => {
            assumed.cvms.insert(me, Placed::of(cvm, &node));
            info!(cvm = %cvm.name_any(), node = %node, phase = "Scheduled", resource = tee_resource(cvm.tee_type()), "bound");
            Placement::Bound(node)
        }
        Decision::Unschedulable(why) => Placement::Unschedulable(why.to_string()),
    }
}

/// What the operator's own checks find wrong with the CVM's spec (rules the CRD's
/// schema and CEL cannot state), as one message; `None`: it is valid.
fn invalid_spec(cvm: &ConfidentialVM) -> Option<String> {
    use cvm_crds::validate::Validate;
    cvm.spec.validate().err().map(|errors| {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })
}

async fn ensure_label(cvm: &ConfidentialVM, api: &Api<ConfidentialVM>, node: &str) -> Result<()> {
    if cvm.labels().get(LABEL_NODE).map(String::as_str) == Some(node) {
        return Ok(());
    }
    let body = json!({"metadata": {"labels": {LABEL_NODE: node}}});
    api.patch(
        &cvm.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&body),
    )
    .await
    .map_err(kerr(format!("labelling {}", cvm.name_any())))?;
    Ok(())
}

/// Labels and annotates the CVM for the target of a switched migration (`status.nodeName`
/// follows in the status write). Guarded by the view's resourceVersion: a view older than
/// the object is refused with a conflict and retried on a fresh one.
async fn bind_after_switch(
    cvm: &ConfidentialVM,
    api: &Api<ConfidentialVM>,
    sw: &migrate::Switch,
) -> Result<()> {
    let shown = cvm.labels().get(LABEL_NODE) == Some(&sw.node)
        && cvm.migration_epoch() == Some(sw.migration.as_str());
    if shown {
        return Ok(());
    }
    let body = json!({"metadata": {
        "resourceVersion": cvm.resource_version(),
        "labels": {LABEL_NODE: &sw.node},
        "annotations": {
            ANNOTATION_MIGRATED_AT: migrate::format_migrated_at(sw.at),
            ANNOTATION_MIGRATION: &sw.migration,
        },
    }});
    api.patch(
        &cvm.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&body),
    )
    .await
    .map_err(kerr(format!(
        "binding {} to node {} after live migration {}",
        cvm.name_any(),
        sw.node,
        sw.migration
    )))?;
    info!(cvm = %cvm.name_any(), node = %sw.node, from = cvm.node_name().unwrap_or(""), migration = %sw.migration, phase = "Switched", "bound to the live migration's target");
    Ok(())
}

/// The policy `name` from the watched cache (the watch that fills it also wakes the CVMs
/// that name a policy when it changes).
pub(crate) fn load_policy(name: &str, ctx: &Context) -> Option<AttestationPolicy> {
    ctx.policies
        .get(&ObjectRef::new(name))
        .map(|p| p.as_ref().clone())
}

pub(crate) fn policy_not_found(name: &str) -> String {
    format!("AttestationPolicy {name} does not exist: create it or fix spec.attestation.policyRef")
}

/// The verification to record, keeping an unchanged earlier verdict (and its time), and
/// what the appraisal asks to record beyond the status (pins, alerts).
struct Verdict {
    verification: Verification,
    appraised: Option<verify::Appraised>,
    /// The appraisal's result differs from the recorded one (counted in the metrics).
    changed: bool,
}

impl From<Verification> for Verdict {
    fn from(verification: Verification) -> Self {
        Verdict {
            verification,
            appraised: None,
            changed: false,
        }
    }
}

/// The operator's host pins, as the appraisal reads them.
pub(crate) fn host_pin_views(ctx: &Context) -> Vec<verify::HostPinView> {
    ctx.host_pins
        .state()
        .iter()
        .map(|p| verify::HostPinView {
            node: p.name_any(),
            kind: p.spec.kind,
            id: p.spec.id.to_ascii_lowercase(),
            source: p.spec.source.as_str(),
        })
        .collect()
}

/// `(namespace/name, keySha256)` of every other CVM's pinned guest instance.
fn other_instances(cvm: &ConfidentialVM, ctx: &Context) -> Vec<(String, String)> {
    let me = cvm.metadata.uid.as_deref();
    let all = ctx.cvms.state();
    readable(&all)
        .into_iter()
        .filter(|c| c.metadata.uid.as_deref() != me)
        .filter_map(|c| {
            let pin = c.status.as_ref()?.guest_instance.as_ref()?;
            Some((
                format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any()),
                pin.key_sha256.clone(),
            ))
        })
        .collect()
}

/// What the CVM's evidence is worth under its policy: a plain function of the CVM, its
/// policy as cached (`None` inside: named but missing), the records other objects hold,
/// and the time.
fn verification(
    cvm: &ConfidentialVM,
    policy: Option<(&str, Option<&AttestationPolicySpec>)>,
    records: verify::Records<'_>,
    now: Timestamp,
) -> Verdict {
    let status = cvm.status.clone().unwrap_or_default();
    let Some(evidence) = status.evidence.as_ref() else {
        return Verification::Awaiting("waiting for the node plugin to report evidence".into())
            .into();
    };
    // After a migration, evidence must bind the migration (its report data proves it; the
    // plugin's echo only says whether to wait for it).
    let migration = cvm.migration_epoch();
    if migration.is_some() && evidence.epoch.as_deref() != migration {
        return Verification::Awaiting(format!(
            "waiting for evidence from node {} bound to live migration {}",
            cvm.node_name().unwrap_or("(none)"),
            migration.unwrap_or_default()
        ))
        .into();
    }
    if !cvm.evidence_answers_nonce() {
        return Verification::Awaiting(format!(
            "waiting for fresh evidence answering nonce {}",
            cvm.nonce().unwrap_or_default()
        ))
        .into();
    }
    let policy = match policy {
        None => None,
        Some((name, Some(spec))) => Some((name, spec)),
        Some((name, None)) => {
            return Verification::PolicyProblem {
                reason: state::VerdictReason::PolicyNotFound,
                message: policy_not_found(name),
            }
            .into()
        }
    };
    let appraised = verify::appraise(&verify::Input {
        cvm,
        policy,
        evidence,
        now,
        subject: verify::Subject::Cvm,
        node: cvm.node_name().unwrap_or_default(),
        records,
        migration,
    });
    let (result, changed) = match status.attestation {
        Some(old) if verify::same_verdict(&old, &appraised.result) => (old, false),
        _ => (appraised.result.clone(), true),
    };
    Verdict {
        verification: Verification::Result {
            result: Box::new(result),
            instance: appraised.instance.clone(),
        },
        appraised: Some(appraised),
        changed,
    }
}

/// Records what an appraisal asks beyond the status: a first-use host pin (created, never
/// overwritten: an existing pin, an administrator's above all, wins), and alerts.
async fn record_appraisal(ctx: &Context, cvm: &ConfidentialVM, a: &verify::Appraised) {
    let node = cvm.node_name().unwrap_or_default();
    if let Some(hw) = &a.pin_host {
        let pin = HostPin::new(
            node,
            HostPinSpec {
                kind: hw.kind,
                id: hw.id.clone(),
                source: PinSource::FirstUse,
                first_seen_from: Some(key(cvm)),
            },
        );
        let api: Api<HostPin> = Api::all(ctx.client.clone());
        match api.create(&PostParams::default(), &pin).await {
            Ok(_) => {
                info!(cvm = %key(cvm), node, kind = hw.kind.as_str(), id = %hw.id, "pinned the node's hardware identity on first use");
                ctx.metrics
                    .host_pins
                    .with_label_values(&["first_use"])
                    .inc();
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // Pinned meanwhile (another CVM on the node, or an administrator): the
                // next pass checks against that pin.
                tracing::debug!(cvm = %key(cvm), node, "HostPin exists already");
            }
            Err(e) => {
                warn!(cvm = %key(cvm), node, error = %e, "creating the HostPin failed; retried on the next pass")
            }
        }
    }
    let already_refused = cvm
        .status
        .as_ref()
        .and_then(|s| s.attestation.as_ref())
        .is_some_and(|r| {
            r.findings
                .iter()
                .any(|f| f.check == "hardware-pinned-to-other-node")
        });
    if let Some(other) = a.host_conflict.as_ref().filter(|_| !already_refused) {
        ctx.metrics.host_pins.with_label_values(&["conflict"]).inc();
        warn!(cvm = %key(cvm), node, pinned_to = %other, "evidence from hardware pinned to another node");
        publish(
            ctx,
            cvm,
            EventType::Warning,
            "HostIdentityConflict",
            format!("node {node} presented evidence from the hardware pinned to node {other}; refused (one chip serves one node)"),
        )
        .await;
    }
    if let (Some((previous, why)), Some(pin)) = (&a.repinned, &a.instance) {
        ctx.metrics
            .host_pins
            .with_label_values(&["instance_repinned"])
            .inc();
        info!(cvm = %key(cvm), node, previous = %previous, instance = %pin.key_sha256, reason = why.reason(), "guest instance re-pinned");
        publish(
            ctx,
            cvm,
            EventType::Normal,
            why.reason(),
            format!(
                "evidence now comes from guest instance {} (previously {}); relaunches: {}",
                pin.key_sha256, previous, pin.relaunches
            ),
        )
        .await;
    }
}

fn node_health(name: &str, ctx: &Context) -> NodeHealth {
    match ctx.nodes.get(&ObjectRef::new(name)) {
        None => NodeHealth::Missing,
        Some(n) if node_ready(&n) => NodeHealth::Ready,
        Some(_) => NodeHealth::NotReady,
    }
}

fn current_operator_view(cvm: &ConfidentialVM, derived: &OperatorStatus) -> bool {
    let Some(s) = cvm.status.as_ref() else {
        return false;
    };
    let mut mine: Vec<_> = s
        .conditions
        .iter()
        .filter(|c| {
            state::OPERATOR_CONDITIONS
                .iter()
                .any(|t| t.as_str() == c.type_)
        })
        .cloned()
        .collect();
    let mut want = derived.conditions.clone();
    mine.sort_by(|a, b| a.type_.cmp(&b.type_));
    want.sort_by(|a, b| a.type_.cmp(&b.type_));
    s.phase == Some(derived.phase)
        && s.node_name == derived.node_name
        && s.observed_generation == derived.observed_generation
        && s.attestation == derived.attestation
        && s.guest_instance == derived.guest_instance
        && s.refused_nodes == derived.refused_nodes
        && mine == want
}

async fn write_status(
    cvm: &ConfidentialVM,
    api: &Api<ConfidentialVM>,
    st: &OperatorStatus,
) -> Result<()> {
    if current_operator_view(cvm, st) {
        return Ok(());
    }
    apply_status(api, &cvm.name_any(), st).await
}

/// Server-side apply of the operator's share of an object's status (field manager
/// `cvm-operator`, forced: the operator is the one writer of these fields). What the
/// share leaves out, the apply removes: callers send all of it.
pub(crate) async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    status: &impl serde::Serialize,
) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let kind = K::kind(&());
    let body = json!({"apiVersion": K::api_version(&()), "kind": kind, "status": status});
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER_OPERATOR).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(kerr(format!("writing the status of {kind} {name}")))?;
    Ok(())
}

async fn publish(
    ctx: &Context,
    cvm: &ConfidentialVM,
    type_: EventType,
    reason: &str,
    note: String,
) {
    publish_on(ctx, cvm, "Reconcile", type_, reason, note).await
}

/// An event on `obj` (its note cut to the API's 1 kB); a failure to publish is logged, not
/// returned: events inform, they decide nothing.
pub(crate) async fn publish_on<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    obj: &K,
    action: &str,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
        warn!(object = %obj.meta().name.as_deref().unwrap_or(""), kind = %K::kind(&()), error = %e, "publishing an event failed");
    }
}

/// Emits events and metrics for transitions between the old and new status.
async fn on_transitions(ctx: &Context, cvm: &ConfidentialVM, st: &OperatorStatus, now: Timestamp) {
    let old = cvm.status.clone().unwrap_or_default();
    let old_cond = |t: ConditionType| {
        conditions::find(&old.conditions, t.as_str()).map(|c| (c.status.clone(), c.reason.clone()))
    };
    let new_cond = |t: ConditionType| st.conditions.iter().find(|c| c.type_ == t.as_str());
    if let Some(v) = new_cond(ConditionType::Verified) {
        if old_cond(ConditionType::Verified) != Some((v.status.clone(), v.reason.clone())) {
            match v.status.as_str() {
                "True" => publish(ctx, cvm, EventType::Normal, "Verified", v.message.clone()).await,
                "False" => {
                    publish(ctx, cvm, EventType::Warning, &v.reason, v.message.clone()).await
                }
                _ => {}
            }
        }
    }
    if let Some(s) = new_cond(ConditionType::Scheduled) {
        if s.status == "False"
            && old_cond(ConditionType::Scheduled) != Some((s.status.clone(), s.reason.clone()))
        {
            publish(
                ctx,
                cvm,
                EventType::Warning,
                "FailedScheduling",
                s.message.clone(),
            )
            .await;
        }
        if s.status == "True"
            && old_cond(ConditionType::Scheduled).map(|c| c.0) != Some("True".into())
        {
            publish(ctx, cvm, EventType::Normal, "Scheduled", s.message.clone()).await;
        }
    }
    if first_verified(ctx, cvm, old.phase, st.phase) {
        if let Some(created) = cvm.metadata.creation_timestamp.as_ref() {
            let secs = now.duration_since(created.0).as_secs_f64();
            ctx.metrics.time_to_verified.observe(secs.max(0.0));
            info!(cvm = %cvm.name_any(), node = st.node_name.as_deref().unwrap_or(""), phase = "Verified", seconds = secs, "verified");
        }
    }
}

/// Reconciles one CVM as the watch gave it: one the Rust type cannot read gets a status
/// saying why (its spec must be fixed), and every other CVM reconciles as usual.
pub async fn reconcile(
    guard: Arc<DeserializeGuard<ConfidentialVM>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    match &guard.0 {
        Ok(cvm) => reconcile_cvm(Arc::new(cvm.clone()), ctx).await,
        Err(invalid) => unreadable(invalid, &ctx).await,
    }
}

/// The status of a CVM the operator cannot read: Ready False and Stalled True with
/// reason `InvalidObject` and the reader's words. A deletion is let through (nothing
/// about its guest can be known; its node plugin cannot read it either).
async fn unreadable(invalid: &InvalidObject, ctx: &Context) -> Result<Action> {
    let meta = &invalid.metadata;
    let (Some(ns), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref()) else {
        return Ok(Action::await_change());
    };
    let api: Api<ConfidentialVM> = Api::namespaced(ctx.client.clone(), ns);
    let has_finalizer = meta.finalizers.iter().flatten().any(|f| f == FINALIZER);
    if meta.deletion_timestamp.is_some() && has_finalizer {
        let rest: Vec<String> = meta
            .finalizers
            .iter()
            .flatten()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        let patch =
            json!({"metadata": {"finalizers": rest, "resourceVersion": meta.resource_version}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(kerr(format!("removing the finalizer of unreadable {name}")))?;
        warn!(cvm = %name, phase = "Terminating", error = %invalid.error, "an unreadable ConfidentialVM is deleted: finalizer removed without knowing its guest");
        return Ok(Action::await_change());
    }
    let message = format!(
        "the operator cannot read this ConfidentialVM ({}): fix the object (kubectl get confidentialvm {name} -n {ns} -o yaml)",
        invalid.error
    );
    // Said already (the write's own event brings the object back): nothing to do. Read
    // untyped, as the typed reader fails on it.
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        ns,
        &kube::api::ApiResource::erase::<ConfidentialVM>(&()),
    );
    let current = raw
        .get_opt(name)
        .await
        .map_err(kerr(format!("reading unreadable {name}")))?;
    let said = current.is_some_and(|o| {
        o.data["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| {
                c["type"] == "Stalled" && c["reason"] == "InvalidObject" && c["message"] == message
            })
    });
    if said {
        return Ok(Action::await_change());
    }
    let now = Time(Timestamp::now());
    let cond = |type_: ConditionType, status: &str| {
        json!({
            "type": type_.as_str(), "status": status, "reason": "InvalidObject",
            "message": message, "lastTransitionTime": now, "observedGeneration": meta.generation,
        })
    };
    let status = json!({
        "phase": CvmPhase::Pending,
        "observedGeneration": meta.generation,
        "conditions": [
            cond(ConditionType::Ready, "False"),
            cond(ConditionType::Stalled, "True"),
            cond(ConditionType::Reconciling, "False"),
        ],
    });
    apply_status(&api, name, &status).await?;
    warn!(cvm = %name, phase = "Pending", error = %invalid.error, "a ConfidentialVM the operator cannot read");
    Ok(Action::await_change())
}

/// How often a deletion looks again whether the guest has stopped.
const DELETION_RECHECK: Duration = Duration::from_secs(5);

/// A readable CVM: the finalizer (kube's helper: added before anything runs, removed once
/// [`released`] says the guest and its pod are gone), then the same pass either way.
async fn reconcile_cvm(cvm: Arc<ConfidentialVM>, ctx: Arc<Context>) -> Result<Action> {
    let ns = cvm.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<ConfidentialVM> = Api::namespaced(ctx.client.clone(), &ns);
    let deleting = cvm.metadata.deletion_timestamp.is_some();
    let action = finalizer(&api, FINALIZER, cvm.clone(), |event| async {
        match event {
            FinalizerEvent::Apply(cvm) => converge(&cvm, &api, &ctx).await,
            FinalizerEvent::Cleanup(cvm) => {
                converge(&cvm, &api, &ctx).await?;
                released(&cvm, &ctx).await
            }
        }
    })
    .await
    .map_err(Error::from)?;
    if deleting {
        // Its key and capacity are free: CVMs waiting for them are looked at again.
        let _ = ctx.freed.unbounded_send(());
        info!(cvm = %cvm.name_any(), node = cvm.node_name().unwrap_or(""), phase = "Terminating", "guest stopped; finalizer removed");
    }
    Ok(action)
}

/// Whether a deleted CVM may go: its guest stopped, then its launcher pod went (a vanished
/// node's pod is never confirmed gone: it does not block; nor does a CVM never bound).
/// `Err(Waiting)` keeps the finalizer.
async fn released(cvm: &ConfidentialVM, ctx: &Context) -> Result<Action> {
    let Some(node) = cvm.node_name() else {
        return Ok(Action::await_change());
    };
    if node_health(node, ctx) == NodeHealth::Missing {
        return Ok(Action::await_change());
    }
    let guest_stopped = cvm
        .status
        .as_ref()
        .and_then(|s| s.platform.as_ref())
        .and_then(|p| p.guest_state)
        .is_none_or(|g| matches!(g, GuestState::Stopped | GuestState::Failed));
    if !(guest_stopped && launched_ever(cvm)) {
        return Err(Error::Waiting(format!(
            "{} is deleted: waiting for the node plugin on {node} to stop its guest",
            cvm.name_any()
        )));
    }
    let pod_gone = match &ctx.launcher {
        Some(_) => delete_launcher(cvm, ctx).await?,
        None => true,
    };
    if !pod_gone {
        return Err(Error::Waiting(format!(
            "{} is deleted: its guest stopped, waiting for its launcher pod to go",
            cvm.name_any()
        )));
    }
    Ok(Action::await_change())
}

/// One pass over a CVM, deleted or not: bind it, give it its launcher pod (or place it
/// again off a node that refused the pod), appraise its evidence, then derive, write and
/// tell its status.
async fn converge(
    cvm: &Arc<ConfidentialVM>,
    api: &Api<ConfidentialVM>,
    ctx: &Context,
) -> Result<Action> {
    let now = Timestamp::now();
    let placement = bind(cvm, api, ctx).await?;
    let (placement, launcher, refused_nodes) = run_in_pod(cvm, placement, ctx, now).await?;
    let verification = appraise(cvm, ctx, now).await;
    let node = match &placement {
        Placement::Bound(n) => Some(node_health(n, ctx)),
        Placement::Unschedulable(_) | Placement::Invalid(_) => None,
    };
    let st = state::derive(&Observed {
        cvm,
        placement,
        node,
        verification,
        deleting: cvm.metadata.deletion_timestamp.is_some(),
        launcher,
        now: Time(now),
    });
    let st = match refused_nodes {
        Some(refused_nodes) => OperatorStatus {
            refused_nodes,
            ..st
        },
        None => st,
    };
    on_transitions(ctx, cvm, &st, now).await;
    write_status(cvm, api, &st).await?;
    ctx.metrics.reconciles.with_label_values(&["ok"]).inc();
    Ok(match st.phase {
        CvmPhase::Pending => Action::requeue(Duration::from_secs(30)),
        CvmPhase::Terminating => Action::requeue(Duration::from_secs(5)),
        // Re-appraise each minute: evidence ages past the policy's maxEvidenceAge
        // without any event to say so.
        _ => Action::requeue(Duration::from_secs(60)),
    })
}

/// The binding: this reconciler is its only writer. A live migration that switched moves
/// it to the target; otherwise it stays where placement put it. An invalid spec is never
/// placed.
async fn bind(cvm: &ConfidentialVM, api: &Api<ConfidentialVM>, ctx: &Context) -> Result<Placement> {
    let switch = migrate::switched_binding(cvm, &ctx.migrations.state());
    let placement = match (&switch, cvm.node_name()) {
        (Some(sw), _) => Placement::Bound(sw.node.clone()),
        (None, Some(n)) => Placement::Bound(n.to_string()),
        (None, None) if cvm.metadata.deletion_timestamp.is_some() => {
            Placement::Unschedulable("deleted before it was scheduled".into())
        }
        (None, None) => match invalid_spec(cvm) {
            Some(why) => Placement::Invalid(why),
            None => place(cvm, ctx).await,
        },
    };
    match (&switch, &placement) {
        (Some(sw), _) => bind_after_switch(cvm, api, sw).await?,
        (None, Placement::Bound(node)) => ensure_label(cvm, api, node).await?,
        (None, Placement::Unschedulable(_) | Placement::Invalid(_)) => {}
    }
    Ok(placement)
}

/// The bound CVM's launcher pod, as [`launcher::pod_action`] decides, and what it reads.
/// A node that refused the pod (or was drained under it) lets the CVM go: the placement
/// becomes a wait to be placed again without that node, and the refusals to record come
/// back too.
async fn run_in_pod(
    cvm: &ConfidentialVM,
    placement: Placement,
    ctx: &Context,
    now: Timestamp,
) -> Result<(
    Placement,
    Option<launcher::PodReading>,
    Option<Vec<cvm_crds::cvm::RefusedNode>>,
)> {
    let (Some(o), Placement::Bound(n)) = (&ctx.launcher, &placement) else {
        return Ok((placement, None, None));
    };
    if cvm.metadata.deletion_timestamp.is_some() {
        return Ok((placement, None, None));
    }
    let (reading, pod) = ensure_launcher(cvm, n, o, ctx).await?;
    let cordoned = ctx
        .nodes
        .get(&ObjectRef::new(n))
        .is_some_and(|node| node_info(&node).unschedulable);
    // A switched migration's binding is the migration's to move, not a refusal's.
    let switched = migrate::switched_binding(cvm, &ctx.migrations.state()).is_some();
    let refusal = (!switched)
        .then(|| {
            launcher::refusal(
                pod.as_ref(),
                &reading,
                cvm.spec.run_strategy,
                n,
                cordoned,
                now.as_second(),
            )
        })
        .flatten();
    let Some((reason, message)) = refusal else {
        return Ok((placement, Some(reading), None));
    };
    let gone = delete_launcher(cvm, ctx).await?;
    // Its binding there is over, and so is any assumption of it.
    ctx.assumed.lock().await.cvms.remove(&key(cvm));
    warn!(cvm = %cvm.name_any(), node = %n, phase = "Scheduled", %reason, %message, pod_gone = gone, "the node refused the launcher pod: placing the CVM again without it");
    let existing = cvm
        .status
        .as_ref()
        .map(|s| s.refused_nodes.clone())
        .unwrap_or_default();
    let refused = launcher::refused_after(&existing, n, &reason, &message, &Time(now));
    let again = Placement::Unschedulable(format!(
        "placing it again: node {n} refused its launcher pod ({reason}: {message})"
    ));
    Ok((again, None, Some(refused)))
}

/// The CVM's evidence appraised under its policy, from the caches (the appraisal itself is
/// [`verification`], a plain function); a new result is counted and recorded.
async fn appraise(cvm: &ConfidentialVM, ctx: &Context, now: Timestamp) -> Verification {
    let policy = cvm
        .policy_ref()
        .map(|name| (name, load_policy(name, ctx).map(|p| p.spec)));
    let (pins, others) = (host_pin_views(ctx), other_instances(cvm, ctx));
    let verdict = verification(
        cvm,
        policy.as_ref().map(|(n, p)| (*n, p.as_ref())),
        verify::Records {
            host_pins: &pins,
            other_instances: &others,
        },
        now,
    );
    if let (true, Some(a)) = (verdict.changed, &verdict.appraised) {
        ctx.metrics
            .verifications
            .with_label_values(&[&format!("{:?}", a.result.status).to_lowercase()])
            .inc();
    }
    if let Some(a) = &verdict.appraised {
        record_appraisal(ctx, cvm, a).await;
    }
    verdict.verification
}

/// Makes sure the placed CVM has its launcher pod on `node` (as [`launcher::pod_action`]
/// decides), and reads it.
async fn ensure_launcher(
    cvm: &ConfidentialVM,
    node: &str,
    o: &launcher::LauncherOptions,
    ctx: &Context,
) -> Result<(launcher::PodReading, Option<Pod>)> {
    let ns = cvm.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let name = launcher::pod_name(&cvm.name_any());
    let found = pods
        .get_opt(&name)
        .await
        .map_err(kerr(format!("reading pod {name}")))?;
    let (action, reading) = launcher::pod_action(
        found.as_ref(),
        node,
        cvm.spec.run_strategy,
        launcher::launcher_gone(cvm),
    );
    match action {
        launcher::PodAction::Keep => {}
        launcher::PodAction::Delete => {
            pods.delete(&name, &DeleteParams::default())
                .await
                .map_err(kerr(format!("deleting pod {name}")))?;
            info!(cvm = %cvm.name_any(), node = %node, phase = "Scheduled", pod = %name, "launcher pod deleted");
        }
        launcher::PodAction::Create => {
            let Some(pod) = launcher::launcher_pod(cvm, node, o) else {
                return Ok((launcher::PodReading::Absent, found));
            };
            match pods.create(&PostParams::default(), &pod).await {
                Ok(_) => {
                    info!(cvm = %cvm.name_any(), node = %node, phase = "Scheduled", pod = %name, "launcher pod created")
                }
                // Another reconcile (or replica) made it: read it next pass.
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(kerr(format!("creating pod {name}"))(e)),
            }
        }
    }
    Ok((reading, found))
}

/// Deletes the CVM's launcher pod; true once it is gone.
async fn delete_launcher(cvm: &ConfidentialVM, ctx: &Context) -> Result<bool> {
    let ns = cvm.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let name = launcher::pod_name(&cvm.name_any());
    match pods
        .get_opt(&name)
        .await
        .map_err(kerr(format!("reading pod {name}")))?
    {
        None => Ok(true),
        Some(p) if p.metadata.deletion_timestamp.is_some() => Ok(false),
        Some(_) => {
            pods.delete(&name, &DeleteParams::default())
                .await
                .map_err(kerr(format!("deleting pod {name}")))?;
            Ok(false)
        }
    }
}

/// Whether the node plugin ever reported on this guest (a guest that never launched
/// can be released without waiting).
fn launched_ever(cvm: &ConfidentialVM) -> bool {
    cvm.status.as_ref().is_some_and(|s| {
        s.platform.is_some() || conditions::find(&s.conditions, "Launched").is_some()
    })
}

/// Whether this reconcile's transition from `old` to `new` is the CVM's first into
/// Verified ([`crate::metrics::VerifiedOnce`]); a CVM being deleted is forgotten, and so
/// are deleted ones the bookkeeping still holds once it outgrows the cache.
fn first_verified(
    ctx: &Context,
    cvm: &ConfidentialVM,
    old: Option<CvmPhase>,
    new: CvmPhase,
) -> bool {
    let mut seen = ctx
        .verified_once
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let k = key(cvm);
    if cvm.metadata.deletion_timestamp.is_some() {
        seen.forget(&k);
        return false;
    }
    let first = seen.first_verified(&k, old, new);
    if first && seen.len() > ctx.cvms.len() {
        let all = ctx.cvms.state();
        let live: HashSet<String> = readable(&all).iter().map(|c| key(c)).collect();
        seen.retain(|k| live.contains(k));
    }
    first
}

/// What the CVM controller does after a failed reconcile: a CVM deleted meanwhile (404)
/// is done, a lost write conflict (409) is retried promptly, a real failure after a pause.
pub(crate) fn after_error(err: &Error) -> Action {
    match err.expected() {
        Some(crate::error::Expected::Gone) => Action::await_change(),
        Some(crate::error::Expected::Conflict) => Action::requeue(crate::error::CONFLICT_RETRY),
        Some(crate::error::Expected::Waiting) => Action::requeue(DELETION_RECHECK),
        None => Action::requeue(crate::error::FAILURE_RETRY),
    }
}

pub fn error_policy(
    cvm: Arc<DeserializeGuard<ConfidentialVM>>,
    err: &Error,
    ctx: Arc<Context>,
) -> Action {
    note_failure(&ctx, err, &cvm.name_any(), None);
    after_error(err)
}

/// Counts a failed reconcile and logs it. Expected outcomes (404, 409, a deletion that
/// waits) are not errors: logged at debug, not counted in `errors`.
/// `migration`: the migration reconciled, when it is one of `cvm`'s.
pub(crate) fn note_failure(ctx: &Context, err: &Error, cvm: &str, migration: Option<&str>) {
    let migration = migration.unwrap_or("");
    match ctx.metrics.count_reconcile_error(err) {
        Some(outcome) => {
            tracing::debug!(cvm, migration, outcome = outcome.metric_label(), error = %err, "reconcile met an expected outcome")
        }
        None => warn!(cvm, migration, error = %err, "reconcile failed; retrying"),
    }
}

/// Counts CVMs by phase for the gauge.
pub fn update_phase_gauge(ctx: &Context) {
    let mut counts: HashMap<&'static str, i64> = HashMap::new();
    for c in readable(&ctx.cvms.state()) {
        *counts.entry(c.phase().as_str()).or_insert(0) += 1;
    }
    for p in [
        CvmPhase::Pending,
        CvmPhase::Scheduled,
        CvmPhase::Launching,
        CvmPhase::Running,
        CvmPhase::Verified,
        CvmPhase::Stopped,
        CvmPhase::Failed,
        CvmPhase::Terminating,
    ] {
        ctx.metrics
            .phases
            .with_label_values(&[p.as_str()])
            .set(*counts.get(p.as_str()).unwrap_or(&0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appraisal_waits_for_evidence_and_names_a_missing_policy() {
        let mut cvm: ConfidentialVM = serde_json::from_value(json!({
            "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVM",
            "metadata": {"name": "web", "namespace": "ns", "uid": "u"},
            "spec": {"tee": {"type": "SEV-SNP"}, "resources": {"vcpus": 1, "memoryMiB": 512},
                     "boot": {"firmware": {"name": "ovmf"}},
                     "attestation": {"policyRef": "gone"}},
        }))
        .unwrap();
        let records = verify::Records {
            host_pins: &[],
            other_instances: &[],
        };
        let now = Timestamp::UNIX_EPOCH;
        let v = verification(&cvm, Some(("gone", None)), records, now);
        assert!(matches!(v.verification, Verification::Awaiting(_)));
        assert!(!v.changed);
        cvm.status = Some(
            serde_json::from_value(json!({"evidence": {
                "format": "sev-snp-report", "report": "AA==",
                "collectedAt": "2026-01-01T00:00:00Z"}}))
            .unwrap(),
        );
        let v = verification(&cvm, Some(("gone", None)), records, now);
        let Verification::PolicyProblem { reason, message } = v.verification else {
            panic!("a missing policy is not a verdict");
        };
        assert_eq!(reason, state::VerdictReason::PolicyNotFound);
        assert!(
            message.contains("AttestationPolicy gone does not exist"),
            "{message}"
        );
        // Under a policy that is there the evidence is appraised (and refused: it is no
        // report), and the new result is told apart from the recorded one.
        let spec = AttestationPolicySpec::default();
        let v = verification(&cvm, Some(("p", Some(&spec))), records, now);
        assert!(v.changed && v.appraised.is_some());
    }

    fn api_error(code: u16, reason: &str) -> Error {
        crate::error::api_error("updating finalizers of web", code, reason)
    }

    #[test]
    fn a_vanished_cvm_is_done_a_conflict_retries_promptly_a_failure_backs_off() {
        assert_eq!(
            after_error(&api_error(404, "NotFound")),
            Action::await_change()
        );
        let conflict = after_error(&api_error(409, "Conflict"));
        assert_eq!(conflict, Action::requeue(crate::error::CONFLICT_RETRY));
        let failure = after_error(&api_error(500, "InternalError"));
        assert_eq!(failure, Action::requeue(crate::error::FAILURE_RETRY));
        assert!(crate::error::CONFLICT_RETRY < crate::error::FAILURE_RETRY);
        assert_eq!(after_error(&Error::NoNamespace), failure);
    }
}
