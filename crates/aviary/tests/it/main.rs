//! End-to-end tests of the real `aviary` binary: the server over HTTP and the
//! CLI, on embedded SQLite and on PostgreSQL. One test binary (faster builds),
//! one module per area.

mod harness;

mod agent_apt;
mod apt;
mod ci;
mod cli;
mod consul;
mod deploy;
mod durability;
mod githook;
mod jenkins;
mod packs;
mod pipeline;
mod webhooks;
mod workflow_ops;
mod workflows;
