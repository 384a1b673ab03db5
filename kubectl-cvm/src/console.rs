//! `kubectl cvm console NAME`: the guest's serial console, as `virtctl console` gives a
//! KubeVirt VM's. The console is a socket in the CVM's launcher pod (QEMU's serial port);
//! `cvm-launcher console` bridges it to a terminal, and this command runs that in the pod
//! with `kubectl exec`, so it needs what `kubectl exec` needs (`pods/exec` in the CVM's
//! namespace). Everything the guest printed before is in the pod's log (`kubectl logs`).

use std::io::IsTerminal;
use std::process::Command;

use clap::Args;

use crate::cli::{Done, KubeArgs};

pub const EXAMPLES: &str = "Examples:
  kubectl cvm console my-vm
  kubectl cvm console my-vm -n prod

Detach with Ctrl-D at an empty line when the guest's shell ends, or Ctrl-C (kubectl's).
The boot so far: kubectl logs my-vm-launcher.";

#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// The ConfidentialVM.
    pub name: String,
    /// kubectl to run (default: kubectl on PATH).
    #[arg(long, default_value = "kubectl", value_name = "PATH")]
    pub kubectl: String,
}

/// The `kubectl exec` arguments that attach to `name`'s console.
pub fn exec_args(kube: &KubeArgs, name: &str, tty: bool) -> Vec<String> {
    let mut a = Vec::new();
    if let Some(k) = &kube.kubeconfig {
        a.push(format!("--kubeconfig={}", k.display()));
    }
    if let Some(c) = &kube.context {
        a.push(format!("--context={c}"));
    }
    if let Some(n) = &kube.namespace {
        a.push(format!("--namespace={n}"));
    }
    a.extend(["exec".into(), if tty { "-it" } else { "-i" }.into()]);
    a.push(cvm_crds::wellknown::launcher_pod_name(name));
    a.extend(
        ["-c", "launcher", "--", "cvm-launcher", "console"]
            .iter()
            .map(|s| s.to_string()),
    );
    a
}

pub fn run(kube: &KubeArgs, a: &ConsoleArgs) -> Result<Done, String> {
    let tty = std::io::stdin().is_terminal();
    let status = Command::new(&a.kubectl)
        .args(exec_args(kube, &a.name, tty))
        .status()
        .map_err(|e| {
            format!(
                "cannot run {}: {e} (kubectl cvm console runs kubectl exec)",
                a.kubectl
            )
        })?;
    Ok(Done {
        stdout: String::new(),
        code: status
            .code()
            .and_then(|c| u8::try_from(c).ok())
            .unwrap_or(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_is_kubectl_exec_of_the_launcher_in_the_cvm_s_pod() {
        let kube = KubeArgs {
            kubeconfig: Some("/k/config".into()),
            context: None,
            namespace: Some("prod".into()),
        };
        assert_eq!(
            exec_args(&kube, "web", false).join(" "),
            "--kubeconfig=/k/config --namespace=prod exec -i web-launcher -c launcher -- cvm-launcher console"
        );
        assert!(exec_args(&KubeArgs::default(), "web", true).contains(&"-it".to_string()));
    }
}
