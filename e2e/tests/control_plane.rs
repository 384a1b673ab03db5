//! The local control plane is a real Kubernetes API server: each test asserts the
//! server's own answer (schema validation, CEL, server-side apply conflicts, watch
//! resumption, RBAC with bound tokens, kubectl printing) and helm's.

use anyhow::{bail, Context, Result};
use cvm_e2e::shared::{shared, ClusterInfo};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;
use serde_json::json;
use std::process::Output;

const TEST_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.harness.cvmp.io
spec:
  group: harness.cvmp.io
  scope: Namespaced
  names: {plural: gadgets, singular: gadget, kind: Gadget, shortNames: [gdg]}
  versions:
  - name: v1
    served: true
    storage: true
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            x-kubernetes-validations:
            - rule: "!has(self.max) || self.size <= self.max"
              message: "spec.size must not exceed spec.max"
            properties:
              size: {type: integer, minimum: 1, maximum: 64}
              max: {type: integer}
"#;

async fn namespace(client: &Client, name: &str) -> Result<()> {
    let ns: Api<Namespace> = Api::all(client.clone());
    let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    match ns.create(&PostParams::default(), &obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn gadgets(c: &ClusterInfo, ns: &str) -> Result<Api<DynamicObject>> {
    let client = c.client().await?;
    let dir = tempfile::tempdir()?;
    let f = dir.path().join("crd.yaml");
    std::fs::write(&f, TEST_CRD)?;
    cvm_e2e::cluster::install_crds(&client, &[f]).await?;
    namespace(&client, ns).await?;
    let gvk = GroupVersionKind::gvk("harness.cvmp.io", "v1", "Gadget");
    Ok(Api::namespaced_with(
        client,
        ns,
        &ApiResource::from_gvk(&gvk),
    ))
}

fn gadget(name: &str, spec: serde_json::Value) -> Result<DynamicObject> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "harness.cvmp.io/v1", "kind": "Gadget",
        "metadata": {"name": name}, "spec": spec,
    }))?)
}

fn api_error(r: Result<DynamicObject, kube::Error>) -> Result<kube::core::Status> {
    match r {
        Err(kube::Error::Api(s)) => Ok(*s),
        Err(e) => bail!("expected an API error, got {e}"),
        Ok(_) => bail!("the server accepted an object it must refuse"),
    }
}

#[tokio::test]
async fn server_reports_pinned_version_and_ready_nodes() -> Result<()> {
    let c = shared();
    let out = c.kubectl().args(["version", "-o", "json"]).output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        v["serverVersion"]["gitVersion"],
        cvm_e2e::tools::KUBERNETES_VERSION
    );

    let out = c
        .kubectl()
        .args(["get", "nodes", "-o", "jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}"])
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines.iter().all(|l| l.ends_with("=True")), "{text}");
    Ok(())
}

#[tokio::test]
async fn schema_violation_is_refused_with_the_servers_message() -> Result<()> {
    let c = shared();
    let api = gadgets(&c, "t-schema").await?;
    let s = api_error(
        api.create(
            &PostParams::default(),
            &gadget("big", json!({"size": 100}))?,
        )
        .await,
    )?;
    assert_eq!(s.code, 422, "{s:?}");
    assert!(s.message.contains("spec.size"), "{}", s.message);
    assert!(
        s.message.contains("less than or equal to 64"),
        "{}",
        s.message
    );
    let s = api_error(
        api.create(&PostParams::default(), &gadget("none", json!({}))?)
            .await,
    )?;
    assert!(
        s.message.contains("spec.size: Required value"),
        "{}",
        s.message
    );
    Ok(())
}

#[tokio::test]
async fn cel_rule_rejects_a_bad_object() -> Result<()> {
    let c = shared();
    let api = gadgets(&c, "t-cel").await?;
    let s = api_error(
        api.create(
            &PostParams::default(),
            &gadget("over", json!({"size": 10, "max": 5}))?,
        )
        .await,
    )?;
    assert_eq!(s.code, 422);
    assert!(
        s.message.contains("spec.size must not exceed spec.max"),
        "{}",
        s.message
    );
    api.create(
        &PostParams::default(),
        &gadget("fine", json!({"size": 5, "max": 5}))?,
    )
    .await
    .context("a valid object must be accepted")?;
    Ok(())
}

#[tokio::test]
async fn server_side_apply_conflicts_between_field_managers() -> Result<()> {
    let c = shared();
    let client = c.client().await?;
    namespace(&client, "t-ssa").await?;
    let cms: Api<ConfigMap> = Api::namespaced(client, "t-ssa");
    let cm = |v: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": {"k": v}});
    cms.patch(
        "shared",
        &PatchParams::apply("manager-a"),
        &Patch::Apply(cm("a")),
    )
    .await?;
    let err = cms
        .patch(
            "shared",
            &PatchParams::apply("manager-b"),
            &Patch::Apply(cm("b")),
        )
        .await;
    match err {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 409, "{s:?}");
            assert!(s.message.contains("manager-a"), "{}", s.message);
            assert!(s.message.contains(".data.k"), "{}", s.message);
        }
        other => bail!("expected a conflict, got {other:?}"),
    }
    // Forcing takes ownership, as the API conventions say.
    let got = cms
        .patch(
            "shared",
            &PatchParams::apply("manager-b").force(),
            &Patch::Apply(cm("b")),
        )
        .await?;
    assert_eq!(
        got.data.unwrap_or_default().get("k").map(String::as_str),
        Some("b")
    );
    Ok(())
}

#[tokio::test]
async fn watch_resumes_from_a_resource_version() -> Result<()> {
    let c = shared();
    let client = c.client().await?;
    namespace(&client, "t-watch").await?;
    let cms: Api<ConfigMap> = Api::namespaced(client, "t-watch");
    let mk = |n: &str| -> Result<ConfigMap> {
        Ok(serde_json::from_value(
            json!({"metadata": {"name": n, "labels": {"t": "watch"}}}),
        )?)
    };
    let first = cms.create(&PostParams::default(), &mk("one")?).await?;
    let rv = first
        .metadata
        .resource_version
        .clone()
        .context("no resourceVersion")?;
    // Made after `rv`: a watch from `rv` must deliver exactly these, in order.
    cms.create(&PostParams::default(), &mk("two")?).await?;
    cms.create(&PostParams::default(), &mk("three")?).await?;
    // The selector keeps out what the controller manager puts in every namespace
    // (kube-root-ca.crt) at the same time.
    let stream = cms
        .watch(&WatchParams::default().labels("t=watch").timeout(10), &rv)
        .await?;
    let names: Vec<String> = stream
        .try_filter_map(|ev| async move {
            Ok(match ev {
                WatchEvent::Added(cm) => cm.metadata.name,
                _ => None,
            })
        })
        .take(2)
        .try_collect()
        .await?;
    assert_eq!(names, vec!["two".to_string(), "three".to_string()]);
    Ok(())
}

#[tokio::test]
async fn rbac_denies_what_a_role_does_not_grant() -> Result<()> {
    let c = shared();
    let admin = c.client().await?;
    let ns = "t-rbac";
    namespace(&admin, ns).await?;
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "reader"}}))?;
    let _ = sas.create(&PostParams::default(), &sa).await;
    let role = Role {
        metadata: kube::api::ObjectMeta {
            name: Some("cm-reader".into()),
            ..Default::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["".into()]),
            resources: Some(vec!["configmaps".into()]),
            verbs: vec!["get".into(), "list".into()],
            ..Default::default()
        }]),
    };
    let roles: Api<Role> = Api::namespaced(admin.clone(), ns);
    let _ = roles.create(&PostParams::default(), &role).await;
    let rb = RoleBinding {
        metadata: kube::api::ObjectMeta {
            name: Some("reader".into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "cm-reader".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "reader".into(),
            namespace: Some(ns.into()),
            ..Default::default()
        }]),
    };
    let rbs: Api<RoleBinding> = Api::namespaced(admin.clone(), ns);
    let _ = rbs.create(&PostParams::default(), &rb).await;

    // A bound token from the TokenRequest API, signed by the server's SA key.
    let tr: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 600}}))?;
    let tr = sas
        .create_subresource::<TokenRequest, TokenRequest>(
            "token",
            "reader",
            &PostParams::default(),
            &tr,
        )
        .await?;
    let token = tr.status.context("no token issued")?.token;

    let mut cfg = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&c.kubeconfig)?,
        &Default::default(),
    )
    .await?;
    cfg.auth_info = kube::config::AuthInfo {
        token: Some(token.into()),
        ..Default::default()
    };
    let as_sa = Client::try_from(cfg)?;

    let cms: Api<ConfigMap> = Api::namespaced(as_sa.clone(), ns);
    cms.list(&Default::default())
        .await
        .context("the Role grants list on configmaps")?;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(as_sa, ns);
    match secrets.list(&Default::default()).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "{s:?}");
            assert!(
                s.message.contains("system:serviceaccount:t-rbac:reader"),
                "{}",
                s.message
            );
            assert!(
                s.message.contains("cannot list resource \"secrets\""),
                "{}",
                s.message
            );
        }
        other => bail!("expected 403 Forbidden, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn kubectl_prints_custom_columns() -> Result<()> {
    let c = shared();
    let api = gadgets(&c, "t-print").await?;
    api.create(&PostParams::default(), &gadget("g1", json!({"size": 7}))?)
        .await?;
    let out = c
        .kubectl()
        .args(["get", "gdg", "-n", "t-print", "g1"])
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    assert!(header.contains("SIZE"), "{text}");
    assert!(
        lines
            .next()
            .is_some_and(|l| l.starts_with("g1") && l.contains('7')),
        "{text}"
    );
    Ok(())
}

fn helm(c: &ClusterInfo, args: &[&str]) -> Result<Output> {
    let chart = cvm_e2e::tools::chart_dir();
    let mut cmd = std::process::Command::new(&c.helm);
    // helm built from modules defaults to an old Kubernetes; tell it the one we run.
    cmd.args(args)
        .arg(chart)
        .args(["--kube-version", cvm_e2e::tools::KUBERNETES_VERSION])
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("cvm-helm-cache"),
        );
    Ok(cmd.output()?)
}

#[test]
fn helm_lints_and_renders_the_chart() -> Result<()> {
    let c = shared();
    let lint = helm(&c, &["lint", "--strict"])?;
    let lint_out = String::from_utf8_lossy(&lint.stdout);
    assert!(
        lint.status.success(),
        "{lint_out}{}",
        String::from_utf8_lossy(&lint.stderr)
    );
    assert!(lint_out.contains("0 chart(s) failed"), "{lint_out}");
    let out = helm(&c, &["template", "demo"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_slice(&out.stdout)
        .map(serde::Deserialize::deserialize)
        .collect::<Result<Vec<serde_json::Value>, _>>()?;
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert!(kinds.contains(&"Deployment"), "{kinds:?}");
    let dep = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .context("no Deployment")?;
    assert_eq!(dep["metadata"]["name"], "demo-operator");

    // The values schema refuses a wrong value, naming it.
    for (set, says) in [
        ("nodePlugin.platform=simulated", "/nodePlugin/platform"),
        ("operator.replicas=0", "/operator/replicas"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("nodePlugin.sim.tees={sgx}", "/nodePlugin/sim/tees"),
        ("nodePlugin.selectNodesBy=all", "/nodePlugin/selectNodesBy"),
        ("image.repository=x", "image"),
    ] {
        let bad = helm(&c, &["template", "demo", "--set", set])?;
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(!bad.status.success(), "{set} was accepted");
        assert!(err.contains(says), "{set}: {err}");
    }
    // The simulated platform is installable: its plugin gets the flags it needs.
    let sim = helm(
        &c,
        &[
            "template",
            "demo",
            "--set",
            "nodePlugin.platform=sim",
            "--set",
            "nodePlugin.sim.tees={sev-snp,tdx}",
        ],
    )?;
    assert!(
        sim.status.success(),
        "{}",
        String::from_utf8_lossy(&sim.stderr)
    );
    let text = String::from_utf8_lossy(&sim.stdout);
    for arg in [
        "--platform=sim",
        "--sim-root-dir=/var/lib/cvm-node-plugin/sim-root",
        "--sim-tee=sev-snp",
        "--sim-tee=tdx",
        "--sim-slots=16",
        "--sim-root-seed=/etc/cvm-node-plugin/sim-demo-root",
    ] {
        assert!(text.contains(arg), "{arg} missing from the DaemonSet");
    }
    // The published demo root travels as a ConfigMap, both bundles in it.
    let docs = |out: &Output| -> Result<Vec<serde_json::Value>> {
        Ok(serde_yaml::Deserializer::from_slice(&out.stdout)
            .map(serde::Deserialize::deserialize)
            .collect::<Result<Vec<serde_json::Value>, _>>()?)
    };
    let sim_docs = docs(&sim)?;
    let root = sim_docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "demo-sim-demo-root")
        .context("no demo root ConfigMap")?;
    for f in ["snp-sim-platform.pem", "tdx-sim-platform.pem"] {
        assert!(
            root["data"][f]
                .as_str()
                .is_some_and(|p| p.contains("BEGIN")),
            "{f}"
        );
    }
    // Without NFD: the plugin runs on every candidate node (tolerating taints) and labels
    // it itself; with NFD, a NodeFeatureRule labels TEE hosts for the default selection.
    let cand = helm(
        &c,
        &[
            "template",
            "demo",
            "--set",
            "nodePlugin.selectNodesBy=candidates",
            "--set",
            "nodeFeatureRule.enabled=true",
            "--set",
            "image.registry=registry.example/cvm",
            "--set",
            "image.tag=1.2.3",
        ],
    )?;
    assert!(
        cand.status.success(),
        "{}",
        String::from_utf8_lossy(&cand.stderr)
    );
    let cand_docs = docs(&cand)?;
    let ds = cand_docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .context("no DaemonSet")?;
    let pod = &ds["spec"]["template"]["spec"];
    assert!(pod["affinity"].is_null(), "{pod}");
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(pod["tolerations"][0]["operator"], "Exists");
    assert_eq!(
        pod["containers"][0]["image"],
        "registry.example/cvm/cvm-node-plugin:1.2.3"
    );
    let rule = cand_docs
        .iter()
        .find(|d| d["kind"] == "NodeFeatureRule")
        .context("no NodeFeatureRule")?;
    assert_eq!(
        rule["spec"]["rules"][0]["labels"]["cvmp.io/tee-host"],
        "true"
    );
    // Defaults: TEE-labelled nodes only (cvmp.io/tee-host among them), CRDs as templates.
    let defaults = docs(&out)?;
    let ds = defaults
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .context("no DaemonSet")?;
    let terms = ds["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
        ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        .to_string();
    assert!(terms.contains("cvmp.io/tee-host"), "{terms}");
    let crds: Vec<&serde_json::Value> = defaults
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .collect();
    assert_eq!(crds.len(), 4);
    assert!(crds
        .iter()
        .all(|d| d["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"));
    Ok(())
}
