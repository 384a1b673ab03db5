//! `cvm-launcher`, the process of a CVM's launcher pod (DESIGN §5). It serves a command
//! socket in its pod's emptyDir, which the node plugin reaches through kubelet's
//! pod-volume directory on the host, and runs the guest's process as its own child: QEMU
//! on a TEE host, a stand-in process on a simulated one. The guest's life is the pod's: the
//! launcher stops its child when kubelet stops the pod, and a plugin restart touches
//! neither.
//!
//! Protocol: one JSON [`Request`] line, one JSON [`Answer`] line, per connection.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The socket's file name in the launcher's socket directory.
pub const SOCKET: &str = "launcher.sock";
/// The guest's serial console socket (QEMU's), which `cvm-launcher console` attaches to.
pub const CONSOLE_SOCKET: &str = "console.sock";
/// The guest agent's virtio-serial socket (QEMU's), for hosts without vsock.
pub const AGENT_SOCKET: &str = "agent.sock";
/// Port of the launcher's readiness endpoint: 200 while the guest process runs.
pub const HEALTH_PORT: u16 = cvm_crds::wellknown::LAUNCHER_HEALTH_PORT;
/// Lines of the guest process's stderr the launcher keeps for the plugin's messages.
const TAIL_LINES: usize = 20;
/// Lines of the guest's console the launcher keeps: a kernel panic with its stack trace.
const CONSOLE_LINES: usize = 60;
/// Longest request or answer line.
const MAX_LINE: u64 = 1 << 20;

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
    #[error("launcher at {path} refused: {message}")]
    Refused { path: PathBuf, message: String },
}

/// What the plugin asks of a launcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Request {
    /// Whether it runs for the CVM: answered by [`Answer::Pong`].
    Ping,
    /// Starts the guest process, once per `launch_id` (a repeat returns the process
    /// started for it; another launch while one runs is refused).
    #[serde(rename_all = "camelCase")]
    Launch {
        launch_id: String,
        program: Program,
        /// The locked memory the guest pins (SEV guests pin all of theirs): the launcher
        /// refuses to start when its limit is lower, naming both.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memlock_bytes: Option<u64>,
    },
    /// The guest process's state.
    Status,
    /// Stops the guest process: SIGTERM, SIGKILL after `grace_ms`.
    #[serde(rename_all = "camelCase")]
    Stop { grace_ms: u64 },
}

/// The guest's program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Program {
    /// The launcher's own binary as a stand-in guest (simulated hosts): runs until stopped.
    StandIn,
    /// A command line (QEMU), run as is.
    Exec { argv: Vec<String> },
}

/// What a launcher answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "camelCase")]
pub enum Answer {
    Pong { cvm: String },
    Guest(GuestProcess),
    Error { message: String },
}

/// The guest process as its launcher sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestProcess {
    pub state: ProcState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_id: Option<String>,
    /// Its pid in the pod's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// How it ended ("exit code 1", "killed by signal 9").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<String>,
    /// The last lines of its stderr.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stderr_tail: Vec<String>,
    /// The last lines of its stdout: the guest's serial console.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub console_tail: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProcState {
    /// Nothing launched in this pod yet.
    #[default]
    None,
    Running,
    Exited,
}

/// The launcher's one guest slot.
#[derive(Default)]
struct Slot {
    proc: GuestProcess,
    tail: Arc<Mutex<VecDeque<String>>>,
    console: Arc<Mutex<VecDeque<String>>>,
    /// Signalled when the process has exited.
    exited: Option<tokio::sync::watch::Receiver<bool>>,
}

type Shared = Arc<tokio::sync::Mutex<Slot>>;

fn exit_text(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => "ended".into(),
    }
}

fn snapshot(slot: &Slot) -> GuestProcess {
    let mut p = slot.proc.clone();
    if let Ok(t) = slot.tail.lock() {
        p.stderr_tail = t.iter().cloned().collect();
    }
    if let Ok(t) = slot.console.lock() {
        p.console_tail = t.iter().cloned().collect();
    }
    p
}

/// Copies `from`'s lines to `echo` (the pod's log) and keeps the last `keep`.
fn tail_lines(
    from: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    tail: Arc<Mutex<VecDeque<String>>>,
    keep: usize,
    echo: fn(&str),
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Split on bytes: a console may print anything, not only UTF-8.
        let mut r = BufReader::new(from);
        let mut buf = Vec::new();
        while let Ok(n) = r.read_until(b'\n', &mut buf).await {
            if n == 0 {
                break;
            }
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            buf.clear();
            echo(&line);
            if let Ok(mut t) = tail.lock() {
                if t.len() == keep {
                    t.pop_front();
                }
                t.push_back(line);
            }
        }
    })
}

/// The soft RLIMIT_MEMLOCK of this process, in bytes (`u64::MAX`: unlimited).
pub fn memlock_limit() -> std::io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(if r.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        r.rlim_cur
    })
}

/// Raises another process's RLIMIT_MEMLOCK (soft and hard) to `bytes`, as KubeVirt's
/// node agent does for a launcher's QEMU: the pod itself may not (that takes
/// CAP_SYS_RESOURCE, which Pod Security "baseline" forbids).
pub fn raise_memlock(pid: i32, bytes: u64) -> std::io::Result<()> {
    let new = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    // SAFETY: prlimit reads `new` and writes nothing (old is null).
    if unsafe { libc::prlimit(pid, libc::RLIMIT_MEMLOCK, &new, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

async fn launch(
    shared: &Shared,
    launch_id: String,
    program: Program,
    memlock_bytes: Option<u64>,
) -> Answer {
    let mut slot = shared.lock().await;
    match slot.proc.state {
        ProcState::Running | ProcState::Exited
            if slot.proc.launch_id.as_deref() == Some(&launch_id) =>
        {
            return Answer::Guest(snapshot(&slot));
        }
        ProcState::Running => {
            return Answer::Error {
                message: format!(
                    "another guest process runs (launch {}, pid {}): stop it first",
                    slot.proc.launch_id.as_deref().unwrap_or("?"),
                    slot.proc.pid.unwrap_or(0)
                ),
            }
        }
        ProcState::None | ProcState::Exited => {}
    }
    if let Some(want) = memlock_bytes {
        match memlock_limit() {
            Ok(have) if have >= want => {}
            Ok(have) => {
                return Answer::Error {
                    message: format!(
                        "the guest pins {want} bytes of memory, RLIMIT_MEMLOCK here is {have}: the node plugin raises it (it needs CAP_SYS_RESOURCE and the host's PID namespace)"
                    ),
                }
            }
            Err(e) => {
                return Answer::Error {
                    message: format!("cannot read RLIMIT_MEMLOCK: {e}"),
                }
            }
        }
    }
    let argv = match program {
        Program::StandIn => match std::env::current_exe() {
            Ok(exe) => vec![exe.display().to_string(), "--stand-in".into()],
            Err(e) => {
                return Answer::Error {
                    message: format!("cannot find the launcher's own binary: {e}"),
                }
            }
        },
        Program::Exec { argv } => argv,
    };
    let Some((bin, args)) = argv.split_first() else {
        return Answer::Error {
            message: "empty command line".into(),
        };
    };
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        // The guest's output is the pod's log; its last lines also go into conditions.
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(false);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Answer::Error {
                message: format!("cannot start {bin}: {e}"),
            }
        }
    };
    let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let console: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let mut readers = Vec::new();
    if let Some(err) = child.stderr.take() {
        readers.push(tail_lines(err, tail.clone(), TAIL_LINES, |l| {
            eprintln!("{l}")
        }));
    }
    if let Some(out) = child.stdout.take() {
        readers.push(tail_lines(out, console.clone(), CONSOLE_LINES, |l| {
            println!("{l}")
        }));
    }
    let (tx, rx) = tokio::sync::watch::channel(false);
    slot.proc = GuestProcess {
        state: ProcState::Running,
        launch_id: Some(launch_id),
        pid: child.id(),
        exit: None,
        stderr_tail: Vec::new(),
        console_tail: Vec::new(),
    };
    slot.tail = tail;
    slot.console = console;
    slot.exited = Some(rx);
    let answer = Answer::Guest(snapshot(&slot));
    drop(slot);
    let shared = shared.clone();
    tokio::spawn(async move {
        let exit = match child.wait().await {
            Ok(s) => exit_text(s),
            Err(e) => format!("lost ({e})"),
        };
        // Its last words before its exit is told (a descendant may hold them: bounded).
        for r in readers {
            let _ = tokio::time::timeout(Duration::from_secs(1), r).await;
        }
        let mut slot = shared.lock().await;
        slot.proc.state = ProcState::Exited;
        slot.proc.exit = Some(exit);
        let _ = tx.send(true);
    });
    answer
}

async fn stop(shared: &Shared, grace: Duration) -> Answer {
    let (pid, exited) = {
        let slot = shared.lock().await;
        if slot.proc.state != ProcState::Running {
            return Answer::Guest(snapshot(&slot));
        }
        (slot.proc.pid, slot.exited.clone())
    };
    let signal = |sig| {
        if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill has no memory effects; the pid is our own child's.
            unsafe { libc::kill(pid, sig) };
        }
    };
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>, t: Duration| async move {
        tokio::time::timeout(t, rx.wait_for(|e| *e)).await.is_ok()
    };
    signal(libc::SIGTERM);
    if let Some(rx) = exited {
        if !wait(rx.clone(), grace).await {
            signal(libc::SIGKILL);
            let _ = wait(rx, Duration::from_secs(5)).await;
        }
    }
    Answer::Guest(snapshot(&*shared.lock().await))
}

async fn handle(req: &str, cvm: &str, shared: &Shared) -> Answer {
    match serde_json::from_str::<Request>(req) {
        Ok(Request::Ping) => Answer::Pong {
            cvm: cvm.to_string(),
        },
        Ok(Request::Status) => Answer::Guest(snapshot(&*shared.lock().await)),
        Ok(Request::Launch {
            launch_id,
            program,
            memlock_bytes,
        }) => launch(shared, launch_id, program, memlock_bytes).await,
        Ok(Request::Stop { grace_ms }) => stop(shared, Duration::from_millis(grace_ms)).await,
        Err(e) => Answer::Error {
            message: format!("unreadable request: {e}"),
        },
    }
}

/// Serves the socket in `dir` until `shutdown`, then stops the guest process (grace
/// `stop_grace`) and removes the socket.
pub async fn serve(
    dir: &Path,
    cvm: &str,
    stop_grace: Duration,
    health: Option<tokio::net::TcpListener>,
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
    let shared: Shared = Arc::default();
    if let Some(h) = health {
        tokio::spawn(serve_health(h, shared.clone()));
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                let cvm = cvm.to_string();
                let shared = shared.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut line = String::new();
                    let mut r = BufReader::new(r).take(MAX_LINE);
                    if r.read_line(&mut line).await.is_ok() {
                        let answer = handle(&line, &cvm, &shared).await;
                        let text = serde_json::to_string(&answer).unwrap_or_default();
                        let _ = w.write_all(format!("{text}\n").as_bytes()).await;
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    let _ = std::fs::remove_file(&path);
    if let Answer::Guest(p) = stop(&shared, stop_grace).await {
        if let Some(exit) = p.exit {
            tracing::info!(cvm = %cvm, exit = %exit, "guest process stopped with its pod");
        }
    }
    Ok(())
}

/// The readiness endpoint: any request gets 200 while the guest process runs, else 503,
/// so the pod is Ready (and a Service sends traffic to it) only while its guest runs.
async fn serve_health(listener: tokio::net::TcpListener, shared: Shared) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            // Out of descriptors, say: wait instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            // Read (a bounded part of) the request so the peer's write does not fail.
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await;
            let running = shared.lock().await.proc.state == ProcState::Running;
            let status = if running {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            let body = if running {
                "guest running\n"
            } else {
                "no guest running\n"
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
        });
    }
}

/// `cvm-launcher console`: the guest's serial console on this terminal (in the pod, as
/// `kubectl cvm console` runs it), until either side closes.
pub async fn console(dir: &Path) -> Result<(), LauncherError> {
    let path = dir.join(CONSOLE_SOCKET);
    let io = |source| LauncherError::Io {
        path: path.clone(),
        source,
    };
    let stream = connect(&path).await.map_err(io)?;
    let (mut r, mut w) = stream.into_split();
    let out = async move {
        let mut stdout = tokio::io::stdout();
        tokio::io::copy(&mut r, &mut stdout).await
    };
    tokio::pin!(out);
    let mut stdin = tokio::io::stdin();
    tokio::select! {
        res = &mut out => res.map(|_| ()).map_err(io),
        res = tokio::io::copy(&mut stdin, &mut w) => {
            res.map_err(io)?;
            // Input ended (a pipe): QEMU drops what its serial port has not taken yet
            // when the client leaves, so the guest gets a moment to read it and answer.
            let _ = tokio::time::timeout(CONSOLE_LINGER, &mut out).await;
            Ok(())
        }
    }
}

/// How long `console` keeps the connection after its input ended.
const CONSOLE_LINGER: Duration = Duration::from_secs(3);

/// The plugin's side of one launcher: its socket directory on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LauncherClient {
    pub dir: PathBuf,
}

const CALL_TIMEOUT: Duration = Duration::from_secs(5);

impl LauncherClient {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LauncherClient { dir: dir.into() }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join(SOCKET)
    }

    fn io(&self, source: std::io::Error) -> LauncherError {
        LauncherError::Io {
            path: self.socket(),
            source,
        }
    }

    /// One request, one answer; `memlock` first raises the launcher's RLIMIT_MEMLOCK to
    /// that many bytes (the child it starts inherits it). `timeout` bounds the whole call.
    async fn call(
        &self,
        req: &Request,
        memlock: Option<u64>,
        timeout: Duration,
    ) -> Result<Answer, LauncherError> {
        let fut = async {
            let stream = connect(&self.socket()).await.map_err(|e| self.io(e))?;
            if let Some(bytes) = memlock {
                // The peer's pid as this process's PID namespace sees it (0: not visible).
                match stream.peer_cred().ok().and_then(|c| c.pid()) {
                    Some(pid) if pid > 0 => {
                        if let Err(e) = raise_memlock(pid, bytes) {
                            tracing::warn!(socket = %self.socket().display(), pid, error = %e, "cannot raise the launcher's RLIMIT_MEMLOCK");
                        }
                    }
                    _ => {
                        tracing::warn!(socket = %self.socket().display(), "the launcher's pid is not visible here (run the plugin in the host's PID namespace): its RLIMIT_MEMLOCK stays as it is")
                    }
                }
            }
            let (r, mut w) = stream.into_split();
            let text = serde_json::to_string(req)
                .map_err(|e| self.io(std::io::Error::other(e.to_string())))?;
            w.write_all(format!("{text}\n").as_bytes())
                .await
                .map_err(|e| self.io(e))?;
            let mut line = String::new();
            BufReader::new(r)
                .take(MAX_LINE)
                .read_line(&mut line)
                .await
                .map_err(|e| self.io(e))?;
            serde_json::from_str::<Answer>(line.trim()).map_err(|_| LauncherError::Answer {
                path: self.socket(),
                cvm: String::new(),
                answer: line.trim().to_string(),
            })
        };
        tokio::time::timeout(timeout, fut)
            .await
            .unwrap_or_else(|_| {
                Err(self.io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {} s", timeout.as_secs()),
                )))
            })
    }

    fn guest(&self, a: Answer) -> Result<GuestProcess, LauncherError> {
        match a {
            Answer::Guest(p) => Ok(p),
            Answer::Error { message } => Err(LauncherError::Refused {
                path: self.socket(),
                message,
            }),
            other => Err(LauncherError::Answer {
                path: self.socket(),
                cvm: String::new(),
                answer: format!("{other:?}"),
            }),
        }
    }

    /// Whether the launcher runs for `cvm` (`NAMESPACE/NAME`).
    pub async fn ping(&self, cvm: &str) -> Result<(), LauncherError> {
        match self
            .call(&Request::Ping, None, Duration::from_secs(2))
            .await?
        {
            Answer::Pong { cvm: c } if c == cvm => Ok(()),
            other => Err(LauncherError::Answer {
                path: self.socket(),
                cvm: cvm.to_string(),
                answer: match other {
                    Answer::Pong { cvm } => format!("pong {cvm}"),
                    a => format!("{a:?}"),
                },
            }),
        }
    }

    pub async fn launch(
        &self,
        launch_id: &str,
        program: Program,
        memlock_bytes: Option<u64>,
    ) -> Result<GuestProcess, LauncherError> {
        let req = Request::Launch {
            launch_id: launch_id.to_string(),
            program,
            memlock_bytes,
        };
        let a = self.call(&req, memlock_bytes, CALL_TIMEOUT).await?;
        self.guest(a)
    }

    pub async fn status(&self) -> Result<GuestProcess, LauncherError> {
        let a = self.call(&Request::Status, None, CALL_TIMEOUT).await?;
        self.guest(a)
    }

    pub async fn stop(&self, grace: Duration) -> Result<GuestProcess, LauncherError> {
        let req = Request::Stop {
            grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
        };
        let a = self
            .call(&req, None, grace + Duration::from_secs(10))
            .await?;
        self.guest(a)
    }
}

/// Asks the launcher whose socket is `path` whether it runs for `cvm`.
pub async fn ping(path: &Path, cvm: &str) -> Result<(), LauncherError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    LauncherClient::new(dir).ping(cvm).await
}

/// A path a unix socket address can hold (108 bytes): kubelet's pod-volume paths are
/// longer, so a long one is reached through its directory's descriptor
/// (`/proc/self/fd/N/NAME`, resolved by the kernel like the path). Keep the returned
/// directory open while the path is used.
pub fn short_path(path: &Path) -> std::io::Result<(PathBuf, Option<std::fs::File>)> {
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

/// A launcher pod's socket directory (its emptyDir) as the node plugin sees it on the
/// host: in kubelet's pod-volume directory, under the pod's UID and the emptyDir's name.
pub fn host_dir(kubelet_pods: &Path, pod_uid: &str, volume: &str) -> PathBuf {
    kubelet_pods
        .join(pod_uid)
        .join("volumes/kubernetes.io~empty-dir")
        .join(volume)
}

/// The socket of a launcher pod as the node plugin sees it on the host.
pub fn host_socket(kubelet_pods: &Path, pod_uid: &str, volume: &str) -> PathBuf {
    host_dir(kubelet_pods, pod_uid, volume).join(SOCKET)
}

/// Why the guest process `launch_id` no longer runs, as its launcher reports it; `None`:
/// it runs.
pub fn ended(p: &GuestProcess, launch_id: &str) -> Option<String> {
    let ours = p.launch_id.as_deref() == Some(launch_id);
    match p.state {
        ProcState::Running if ours => None,
        ProcState::Exited if ours => {
            let how = p.exit.as_deref().unwrap_or("ended");
            let mut m = format!("the guest process in its launcher pod exited ({how})");
            let last = |v: &[String], n: usize| v[v.len().saturating_sub(n)..].join(" | ");
            if !p.stderr_tail.is_empty() {
                m.push_str(&format!(": {}", last(&p.stderr_tail, 3)));
            }
            m.push_str(&console_suffix(&p.console_tail));
            Some(m)
        }
        _ => Some(
            "its launcher pod does not run this guest (the pod was replaced): relaunch it there"
                .into(),
        ),
    }
}

/// The console's last lines for a condition message ("" without any).
pub fn console_suffix(console: &[String]) -> String {
    let lines: Vec<&str> = console
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return String::new();
    }
    let last = &lines[lines.len().saturating_sub(4)..];
    // A panic's first line says why; its stack trace follows it.
    let panic = lines
        .iter()
        .find(|l| l.contains("Kernel panic") && !last.contains(l));
    let mut shown: Vec<&str> = panic.into_iter().copied().collect();
    if panic.is_some() {
        shown.push("…");
    }
    shown.extend(last);
    format!("; the console's last lines: {}", shown.join(" | "))
}

/// `cvm-launcher --stand-in`: the stand-in guest of a simulated host. Runs until SIGTERM.
pub async fn stand_in(cvm: &str) {
    use tokio::signal::unix::{signal, SignalKind};
    eprintln!("stand-in guest of {cvm} running (simulated host: no VM, evidence is signed by the node's simulated chip key)");
    if let Ok(mut t) = signal(SignalKind::terminate()) {
        t.recv().await;
    } else {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn serving(
        dir: &Path,
        cvm: &str,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), LauncherError>>,
    ) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let d = dir.to_path_buf();
        let c = cvm.to_string();
        let server = tokio::spawn(async move {
            serve(&d, &c, Duration::from_secs(2), None, async {
                let _ = rx.await;
            })
            .await
        });
        let sock = dir.join(SOCKET);
        for _ in 0..200 {
            if sock.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (tx, server)
    }

    #[tokio::test]
    async fn the_launcher_answers_for_its_cvm_only() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, server) = serving(dir.path(), "ns/web").await;
        let sock = dir.path().join(SOCKET);
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
        let (tx, server) = serving(&deep, "ns/deep").await;
        let long = deep.join(SOCKET);
        assert!(long.as_os_str().len() > 108);
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

    fn sh(script: &str) -> Program {
        Program::Exec {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        }
    }

    async fn until_exited(c: &LauncherClient) -> GuestProcess {
        for _ in 0..500 {
            let p = c.status().await.unwrap();
            if p.state == ProcState::Exited {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the guest process did not exit");
    }

    #[tokio::test]
    async fn the_launcher_runs_one_guest_process_once_per_launch_and_stops_it() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, server) = serving(dir.path(), "ns/web").await;
        let c = LauncherClient::new(dir.path());
        assert_eq!(c.status().await.unwrap().state, ProcState::None);

        let p = c.launch("l1", sh("exec sleep 30"), None).await.unwrap();
        assert_eq!(
            (p.state, p.launch_id.as_deref()),
            (ProcState::Running, Some("l1"))
        );
        let pid = p.pid.unwrap();
        // The same launch again: the same process, not a second one.
        assert_eq!(
            c.launch("l1", sh("exec sleep 30"), None).await.unwrap().pid,
            Some(pid)
        );
        let other = c.launch("l2", sh("true"), None).await.unwrap_err();
        assert!(
            other
                .to_string()
                .contains("another guest process runs (launch l1"),
            "{other}"
        );

        let stopped = c.stop(Duration::from_secs(2)).await.unwrap();
        assert_eq!(stopped.state, ProcState::Exited);
        assert_eq!(stopped.exit.as_deref(), Some("killed by signal 15"));

        // A process that dies on its own: how, and its last words.
        c.launch("l3", sh("echo 'qemu: no KVM here' >&2; exit 3"), None)
            .await
            .unwrap();
        let dead = until_exited(&c).await;
        assert_eq!(dead.exit.as_deref(), Some("exit code 3"));
        for _ in 0..100 {
            if !c.status().await.unwrap().stderr_tail.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            c.status().await.unwrap().stderr_tail,
            vec!["qemu: no KVM here"]
        );

        let bad = c
            .launch(
                "l4",
                Program::Exec {
                    argv: vec!["/nonexistent/qemu".into()],
                },
                None,
            )
            .await
            .unwrap_err();
        assert!(
            bad.to_string().contains("cannot start /nonexistent/qemu"),
            "{bad}"
        );
        match c.launch("l5", sh("true"), Some(u64::MAX - 1)).await {
            Err(e) => assert!(e.to_string().contains("RLIMIT_MEMLOCK here is"), "{e}"),
            Ok(_) => {
                assert!(memlock_limit().unwrap() >= u64::MAX - 1);
                until_exited(&c).await;
            }
        }

        // The pod stops: so does its guest process.
        let pid = c
            .launch("l6", sh("exec sleep 30"), None)
            .await
            .unwrap()
            .pid
            .unwrap();
        let _ = tx.send(());
        server.await.unwrap().unwrap();
        let alive = Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ");
        assert!(!alive, "the guest process outlived its launcher");
    }

    #[test]
    fn requests_and_answers_have_one_wire_form() {
        let r = Request::Launch {
            launch_id: "ab".into(),
            program: Program::StandIn,
            memlock_bytes: Some(1),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"op":"launch","launchId":"ab","program":{"kind":"standIn"},"memlockBytes":1}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        assert_eq!(
            serde_json::to_string(&Request::Stop { grace_ms: 5 }).unwrap(),
            r#"{"op":"stop","graceMs":5}"#
        );
    }
}
