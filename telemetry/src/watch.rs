//! How a component's watches retry while the API server is unreachable, and what it logs
//! meanwhile: shared by the operator and the node plugin.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use tracing::{info, warn};

/// The first retry of a failed watch.
const WATCH_RETRY_FIRST: Duration = Duration::from_millis(200);
/// The longest wait between retries of the operator's watches (one leader).
pub const OPERATOR_RETRY_MAX: Duration = Duration::from_secs(1);
/// The longest wait between retries of a node plugin's watches: one per node, so a fleet
/// retries less often and, with the jitter, not in step.
pub const PLUGIN_RETRY_MAX: Duration = Duration::from_secs(2);

/// How a watch retries, and what is logged while it cannot.
///
/// A kube-runtime `Controller` merges its watches (for the CVM controller: CVMs, Nodes and
/// policies) into one stream behind a single backoff: an error of any watch advances it,
/// and while it sleeps none of them is read. Its default is client-go's (0.8 s doubling to
/// 30 s, plus up to 100 % jitter, reset only by an event). When the API server restarts,
/// every watch first fails to connect, then gets a 410 Expired on resuming from its old
/// resourceVersion (the new watch cache starts at etcd's current revision): each one more
/// step of the shared backoff, which slept through a minute after `/readyz` was back. This
/// policy starts at 200 ms and doubles to a low cap ([`OPERATOR_RETRY_MAX`],
/// [`PLUGIN_RETRY_MAX`]), so a restart costs seconds; a watch that keeps failing costs the
/// API server one request per cap.
///
/// Clones share their state: one goes into the stream's backoff, which counts failures
/// and resets on the next event (logging that the watches are back), another logs each
/// failure with the delay the backoff chose for it.
#[derive(Clone)]
pub struct WatchRetry {
    /// What is watched, for the logs.
    watch: &'static str,
    /// The longest wait between retries.
    max: Duration,
    state: Arc<std::sync::Mutex<RetryState>>,
}

#[derive(Debug, Default)]
struct RetryState {
    /// Failures since the last event.
    failures: u32,
    /// When the first of them happened.
    since: Option<std::time::Instant>,
    /// The delay chosen for the last one.
    delay: Duration,
}

impl WatchRetry {
    /// Retries of `watch` (a name for the logs), waiting at most `max` between them.
    pub fn new(watch: &'static str, max: Duration) -> Self {
        WatchRetry {
            watch,
            max,
            state: Default::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RetryState> {
        // The state is plain numbers: one left by a panicking holder is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The wait after the `failures`th failure in a row (1 = the first): 200 ms doubling
    /// to `max`, stretched by up to a quarter by `jitter` (in `0..1`).
    pub fn delay(failures: u32, jitter: f64, max: Duration) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        let base = WATCH_RETRY_FIRST.saturating_mul(1 << doublings).min(max);
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        base.mul_f64(1.0 + jitter / 4.0)
    }

    /// Logs a failure of the watch, with the delay its backoff has just chosen.
    pub fn log_failure(&self, error: &watcher::Error) {
        let s = self.state();
        let down_for = s.since.map(|t| t.elapsed()).unwrap_or_default();
        if matches!(error, watcher::Error::WatchError(status) if status.code == 410) {
            info!(
                watch = self.watch,
                retry_in = ?s.delay,
                "watch expired (its resourceVersion is gone, as after an API server \
                 restart); listing again"
            );
        } else if s.failures <= 5 || s.failures.is_multiple_of(30) {
            // Every failure until the delay reaches its cap, then about one in 30 s.
            warn!(
                watch = self.watch,
                error = %error,
                failures = s.failures,
                down_for = ?down_for,
                retry_in = ?s.delay,
                "watch failed; waiting for the API server"
            );
        } else {
            tracing::debug!(
                watch = self.watch,
                error = %error,
                failures = s.failures,
                retry_in = ?s.delay,
                "watch failed again"
            );
        }
    }

    /// Logs one item of a controller's output: a failed watch as [`WatchRetry::log_failure`];
    /// the rest at debug (a failed reconcile is logged by its error policy).
    pub fn log_controller_error<E: std::error::Error + 'static>(
        &self,
        error: &kube::runtime::controller::Error<E, watcher::Error>,
    ) {
        match error {
            kube::runtime::controller::Error::QueueError(e) => self.log_failure(e),
            e => tracing::debug!(watch = self.watch, error = %e, "controller event"),
        }
    }

    /// Drives a watch (a reflector feeding a store) to the end, retrying as above.
    pub async fn drive<T>(self, stream: impl futures::Stream<Item = Result<T, watcher::Error>>) {
        stream
            .backoff(self.clone())
            .for_each(|item| {
                if let Err(e) = item {
                    self.log_failure(&e);
                }
                futures::future::ready(())
            })
            .await
    }
}

impl Iterator for WatchRetry {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        use std::hash::BuildHasher;
        // A fresh RandomState hashes alike inputs differently: jitter without a rand crate.
        let jitter =
            (std::collections::hash_map::RandomState::new().hash_one(0u8) % 1024) as f64 / 1024.0;
        let mut s = self.state();
        s.failures = s.failures.saturating_add(1);
        s.since.get_or_insert_with(std::time::Instant::now);
        s.delay = Self::delay(s.failures, jitter, self.max);
        Some(s.delay)
    }
}

impl kube::runtime::utils::Backoff for WatchRetry {
    fn reset(&mut self) {
        let mut s = self.state();
        if s.failures > 0 {
            info!(
                watch = self.watch,
                failures = s.failures,
                down_for = ?s.since.map(|t| t.elapsed()).unwrap_or_default(),
                "watches are back"
            );
        }
        *s = RetryState::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::utils::Backoff;

    #[test]
    fn retries_start_short_and_double_to_a_low_cap() {
        let ms = |n, j| WatchRetry::delay(n, j, OPERATOR_RETRY_MAX).as_millis();
        assert_eq!(
            (1..=6).map(|n| ms(n, 0.0)).collect::<Vec<_>>(),
            [200, 400, 800, 1000, 1000, 1000]
        );
        assert_eq!(ms(u32::MAX, 0.0), 1000);
        assert_eq!(ms(0, 0.0), 200, "no failure yet counts as the first");
        assert_eq!(ms(1, 0.999), 249, "jitter stretches by under a quarter");
        assert_eq!(ms(9, 7.0), 1250, "jitter out of range is clamped");
        assert_eq!(ms(1, f64::NAN), 200);
        assert_eq!(
            WatchRetry::delay(9, 0.0, PLUGIN_RETRY_MAX),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn an_event_resets_the_retries_and_clones_share_them() {
        let mut backoff = WatchRetry::new("test", OPERATOR_RETRY_MAX);
        let logger = backoff.clone();
        let first = backoff.next().unwrap();
        let second = backoff.next().unwrap();
        assert!(first < Duration::from_millis(250), "{first:?}");
        assert!(second >= Duration::from_millis(400), "{second:?}");
        assert_eq!(logger.state().failures, 2);
        assert_eq!(logger.state().delay, second);
        backoff.reset();
        assert_eq!(logger.state().failures, 0);
        assert!(logger.state().since.is_none());
        assert!(backoff.next().unwrap() < Duration::from_millis(250));
    }
}
