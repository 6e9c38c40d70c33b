//! The CLI's error type and its mapping to process exit codes.

use std::path::PathBuf;

/// Exit code: the command worked.
pub const EXIT_OK: i32 = 0;
/// Exit code: the thing failed (execution failed, object not found...).
pub const EXIT_FAILED: i32 = 1;
/// Exit code: usage error or an error reported by the API.
pub const EXIT_USAGE: i32 = 2;
/// Exit code: cannot reach the server, or it refused the credentials.
pub const EXIT_UNREACHABLE: i32 = 3;

/// Everything that can go wrong in a CLI command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The server could not be reached at all.
    #[error(
        "cannot reach the Aviary server at {url}: {cause}; is `aviary server` running? (set AVIARY_URL or pass --url)"
    )]
    Unreachable {
        /// The base URL that was tried.
        url: String,
        /// The underlying cause (e.g. "connection refused").
        cause: String,
    },
    /// The server answered 401/403: no token, a wrong or revoked one.
    #[error("the server refused the token ({status}): {message}; {hint}")]
    Unauthorized {
        /// HTTP status (401 or 403).
        status: u16,
        /// The server's message.
        message: String,
        /// What to do, depending on where the token came from.
        hint: String,
    },
    /// The server reported that the object does not exist (404).
    #[error("not found: {message}")]
    NotFound {
        /// The server's message.
        message: String,
    },
    /// Any other error answer of the API (400, 409, 413, 422, 5xx...).
    #[error(
        "the server rejected the request ({status}): {message}{}",
        list_details(details)
    )]
    Api {
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
        /// Every problem the server listed (e.g. one per bad parameter).
        details: Vec<String>,
    },
    /// The command line is wrong in a way clap cannot check.
    #[error("{0}")]
    Usage(String),
    /// The CLI config file exists but cannot be used.
    #[error("cannot use the CLI config file {path}: {cause}; fix it or remove it")]
    Config {
        /// The config file path.
        path: PathBuf,
        /// What is wrong.
        cause: String,
    },
    /// A local file could not be read.
    #[error("cannot read {path}: {cause}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// The server's answer is not what the API documents.
    #[error(
        "unexpected response from {url}: {cause}; are the client and the server the same version?"
    )]
    Protocol {
        /// The URL that answered.
        url: String,
        /// What was wrong with it.
        cause: String,
    },
    /// Writing to stdout/stderr failed (e.g. a closed pipe).
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

fn list_details(details: &[String]) -> String {
    let mut s = String::new();
    for d in details {
        s.push_str("\n  - ");
        s.push_str(d);
    }
    s
}

impl CliError {
    /// The process exit code for this error: 1 not found, 2 usage/API
    /// errors, 3 unreachable server or refused credentials.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Unreachable { .. } | Self::Unauthorized { .. } => EXIT_UNREACHABLE,
            Self::NotFound { .. } => EXIT_FAILED,
            Self::Api { .. }
            | Self::Usage(_)
            | Self::Config { .. }
            | Self::ReadFile { .. }
            | Self::Protocol { .. }
            | Self::Output(_) => EXIT_USAGE,
        }
    }
}
