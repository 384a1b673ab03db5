//! `kubectl cvm attest`: challenge a CVM with the user's nonce, wait for evidence bound to
//! it, and verify that evidence here, with the user's trust anchors and reference values.
//! The operator's verdict is fetched only to say whether it agrees; it never decides.

use std::fmt::Write as _;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use cvm_attest::ear::{Appraisal, Ear, VerifierId};
use cvm_attest::snp::{self, SnpPolicy, SnpTrustedRoot};
use cvm_attest::tdx::{self, TdxPolicy};
use cvm_crds::wire;
use cvm_crds::{ConfidentialVM, EvidenceFormat};
use serde_json::json;

use crate::cli::{Done, KubeArgs};
use crate::cluster::{block_on, now_unix, parse_timeout, ClusterError, Ctx};
use crate::evidence::{self, Output};

pub const EXAMPLES: &str = "Examples:
  # A fresh random nonce; AMD/Intel roots; your precomputed measurement
  kubectl cvm attest my-vm --random --expected-measurement $(kubectl cvm measure --ovmf OVMF.fd --vcpus 4)
  # Your own policy file (the `evidence verify --policy` format) and nonce
  kubectl cvm attest my-vm -n prod --nonce 5eed0123 --policy my-policy.yaml -o json
  # On the local cvm-dev cluster, trust its simulator root explicitly
  kubectl cvm attest snp-demo --trust-root sha256:<fingerprint printed by cvm-dev>";

#[derive(Debug, Args)]
pub struct AttestArgs {
    /// The ConfidentialVM.
    pub name: String,
    /// Challenge as hex (1 to 64 bytes). Default: 32 random bytes.
    #[arg(long, value_name = "HEX", conflicts_with = "random")]
    pub nonce: Option<String>,
    /// Use 32 random bytes as the challenge (the default).
    #[arg(long)]
    pub random: bool,
    /// Your verification policy (YAML/JSON, the `evidence verify --policy` format: an SNP
    /// or TDX policy, or `{snp: …, tdx: …}`).
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Accepted launch measurement(s) (SNP MEASUREMENT / TDX MRTD), 96 hex digits.
    #[arg(long, value_name = "HEX", num_args = 1..)]
    pub expected_measurement: Vec<String>,
    /// Another root to trust: `sha256:<64 hex>` (e.g. the local cluster's simulator root),
    /// `amd`, `amd-milan|genoa|turin` or `intel`. AMD's and Intel's roots are trusted by default.
    #[arg(long, value_name = "ROOT")]
    pub trust_root: Vec<String>,
    /// How long to wait for evidence bound to the nonce.
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    pub timeout: String,
    /// Output format; json prints the EAR.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: Output,
}

fn random_nonce() -> Result<String, ClusterError> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| ClusterError::Input(format!("cannot read /dev/urandom for a nonce: {e}")))?;
    Ok(hex::encode(b))
}

/// The nonce as the CRD wants it: lowercase hex, 1 to 64 bytes.
fn normalise_nonce(s: &str) -> Result<String, ClusterError> {
    let b = evidence::decode_hex("--nonce", s)?;
    if b.is_empty() || b.len() > 64 {
        return Err(ClusterError::Input(format!(
            "--nonce is {} bytes; a challenge is 1 to 64 bytes",
            b.len()
        )));
    }
    Ok(hex::encode(b))
}

/// The user's policies with the flags folded in.
fn policies(a: &AttestArgs) -> Result<(SnpPolicy, TdxPolicy), ClusterError> {
    let (mut snp_p, mut tdx_p) = evidence::load_policies(a.policy.as_deref())?;
    for m in &a.expected_measurement {
        let b = evidence::decode_hex("--expected-measurement", m)?;
        let arr = <[u8; 48]>::try_from(b.as_slice()).map_err(|_| {
            ClusterError::Input(format!(
                "--expected-measurement {m:?}: a measurement is 48 bytes (96 hex digits), got {}",
                b.len()
            ))
        })?;
        snp_p.measurements.push(snp::Hex(arr));
        tdx_p.mrtd.push(b);
    }
    for r in &a.trust_root {
        match r.trim() {
            "intel" | "intel-sgx-root-ca" => tdx_p
                .trusted_roots
                .push(tdx::policy::TrustedRoot::IntelSgxRootCa),
            t if t.starts_with("amd") => snp_p
                .trusted_roots
                .push(t.parse::<SnpTrustedRoot>().map_err(ClusterError::Input)?),
            t => {
                snp_p
                    .trusted_roots
                    .push(t.parse::<SnpTrustedRoot>().map_err(ClusterError::Input)?);
                tdx_p.trusted_roots.push(
                    tdx::policy::TrustedRoot::try_from(t.to_string())
                        .map_err(|e| ClusterError::Input(format!("--trust-root {t}: {e}")))?,
                );
            }
        }
    }
    // Freshness is the point of this command.
    snp_p.require_nonce = true;
    tdx_p.require_nonce = true;
    Ok((snp_p, tdx_p))
}

fn evidence_nonce(c: &ConfidentialVM) -> Option<&str> {
    c.status.as_ref()?.evidence.as_ref()?.nonce.as_deref()
}

fn operator_nonce(c: &ConfidentialVM) -> Option<&str> {
    c.status.as_ref()?.attestation.as_ref()?.nonce.as_deref()
}

/// Polls until `done` holds, backing off from 100 ms to 2 s, or until `deadline`.
async fn poll_until(
    ctx: &Ctx,
    name: &str,
    deadline: Instant,
    done: impl Fn(&ConfidentialVM) -> bool,
) -> Result<(ConfidentialVM, bool), ClusterError> {
    let mut delay = Duration::from_millis(100);
    loop {
        let c = ctx.get(name).await?;
        if done(&c) {
            return Ok((c, true));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok((c, false));
        }
        tokio::time::sleep(delay.min(deadline - now)).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

pub fn run(k: &KubeArgs, a: &AttestArgs) -> Result<Done, ClusterError> {
    let timeout = parse_timeout(&a.timeout).map_err(ClusterError::Input)?;
    let nonce = match &a.nonce {
        Some(n) => normalise_nonce(n)?,
        None => random_nonce()?,
    };
    let (snp_p, tdx_p) = policies(a)?;
    block_on(attest(k, a, nonce, snp_p, tdx_p, timeout))?
}

async fn attest(
    k: &KubeArgs,
    a: &AttestArgs,
    nonce: String,
    snp_p: SnpPolicy,
    tdx_p: TdxPolicy,
    timeout: Duration,
) -> Result<Done, ClusterError> {
    let ctx = Ctx::connect(k).await?;
    let name = a.name.as_str();
    let before = ctx.get(name).await?;
    let tee = before.tee_type();
    if !matches!(tee, cvm_crds::TeeType::SevSnp | cvm_crds::TeeType::Tdx) {
        return Err(ClusterError::Input(format!(
            "{name} is an {} guest: its evidence is a LAUNCH_MEASURE HMAC under the guest \
             owner's transport key, not a hardware-signed report a client can verify; \
             use SEV-SNP or TDX for remote attestation",
            tee.as_str()
        )));
    }
    let started = Instant::now();
    let deadline = started + timeout;
    let mut patch = json!({"spec": {"attestation": {"nonce": nonce}}});
    if before.nonce() == Some(nonce.as_str()) {
        // Same nonce as before: ask for collection again through the annotation.
        patch["metadata"] = json!({"annotations": {
            cvm_crds::wellknown::ANNOTATION_REATTEST: now_unix().to_string()
        }});
    }
    ctx.patch_merge(name, &patch).await?;

    let (cvm, answered) =
        poll_until(&ctx, name, deadline, |c| evidence_nonce(c) == Some(&nonce)).await?;
    if !answered {
        let phase = cvm.phase();
        return Err(ClusterError::Timeout(format!(
            "no evidence for nonce {nonce} from {}/{name} within {:?} (phase {phase}, node {}); \
             a guest must be running for its node plugin to answer; see `kubectl cvm status {name}`",
            ctx.namespace,
            timeout,
            cvm.node_name().unwrap_or("none"),
        )));
    }
    let waited = started.elapsed();
    let Some(ev) = cvm.status.as_ref().and_then(|s| s.evidence.clone()) else {
        return Err(ClusterError::Api(
            "evidence vanished from the status".into(),
        ));
    };
    // The report data must bind this CVM's UID, our nonce and the guest instance's key
    // (docs/evidence-binding.md): recompute it here, trusting nothing the cluster says.
    let uid = cvm.metadata.uid.clone().unwrap_or_default();
    let Some(instance_key) = wire::decode_instance_key(&ev).map_err(unreadable)? else {
        return Err(ClusterError::Input(
            "status.evidence.instanceKey is missing: the evidence names no guest instance, \
             so it cannot be bound to one"
                .into(),
        ));
    };
    // After a live migration the guest also binds the migration that moved it.
    let epoch = cvm.migration_epoch();
    let nonce_bytes =
        wire::challenge_for(Some(&nonce), &uid, epoch).map(|c| c.preimage_for(&instance_key));
    let now = now_unix();
    let raw = wire::decode_report(&ev).map_err(unreadable)?;
    let label = format!("from {}/{name}", ctx.namespace);
    let (appraisal, summary, submod): (Appraisal, String, &str) = match ev.format {
        EvidenceFormat::SevSnpReport => {
            let certs = wire::cert_chain(&ev).map_err(unreadable)?;
            let (ap, s) =
                evidence::appraise_snp(&label, &raw, &certs, &[], snp_p, nonce_bytes, now)
                    .map_err(ClusterError::Input)?;
            (ap, s, snp::SUBMOD)
        }
        EvidenceFormat::TdxQuote => {
            let coll = wire::tdx_collateral(&ev).map_err(unreadable)?;
            let (ap, s) =
                evidence::appraise_tdx(&label, &raw, coll.as_bytes(), tdx_p, nonce_bytes, now)
                    .map_err(|e| ClusterError::Input(e.to_string()))?;
            (ap, s, "TDX")
        }
        EvidenceFormat::SevLaunchMeasure => {
            return Err(ClusterError::Input(
                "the evidence is an SEV launch measurement, which a client cannot verify".into(),
            ))
        }
        EvidenceFormat::NoTee => {
            return Err(ClusterError::Input(format!(
                "NOT confidential: the guest agent found no TEE in the guest ({})",
                String::from_utf8_lossy(&raw)
            )))
        }
    };
    let affirmed = appraisal.is_affirmed();
    let mut ear = Ear::new(
        now as i64,
        VerifierId {
            developer: "cvmp.io".into(),
            build: format!("kubectl-cvm {}", env!("CARGO_PKG_VERSION")),
        },
    );
    ear.eat_nonce = Some(nonce.clone());
    ear.submods.insert(submod.into(), appraisal.to_submod(None));

    if a.output == Output::Json {
        return Ok(Done::verdict(format!("{}\n", ear.to_json()), affirmed));
    }
    // For information only: what the operator concluded on the same evidence. Give it a
    // moment (bounded by the timeout) to catch up.
    let op_deadline = (Instant::now() + Duration::from_secs(10)).min(deadline);
    let (cvm, op_done) = poll_until(&ctx, name, op_deadline, |c| {
        operator_nonce(c) == Some(&nonce)
    })
    .await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ConfidentialVM {}/{name} ({}), node {}",
        ctx.namespace,
        tee.as_str(),
        cvm.node_name().unwrap_or("none")
    );
    let _ = writeln!(
        out,
        "nonce {nonce}: evidence collected {} (answered in {:.1} s)",
        ev.collected_at.0,
        waited.as_secs_f64()
    );
    if snp_or_tdx_without_reference(a) {
        let _ = writeln!(
            out,
            "note: no expected measurement given: the launch measurement is not appraised \
             (compute it with `kubectl cvm measure`, pass --expected-measurement)"
        );
    }
    out.push_str(&summary);
    let verdict = if affirmed {
        "AFFIRMED"
    } else {
        "CONTRAINDICATED"
    };
    let theirs = cvm.status.as_ref().and_then(|s| s.attestation.as_ref());
    match theirs {
        Some(r) if op_done => {
            let op_ok = matches!(
                r.status,
                cvm_crds::cvm::EarStatus::Affirming | cvm_crds::cvm::EarStatus::Warning
            );
            let _ = writeln!(
                out,
                "operator (for information): {} by {} at {} under policy {}, {}",
                serde_json::to_value(r.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                r.verifier,
                r.verified_at.0,
                r.policy.as_deref().unwrap_or("(default)"),
                if op_ok == affirmed {
                    "agrees"
                } else {
                    "DISAGREES"
                }
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "operator (for information): has not appraised this evidence yet"
            );
        }
    }
    let _ = writeln!(
        out,
        "result: {verdict} (verified locally, ear.status {})",
        ear.status()
    );
    Ok(Done::verdict(out, affirmed))
}

/// A `status.evidence` field this client cannot read: the CVM's status, not the user's
/// flags, is at fault, so the message says where to look.
pub(crate) fn unreadable(e: wire::WireError) -> ClusterError {
    ClusterError::Input(format!("status.evidence.{e}"))
}

fn snp_or_tdx_without_reference(a: &AttestArgs) -> bool {
    a.expected_measurement.is_empty() && a.policy.is_none()
}
