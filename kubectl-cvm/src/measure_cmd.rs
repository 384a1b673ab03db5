//! `kubectl cvm measure`: the launch digest a guest will report, computed beforehand.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::Deserialize as _;
use serde_json::json;
use thiserror::Error;

use crate::cli::Done;
use crate::evidence::Output;
use crate::measure::{self, vmsa, Inputs, MeasureError, Mode};

pub const EXAMPLES: &str = "Examples:
  # SEV-SNP, firmware only (the Debian OVMF), 16 vCPUs on Milan hosts
  kubectl cvm measure --ovmf /usr/share/ovmf/OVMF.fd --vcpus 16 --vcpu-type EPYC-Milan
  # SEV-SNP direct kernel boot (AmdSevX64 firmware), with inputs and hashes as JSON
  kubectl cvm measure --ovmf OVMF.amdsev.fd --vcpus 4 --vcpu-type EPYC-v4 \\
      --kernel vmlinuz --initrd initrd.img --append 'console=ttyS0' -o json
  # SEV-ES and SEV
  kubectl cvm measure --mode sev-es --ovmf OVMF.fd --vcpus 2 --vcpu-type EPYC-Rome
  # What the local cluster's simulated hosts will report for a manifest
  kubectl cvm measure --simulated --cvm examples/sev-snp-cvm.yaml";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    #[value(name = "sev-snp", alias = "snp")]
    SevSnp,
    #[value(name = "sev-es", alias = "seves")]
    SevEs,
    Sev,
}

#[derive(Debug, Args)]
pub struct MeasureArgs {
    /// Guest type.
    #[arg(long, value_enum, default_value = "sev-snp")]
    pub mode: ModeArg,
    /// OVMF firmware image (with the SEV footer table).
    #[arg(long, value_name = "FILE", required_unless_present = "simulated")]
    pub ovmf: Option<PathBuf>,
    /// Number of vCPUs (each adds a VMSA page to SEV-SNP and SEV-ES digests).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u32,
    /// QEMU CPU model: EPYC, EPYC-v1…v4, EPYC-IBPB, EPYC-Rome(-v1…v4), EPYC-Milan(-v1, -v2),
    /// EPYC-Genoa(-v1), EPYC-Turin(-v1).
    #[arg(long, value_name = "MODEL", default_value = "EPYC-v4")]
    pub vcpu_type: String,
    /// CPUID signature instead of a model name, hex (e.g. 0xa00f11).
    #[arg(long, value_name = "HEX", conflicts_with = "vcpu_type")]
    pub vcpu_sig: Option<String>,
    /// Kernel for direct boot (QEMU kernel-hashes=on).
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Initrd for direct boot (with --kernel).
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line exactly as given to QEMU's -append (with --kernel).
    #[arg(long, value_name = "CMDLINE")]
    pub append: Option<String>,
    /// SEV_FEATURES of the guest's VMSAs, hex (SEV-SNP; 0x1 = SNP active; QEMU's default).
    #[arg(long, value_name = "HEX", default_value = "0x1")]
    pub guest_features: String,
    /// Precomputed OVMF hash (48 bytes hex, `ovmfHash` of `-o json`); --ovmf may then be
    /// just the image's last pages holding the footer table and SEV metadata.
    #[arg(long, value_name = "HEX")]
    pub ovmf_hash: Option<String>,
    /// Print what the local cluster's simulated hosts report for --cvm (not real hardware).
    #[arg(long, requires = "cvm", conflicts_with_all = ["ovmf", "kernel", "initrd", "append", "ovmf_hash"])]
    pub simulated: bool,
    /// ConfidentialVM manifest(s), YAML (with --simulated).
    #[arg(long, value_name = "FILE.yaml", requires = "simulated")]
    pub cvm: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Debug, Error)]
pub enum MeasureCmdError {
    #[error(transparent)]
    Measure(#[from] MeasureError),
    #[error("{0}")]
    Usage(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Manifest { path: PathBuf, why: String },
}

fn parse_hex_u64(flag: &str, s: &str) -> Result<u64, MeasureCmdError> {
    let t = s.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    u64::from_str_radix(t, 16)
        .map_err(|e| MeasureCmdError::Usage(format!("{flag} {s:?} is not a hex number: {e}")))
}

pub fn run(a: &MeasureArgs) -> Result<Done, MeasureCmdError> {
    if a.simulated {
        return simulated(a);
    }
    let Some(ovmf) = a.ovmf.clone() else {
        return Err(MeasureCmdError::Usage("--ovmf FILE is required".into()));
    };
    let (vcpu_type, vcpu_sig) = match &a.vcpu_sig {
        Some(s) => {
            let sig = parse_hex_u64("--vcpu-sig", s)?;
            let sig = u32::try_from(sig)
                .map_err(|_| MeasureCmdError::Usage(format!("--vcpu-sig {s}: over 32 bits")))?;
            (format!("{sig:#x}"), sig)
        }
        None => {
            let (name, sig) = vmsa::sig_for(&a.vcpu_type).ok_or_else(|| {
                let known: Vec<&str> = vmsa::CPU_MODELS.iter().map(|m| m.0).collect();
                MeasureCmdError::Usage(format!(
                    "--vcpu-type {:?} is not a known AMD CPU model; known: {}",
                    a.vcpu_type,
                    known.join(", ")
                ))
            })?;
            (name.to_string(), sig)
        }
    };
    let ovmf_hash = match &a.ovmf_hash {
        None => None,
        Some(h) => {
            let t = h.trim();
            let t = t.strip_prefix("0x").unwrap_or(t);
            let b = hex::decode(t).map_err(|e| {
                MeasureCmdError::Usage(format!("--ovmf-hash {h:?} is not hex: {e}"))
            })?;
            Some(<[u8; 48]>::try_from(b.as_slice()).map_err(|_| {
                MeasureCmdError::Usage(format!(
                    "--ovmf-hash is 48 bytes (96 hex digits), got {}",
                    b.len()
                ))
            })?)
        }
    };
    let mode = match a.mode {
        ModeArg::SevSnp => Mode::Snp,
        ModeArg::SevEs => Mode::SevEs,
        ModeArg::Sev => Mode::Sev,
    };
    let inputs = Inputs {
        mode,
        ovmf,
        vcpus: a.vcpus,
        vcpu_sig,
        guest_features: parse_hex_u64("--guest-features", &a.guest_features)?,
        kernel: a.kernel.clone(),
        initrd: a.initrd.clone(),
        append: a.append.clone(),
        ovmf_hash,
    };
    let m = measure::measure(&inputs)?;
    let digest = hex::encode(&m.digest);
    let out = match a.output {
        Output::Text => format!("{digest}\n"),
        Output::Json => {
            let file = |f: &Option<measure::FileHash>| {
                f.as_ref().map(
                    |f| json!({"path": f.path, "size": f.size, "sha256": hex::encode(f.sha256)}),
                )
            };
            let mut v = json!({
                "mode": mode.name(),
                "measurement": digest,
                "inputs": {
                    "ovmf": {
                        "path": inputs.ovmf,
                        "size": m.ovmf_size,
                        "ovmfHash": m.ovmf_hash.map(hex::encode),
                        "ovmfHashGiven": m.ovmf_hash_given,
                        "sevMetadata": m.sections.iter().map(|(k, gpa, size)| json!({"type": k, "gpa": format!("{gpa:#x}"), "size": size})).collect::<Vec<_>>(),
                    },
                    "vcpus": inputs.vcpus,
                    "vcpuType": vcpu_type,
                    "vcpuSig": format!("{vcpu_sig:#x}"),
                    "kernel": file(&m.kernel),
                    "initrd": file(&m.initrd),
                    "append": inputs.append,
                    "cmdlineSha256": m.cmdline_sha256.map(hex::encode),
                    "vmm": "QEMU",
                },
            });
            if mode == Mode::Snp {
                v["inputs"]["guestFeatures"] = json!(format!("{:#x}", inputs.guest_features));
            }
            format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default())
        }
    };
    Ok(Done::ok(out))
}

fn simulated(a: &MeasureArgs) -> Result<Done, MeasureCmdError> {
    let Some(path) = &a.cvm else {
        return Err(MeasureCmdError::Usage(
            "--simulated needs --cvm FILE.yaml".into(),
        ));
    };
    let text = std::fs::read_to_string(path).map_err(|source| MeasureCmdError::Read {
        path: path.clone(),
        source,
    })?;
    let mut rows = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(doc).map_err(|e| MeasureCmdError::Manifest {
            path: path.clone(),
            why: e.to_string(),
        })?;
        if v.get("kind").and_then(|k| k.as_str()) != Some("ConfidentialVM") {
            continue;
        }
        let cvm: cvm_crds::ConfidentialVM =
            serde_yaml::from_value(v).map_err(|e| MeasureCmdError::Manifest {
                path: path.clone(),
                why: format!("not a valid ConfidentialVM: {e}"),
            })?;
        let name = cvm.metadata.name.clone().unwrap_or_default();
        rows.push((
            name,
            cvm.spec.tee.tee_type.as_str().to_string(),
            cvm_crds::sim_measurement::simulated_measurement(&cvm.spec),
        ));
    }
    if rows.is_empty() {
        return Err(MeasureCmdError::Manifest {
            path: path.clone(),
            why: "holds no ConfidentialVM".into(),
        });
    }
    let mut out = String::new();
    match a.output {
        Output::Json => {
            let v: Vec<_> = rows
                .iter()
                .map(|(n, t, m)| json!({"name": n, "tee": t, "measurement": m, "simulated": true}))
                .collect();
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&v).unwrap_or_default()
            );
        }
        Output::Text if rows.len() == 1 => {
            let _ = writeln!(out, "{}", rows[0].2);
        }
        Output::Text => {
            for (n, t, m) in &rows {
                let _ = writeln!(out, "{n}\t{t}\t{m}");
            }
        }
    }
    Ok(Done::ok(out))
}
