//! Waiting on conditions, never on sleeps: poll an object until a predicate holds, and
//! on timeout say what was awaited and what was last seen.

use kube::api::Api;
use kube::Resource;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::time::{Duration, Instant};

/// Polls `name` every 100 ms until `pred` holds; returns the object that satisfied it.
pub async fn until<K, F>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    what: &str,
    mut pred: F,
) -> Result<K, String>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    F: FnMut(&K) -> bool,
{
    let deadline = Instant::now() + timeout;
    let mut last: Option<K> = None;
    loop {
        match api.get_opt(name).await {
            Ok(Some(obj)) => {
                if pred(&obj) {
                    return Ok(obj);
                }
                last = Some(obj);
            }
            Ok(None) => last = None,
            Err(e) => tracing::debug!(error = %e, "poll failed"),
        }
        if Instant::now() > deadline {
            return Err(format!(
                "timed out after {:?} waiting for {name}: {what}; last seen: {}",
                timeout,
                last.map(|o| format!("{o:?}"))
                    .unwrap_or_else(|| "absent".into())
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls until `name` no longer exists.
pub async fn gone<K>(api: &Api<K>, name: &str, timeout: Duration) -> Result<(), String>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(None) = api.get_opt(name).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "timed out after {timeout:?} waiting for {name} to be deleted"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
