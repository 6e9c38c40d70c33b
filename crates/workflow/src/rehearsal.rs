//! rehearsal (placeholder).
