//! `cvm-launcher`, the process of a CVM's launcher pod (DESIGN §5). It serves a command
//! socket in its pod's emptyDir, which the node plugin reaches through kubelet's
//! pod-volume directory on the host; the guest's life is the pod's. Today it is the
//! stand-in guest of a simulated host (the plugin signs its evidence with the node's
//! simulated chip key); driving QEMU through the same socket comes next.
//!
//! Protocol: one request line, one answer line. `ping` → `pong NAMESPACE/NAME`.

use std::path::{Path, PathBuf};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The socket's file name in the launcher's socket directory.
pub const SOCKET: &str = "launcher.sock";

#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    #[error("cannot serve {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("launcher at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("launcher at {path} answered {answer:?}, not a pong for {cvm}")]
    Answer {
        path: PathBuf,
        cvm: String,
        answer: String,
    },
}

/// The answer to one request line.
pub fn answer(request: &str, cvm: &str) -> String {
    match request.trim() {
        "ping" => format!("pong {cvm}"),
        other => format!("error unknown request {other:?}"),
    }
}

/// Serves the socket in `dir` until `shutdown`, then removes it.
pub async fn serve(
    dir: &Path,
    cvm: &str,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), LauncherError> {
    let path = dir.join(SOCKET);
    let bind = |source| LauncherError::Bind {
        path: path.clone(),
        source,
    };
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind(e)),
    }
    let listener = {
        let (short, _dir) = short_path(&path).map_err(bind)?;
        tokio::net::UnixListener::bind(&short).map_err(bind)?
    };
    // The node plugin connects from the host as root without CAP_DAC_OVERRIDE: the socket
    // must be writable by others (only the pod and the host's root reach this directory).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).map_err(bind)?;
    }
    tracing::info!(cvm = %cvm, socket = %path.display(), "launcher serving");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                let cvm = cvm.to_string();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut line = String::new();
                    let mut r = BufReader::new(r).take(4096);
                    if r.read_line(&mut line).await.is_ok() {
                        let _ = w.write_all(format!("{}\n", answer(&line, &cvm)).as_bytes()).await;
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Asks the launcher whose socket is `path` whether it runs for `cvm`.
pub async fn ping(path: &Path, cvm: &str) -> Result<(), LauncherError> {
    let io = |source| LauncherError::Io {
        path: path.to_path_buf(),
        source,
    };
    let fut = async {
        let stream = connect(path).await.map_err(io)?;
        let (r, mut w) = stream.into_split();
        w.write_all(b"ping\n").await.map_err(io)?;
        let mut line = String::new();
        BufReader::new(r)
            .take(4096)
            .read_line(&mut line)
            .await
            .map_err(io)?;
        if line.trim() == format!("pong {cvm}") {
            Ok(())
        } else {
            Err(LauncherError::Answer {
                path: path.to_path_buf(),
                cvm: cvm.to_string(),
                answer: line.trim().to_string(),
            })
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(2), fut)
        .await
        .unwrap_or_else(|_| {
            Err(io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer within 2 s",
            )))
        })
}

/// A path a unix socket address can hold (108 bytes): kubelet's pod-volume paths are
/// longer, so a long one is reached through its directory's descriptor
/// (`/proc/self/fd/N/NAME`, resolved by the kernel like the path). Keep the returned
/// directory open while the path is used.
fn short_path(path: &Path) -> std::io::Result<(PathBuf, Option<std::fs::File>)> {
    const MAX: usize = 100;
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) if path.as_os_str().len() > MAX => {
            let dir = std::fs::File::open(dir)?;
            use std::os::fd::AsRawFd;
            let short = Path::new("/proc/self/fd")
                .join(dir.as_raw_fd().to_string())
                .join(name);
            Ok((short, Some(dir)))
        }
        _ => Ok((path.to_path_buf(), None)),
    }
}

async fn connect(path: &Path) -> std::io::Result<tokio::net::UnixStream> {
    let (short, _dir) = short_path(path)?;
    tokio::net::UnixStream::connect(&short).await
}

/// The socket of a launcher pod as the node plugin sees it on the host: in kubelet's
/// pod-volume directory, under the pod's UID and the emptyDir's name.
pub fn host_socket(kubelet_pods: &Path, pod_uid: &str, volume: &str) -> PathBuf {
    kubelet_pods
        .join(pod_uid)
        .join("volumes/kubernetes.io~empty-dir")
        .join(volume)
        .join(SOCKET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_launcher_answers_for_its_cvm_only() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let d = dir.path().to_path_buf();
        let server = tokio::spawn(async move {
            serve(&d, "ns/web", async {
                let _ = rx.await;
            })
            .await
        });
        let sock = dir.path().join(SOCKET);
        for _ in 0..100 {
            if sock.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        ping(&sock, "ns/web").await.unwrap();
        let wrong = ping(&sock, "ns/other").await.unwrap_err();
        assert!(wrong.to_string().contains("pong ns/web"), "{wrong}");
        let _ = tx.send(());
        server.await.unwrap().unwrap();
        assert!(!sock.exists(), "the socket goes with the launcher");
        assert!(ping(&sock, "ns/web").await.is_err());
        // kubelet's pod-volume paths are longer than a socket address holds.
        let deep = dir.path().join("a".repeat(60)).join("b".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let d = deep.clone();
        let server = tokio::spawn(async move {
            serve(&d, "ns/deep", async {
                let _ = rx.await;
            })
            .await
        });
        let long = deep.join(SOCKET);
        assert!(long.as_os_str().len() > 108);
        for _ in 0..100 {
            if long.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        ping(&long, "ns/deep").await.unwrap();
        let _ = tx.send(());
        let _ = server.await.unwrap();
        assert_eq!(
            host_socket(Path::new("/var/lib/kubelet/pods"), "u1", "launcher"),
            Path::new(
                "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/launcher/launcher.sock"
            )
        );
    }
}
