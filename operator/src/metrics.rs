//! Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoints.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};
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
    pub ready: Arc<AtomicBool>,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new("cvm_operator_reconciles_total", "Reconciliations by result"),
            &["result"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "cvm_operator_reconcile_errors_total",
                "Reconcile errors by kind",
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
                "Seconds from creation to the first Verified=True",
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
            ready: Arc::new(AtomicBool::new(false)),
        })
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
