//! cvmp.io API types (being written).
