//! Orquesta workflows, the pure core.
//!
//! Aviary runs StackStorm's Orquesta workflow language. This crate holds
//! everything that needs no I/O:
//! - [`spec`]: parse and validate a workflow definition (located errors);
//! - [`expr`]: YAQL `<% %>` and Jinja `{{ }}` expressions with Orquesta's
//!   functions (`ctx()`, `result()`, `succeeded()`...);
//! - [`conductor`]: the workflow state machine, a pure function of
//!   (state, event) to (new state, commands); the state is serde-serializable
//!   so a caller can store it between events;
//! - [`rehearsal`]: run Orquesta rehearsal specs (mocked action results)
//!   against the conductor and compare with the expected outcome.

pub mod conductor;
pub mod expr;
pub mod rehearsal;
pub mod spec;
