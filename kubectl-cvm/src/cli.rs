//! Command line: subcommands, global kubectl-style flags, exit codes.
//!
//! `kubectl` runs `kubectl-cvm` from PATH for `kubectl cvm …`, passing the remaining
//! arguments as they are; so the usual kubectl flags (`--kubeconfig`, `--context`,
//! `-n/--namespace`) are ours to honour, anywhere on the line.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::{attest, evidence, measure_cmd, migrate, power, report, status};

#[derive(Debug, Parser)]
#[command(
    name = "kubectl-cvm",
    bin_name = "kubectl cvm",
    version,
    about = "Confidential VM client: measure, attest, inspect and verify, trusting only your own anchors",
    after_help = "Examples:\n  kubectl cvm measure --ovmf OVMF.fd --vcpus 4 --vcpu-type EPYC-Milan\n  kubectl cvm attest my-vm --random --trust-root amd\n  kubectl cvm status my-vm -n prod\n  kubectl cvm report my-vm\n  kubectl cvm restart my-vm --wait"
)]
struct Cli {
    #[command(flatten)]
    kube: KubeArgs,
    #[command(subcommand)]
    command: Command,
}

/// Where the cluster is, as kubectl spells it.
#[derive(Debug, Clone, Default, Args)]
pub struct KubeArgs {
    /// Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Kubeconfig context to use (default: the current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// Namespace of the ConfidentialVM (default: the context's namespace, else "default").
    #[arg(short = 'n', long, global = true, value_name = "NS")]
    pub namespace: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Compute a launch digest (SEV-SNP, SEV-ES or SEV) offline, before launch.
    #[command(after_help = measure_cmd::EXAMPLES)]
    Measure(measure_cmd::MeasureArgs),
    /// Ask a CVM for fresh evidence bound to your nonce and verify it on this machine.
    #[command(after_help = attest::EXAMPLES)]
    Attest(attest::AttestArgs),
    /// Decode a CVM's evidence (or a report/quote file) into readable fields.
    #[command(after_help = report::EXAMPLES)]
    Report(report::ReportArgs),
    /// Show a CVM's phase, node, TEE, who verified it and when, and the findings.
    #[command(after_help = status::EXAMPLES)]
    Status(status::StatusArgs),
    /// Live-migrate a CVM to another node (the target must pass attestation first).
    #[command(after_help = migrate::EXAMPLES)]
    Migrate(migrate::MigrateArgs),
    /// Start a stopped CVM: restore the runStrategy `stop` replaced (else Always).
    #[command(after_help = power::START_EXAMPLES)]
    Start(power::StartArgs),
    /// Stop a CVM's guest: set spec.runStrategy to Halted, remembering the strategy it had.
    #[command(after_help = power::STOP_EXAMPLES)]
    Stop(power::StopArgs),
    /// Stop a CVM's guest, wait until it is stopped, and start a new one.
    #[command(after_help = power::RESTART_EXAMPLES)]
    Restart(power::RestartArgs),
    /// Attach to a CVM's serial console (in its launcher pod, through kubectl exec).
    #[command(after_help = crate::console::EXAMPLES)]
    Console(crate::console::ConsoleArgs),
    /// Work with attestation evidence files.
    Evidence {
        #[command(subcommand)]
        command: EvidenceCommand,
    },
}

#[derive(Debug, Subcommand)]
enum EvidenceCommand {
    /// Verify SEV-SNP or TDX evidence offline and print an EAR result.
    #[command(
        after_help = "Examples:\n  kubectl cvm evidence verify --snp-report report.bin --certs vcek.pem --nonce 00ff\n  kubectl cvm evidence verify --tdx-quote quote.dat --collateral collateral.json -o json"
    )]
    Verify(evidence::VerifyArgs),
}

/// What a command printed and how the process ends.
pub struct Done {
    pub stdout: String,
    pub code: u8,
}

impl Done {
    pub fn ok(stdout: String) -> Self {
        Done { stdout, code: 0 }
    }
    pub fn verdict(stdout: String, affirmed: bool) -> Self {
        Done {
            stdout,
            code: if affirmed { 0 } else { 1 },
        }
    }
}

/// Entry point for the binary and for multi-call hosts (`cvm-dev kubectl-cvm …`).
/// `args` includes the program name.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            // --help and --version are not errors.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let result: Result<Done, String> = match cli.command {
        Command::Measure(a) => measure_cmd::run(&a).map_err(|e| e.to_string()),
        Command::Attest(a) => attest::run(&cli.kube, &a).map_err(|e| e.to_string()),
        Command::Report(a) => report::run(&cli.kube, &a).map_err(|e| e.to_string()),
        Command::Status(a) => status::run(&cli.kube, &a).map_err(|e| e.to_string()),
        Command::Migrate(a) => migrate::run(&cli.kube, &a).map_err(|e| e.to_string()),
        Command::Start(a) => power::run_start(&cli.kube, &a).map_err(|e| e.to_string()),
        Command::Stop(a) => power::run_stop(&cli.kube, &a).map_err(|e| e.to_string()),
        Command::Restart(a) => power::run_restart(&cli.kube, &a).map_err(|e| e.to_string()),
        Command::Console(a) => crate::console::run(&cli.kube, &a),
        Command::Evidence {
            command: EvidenceCommand::Verify(a),
        } => evidence::run(&a)
            .map(|o| Done::verdict(o.text, o.affirmed))
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(done) => {
            print!("{}", done.stdout);
            ExitCode::from(done.code)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
