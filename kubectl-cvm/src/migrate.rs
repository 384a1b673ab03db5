//! `kubectl cvm migrate`: ask the operator to live-migrate a CVM, and (with `--wait`)
//! follow the migration until it ends. The operator decides everything (target, the
//! target's attestation, the switch); this command only creates the request and reports.

use std::fmt::Write as _;
use std::time::Duration;

use clap::Args;
use cvm_crds::{ConfidentialVMMigration, ConfidentialVMMigrationStatus, MigrationPhase};
use futures::StreamExt;
use kube::api::{Api, PostParams};
use kube::runtime::{watcher, WatchStreamExt};

use crate::cli::{Done, KubeArgs};
use crate::cluster::{block_on, parse_timeout, ClusterError, Ctx};

pub const EXAMPLES: &str = "Examples:
  kubectl cvm migrate my-vm --wait
  kubectl cvm migrate my-vm --to tee-node-2 -n prod --wait --timeout 10m";

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The ConfidentialVM to move.
    pub name: String,
    /// Target node (default: the operator picks one as it schedules).
    #[arg(long = "to", value_name = "NODE")]
    pub to: Option<String>,
    /// Follow the migration and exit 0 on Succeeded, 1 on Failed.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (e.g. 90s, 5m).
    #[arg(long, default_value = "5m", value_parser = parse_timeout)]
    pub timeout: Duration,
}

/// The request object; `generateName` so that a CVM can be migrated again later.
pub fn request(cvm: &str, to: Option<&str>) -> serde_json::Value {
    let mut spec = serde_json::json!({ "cvmName": cvm });
    if let Some(n) = to {
        spec["targetNode"] = n.into();
    }
    // Names are at most 253 characters; the server appends 5.
    let prefix: String = cvm.chars().take(240).collect();
    serde_json::json!({
        "apiVersion": "cvmp.io/v1alpha1",
        "kind": "ConfidentialVMMigration",
        "metadata": { "generateName": format!("{prefix}-") },
        "spec": spec,
    })
}

/// One progress line for a status (printed when it differs from the last one).
pub fn progress_line(st: &ConfidentialVMMigrationStatus) -> String {
    let phase = st.phase.unwrap_or_default();
    let mut s = format!("{phase}");
    match (st.source_node.as_deref(), st.target_node.as_deref()) {
        (Some(from), Some(to)) => {
            let _ = write!(s, ": {from} -> {to}");
        }
        (None, Some(to)) => {
            let _ = write!(s, ": -> {to}");
        }
        _ => {}
    }
    if phase == MigrationPhase::TargetAttested {
        if let Some(a) = &st.target_attestation {
            let status = serde_json::to_value(a.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let _ = write!(s, " (target evidence {status})");
        }
    }
    if let Some(m) = st.message.as_deref().filter(|m| !m.is_empty()) {
        let _ = write!(s, " - {m}");
    }
    s
}

/// Whether the migration is over, and whether it succeeded.
pub fn outcome(st: Option<&ConfidentialVMMigrationStatus>) -> Option<bool> {
    match st.and_then(|s| s.phase) {
        Some(MigrationPhase::Succeeded) => Some(true),
        Some(MigrationPhase::Failed) => Some(false),
        _ => None,
    }
}

pub fn run(k: &KubeArgs, a: &MigrateArgs) -> Result<Done, ClusterError> {
    block_on(async {
        let ctx = Ctx::connect(k).await?;
        // A clear error for a typo before anything is created.
        ctx.get(&a.name).await?;
        let api: Api<ConfidentialVMMigration> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
        let obj: ConfidentialVMMigration =
            serde_json::from_value(request(&a.name, a.to.as_deref()))
                .map_err(|e| ClusterError::Input(format!("building the request: {e}")))?;
        let created = api
            .create(&PostParams::default(), &obj)
            .await
            .map_err(|e| match e {
                kube::Error::Api(s) if s.code == 403 => ClusterError::Api(format!(
                    "forbidden: {} (your account needs create on confidentialvmmigrations.cvmp.io in {})",
                    s.message, ctx.namespace
                )),
                kube::Error::Api(s) => ClusterError::Api(format!("{} ({})", s.message, s.code)),
                other => ClusterError::Unreachable(other.to_string()),
            })?;
        let name = created.metadata.name.clone().unwrap_or_default();
        let mut out = format!(
            "confidentialvmmigration.cvmp.io/{name} created (ConfidentialVM {}/{})\n",
            ctx.namespace, a.name
        );
        if !a.wait {
            let _ = writeln!(
                out,
                "follow it with: kubectl get cvmmig {name} -n {} -w",
                ctx.namespace
            );
            return Ok(Done::ok(out));
        }
        print!("{out}");
        out.clear();
        let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let stream = watcher(api, cfg).default_backoff().applied_objects();
        futures::pin_mut!(stream);
        let mut last = String::new();
        let follow = async {
            while let Some(ev) = stream.next().await {
                let Ok(m) = ev else { continue };
                let Some(st) = m.status.as_ref() else {
                    continue;
                };
                let line = progress_line(st);
                if line != last {
                    println!("{line}");
                    last = line;
                }
                if let Some(ok) = outcome(Some(st)) {
                    return Ok(ok);
                }
            }
            Err(ClusterError::Unreachable("the watch ended".into()))
        };
        match tokio::time::timeout(a.timeout, follow).await {
            Ok(Ok(ok)) => Ok(Done::verdict(out, ok)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClusterError::Timeout(format!(
                "migration {name} did not finish within {}s (last: {}); it goes on: kubectl get cvmmig {name} -n {}",
                a.timeout.as_secs(),
                if last.is_empty() { "no status yet" } else { &last },
                ctx.namespace
            ))),
        }
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_names_the_cvm_and_optional_target() {
        let r = request("web", None);
        assert_eq!(r["metadata"]["generateName"], "web-");
        assert_eq!(r["spec"]["cvmName"], "web");
        assert!(r["spec"].get("targetNode").is_none());
        let r = request("web", Some("n2"));
        assert_eq!(r["spec"]["targetNode"], "n2");
        let long = "a".repeat(253);
        let r = request(&long, None);
        assert_eq!(
            r["metadata"]["generateName"].as_str().map(str::len),
            Some(241)
        );
        let parsed: Result<ConfidentialVMMigration, _> = serde_json::from_value(request("x", None));
        assert!(parsed.is_ok());
    }

    #[test]
    fn progress_shows_route_and_reason() {
        let st = ConfidentialVMMigrationStatus {
            phase: Some(MigrationPhase::Failed),
            source_node: Some("n1".into()),
            target_node: Some("n2".into()),
            message: Some("Timeout: no TargetPrepared from n2".into()),
            ..Default::default()
        };
        assert_eq!(
            progress_line(&st),
            "Failed: n1 -> n2 - Timeout: no TargetPrepared from n2"
        );
        assert_eq!(outcome(Some(&st)), Some(false));
        let pending = ConfidentialVMMigrationStatus::default();
        assert_eq!(progress_line(&pending), "Pending");
        assert_eq!(outcome(Some(&pending)), None);
        assert_eq!(outcome(None), None);
        let done = ConfidentialVMMigrationStatus {
            phase: Some(MigrationPhase::Succeeded),
            ..Default::default()
        };
        assert_eq!(outcome(Some(&done)), Some(true));
    }
}
