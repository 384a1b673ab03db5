//! The initial VMSA (SEV-ES save area) QEMU gives each vCPU. Its page is measured, so the
//! reset state, the CPU signature in RDX and the SEV features all enter the digest.
//! Offsets are those of AMD's APM vol. 2, table B-4 ("VMSA layout, state save area").

use super::gctx::PAGE;

/// Reset vector of the boot processor.
pub const BSP_EIP: u32 = 0xffff_fff0;

/// The CPU models QEMU names, with their (family, model, stepping).
pub const CPU_MODELS: &[(&str, (u32, u32, u32))] = &[
    ("EPYC", (23, 1, 2)),
    ("EPYC-v1", (23, 1, 2)),
    ("EPYC-v2", (23, 1, 2)),
    ("EPYC-IBPB", (23, 1, 2)),
    ("EPYC-v3", (23, 1, 2)),
    ("EPYC-v4", (23, 1, 2)),
    ("EPYC-Rome", (23, 49, 0)),
    ("EPYC-Rome-v1", (23, 49, 0)),
    ("EPYC-Rome-v2", (23, 49, 0)),
    ("EPYC-Rome-v3", (23, 49, 0)),
    ("EPYC-Rome-v4", (23, 49, 0)),
    ("EPYC-Milan", (25, 1, 1)),
    ("EPYC-Milan-v1", (25, 1, 1)),
    ("EPYC-Milan-v2", (25, 1, 1)),
    ("EPYC-Genoa", (25, 17, 0)),
    ("EPYC-Genoa-v1", (25, 17, 0)),
    ("EPYC-Turin", (26, 0, 0)),
    ("EPYC-Turin-v1", (26, 0, 0)),
];

/// CPUID(1).EAX encoding of family/model/stepping, as QEMU puts it in RDX at reset.
pub fn cpu_sig(family: u32, model: u32, stepping: u32) -> u32 {
    let (fam_lo, fam_hi) = if family > 0xf {
        (0xf, (family - 0xf) & 0xff)
    } else {
        (family, 0)
    };
    (fam_hi << 20)
        | (((model >> 4) & 0xf) << 16)
        | (fam_lo << 8)
        | ((model & 0xf) << 4)
        | (stepping & 0xf)
}

/// The signature of a named model (case-insensitive), or `None` if unknown.
pub fn sig_for(name: &str) -> Option<(&'static str, u32)> {
    CPU_MODELS
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(n, (f, m, s))| (*n, cpu_sig(*f, *m, *s)))
}

fn put(page: &mut [u8], at: usize, bytes: &[u8]) {
    page[at..at + bytes.len()].copy_from_slice(bytes);
}

/// A VMCB segment: selector u16, attributes u16, limit u32, base u64.
fn seg(page: &mut [u8], at: usize, selector: u16, attrib: u16, limit: u32, base: u64) {
    put(page, at, &selector.to_le_bytes());
    put(page, at + 2, &attrib.to_le_bytes());
    put(page, at + 4, &limit.to_le_bytes());
    put(page, at + 8, &base.to_le_bytes());
}

/// The VMSA page of a vCPU that starts at `eip` (QEMU's reset state in real mode).
pub fn page(eip: u32, cpu_sig: u32, sev_features: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    seg(&mut p, 0x000, 0, 0x93, 0xffff, 0); // ES
    seg(
        &mut p,
        0x010,
        0xf000,
        0x9b,
        0xffff,
        u64::from(eip & 0xffff_0000),
    ); // CS
    seg(&mut p, 0x020, 0, 0x93, 0xffff, 0); // SS
    seg(&mut p, 0x030, 0, 0x93, 0xffff, 0); // DS
    seg(&mut p, 0x040, 0, 0x93, 0xffff, 0); // FS
    seg(&mut p, 0x050, 0, 0x93, 0xffff, 0); // GS
    seg(&mut p, 0x060, 0, 0, 0xffff, 0); // GDTR
    seg(&mut p, 0x070, 0, 0x82, 0xffff, 0); // LDTR
    seg(&mut p, 0x080, 0, 0, 0xffff, 0); // IDTR
    seg(&mut p, 0x090, 0, 0x8b, 0xffff, 0); // TR
    put(&mut p, 0x0d0, &0x1000u64.to_le_bytes()); // EFER.SVME
    put(&mut p, 0x148, &0x40u64.to_le_bytes()); // CR4.MCE
    put(&mut p, 0x158, &0x10u64.to_le_bytes()); // CR0.ET
    put(&mut p, 0x160, &0x400u64.to_le_bytes()); // DR7
    put(&mut p, 0x168, &0xffff_0ff0u64.to_le_bytes()); // DR6
    put(&mut p, 0x170, &0x2u64.to_le_bytes()); // RFLAGS
    put(&mut p, 0x178, &u64::from(eip & 0xffff).to_le_bytes()); // RIP
    put(&mut p, 0x268, &0x0007_0406_0007_0406u64.to_le_bytes()); // G_PAT
    put(&mut p, 0x310, &u64::from(cpu_sig).to_le_bytes()); // RDX
    put(&mut p, 0x3b0, &sev_features.to_le_bytes()); // SEV_FEATURES
    put(&mut p, 0x3e8, &0x1u64.to_le_bytes()); // XCR0
    put(&mut p, 0x408, &0x1f80u32.to_le_bytes()); // MXCSR
    put(&mut p, 0x410, &0x37fu16.to_le_bytes()); // x87 FCW
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_cpuid_encoding() {
        assert_eq!(cpu_sig(23, 1, 2), 0x800f12);
        assert_eq!(sig_for("epyc-milan"), Some(("EPYC-Milan", 0xa00f11)));
        assert_eq!(sig_for("EPYC-Genoa").map(|x| x.1), Some(0xa10f10));
        assert_eq!(sig_for("EPYC-Turin").map(|x| x.1), Some(0xb00f00));
        assert_eq!(sig_for("pentium"), None);
    }

    #[test]
    fn reset_state_splits_eip_into_cs_base_and_rip() {
        let p = page(0xffff_fff0, 0x800f12, 1);
        assert_eq!(&p[0x18..0x20], &0xffff_0000u64.to_le_bytes());
        assert_eq!(&p[0x178..0x180], &0xfff0u64.to_le_bytes());
        assert_eq!(&p[0x310..0x318], &0x800f12u64.to_le_bytes());
        assert_eq!(p.len(), 4096);
    }
}
