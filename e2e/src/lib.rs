//! Local control plane harness (being written).
