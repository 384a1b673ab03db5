//! A control plane owned by a test leaves nothing behind when dropped, even when the
//! test panics while holding it: no process, no temp dir.

use cvm_e2e::{ControlPlane, Options, SimNode, Tee};
use std::path::{Path, PathBuf};

/// Processes whose command line mentions `dir` (our children all take paths under it).
fn processes_using(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(&needle) {
            found.push(cmd);
        }
    }
    found
}

#[test]
fn dropped_control_plane_leaves_no_process_or_dir() {
    let cp = ControlPlane::start(Options {
        nodes: vec![SimNode::new("drop-test", Some(Tee::Tdx))],
        ..Default::default()
    })
    .expect("control plane starts");
    eprintln!("control plane ready in {:.2} s", cp.startup.as_secs_f64());
    let dir = cp.dir().to_path_buf();
    assert!(
        !processes_using(&dir).is_empty(),
        "etcd and the API server run under {dir:?}"
    );

    // Panic while owning it: unwinding must stop everything.
    let handle = std::thread::spawn(move || {
        let _owned = cp;
        panic!("simulated test failure");
    });
    assert!(handle.join().is_err(), "the thread panicked as intended");

    let left: Vec<String> = processes_using(&dir);
    assert!(left.is_empty(), "orphans after drop: {left:?}");
    assert!(
        !PathBuf::from(&dir).exists(),
        "temp dir {dir:?} was not removed"
    );
}
