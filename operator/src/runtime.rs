//! Starts the operator's controllers (ConfidentialVM and ConfidentialVMMigration) and
//! their watches in one [`Context`]. It alone knows both controllers, so neither module
//! imports the other's runner (the migration controller uses the CVM controller's
//! context; the CVM controller knows nothing of the migration controller).

use crate::controller::{error_policy, reconcile, update_phase_gauge, Assumed, Context};
use crate::metrics::Metrics;
use crate::migration_controller;
use cvm_crds::wellknown::MANAGER_OPERATOR;
use cvm_crds::{AttestationPolicy, ConfidentialVM, ConfidentialVMMigration, HostPin};
use cvm_telemetry::watch::{WatchRetry, OPERATOR_RETRY_MAX};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::WatchStreamExt;
use kube::runtime::{reflector, watcher};
use kube::{Client, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

/// Runs the CVM and migration controllers until the stream ends (shutdown signal) or
/// `stop` resolves.
pub async fn run(
    client: Client,
    metrics: Metrics,
    identity: &str,
    migration_timeout: Duration,
    launcher: Option<crate::launcher::LauncherOptions>,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let stop = stop.shared();
    // Read through a guard: one object the Rust type cannot read becomes a status
    // instead of breaking the watch for all.
    let cvms: Api<DeserializeGuard<ConfidentialVM>> = Api::all(client.clone());
    let migrations: Api<ConfidentialVMMigration> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let policies: Api<AttestationPolicy> = Api::all(client.clone());
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::all(client.clone());

    // One watch each of Nodes and AttestationPolicies: it fills the cache the reconcile
    // reads and wakes the CVMs a change concerns.
    let (node_store, node_writer) = reflector::store();
    let node_retry = WatchRetry::new("Node", OPERATOR_RETRY_MAX);
    let node_trigger = watcher(nodes, watcher::Config::default())
        .backoff(node_retry.clone())
        .reflect(node_writer)
        .applied_objects();
    let (policy_store, policy_writer) = reflector::store();
    let policy_retry = WatchRetry::new("AttestationPolicy", OPERATOR_RETRY_MAX);
    let policy_trigger = watcher(policies, watcher::Config::default())
        .backoff(policy_retry.clone())
        .reflect(policy_writer)
        .applied_objects();
    let (pin_store, pin_writer) = reflector::store();
    let pin_watch = WatchRetry::new("HostPin", OPERATOR_RETRY_MAX).drive(reflector(
        pin_writer,
        watcher(
            Api::<HostPin>::all(client.clone()),
            watcher::Config::default(),
        ),
    ));

    // Each controller watches its own kind and, through a second watch without a cache,
    // the other's. Not kube's shared streams: a subscriber that reads the reference of an
    // object deleted since then returns Pending without asking to be woken, so after a
    // burst of deletes it stalls, the shared buffer fills and the watch stops for all
    // (the operator then moved only on its requeue timers).
    let controller = Controller::new(cvms.clone(), watcher::Config::default());
    let migration_ctrl = Controller::new(migrations.clone(), watcher::Config::default());
    let cvm_store = controller.store();
    let migration_store = migration_ctrl.store();
    let for_nodes = cvm_store.clone();
    let for_policies = cvm_store.clone();
    let (freed, freed_rx) = futures::channel::mpsc::unbounded();
    let ctx = Arc::new(Context {
        freed,
        client: client.clone(),
        nodes: node_store,
        policies: policy_store,
        host_pins: pin_store,
        cvms: cvm_store,
        migrations: migration_store.clone(),
        assumed: tokio::sync::Mutex::new(Assumed::default()),
        migration_timeout,
        launcher: launcher.clone(),
        verified_once: Default::default(),
        metrics: metrics.clone(),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: MANAGER_OPERATOR.into(),
                instance: Some(identity.to_string()),
            },
        ),
    });
    let gauge_ctx = ctx.clone();
    let gauge = async move {
        loop {
            update_phase_gauge(&gauge_ctx);
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    };
    metrics
        .ready
        .store(true, std::sync::atomic::Ordering::SeqCst);
    // One backoff for all watches of the controller (see WatchRetry).
    let cvm_retry = WatchRetry::new(
        "ConfidentialVM, ConfidentialVMMigration, Node, AttestationPolicy",
        OPERATOR_RETRY_MAX,
    );
    // A launcher pod that is scheduled, refused, runs or goes speaks for its CVM.
    let controller = if launcher.is_some() {
        let only_launchers = watcher::Config::default().labels(&format!(
            "app.kubernetes.io/component={}",
            cvm_crds::wellknown::LAUNCHER_COMPONENT
        ));
        controller.owns(pods, only_launchers)
    } else {
        controller
    };
    let ctrl = controller
        // A node that appears, frees up or changes readiness may let pending CVMs in and
        // changes the health of those bound to it.
        .watches_stream(node_trigger, move |node: Node| {
            let name = node.name_any();
            for_nodes
                .state()
                .iter()
                .filter(|g| {
                    g.0.as_ref().map_or(true, |c| {
                        c.node_name().is_none() || c.node_name() == Some(name.as_str())
                    })
                })
                .map(|c| ObjectRef::from_obj(c.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(policy_trigger, move |p: AttestationPolicy| {
            let name = p.name_any();
            for_policies
                .state()
                .iter()
                .filter(|g| {
                    g.0.as_ref()
                        .is_ok_and(|c| c.policy_ref() == Some(name.as_str()))
                })
                .map(|c| ObjectRef::from_obj(c.as_ref()))
                .collect::<Vec<_>>()
        })
        // A migration's switch moves its CVM's binding, which the CVM's reconcile writes.
        .watches(
            migrations,
            watcher::Config::default(),
            |m: ConfidentialVMMigration| {
                let ns = m.namespace().unwrap_or_default();
                Some(
                    ObjectRef::<DeserializeGuard<ConfidentialVM>>::new(&m.spec.cvm_name)
                        .within(&ns),
                )
            },
        )
        .reconcile_all_on(freed_rx)
        .trigger_backoff(cvm_retry.clone())
        .graceful_shutdown_on(stop.clone())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(move |res| {
            if let Err(e) = res {
                cvm_retry.log_controller_error(&e);
            }
            futures::future::ready(())
        });
    let migration_retry = WatchRetry::new(
        "ConfidentialVMMigration, ConfidentialVM",
        OPERATOR_RETRY_MAX,
    );
    let migration_ctrl = migration_controller::watching(migration_ctrl, cvms, migration_store)
        .trigger_backoff(migration_retry.clone())
        .graceful_shutdown_on(stop)
        .run(
            migration_controller::reconcile,
            migration_controller::error_policy,
            ctx,
        )
        .for_each(move |res| {
            if let Err(e) = res {
                migration_retry.log_controller_error(&e);
            }
            futures::future::ready(())
        });
    tokio::select! {
        // Both shut down gracefully on `stop`; wait for both.
        _ = futures::future::join(ctrl, migration_ctrl) => {},
        _ = pin_watch => {},
        _ = gauge => {},
    }
}
