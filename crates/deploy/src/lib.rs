//! Aviary's deploy model, pure (no I/O): deploy tags (`<app>::<role>`,
//! `<app>::<role>_canary`), hosts and their reports, advertised versions and
//! their history, the promotion policy ("production can only promote what
//! the canaries run"), and production rollouts in batches.
//!
//! The store applies [`model::apply_change`] inside its transaction, and the
//! server applies [`policy::check_promotion`] before it, so the rule holds at
//! both layers.

pub mod model;
pub mod policy;
pub mod tag;

pub use model::{
    AppStatus, Assignment, DeployLock, Health, Host, HostFilter, VersionChange, VersionChangeKind,
    VersionChangeRequest, VersionOutcome, Versions, apply_change, assigned_version,
    valid_host_name,
};
pub use policy::{
    BatchSpec, HostProblem, HostState, Refusal, check_promotion, host_state, plan_batches,
};
pub use tag::{DEFAULT_ROLE, Tag, TagError, check_app, check_role, parse_tag, parse_tags};
