//! Aviary's runners (placeholder until the runners crate lands).
