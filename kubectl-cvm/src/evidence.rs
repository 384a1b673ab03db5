//! `kubectl cvm evidence verify`: offline verification of SNP reports and TDX quotes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, ValueEnum};
use cvm_attest::ear::{Appraisal, Ear, VerifierId};
use cvm_attest::snp::{self, SnpContext, SnpEvidence, SnpPolicy, SnpVerifier};
use cvm_attest::tdx::{self, AppraisalContext, TdxPolicy};
use cvm_attest::{Claim, Finding, Severity};
use thiserror::Error;

/// Input the command cannot work with: exit status 2.
#[derive(Debug, Error)]
pub enum CliError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path}: {why}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("{0}")]
    Usage(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// SEV-SNP attestation report: raw 1184 bytes, an Azure HCL report, or hex.
    #[arg(long, value_name = "FILE")]
    pub snp_report: Option<PathBuf>,
    /// Certificates for the SNP report (VCEK/VLEK, ASK/ASVK, ARK): DER or PEM (a PEM
    /// file may hold several). AMD's ARKs and ASKs are built in.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub certs: Vec<PathBuf>,
    /// AMD certificate revocation list(s), DER or PEM.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub crl: Vec<PathBuf>,
    /// TDX quote (v4/v5), raw bytes.
    #[arg(long, value_name = "FILE", requires = "collateral")]
    pub tdx_quote: Option<PathBuf>,
    /// Collateral for the TDX quote (QuoteCollateralV3 JSON).
    #[arg(long, value_name = "FILE", requires = "tdx_quote")]
    pub collateral: Option<PathBuf>,
    /// The verifier's nonce, hex; report_data must equal SHA-512(nonce).
    #[arg(long, value_name = "HEX")]
    pub nonce: Option<String>,
    /// Accepted launch measurement(s) (SNP MEASUREMENT / TDX MRTD), hex, 48 bytes.
    #[arg(long, value_name = "HEX", num_args = 1..)]
    pub expected_measurement: Vec<String>,
    /// Policy file (YAML or JSON): an SNP or TDX policy, or `{snp: …, tdx: …}`.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Verification time (RFC 3339); default now.
    #[arg(long, value_name = "RFC3339")]
    pub at: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: Output,
}

/// What to print and how to exit.
pub struct Outcome {
    pub text: String,
    pub affirmed: bool,
}

pub(crate) fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|source| CliError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn invalid(what: &'static str, path: &Path, why: impl ToString) -> CliError {
    CliError::Invalid {
        what,
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

pub(crate) fn decode_hex(flag: &str, text: &str) -> Result<Vec<u8>, CliError> {
    let t = text.trim();
    let t = t.strip_prefix("0x").unwrap_or(t);
    hex::decode(t).map_err(|e| CliError::Usage(format!("{flag} {text:?} is not hex: {e}")))
}

/// The policy file's SNP and TDX parts. A file with top-level `snp:`/`tdx:` keys holds
/// both; otherwise the whole file is the policy for the evidence given.
pub(crate) fn load_policies(path: Option<&Path>) -> Result<(SnpPolicy, TdxPolicy), CliError> {
    let Some(path) = path else {
        return Ok((SnpPolicy::default(), TdxPolicy::default()));
    };
    let text = String::from_utf8(read("policy", path)?)
        .map_err(|_| invalid("policy", path, "not UTF-8 text"))?;
    let value: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| invalid("policy", path, e))?;
    let (snp_v, tdx_v) = match &value {
        serde_yaml::Value::Mapping(m) if m.contains_key("snp") || m.contains_key("tdx") => {
            let pick = |k: &str| m.get(k).cloned().unwrap_or(serde_yaml::Value::Null);
            (pick("snp"), pick("tdx"))
        }
        serde_yaml::Value::Null => (serde_yaml::Value::Null, serde_yaml::Value::Null),
        other => (other.clone(), other.clone()),
    };
    let snp_policy = if snp_v.is_null() {
        SnpPolicy::default()
    } else {
        let p: SnpPolicy =
            serde_yaml::from_value(snp_v).map_err(|e| invalid("SNP policy", path, e))?;
        p.validate().map_err(|e| invalid("SNP policy", path, e))?;
        p
    };
    let tdx_policy = if tdx_v.is_null() {
        TdxPolicy::default()
    } else {
        serde_yaml::from_value(tdx_v).map_err(|e| invalid("TDX policy", path, e))?
    };
    Ok((snp_policy, tdx_policy))
}

pub fn run(args: &VerifyArgs) -> Result<Outcome, CliError> {
    if args.snp_report.is_none() && args.tdx_quote.is_none() {
        return Err(CliError::Usage(
            "nothing to verify: give --snp-report FILE and/or --tdx-quote FILE --collateral FILE"
                .into(),
        ));
    }
    if args.snp_report.is_none() && (!args.certs.is_empty() || !args.crl.is_empty()) {
        return Err(CliError::Usage(
            "--certs and --crl go with --snp-report".into(),
        ));
    }
    let now = match &args.at {
        Some(t) => {
            snp::time::parse_rfc3339(t).map_err(|e| CliError::Usage(format!("--at: {e}")))?
        }
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let nonce = args
        .nonce
        .as_deref()
        .map(|n| decode_hex("--nonce", n))
        .transpose()?;
    let mut measurements = Vec::new();
    for m in &args.expected_measurement {
        let b = decode_hex("--expected-measurement", m)?;
        if b.len() != 48 {
            return Err(CliError::Usage(format!(
                "--expected-measurement {m:?}: a measurement is 48 bytes (96 hex digits), got {}",
                b.len()
            )));
        }
        measurements.push(b);
    }
    let (mut snp_policy, mut tdx_policy) = load_policies(args.policy.as_deref())?;

    let mut ear = Ear::new(
        now as i64,
        VerifierId {
            developer: "cvmp.io".into(),
            build: format!("kubectl-cvm {}", env!("CARGO_PKG_VERSION")),
        },
    );
    let mut text = String::new();
    let mut affirmed = true;

    if let Some(path) = &args.snp_report {
        for m in &measurements {
            let mut a = [0u8; 48];
            a.copy_from_slice(m);
            snp_policy.measurements.push(snp::Hex(a));
        }
        let (appraisal, summary) = verify_snp(args, path, snp_policy, nonce.clone(), now)?;
        affirmed &= appraisal.is_affirmed();
        ear.submods
            .insert(snp::SUBMOD.into(), appraisal.to_submod(None));
        text.push_str(&summary);
    }
    if let Some(path) = &args.tdx_quote {
        tdx_policy.mrtd.extend(measurements.iter().cloned());
        let (appraisal, summary) = verify_tdx(args, path, tdx_policy, nonce, now)?;
        affirmed &= appraisal.is_affirmed();
        ear.submods.insert("TDX".into(), appraisal.to_submod(None));
        text.push_str(&summary);
    }

    let text = match args.output {
        Output::Json => format!("{}\n", ear.to_json()),
        Output::Text => {
            let verdict = if affirmed {
                "AFFIRMED"
            } else {
                "CONTRAINDICATED"
            };
            format!("{text}result: {verdict} (ear.status {})\n", ear.status())
        }
    };
    Ok(Outcome { text, affirmed })
}

fn verify_snp(
    args: &VerifyArgs,
    path: &Path,
    policy: SnpPolicy,
    nonce: Option<Vec<u8>>,
    now: u64,
) -> Result<(Appraisal, String), CliError> {
    let file = read("SNP report", path)?;
    let report = snp::extract_report_bytes(&file).map_err(|e| invalid("SNP report", path, e))?;
    let mut certs = Vec::new();
    for p in &args.certs {
        let parsed = snp::certs::pem_or_der(&read("certificate file", p)?)
            .map_err(|e| invalid("certificate file", p, e))?;
        // A file that is not X.509 at all is unreadable input; a certificate with bad
        // content goes on to the verifier, which refuses it with a named finding.
        for der in &parsed {
            if let Err(e @ snp::CertError::Der(_)) = snp::Cert::from_der(der) {
                return Err(invalid("certificate file", p, e));
            }
        }
        certs.extend(parsed);
    }
    let mut crls = Vec::new();
    for p in &args.crl {
        let parsed = snp::certs::pem_or_der_crls(&read("CRL file", p)?)
            .map_err(|e| invalid("CRL file", p, e))?;
        crls.extend(parsed);
    }
    appraise_snp(
        &path.display().to_string(),
        &report,
        &certs,
        &crls,
        policy,
        nonce,
        now,
    )
    .map_err(CliError::Usage)
}

/// Verifies report bytes with their certificates and appraises them; returns the
/// appraisal and a readable summary headed by `label`. Used for files and for evidence
/// fetched from a cluster. An unusable policy is the only error.
pub fn appraise_snp(
    label: &str,
    report: &[u8],
    certs: &[Vec<u8>],
    crls: &[Vec<u8>],
    policy: SnpPolicy,
    nonce: Option<Vec<u8>>,
    now: u64,
) -> Result<(Appraisal, String), String> {
    let verifier = SnpVerifier::new(policy).map_err(|e| e.to_string())?;
    let ev = SnpEvidence {
        report,
        certs,
        crls,
    };
    let a = verifier.verify(&ev, &SnpContext { nonce }, now);

    let mut s = String::new();
    let _ = writeln!(s, "SEV-SNP report {label}");
    if let Some(r) = &a.report {
        let _ = writeln!(
            s,
            "  version {}, VMPL {}, guest policy {:#x}, signed by {}",
            r.version,
            r.vmpl,
            r.policy.0,
            r.signing_key()
        );
        let _ = writeln!(s, "  measurement {}", hex::encode(r.measurement));
        if let Some(g) = a.generation {
            let _ = writeln!(s, "  {g}, reported TCB {}", r.reported_tcb(g));
        }
    }
    if let Some(c) = &a.chain {
        let _ = writeln!(
            s,
            "  chain: {} '{}' <- '{}' <- {}",
            c.vek_kind, c.vek_subject, c.intermediate_subject, c.root
        );
    }
    write_appraisal(&mut s, &a.appraisal);
    Ok((a.appraisal, s))
}

fn verify_tdx(
    args: &VerifyArgs,
    path: &Path,
    policy: TdxPolicy,
    nonce: Option<Vec<u8>>,
    now: u64,
) -> Result<(Appraisal, String), CliError> {
    let quote = read("TDX quote", path)?;
    let Some(cpath) = &args.collateral else {
        return Err(CliError::Usage(
            "--tdx-quote needs --collateral FILE".into(),
        ));
    };
    let collateral = read("TDX collateral", cpath)?;
    appraise_tdx(
        &path.display().to_string(),
        &quote,
        &collateral,
        policy,
        nonce,
        now,
    )
    .map_err(|e| invalid("TDX evidence", path, e))
}

/// Verifies a TDX quote against its collateral and appraises it; returns the appraisal
/// and a readable summary headed by `label`. Errors are quotes or collateral that cannot
/// be appraised at all.
pub fn appraise_tdx(
    label: &str,
    quote: &[u8],
    collateral: &[u8],
    policy: TdxPolicy,
    nonce: Option<Vec<u8>>,
    now: u64,
) -> Result<(Appraisal, String), tdx::TdxError> {
    let ctx = AppraisalContext {
        now_unix: now,
        nonce,
        evidence_time_unix: None,
    };
    let t = tdx::verify_quote(quote, collateral, &policy, &ctx)?;
    // The TDX verifier reports findings and whether the quote verified; a verified
    // quote establishes the hardware and its memory protection.
    let mut affirmed = Vec::new();
    if t.verified {
        affirmed.extend([Claim::Hardware, Claim::RuntimeOpaque, Claim::Configuration]);
        if !policy.mrtd.is_empty() {
            affirmed.push(Claim::Executables);
        }
        if ctx.nonce.is_some() {
            affirmed.push(Claim::InstanceIdentity);
        }
    }
    let mut a = Appraisal::from_findings(t.findings.clone(), affirmed);
    if !t.verified && !a.findings.iter().any(Finding::is_contraindicated) {
        a.push(Finding::new(
            "quote-not-verified",
            Claim::Hardware,
            Severity::Contraindicated,
            "TDX quote did not verify up to a trusted root",
        ));
    }
    let mut s = String::new();
    let _ = writeln!(s, "TDX quote {label}");
    let _ = writeln!(s, "  MRTD {}", hex::encode(&t.decoded.mr_td));
    if let Some(status) = &t.tcb_status {
        let _ = writeln!(s, "  TCB status {status}");
    }
    write_appraisal(&mut s, &a);
    Ok((a, s))
}

pub(crate) fn write_appraisal(s: &mut String, a: &Appraisal) {
    let vector: Vec<String> = a
        .vector()
        .iter()
        .map(|(c, v)| {
            let name = serde_json::to_value(c)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            format!("{name}={v}")
        })
        .collect();
    let _ = writeln!(s, "  status: {}", a.status());
    let _ = writeln!(s, "  trustworthiness: {}", vector.join(" "));
    for f in &a.findings {
        let sev = match f.severity {
            Severity::Info => "info",
            Severity::Warning => "WARNING",
            Severity::Contraindicated => "CONTRAINDICATED",
        };
        let _ = writeln!(s, "  {sev}: {f}");
    }
}
