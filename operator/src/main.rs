//! `cvm-operator`: the ConfidentialVM controller.

fn main() -> std::process::ExitCode {
    cvm_operator::cli::main_with_args(std::env::args_os())
}
