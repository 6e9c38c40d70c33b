//! Server and token discovery.
//!
//! Order: flags / environment (`--url`/`AVIARY_URL`, `--token`/`AVIARY_TOKEN`);
//! then the config file `$XDG_CONFIG_HOME/aviary/cli.json` (or
//! `~/.config/aviary/cli.json`) with `{"url", "token"}`; otherwise the URL
//! `http://127.0.0.1:9700` and the token the server wrote on first start to
//! `<data dir>/admin.token` (data dir = `AVIARY_DATA_DIR`, or the platform data
//! dir, e.g. `~/.local/share/aviary`). The admin token file is only used for a
//! server on this machine (a loopback URL), so it is never sent elsewhere.
//!
//! Discovery is a pure function of [`DiscoveryEnv`], so it is testable without
//! touching the process environment.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::CliError;

/// The server URL used when nothing else is configured.
pub const DEFAULT_URL: &str = "http://127.0.0.1:9700";

/// Everything discovery looks at, gathered up front.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscoveryEnv {
    /// `--url` or `AVIARY_URL`.
    pub url: Option<String>,
    /// `--token` or `AVIARY_TOKEN`.
    pub token: Option<String>,
    /// `XDG_CONFIG_HOME`.
    pub xdg_config_home: Option<PathBuf>,
    /// The home directory (`HOME`).
    pub home: Option<PathBuf>,
    /// `AVIARY_DATA_DIR`.
    pub aviary_data_dir: Option<PathBuf>,
    /// The platform data dir for Aviary (`directories`' data dir for
    /// `("", "", "aviary")`), used when `AVIARY_DATA_DIR` is not set.
    pub platform_data_dir: Option<PathBuf>,
}

impl DiscoveryEnv {
    /// Gathers the process environment; `url` and `token` are the values of
    /// the flags (clap already folds `AVIARY_URL`/`AVIARY_TOKEN` into them).
    pub fn from_process(url: Option<String>, token: Option<String>) -> Self {
        let non_empty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        Self {
            url: url.filter(|s| !s.is_empty()),
            token: token.filter(|s| !s.is_empty()),
            xdg_config_home: non_empty("XDG_CONFIG_HOME").map(PathBuf::from),
            home: non_empty("HOME").map(PathBuf::from),
            aviary_data_dir: non_empty("AVIARY_DATA_DIR").map(PathBuf::from),
            platform_data_dir: directories::ProjectDirs::from("", "", "aviary")
                .map(|d| d.data_dir().to_path_buf()),
        }
    }

    /// The CLI config file path, if a config directory is known.
    pub fn config_file(&self) -> Option<PathBuf> {
        let base = match &self.xdg_config_home {
            Some(x) if x.is_absolute() => x.clone(),
            _ => self.home.as_ref()?.join(".config"),
        };
        Some(base.join("aviary").join("cli.json"))
    }

    /// The server's admin token file path, if a data directory is known.
    pub fn admin_token_file(&self) -> Option<PathBuf> {
        self.aviary_data_dir
            .as_ref()
            .or(self.platform_data_dir.as_ref())
            .map(|d| d.join("admin.token"))
    }
}

/// Where the token in use came from (for error hints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `--token` or `AVIARY_TOKEN`.
    FlagOrEnv,
    /// The CLI config file at this path.
    ConfigFile(PathBuf),
    /// The server's admin token file at this path.
    AdminTokenFile(PathBuf),
    /// No token was found.
    None,
}

/// The resolved server endpoint and credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Base URL, without a trailing slash.
    pub url: String,
    /// Bearer token, if any.
    pub token: Option<String>,
    /// Where the token came from.
    pub token_source: TokenSource,
}

impl Endpoint {
    /// An endpoint with an explicit URL and token.
    pub fn new(url: impl Into<String>, token: Option<String>) -> Self {
        let token_source = if token.is_some() {
            TokenSource::FlagOrEnv
        } else {
            TokenSource::None
        };
        Self {
            url: url.into().trim_end_matches('/').to_string(),
            token,
            token_source,
        }
    }

    /// What to tell the user when the server refuses the token.
    pub fn auth_hint(&self) -> String {
        match &self.token_source {
            TokenSource::FlagOrEnv => {
                "check --token / AVIARY_TOKEN (revoked or mistyped?), or run `aviary token create` with an admin token".into()
            }
            TokenSource::ConfigFile(p) => format!(
                "the token came from {}; set AVIARY_TOKEN or run `aviary token create` and update that file",
                p.display()
            ),
            TokenSource::AdminTokenFile(p) => format!(
                "the token came from {} (is it from another server instance?); set AVIARY_TOKEN or run `aviary token create`",
                p.display()
            ),
            TokenSource::None => "no token was found; set AVIARY_TOKEN (or --token, or \"token\" in ~/.config/aviary/cli.json) or run `aviary token create`".into(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    url: Option<String>,
    token: Option<String>,
}

fn read_config(path: &Path) -> Result<Option<ConfigFile>, CliError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(CliError::Config {
                path: path.to_path_buf(),
                cause: e.to_string(),
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| CliError::Config {
            path: path.to_path_buf(),
            cause: format!(
                "{e} (expected JSON like {{\"url\": \"http://127.0.0.1:9700\", \"token\": \"...\"}})"
            ),
        })
}

/// True when `url` points at this machine (loopback address or `localhost`).
pub fn is_loopback_url(url: &str) -> bool {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return false;
    };
    let Some(host) = parsed.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// Resolves the server URL and token from `env` (see the module docs).
pub fn discover(env: &DiscoveryEnv) -> Result<Endpoint, CliError> {
    let config_path = env.config_file();
    let config = match &config_path {
        Some(p) => read_config(p)?,
        None => None,
    }
    .unwrap_or_default();

    let url = env
        .url
        .clone()
        .or_else(|| config.url.clone().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| DEFAULT_URL.to_string());
    let url = url.trim_end_matches('/').to_string();
    if reqwest::Url::parse(&url).is_err() {
        return Err(CliError::Usage(format!(
            "the server URL `{url}` is not a valid URL; use e.g. --url http://127.0.0.1:9700"
        )));
    }

    if let Some(t) = &env.token {
        return Ok(Endpoint {
            url,
            token: Some(t.clone()),
            token_source: TokenSource::FlagOrEnv,
        });
    }
    if let (Some(t), Some(p)) = (config.token.filter(|t| !t.is_empty()), config_path) {
        return Ok(Endpoint {
            url,
            token: Some(t),
            token_source: TokenSource::ConfigFile(p),
        });
    }
    if is_loopback_url(&url)
        && let Some(p) = env.admin_token_file()
        && let Ok(text) = std::fs::read_to_string(&p)
    {
        let t = text.trim();
        if !t.is_empty() {
            return Ok(Endpoint {
                url,
                token: Some(t.to_string()),
                token_source: TokenSource::AdminTokenFile(p),
            });
        }
    }
    Ok(Endpoint {
        url,
        token: None,
        token_source: TokenSource::None,
    })
}
