//! The ends of a command line that the binaries share: clap's refusals and answers, and a
//! daemon's run on a runtime with its failure printed.

use std::process::ExitCode;

/// Parses `args`; on `--help`/`--version` (printed, exit 0) or a usage error (printed,
/// exit 2) returns the exit code instead.
pub fn parse<C, I, T>(args: I) -> Result<C, ExitCode>
where
    C: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    C::try_parse_from(args).map_err(|e| clap_exit(&e))
}

/// Prints what clap said and gives the exit code: 2 for a usage error, 0 for an answer
/// (`--help`, `--version`).
pub fn clap_exit(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    ExitCode::from(if e.use_stderr() { 2 } else { 0 })
}

/// Runs a daemon's future on a new runtime; a failure is printed as `NAME: error` (with
/// its causes) and exits 1.
pub fn run_daemon<F, E>(name: &str, fut: F) -> ExitCode
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Debug + std::fmt::Display,
{
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` shows an anyhow error's causes; plain errors print as themselves.
            eprintln!("{name}: {}", format!("{e:#}").trim_end());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[arg(long)]
        n: u32,
    }

    #[test]
    fn usage_errors_exit_2_and_answers_0() {
        assert_eq!(
            parse::<Cli, _, _>(["x", "--n", "3"]).map(|c| c.n).ok(),
            Some(3)
        );
        assert_eq!(
            parse::<Cli, _, _>(["x", "--n", "three"]).err(),
            Some(ExitCode::from(2))
        );
        assert_eq!(
            parse::<Cli, _, _>(["x", "--help"]).err(),
            Some(ExitCode::from(0))
        );
        assert_eq!(
            run_daemon("t", async { Ok::<(), String>(()) }),
            ExitCode::SUCCESS
        );
        assert_eq!(
            run_daemon("t", async { Err::<(), String>("no".into()) }),
            ExitCode::FAILURE
        );
    }
}
