//! Leader election on a `coordination.k8s.io` Lease, so that of several replicas only
//! one schedules: two schedulers could otherwise hand out a node's last ASID twice.
//!
//! The decision is a pure function over the Lease; the loop around it does the I/O and
//! uses the Lease's resourceVersion for optimistic concurrency (a lost race is a 409).

use crate::error::{Error, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use std::time::Duration;

/// What to do with the Lease as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseAction {
    /// No Lease yet: create it holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Another holder let it expire: take it over.
    TakeOver,
    /// Another holder is live: try again later.
    Wait,
}

/// Decides from the Lease spec, our identity and the time.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> LeaseAction {
    let Some(spec) = spec else {
        return LeaseAction::Create;
    };
    if spec.holder_identity.as_deref() == Some(me) {
        return LeaseAction::Renew;
    }
    if spec.holder_identity.as_deref().unwrap_or("").is_empty() {
        return LeaseAction::TakeOver;
    }
    let dur = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    match &spec.renew_time {
        Some(MicroTime(t)) if *t + SignedDuration::from_secs(dur) > now => LeaseAction::Wait,
        _ => LeaseAction::TakeOver,
    }
}

/// The Lease spec that gives it up, when `me` holds it: no holder, so the next attempt of
/// a standby takes it over instead of waiting out the duration (client-go's
/// ReleaseOnCancel). `None`: not ours to release.
pub fn released(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Option<LeaseSpec> {
    let spec = spec?;
    if spec.holder_identity.as_deref() != Some(me) {
        return None;
    }
    Some(LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        renew_time: Some(MicroTime(now)),
        ..spec.clone()
    })
}

/// How often the leader renews and a candidate retries, at most (client-go's retry period).
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);

pub struct Elector {
    api: Api<Lease>,
    name: String,
    me: String,
    duration: Duration,
    /// Time between attempts: [`RETRY_PERIOD`], or a third of `duration` if that is less.
    retry: Duration,
    /// Set while this replica reaches the Lease (leading or standing by): a standby that
    /// can take over is a ready replica; one that cannot reach the API server is not.
    ready: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Elector {
    pub fn new(api: Api<Lease>, name: &str, me: &str, duration: Duration) -> Self {
        Elector {
            api,
            name: name.to_string(),
            me: me.to_string(),
            duration,
            retry: RETRY_PERIOD.min(duration / 3),
            ready: None,
        }
    }

    /// Reports through `ready` whether the Lease is reachable (see [`Elector`]).
    pub fn with_ready(mut self, ready: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.ready = Some(ready);
        self
    }

    fn set_ready(&self, reachable: bool) {
        if let Some(r) = &self.ready {
            r.store(reachable, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// How long the leader may go without a renewal before it must stop: two thirds of
    /// the Lease duration, so it stops well before others may take the Lease over.
    fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// One attempt, abandoned after `limit`: a request hanging on a dead connection must
    /// not keep a leader acting past its deadline.
    async fn attempt(&self, limit: Duration) -> Result<bool> {
        tokio::time::timeout(limit, self.try_acquire_or_renew())
            .await
            .unwrap_or_else(|_| {
                Err(Error::Leader(format!(
                    "no answer about Lease {} within {limit:?}",
                    self.name
                )))
            })
    }

    fn spec(&self, now: Timestamp, acquire: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.me.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: acquire.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One attempt: true when we hold the Lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let now = Timestamp::now();
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| Error::Leader(format!("reading Lease {}: {e}", self.name)))?;
        let action = decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.me,
            now,
        );
        let result = match (action, current) {
            (LeaseAction::Wait, _) => return Ok(false),
            (LeaseAction::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(now, None, 0)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (LeaseAction::Renew | LeaseAction::TakeOver, None) => return Ok(false),
            (action, Some(mut lease)) => {
                let old = lease.spec.clone().unwrap_or_default();
                let (acquire, transitions) = if action == LeaseAction::Renew {
                    (old.acquire_time, old.lease_transitions.unwrap_or(0))
                } else {
                    (None, old.lease_transitions.unwrap_or(0) + 1)
                };
                lease.spec = Some(self.spec(now, acquire, transitions));
                // `replace` carries the resourceVersion we read: a concurrent writer wins
                // and we get a 409 instead of two leaders.
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(Error::Leader(format!("writing Lease {}: {e}", self.name))),
        }
    }

    /// Gives the Lease up if we still hold it (on shutdown, after the controllers have
    /// stopped). True when released; a lost race or an error leaves the Lease to expire.
    pub async fn release(&self) -> bool {
        let attempt = async {
            let Some(mut lease) = self.api.get_opt(&self.name).await.ok().flatten() else {
                return false;
            };
            let Some(spec) = released(lease.spec.as_ref(), &self.me, Timestamp::now()) else {
                return false;
            };
            lease.spec = Some(spec);
            // The resourceVersion read above: a concurrent writer wins with a 409.
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
                .is_ok()
        };
        tokio::time::timeout(self.renew_deadline(), attempt)
            .await
            .unwrap_or(false)
    }

    /// Blocks until we lead; returns when the winning attempt started (the renewal time
    /// the Lease now shows), for [`Elector::keep`].
    pub async fn acquire(&self) -> Result<std::time::Instant> {
        loop {
            let started = std::time::Instant::now();
            let result = self.attempt(self.renew_deadline()).await;
            self.set_ready(result.is_ok());
            match result {
                Ok(true) => return Ok(started),
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    lease = %self.name,
                    error = %e,
                    retry_in = ?self.retry,
                    "leader election attempt failed"
                ),
            }
            tokio::time::sleep(self.retry).await;
        }
    }

    /// Renews every retry period until no renewal has succeeded for the renew deadline (or
    /// another replica holds the Lease); then returns the reason. The caller must stop
    /// acting as leader at once. `renewed`: when the attempt that won or last renewed the
    /// Lease started (the Lease shows that time, so the deadline counts from it).
    pub async fn keep(&self, mut renewed: std::time::Instant) -> Error {
        let mut failures = 0u32;
        loop {
            let left = self.renew_deadline().saturating_sub(renewed.elapsed());
            tokio::time::sleep(self.retry.min(left)).await;
            let started = std::time::Instant::now();
            let Some(left) = self
                .renew_deadline()
                .checked_sub(renewed.elapsed())
                .filter(|l| !l.is_zero())
            else {
                return Error::Leader(format!(
                    "Lease {} not renewed for {:?}",
                    self.name,
                    renewed.elapsed()
                ));
            };
            match self.attempt(left).await {
                Ok(true) => {
                    if failures > 0 {
                        tracing::info!(
                            lease = %self.name,
                            failures,
                            "renewed the leader Lease again"
                        );
                    }
                    renewed = started;
                    failures = 0;
                }
                Ok(false) => {
                    return Error::Leader(format!("lost Lease {} to another replica", self.name))
                }
                Err(e) => {
                    failures += 1;
                    // Stop before the Lease can expire for others: never two leaders.
                    let left = self.renew_deadline().saturating_sub(renewed.elapsed());
                    if left.is_zero() {
                        return e;
                    }
                    tracing::warn!(
                        lease = %self.name,
                        error = %e,
                        retry_in = ?self.retry.min(left),
                        steps_down_in = ?left,
                        "renewing the leader Lease failed"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed: i64, dur: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            lease_duration_seconds: Some(dur),
            ..Default::default()
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(None, "a", at(100)), LeaseAction::Create);
        assert_eq!(
            decide(Some(&spec("a", 0, 15)), "a", at(100)),
            LeaseAction::Renew
        );
        assert_eq!(
            decide(Some(&spec("b", 90, 15)), "a", at(100)),
            LeaseAction::Wait
        );
        assert_eq!(
            decide(Some(&spec("b", 80, 15)), "a", at(100)),
            LeaseAction::TakeOver
        );
        assert_eq!(
            decide(Some(&spec("", 99, 15)), "a", at(100)),
            LeaseAction::TakeOver
        );
        let no_renew = LeaseSpec {
            holder_identity: Some("b".into()),
            ..Default::default()
        };
        assert_eq!(decide(Some(&no_renew), "a", at(100)), LeaseAction::TakeOver);
    }

    #[test]
    fn only_the_holder_releases_and_a_released_lease_is_taken_over_at_once() {
        let held = spec("a", 100, 15);
        assert_eq!(released(Some(&held), "b", at(101)), None);
        assert_eq!(released(None, "a", at(101)), None);
        let r = released(Some(&held), "a", at(101)).unwrap();
        assert_eq!(r.holder_identity, None);
        assert_eq!(r.lease_transitions, held.lease_transitions);
        // Well within the old duration, a standby takes over.
        assert_eq!(decide(Some(&r), "b", at(102)), LeaseAction::TakeOver);
    }
}
