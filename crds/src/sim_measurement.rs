//! The simulated launch measurement: what a simulated host reports as the guest's launch
//! digest (SNP MEASUREMENT, TDX MRTD, SEV/SEV-ES LAUNCH_MEASURE digest).
//!
//! A real digest is computed by the firmware over the pages and VMSAs it loads; it is a
//! function of the boot inputs alone, so anyone holding the same inputs can predict it
//! (that is how `sev-snp-measure` works). The simulation keeps exactly that property with
//! a simple, documented function, so that users, the examples and `kubectl cvm` can
//! compute the expected value from the manifest:
//!
//! ```text
//! digest = H( "cvmp.io/sim-launch-measurement/v1"
//!             || field("tee")       -- "SEV" | "SEV-ES" | "SEV-SNP" | "TDX"
//!             || field("vcpus")     -- u32, big endian
//!             || field("cpu-model") -- effective QEMU model (EPYC-v4 when unset); absent for TDX
//!             || field("firmware")  -- artifact (below)
//!             || field("kernel")    -- artifact or absent
//!             || field("initrd")    -- artifact or absent
//!             || field("cmdline")   -- UTF-8 bytes or absent
//!             || field("policy") )  -- u64 big endian: SNP guest policy, SEV policy
//!                                      (ES bit for SEV-ES) or TDX attributes (DEBUG, MIGRATABLE)
//! field(k) = u32be(len k) || k || (0x00 if absent | 0x01 || u32be(len v) || v)
//! artifact = "sha256:<hex>" when a digest is given (content is what a firmware measures),
//!            else "name:<name>" or "url:<url>"
//! H = SHA-384 (48 bytes) for SEV-SNP and TDX, SHA-256 (32 bytes) for SEV and SEV-ES.
//! ```
//!
//! Memory size, disks and host data are deliberately absent: a real launch digest does not
//! cover them either (host data is a separate, signed report field).
//!
//! It lives with the API types, not in the node plugin, because it is a function of the
//! spec alone and `kubectl cvm measure --simulated` computes it on the user's machine; the
//! node plugin re-exports it as `cvm_node_plugin::measure`.

use crate::cvm::{ArtifactRef, ConfidentialVMSpec, CpuModel};
use crate::TeeType;
use sha2::{Digest, Sha256, Sha384};

/// Domain separator, versioned so a future change of the encoding cannot collide.
pub const DOMAIN: &[u8] = b"cvmp.io/sim-launch-measurement/v1";

/// The simulated launch measurement of `spec` as lowercase hex: 96 characters for SEV-SNP
/// and TDX, 64 for SEV and SEV-ES (see the module docs for the exact function).
pub fn simulated_measurement(spec: &ConfidentialVMSpec) -> String {
    hex::encode(simulated_measurement_bytes(spec))
}

/// The simulated launch measurement as bytes (48 or 32, see [`simulated_measurement`]).
pub fn simulated_measurement_bytes(spec: &ConfidentialVMSpec) -> Vec<u8> {
    let input = canonical_input(spec);
    match spec.tee.tee_type {
        TeeType::SevSnp | TeeType::Tdx => Sha384::digest(&input).to_vec(),
        TeeType::Sev | TeeType::SevEs => Sha256::digest(&input).to_vec(),
    }
}

/// The launch policy word the simulated host launches `spec` with: SNP guest policy, SEV
/// policy (with the ES bit for SEV-ES) or the TDX attributes the guest policy decides.
pub fn launch_policy(spec: &ConfidentialVMSpec) -> u64 {
    let p = spec.tee.policy.clone().unwrap_or_default();
    match spec.tee.tee_type {
        TeeType::SevSnp => p.snp_guest_policy(),
        TeeType::Sev => p.sev_policy(false),
        TeeType::SevEs => p.sev_policy(true),
        TeeType::Tdx => p.tdx_attributes(),
    }
}

/// The CPU model a guest of `spec` is launched with: the documented default (`EPYC-v4`)
/// when unset on AMD; `None` on TDX, where the knob does not exist.
pub fn effective_cpu_model(spec: &ConfidentialVMSpec) -> Option<CpuModel> {
    spec.tee
        .tee_type
        .is_amd()
        .then(|| spec.cpu_model.unwrap_or(CpuModel::EpycV4))
}

/// The byte string that is hashed (exposed for documentation tests and other tools).
pub fn canonical_input(spec: &ConfidentialVMSpec) -> Vec<u8> {
    let mut out = DOMAIN.to_vec();
    let boot = &spec.boot;
    field(&mut out, "tee", Some(spec.tee.tee_type.as_str().as_bytes()));
    field(&mut out, "vcpus", Some(&spec.resources.vcpus.to_be_bytes()));
    let cpu = effective_cpu_model(spec);
    field(&mut out, "cpu-model", cpu.map(|c| c.as_str().as_bytes()));
    field(
        &mut out,
        "firmware",
        Some(artifact(&boot.firmware).as_bytes()),
    );
    let kernel = boot.kernel.as_ref().map(artifact);
    field(&mut out, "kernel", kernel.as_deref().map(str::as_bytes));
    let initrd = boot.initrd.as_ref().map(artifact);
    field(&mut out, "initrd", initrd.as_deref().map(str::as_bytes));
    field(
        &mut out,
        "cmdline",
        boot.cmdline.as_deref().map(str::as_bytes),
    );
    field(&mut out, "policy", Some(&launch_policy(spec).to_be_bytes()));
    out
}

fn field(out: &mut Vec<u8>, key: &str, value: Option<&[u8]>) {
    put_len_prefixed(out, key.as_bytes());
    match value {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            put_len_prefixed(out, v);
        }
    }
}

fn put_len_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    // Inputs are bounded by the CRD schema (cmdline ≤ 4096, URLs ≤ 2048), far below u32.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

fn artifact(a: &ArtifactRef) -> String {
    match (&a.sha256, &a.name, &a.url) {
        (Some(d), _, _) => format!("sha256:{}", d.to_ascii_lowercase()),
        (None, Some(n), _) => format!("name:{n}"),
        (None, None, Some(u)) => format!("url:{u}"),
        (None, None, None) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cvm::{BootSpec, GuestPolicy, ResourcesSpec, RunStrategy, TeeSpec};

    fn spec(tee: TeeType) -> ConfidentialVMSpec {
        ConfidentialVMSpec {
            tee: TeeSpec {
                tee_type: tee,
                policy: None,
                minimum_tcb: None,
                host_data: None,
            },
            resources: ResourcesSpec {
                vcpus: 2,
                memory_mib: 2048,
            },
            cpu_model: None,
            boot: BootSpec {
                firmware: ArtifactRef {
                    name: Some("ovmf-snp".into()),
                    ..Default::default()
                },
                kernel: Some(ArtifactRef {
                    url: Some("https://example.com/vmlinuz".into()),
                    sha256: Some("11".repeat(32)),
                    ..Default::default()
                }),
                initrd: Some(ArtifactRef {
                    url: Some("https://example.com/initrd".into()),
                    sha256: Some("22".repeat(32)),
                    ..Default::default()
                }),
                cmdline: Some("console=ttyS0".into()),
            },
            disks: vec![],
            network: None,
            node_selector: Default::default(),
            run_strategy: RunStrategy::Always,
            attestation: None,
        }
    }

    #[test]
    fn golden_values_are_stable() {
        // Changing these means every published expectedMeasurement changes: bump DOMAIN.
        assert_eq!(simulated_measurement(&spec(TeeType::SevSnp)), GOLDEN_SNP,);
        assert_eq!(simulated_measurement(&spec(TeeType::SevEs)), GOLDEN_SEV_ES);
    }

    // Computed independently from the encoding documented above (a 20-line Python script
    // over the same inputs), so the docs and the code are known to agree.
    const GOLDEN_SNP: &str = "75de9f8ecb2c575472257411692b1e9e41718c7942b1ec0e3c8b0892325669e31c98ca029d2f188522da0db2f548c975";
    const GOLDEN_SEV_ES: &str = "10b22867c822e410ca572dbbedadef15b9e1da666f2021328dea58778aaa4c05";

    #[test]
    fn lengths_follow_the_tee() {
        for (tee, len) in [
            (TeeType::Sev, 64),
            (TeeType::SevEs, 64),
            (TeeType::SevSnp, 96),
            (TeeType::Tdx, 96),
        ] {
            let m = simulated_measurement(&spec(tee));
            assert_eq!(m.len(), len, "{tee}");
            assert_eq!(m.len(), tee.measurement_hex_len());
            assert!(m.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')));
        }
    }

    type Change = Box<dyn Fn(&mut ConfidentialVMSpec)>;

    #[test]
    fn every_input_changes_the_measurement() {
        let base = spec(TeeType::SevSnp);
        let m0 = simulated_measurement(&base);
        let variants: Vec<(&str, Change)> = vec![
            ("tee", Box::new(|s| s.tee.tee_type = TeeType::Tdx)),
            ("vcpus", Box::new(|s| s.resources.vcpus = 3)),
            (
                "cpu model",
                Box::new(|s| s.cpu_model = Some(CpuModel::EpycGenoa)),
            ),
            (
                "firmware",
                Box::new(|s| s.boot.firmware.name = Some("ovmf-other".into())),
            ),
            (
                "kernel digest",
                Box::new(|s| {
                    if let Some(k) = s.boot.kernel.as_mut() {
                        k.sha256 = Some("33".repeat(32));
                    }
                }),
            ),
            ("no kernel", Box::new(|s| s.boot.kernel = None)),
            (
                "initrd digest",
                Box::new(|s| {
                    if let Some(k) = s.boot.initrd.as_mut() {
                        k.sha256 = Some("44".repeat(32));
                    }
                }),
            ),
            ("no initrd", Box::new(|s| s.boot.initrd = None)),
            (
                "cmdline",
                Box::new(|s| s.boot.cmdline = Some("console=ttyS1".into())),
            ),
            (
                "empty cmdline",
                Box::new(|s| s.boot.cmdline = Some(String::new())),
            ),
            ("no cmdline", Box::new(|s| s.boot.cmdline = None)),
            (
                "debug policy",
                Box::new(|s| {
                    s.tee.policy = Some(GuestPolicy {
                        debug: true,
                        ..Default::default()
                    })
                }),
            ),
            (
                "smt policy",
                Box::new(|s| {
                    s.tee.policy = Some(GuestPolicy {
                        smt: Some(false),
                        ..Default::default()
                    })
                }),
            ),
        ];
        let mut seen = std::collections::BTreeSet::from([m0.clone()]);
        for (what, change) in variants {
            let mut s = base.clone();
            change(&mut s);
            let m = simulated_measurement(&s);
            assert_ne!(m, m0, "changing {what} must change the measurement");
            assert!(seen.insert(m), "{what} collides with another variant");
        }
    }

    #[test]
    fn inputs_outside_the_launch_digest_do_not_change_it() {
        let base = spec(TeeType::SevSnp);
        let m0 = simulated_measurement(&base);
        let mut s = base.clone();
        s.resources.memory_mib = 4096;
        s.tee.host_data = Some("ab".repeat(32));
        assert_eq!(simulated_measurement(&s), m0);
        // The default CPU model and an explicit EPYC-v4 are the same launch.
        s.cpu_model = Some(CpuModel::EpycV4);
        assert_eq!(simulated_measurement(&s), m0);
        // The same content by name or by URL measures the same once the digest is pinned.
        let mut by_url = base.clone();
        if let Some(k) = by_url.boot.kernel.as_mut() {
            k.url = None;
            k.name = Some("vmlinuz-6.12".into());
        }
        assert_eq!(simulated_measurement(&by_url), m0);
    }

    #[test]
    fn tdx_ignores_cpu_model_and_uses_td_attributes() {
        let mut a = spec(TeeType::Tdx);
        let m0 = simulated_measurement(&a);
        a.cpu_model = Some(CpuModel::EpycTurin);
        assert_eq!(
            simulated_measurement(&a),
            m0,
            "cpuModel does not apply to TDX"
        );
        a.tee.policy = Some(GuestPolicy {
            migratable: true,
            ..Default::default()
        });
        assert_ne!(simulated_measurement(&a), m0);
        assert_eq!(launch_policy(&a), 1 << 29);
    }
}
