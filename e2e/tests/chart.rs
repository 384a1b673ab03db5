//! The Helm chart installed with helm into the real API server, and the trust boundary
//! it sets up: a node plugin's bound token (node-name claim) may write only the CVMs bound
//! to its own node, never the operator's verdict, and only its own Node; and only the
//! migrations from or to its node, only its own share of them (the target the evidence and
//! `TargetPrepared`, the source `Transferred`), never the operator's decision.

use anyhow::{bail, Context, Result};
use cvm_crds::conditions::new_condition;
use cvm_crds::cvm::{Evidence, PlatformFacts};
use cvm_crds::{ConditionType, ConfidentialVM, ConfidentialVMMigration};
use cvm_e2e::shared::{default_nodes, ClusterInfo};
use cvm_e2e::{ControlPlane, Options};
use cvm_node_plugin::status::{
    apply_patch, time_from_unix, FIELD_MANAGER, MIGRATION_SOURCE_MANAGER, MIGRATION_TARGET_MANAGER,
    REASON_RUNNING,
};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, CustomResourceExt};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

const RELEASE: &str = "chart-test";
const NS: &str = "cvm-system";

fn chart_dir() -> std::path::PathBuf {
    cvm_e2e::tools::chart_dir()
}

fn helm_install(c: &ClusterInfo) -> Result<String> {
    let chart = chart_dir();
    helm(
        c,
        &[
            "install",
            RELEASE,
            &chart.display().to_string(),
            "-n",
            NS,
            "--create-namespace",
        ],
    )
}

/// A control plane of the test's own with no CRDs: the chart installs them.
fn bare_cluster() -> Result<(ControlPlane, ClusterInfo)> {
    let cp = ControlPlane::start(Options {
        dir: None,
        api_port: None,
        nodes: default_nodes(),
        crds: Some(Vec::new()),
    })?;
    let info = ClusterInfo {
        kubeconfig: cp.kubeconfig().to_path_buf(),
        kubectl: cp.kubectl(),
        helm: cp.helm(),
        bin: cp.bin_dir().to_path_buf(),
    };
    Ok((cp, info))
}

/// Runs `helm ARGS --kubeconfig …` with a private cache and config.
fn helm(c: &ClusterInfo, args: &[&str]) -> Result<String> {
    let out = cvm_e2e::tools::helm_cmd(&c.helm, &c.kubeconfig)
        .args(args)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "helm {} failed: {text}",
            args.first().copied().unwrap_or_default()
        );
    }
    Ok(text)
}

async fn plugin_client(c: &ClusterInfo, admin: &Client, node: &str) -> Result<Client> {
    let sa = format!("{RELEASE}-node-plugin");
    cvm_e2e::tokens::node_bound_client(&c.kubeconfig, admin, NS, &sa, node).await
}

fn cvm_api(client: Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("cvmp.io", "v1alpha1", "ConfidentialVM");
    Api::namespaced_with(client, ns, &ApiResource::from_gvk(&gvk))
}

async fn bound_cvm(admin: &Client, ns: &str, name: &str, node: &str) -> Result<()> {
    let api = cvm_api(admin.clone(), ns);
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVM",
        "metadata": {"name": name},
        "spec": {"tee": {"type": "SEV-SNP"}, "resources": {"vcpus": 1, "memoryMiB": 512},
                 "boot": {"firmware": {"name": "ovmf"}}},
    }))?;
    api.create(&PostParams::default(), &obj).await?;
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"nodeName": node}})),
    )
    .await?;
    Ok(())
}

fn migration_api(client: Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("cvmp.io", "v1alpha1", "ConfidentialVMMigration");
    Api::namespaced_with(client, ns, &ApiResource::from_gvk(&gvk))
}

/// A migration of `cvm` as the operator has accepted it: from `source` to `target`.
async fn accepted_migration(
    admin: &Client,
    ns: &str,
    name: &str,
    cvm: &str,
    source: &str,
    target: &str,
) -> Result<()> {
    let api = migration_api(admin.clone(), ns);
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVMMigration",
        "metadata": {"name": name},
        "spec": {"cvmName": cvm, "targetNode": target},
    }))?;
    api.create(&PostParams::default(), &obj).await?;
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "phase": "Pending", "sourceNode": source, "targetNode": target,
            "message": "preparing the target",
        }})),
    )
    .await?;
    Ok(())
}

/// The apply a node plugin makes of one condition (and the target's evidence).
fn plugin_migration_patch(cond: &str, status: &str, evidence: bool) -> serde_json::Value {
    let mut p = json!({
        "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVMMigration",
        "status": {"conditions": [{
            "type": cond, "status": status, "reason": "Probe", "message": "probe",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }]},
    });
    if evidence {
        p["status"]["targetEvidence"] = json!({
            "format": "sev-snp-report", "report": "AA==", "collectedAt": "2026-01-01T00:00:00Z",
        });
    }
    p
}

/// The status apply the node plugin makes for a running guest (`status::apply_patch`).
fn plugin_apply() -> Result<serde_json::Value> {
    let platform: PlatformFacts = serde_json::from_value(json!({
        "guestState": "Running", "simulated": true, "message": "running",
    }))?;
    let evidence: Evidence = serde_json::from_value(json!({
        "format": "sev-snp-report", "report": "AA==", "collectedAt": "2026-01-01T00:00:00Z",
    }))?;
    let launched = new_condition(
        ConditionType::Launched,
        true,
        REASON_RUNNING,
        "guest running",
        Some(1),
        time_from_unix(1_767_225_600),
    );
    Ok(apply_patch(&platform, Some(&evidence), &launched))
}

fn denial(r: kube::Result<DynamicObject>) -> Option<String> {
    match r {
        Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422 => Some(s.message),
        _ => None,
    }
}

/// The validation of `node-restriction.yaml` that carries `message`.
fn policy_rule<'a>(policy: &'a str, message: &str) -> Option<&'a str> {
    policy
        .split("    - expression:")
        .find(|rule| rule.contains(message))
}

/// The status fields of a CRD's served version.
fn status_fields(crd: &CustomResourceDefinition) -> Vec<String> {
    crd.spec
        .versions
        .iter()
        .filter_map(|v| v.schema.as_ref()?.open_api_v3_schema.as_ref())
        .filter_map(|s| s.properties.as_ref()?.get("status")?.properties.as_ref())
        .flat_map(|p| p.keys().cloned())
        .collect()
}

/// The policy lists what a plugin may not touch, so each status field the API gains is the
/// operator's until the policy says otherwise: every field but the plugin's own must be
/// held equal by the rule (observedGeneration once slipped through this way).
#[test]
fn node_restriction_holds_every_status_field_but_the_plugins() -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/cvm-operator/templates/node-restriction.yaml");
    let policy = std::fs::read_to_string(&path)?;
    let cases = [
        (
            ConfidentialVM::crd(),
            "a node plugin may write only status.platform, status.evidence and the Launched condition",
            &["platform", "evidence", "conditions"][..],
        ),
        (
            ConfidentialVMMigration::crd(),
            "a node plugin may write only a migration's targetEvidence and its TargetPrepared and Transferred conditions",
            &["targetEvidence", "conditions"][..],
        ),
    ];
    for (crd, message, plugins) in cases {
        let kind = &crd.spec.names.kind;
        let rule = policy_rule(&policy, message).with_context(|| format!("no rule for {kind}"))?;
        let fields = status_fields(&crd);
        assert!(fields.len() > plugins.len(), "{kind}: {fields:?}");
        for f in fields.iter().filter(|f| !plugins.contains(&f.as_str())) {
            let held = format!("object.?status.?{f} == oldObject.?status.?{f}");
            assert!(
                rule.contains(&held),
                "{kind}: the node restriction lets a plugin write status.{f}; add `{held}`"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn helm_installs_the_chart_and_node_restriction_holds() -> Result<()> {
    let (_cp, c) = bare_cluster()?;
    let out = helm_install(&c)?;
    assert!(out.contains("STATUS: deployed"), "{out}");
    // NOTES.txt tells what to do next.
    assert!(
        out.contains("kubectl wait --for=condition=Verified") && out.contains("kubectl cvm attest"),
        "{out}"
    );
    let admin = c.client().await?;

    let nodes: Api<Node> = Api::all(admin.clone());
    let names: Vec<String> = nodes
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    let (mine, other) = (names[0].clone(), names[1].clone());

    let ns = "chart-vap";
    let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(admin.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
    )
    .await?;
    bound_cvm(&admin, ns, "mine", &mine).await?;
    bound_cvm(&admin, ns, "other", &other).await?;
    let plugin = plugin_client(&c, &admin, &mine).await?;
    let as_plugin = cvm_api(plugin.clone(), ns);

    // The policy takes effect once the API server's admission has loaded it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let msg = loop {
        let r = as_plugin
            .patch_status(
                "other",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"platform": {"message": "x"}}})),
            )
            .await;
        if let Some(m) = denial(r) {
            break m;
        }
        if Instant::now() > deadline {
            bail!("the node restriction policy never denied a write to another node's CVM");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        msg.contains(&format!(
            "the node plugin of node {mine} may only write CVMs bound to that node"
        )),
        "{msg}"
    );

    // Its own CVM: platform facts are fine…
    as_plugin
        .patch_status(
            "mine",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"platform": {"message": "launching"}}})),
        )
        .await
        .context("a plugin writes platform facts of its own CVM")?;
    // …the operator's verdict is not.
    let forged = json!({"status": {"attestation": {"status": "affirming", "verifiedAt": "2026-01-01T00:00:00Z", "verifier": "me"}}});
    let m = denial(
        as_plugin
            .patch_status("mine", &PatchParams::default(), &Patch::Merge(forged))
            .await,
    )
    .context("forging the verdict must be denied")?;
    assert!(
        m.contains("may write only status.platform, status.evidence and the Launched condition"),
        "{m}"
    );
    let rebind = json!({"status": {"nodeName": other}});
    assert!(denial(
        as_plugin
            .patch_status("mine", &PatchParams::default(), &Patch::Merge(rebind))
            .await
    )
    .is_some());

    // status.observedGeneration is the operator's: a plugin may neither set nor change it,
    // alone or inside an otherwise legitimate apply.
    cvm_api(admin.clone(), ns)
        .patch_status(
            "mine",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"observedGeneration": 1}})),
        )
        .await?;
    let plugin_pp = PatchParams::apply(FIELD_MANAGER).force();
    let generation = json!({"status": {"observedGeneration": 7}});
    let m = denial(
        as_plugin
            .patch_status("mine", &PatchParams::default(), &Patch::Merge(generation))
            .await,
    )
    .context("a plugin writing status.observedGeneration must be denied")?;
    assert!(
        m.contains("may write only status.platform, status.evidence and the Launched condition"),
        "{m}"
    );
    let mut with_generation = plugin_apply()?;
    with_generation["status"]["observedGeneration"] = json!(7);
    assert!(
        denial(
            as_plugin
                .patch_status("mine", &plugin_pp, &Patch::Apply(with_generation))
                .await
        )
        .is_some(),
        "observedGeneration slipped in with the plugin's own fields must be denied"
    );
    // The plugin's own share, as it applies it: platform, evidence, Launched.
    as_plugin
        .patch_status("mine", &plugin_pp, &Patch::Apply(plugin_apply()?))
        .await
        .context("a plugin applies platform, evidence and Launched to its own CVM")?;
    let st = cvm_api(admin.clone(), ns).get("mine").await?.data["status"].clone();
    assert_eq!(st["observedGeneration"], 1, "{st}");
    assert_eq!(st["evidence"]["format"], "sev-snp-report", "{st}");
    assert_eq!(st["platform"]["guestState"], "Running", "{st}");
    assert_eq!(st["conditions"][0]["type"], "Launched", "{st}");

    // Nodes: its own, yes; another, no.
    let plugin_nodes: Api<Node> = Api::all(plugin.clone());
    plugin_nodes
        .patch(
            &mine,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"cvmp.io/probe": "1"}}})),
        )
        .await
        .context("a plugin labels its own Node")?;
    match plugin_nodes
        .patch(
            &other,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"cvmp.io/probe": "1"}}})),
        )
        .await
    {
        Err(kube::Error::Api(s)) => assert!(
            s.message.contains(&format!("may not modify Node {other}")),
            "{}",
            s.message
        ),
        other => bail!("labelling another node must be denied, got {other:?}"),
    }

    // Migrations: "mv" moves "mine"'s neighbour from `other` to `mine`.
    accepted_migration(&admin, ns, "mv", "other", &other, &mine).await?;
    let as_target = migration_api(plugin.clone(), ns);
    let target_pp = PatchParams::apply(MIGRATION_TARGET_MANAGER).force();
    let source_pp = PatchParams::apply(MIGRATION_SOURCE_MANAGER).force();
    as_target
        .patch_status(
            "mv",
            &target_pp,
            &Patch::Apply(plugin_migration_patch("TargetPrepared", "True", true)),
        )
        .await
        .context("the target's plugin reports the receiving guest's evidence")?;
    let m = denial(
        as_target
            .patch_status(
                "mv",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Succeeded"}})),
            )
            .await,
    )
    .context("a plugin changing the migration's phase must be denied")?;
    assert!(
        m.contains("may write only a migration's targetEvidence and its TargetPrepared and Transferred conditions"),
        "{m}"
    );
    let forged = json!({"status": {"targetAttestation": {"status": "affirming", "verifiedAt": "2026-01-01T00:00:00Z", "verifier": "me"}}});
    assert!(
        denial(
            as_target
                .patch_status("mv", &PatchParams::default(), &Patch::Merge(forged))
                .await
        )
        .is_some(),
        "a plugin must not write the operator's appraisal"
    );
    let m = denial(
        as_target
            .patch_status(
                "mv",
                &source_pp,
                &Patch::Apply(plugin_migration_patch("Transferred", "True", false)),
            )
            .await,
    )
    .context("the target claiming the transfer must be denied")?;
    assert!(
        m.contains(&format!(
            "only the source node plugin may write the Transferred condition; {mine} is not the source"
        )),
        "{m}"
    );

    // The source's plugin: the transfer is its to report, the evidence is not.
    let source_plugin = plugin_client(&c, &admin, &other).await?;
    let as_source = migration_api(source_plugin, ns);
    as_source
        .patch_status(
            "mv",
            &source_pp,
            &Patch::Apply(plugin_migration_patch("Transferred", "Unknown", false)),
        )
        .await
        .context("the source's plugin reports the transfer")?;
    // (A different verdict: rewriting the same values would change nothing, and is allowed.)
    let m = denial(
        as_source
            .patch_status(
                "mv",
                &target_pp,
                &Patch::Apply(plugin_migration_patch("TargetPrepared", "False", false)),
            )
            .await,
    )
    .context("the source writing the target's evidence must be denied")?;
    assert!(
        m.contains(&format!(
            "only the target node plugin may write targetEvidence and TargetPrepared; {other} is not the target"
        )),
        "{m}"
    );
    // Each share survives the other's apply (distinct field managers), and the
    // operator's fields are untouched.
    let now = migration_api(admin.clone(), ns).get("mv").await?;
    let st = &now.data["status"];
    assert_eq!(st["phase"], "Pending", "{st}");
    assert_eq!(st["targetEvidence"]["format"], "sev-snp-report", "{st}");
    let types: Vec<&str> = st["conditions"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["type"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(types, ["TargetPrepared", "Transferred"], "{st}");

    // A migration neither from nor to the plugin's node: refused outright.
    accepted_migration(&admin, ns, "elsewhere", "other", "tee-gone-1", "tee-gone-2").await?;
    let m = denial(
        as_target
            .patch_status(
                "elsewhere",
                &target_pp,
                &Patch::Apply(plugin_migration_patch("TargetPrepared", "True", true)),
            )
            .await,
    )
    .context("a plugin writing another node's migration must be denied")?;
    assert!(
        m.contains(&format!(
            "the node plugin of node {mine} may only write migrations from or to that node"
        )),
        "{m}"
    );
    Ok(())
}

/// The chart as an older release shipped it: the same, with one later API field
/// (`status.platform.launchId`) missing from the ConfidentialVM CRD.
fn older_chart(dir: &Path) -> Result<std::path::PathBuf> {
    let to = dir.join("cvm-operator");
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(chart_dir())
        .arg(&to)
        .status()?;
    if !status.success() {
        bail!("copying the chart failed");
    }
    let path = to.join("templates/crds.yaml");
    let text = std::fs::read_to_string(&path)?;
    let lines: Vec<&str> = text.lines().collect();
    let (mut out, mut skipping) = (Vec::new(), None::<usize>);
    for l in lines {
        let indent = l.len() - l.trim_start().len();
        if let Some(at) = skipping {
            if indent > at {
                continue;
            }
            skipping = None;
        }
        if l.trim_start() == "launchId:" {
            skipping = Some(indent);
            continue;
        }
        out.push(l);
    }
    let older = out.join("\n") + "\n";
    if older == text {
        bail!("the chart's CRDs have no launchId to remove");
    }
    std::fs::write(&path, older)?;
    Ok(to)
}

fn platform_props(crd: &CustomResourceDefinition) -> Vec<String> {
    let schema = cvm_crds::schema::openapi_schema(crd).unwrap_or_default();
    schema["properties"]["status"]["properties"]["platform"]["properties"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// `helm upgrade` updates the CRDs (a later field arrives and is kept, not pruned) and the
/// image; `helm uninstall` removes the workloads and keeps the CRDs and every CVM.
#[tokio::test]
async fn helm_upgrade_brings_new_crd_fields_and_uninstall_keeps_the_cvms() -> Result<()> {
    let (_cp, c) = bare_cluster()?;
    let tmp = tempfile::tempdir()?;
    let older = older_chart(tmp.path())?;
    let older = older.display().to_string();
    helm(
        &c,
        &["install", RELEASE, &older, "-n", NS, "--create-namespace"],
    )?;
    let admin = c.client().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let crd = crds.get("confidentialvms.cvmp.io").await?;
    assert!(!platform_props(&crd).contains(&"launchId".to_string()));

    let current = chart_dir().display().to_string();
    let out = helm(
        &c,
        &[
            "upgrade",
            RELEASE,
            &current,
            "-n",
            NS,
            "--set",
            "image.tag=0.2.0",
        ],
    )?;
    assert!(out.contains("STATUS: deployed"), "{out}");
    // The API server serves the new schema once the CRD is re-established.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !platform_props(&crds.get("confidentialvms.cvmp.io").await?)
        .contains(&"launchId".to_string())
    {
        if Instant::now() > deadline {
            bail!("helm upgrade did not update the ConfidentialVM CRD");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deploys: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(admin.clone(), NS);
    let d = deploys.get(&format!("{RELEASE}-operator")).await?;
    let image = d
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.containers.first().and_then(|c| c.image.clone()));
    assert_eq!(image.as_deref(), Some("cvm-operator:0.2.0"));

    // A field of the new schema is stored, not pruned.
    let ns = "chart-upgrade";
    let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(admin.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
    )
    .await?;
    let node = default_nodes()[0].name.clone();
    bound_cvm(&admin, ns, "kept", &node).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        cvm_api(admin.clone(), ns)
            .patch_status(
                "kept",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"platform": {"launchId": "00ff"}}})),
            )
            .await?;
        let st = cvm_api(admin.clone(), ns).get("kept").await?.data["status"].clone();
        if st["platform"]["launchId"] == "00ff" {
            break;
        }
        if Instant::now() > deadline {
            bail!("status.platform.launchId is pruned after the upgrade: {st}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let out = helm(&c, &["uninstall", RELEASE, "-n", NS])?;
    assert!(out.contains("uninstalled"), "{out}");
    assert!(
        deploys
            .get_opt(&format!("{RELEASE}-operator"))
            .await?
            .is_none(),
        "the operator's Deployment goes with the release"
    );
    assert!(crds.get_opt("confidentialvms.cvmp.io").await?.is_some());
    assert!(
        cvm_api(admin.clone(), ns).get_opt("kept").await?.is_some(),
        "the CVMs stay (helm.sh/resource-policy: keep on the CRDs)"
    );
    Ok(())
}
