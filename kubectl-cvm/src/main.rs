//! `kubectl-cvm`: see [`kubectl_cvm::cli`].

fn main() -> std::process::ExitCode {
    kubectl_cvm::cli::main_with_args(std::env::args_os())
}
