//! GitHub webhook signatures: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256>`.
//!
//! The comparison is constant-time (`hmac`'s `verify_slice`).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header GitHub signs webhook deliveries with.
pub const GITHUB_SIGNATURE_HEADER: &str = "X-Hub-Signature-256";

/// Why a webhook signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No signature header.
    #[error(
        "missing X-Hub-Signature-256 header: this webhook requires a GitHub signature \
         (set the webhook secret in GitHub's webhook settings)"
    )]
    Missing,
    /// The header is not `sha256=<64 hex digits>`.
    #[error("malformed X-Hub-Signature-256 header: expected the format \"sha256=<64 hex digits>\"")]
    Malformed,
    /// The signature does not match the body and the configured secret.
    #[error(
        "X-Hub-Signature-256 does not match the request body: check that the webhook \
         secret configured here and in GitHub are the same"
    )]
    Mismatch,
}

fn mac(secret: &[u8], body: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut m = match <Hmac<Sha256> as Mac>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    m.update(body);
    m
}

/// Constant-time check of `X-Hub-Signature-256`
/// (`sha256=<hex HMAC-SHA256(secret, body)>`). The hex digits may be upper
/// or lower case; surrounding whitespace is ignored.
pub fn verify_github_signature(
    secret: &[u8],
    body: &[u8],
    header: Option<&str>,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?.trim();
    if header.is_empty() {
        return Err(SignatureError::Missing);
    }
    let hex_part = header
        .strip_prefix("sha256=")
        .ok_or(SignatureError::Malformed)?;
    if hex_part.len() != 64 {
        return Err(SignatureError::Malformed);
    }
    let expected = hex::decode(hex_part).map_err(|_| SignatureError::Malformed)?;
    mac(secret, body)
        .verify_slice(&expected)
        .map_err(|_| SignatureError::Mismatch)
}

/// The header value GitHub would send: `sha256=<lowercase hex>`.
pub fn github_signature(secret: &[u8], body: &[u8]) -> String {
    format!(
        "sha256={}",
        hex::encode(mac(secret, body).finalize().into_bytes())
    )
}
