//! `kubectl cvm status`: where a CVM is and what the operator concluded about it. This
//! reports the operator's view; `kubectl cvm attest` is how to check it yourself.

use std::fmt::Write as _;

use clap::Args;
use cvm_crds::ConfidentialVM;

use crate::cli::{Done, KubeArgs};
use crate::cluster::{block_on, ClusterError, Ctx};
use crate::evidence::Output;

pub const EXAMPLES: &str = "Examples:
  kubectl cvm status my-vm
  kubectl cvm status my-vm -n prod -o json";

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The ConfidentialVM.
    pub name: String,
    /// Output format; json prints the object's status.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: Output,
}

pub fn run(k: &KubeArgs, a: &StatusArgs) -> Result<Done, ClusterError> {
    let (ns, cvm) = block_on(async {
        let ctx = Ctx::connect(k).await?;
        let c = ctx.get(&a.name).await?;
        Ok::<_, ClusterError>((ctx.namespace, c))
    })??;
    Ok(Done::ok(match a.output {
        Output::Json => format!(
            "{}\n",
            serde_json::to_string_pretty(&cvm.status).unwrap_or_default()
        ),
        Output::Text => render(&ns, &cvm),
    }))
}

fn wire<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The text form, also used by tests.
pub fn render(ns: &str, cvm: &ConfidentialVM) -> String {
    let mut s = String::new();
    let name = cvm.metadata.name.as_deref().unwrap_or("?");
    let st = cvm.status.clone().unwrap_or_default();
    let _ = writeln!(s, "ConfidentialVM:  {ns}/{name}");
    let _ = writeln!(s, "Phase:           {}", cvm.phase());
    let _ = writeln!(
        s,
        "Node:            {}",
        st.node_name.as_deref().unwrap_or("(not scheduled)")
    );
    let simulated = st.platform.as_ref().is_some_and(|p| p.simulated);
    let _ = writeln!(
        s,
        "TEE:             {}{}",
        cvm.tee_type().as_str(),
        if simulated {
            " (the host says: simulated platform; shown, not trusted)"
        } else {
            ""
        }
    );
    if let Some(p) = &st.platform {
        if let Some(fw) = &p.firmware_version {
            let _ = writeln!(s, "Firmware:        {fw}");
        }
        if let Some(m) = &p.computed_measurement {
            let _ = writeln!(s, "Node computed:   {m}");
        }
    }
    match &st.evidence {
        Some(e) => {
            let _ = writeln!(
                s,
                "Evidence:        {} collected {}{}",
                wire(&e.format),
                e.collected_at.0,
                e.nonce
                    .as_deref()
                    .map(|n| format!(", nonce {n}"))
                    .unwrap_or_default()
            );
            if let Some(m) = &e.launch_measurement {
                let _ = writeln!(
                    s,
                    "Measurement:     {m} (as reported; `kubectl cvm attest` checks it)"
                );
            }
        }
        None => {
            let _ = writeln!(s, "Evidence:        none yet");
        }
    }
    if let Some(g) = &st.guest_instance {
        let _ = writeln!(
            s,
            "Guest instance:  key sha256:{} on node {}, pinned {}{}{}",
            g.key_sha256,
            g.node,
            g.pinned_at.0,
            g.report_id
                .as_deref()
                .map(|r| format!(", REPORT_ID {r}"))
                .unwrap_or_default(),
            if g.relaunches > 0 {
                format!(", relaunches {}", g.relaunches)
            } else {
                String::new()
            }
        );
    }
    match &st.attestation {
        Some(r) => {
            let _ = writeln!(
                s,
                "Verified:        {} by {} at {} under policy {}{}",
                wire(&r.status),
                r.verifier,
                r.verified_at.0,
                r.policy.as_deref().unwrap_or("(default)"),
                r.nonce
                    .as_deref()
                    .map(|n| format!(", nonce {n}"))
                    .unwrap_or_default()
            );
            let tv = serde_json::to_value(r.trustworthiness_vector).unwrap_or_default();
            if let Some(m) = tv.as_object().filter(|m| !m.is_empty()) {
                let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let _ = writeln!(s, "Trustworthiness: {}", parts.join(" "));
            }
            if r.findings.is_empty() {
                let _ = writeln!(s, "Findings:        none");
            } else {
                let _ = writeln!(s, "Findings:");
                for f in &r.findings {
                    let sev = f.severity.map(|x| wire(&x)).unwrap_or_else(|| "-".into());
                    let _ = writeln!(s, "  [{sev}] {}: {}", f.check, f.message);
                }
            }
        }
        None => {
            let _ = writeln!(s, "Verified:        not yet (no operator appraisal)");
        }
    }
    if !st.conditions.is_empty() {
        let _ = writeln!(s, "Conditions:");
        for c in &st.conditions {
            let _ = writeln!(
                s,
                "  {:<15} {:<7} {:<24} {}",
                c.type_, c.status, c.reason, c.message
            );
        }
    }
    s
}
