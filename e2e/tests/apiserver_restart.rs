//! `kill -9` of the API server, started again ~5 s later with the same command line and
//! port while etcd keeps running: ConfidentialVMs applied once `/readyz` is back must bind
//! and verify within seconds, not once the operator's watches have backed off for a minute.
//! Then a longer outage, past the leader's renew deadline: the operator steps down and
//! leads again as soon as the server is back, instead of exiting.

mod common_cvm;

use common_cvm::{apply_json, cond_is, cvm, POLICY, WAIT};
use cvm_crds::ConfidentialVM;
use cvm_e2e::process::log_tail;
use cvm_e2e::system::{plugin_name, System, SystemOptions};
use cvm_e2e::{wait, SimNode, Tee};
use kube::api::Api;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const NS: &str = "apiserver-restart";
/// New CVMs must be bound and Verified this soon after `/readyz` is back.
const WITHIN: Duration = Duration::from_secs(10);
const NEW_CVMS: usize = 3;

#[tokio::test]
async fn cvms_bind_and_verify_soon_after_the_api_server_restarts() {
    let nodes = SimNode::fleet(2, &[Tee::SevSnp]);
    let sys = System::start(SystemOptions::new(
        env!("CARGO_BIN_EXE_cvm-dev"),
        nodes.clone(),
    ))
    .expect("system starts");
    common_cvm::trust_simulator(&sys, POLICY);
    let client = sys.cp.client().await.unwrap();
    common_cvm::namespace(&client, NS).await;
    let cvms: Api<ConfidentialVM> = Api::namespaced(client, NS);

    // Before the crash: the whole path works and every watch is established.
    apply_json(&sys, &cvm("before", NS, "SEV-SNP")).unwrap();
    wait::until(&cvms, "before", WAIT, "Verified", |c| {
        cond_is(c, "Verified", "True")
    })
    .await
    .unwrap();

    // As in the report: down ~5 s, the leader keeps its Lease and the watches recover.
    outage(&sys, &nodes, &cvms, Duration::from_secs(5), "short").await;
    // Past the leader's renew deadline (10 s): it steps down, and leads again once the
    // server answers.
    outage(&sys, &nodes, &cvms, Duration::from_secs(15), "long").await;
}

/// Kills the API server, starts it again `down` later, waits for `/readyz`, then applies
/// new CVMs (`<tag>-<i>`) and asserts they are bound and Verified within [`WITHIN`].
async fn outage(
    sys: &System,
    nodes: &[SimNode],
    cvms: &Api<ConfidentialVM>,
    down: Duration,
    tag: &str,
) {
    sys.cp.kill_apiserver();
    let killed = Instant::now();
    // The outage itself (not a wait for a condition): the server stays down this long.
    tokio::time::sleep(down).await;
    sys.cp.start_apiserver().unwrap();
    sys.cp
        .wait_apiserver_ready(Duration::from_secs(60))
        .expect("the restarted API server becomes ready");
    let ready = Instant::now();
    println!(
        "[{tag}] /readyz back {:.1} s after the kill",
        (ready - killed).as_secs_f64()
    );

    let names: Vec<String> = (0..NEW_CVMS).map(|i| format!("{tag}-{i}")).collect();
    let items: Vec<_> = names.iter().map(|n| cvm(n, NS, "SEV-SNP")).collect();
    apply_json(
        sys,
        &json!({"apiVersion": "v1", "kind": "List", "items": items}),
    )
    .expect("the new CVMs apply");

    // When each new CVM was first seen bound and Verified, counted from /readyz.
    let mut bound: BTreeMap<String, Duration> = BTreeMap::new();
    let mut verified: BTreeMap<String, Duration> = BTreeMap::new();
    let deadline = ready + WAIT;
    let mut last_seen = Vec::new();
    while verified.len() < names.len() && Instant::now() < deadline {
        if let Ok(list) = cvms.list(&Default::default()).await {
            for c in &list.items {
                let Some(name) = c.metadata.name.clone().filter(|n| names.contains(n)) else {
                    continue;
                };
                if c.node_name().is_some() {
                    bound.entry(name.clone()).or_insert_with(|| ready.elapsed());
                }
                if cond_is(c, "Verified", "True") {
                    verified.entry(name).or_insert_with(|| ready.elapsed());
                }
            }
            last_seen = list.items;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let slowest = |m: &BTreeMap<String, Duration>| {
        m.values()
            .max()
            .map_or("never".to_string(), |d| format!("{:.1}", d.as_secs_f64()))
    };
    println!(
        "[{tag}] bound {} s / verified {} s after /readyz ({NEW_CVMS} new CVMs; API server down {:.1} s)",
        slowest(&bound),
        slowest(&verified),
        (ready - killed).as_secs_f64(),
    );
    let log = sys.dir().join("logs").join("operator-0.log");
    println!("[{tag}] operator log, last lines:\n{}", log_tail(&log, 25));
    sys.check_alive("operator-0")
        .expect("the operator survives the API server restart");
    for n in nodes {
        sys.check_alive(&plugin_name(&n.name))
            .expect("the node plugins survive the API server restart");
    }
    assert_eq!(
        verified.len(),
        names.len(),
        "[{tag}] not every new CVM was Verified within {WAIT:?}; last seen: {last_seen:#?}"
    );
    for (what, times) in [("bound", &bound), ("Verified", &verified)] {
        for (name, t) in times {
            assert!(
                *t < WITHIN,
                "[{tag}] {name} was {what} {:.1} s after /readyz; want under {WITHIN:?}",
                t.as_secs_f64()
            );
        }
    }
}
