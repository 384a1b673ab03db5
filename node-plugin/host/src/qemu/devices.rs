//! A guest's devices beyond CPU, memory and boot: its network (QEMU's user-mode stack, the
//! spec's ports forwarded from the launcher pod's address), its serial console (a socket
//! `kubectl cvm console` attaches to, copied to the pod's log), and the guest agent's
//! channel (vsock, or a virtio-serial port on a unix socket where the host has no
//! `/dev/vhost-vsock`).
//!
//! Confidential guests only reach devices through bounce buffers in shared memory: their
//! virtio devices carry `iommu_platform=on` (VIRTIO_F_ACCESS_PLATFORM), which needs the
//! modern-only transport (`disable-legacy=on`).
//!
//! [`plain_command_line`] is the machine of the test nodes only: TCG, no confidential-guest
//! object. Nothing in production builds it.

use std::path::PathBuf;

use cvm_crds::cvm::PortProtocol;

use super::{opt_value, text, QemuError};

/// The virtio-serial port name the guest agent opens (`/dev/virtio-ports/<name>`).
pub const AGENT_PORT_NAME: &str = "org.cvmp.agent.0";

/// The devices of one guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestDevices {
    /// Guest ports reachable at the same port of the launcher pod (`hostfwd`).
    pub ports: Vec<(PortProtocol, u16)>,
    /// The serial console's socket (server; one client at a time).
    pub console_socket: Option<PathBuf>,
    /// A file every console byte is also written to (the launcher's log pipe).
    pub console_log: Option<PathBuf>,
    /// The agent's virtio-serial port, on this unix socket (server).
    pub agent_socket: Option<PathBuf>,
    /// The agent's vsock context ID (`vhost-vsock-pci`).
    pub vsock_cid: Option<u32>,
    /// The guest's memory is private (SEV, SNP, TDX): devices need `iommu_platform`.
    pub confidential: bool,
}

impl GuestDevices {
    fn virtio(&self, device: &str) -> String {
        if self.confidential {
            format!("{device},disable-legacy=on,iommu_platform=on")
        } else {
            device.to_string()
        }
    }

    /// The `-netdev` value: one user-mode network with the ports forwarded.
    pub fn netdev(&self) -> String {
        let mut n = "user,id=net0".to_string();
        for (proto, port) in &self.ports {
            let p = match proto {
                PortProtocol::Tcp => "tcp",
                PortProtocol::Udp => "udp",
            };
            n.push_str(&format!(",hostfwd={p}::{port}-:{port}"));
        }
        n
    }

    /// The QEMU arguments of these devices.
    pub fn args(&self) -> Result<Vec<String>, QemuError> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |k: &str, v: String| {
            a.push(k.to_string());
            a.push(v);
        };
        push("-netdev", self.netdev());
        // No option ROM: guests boot their kernel directly or from firmware that has its
        // own virtio-net driver, and the launcher image then needs no ROM files.
        push(
            "-device",
            format!("{},netdev=net0,romfile=", self.virtio("virtio-net-pci")),
        );
        if let Some(sock) = &self.console_socket {
            let mut c = format!(
                "socket,id=console0,path={},server=on,wait=off",
                opt_value(text(sock)?)
            );
            if let Some(log) = &self.console_log {
                c.push_str(&format!(",logfile={}", opt_value(text(log)?)));
            }
            push("-chardev", c);
            push("-serial", "chardev:console0".into());
        }
        if let Some(sock) = &self.agent_socket {
            push(
                "-device",
                format!("{},id=agent0", self.virtio("virtio-serial-pci")),
            );
            push(
                "-chardev",
                format!(
                    "socket,id=agentchan0,path={},server=on,wait=off",
                    opt_value(text(sock)?)
                ),
            );
            push(
                "-device",
                format!("virtserialport,bus=agent0.0,chardev=agentchan0,name={AGENT_PORT_NAME}"),
            );
        }
        if let Some(cid) = self.vsock_cid {
            push(
                "-device",
                format!("{},guest-cid={cid}", self.virtio("vhost-vsock-pci")),
            );
        }
        Ok(a)
    }
}

/// A test node's guest: a plain VM under TCG, booted from a kernel and an initrd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainGuest {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
}

/// The command line (without the binary) of a test node's plain guest: no TEE, no KVM.
/// `-no-reboot` turns a guest panic (with `panic=-1`) or reboot into QEMU's exit, so a
/// guest that cannot boot ends its launch instead of looping.
pub fn plain_command_line(
    g: &PlainGuest,
    devices: &GuestDevices,
) -> Result<Vec<String>, QemuError> {
    if g.vcpus == 0 || g.memory_mib < 64 {
        return Err(QemuError::Spec(format!(
            "{} vCPUs and {} MiB: a guest needs at least 1 vCPU and 64 MiB",
            g.vcpus, g.memory_mib
        )));
    }
    let mut a: Vec<String> = Vec::new();
    let mut push = |k: &str, v: String| {
        a.push(k.to_string());
        a.push(v);
    };
    push("-name", format!("guest={}", opt_value(&g.name)));
    push("-machine", "q35".into());
    // A bounded translation cache: TCG's default (1 GiB) would count against the launcher
    // pod's memory limit as it fills.
    push("-accel", "tcg,tb-size=64".into());
    // QEMU 7.2's TCG corrupts Linux 6.12's slab allocator through cmpxchg16b; without cx16
    // the kernel does not use it.
    push("-cpu", "max,cx16=off".into());
    push("-smp", g.vcpus.to_string());
    push("-m", format!("{}M", g.memory_mib));
    push("-kernel", text(&g.kernel)?.to_string());
    if let Some(i) = &g.initrd {
        push("-initrd", text(i)?.to_string());
    }
    if let Some(c) = &g.cmdline {
        push("-append", c.clone());
    }
    a.extend(["-nographic", "-nodefaults", "-no-reboot"].map(String::from));
    a.extend(devices.args()?);
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> GuestDevices {
        GuestDevices {
            ports: vec![(PortProtocol::Tcp, 80), (PortProtocol::Udp, 53)],
            console_socket: Some("/run/l/console.sock".into()),
            console_log: Some("/dev/stdout".into()),
            agent_socket: Some("/run/l/agent,1.sock".into()),
            vsock_cid: None,
            confidential: false,
        }
    }

    fn joined(a: &[String]) -> String {
        a.join(" ")
    }

    #[test]
    fn ports_console_and_agent_channel_are_on_the_command_line() {
        let a = joined(&devices().args().unwrap());
        assert!(
            a.contains("-netdev user,id=net0,hostfwd=tcp::80-:80,hostfwd=udp::53-:53"),
            "{a}"
        );
        assert!(
            a.contains("-device virtio-net-pci,netdev=net0,romfile="),
            "{a}"
        );
        assert!(
            a.contains("-chardev socket,id=console0,path=/run/l/console.sock,server=on,wait=off,logfile=/dev/stdout -serial chardev:console0"),
            "{a}"
        );
        // A comma in a path is doubled, as QEMU's option syntax escapes it.
        assert!(a.contains("path=/run/l/agent,,1.sock"), "{a}");
        assert!(
            a.contains("virtserialport,bus=agent0.0,chardev=agentchan0,name=org.cvmp.agent.0"),
            "{a}"
        );
        assert!(!a.contains("iommu_platform"), "{a}");
        assert!(!a.contains("vsock"), "{a}");
    }

    #[test]
    fn confidential_guests_get_iommu_platform_on_every_virtio_device() {
        let d = GuestDevices {
            vsock_cid: Some(3),
            confidential: true,
            ..devices()
        };
        let a = d.args().unwrap();
        let virtio: Vec<&String> = a
            .iter()
            .filter(|s| s.starts_with("v") && s.contains("-pci"))
            .collect();
        assert_eq!(virtio.len(), 3, "{a:?}");
        for v in virtio {
            assert!(v.contains("disable-legacy=on,iommu_platform=on"), "{v}");
        }
        assert!(
            joined(&a).contains("vhost-vsock-pci,disable-legacy=on,iommu_platform=on,guest-cid=3")
        );
    }

    #[test]
    fn the_plain_test_machine_has_no_tee_and_exits_instead_of_rebooting() {
        let g = PlainGuest {
            name: "ns/plain".into(),
            vcpus: 1,
            memory_mib: 256,
            kernel: "/a/kernel".into(),
            initrd: Some("/a/initrd".into()),
            cmdline: Some("console=ttyS0 panic=-1".into()),
        };
        let args = plain_command_line(&g, &GuestDevices::default()).unwrap();
        let a = joined(&args);
        assert!(a.contains("-accel tcg,tb-size=64"), "{a}");
        assert!(a.contains("-no-reboot"), "{a}");
        assert!(!a.contains("confidential-guest-support"), "{a}");
        // It runs at once: no launch measurement to read before.
        assert!(!args.iter().any(|x| x == "-S"), "{a}");
        let e = plain_command_line(&PlainGuest { memory_mib: 0, ..g }, &GuestDevices::default())
            .unwrap_err();
        assert!(e.to_string().contains("at least 1 vCPU and 64 MiB"), "{e}");
    }
}
