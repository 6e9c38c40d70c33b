//! Errors of the APT repository library.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while maintaining an APT repository.
#[derive(Debug, thiserror::Error)]
pub enum AptError {
    /// A file system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("reading", "renaming to", ...).
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file given to `add` is not a Debian binary package.
    #[error(
        "{path} is not a Debian binary package (.deb): {reason}; pass a file built by dpkg-deb or aviary's deb builder"
    )]
    NotADeb {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The control file of a package is unusable.
    #[error("invalid control data in {path}: {reason}")]
    BadControl {
        /// The package file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A package with the same name, version and architecture but other content exists.
    #[error(
        "{package} is already in the repository with different content (sha256 {existing} there, {new} in {path}); bump the version instead of rebuilding the same one"
    )]
    Conflict {
        /// `name version (arch)`.
        package: String,
        /// SHA-256 of the published file.
        existing: String,
        /// SHA-256 of the new file.
        new: String,
        /// The new file.
        path: PathBuf,
    },
    /// A suite, component or architecture that the configuration does not name.
    #[error(
        "{what} `{value}` is not configured for this repository (configured: {configured}); add it to RepoConfig"
    )]
    NotConfigured {
        /// "suite", "component" or "architecture".
        what: &'static str,
        /// The value asked for.
        value: String,
        /// The configured values, comma-separated.
        configured: String,
    },
    /// Nothing matched a removal request.
    #[error("no package {package}{} in {suite}/{component}", version.as_ref().map(|v| format!(" version {v}")).unwrap_or_default())]
    NotFound {
        /// Suite.
        suite: String,
        /// Component.
        component: String,
        /// Package name.
        package: String,
        /// Version, when one was asked for.
        version: Option<String>,
    },
    /// The configuration is invalid.
    #[error("invalid repository configuration: {0}")]
    Config(String),
    /// The private state directory is damaged.
    #[error(
        "corrupt repository state in {path}: {reason}; restore it from a backup or re-add the packages into a new repository"
    )]
    State {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Key generation, import or signing failed.
    #[error("OpenPGP {action} failed: {reason}")]
    Pgp {
        /// "key generation", "key import", "signing", ...
        action: &'static str,
        /// The library's message.
        reason: String,
    },
}

impl AptError {
    /// Wraps an I/O error with the action and path.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| AptError::Io {
            action,
            path,
            source,
        }
    }

    /// Wraps an rPGP error.
    pub(crate) fn pgp(action: &'static str) -> impl FnOnce(pgp::errors::Error) -> Self {
        move |e| AptError::Pgp {
            action,
            reason: e.to_string(),
        }
    }
}
