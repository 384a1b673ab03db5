//! The chart's user roles (`templates/user-roles.yaml`), judged by a real kube-apiserver's
//! RBAC for real identities: client certificates issued through the CSR API to alice (group
//! team-a, which `edit` is bound to in namespace team-a), bob (`view` in team-a) and carol
//! (`view` cluster-wide). The built-in edit, view and admin ClusterRoles pick up the
//! cvmp.io rules through kube-controller-manager's clusterrole-aggregation controller.
//!
//! Nobody but the operator and the node plugins may write a CVM's or a migration's status:
//! it carries the attestation verdict, and a user who could write it could forge Verified.

use anyhow::{bail, Context, Result};
use cvm_e2e::shared::{shared, ClusterInfo};
use cvm_e2e::{identity, tools, wait};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TEAM: &str = "team-a";
const OTHER_NS: &str = "team-b";
const READ: [&str; 3] = ["get", "list", "watch"];
const MANAGE: [&str; 8] = [
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "get",
    "list",
    "watch",
];
const WAIT: Duration = Duration::from_secs(30);
/// The role template's path in the chart, as `helm template --show-only` names it.
const TEMPLATE: &str = "templates/user-roles.yaml";

// ---------------------------------------------------------------------------------------
// Rendering

/// `helm template` of the chart with `args`; the exit status and stdout+stderr.
fn helm_template(args: &[&str]) -> Result<(bool, String)> {
    let bin = tools::bin_dir()?;
    // Rendering reads no cluster; the kubeconfig only has to be a path.
    let out = tools::helm_cmd(&tools::tool(&bin, "helm"), Path::new("/nonexistent"))
        .args(["template", "roles-test"])
        .arg(tools::chart_dir())
        // The chart's kubeVersion constraint: without a cluster helm assumes v1.20.
        .args(["--kube-version", tools::KUBERNETES_VERSION])
        .args(args)
        .output()
        .context("running helm template")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

fn documents(yaml: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// The `aggregate-to-…` label of a rendered object, if it has one.
fn aggregates_to(doc: &Value) -> Option<String> {
    doc["metadata"]["labels"].as_object().and_then(|l| {
        l.keys().find_map(|k| {
            k.strip_prefix("rbac.authorization.k8s.io/aggregate-to-")
                .map(str::to_string)
        })
    })
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The verbs `rules` (JSON, as rendered or served) grant on `resource` of cvmp.io.
fn verbs_on(rules: &Value, resource: &str) -> BTreeSet<String> {
    rules
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| {
            let groups = strings(&r["apiGroups"]);
            let resources = strings(&r["resources"]);
            (groups.contains(&"cvmp.io") || groups.contains(&"*"))
                && (resources.contains(&resource) || resources.contains(&"*"))
        })
        .flat_map(|r| strings(&r["verbs"]).into_iter().map(str::to_string))
        .collect()
}

/// Every cvmp.io rule of `rules` that grants more than reading on a `*/status` resource.
fn status_writes(rules: &Value) -> Vec<String> {
    let mut bad = Vec::new();
    for r in rules.as_array().into_iter().flatten() {
        let groups = strings(&r["apiGroups"]);
        if !(groups.contains(&"cvmp.io") || groups.contains(&"*")) {
            continue;
        }
        let writes: Vec<&str> = strings(&r["verbs"])
            .into_iter()
            .filter(|v| !READ.contains(v))
            .collect();
        let status: Vec<&str> = strings(&r["resources"])
            .into_iter()
            .filter(|x| x.ends_with("/status") || *x == "*" || *x == "*/*")
            .collect();
        if !writes.is_empty() && !status.is_empty() {
            bad.push(format!("{writes:?} on {status:?}"));
        }
    }
    bad
}

fn set(verbs: &[&str]) -> BTreeSet<String> {
    verbs.iter().map(|v| v.to_string()).collect()
}

/// Offline: the rendered roles grant what the docs say and no write on any status, and
/// `rbac.aggregateToDefaultRoles=false` renders none of them.
#[test]
fn rendered_user_roles_never_write_status_and_switch_off() -> Result<()> {
    let (ok, text) = helm_template(&[])?;
    assert!(ok, "helm template failed: {text}");
    let docs = documents(&text)?;
    let user_roles: Vec<&Value> = docs.iter().filter(|d| aggregates_to(d).is_some()).collect();
    let mut names: Vec<(String, String)> = user_roles
        .iter()
        .map(|d| {
            (
                d["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                aggregates_to(d).unwrap_or_default(),
            )
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("cvmp.io:admin".to_string(), "admin".to_string()),
            ("cvmp.io:edit".to_string(), "edit".to_string()),
            ("cvmp.io:view".to_string(), "view".to_string()),
        ]
    );
    for role in &user_roles {
        let name = role["metadata"]["name"].as_str().unwrap_or_default();
        assert_eq!(role["kind"], "ClusterRole", "{name}");
        let labels = &role["metadata"]["labels"];
        assert_eq!(labels["app.kubernetes.io/name"], "cvm-operator", "{name}");
        assert_eq!(labels["app.kubernetes.io/instance"], "roles-test", "{name}");
        assert!(labels["app.kubernetes.io/version"].is_string(), "{name}");
        let rules = &role["rules"];
        for r in rules.as_array().into_iter().flatten() {
            assert_eq!(strings(&r["apiGroups"]), ["cvmp.io"], "{name}: {r}");
            for field in ["verbs", "resources"] {
                assert!(
                    !strings(&r[field]).iter().any(|x| x.contains('*')),
                    "{name}: a wildcard grants more than the chart knows of: {r}"
                );
            }
            assert!(r.get("resourceNames").is_none(), "{name}: {r}");
        }
        let bad = status_writes(rules);
        assert!(
            bad.is_empty(),
            "{name} lets users write status, where the verdict lives: {bad:?}"
        );
        assert_eq!(
            verbs_on(rules, "attestationpolicies"),
            set(&READ),
            "{name}: users read policies, only cluster admins write them"
        );
        // hostpins are the operator's record of first-seen hosts: no user role names them.
        assert!(verbs_on(rules, "hostpins").is_empty(), "{name}");
        let (objects, status) = if name == "cvmp.io:view" {
            (set(&READ), set(&READ))
        } else {
            (set(&MANAGE), set(&["get"]))
        };
        for kind in ["confidentialvms", "confidentialvmmigrations"] {
            assert_eq!(verbs_on(rules, kind), objects, "{name} on {kind}");
            assert_eq!(
                verbs_on(rules, &format!("{kind}/status")),
                status,
                "{name} on {kind}/status"
            );
        }
    }

    // Switched off: not one aggregated role in the whole chart.
    let (ok, text) = helm_template(&["--set", "rbac.aggregateToDefaultRoles=false"])?;
    assert!(ok, "helm template failed: {text}");
    let off = documents(&text)?;
    assert!(off.len() + user_roles.len() == docs.len(), "{text}");
    assert!(
        off.iter().all(|d| aggregates_to(d).is_none()
            && !d["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("cvmp.io:"))),
        "{text}"
    );
    let (ok, text) = helm_template(&[
        "--set",
        "rbac.aggregateToDefaultRoles=false",
        "--show-only",
        TEMPLATE,
    ])?;
    assert!(
        !ok && text.contains("could not find template"),
        "the template must render empty: {text}"
    );

    // values.schema.json knows the switch and its type.
    let (ok, text) = helm_template(&["--set", "rbac.aggregateToDefaultRoles=yes"])?;
    assert!(
        !ok && text.contains("/rbac/aggregateToDefaultRoles") && text.contains("want boolean"),
        "{text}"
    );
    let (ok, text) = helm_template(&["--set", "rbac.aggregateToEdit=true"])?;
    assert!(!ok && text.contains("aggregateToEdit"), "{text}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The cluster

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("cvmp.io", "v1alpha1", kind), plural)
}

fn cvms(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        ns,
        &resource("ConfidentialVM", "confidentialvms"),
    )
}

fn migrations(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        ns,
        &resource("ConfidentialVMMigration", "confidentialvmmigrations"),
    )
}

fn policies(client: &Client) -> Api<DynamicObject> {
    Api::all_with(
        client.clone(),
        &resource("AttestationPolicy", "attestationpolicies"),
    )
}

fn example(file: &str) -> Result<Vec<Value>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(file);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    documents(&text)
}

/// The SNP example as written, in namespace `ns`.
fn example_cvm(ns: &str) -> Result<DynamicObject> {
    let mut v = example("sev-snp-cvm.yaml")?
        .into_iter()
        .next()
        .context("examples/sev-snp-cvm.yaml is empty")?;
    v["metadata"]["namespace"] = json!(ns);
    Ok(serde_json::from_value(v)?)
}

fn migration(name: &str, cvm: &str) -> Result<DynamicObject> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "cvmp.io/v1alpha1", "kind": "ConfidentialVMMigration",
        "metadata": {"name": name},
        "spec": {"cvmName": cvm},
    }))?)
}

/// The verdict a forger would write.
fn forged_verdict() -> Patch<Value> {
    Patch::Merge(json!({"status": {"attestation": {
        "status": "affirming", "verifiedAt": "2026-01-01T00:00:00Z", "verifier": "me",
    }}}))
}

/// The API server's RBAC refusal of `r` for `user`: HTTP 403, reason Forbidden, naming
/// the user (so the request really was judged as that identity). Its message, else an error.
fn forbidden<T: std::fmt::Debug>(r: kube::Result<T>, user: &str, what: &str) -> Result<String> {
    match r {
        Err(kube::Error::Api(s)) if s.code == 403 && s.reason == "Forbidden" => {
            let who = format!("User \"{user}\" cannot");
            if !s.message.contains(&who) {
                bail!("{what}: refused, but not as {user}: {}", s.message);
            }
            Ok(s.message)
        }
        other => bail!("{what}: expected HTTP 403 Forbidden for {user}, got {other:?}"),
    }
}

async fn create_namespace(admin: &Client, name: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(admin.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating namespace {name}")),
    }
}

/// Renders only the user roles and applies them as the admin, as `helm install` would.
fn install_roles(c: &ClusterInfo, dir: &Path) -> Result<()> {
    let (ok, text) = helm_template(&["--show-only", TEMPLATE])?;
    if !ok {
        bail!("rendering {TEMPLATE}: {text}");
    }
    let file = dir.join("user-roles.yaml");
    std::fs::write(&file, text)?;
    let out = c.kubectl().arg("apply").arg("-f").arg(&file).output()?;
    if !out.status.success() {
        bail!(
            "kubectl apply of the user roles: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

async fn bind(admin: &Client) -> Result<()> {
    let rbs: Api<RoleBinding> = Api::namespaced(admin.clone(), TEAM);
    let crbs: Api<ClusterRoleBinding> = Api::all(admin.clone());
    let pp = PatchParams::apply("roles-test").force();
    let binding = |name: &str, role: &str, kind: &str, subject: &str| {
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": subject}],
        })
    };
    // The built-in roles, as a cluster admin binds them; alice gets edit through her group.
    for (name, role, kind, subject) in [
        ("team-a-edit", "edit", "Group", TEAM),
        ("bob-view", "view", "User", "bob"),
    ] {
        let mut b = binding(name, role, kind, subject);
        b["kind"] = json!("RoleBinding");
        rbs.patch(name, &pp, &Patch::Apply(b)).await?;
    }
    let mut b = binding("roles-test-carol-view", "view", "User", "carol");
    b["kind"] = json!("ClusterRoleBinding");
    crbs.patch("roles-test-carol-view", &pp, &Patch::Apply(b))
        .await?;
    Ok(())
}

/// Waits until kube-controller-manager has aggregated the cvmp.io rules into the built-in
/// `role`: `verb` on confidentialvms.
async fn aggregated(admin: &Client, role: &str, verb: &str) -> Result<ClusterRole> {
    let api: Api<ClusterRole> = Api::all(admin.clone());
    wait::until(
        &api,
        role,
        WAIT,
        &format!("the cvmp.io rules aggregated (`{verb}` on confidentialvms)"),
        |r| {
            serde_json::to_value(&r.rules)
                .map(|rules| verbs_on(&rules, "confidentialvms").contains(verb))
                .unwrap_or(false)
        },
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}; is kube-controller-manager's clusterrole-aggregation controller running?"
        )
    })
}

struct Users {
    alice: Client,
    bob: Client,
    carol: Client,
}

async fn users(c: &ClusterInfo, admin: &Client, dir: &Path) -> Result<Users> {
    let mint = |user: &'static str, group: Option<&'static str>| {
        let out: PathBuf = dir.join(format!("{user}.kubeconfig"));
        async move {
            let kc = identity::user_kubeconfig(admin, &c.kubeconfig, user, group, &out).await?;
            identity::client(&kc).await
        }
    };
    Ok(Users {
        alice: mint("alice", Some(TEAM)).await?,
        bob: mint("bob", None).await?,
        carol: mint("carol", None).await?,
    })
}

/// A namespace's editor manages its CVMs and migrations and nothing more; its viewer
/// reads them; neither writes a status or a policy; a cluster-wide viewer reads policies.
#[tokio::test]
async fn edit_and_view_reach_cvms_through_aggregation_but_never_status() -> Result<()> {
    let started = Instant::now();
    let c = shared();
    let cluster_up = started.elapsed();
    let admin = c.client().await?;
    let tmp = tempfile::tempdir()?;

    install_roles(&c, tmp.path())?;
    create_namespace(&admin, TEAM).await?;
    create_namespace(&admin, OTHER_NS).await?;
    bind(&admin).await?;
    let mut built_in = Vec::new();
    for (role, verb) in [("edit", "create"), ("admin", "create"), ("view", "get")] {
        built_in.push((role, aggregated(&admin, role, verb).await?));
    }
    let aggregation = started.elapsed() - cluster_up;
    // The built-in roles as served: what the chart added, with everything else aggregated.
    for (role, r) in &built_in {
        let rules = serde_json::to_value(&r.rules)?;
        let bad = status_writes(&rules);
        assert!(
            bad.is_empty(),
            "built-in {role} writes cvmp.io status: {bad:?}"
        );
        assert_eq!(
            verbs_on(&rules, "attestationpolicies"),
            set(&READ),
            "built-in {role} on attestationpolicies"
        );
    }
    let view_rules = serde_json::to_value(&built_in[2].1.rules)?;
    assert_eq!(
        verbs_on(&view_rules, "confidentialvms"),
        set(&READ),
        "view only reads"
    );

    let u = users(&c, &admin, tmp.path()).await?;
    let cvm = example_cvm(TEAM)?;
    let name = cvm
        .metadata
        .name
        .clone()
        .context("the example has a name")?;

    // alice: edit in team-a, through group team-a.
    let alice_cvms = cvms(&u.alice, TEAM);
    alice_cvms
        .create(&PostParams::default(), &cvm)
        .await
        .context("an editor creates a CVM in her namespace")?;
    alice_cvms
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"attestation": {"nonce": "fedcba9876543210"}}})),
        )
        .await
        .context("an editor asks for fresh evidence (a new nonce)")?;
    alice_cvms
        .get_status(&name)
        .await
        .context("an editor reads the verdict")?;
    let m = forbidden(
        alice_cvms
            .patch_status(&name, &PatchParams::default(), &forged_verdict())
            .await,
        "alice",
        "an editor forging the CVM's verdict",
    )?;
    assert!(m.contains("\"confidentialvms/status\""), "{m}");
    let elsewhere = example_cvm(OTHER_NS)?;
    forbidden(
        cvms(&u.alice, OTHER_NS)
            .create(&PostParams::default(), &elsewhere)
            .await,
        "alice",
        "an editor of team-a creating a CVM in team-b",
    )?;
    let policy: DynamicObject = serde_json::from_value(
        example("attestation-policy.yaml")?
            .into_iter()
            .next()
            .context("examples/attestation-policy.yaml is empty")?,
    )?;
    let policy_name = policy
        .metadata
        .name
        .clone()
        .context("the policy has a name")?;
    let m = forbidden(
        policies(&u.alice)
            .create(&PostParams::default(), &policy)
            .await,
        "alice",
        "a namespace editor creating an AttestationPolicy",
    )?;
    assert!(m.contains("at the cluster scope"), "{m}");

    let alice_migs = migrations(&u.alice, TEAM);
    alice_migs
        .create(&PostParams::default(), &migration("move-it", &name)?)
        .await
        .context("an editor asks for a migration")?;
    alice_migs
        .patch(
            "move-it",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"ticket": "ops-42"}}})),
        )
        .await
        .context("an editor labels her migration")?;
    let m = forbidden(
        alice_migs
            .patch_status(
                "move-it",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Succeeded"}})),
            )
            .await,
        "alice",
        "an editor declaring her migration done",
    )?;
    assert!(m.contains("\"confidentialvmmigrations/status\""), "{m}");

    // bob: view in team-a.
    let bob_cvms = cvms(&u.bob, TEAM);
    let seen = bob_cvms.get(&name).await.context("a viewer gets the CVM")?;
    assert_eq!(
        seen.data["spec"]["attestation"]["nonce"], "fedcba9876543210",
        "the viewer sees alice's change"
    );
    bob_cvms
        .get_status(&name)
        .await
        .context("a viewer reads the verdict")?;
    let listed = bob_cvms
        .list(&ListParams::default())
        .await
        .context("a viewer lists CVMs")?;
    assert!(
        listed
            .items
            .iter()
            .any(|o| o.metadata.name.as_deref() == Some(&name)),
        "{:?}",
        listed.items
    );
    let bob_migs = migrations(&u.bob, TEAM);
    let listed = bob_migs
        .list(&ListParams::default())
        .await
        .context("a viewer lists migrations")?;
    assert_eq!(listed.items.len(), 1, "{:?}", listed.items);
    let mut copy = example_cvm(TEAM)?;
    copy.metadata.name = Some("bobs".into());
    forbidden(
        bob_cvms.create(&PostParams::default(), &copy).await,
        "bob",
        "a viewer creating a CVM",
    )?;
    forbidden(
        bob_cvms
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"attestation": {"nonce": "00"}}})),
            )
            .await,
        "bob",
        "a viewer patching a CVM",
    )?;
    forbidden(
        bob_cvms.delete(&name, &DeleteParams::default()).await,
        "bob",
        "a viewer deleting a CVM",
    )?;
    forbidden(
        bob_cvms
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await,
        "bob",
        "a viewer deleting all CVMs",
    )?;
    forbidden(
        bob_cvms
            .patch_status(&name, &PatchParams::default(), &forged_verdict())
            .await,
        "bob",
        "a viewer forging the verdict",
    )?;
    forbidden(
        bob_migs
            .create(&PostParams::default(), &migration("bobs-move", &name)?)
            .await,
        "bob",
        "a viewer asking for a migration",
    )?;
    forbidden(
        bob_migs.delete("move-it", &DeleteParams::default()).await,
        "bob",
        "a viewer deleting a migration",
    )?;
    // A RoleBinding reaches no cluster-scoped object, policies included.
    forbidden(
        policies(&u.bob).list(&ListParams::default()).await,
        "bob",
        "a namespace viewer listing AttestationPolicies",
    )?;

    // carol: view cluster-wide reads the policy a CVM names, and writes none.
    match policies(&admin)
        .create(&PostParams::default(), &policy)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e).context("the admin creates the example policy"),
    }
    let read = policies(&u.carol)
        .get(&policy_name)
        .await
        .context("a cluster-wide viewer reads an AttestationPolicy")?;
    assert_eq!(read.metadata.name.as_deref(), Some(policy_name.as_str()));
    forbidden(
        policies(&u.carol)
            .delete(&policy_name, &DeleteParams::default())
            .await,
        "carol",
        "a viewer deleting an AttestationPolicy",
    )?;
    forbidden(
        policies(&u.carol)
            .patch(
                &policy_name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"maxEvidenceAge": "1000h"}})),
            )
            .await,
        "carol",
        "a viewer loosening an AttestationPolicy",
    )?;

    // alice cleans up: deleting is hers too (no operator here, so no finalizer waits).
    alice_migs
        .delete("move-it", &DeleteParams::default())
        .await
        .context("an editor deletes her migration")?;
    alice_cvms
        .delete(&name, &DeleteParams::default())
        .await
        .context("an editor deletes her CVM")?;
    let admin_cvms = cvms(&admin, TEAM);
    wait::gone(&admin_cvms, &name, WAIT)
        .await
        .map_err(anyhow::Error::msg)?;
    wait::gone(&migrations(&admin, TEAM), "move-it", WAIT)
        .await
        .map_err(anyhow::Error::msg)?;

    eprintln!(
        "roles: cluster {:.1} s, aggregation {:.1} s, total {:.1} s",
        cluster_up.as_secs_f64(),
        aggregation.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
