//! How GitOps tools judge a ConfidentialVM, computed by their own code rather than a
//! re-implementation: Flux's rule through kstatus (`status.Compute` of
//! sigs.k8s.io/cli-utils, built by `e2e/tools/kstatus.sh`), and Argo CD's through the
//! chart's health script (`charts/cvm-operator/files/argocd-health.lua`) run by the real
//! Lua 5.1 interpreter, in an environment as bare as the one Argo CD gives it.
//!
//! ```no_run
//! let cvm = r#"{"apiVersion":"cvmp.io/v1alpha1","kind":"ConfidentialVM","metadata":{"name":"a","generation":1}}"#;
//! println!("{:?} {:?}", cvm_e2e::gitops::kstatus(cvm)?, cvm_e2e::gitops::argocd_health(cvm)?);
//! # Ok::<(), cvm_e2e::gitops::GitopsError>(())
//! ```

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

/// The interpreter Argo CD's gopher-lua stands in for: Debian's `lua5.1` package.
pub const LUA: &str = "lua5.1";

/// One tool's verdict on an object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Health {
    /// kstatus: InProgress, Current, Failed, Terminating, Unknown or NotFound.
    /// Argo CD: Healthy, Progressing, Degraded, Suspended, Missing or Unknown.
    pub status: String,
    pub message: String,
}

/// Errors of the GitOps health checks: each says what to install or fix.
#[derive(Debug, thiserror::Error)]
pub enum GitopsError {
    #[error("the Go toolchain is missing: install Go 1.24 or newer and put `go` on PATH (e2e/tools/kstatus.sh builds the kstatus tool once)")]
    GoMissing,
    #[error(
        "{LUA} is missing: run bash e2e/tools/install-host-deps.sh (or apt-get install lua5.1)"
    )]
    LuaMissing,
    #[error("building the kstatus tool with e2e/tools/kstatus.sh failed ({status}):\n{detail}")]
    BuildFailed { status: String, detail: String },
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("{program} printed {output:?}, not {expected}")]
    Output {
        program: String,
        output: String,
        expected: &'static str,
    },
    #[error("the object is not JSON (pass what `kubectl get KIND NAME -o json` prints): {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("the object is JSON {0}, not an object (pass one object as `kubectl get KIND NAME -o json` prints it, not a list)")]
    NotAnObject(&'static str),
}

impl GitopsError {
    /// Whether a host tool (Go, lua5.1) is absent: tests skip then, except under CI.
    pub fn is_missing_tool(&self) -> bool {
        matches!(self, GitopsError::GoMissing | GitopsError::LuaMissing)
    }
}

pub type Result<T, E = GitopsError> = std::result::Result<T, E>;

/// The Argo CD health script the chart ships (and docs/gitops.md embeds).
pub fn health_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/cvm-operator/files/argocd-health.lua")
}

/// The `kstatus` binary, built once into the tools cache by `e2e/tools/kstatus.sh`.
pub fn kstatus_binary() -> Result<PathBuf> {
    // The script answers from its cache in milliseconds, but a test calls this per row.
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(path) = built.as_ref() {
        return Ok(path.clone());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/kstatus.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| GitopsError::Spawn {
            program: script.display().to_string(),
            source,
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {
            // Pass on the one-time "building kstatus" note.
            eprint!("{stderr}");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let path = stdout
                .lines()
                .last()
                .map(|l| PathBuf::from(l.trim()))
                .ok_or_else(|| GitopsError::BuildFailed {
                    status: "exit 0".into(),
                    detail: "kstatus.sh printed no binary path".into(),
                })?;
            *built = Some(path.clone());
            Ok(path)
        }
        Some(3) => Err(GitopsError::GoMissing),
        _ => Err(GitopsError::BuildFailed {
            status: out.status.to_string(),
            detail: stderr.trim_end().to_string(),
        }),
    }
}

/// kstatus's verdict (Flux's `wait: true` and healthChecks) on one object, given as
/// `kubectl get -o json` prints it.
pub fn kstatus(obj_json: &str) -> Result<Health> {
    object(obj_json)?;
    let bin = kstatus_binary()?;
    let program = bin.display().to_string();
    let out = run(Command::new(&bin), obj_json.as_bytes(), &program)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|_| GitopsError::Output {
        program,
        output: stdout.to_string(),
        expected: "one JSON line {\"status\":...,\"message\":...} (rebuild it: bash e2e/tools/kstatus.sh)",
    })
}

/// Argo CD's verdict on one object (given as `kubectl get -o json` prints it) from the
/// chart's health script, run by `lua5.1`.
pub fn argocd_health(obj_json: &str) -> Result<Health> {
    argocd_health_with(&health_script(), obj_json)
}

/// Whether `lua5.1` runs here; `Err(LuaMissing)` when it is not installed.
pub fn lua_available() -> Result<()> {
    let mut lua = Command::new(LUA);
    lua.args(["-e", "io.write(_VERSION)"]);
    run(lua, b"", LUA).map(|_| ()).map_err(lua_missing)
}

fn lua_missing(e: GitopsError) -> GitopsError {
    match e {
        GitopsError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            GitopsError::LuaMissing
        }
        e => e,
    }
}

/// [`argocd_health`] with another health script, e.g. to try a change before it ships.
pub fn argocd_health_with(script: &Path, obj_json: &str) -> Result<Health> {
    let obj = object(obj_json)?;
    let mut driver = String::from("obj = ");
    driver.push_str(&lua_literal(&obj));
    driver.push_str("\nlocal path = ");
    driver.push_str(&lua_literal(&Value::String(script.display().to_string())));
    driver.push('\n');
    driver.push_str(DRIVER);
    let mut lua = Command::new(LUA);
    lua.arg("-");
    let out = run(lua, driver.as_bytes(), LUA).map_err(lua_missing)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some((status, message)) = stdout.split_once('\n') else {
        return Err(GitopsError::Output {
            program: LUA.into(),
            output: stdout.to_string(),
            expected: "a status line and a message",
        });
    };
    // As Argo CD does: a status outside its set reads Unknown (we also name it).
    if !ARGO_STATUSES.contains(&status) {
        return Ok(Health {
            status: "Unknown".into(),
            message: format!("Lua returned an invalid health status ({status:?})"),
        });
    }
    Ok(Health {
        status: status.to_string(),
        message: message.to_string(),
    })
}

/// The health codes Argo CD accepts from a script.
const ARGO_STATUSES: [&str; 6] = [
    "Healthy",
    "Progressing",
    "Degraded",
    "Suspended",
    "Missing",
    "Unknown",
];

/// Runs the script at `path` on the global `obj` the way Argo CD does for a health
/// customization in argocd-cm: only the base and table libraries (no string, math, io
/// or os; not even string methods), the script's return value taken as `hs`. Prints
/// the status, a newline, then the message, which may hold newlines itself.
const DRIVER: &str = r#"
local env = { obj = obj, table = table }
for _, k in ipairs({ "assert", "error", "getmetatable", "ipairs", "load", "loadstring",
  "next", "pairs", "pcall", "print", "rawequal", "rawget", "rawset", "select",
  "setmetatable", "tonumber", "tostring", "type", "unpack", "xpcall", "_VERSION" }) do
  env[k] = _G[k]
end
env._G = env
local chunk, err = loadfile(path)
if chunk == nil then
  io.stderr:write("loading the health script: ", tostring(err), "\n")
  os.exit(2)
end
setfenv(chunk, env)
local strings = getmetatable("")
local string_index = strings.__index
strings.__index = nil
local ok, hs = pcall(chunk)
strings.__index = string_index
if not ok then
  io.stderr:write("the health script raised an error: ", tostring(hs), "\n")
  os.exit(3)
end
if type(hs) ~= "table" then
  io.stderr:write("the health script returned a ", type(hs), "; Argo CD wants a table (return hs)\n")
  os.exit(4)
end
if type(hs.status) ~= "string" or (hs.message ~= nil and type(hs.message) ~= "string") then
  io.stderr:write("hs.status must be a string and hs.message a string or nil; got ",
    type(hs.status), " and ", type(hs.message), "\n")
  os.exit(4)
end
io.write(hs.status, "\n", hs.message or "")
"#;

/// `obj_json` parsed, when it is one JSON object.
fn object(obj_json: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(obj_json).map_err(GitopsError::NotJson)?;
    match v {
        Value::Object(_) => Ok(v),
        Value::Null => Err(GitopsError::NotAnObject("null")),
        Value::Bool(_) => Err(GitopsError::NotAnObject("boolean")),
        Value::Number(_) => Err(GitopsError::NotAnObject("number")),
        Value::String(_) => Err(GitopsError::NotAnObject("string")),
        Value::Array(_) => Err(GitopsError::NotAnObject("array")),
    }
}

/// Runs `cmd` with `input` on stdin; a non-zero exit is an error carrying its stderr.
fn run(mut cmd: Command, input: &[u8], program: &str) -> Result<Output> {
    let spawn = |source| GitopsError::Spawn {
        program: program.to_string(),
        source,
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    // Both tools read all of stdin before they write, so writing first cannot deadlock.
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if !out.status.success() {
        return Err(GitopsError::Failed {
            program: program.to_string(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim_end().to_string(),
        });
    }
    Ok(out)
}

/// `v` as a Lua 5.1 expression that builds the same value Argo CD hands its scripts:
/// objects as tables with string keys, arrays as 1-based sequences, null as nil (so
/// an object's null fields are left out and an array keeps its positions).
pub fn lua_literal(v: &Value) -> String {
    let mut out = String::new();
    write_lua(v, &mut out);
    out
}

fn write_lua(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("nil"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        // serde_json writes numbers in a syntax Lua's lexer reads (12, -3, 0.5, 1e300).
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_lua_string(s, out),
        Value::Array(items) => {
            out.push('{');
            for item in items {
                write_lua(item, out);
                out.push_str(", ");
            }
            out.push('}');
        }
        Value::Object(fields) => {
            out.push('{');
            for (key, value) in fields.iter().filter(|(_, v)| !v.is_null()) {
                out.push('[');
                write_lua_string(key, out);
                out.push_str("] = ");
                write_lua(value, out);
                out.push_str(", ");
            }
            out.push('}');
        }
    }
}

/// A double-quoted Lua string with the same bytes as `s`: printable ASCII as it is, and
/// every other byte (controls, UTF-8 sequences) as a three-digit decimal escape, so no
/// input can end the literal early or depend on how the lexer treats raw bytes.
fn write_lua_string(s: &str, out: &mut String) {
    out.push('"');
    for b in s.bytes() {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(char::from(b)),
            // Three digits always: "\0" followed by a digit would read as one escape.
            _ => out.push_str(&format!("\\{b:03}")),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_keep_positions_and_drop_null_fields() {
        let v: Value = serde_json::json!({"a": [1, null, "x"], "b": null, "c": {"d": true}});
        assert_eq!(
            lua_literal(&v),
            r#"{["a"] = {1, nil, "x", }, ["c"] = {["d"] = true, }, }"#
        );
    }

    #[test]
    fn strings_escape_quotes_backslashes_and_every_non_printable_byte() {
        assert_eq!(
            lua_literal(&Value::String("a\"b\\c\n]]\u{0}1é".into())),
            r#""a\"b\\c\010]]\0001\195\169""#
        );
    }

    #[test]
    fn only_objects_are_accepted() {
        assert!(matches!(
            object("[]"),
            Err(GitopsError::NotAnObject("array"))
        ));
        assert!(matches!(object("{"), Err(GitopsError::NotJson(_))));
        assert!(object("{}").is_ok());
    }
}
