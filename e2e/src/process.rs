//! Child processes of the harness.
//!
//! Children are spawned from one long-lived thread with `PR_SET_PDEATHSIG`, so that if
//! the harness process dies without unwinding (SIGKILL, abort) the kernel still kills
//! them: no orphan etcd or API server survives a crashed test.

use crate::error::{io, HarnessError, Result};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type SpawnReq = (Command, mpsc::Sender<std::io::Result<Child>>);

pub struct Supervisor {
    tx: Option<mpsc::Sender<SpawnReq>>,
    thread: Option<std::thread::JoinHandle<()>>,
    children: Arc<Mutex<Vec<Managed>>>,
}

struct Managed {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Supervisor {
    pub fn new() -> Result<Self> {
        let (tx, rx) = mpsc::channel::<SpawnReq>();
        let thread = std::thread::Builder::new()
            .name("cvm-dev-spawner".into())
            .spawn(move || {
                // This thread lives until the supervisor is dropped; children die with it.
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .map_err(|e| HarnessError::Thread(e.to_string()))?;
        Ok(Supervisor {
            tx: Some(tx),
            thread: Some(thread),
            children: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// Starts `program args…` with stdout and stderr in `log`.
    pub fn spawn(&self, name: &str, program: &Path, args: &[String], log: &Path) -> Result<u32> {
        let out = File::create(log).map_err(io("creating log", log))?;
        self.spawn_logging_to(name, program, args, log, out)
    }

    /// Like [`Supervisor::spawn`], but appends to `log`: a restarted component keeps the
    /// lines of its previous run above the new ones.
    pub fn respawn(&self, name: &str, program: &Path, args: &[String], log: &Path) -> Result<u32> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io("opening log", log))?;
        self.spawn_logging_to(name, program, args, log, out)
    }

    fn spawn_logging_to(
        &self,
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
        out: File,
    ) -> Result<u32> {
        let err = out.try_clone().map_err(io("opening log", log))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        set_parent_death_signal(&mut cmd);
        let (rtx, rrx) = mpsc::channel();
        let spawn_err = |e: std::io::Error| HarnessError::Io {
            what: "starting",
            path: program.to_path_buf(),
            source: e,
        };
        self.tx
            .as_ref()
            .ok_or_else(|| HarnessError::Thread("supervisor already stopped".into()))?
            .send((cmd, rtx))
            .map_err(|_| HarnessError::Thread("spawner thread is gone".into()))?;
        let child = rrx
            .recv()
            .map_err(|_| HarnessError::Thread("spawner thread is gone".into()))?
            .map_err(spawn_err)?;
        let pid = child.id();
        self.lock().push(Managed {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        });
        Ok(pid)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Managed>> {
        // A panic while holding the lock leaves the list intact; keep using it.
        self.children.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An error if `name` has exited, carrying the tail of its log.
    pub fn check_alive(&self, name: &str) -> Result<()> {
        let mut children = self.lock();
        for m in children.iter_mut().filter(|m| m.name == name) {
            if let Ok(Some(status)) = m.child.try_wait() {
                return Err(exited(&m.name, status, &m.log));
            }
        }
        Ok(())
    }

    /// Stops every child, newest first: SIGTERM, then SIGKILL after `grace`.
    pub fn stop_all(&self, grace: Duration) {
        let mut children = std::mem::take(&mut *self.lock());
        while let Some(mut m) = children.pop() {
            terminate(&mut m.child, grace);
        }
    }

    /// Kills one child by name at once (SIGKILL), as a crash would.
    pub fn kill(&self, name: &str) {
        let mut children = self.lock();
        let mut kept = Vec::new();
        for mut m in children.drain(..) {
            if m.name == name {
                let _ = m.child.kill();
                let _ = m.child.wait();
            } else {
                kept.push(m);
            }
        }
        *children = kept;
    }

    /// Names of the children still running.
    pub fn running(&self) -> Vec<String> {
        let mut children = self.lock();
        let mut names = Vec::new();
        for m in children.iter_mut() {
            if matches!(m.child.try_wait(), Ok(None)) {
                names.push(m.name.clone());
            }
        }
        names
    }

    /// Stops one child by name.
    pub fn stop(&self, name: &str, grace: Duration) {
        let mut children = self.lock();
        let mut kept = Vec::new();
        for mut m in children.drain(..) {
            if m.name == name {
                terminate(&mut m.child, grace);
            } else {
                kept.push(m);
            }
        }
        *children = kept;
    }
}

fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: plain syscall on a pid we spawned and have not reaped yet.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop_all(Duration::from_secs(5));
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub(crate) fn exited(name: &str, status: ExitStatus, log: &Path) -> HarnessError {
    HarnessError::Exited {
        component: name.to_string(),
        status: status.to_string(),
        log: log.to_path_buf(),
        tail: log_tail(log, 15),
    }
}

/// The last `n` lines of a log file (empty when unreadable).
pub fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn set_parent_death_signal(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec here.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A free TCP port on loopback for a child to listen on. Never the same port twice in
/// one process (a port handed out may not be bound yet by its child), and, when the
/// kernel says where its ephemeral range starts, taken from below it: an outgoing
/// connection can then never grab the port between our check and the child's bind.
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut seen = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((low, high)) = non_ephemeral_range() {
        let span = u32::from(high - low);
        // Spread concurrent processes apart: each starts at its own offset.
        let offset = (std::process::id().wrapping_mul(7919)) % span;
        for i in 0..span {
            let port = low + ((offset + i * 13) % span) as u16;
            if !seen.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                seen.push(port);
                return Ok(port);
            }
        }
    }
    for _ in 0..100 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("binding", "127.0.0.1:0"))?;
        let port = l
            .local_addr()
            .map(|a| a.port())
            .map_err(io("reading address of", "127.0.0.1:0"))?;
        if !seen.contains(&port) {
            seen.push(port);
            return Ok(port);
        }
    }
    Err(HarnessError::Thread(
        "no fresh loopback port after 100 tries".into(),
    ))
}

/// Ports from 20000 up to the start of the kernel's ephemeral range, if that leaves room.
fn non_ephemeral_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let start: u16 = text.split_whitespace().next()?.parse().ok()?;
    (start > 21000).then_some((20000, start - 1))
}

/// True when something already listens on `127.0.0.1:port`.
pub fn port_in_use(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_err()
}

/// Waits for `deadline` polling `ready`; fails early when the process has exited.
pub fn wait_until(
    sup: &Supervisor,
    name: &str,
    log: &Path,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        sup.check_alive(name)?;
        if Instant::now() > deadline {
            return Err(HarnessError::NotReady {
                component: name.to_string(),
                secs: timeout.as_secs(),
                log: log.to_path_buf(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_fresh_and_outside_the_ephemeral_range() {
        let ports: Vec<u16> = (0..20).map(|_| free_port().unwrap()).collect();
        let mut uniq = ports.clone();
        uniq.sort_unstable();
        uniq.dedup();
        assert_eq!(
            uniq.len(),
            ports.len(),
            "a port was handed out twice: {ports:?}"
        );
        if let Some((low, high)) = non_ephemeral_range() {
            assert!(ports.iter().all(|p| (low..=high).contains(p)), "{ports:?}");
        }
    }
}
