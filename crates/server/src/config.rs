//! Server configuration: defaults, then a YAML file, then `AVIARY_*`
//! environment variables, then command-line flags; validated once at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Everything the server needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// Where the embedded database, keys and the admin token live.
    pub data_dir: PathBuf,
    /// Database URL: `sqlite:<path>` (default, in the data dir) or `postgres://...`.
    pub database: String,
    /// Pack directories: each is either a pack (has `pack.yaml`) or a folder of packs.
    pub packs: Vec<PathBuf>,
    /// How many actions run at once on this server.
    pub workers: usize,
    /// Largest request body accepted, in bytes (webhooks and API).
    pub max_body_bytes: usize,
    /// Name of this server node (executions it claims carry it).
    pub node: String,
    /// URL actions use to call back into the API (given to them as `AVIARY_API_URL`).
    pub public_url: String,
    /// Default action timeout in seconds, when neither the action nor the call sets one.
    pub default_timeout_secs: u64,
    /// CI settings (`ci:` in the file).
    pub ci: CiConfig,
    /// The APT repository's settings (`apt:` in the file).
    pub apt: AptConfig,
    /// Where the host inventory comes from (`builtin` or Consul).
    pub inventory: InventoryConfig,
}

/// CI settings: concurrency, build log retention, Jenkins notifications.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CiConfig {
    /// At most this many `ci-build` executions run at once on this server;
    /// more wait in the queue. `None`: only the worker pool limits them.
    pub max_concurrent: Option<usize>,
    /// Output (the build log) of CI builds finished longer ago than this many
    /// days is deleted; the execution record stays.
    pub log_retention_days: Option<u64>,
    /// Per repository and branch, the output of only the newest N finished
    /// CI builds is kept.
    pub keep_builds: Option<usize>,
    /// How often the retention purge runs, in seconds (default 3600).
    pub purge_interval_secs: Option<u64>,
    /// Which phase of a Jenkins Notification plugin payload emits
    /// `aviary.ci.build`: `completed` (default) or `finalized`.
    pub jenkins_emit_on: Option<String>,
    /// Folders under which `core.deb_build` and `core.apt_publish` may read
    /// and write (absolute; default `<data dir>/packages`). Anything else is
    /// refused: a path from an event must not publish arbitrary files.
    pub package_paths: Option<Vec<PathBuf>>,
}

/// Settings of the server's APT repository (`<data dir>/apt`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AptConfig {
    /// Suites (default `[stable]`).
    pub suites: Option<Vec<String>>,
    /// Components (default `[main]`).
    pub components: Option<Vec<String>>,
    /// Architectures with an index (default `[amd64, all]`).
    pub architectures: Option<Vec<String>>,
    /// Versions kept per package (default 5).
    pub keep_versions: Option<usize>,
}

/// The `inventory:` section: `builtin` (default) or `consul`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InventoryConfig {
    /// `builtin` or `consul`.
    pub backend: Option<String>,
    /// Consul's HTTP address, e.g. `http://127.0.0.1:8500`.
    pub address: Option<String>,
    /// ACL token sent as `X-Consul-Token`.
    pub token: Option<String>,
    /// Only this Consul service (default: every service in the catalog).
    pub service: Option<String>,
    /// Seconds between syncs (default 5).
    pub interval_secs: Option<u64>,
}

impl InventoryConfig {
    /// Whether the Consul backend is selected.
    pub fn is_consul(&self) -> bool {
        self.backend.as_deref() == Some("consul")
    }
}

/// The optional configuration file (`--config`, or `<data dir>/aviary.yaml`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// See [`ServerConfig::listen`].
    pub listen: Option<String>,
    /// See [`ServerConfig::database`].
    pub database: Option<String>,
    /// See [`ServerConfig::packs`].
    pub packs: Option<Vec<PathBuf>>,
    /// See [`ServerConfig::workers`].
    pub workers: Option<usize>,
    /// See [`ServerConfig::max_body_bytes`].
    pub max_body_bytes: Option<usize>,
    /// See [`ServerConfig::node`].
    pub node: Option<String>,
    /// See [`ServerConfig::public_url`].
    pub public_url: Option<String>,
    /// See [`ServerConfig::default_timeout_secs`].
    pub default_timeout_secs: Option<u64>,
    /// See [`ServerConfig::ci`].
    pub ci: Option<CiConfig>,
    /// See [`ServerConfig::apt`].
    pub apt: Option<AptConfig>,
    /// Inventory backend.
    pub inventory: Option<InventoryConfig>,
}

/// Values given on the command line or in the environment (highest precedence).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--config`
    pub config_file: Option<PathBuf>,
    /// `--listen` / `AVIARY_LISTEN`
    pub listen: Option<String>,
    /// `--data-dir` / `AVIARY_DATA_DIR`
    pub data_dir: Option<PathBuf>,
    /// `--database` / `AVIARY_DATABASE`
    pub database: Option<String>,
    /// `--packs` / `AVIARY_PACKS` (colon-separated in the environment)
    pub packs: Vec<PathBuf>,
    /// `--workers` / `AVIARY_WORKERS`
    pub workers: Option<usize>,
    /// `--max-body-bytes`
    pub max_body_bytes: Option<usize>,
    /// `--node`
    pub node: Option<String>,
}

/// A configuration problem, said with where it came from and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("{path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// What serde-saphyr said, with line and column.
        message: String,
    },
    /// A value is wrong.
    #[error("invalid {field} '{value}' (from {origin}): {message}")]
    Invalid {
        /// Setting name.
        field: &'static str,
        /// The value given.
        value: String,
        /// Flag, environment variable or file it came from.
        origin: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// No data directory could be found.
    #[error("no data directory: set --data-dir or AVIARY_DATA_DIR")]
    NoDataDir,
}

/// The default data directory: `AVIARY_DATA_DIR`, else the platform data dir
/// (`~/.local/share/aviary` on Linux).
pub fn default_data_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("AVIARY_DATA_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME") {
        return Some(PathBuf::from(dir).join("aviary"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share/aviary"))
}

impl ServerConfig {
    /// Builds the configuration: defaults < file < overrides. Reads the file if any.
    pub fn load(over: &Overrides) -> Result<Self, ConfigError> {
        let data_dir = over
            .data_dir
            .clone()
            .or_else(default_data_dir)
            .ok_or(ConfigError::NoDataDir)?;
        let file_path = over
            .config_file
            .clone()
            .or_else(|| Some(data_dir.join("aviary.yaml")).filter(|p| p.exists()));
        let file = match &file_path {
            Some(path) => read_file(path)?,
            None => ConfigFile::default(),
        };
        let file_origin = file_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();

        let (listen_text, listen_origin) = match (&over.listen, &file.listen) {
            (Some(l), _) => (l.clone(), "--listen/AVIARY_LISTEN".to_string()),
            (None, Some(l)) => (l.clone(), file_origin.clone()),
            (None, None) => ("127.0.0.1:9700".to_string(), "default".to_string()),
        };
        let listen: SocketAddr = listen_text.parse().map_err(|e| ConfigError::Invalid {
            field: "listen",
            value: listen_text.clone(),
            origin: listen_origin,
            message: format!("{e}; expected HOST:PORT such as 127.0.0.1:9700"),
        })?;

        let database = over
            .database
            .clone()
            .or(file.database)
            .unwrap_or_else(|| format!("sqlite:{}", data_dir.join("aviary.db").display()));
        if !(database.starts_with("sqlite:")
            || database.starts_with("postgres://")
            || database.starts_with("postgresql://"))
        {
            return Err(ConfigError::Invalid {
                field: "database",
                value: redact_url(&database),
                origin: "--database/AVIARY_DATABASE or the config file".into(),
                message: "expected sqlite:<path> or postgres://user@host:port/db".into(),
            });
        }

        let mut packs = file.packs.unwrap_or_default();
        packs.extend(over.packs.iter().cloned());
        for p in &packs {
            if !p.is_dir() {
                return Err(ConfigError::Invalid {
                    field: "packs",
                    value: p.display().to_string(),
                    origin: "--packs/AVIARY_PACKS or the config file".into(),
                    message: "not a directory; give a pack folder or a folder of packs".into(),
                });
            }
        }

        let workers = over.workers.or(file.workers).unwrap_or(32);
        if workers == 0 || workers > 10_000 {
            return Err(ConfigError::Invalid {
                field: "workers",
                value: workers.to_string(),
                origin: "--workers or the config file".into(),
                message: "must be between 1 and 10000".into(),
            });
        }
        let max_body_bytes = over
            .max_body_bytes
            .or(file.max_body_bytes)
            .unwrap_or(1024 * 1024);
        if max_body_bytes < 1024 {
            return Err(ConfigError::Invalid {
                field: "max_body_bytes",
                value: max_body_bytes.to_string(),
                origin: "--max-body-bytes or the config file".into(),
                message: "must be at least 1024".into(),
            });
        }
        let node = over
            .node
            .clone()
            .or(file.node)
            .unwrap_or_else(|| "local".to_string());
        let public_url = file
            .public_url
            .unwrap_or_else(|| format!("http://{listen}"));
        let ci = file.ci.unwrap_or_default();
        let invalid = |field: &'static str, value: String, message: &str| ConfigError::Invalid {
            field,
            value,
            origin: file_origin.clone(),
            message: message.into(),
        };
        if let Some(n) = ci.max_concurrent
            && n == 0
        {
            return Err(invalid(
                "ci.max_concurrent",
                n.to_string(),
                "must be at least 1 (leave it out for no limit)",
            ));
        }
        if let Some(n) = ci.keep_builds
            && n == 0
        {
            return Err(invalid(
                "ci.keep_builds",
                n.to_string(),
                "must be at least 1 (leave it out to keep every build log)",
            ));
        }
        if let Some(n) = ci.purge_interval_secs
            && n == 0
        {
            return Err(invalid(
                "ci.purge_interval_secs",
                n.to_string(),
                "must be at least 1",
            ));
        }
        if let Some(p) = &ci.jenkins_emit_on
            && !matches!(p.as_str(), "completed" | "finalized")
        {
            return Err(invalid(
                "ci.jenkins_emit_on",
                p.clone(),
                "must be `completed` or `finalized`",
            ));
        }
        if let Some(paths) = &ci.package_paths {
            for p in paths {
                if !p.is_absolute() {
                    return Err(invalid(
                        "ci.package_paths",
                        p.display().to_string(),
                        "must be absolute folders",
                    ));
                }
            }
        }
        let apt = file.apt.unwrap_or_default();
        if let Some(n) = apt.keep_versions
            && n == 0
        {
            return Err(invalid(
                "apt.keep_versions",
                n.to_string(),
                "must be at least 1",
            ));
        }
        let inventory = file.inventory.unwrap_or_default();
        match inventory.backend.as_deref() {
            None | Some("builtin") => {}
            Some("consul") => {
                let addr = inventory.address.clone().unwrap_or_default();
                if !(addr.starts_with("http://") || addr.starts_with("https://")) {
                    return Err(invalid(
                        "inventory.address",
                        addr,
                        "the consul backend needs an address such as http://127.0.0.1:8500",
                    ));
                }
                if inventory.interval_secs == Some(0) {
                    return Err(invalid(
                        "inventory.interval_secs",
                        "0".into(),
                        "must be at least 1",
                    ));
                }
            }
            Some(other) => {
                return Err(invalid(
                    "inventory.backend",
                    other.to_string(),
                    "must be `builtin` or `consul`",
                ));
            }
        }
        Ok(Self {
            listen,
            data_dir,
            database,
            packs,
            workers,
            max_body_bytes,
            node,
            public_url,
            default_timeout_secs: file.default_timeout_secs.unwrap_or(600),
            ci,
            apt,
            inventory,
        })
    }
}

fn read_file(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_saphyr::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Hides a password in a database URL for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..scheme_end + 3], user, &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
