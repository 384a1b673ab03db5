//! `cvm-launcher --socket-dir DIR --cvm NAMESPACE/NAME`: the process of a CVM's launcher
//! pod (see `cvm_node_plugin::launcher`). Runs until SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut socket_dir: Option<PathBuf> = None;
    let mut cvm: Option<String> = None;
    for arg in std::env::args().skip(1) {
        if let Some(v) = arg.strip_prefix("--socket-dir=") {
            socket_dir = Some(PathBuf::from(v));
        } else if let Some(v) = arg.strip_prefix("--cvm=") {
            cvm = Some(v.to_string());
        } else {
            eprintln!("cvm-launcher: unknown argument {arg:?}; usage: cvm-launcher --socket-dir=DIR --cvm=NAMESPACE/NAME");
            return ExitCode::from(2);
        }
    }
    let (Some(dir), Some(cvm)) = (socket_dir, cvm) else {
        eprintln!("cvm-launcher: --socket-dir=DIR and --cvm=NAMESPACE/NAME are required");
        return ExitCode::from(2);
    };
    tracing_subscriber::fmt().json().init();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cvm-launcher: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let stop = async {
            use tokio::signal::unix::{signal, SignalKind};
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(mut t), Ok(mut i)) => {
                    tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
                }
                _ => std::future::pending::<()>().await,
            }
        };
        cvm_node_plugin::launcher::serve(&dir, &cvm, stop).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cvm-launcher: {e}");
            ExitCode::FAILURE
        }
    }
}
