//! conductor (placeholder).
