//! Starts QEMU, waits until its QMP socket answers, and turns an exit into an error that
//! carries QEMU's last stderr lines (what a CVM condition shows the user).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use super::qmp::{QmpClient, QmpError};
use super::QemuError;

/// stderr lines kept per process.
pub const STDERR_LINES: usize = 20;
/// Longest stderr line kept; longer ones are cut (QEMU's messages are one short line).
const STDERR_LINE_MAX: usize = 4096;

/// How to start QEMU.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// `qemu-system-x86_64`, or a full path.
    pub binary: PathBuf,
    /// Arguments, e.g. from [`super::command_line`]; must include `-qmp unix:<qmp_socket>,…`.
    pub args: Vec<String>,
    /// The QMP socket the arguments name.
    pub qmp_socket: PathBuf,
    /// Time allowed for QEMU to open the socket and answer.
    pub start_timeout: Duration,
}

type Tail = Arc<Mutex<VecDeque<String>>>;

/// A running QEMU process. Dropping it kills QEMU.
pub struct QemuProcess {
    child: Child,
    tail: Tail,
    stderr_task: Option<JoinHandle<()>>,
    qmp_socket: PathBuf,
}

fn tail_lines(tail: &Tail) -> Vec<String> {
    match tail.lock() {
        Ok(t) => t.iter().cloned().collect(),
        Err(poisoned) => poisoned.into_inner().iter().cloned().collect(),
    }
}

fn describe(status: &ExitStatus) -> String {
    match status.code() {
        Some(c) => format!("exit code {c}"),
        None => {
            #[cfg(unix)]
            {
                use std::os::unix::process::ExitStatusExt;
                if let Some(sig) = status.signal() {
                    return format!("killed by signal {sig}");
                }
            }
            "no exit code".into()
        }
    }
}

impl QemuProcess {
    /// Starts QEMU and returns once QMP is negotiated, or QEMU's exit as
    /// [`QemuError::ExitedEarly`] with its stderr, or [`QemuError::StartTimeout`].
    pub async fn start(opts: &StartOptions) -> Result<(QemuProcess, QmpClient), QemuError> {
        // A socket left by a previous run would be connectable by nobody and confuse the
        // wait below.
        match std::fs::remove_file(&opts.qmp_socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(QemuError::Io(e)),
        }
        let mut child = Command::new(&opts.binary)
            .args(&opts.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| QemuError::Spawn {
                binary: opts.binary.display().to_string(),
                source,
            })?;
        let tail: Tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_task = child.stderr.take().map(|stderr| {
            let tail = tail.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(mut line)) = lines.next_line().await {
                    if line.len() > STDERR_LINE_MAX {
                        let mut cut = STDERR_LINE_MAX;
                        while !line.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        line.truncate(cut);
                    }
                    tracing::debug!(target: "qemu", "{line}");
                    if let Ok(mut t) = tail.lock() {
                        if t.len() >= STDERR_LINES {
                            t.pop_front();
                        }
                        t.push_back(line);
                    }
                }
            })
        });
        let mut proc = QemuProcess {
            child,
            tail,
            stderr_task,
            qmp_socket: opts.qmp_socket.clone(),
        };

        let deadline = Instant::now() + opts.start_timeout;
        let mut last_err: Option<QmpError> = None;
        loop {
            if let Some(status) = proc.child.try_wait()? {
                proc.drain_stderr().await;
                return Err(QemuError::ExitedEarly {
                    status: describe(&status),
                    stderr: proc.stderr_tail(),
                });
            }
            if opts.qmp_socket.exists() {
                let left = deadline.saturating_duration_since(Instant::now());
                match QmpClient::connect_with_timeout(
                    &opts.qmp_socket,
                    left.max(Duration::from_millis(100)),
                )
                .await
                {
                    Ok(qmp) => return Ok((proc, qmp)),
                    Err(e) => last_err = Some(e),
                }
            }
            if Instant::now() >= deadline {
                let _ = proc.child.start_kill();
                let mut stderr = proc.stderr_tail();
                if let Some(e) = last_err {
                    stderr.push(format!("(last QMP error: {e})"));
                }
                return Err(QemuError::StartTimeout {
                    socket: opts.qmp_socket.display().to_string(),
                    seconds: opts.start_timeout.as_secs(),
                    stderr,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// QEMU's last stderr lines so far.
    pub fn stderr_tail(&self) -> Vec<String> {
        tail_lines(&self.tail)
    }

    pub fn qmp_socket(&self) -> &Path {
        &self.qmp_socket
    }

    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// `Ok(())` while QEMU runs; [`QemuError::Exited`] with its stderr once it has exited
    /// (for the node plugin's periodic check).
    pub async fn check_running(&mut self) -> Result<(), QemuError> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => {
                self.drain_stderr().await;
                Err(QemuError::Exited {
                    status: describe(&status),
                    stderr: self.stderr_tail(),
                })
            }
        }
    }

    /// Waits up to `timeout` for QEMU to exit (after `quit`); `None` if it is still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, QemuError> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => {
                self.drain_stderr().await;
                Ok(Some(status?))
            }
            Err(_) => Ok(None),
        }
    }

    /// Kills QEMU and reaps it.
    pub async fn kill(&mut self) -> Result<(), QemuError> {
        self.child.kill().await?;
        self.drain_stderr().await;
        Ok(())
    }

    /// After an exit, lets the reader take the last lines from the pipe (bounded: the pipe
    /// closes when QEMU is gone).
    async fn drain_stderr(&mut self) {
        if let Some(task) = self.stderr_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
    }
}
