//! Aviary's storage (placeholder until the storage crate lands).
