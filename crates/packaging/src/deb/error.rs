//! Errors of the .deb builder.
//!
//! Every message says what is wrong, where (file, field or path) and what to
//! do about it. Validation errors are raised before anything is written to the
//! output directory.

use std::path::PathBuf;

/// Everything that can go wrong while reading metadata or building a package.
#[derive(Debug, thiserror::Error)]
pub enum DebError {
    /// A file system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("reading", "creating", ...).
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The repository directory does not exist or is not a directory.
    #[error(
        "repository {path} is not a directory: pass the folder of a checked-out application repository"
    )]
    NotARepository {
        /// The path given.
        path: PathBuf,
    },

    /// A metadata file (fpm.json or .aviary/package.yaml) could not be parsed.
    #[error("cannot parse {path}: {message}; fix the file (see the aviary-packaging README)")]
    MetadataParse {
        /// The metadata file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },

    /// The package name breaks dpkg's naming rules.
    #[error(
        "invalid package name {name:?} (from {origin}): {rule}; set a valid \"name\" in fpm.json"
    )]
    InvalidName {
        /// The offending name.
        name: String,
        /// Where it came from (a file, or "the repository folder name").
        origin: String,
        /// The rule that is broken.
        rule: &'static str,
    },

    /// A version (or part of one) breaks dpkg's version rules.
    #[error("invalid {part} {value:?} (from {origin}): {rule}")]
    InvalidVersion {
        /// Which part: "version", "epoch", "iteration", "build number", "commit".
        part: &'static str,
        /// The offending value.
        value: String,
        /// Where it came from.
        origin: String,
        /// The rule that is broken, and what to do.
        rule: &'static str,
    },

    /// A control field value is not acceptable.
    #[error("invalid {field} {value:?} (from {origin}): {problem}")]
    InvalidField {
        /// The field name.
        field: &'static str,
        /// The offending value.
        value: String,
        /// Where it came from.
        origin: String,
        /// What is wrong and what to do.
        problem: &'static str,
    },

    /// A path would land outside of where it belongs (`..`, or an unsafe prefix).
    #[error("path {path:?} in {origin} escapes {boundary}: {problem}")]
    PathEscapes {
        /// The offending path as written.
        path: String,
        /// Where it came from.
        origin: String,
        /// What it must stay inside ("the repository", "the install prefix").
        boundary: &'static str,
        /// What to do.
        problem: &'static str,
    },

    /// A symbolic link points outside of the repository tree.
    #[error(
        "symlink {path} points to {target:?}, outside of the repository tree ({why}); make it a relative link inside the repository, or exclude it in .aviary/package.yaml"
    )]
    SymlinkEscapes {
        /// The symlink inside the repository.
        path: PathBuf,
        /// Its target.
        target: String,
        /// "absolute target" or "escapes with ..".
        why: &'static str,
    },

    /// A convention script is missing or unusable.
    #[error(
        "{path}: {problem}. Convention: script/cisetup, script/cibuild and script/post-inst must exist and be executable (chmod +x; they may just `exit 0`)"
    )]
    ConventionScript {
        /// The script path.
        path: PathBuf,
        /// "is missing", "is not executable", ...
        problem: &'static str,
    },

    /// A maintainer script named in package.yaml is missing or unusable.
    #[error("{field} script {path}: {problem}; fix \"{field}\" in .aviary/package.yaml")]
    MaintainerScript {
        /// "prerm" or "postrm".
        field: &'static str,
        /// The script path.
        path: PathBuf,
        /// What is wrong.
        problem: &'static str,
    },

    /// A file of a type that cannot be packaged (socket, fifo, device).
    #[error(
        "{path} is a {kind}, which cannot be packaged; remove it or add it to \"exclude\" in .aviary/package.yaml"
    )]
    UnsupportedFileType {
        /// The file.
        path: PathBuf,
        /// Its kind.
        kind: &'static str,
    },

    /// Two sources would install the same path.
    #[error(
        "{dest} would be installed twice: from {first} and from {second}; remove one of them or exclude it"
    )]
    DuplicatePath {
        /// The installed path.
        dest: String,
        /// The first source.
        first: String,
        /// The second source.
        second: String,
    },

    /// A path would be a file in one place and a directory in another.
    #[error(
        "{dest} is needed both as a directory and as a file or symlink (from {source_path}); rename one of them"
    )]
    PathConflict {
        /// The installed path.
        dest: String,
        /// The source that conflicts.
        source_path: String,
    },

    /// An exclude glob could not be parsed.
    #[error("invalid exclude pattern {pattern:?} in {origin}: {message}; fix \"exclude\"")]
    InvalidPattern {
        /// The pattern.
        pattern: String,
        /// Where it came from.
        origin: String,
        /// The parser's message.
        message: String,
    },

    /// A declared conffile is not a regular file of the package.
    #[error(
        "conffile {path} (from {origin}) is not a regular file installed by the package; list only absolute paths of packaged files"
    )]
    UnknownConffile {
        /// The declared path.
        path: String,
        /// Where it came from.
        origin: String,
    },

    /// The compressor failed.
    #[error("compressing {member}: {message}")]
    Compression {
        /// The archive member being compressed.
        member: &'static str,
        /// The compressor's message.
        message: String,
    },

    /// A compression level is out of range.
    #[error("compression level {level} is out of range for {format} (use {range})")]
    InvalidLevel {
        /// "xz" or "gzip".
        format: &'static str,
        /// The level asked for.
        level: u32,
        /// The accepted range.
        range: &'static str,
    },
}

impl DebError {
    /// Helper building an [`DebError::Io`].
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> DebError {
        let path = path.into();
        move |source| DebError::Io {
            action,
            path,
            source,
        }
    }
}
