//! `GET /apt/...`: the APT repository under `<data dir>/apt`, served
//! read-only without a token (apt verifies the signature instead).
//! Nothing outside the repository is reachable, and hidden paths (the
//! private `.aviary-state/` with the signing key) are never served.

use std::path::{Component, Path, PathBuf};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;

/// The repository folder of a data dir.
pub fn repo_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("apt")
}

/// The file a URL path names, if it is a safe path inside `root`.
fn resolve(root: &Path, url_path: &str) -> Option<PathBuf> {
    let rel = Path::new(url_path.trim_start_matches('/'));
    let mut out = root.to_path_buf();
    for c in rel.components() {
        match c {
            Component::Normal(part) => {
                if part.to_string_lossy().starts_with('.') {
                    return None;
                }
                out.push(part);
            }
            _ => return None,
        }
    }
    Some(out)
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("deb") => "application/vnd.debian.binary-package",
        Some("gz") => "application/gzip",
        Some("xz") => "application/x-xz",
        Some("gpg") => "application/pgp-signature",
        _ => "text/plain; charset=utf-8",
    }
}

/// The URL path (under `/apt/`) of the repository's public signing key, in
/// the binary format `signed-by=` takes.
pub const KEY_PATH: &str = "aviary-archive-keyring.gpg";

/// `GET /apt/{*path}`.
pub async fn serve(State(state): State<AppState>, UrlPath(path): UrlPath<String>) -> Response {
    let root = repo_dir(&state.engine.config.data_dir);
    if path.trim_start_matches('/') == KEY_PATH {
        return public_key(root).await;
    }
    let Some(file) = resolve(&root, &path) else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    // Links must not lead out of the repository.
    let (Ok(real), Ok(real_root)) = (
        tokio::fs::canonicalize(&file).await,
        tokio::fs::canonicalize(&root).await,
    ) else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    if !real.starts_with(&real_root) {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    }
    match tokio::fs::File::open(&real).await {
        Ok(f) => match f.metadata().await {
            Ok(meta) if meta.is_file() => {
                let body = Body::from_stream(tokio_util::io::ReaderStream::new(f));
                (
                    [
                        (header::CONTENT_TYPE, content_type(&real).to_string()),
                        (header::CONTENT_LENGTH, meta.len().to_string()),
                    ],
                    body,
                )
                    .into_response()
            }
            _ => (StatusCode::NOT_FOUND, "not found\n").into_response(),
        },
        Err(_) => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}

/// The public key of the repository (created with the repository if there
/// is none yet), so agents can configure `signed-by=`.
async fn public_key(root: PathBuf) -> Response {
    let key = tokio::task::spawn_blocking(move || {
        aviary_packaging::apt::Repository::open_or_create(&root, Default::default())
            .and_then(|r| r.export_public_key())
    })
    .await;
    match key {
        Ok(Ok(bytes)) => (
            [(header::CONTENT_TYPE, "application/pgp-keys")],
            Body::from(bytes),
        )
            .into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot export the APT repository's public key");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the APT repository key is unavailable; see the server log\n",
            )
                .into_response()
        }
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "key export failed\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::resolve;
    use std::path::Path;

    #[test]
    fn only_safe_paths_inside_the_root() {
        let root = Path::new("/r");
        assert_eq!(
            resolve(root, "dists/stable/InRelease"),
            Some("/r/dists/stable/InRelease".into())
        );
        assert_eq!(resolve(root, "../etc/passwd"), None);
        assert_eq!(resolve(root, ".aviary-state/signing-key.asc"), None);
        assert_eq!(resolve(root, "pool/../.aviary-state/x"), None);
        assert_eq!(resolve(root, "/abs"), Some("/r/abs".into()));
    }
}
