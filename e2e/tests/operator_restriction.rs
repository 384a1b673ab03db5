//! The chart's admission policy on the operator's pod rights, with the operator's own
//! service-account token against the real API server: it may create and delete launcher
//! pods controlled by a ConfidentialVM, and nothing else; a launcher pod it creates is
//! never privileged and mounts no hostPath. (RBAC alone would let it run any pod.)

mod common_cvm;

use common_cvm::*;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

const RELEASE: &str = "oprestrict";
const CHART_NS: &str = "cvm-oprestrict";
const NS: &str = "e2e-oprestrict";

fn pod(
    name: &str,
    labels: serde_json::Value,
    owners: serde_json::Value,
    extra: serde_json::Value,
) -> Pod {
    let mut v = json!({
        "metadata": {"name": name, "namespace": NS, "labels": labels, "ownerReferences": owners},
        "spec": {"containers": [{"name": "c", "image": "cvm-launcher:test"}]},
    });
    if let (Some(spec), Some(extra)) = (v["spec"].as_object_mut(), extra.as_object()) {
        for (k, val) in extra {
            spec.insert(k.clone(), val.clone());
        }
    }
    serde_json::from_value(v).expect("a pod")
}

#[tokio::test]
async fn the_operator_creates_and_deletes_only_launcher_pods_of_cvms() {
    let sys = system();
    install_chart(
        &sys,
        RELEASE,
        CHART_NS,
        &["rbac.aggregateToDefaultRoles=false"],
    );
    let (admin, cvms) = api(&sys, NS).await;
    apply_json(&sys, &cvm("owner", NS, "SEV-SNP")).unwrap();
    let owner = cvms.get("owner").await.unwrap();
    let uid = owner.metadata.uid.clone().unwrap();

    // The operator's own token (its ServiceAccount, as its pod would have it).
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), CHART_NS);
    let tr: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 600}}))
            .unwrap();
    let token = sas
        .create_subresource::<TokenRequest, TokenRequest>(
            "token",
            &format!("{RELEASE}-operator"),
            &PostParams::default(),
            &tr,
        )
        .await
        .expect("a token for the operator's service account")
        .status
        .expect("token status")
        .token;
    let operator = cvm_e2e::tokens::token_client(sys.cp.kubeconfig(), &token)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(operator, NS);
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let launcher_labels =
        json!({"app.kubernetes.io/component": "cvm-launcher", "cvmp.io/cvm": "owner"});
    let owned = json!([{"apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVM", "name": "owner", "uid": uid, "controller": true}]);
    let forbidden = |r: Result<Pod, kube::Error>, why: &str| match r {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 403, "{why}: {e:?}");
            assert!(e.message.contains(why), "{why}: {}", e.message);
        }
        other => panic!("{why}: must be refused, got {other:?}"),
    };

    // The policy takes effect once the API server has loaded it and its binding.
    let miner = pod("miner", json!({"app": "x"}), json!([]), json!({}));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while pods.create(&dry, &miner).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the operator may still create any pod 30 s after the chart installed its policy"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // A launcher pod of a CVM: admitted (and really created, to delete it below).
    let ok = pod(
        "owner-launcher",
        launcher_labels.clone(),
        owned.clone(),
        json!({}),
    );
    pods.create(&PostParams::default(), &ok)
        .await
        .expect("a launcher pod is admitted");
    // Any other pod: refused, whatever RBAC allows.
    forbidden(
        pods.create(
            &dry,
            &pod("miner", json!({"app": "x"}), json!([]), json!({})),
        )
        .await,
        "only launcher pods controlled by a ConfidentialVM",
    );
    forbidden(
        pods.create(
            &dry,
            &pod("orphan", launcher_labels.clone(), json!([]), json!({})),
        )
        .await,
        "only launcher pods controlled by a ConfidentialVM",
    );
    forbidden(
        pods.create(
            &dry,
            &pod(
                "hostpath",
                launcher_labels.clone(),
                owned.clone(),
                json!({"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}),
            ),
        )
        .await,
        "mounts no hostPath",
    );
    let mut privileged = pod("priv", launcher_labels.clone(), owned.clone(), json!({}));
    if let Some(spec) = privileged.spec.as_mut() {
        spec.containers[0].security_context =
            Some(serde_json::from_value(json!({"privileged": true})).unwrap());
    }
    forbidden(pods.create(&dry, &privileged).await, "never privileged");
    // Deleting: its launcher pod yes, another pod no.
    let admins: Api<Pod> = Api::namespaced(admin, NS);
    admins
        .create(
            &PostParams::default(),
            &pod("bystander", json!({"app": "y"}), json!([]), json!({})),
        )
        .await
        .unwrap();
    match pods.delete("bystander", &DeleteParams::default()).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{e:?}"),
        other => panic!("deleting another pod must be refused: {other:?}"),
    }
    pods.delete("owner-launcher", &DeleteParams::default())
        .await
        .expect("the operator deletes a launcher pod");
}
