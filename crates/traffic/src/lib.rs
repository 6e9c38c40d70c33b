//! Traffic for the canary pattern: HAProxy in front of a production pool and
//! a canary pool per app.
//!
//! - [`Snapshot`] is the input: the apps, each with its frontend address, its
//!   production and canary servers (address, port, weight, draining) and its
//!   canary share. Build it from the inventory (or any source).
//! - [`render_haproxy`] turns a snapshot into an HAProxy 2.6 configuration:
//!   per app a frontend that sends a request to the canary backend when it
//!   carries `X-<App>-Canary: true` or the cookie `<app>_canary=true`, or, for
//!   the canary share, when `rand(100)` is below the percentage (and the canary
//!   pool has a server up); otherwise to production. Every server is health
//!   checked (`option httpchk`, `GET <health path>`, expect 200). A draining
//!   server has weight 0 (no new requests).
//! - [`haproxy::Haproxy`] runs haproxy in master-worker mode and applies a new
//!   configuration without dropping connections: the file is checked with
//!   `haproxy -c` first, then the master reloads (new worker takes over the
//!   listening sockets, the old one finishes its connections). Weight and
//!   drain changes go through the runtime API instead (no reload).
//! - [`template::render`] renders any minijinja template from the same
//!   snapshot (what consul-template does).
//!
//! Every check on the input reports all problems at once with their field
//! path (`apps[0].canary[1].port`).

pub mod haproxy;
pub mod template;

use std::fmt::Write as _;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Everything the traffic layer needs to know.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The apps behind HAProxy.
    pub apps: Vec<App>,
}

/// One app: a frontend, a production pool and a canary pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct App {
    /// App name (`[a-z0-9_-]`, starting with a letter); names the backends
    /// `be_<name>` and `be_<name>_canary`.
    pub name: String,
    /// Where the app's frontend listens.
    pub bind: SocketAddr,
    /// Health check path, e.g. `/healthz`.
    #[serde(default = "default_health_path")]
    pub health_path: String,
    /// Share of ordinary requests sent to the canary pool, in percent (0-100).
    #[serde(default)]
    pub canary_share: u8,
    /// Production servers.
    pub production: Vec<Server>,
    /// Canary servers.
    #[serde(default)]
    pub canary: Vec<Server>,
}

/// One server of a pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Server {
    /// Server name, unique in its pool (`[A-Za-z0-9_.-]`): usually the host name.
    pub name: String,
    /// IP address or DNS name.
    pub address: String,
    /// Port.
    pub port: u16,
    /// HAProxy weight (0-256).
    #[serde(default = "default_weight")]
    pub weight: u16,
    /// A draining server gets no new requests (weight 0).
    #[serde(default)]
    pub draining: bool,
}

fn default_health_path() -> String {
    "/healthz".to_owned()
}

fn default_weight() -> u16 {
    100
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The snapshot has invalid fields; every problem is listed.
    #[error("invalid traffic snapshot:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
    /// haproxy refused the configuration (`haproxy -c`).
    #[error("haproxy refused the configuration {path}: {output}")]
    ConfigRejected {
        /// The file checked.
        path: String,
        /// haproxy's messages.
        output: String,
    },
    /// A template could not be rendered.
    #[error("template {name}: {message}")]
    Template {
        /// Template name.
        name: String,
        /// What went wrong, with line.
        message: String,
    },
    /// Talking to haproxy failed.
    #[error("haproxy: {what}: {message}")]
    Haproxy {
        /// What was being done.
        what: String,
        /// What went wrong and what to do.
        message: String,
    },
    /// An I/O error.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Options of the rendered configuration that are not about apps.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderOptions {
    /// Runtime API socket (`stats socket ... level admin`).
    pub stats_socket: String,
    /// Health check interval, milliseconds.
    pub check_interval_ms: u32,
    /// Timeouts for connect, client and server, milliseconds.
    pub timeout_ms: u32,
}

impl RenderOptions {
    /// Defaults with the given runtime API socket path.
    pub fn new(stats_socket: impl Into<String>) -> Self {
        Self {
            stats_socket: stats_socket.into(),
            check_interval_ms: 2000,
            timeout_ms: 30_000,
        }
    }
}

fn valid_name(s: &str, allow_upper: bool) -> bool {
    s.len() <= 64
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars().all(|c| {
            c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || c == '_'
                || c == '-'
                || (allow_upper && (c.is_ascii_uppercase() || c == '.'))
        })
}

fn valid_address(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
}

/// Checks a snapshot; returns every problem with its field path.
pub fn validate(snapshot: &Snapshot) -> Result<()> {
    let mut problems = Vec::new();
    let mut names = std::collections::HashSet::new();
    let mut binds = std::collections::HashSet::new();
    for (i, app) in snapshot.apps.iter().enumerate() {
        let at = format!("apps[{i}]");
        if !valid_name(&app.name, false) {
            problems.push(format!(
                "{at}.name: {:?} must be 1-64 of [a-z0-9_-], starting with a letter or digit",
                app.name
            ));
        }
        if !names.insert(app.name.clone()) {
            problems.push(format!("{at}.name: app {:?} appears twice", app.name));
        }
        if !binds.insert(app.bind) {
            problems.push(format!(
                "{at}.bind: {} is already used by another app",
                app.bind
            ));
        }
        if !app.health_path.starts_with('/')
            || app
                .health_path
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '\\' || c == '#')
        {
            problems.push(format!(
                "{at}.health_path: {:?} must be a path starting with '/' without spaces, quotes or '#'",
                app.health_path
            ));
        }
        if app.canary_share > 100 {
            problems.push(format!(
                "{at}.canary_share: {} is not a percentage (0-100)",
                app.canary_share
            ));
        }
        for (pool, servers) in [("production", &app.production), ("canary", &app.canary)] {
            let mut seen = std::collections::HashSet::new();
            for (j, s) in servers.iter().enumerate() {
                let at = format!("{at}.{pool}[{j}]");
                if !valid_name(&s.name, true) {
                    problems.push(format!(
                        "{at}.name: {:?} must be 1-64 of [A-Za-z0-9_.-]",
                        s.name
                    ));
                }
                if !seen.insert(s.name.clone()) {
                    problems.push(format!("{at}.name: {:?} appears twice in the pool", s.name));
                }
                if !valid_address(&s.address) {
                    problems.push(format!(
                        "{at}.address: {:?} is not an IP address or host name",
                        s.address
                    ));
                }
                if s.port == 0 {
                    problems.push(format!("{at}.port: must be 1-65535"));
                }
                if s.weight > 256 {
                    problems.push(format!("{at}.weight: {} is above HAProxy's 256", s.weight));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(problems))
    }
}

/// The production backend's name for `app`.
pub fn production_backend(app: &str) -> String {
    format!("be_{app}")
}

/// The canary backend's name for `app`.
pub fn canary_backend(app: &str) -> String {
    format!("be_{app}_canary")
}

/// The header that forces the canary pool: `X-<App>-Canary` (`true`).
pub fn canary_header(app: &str) -> String {
    let mut chars = app.chars();
    let capitalized: String = match chars.next() {
        Some(c) => c.to_ascii_uppercase().to_string() + chars.as_str(),
        None => String::new(),
    };
    format!("X-{capitalized}-Canary")
}

/// The cookie that forces the canary pool: `<app>_canary` (`true`).
pub fn canary_cookie(app: &str) -> String {
    format!("{app}_canary")
}

fn server_address(s: &Server) -> String {
    if s.address.contains(':') {
        format!("[{}]:{}", s.address, s.port)
    } else {
        format!("{}:{}", s.address, s.port)
    }
}

/// Renders the HAProxy configuration of `snapshot` (validated first).
pub fn render_haproxy(snapshot: &Snapshot, options: &RenderOptions) -> Result<String> {
    validate(snapshot)?;
    if options
        .stats_socket
        .contains(|c: char| c.is_whitespace() || c == '"')
    {
        return Err(Error::Invalid(vec![format!(
            "stats_socket: {:?} must be a path without spaces or quotes",
            options.stats_socket
        )]));
    }
    let mut out = String::new();
    let t = options.timeout_ms;
    let _ = write!(
        out,
        "# Rendered by Aviary (aviary-traffic); do not edit: changes are overwritten.\n\
         global\n\
         \x20   master-worker\n\
         \x20   stats socket {sock} mode 600 level admin expose-fd listeners\n\
         \x20   stats timeout 30s\n\
         \n\
         defaults\n\
         \x20   mode http\n\
         \x20   option http-server-close\n\
         \x20   option redispatch\n\
         \x20   retries 3\n\
         \x20   timeout connect {t}ms\n\
         \x20   timeout client {t}ms\n\
         \x20   timeout server {t}ms\n\
         \x20   timeout http-request {t}ms\n\
         \x20   default-server inter {inter}ms fall 3 rise 2\n",
        sock = options.stats_socket,
        inter = options.check_interval_ms,
    );
    for app in &snapshot.apps {
        let prod = production_backend(&app.name);
        let canary = canary_backend(&app.name);
        let _ = write!(
            out,
            "\nfrontend fe_{name}\n\
             \x20   bind {bind}\n\
             \x20   acl canary_forced req.hdr({header}) -m str -i true\n\
             \x20   acl canary_forced req.cook({cookie}) -m str -i true\n\
             \x20   acl canary_up nbsrv({canary}) gt 0\n\
             \x20   use_backend {canary} if canary_forced\n",
            name = app.name,
            bind = app.bind,
            header = canary_header(&app.name),
            cookie = canary_cookie(&app.name),
        );
        if app.canary_share > 0 {
            let _ = writeln!(
                out,
                "    use_backend {canary} if canary_up {{ rand(100) lt {} }}",
                app.canary_share
            );
        }
        let _ = writeln!(out, "    default_backend {prod}");
        for (backend, servers) in [(&prod, &app.production), (&canary, &app.canary)] {
            let _ = write!(
                out,
                "\nbackend {backend}\n\
                 \x20   balance roundrobin\n\
                 \x20   option httpchk\n\
                 \x20   http-check send meth GET uri {path}\n\
                 \x20   http-check expect status 200\n",
                path = app.health_path,
            );
            for s in servers {
                let weight = if s.draining { 0 } else { s.weight };
                let _ = writeln!(
                    out,
                    "    server {} {} check weight {weight}",
                    s.name,
                    server_address(s)
                );
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let snap = Snapshot {
            apps: vec![App {
                name: "Bad App".into(),
                bind: "127.0.0.1:1".parse().expect("addr"),
                health_path: "healthz now".into(),
                canary_share: 120,
                production: vec![Server {
                    name: "p1".into(),
                    address: "10.0.0.1; rm".into(),
                    port: 0,
                    weight: 300,
                    draining: false,
                }],
                canary: vec![],
            }],
        };
        let Err(Error::Invalid(p)) = validate(&snap) else {
            panic!("expected errors");
        };
        let joined = p.join("\n");
        for field in [
            "apps[0].name",
            "apps[0].health_path",
            "apps[0].canary_share",
            "apps[0].production[0].address",
            "apps[0].production[0].port",
            "apps[0].production[0].weight",
        ] {
            assert!(joined.contains(field), "{field} missing in {joined}");
        }
    }

    #[test]
    fn header_name_follows_the_seed() {
        assert_eq!(canary_header("seatshare"), "X-Seatshare-Canary");
    }
}
