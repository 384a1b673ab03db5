//! Prometheus counters, one registry per plugin (several plugins may share a process in
//! tests and `cvm-dev`), and a tiny `/metrics` HTTP handler.

use std::net::SocketAddr;

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;

/// The plugin's counters.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub guests_launched: IntCounter,
    pub guests_stopped: IntCounter,
    pub evidence_issued: IntCounter,
    /// Receiving guests prepared for live migrations to this node (evidence reported).
    pub migrations_prepared: IntCounter,
    /// Guests sent to another node by live migrations from this node.
    pub migrations_sent: IntCounter,
    /// Failed actions by action and reason.
    pub errors: IntCounterVec,
    /// Guests the platform holds on this node, by whether a CVM bound here owns them
    /// (`owned="false"`: an orphan the next pass stops).
    pub guests_held: IntGaugeVec,
}

impl Metrics {
    /// Counters labelled with the node name, registered in a fresh registry.
    pub fn new(node: &str) -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(
            Some("cvm_node_plugin".into()),
            Some(std::collections::HashMap::from([(
                "node".to_string(),
                node.to_string(),
            )])),
        )?;
        let guests_launched =
            IntCounter::new("guests_launched_total", "Guests launched by this plugin")?;
        let guests_stopped = IntCounter::new(
            "guests_stopped_total",
            "Guests stopped (deletion, Halted or orphaned)",
        )?;
        let evidence_issued = IntCounter::new(
            "evidence_issued_total",
            "Evidence reports written to CVM status",
        )?;
        let migrations_prepared = IntCounter::new(
            "migrations_prepared_total",
            "Receiving guests prepared for live migrations to this node",
        )?;
        let migrations_sent = IntCounter::new(
            "migrations_sent_total",
            "Guests sent to another node by live migrations",
        )?;
        let errors = IntCounterVec::new(
            Opts::new("action_errors_total", "Failed actions by action and reason"),
            &["action", "reason"],
        )?;
        let guests_held = IntGaugeVec::new(
            Opts::new(
                "guests_held",
                "Guests the platform holds on this node, by whether a CVM bound here owns them",
            ),
            &["owned"],
        )?;
        registry.register(Box::new(guests_held.clone()))?;
        registry.register(Box::new(guests_launched.clone()))?;
        registry.register(Box::new(guests_stopped.clone()))?;
        registry.register(Box::new(evidence_issued.clone()))?;
        registry.register(Box::new(migrations_prepared.clone()))?;
        registry.register(Box::new(migrations_sent.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        Ok(Metrics {
            registry,
            guests_launched,
            guests_stopped,
            evidence_issued,
            migrations_prepared,
            migrations_sent,
            errors,
            guests_held,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on a broken metric family; serve what we have.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Metrics) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving metrics");
    let endpoints = cvm_telemetry::Endpoints {
        registry: metrics.registry.clone(),
        // The plugin serves only once its platform is open.
        ready: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
    };
    cvm_telemetry::serve(listener, endpoints).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_with_node_label() {
        let m = Metrics::new("n1").unwrap();
        m.guests_launched.inc();
        m.migrations_sent.inc();
        m.errors.with_label_values(&["launch", "NoCapacity"]).inc();
        m.guests_held.with_label_values(&["true"]).set(2);
        let text = m.render();
        assert!(
            text.contains("cvm_node_plugin_guests_held{owned=\"true\",node=\"n1\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("cvm_node_plugin_guests_launched_total{node=\"n1\"} 1"),
            "{text}"
        );
        assert!(text.contains("reason=\"NoCapacity\""), "{text}");
        assert!(
            text.contains("cvm_node_plugin_migrations_sent_total{node=\"n1\"} 1")
                && text.contains("cvm_node_plugin_migrations_prepared_total{node=\"n1\"} 0"),
            "{text}"
        );
        // A second plugin in the same process has its own registry.
        assert!(Metrics::new("n2").is_ok());
    }
}
