//! Aviary's server: the HTTP API, webhooks, authentication, the rule engine,
//! the durable execution queue and timers, wired together by [`serve`].
//!
//! Entry point: [`serve`] with a [`config::ServerConfig`].

pub mod api;
pub mod auth;
pub mod config;
pub mod consul;
pub mod deploy;
pub mod engine;
pub mod packs;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use aviary_core::secret::SecretKey;
use aviary_core::template::TemplateEngine;
use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::config::{ServerConfig, redact_url};
use crate::engine::Engine;
use crate::packs::{PackLoadError, Registry};

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory is unusable.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// Path.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The secret key file is unusable.
    #[error("secret key file {path}: {message}")]
    SecretKey {
        /// Path.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Storage could not be opened.
    #[error("database {url}: {source}")]
    Store {
        /// Redacted URL.
        url: String,
        /// Cause.
        source: aviary_store::StoreError,
    },
    /// Packs are invalid.
    #[error("packs could not be loaded:\n{0}")]
    Packs(PackLoadError),
    /// The listen address is unusable.
    #[error("cannot listen on {addr}: {source}; is another server running there? (use --listen)")]
    Listen {
        /// Address.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// Reads the secret key of the data directory, creating it on first start.
pub fn load_or_create_secret_key(data_dir: &Path) -> Result<SecretKey, ServerError> {
    let path = data_dir.join("secret.key");
    let err = |message: String| ServerError::SecretKey {
        path: path.clone(),
        message,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => SecretKey::from_base64(text.trim()).map_err(|e| err(format!("{e}; restore the original file (secrets encrypted with it are unreadable without it)"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SecretKey::generate();
            auth::write_private(&path, &format!("{}\n", key.to_base64())).map_err(|e| err(e.to_string()))?;
            Ok(key)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

fn prepare_data_dir(dir: &Path) -> Result<(), ServerError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| ServerError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    let work = dir.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(io)?;
    Ok(())
}

/// Everything a running server holds; built by [`start`].
pub struct Running {
    /// Shared state.
    pub state: AppState,
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// Fires to stop background tasks.
    pub shutdown: CancellationToken,
    listener: tokio::net::TcpListener,
}

/// Opens storage, loads packs, recovers the queue and binds the listener.
pub async fn start(config: ServerConfig) -> Result<Running, ServerError> {
    prepare_data_dir(&config.data_dir)?;
    let secret_key = load_or_create_secret_key(&config.data_dir)?;
    let store = aviary_store::open(&config.database)
        .await
        .map_err(|source| ServerError::Store {
            url: redact_url(&config.database),
            source,
        })?;
    let roots = config.packs.clone();
    let registry = tokio::task::spawn_blocking(move || Registry::load(&roots))
        .await
        .map_err(|e| ServerError::Other(e.to_string()))?
        .map_err(ServerError::Packs)?;
    let overrides = store
        .rule_overrides()
        .await
        .map_err(|source| ServerError::Store {
            url: redact_url(&config.database),
            source,
        })?;
    let abandoned = store
        .recover_node(&config.node, chrono::Utc::now())
        .await
        .map_err(|source| ServerError::Store {
            url: redact_url(&config.database),
            source,
        })?;
    if !abandoned.is_empty() {
        tracing::warn!(
            count = abandoned.len(),
            "executions that were running when the server stopped are marked abandoned"
        );
    }
    if let Some(path) = auth::bootstrap_admin(store.as_ref(), &config.data_dir)
        .await
        .map_err(ServerError::Other)?
    {
        tracing::info!(path = %path.display(), "created the admin token (readable only by this user)");
        eprintln!("aviary: admin token written to {}", path.display());
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServerError::Other(e.to_string()))?;
    tracing::info!(
        %addr,
        backend = store.backend(),
        packs = registry.packs.len(),
        actions = registry.actions.len(),
        rules = registry.rules.len(),
        "aviary server ready"
    );
    let ci = engine::ci::CiState::new(&config);
    let workers = Arc::new(tokio::sync::Semaphore::new(config.workers));
    let engine = Arc::new(Engine {
        store,
        registry: ArcSwap::from_pointee(registry),
        rule_overrides: ArcSwap::from_pointee(overrides),
        templates: TemplateEngine::new(),
        secret_key,
        config,
        queue_notify: tokio::sync::Notify::new(),
        running: std::sync::Mutex::new(Default::default()),
        output: Default::default(),
        registry_changed: tokio::sync::Notify::new(),
        ci,
        deploy: Default::default(),
        workers,
        direct: Default::default(),
    });
    match engine.store.release_orphan_deploy_locks().await {
        Ok(released) => {
            for l in released {
                tracing::warn!(app = %l.app, role = %l.role, holder = %l.holder, "released the deploy lock of an execution that is no longer running");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot release orphan deploy locks"),
    }
    if let Err(e) = engine.deploy.refresh(engine.store.as_ref()).await {
        tracing::warn!(error = %e, "cannot read advertised versions");
    }
    let state = AppState {
        engine,
        tokens: Arc::new(auth::TokenCache::default()),
        reload_lock: Arc::new(tokio::sync::Mutex::new(())),
    };
    Ok(Running {
        state,
        addr,
        shutdown: CancellationToken::new(),
        listener,
    })
}

impl Running {
    /// Serves until SIGINT/SIGTERM or `shutdown` fires.
    pub async fn serve(self) -> Result<(), ServerError> {
        let engine = self.state.engine.clone();
        let shutdown = self.shutdown.clone();
        let scheduler = tokio::spawn(engine::scheduler::run_scheduler(
            engine.clone(),
            shutdown.clone(),
        ));
        let timers = tokio::spawn(engine::timers::run_timers(engine.clone(), shutdown.clone()));
        let purge = tokio::spawn(purge_expired(engine.clone(), shutdown.clone()));
        let retention = tokio::spawn(engine::ci::run_retention(engine.clone(), shutdown.clone()));
        let versions = tokio::spawn(deploy::run_refresh(engine.clone(), shutdown.clone()));
        let consul = tokio::spawn(consul::run(engine.clone(), shutdown.clone()));
        let app = api::router(self.state.clone());
        let signal_token = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signal_token.cancel();
        });
        let stop = shutdown.clone();
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
            .map_err(|e| ServerError::Other(e.to_string()))?;
        shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = scheduler.await;
            let _ = timers.await;
            let _ = purge.await;
            let _ = retention.await;
            let _ = versions.await;
            let _ = consul.await;
        })
        .await;
        Ok(())
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn purge_expired(engine: Arc<Engine>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        if let Err(e) = engine.store.purge_expired_kv(chrono::Utc::now()).await {
            tracing::warn!(error = %e, "cannot purge expired datastore keys");
        }
    }
}

/// Starts and serves: the `aviary server` command.
pub async fn serve(config: ServerConfig) -> Result<(), ServerError> {
    start(config).await?.serve().await
}
