//! `cvm-node-plugin`: one per TEE host. See the crate docs of `cvm_node_plugin`.

fn main() -> std::process::ExitCode {
    cvm_node_plugin::cli::main_with_args(std::env::args_os())
}
