//! Aviary's packaging: builds Debian binary packages (.deb) from checked-out
//! application repositories, the step FPM performed in the seed pipeline.
//!
//! See [`deb`] for the format details and the crate README for the metadata
//! files, the conventions and the lintian tags that are accepted.

pub mod apt;
pub mod deb;

pub use deb::{
    BuildRequest, BuiltPackage, Compression, DebError, PackageMetadata, build, read_metadata,
    source_date_epoch_from_env,
};
