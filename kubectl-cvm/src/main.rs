//! `kubectl cvm`: the CVM owner's own client. It verifies evidence offline with the
//! same library the operator uses, so a user need not believe the operator.
//!
//! Exit status: 0 evidence affirmed, 1 contraindicated (every finding printed),
//! 2 bad usage or unreadable input.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod evidence;

#[derive(Debug, Parser)]
#[command(
    name = "kubectl-cvm",
    version,
    about = "Confidential VM client and offline verifier"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with attestation evidence.
    Evidence {
        #[command(subcommand)]
        command: EvidenceCommand,
    },
}

#[derive(Debug, Subcommand)]
enum EvidenceCommand {
    /// Verify SEV-SNP or TDX evidence offline and print an EAR result.
    Verify(evidence::VerifyArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Evidence {
            command: EvidenceCommand::Verify(args),
        } => match evidence::run(&args) {
            Ok(out) => {
                print!("{}", out.text);
                if out.affirmed {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
    }
}
