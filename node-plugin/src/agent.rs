//! The node plugin's side of the guest agent's virtio-serial channel: QEMU serves the port
//! on a unix socket (in the launcher pod's directory), the agent in the guest opens it
//! once it has booted. Until then a request waits in the socket, so one bounded exchange
//! also waits for the boot.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use cvm_host::agent_client::{AgentClient, AgentClientError};
use tokio::net::UnixStream;

use crate::platform::PlatformError;

/// Connects to the agent's serial socket `sock` and runs `exchange` on it, all within
/// `timeout`. A silent agent is [`PlatformError::AgentSilent`]; an agent that answers
/// with an error (or breaks the protocol) is [`PlatformError::Evidence`].
pub async fn over_serial<T, F, Fut>(
    sock: &Path,
    who: &str,
    timeout: Duration,
    exchange: F,
) -> Result<T, PlatformError>
where
    F: FnOnce(AgentClient<UnixStream>) -> Fut,
    Fut: Future<Output = Result<T, AgentClientError>>,
{
    let silent = |detail: String| {
        PlatformError::AgentSilent(format!(
            "the guest agent of {who} did not answer on its serial channel {} ({detail}): has the guest booted, and does it run cvm-agent --serial?",
            sock.display()
        ))
    };
    let work = async {
        let (short, _dir) = crate::launcher::short_path(sock)
            .map_err(|e| silent(format!("cannot reach the socket: {e}")))?;
        // QEMU makes the socket when it starts, which may be just after the launch.
        let stream = loop {
            match UnixStream::connect(&short).await {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => return Err(silent(format!("cannot connect: {e}"))),
            }
        };
        // The exchange's own timeout is the outer one: the first answer waits for the boot.
        exchange(AgentClient::new(stream).with_timeout(timeout))
            .await
            .map_err(|e| match e {
                AgentClientError::Timeout(t) => silent(format!("no answer within {t:?}")),
                AgentClientError::NoAnswer => silent("the channel closed without an answer".into()),
                other => PlatformError::Evidence(format!("guest agent of {who}: {other}")),
            })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| silent(format!("no answer within {timeout:?}")))?
}
