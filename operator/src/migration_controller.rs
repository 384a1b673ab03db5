//! The I/O edge of live migration (docs/migration.md): reads a migration, its CVM (from
//! the API server: the decision must not act on a stale binding), the nodes and the other
//! migrations of that CVM; runs [`migrate::decide`]; writes the operator's share of the
//! migration's status by server-side apply (never the CVM: its reconciler binds it to the
//! target once `Switched` is recorded); publishes
//! events, metrics and logs. Runs in the CVM controller's [`Context`], under the same
//! leader election and placement lock.

use crate::controller::{self, node_info, Context};
use crate::error::{kube as kerr, Error, Expected, Result, CONFLICT_RETRY, FAILURE_RETRY};
use crate::migrate::{
    self, CvmView, MigrationView, OperatorStatus, OtherMigration, TargetAppraisal,
};
use crate::schedule::Placed;
use crate::verify;
use cvm_crds::cvm::Evidence;
use cvm_crds::{ConfidentialVM, ConfidentialVMMigration, MigrationPhase};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::ResourceExt;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// How often a migration in progress is looked at without any change: its timeout must
/// fire even when nothing else happens.
const REQUEUE: Duration = Duration::from_secs(5);

fn is_terminal(m: &ConfidentialVMMigration) -> bool {
    m.status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(MigrationPhase::is_terminal)
}

/// The migration controller, also woken by changes of the CVMs that migrations in progress
/// name: a CVM verified on its target advances its migration.
pub fn watching(
    ctrl: Controller<ConfidentialVMMigration>,
    cvms: Api<DeserializeGuard<ConfidentialVM>>,
    migrations: Store<ConfidentialVMMigration>,
) -> Controller<ConfidentialVMMigration> {
    ctrl.watches(
        cvms,
        watcher::Config::default(),
        move |cvm: DeserializeGuard<ConfidentialVM>| {
            let (ns, name) = (cvm.namespace(), cvm.name_any());
            migrations
                .state()
                .iter()
                .filter(|m| m.namespace() == ns && m.spec.cvm_name == name && !is_terminal(m))
                .map(|m| ObjectRef::from_obj(m.as_ref()))
                .collect::<Vec<_>>()
        },
    )
}

/// The other migrations of the same CVM that have not ended.
pub fn others_of(
    mig: &ConfidentialVMMigration,
    all: &[Arc<ConfidentialVMMigration>],
) -> Vec<OtherMigration> {
    all.iter()
        .filter(|o| {
            o.namespace() == mig.namespace()
                && o.spec.cvm_name == mig.spec.cvm_name
                && o.metadata.uid != mig.metadata.uid
                && !is_terminal(o)
        })
        .map(|o| OtherMigration {
            name: o.name_any(),
            // Without a creation time (never from a real API server) it counts as youngest.
            created: o
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(Timestamp::MAX, |t| t.0),
            accepted: o.status.as_ref().is_some_and(|s| s.target_node.is_some()),
        })
        .collect()
}

pub async fn reconcile(mig: Arc<ConfidentialVMMigration>, ctx: Arc<Context>) -> Result<Action> {
    let status = mig.status.clone().unwrap_or_default();
    if status.phase.is_some_and(MigrationPhase::is_terminal) {
        // A finished migration is a record, kept until deleted.
        return Ok(Action::await_change());
    }
    let ns = mig.namespace().ok_or(Error::NoNamespace)?;
    let name = mig.name_any();
    let missing = |field| Error::MissingMetadata {
        kind: "ConfidentialVMMigration",
        name: format!("{ns}/{name}"),
        field,
    };
    let uid = mig
        .metadata
        .uid
        .clone()
        .ok_or_else(|| missing("metadata.uid"))?;
    let created = mig
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0)
        .ok_or_else(|| missing("metadata.creationTimestamp"))?;
    let now = Timestamp::now();
    let cvm_name = mig.spec.cvm_name.as_str();
    let cvms: Api<ConfidentialVM> = Api::namespaced(ctx.client.clone(), &ns);
    let cvm = cvms.get_opt(cvm_name).await.map_err(kerr(format!(
        "reading ConfidentialVM {ns}/{cvm_name} for migration {name}"
    )))?;
    let view = cvm.as_ref().map(CvmView::of);
    let others = others_of(&mig, &ctx.migrations.state());
    let migration = MigrationView {
        name: &name,
        uid: &uid,
        cvm_name,
        generation: mig.metadata.generation,
        created,
        requested_target: mig.spec.target_node.as_deref(),
        status: &status,
    };

    // The target is chosen under the placement lock, held until it is recorded, so that
    // no CVM and no other migration takes the same last slot meanwhile.
    let mut placement = None;
    let mut target = None;
    if migrate::needs_target(&migration) {
        if let Some((c, source)) = cvm
            .as_ref()
            .and_then(|c| c.node_name().map(|n| (c, n.to_string())))
        {
            let mut assumed = ctx.assumed.lock().await;
            let placed = controller::occupied(&ctx, &mut assumed, &controller::migration_key(&mig));
            let nodes: Vec<_> = ctx
                .nodes
                .state()
                .iter()
                .map(|n| ctx.for_placement(node_info(n)))
                .collect();
            target = Some(migrate::choose_target(
                migration.requested_target,
                &source,
                &controller::request(c),
                &nodes,
                &placed,
            ));
            placement = Some(assumed);
        }
    }
    let appraisal = match (&cvm, &status.target_evidence) {
        (Some(c), Some(ev)) if migrate::needs_appraisal(&migration) => {
            let target = status.target_node.as_deref().unwrap_or_default();
            Some(appraise_target(&ctx, c, ev, &uid, target, now).await?)
        }
        _ => None,
    };
    let out = migrate::decide(&migrate::Input {
        migration: migration.clone(),
        cvm: view.as_ref(),
        others: &others,
        target,
        appraisal,
        timeout: ctx.migration_timeout,
        now,
    });

    let old = OperatorStatus::recorded(&status);
    if out.status != old {
        write_status(&ctx, &mig, &ns, &out.status).await?;
    }
    if let (Some(mut assumed), Some(c), Some(t)) = (placement, &cvm, &out.status.target_node) {
        if old.target_node.is_none() && !out.status.phase.is_terminal() {
            assumed
                .targets
                .insert(controller::migration_key(&mig), Placed::of(c, t));
        }
    }
    on_transitions(&ctx, &mig, &old, &out.status, created, now).await;
    ctx.metrics.reconciles.with_label_values(&["ok"]).inc();
    Ok(if out.status.phase.is_terminal() {
        Action::await_change()
    } else {
        Action::requeue(REQUEUE)
    })
}

/// Appraises the receiving guest's evidence under the CVM's own policy; it must answer
/// the migration's challenge, not the CVM's.
async fn appraise_target(
    ctx: &Context,
    cvm: &ConfidentialVM,
    evidence: &Evidence,
    uid: &str,
    target_node: &str,
    now: Timestamp,
) -> Result<TargetAppraisal> {
    let policy = match cvm.policy_ref() {
        None => None,
        Some(name) => match controller::load_policy(name, ctx) {
            Some(p) => Some((name.to_string(), p.spec)),
            None => {
                return Ok(TargetAppraisal::PolicyProblem {
                    reason: cvm_crds::MigrationReason::PolicyNotFound,
                    message: controller::policy_not_found(name),
                })
            }
        },
    };
    let pins = controller::host_pin_views(ctx);
    let result = verify::appraise(&verify::Input {
        cvm,
        policy: policy.as_ref().map(|(n, s)| (n.as_str(), s)),
        evidence,
        now,
        subject: verify::Subject::Migration(uid),
        node: target_node,
        records: verify::Records {
            host_pins: &pins,
            other_instances: &[],
        },
        migration: None,
    })
    .result;
    ctx.metrics
        .verifications
        .with_label_values(&[&format!("{:?}", result.status).to_lowercase()])
        .inc();
    Ok(TargetAppraisal::Result(Box::new(result)))
}

async fn write_status(
    ctx: &Context,
    mig: &ConfidentialVMMigration,
    ns: &str,
    st: &OperatorStatus,
) -> Result<()> {
    let api: Api<ConfidentialVMMigration> = Api::namespaced(ctx.client.clone(), ns);
    controller::apply_status(&api, &mig.name_any(), st).await
}

/// Events, logs and metrics for the change from `old` to `new`.
async fn on_transitions(
    ctx: &Context,
    mig: &ConfidentialVMMigration,
    old: &OperatorStatus,
    new: &OperatorStatus,
    created: Timestamp,
    now: Timestamp,
) {
    let name = mig.name_any();
    let cvm = mig.spec.cvm_name.as_str();
    let node = new
        .target_node
        .as_deref()
        .or(new.source_node.as_deref())
        .unwrap_or("");
    let message = new.message.as_deref().unwrap_or("");
    for note in migrate::notes(old, new) {
        let type_ = if note.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        controller::publish_on(ctx, mig, "Migrate", type_, &note.reason, note.message).await;
    }
    if new.phase != old.phase || new.message != old.message {
        if new.phase == MigrationPhase::Failed {
            warn!(migration = %name, cvm = %cvm, node = %node, phase = %new.phase, message = %message, "migration failed");
        } else {
            info!(migration = %name, cvm = %cvm, node = %node, phase = %new.phase, message = %message, "migration progressed");
        }
    }
    let switched = old.switched_at().is_none() && new.switched_at().is_some();
    let ended = new.phase.is_terminal() && !old.phase.is_terminal();
    if ended {
        let outcome = if new.phase == MigrationPhase::Succeeded {
            "succeeded"
        } else {
            "failed"
        };
        ctx.metrics.migrations.with_label_values(&[outcome]).inc();
        let secs = now.duration_since(created).as_secs_f64().max(0.0);
        ctx.metrics
            .migration_duration
            .with_label_values(&[outcome])
            .observe(secs);
    }
    // The source's slot is free after the switch, the target's hold when it ends: let
    // pending CVMs try again.
    if switched || (ended && new.target_node.is_some()) {
        let _ = ctx.freed.unbounded_send(());
    }
}

/// What the migration controller does after a failed reconcile. A 404 means the migration
/// or its CVM was deleted meanwhile: a deleted migration is done (the controller skips a
/// requeue of an object no longer in its cache), and one whose CVM vanished fails with
/// `CVMNotFound` at its next regular look. A lost write conflict is retried promptly, a
/// real failure after a pause.
pub(crate) fn after_error(err: &Error) -> Action {
    match err.expected() {
        Some(Expected::Gone) => Action::requeue(REQUEUE),
        Some(Expected::Conflict) => Action::requeue(CONFLICT_RETRY),
        Some(Expected::Waiting) => Action::requeue(REQUEUE),
        None => Action::requeue(FAILURE_RETRY),
    }
}

pub fn error_policy(mig: Arc<ConfidentialVMMigration>, err: &Error, ctx: Arc<Context>) -> Action {
    controller::note_failure(&ctx, err, &mig.spec.cvm_name, Some(&mig.name_any()));
    after_error(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mig(
        name: &str,
        uid: &str,
        cvm: &str,
        created: &str,
        status: serde_json::Value,
    ) -> Arc<ConfidentialVMMigration> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVMMigration",
                "metadata": {"name": name, "namespace": "d", "uid": uid, "creationTimestamp": created},
                "spec": {"cvmName": cvm},
                "status": status,
            }))
            .unwrap(),
        )
    }

    #[test]
    fn others_are_the_unfinished_migrations_of_the_same_cvm() {
        let me = mig("a", "1", "web", "2024-01-01T00:00:10Z", json!({}));
        let all = vec![
            me.clone(),
            mig(
                "b",
                "2",
                "web",
                "2024-01-01T00:00:05Z",
                json!({"targetNode": "n2"}),
            ),
            mig(
                "c",
                "3",
                "web",
                "2024-01-01T00:00:01Z",
                json!({"phase": "Failed"}),
            ),
            mig("d", "4", "db", "2024-01-01T00:00:01Z", json!({})),
        ];
        let others = others_of(&me, &all);
        assert_eq!(
            others,
            vec![OtherMigration {
                name: "b".into(),
                created: "2024-01-01T00:00:05Z".parse().unwrap(),
                accepted: true,
            }]
        );
    }

    fn api_error(code: u16, reason: &str) -> Error {
        crate::error::api_error("reading ConfidentialVM d/web to rebind it", code, reason)
    }

    #[test]
    fn gone_looks_again_at_the_regular_pace_a_conflict_at_once() {
        // The CVM vanished mid-rebind: the migration must still come back to fail.
        assert_eq!(
            after_error(&api_error(404, "NotFound")),
            Action::requeue(REQUEUE)
        );
        assert_eq!(
            after_error(&api_error(409, "Conflict")),
            Action::requeue(CONFLICT_RETRY)
        );
        assert_eq!(
            after_error(&api_error(503, "ServiceUnavailable")),
            Action::requeue(FAILURE_RETRY)
        );
    }
}
