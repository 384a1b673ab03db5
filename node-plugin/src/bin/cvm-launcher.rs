//! `cvm-launcher --socket-dir DIR --cvm NAMESPACE/NAME`: the process of a CVM's launcher
//! pod (see `cvm_node_plugin::launcher`). Runs until SIGTERM, then stops its guest.
//! `cvm-launcher --stand-in`: the stand-in guest it runs on simulated hosts.
//! `cvm-launcher console [--socket-dir=DIR]`: the guest's serial console on this terminal
//! (what `kubectl cvm console` runs in the pod).
//! `cvm-launcher install --to=DIR` and `cvm-launcher copy-artifacts --into=DIR
//! WHAT=/PATH...`: the launcher pod's init containers that copy boot artifacts out of
//! container images (see `cvm_node_plugin::boot_image`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: cvm-launcher --socket-dir=DIR --cvm=NAMESPACE/NAME [--stop-grace-seconds=N] [--health-port=N] | cvm-launcher console [--socket-dir=DIR] | cvm-launcher install --to=DIR | cvm-launcher copy-artifacts --into=DIR WHAT=/PATH...";

/// `install` and `copy-artifacts`: run in init containers, in images that may hold
/// nothing but files, so they touch no runtime and print one line.
fn boot_image(args: &[String]) -> ExitCode {
    use cvm_node_plugin::boot_image as b;
    let result = match args.first().map(String::as_str) {
        Some("install") => match args.get(1).and_then(|a| a.strip_prefix("--to=")) {
            Some(to) if args.len() == 2 => b::install(std::path::Path::new(to))
                .map(|p| println!("cvm-launcher: installed {}", p.display())),
            _ => {
                eprintln!("cvm-launcher: install takes --to=DIR; {USAGE}");
                return ExitCode::from(2);
            }
        },
        _ => {
            let Some(into) = args.get(1).and_then(|a| a.strip_prefix("--into=")) else {
                eprintln!("cvm-launcher: copy-artifacts takes --into=DIR first; {USAGE}");
                return ExitCode::from(2);
            };
            let files: Result<Vec<_>, _> = args[2..].iter().map(|a| b::parse_file_arg(a)).collect();
            match files {
                Ok(files) if !files.is_empty() => {
                    b::copy_artifacts(std::path::Path::new(into), &files).map(|()| {
                        let names: Vec<&str> = files.iter().map(|(w, _)| w.as_str()).collect();
                        println!("cvm-launcher: copied {} into {into}", names.join(", "));
                    })
                }
                Ok(_) => {
                    eprintln!(
                        "cvm-launcher: copy-artifacts needs at least one WHAT=/PATH; {USAGE}"
                    );
                    return ExitCode::from(2);
                }
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The last line of the log is the pod's termination message: the CVM's reason.
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if matches!(
        argv.first().map(String::as_str),
        Some("install" | "copy-artifacts")
    ) {
        return boot_image(&argv);
    }
    let mut socket_dir: Option<PathBuf> = None;
    let mut cvm: Option<String> = None;
    let mut stand_in = false;
    let mut console = false;
    let mut health_port: Option<u16> = None;
    // kubelet's default grace is 30 s: QEMU gets most of it to shut the guest down.
    let mut grace = Duration::from_secs(20);
    for arg in std::env::args().skip(1) {
        if let Some(v) = arg.strip_prefix("--socket-dir=") {
            socket_dir = Some(PathBuf::from(v));
        } else if let Some(v) = arg.strip_prefix("--cvm=") {
            cvm = Some(v.to_string());
        } else if let Some(v) = arg.strip_prefix("--stop-grace-seconds=") {
            match v.parse() {
                Ok(s) => grace = Duration::from_secs(s),
                Err(_) => {
                    eprintln!(
                        "cvm-launcher: --stop-grace-seconds={v:?} is not a number of seconds"
                    );
                    return ExitCode::from(2);
                }
            }
        } else if let Some(v) = arg.strip_prefix("--health-port=") {
            match v.parse() {
                Ok(p) => health_port = Some(p),
                Err(_) => {
                    eprintln!("cvm-launcher: --health-port={v:?} is not a port number");
                    return ExitCode::from(2);
                }
            }
        } else if arg == "--stand-in" {
            stand_in = true;
        } else if arg == "console" {
            console = true;
        } else {
            eprintln!("cvm-launcher: unknown argument {arg:?}; {USAGE}");
            return ExitCode::from(2);
        }
    }
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
    if stand_in {
        rt.block_on(cvm_node_plugin::launcher::stand_in(
            cvm.as_deref().unwrap_or("its CVM"),
        ));
        return ExitCode::SUCCESS;
    }
    if console {
        let dir = socket_dir.unwrap_or_else(|| PathBuf::from(cvm_crds::wellknown::LAUNCHER_DIR));
        return match rt.block_on(cvm_node_plugin::launcher::console(&dir)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cvm-launcher: the guest's console: {e} (is the guest running?)");
                ExitCode::FAILURE
            }
        };
    }
    let (Some(dir), Some(cvm)) = (socket_dir, cvm) else {
        eprintln!("cvm-launcher: --socket-dir=DIR and --cvm=NAMESPACE/NAME are required; {USAGE}");
        return ExitCode::from(2);
    };
    tracing_subscriber::fmt().json().init();
    // QEMU makes its console and agent sockets in the pod's directory as this user; the
    // node plugin reaches them from the host as root without CAP_DAC_OVERRIDE, so they
    // must be writable by others (only the pod and the host's root see the directory).
    // SAFETY: umask(2) only sets this process's file mode mask.
    unsafe {
        libc::umask(0);
    }
    let result = rt.block_on(async {
        let health = match health_port {
            Some(p) => match tokio::net::TcpListener::bind(("0.0.0.0", p)).await {
                Ok(l) => Some(l),
                Err(e) => {
                    return Err(cvm_node_plugin::launcher::LauncherError::Bind {
                        path: PathBuf::from(format!("tcp port {p}")),
                        source: e,
                    })
                }
            },
            None => None,
        };
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
        cvm_node_plugin::launcher::serve(&dir, &cvm, grace, health, stop).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cvm-launcher: {e}");
            ExitCode::FAILURE
        }
    }
}
