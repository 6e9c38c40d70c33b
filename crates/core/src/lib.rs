//! Aviary's pure core.
//!
//! Everything here is computation over values: the data model shared by every
//! other crate, the StackStorm pack formats (packs, actions, rules) with
//! located diagnostics, rule criteria, Jinja templates, action parameter
//! schemas, timer schedules, webhook signatures and datastore encryption.
//!
//! Invariant: nothing in this crate does I/O (no files, sockets, processes or
//! clocks other than values passed in). Callers read files and pass text in.

pub mod action;
pub mod criteria;
pub mod diagnostic;
pub mod model;
pub mod pack;
pub mod params;
pub mod rule;
pub mod runner_types;
pub mod secret;
pub mod signature;
pub mod template;
pub mod timer;
