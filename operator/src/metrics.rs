//! Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoints.

use cvm_crds::CvmPhase;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};
use std::collections::HashSet;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tokio::net::TcpListener;

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub errors: IntCounterVec,
    pub phases: IntGaugeVec,
    pub time_to_verified: Histogram,
    pub verifications: IntCounterVec,
    /// Live migrations that ended, by outcome (`succeeded`, `failed`).
    pub migrations: IntCounterVec,
    /// Seconds from a migration's creation to its end, by outcome.
    pub migration_duration: HistogramVec,
    /// Host and instance pin events: `first_use`, `conflict`, `instance_repinned`.
    pub host_pins: IntCounterVec,
    pub ready: Arc<AtomicBool>,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "cvm_operator_reconciles_total",
                "Reconciliations by result: ok, error, gone (the object was deleted \
                 meanwhile), conflict (a concurrent write won; retried)",
            ),
            &["result"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "cvm_operator_reconcile_errors_total",
                "Reconcile errors by kind; a 404 on a deleted object and a 409 conflict \
                 are expected outcomes, counted only in cvm_operator_reconciles_total",
            ),
            &["error"],
        )?;
        let phases = IntGaugeVec::new(
            Opts::new("cvm_operator_cvms", "ConfidentialVMs by phase"),
            &["phase"],
        )?;
        let time_to_verified = Histogram::with_opts(
            HistogramOpts::new(
                "cvm_operator_time_to_verified_seconds",
                "Seconds from creation to the first Verified=True, once per CVM",
            )
            .buckets(vec![
                0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0,
            ]),
        )?;
        let verifications = IntCounterVec::new(
            Opts::new(
                "cvm_operator_verifications_total",
                "Evidence appraisals by EAR status",
            ),
            &["status"],
        )?;
        let migrations = IntCounterVec::new(
            Opts::new(
                "cvm_migrations_total",
                "Live migrations that ended, by outcome",
            ),
            &["outcome"],
        )?;
        let migration_duration = HistogramVec::new(
            HistogramOpts::new(
                "cvm_migration_duration_seconds",
                "Seconds from a migration's creation to its end, by outcome",
            )
            .buckets(vec![
                1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
            ]),
            &["outcome"],
        )?;
        let host_pins = IntCounterVec::new(
            Opts::new(
                "cvm_operator_pins_total",
                "Pin events: first_use (a node's hardware pinned), conflict (evidence from \
                 hardware pinned to another node: alert), instance_repinned (a CVM's guest \
                 instance changed after a relaunch or migration)",
            ),
            &["event"],
        )?;
        registry.register(Box::new(host_pins.clone()))?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(migrations.clone()))?;
        registry.register(Box::new(migration_duration.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(phases.clone()))?;
        registry.register(Box::new(time_to_verified.clone()))?;
        registry.register(Box::new(verifications.clone()))?;
        Ok(Metrics {
            registry,
            reconciles,
            errors,
            phases,
            time_to_verified,
            verifications,
            migrations,
            migration_duration,
            host_pins,
            ready: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Counts a failed reconcile: an expected outcome (404 on a vanished object, 409
    /// conflict) only in `reconciles` under its label, anything else in `errors` too.
    /// Returns the expected outcome, if it was one, for the caller's log line.
    pub fn count_reconcile_error(
        &self,
        err: &crate::error::Error,
    ) -> Option<crate::error::Expected> {
        let outcome = err.expected();
        match outcome {
            Some(o) => self.reconciles.with_label_values(&[o.metric_label()]).inc(),
            None => {
                self.errors.with_label_values(&[err.metric_label()]).inc();
                self.reconciles.with_label_values(&["error"]).inc();
            }
        }
        outcome
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped.
    pub async fn serve(self, listener: TcpListener) {
        cvm_telemetry::serve(
            listener,
            cvm_telemetry::Endpoints {
                registry: self.registry,
                ready: self.ready,
            },
        )
        .await
    }
}

/// The CVMs (by key: namespace, name, UID) whose time to Verified has been observed or
/// that this operator first saw already Verified, so that `time_to_verified` counts each
/// CVM once however many views of its transition reconcile.
#[derive(Debug, Default)]
pub struct VerifiedOnce {
    keys: HashSet<String>,
}

impl VerifiedOnce {
    /// Whether a reconcile that derives phase `new` from a view recorded as `old` observes
    /// the CVM's time to Verified (and if so, remembers it): only its first transition into
    /// Verified. A stale view that derives the same transition again observes nothing; a
    /// CVM the API server already shows Verified (a restarted operator) is remembered
    /// without observing.
    pub fn first_verified(&mut self, key: &str, old: Option<CvmPhase>, new: CvmPhase) -> bool {
        if old == Some(CvmPhase::Verified) {
            if !self.keys.contains(key) {
                self.keys.insert(key.to_string());
            }
            return false;
        }
        new == CvmPhase::Verified && self.keys.insert(key.to_string())
    }

    /// Forgets a CVM that is being deleted.
    pub fn forget(&mut self, key: &str) {
        self.keys.remove(key);
    }

    /// Keeps only the CVMs for which `live` holds (those still in the cache).
    pub fn retain(&mut self, live: impl Fn(&str) -> bool) {
        self.keys.retain(|k| live(k));
    }

    /// How many CVMs are remembered.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CvmPhase::*;

    #[test]
    fn each_cvm_is_observed_once() {
        let mut seen = VerifiedOnce::default();
        // (key, phase in the view, derived phase, observes?)
        let steps = [
            ("d/a/1", None, Pending, false),
            ("d/a/1", Some(Pending), Scheduled, false),
            ("d/a/1", Some(Running), Verified, true),
            // A stale view still shows Running and derives Verified again.
            ("d/a/1", Some(Running), Verified, false),
            ("d/a/1", Some(Pending), Verified, false),
            ("d/a/1", Some(Verified), Verified, false),
            // Re-appraisal fails, later passes: still the same CVM's first time only.
            ("d/a/1", Some(Verified), Running, false),
            ("d/a/1", Some(Running), Verified, false),
            // Another CVM, and one of the same name re-created (a new UID).
            ("d/b/2", Some(Pending), Verified, true),
            ("d/a/3", Some(Running), Verified, true),
        ];
        for (i, (key, old, new, want)) in steps.into_iter().enumerate() {
            assert_eq!(
                seen.first_verified(key, old, new),
                want,
                "step {i}: {key} {old:?} -> {new:?}"
            );
        }
    }

    #[test]
    fn a_restarted_operator_does_not_observe_cvms_already_verified() {
        let mut seen = VerifiedOnce::default();
        assert!(!seen.first_verified("d/a/1", Some(Verified), Verified));
        // Its next re-verification after a failed appraisal is not a first time either.
        assert!(!seen.first_verified("d/a/1", Some(Running), Verified));
    }

    #[test]
    fn a_forgotten_cvm_is_no_longer_remembered() {
        let mut seen = VerifiedOnce::default();
        assert!(seen.first_verified("d/a/1", Some(Running), Verified));
        assert!(seen.first_verified("d/b/2", Some(Running), Verified));
        seen.forget("d/a/1");
        assert_eq!(seen.len(), 1);
        seen.retain(|k| k != "d/b/2");
        assert!(seen.is_empty());
        // (Only a new object carries the key again: deletion is for good.)
        assert!(seen.first_verified("d/a/1", Some(Running), Verified));
    }
}
