//! Attestation library (being written).
