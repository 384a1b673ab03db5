//! `kubectl cvm report`: evidence decoded into readable fields, like `snpguest display`.
//! Decoding is not verification: `attest` and `evidence verify` verify.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Args;
use cvm_attest::snp::report::{Generation, SnpReport};
use cvm_attest::tdx::{self, DecodedTdQuote, TdxPolicy, TdxTcbStatus};
use cvm_crds::{wire, ConfidentialVM, EvidenceFormat};
use serde_json::json;

use crate::cli::{Done, KubeArgs};
use crate::cluster::{block_on, now_unix, ClusterError, Ctx};
use crate::evidence::Output;

pub const EXAMPLES: &str = "Examples:
  kubectl cvm report my-vm -n prod          # the evidence in the CVM's status
  kubectl cvm report report.bin             # an SNP report file (raw, hex or Azure HCL)
  kubectl cvm report quote.dat --collateral collateral.json   # a TDX quote, with TCB status
  kubectl get cvm my-vm -o yaml > vm.yaml && kubectl cvm report vm.yaml";

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// A ConfidentialVM name, or a file: SNP report (raw/hex/HCL), TDX quote, or a
    /// ConfidentialVM saved as YAML/JSON.
    pub target: String,
    /// TDX collateral (QuoteCollateralV3 JSON) for a quote file, to show its TCB status.
    #[arg(long, value_name = "FILE")]
    pub collateral: Option<PathBuf>,
    /// Roots to trust when establishing the TDX TCB status (`sha256:<hex>`); Intel's is built in.
    #[arg(long, value_name = "ROOT")]
    pub trust_root: Vec<String>,
    /// Time at which to judge the TDX collateral's validity (RFC 3339); default now.
    #[arg(long, value_name = "RFC3339")]
    pub at: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: Output,
}

/// Evidence in hand, whatever its source.
enum Raw {
    Snp(Vec<u8>),
    Tdx {
        quote: Vec<u8>,
        collateral: Option<Vec<u8>>,
    },
}

pub fn run(k: &KubeArgs, a: &ReportArgs) -> Result<Done, ClusterError> {
    let path = Path::new(&a.target);
    let (label, raw) = if path.is_file() {
        (a.target.clone(), from_file(path, a)?)
    } else {
        let cvm = block_on(async {
            let ctx = Ctx::connect(k).await?;
            let c = ctx.get(&a.target).await?;
            Ok::<_, ClusterError>(c)
        })??;
        (
            format!("ConfidentialVM {}", a.target),
            from_cvm(&cvm, &a.target)?,
        )
    };
    match raw {
        Raw::Snp(bytes) => snp(&label, &bytes, a.output),
        Raw::Tdx { quote, collateral } => tdx_report(&label, &quote, collateral.as_deref(), a),
    }
}

fn from_cvm(cvm: &ConfidentialVM, name: &str) -> Result<Raw, ClusterError> {
    let Some(ev) = cvm.status.as_ref().and_then(|s| s.evidence.as_ref()) else {
        return Err(ClusterError::Input(format!(
            "{name} has no evidence yet (phase {}); the node plugin writes it once the guest runs",
            cvm.phase()
        )));
    };
    let bytes = wire::decode_report(ev).map_err(crate::attest::unreadable)?;
    match ev.format {
        EvidenceFormat::SevSnpReport => Ok(Raw::Snp(bytes)),
        EvidenceFormat::TdxQuote => Ok(Raw::Tdx {
            quote: bytes,
            // Without collateral the quote is still decoded; its TCB status is unknown.
            collateral: wire::tdx_collateral(ev).ok().map(|c| c.as_bytes().to_vec()),
        }),
        EvidenceFormat::SevLaunchMeasure => Err(ClusterError::Input(format!(
            "{name} holds an SEV launch measurement ({}), not a report with fields to decode",
            hex::encode(&bytes)
        ))),
        EvidenceFormat::NoTee => Err(ClusterError::Input(format!(
            "{name} is not confidential: its guest agent found no TEE ({})",
            String::from_utf8_lossy(&bytes)
        ))),
    }
}

fn from_file(path: &Path, a: &ReportArgs) -> Result<Raw, ClusterError> {
    let data = crate::evidence::read("evidence file", path)?;
    let collateral = match &a.collateral {
        Some(p) => Some(crate::evidence::read("TDX collateral", p)?),
        None => None,
    };
    // A TDX quote: version 4 or 5, TEE type 0x81 at offset 4.
    if data.len() > 48
        && matches!(u16::from_le_bytes([data[0], data[1]]), 4 | 5)
        && u32::from_le_bytes([data[4], data[5], data[6], data[7]]) == tdx::quote::TEE_TYPE_TDX
    {
        return Ok(Raw::Tdx {
            quote: data,
            collateral,
        });
    }
    if let Ok(bytes) = cvm_attest::snp::report::extract_report_bytes(&data) {
        return Ok(Raw::Snp(bytes));
    }
    // A saved ConfidentialVM (kubectl get cvm -o yaml).
    if let Ok(text) = std::str::from_utf8(&data) {
        if let Ok(cvm) = serde_yaml::from_str::<ConfidentialVM>(text) {
            let name = cvm.metadata.name.clone().unwrap_or_default();
            return from_cvm(&cvm, &name);
        }
    }
    Err(ClusterError::Input(format!(
        "{}: neither an SEV-SNP report (raw, hex or HCL), a TDX quote, nor a ConfidentialVM",
        path.display()
    )))
}

fn flags(bits: u64, names: &[(u32, &str)]) -> String {
    let set: Vec<&str> = names
        .iter()
        .filter(|(b, _)| bits & (1u64 << b) != 0)
        .map(|(_, n)| *n)
        .collect();
    if set.is_empty() {
        "none".into()
    } else {
        set.join(", ")
    }
}

fn yes(b: bool, y: &str, n: &str) -> String {
    if b { y } else { n }.to_string()
}

fn snp(label: &str, bytes: &[u8], output: Output) -> Result<Done, ClusterError> {
    let r = SnpReport::parse(bytes).map_err(|e| ClusterError::Input(format!("{label}: {e}")))?;
    let (generation, gen_note) = match r.generation_hint() {
        Some(g) => (g, ""),
        // Milan and Genoa share the TCB layout; only Turin differs.
        None => (
            Generation::Milan,
            " (generation not stated in the report; Milan/Genoa layout)",
        ),
    };
    let p = r.policy;
    let policy_text = [
        format!("ABI {}.{}", p.abi_major(), p.abi_minor()),
        yes(p.smt_allowed(), "SMT allowed", "SMT not allowed"),
        yes(
            p.migrate_ma_allowed(),
            "migration agent allowed",
            "migration agent not allowed",
        ),
        yes(p.debug_allowed(), "DEBUG ALLOWED", "debug not allowed"),
        yes(p.single_socket(), "single socket only", "any socket count"),
    ];
    let extra_policy = flags(
        p.0,
        &[
            (21, "CXL allowed"),
            (22, "AES-256-XTS required"),
            (23, "RAPL disabled"),
            (24, "ciphertext hiding required"),
            (25, "page swap disabled"),
        ],
    );
    let platform = flags(
        r.platform_info,
        &[
            (0, "SMT enabled"),
            (1, "TSME enabled"),
            (2, "ECC memory"),
            (3, "RAPL disabled"),
            (4, "ciphertext hiding enabled"),
            (5, "alias check complete"),
            (7, "TIO enabled"),
        ],
    );
    let key_info = format!(
        "signing key {}{}{}",
        r.signing_key(),
        yes(r.key_info & 1 != 0, ", author key enabled", ""),
        yes(r.key_info & 2 != 0, ", chip key masked", "")
    );
    let tcb = |t: cvm_attest::snp::report::TcbVersion| t.to_string();
    if output == Output::Json {
        let v = json!({
            "format": "sev-snp-report",
            "version": r.version,
            "guestSvn": r.guest_svn,
            "policy": {"raw": format!("{:#x}", p.0), "abiMajor": p.abi_major(), "abiMinor": p.abi_minor(),
                "smt": p.smt_allowed(), "migrateMa": p.migrate_ma_allowed(), "debug": p.debug_allowed(),
                "singleSocket": p.single_socket()},
            "familyId": hex::encode(r.family_id),
            "imageId": hex::encode(r.image_id),
            "vmpl": r.vmpl,
            "signatureAlgorithm": r.sig_algo,
            "platformInfo": format!("{:#x}", r.platform_info),
            "keyInfo": key_info,
            "generation": generation.name(),
            "currentTcb": tcb(r.current_tcb(generation)),
            "reportedTcb": tcb(r.reported_tcb(generation)),
            "committedTcb": tcb(r.committed_tcb(generation)),
            "launchTcb": tcb(r.launch_tcb(generation)),
            "currentVersion": r.current_version.to_string(),
            "committedVersion": r.committed_version.to_string(),
            "measurement": hex::encode(r.measurement),
            "reportData": hex::encode(r.report_data),
            "hostData": hex::encode(r.host_data),
            "idKeyDigest": hex::encode(r.id_key_digest),
            "authorKeyDigest": hex::encode(r.author_key_digest),
            "reportId": hex::encode(r.report_id),
            "reportIdMa": hex::encode(r.report_id_ma),
            "chipId": hex::encode(r.chip_id),
            "cpuid": r.cpuid.map(|(f, m, s)| json!({"family": f, "model": m, "stepping": s})),
            "signature": {"r": hex::encode(r.signature_r), "s": hex::encode(r.signature_s)},
        });
        return Ok(Done::ok(format!(
            "{}\n",
            serde_json::to_string_pretty(&v).unwrap_or_default()
        )));
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "SEV-SNP attestation report ({label}); decoded, not verified"
    );
    let mut f = |k: &str, v: String| {
        let _ = writeln!(s, "  {k:<22} {v}");
    };
    f("Version:", r.version.to_string());
    f("Guest SVN:", r.guest_svn.to_string());
    f(
        "Guest policy:",
        format!("{:#x}: {}", p.0, policy_text.join(", ")),
    );
    if extra_policy != "none" {
        f("", extra_policy);
    }
    f("Family ID:", hex::encode(r.family_id));
    f("Image ID:", hex::encode(r.image_id));
    f("VMPL:", r.vmpl.to_string());
    f(
        "Signature algorithm:",
        if r.sig_algo == 1 {
            "ECDSA P-384 with SHA-384".into()
        } else {
            format!("unknown ({})", r.sig_algo)
        },
    );
    f(
        "Platform info:",
        format!("{:#x}: {platform}", r.platform_info),
    );
    f("Key info:", key_info);
    if let Some((fam, model, step)) = r.cpuid {
        f(
            "CPUID:",
            format!("family {fam:#x} model {model:#x} stepping {step:#x}"),
        );
    }
    f("Generation:", format!("{}{gen_note}", generation.name()));
    f("Current TCB:", tcb(r.current_tcb(generation)));
    f("Reported TCB:", tcb(r.reported_tcb(generation)));
    f("Committed TCB:", tcb(r.committed_tcb(generation)));
    f("Launch TCB:", tcb(r.launch_tcb(generation)));
    f(
        "Firmware:",
        format!(
            "current {}, committed {}",
            r.current_version, r.committed_version
        ),
    );
    f("Measurement:", hex::encode(r.measurement));
    f("Report data:", hex::encode(r.report_data));
    f("Host data:", hex::encode(r.host_data));
    f("ID key digest:", hex::encode(r.id_key_digest));
    f("Author key digest:", hex::encode(r.author_key_digest));
    f("Report ID:", hex::encode(r.report_id));
    f("Report ID (MA):", hex::encode(r.report_id_ma));
    f(
        "Chip ID:",
        if r.chip_id_masked() {
            "masked (zero)".into()
        } else {
            hex::encode(r.chip_id)
        },
    );
    f("Signature R:", hex::encode(r.signature_r));
    f("Signature S:", hex::encode(r.signature_s));
    Ok(Done::ok(s))
}

fn tdx_report(
    label: &str,
    quote: &[u8],
    collateral: Option<&[u8]>,
    a: &ReportArgs,
) -> Result<Done, ClusterError> {
    let q =
        DecodedTdQuote::parse(quote).map_err(|e| ClusterError::Input(format!("{label}: {e}")))?;
    // TCB status comes from Intel's collateral, so it needs a verified chain.
    let tcb: Result<(TdxTcbStatus, Vec<String>), String> = match collateral {
        None => Err("unknown (no collateral; pass --collateral FILE)".into()),
        Some(c) => {
            let mut policy = TdxPolicy {
                accepted_tcb_statuses: TdxTcbStatus::ALL.to_vec(),
                ..TdxPolicy::default()
            };
            for r in &a.trust_root {
                policy.trusted_roots.push(
                    tdx::policy::TrustedRoot::try_from(r.clone())
                        .map_err(|e| ClusterError::Input(format!("--trust-root {r}: {e}")))?,
                );
            }
            let at = match &a.at {
                Some(t) => cvm_attest::snp::time::parse_rfc3339(t)
                    .map_err(|e| ClusterError::Input(format!("--at: {e}")))?,
                None => now_unix(),
            };
            let ctx = tdx::AppraisalContext::at(at);
            match tdx::verify_quote(quote, c, &policy, &ctx) {
                Ok(t) => match t.tcb_status {
                    Some(st) => Ok((st, t.advisory_ids)),
                    None => Err(format!(
                        "unknown: the quote did not verify ({})",
                        t.findings
                            .iter()
                            .map(|f| f.to_string())
                            .collect::<Vec<_>>()
                            .join("; ")
                    )),
                },
                Err(e) => Err(format!("unknown: {e}")),
            }
        }
    };
    if a.output == Output::Json {
        let mut v = serde_json::to_value(&q).unwrap_or_default();
        v["format"] = json!("tdx-quote");
        match &tcb {
            Ok((st, adv)) => {
                v["tcbStatus"] = json!(st.as_str());
                v["advisoryIds"] = json!(adv);
            }
            Err(why) => v["tcbStatus"] = json!(why),
        }
        return Ok(Done::ok(format!(
            "{}\n",
            serde_json::to_string_pretty(&v).unwrap_or_default()
        )));
    }
    let at = &q.td_attributes;
    let attrs = [
        yes(at.debug, "DEBUG", "no debug"),
        yes(at.sept_ve_disable, "SEPT_VE_DISABLE", ""),
        yes(at.migratable, "MIGRATABLE", ""),
        yes(at.pks, "PKS", ""),
        yes(at.key_locker, "KL", ""),
        yes(at.perfmon, "PERFMON", ""),
    ]
    .into_iter()
    .filter(|x| !x.is_empty())
    .collect::<Vec<_>>()
    .join(", ");
    let mut s = String::new();
    let _ = writeln!(s, "TDX quote ({label}); decoded, not verified");
    let mut f = |k: &str, v: String| {
        let _ = writeln!(s, "  {k:<22} {v}");
    };
    f("Quote version:", q.version.to_string());
    f("TD report:", format!("{:?}", q.report_kind));
    f("QE SVN / PCE SVN:", format!("{} / {}", q.qe_svn, q.pce_svn));
    f("TEE TCB SVN:", hex::encode(&q.tee_tcb_svn));
    if let Some(s2) = &q.tee_tcb_svn2 {
        f("TEE TCB SVN2:", hex::encode(s2));
    }
    f(
        "TCB status:",
        match &tcb {
            Ok((st, adv)) if adv.is_empty() => st.to_string(),
            Ok((st, adv)) => format!("{st} (advisories {})", adv.join(", ")),
            Err(why) => why.clone(),
        },
    );
    f("MRSEAM:", hex::encode(&q.mr_seam));
    f("MRSIGNERSEAM:", hex::encode(&q.mr_signer_seam));
    f("SEAM attributes:", hex::encode(&q.seam_attributes));
    f("TD attributes:", format!("{:#018x}: {attrs}", at.raw));
    f("XFAM:", hex::encode(&q.xfam));
    f("MRTD:", hex::encode(&q.mr_td));
    f("MRCONFIGID:", hex::encode(&q.mr_config_id));
    f("MROWNER:", hex::encode(&q.mr_owner));
    f("MROWNERCONFIG:", hex::encode(&q.mr_owner_config));
    for (i, r) in q.rtmrs.iter().enumerate() {
        f(&format!("RTMR{i}:"), hex::encode(r));
    }
    if let Some(m) = &q.mr_service_td {
        f("MRSERVICETD:", hex::encode(m));
    }
    f("Report data:", hex::encode(&q.report_data));
    f("Certification data:", format!("type {}", q.cert_data_type));
    Ok(Done::ok(s))
}
