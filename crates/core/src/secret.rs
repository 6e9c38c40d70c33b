//! Secrets at rest: AES-256-GCM encryption of datastore values and secret
//! action parameters, and masking of secret values in text.
//!
//! Ciphertext format: `v1:` + base64(12-byte random nonce || ciphertext+tag).
//! Nonces come from the OS random number generator.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;
use rand::rngs::OsRng;

use crate::model::MASK;

const PREFIX: &str = "v1:";
const NONCE_LEN: usize = 12;

/// Why a key could not be loaded or a value decrypted. Messages never
/// contain key material or plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// The key text is not base64 of exactly 32 bytes.
    #[error(
        "invalid encryption key: expected base64 of 32 bytes (generate one with `aviary key generate`), {0}"
    )]
    BadKey(String),
    /// The ciphertext is not in the `v1:<base64>` format.
    #[error("invalid encrypted value: {0}; expected \"v1:<base64>\" as written by Aviary")]
    Malformed(String),
    /// Authentication failed: wrong key, or the value was altered.
    #[error(
        "cannot decrypt value: it was encrypted with another key or has been altered \
         (check the configured encryption key)"
    )]
    Decrypt,
}

/// A 256-bit AES-GCM key. `Debug` does not print the key.
#[derive(Clone)]
pub struct SecretKey([u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl SecretKey {
    /// A new random key from the OS RNG.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        OsRng.fill_bytes(&mut k);
        Self(k)
    }

    /// Loads a key from standard base64 (surrounding whitespace ignored).
    pub fn from_base64(s: &str) -> Result<Self, SecretError> {
        let bytes = STANDARD
            .decode(s.trim())
            .map_err(|e| SecretError::BadKey(format!("not base64 ({e})")))?;
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| SecretError::BadKey(format!("got {} bytes", bytes.len())))?;
        Ok(Self(arr))
    }

    /// The key as standard base64.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&self.0))
    }

    /// Encrypts with a fresh random nonce: `"v1:" + base64(nonce || ciphertext)`.
    pub fn encrypt(&self, plaintext: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let ct = match self
            .cipher()
            .encrypt(Nonce::from_slice(&nonce), plaintext.as_bytes())
        {
            Ok(ct) => ct,
            // AES-GCM encryption only fails for inputs beyond 64 GiB.
            Err(_) => unreachable!("AES-GCM encryption of an in-memory string"),
        };
        let mut buf = Vec::with_capacity(NONCE_LEN + ct.len());
        buf.extend_from_slice(&nonce);
        buf.extend_from_slice(&ct);
        format!("{PREFIX}{}", STANDARD.encode(buf))
    }

    /// A keyed MAC (HMAC-SHA256, hex) of `data` for `purpose`: what a
    /// credential derived from this key (an execution's API token) carries,
    /// so that it can be checked without storing it.
    pub fn mac(&self, purpose: &str, data: &str) -> String {
        use hmac::Mac;
        let mut mac = match <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(&self.0) {
            Ok(m) => m,
            // HMAC takes keys of any length.
            Err(_) => unreachable!("HMAC-SHA256 accepts a 32-byte key"),
        };
        mac.update(purpose.as_bytes());
        mac.update(&[0]);
        mac.update(data.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `tag` is [`Self::mac`] of `data` for `purpose` (constant time).
    pub fn verify_mac(&self, purpose: &str, data: &str, tag: &str) -> bool {
        use hmac::Mac;
        let Ok(tag) = hex::decode(tag) else {
            return false;
        };
        let Ok(mut mac) = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(&self.0) else {
            return false;
        };
        mac.update(purpose.as_bytes());
        mac.update(&[0]);
        mac.update(data.as_bytes());
        mac.verify_slice(&tag).is_ok()
    }

    /// Decrypts what [`Self::encrypt`] wrote; a wrong key or any tampering
    /// is an error.
    pub fn decrypt(&self, ciphertext: &str) -> Result<String, SecretError> {
        let b64 = ciphertext
            .trim()
            .strip_prefix(PREFIX)
            .ok_or_else(|| SecretError::Malformed("missing the \"v1:\" prefix".into()))?;
        let raw = STANDARD
            .decode(b64)
            .map_err(|e| SecretError::Malformed(format!("not base64 ({e})")))?;
        if raw.len() < NONCE_LEN + 16 {
            return Err(SecretError::Malformed("too short".into()));
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let plain = self
            .cipher()
            .decrypt(Nonce::from_slice(nonce), ct)
            .map_err(|_| SecretError::Decrypt)?;
        String::from_utf8(plain).map_err(|_| SecretError::Decrypt)
    }
}

/// Replaces every occurrence of each secret (non-empty, however short) in
/// `text` with [`MASK`]. Longer secrets are replaced first so that a secret
/// containing another is masked whole.
pub fn mask(text: &str, secrets: &[String]) -> String {
    let mut sorted: Vec<&str> = secrets
        .iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    if sorted.is_empty() {
        return text.to_string();
    }
    sorted.sort_by_key(|s| std::cmp::Reverse(s.len()));
    sorted.dedup();
    // Single left-to-right pass: at each position take the longest secret
    // that matches, so masks never overlap or get re-masked.
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'outer: while !rest.is_empty() {
        for s in &sorted {
            if rest.starts_with(s) {
                out.push_str(MASK);
                rest = &rest[s.len()..];
                continue 'outer;
            }
        }
        let mut chars = rest.chars();
        if let Some(c) = chars.next() {
            out.push(c);
        }
        rest = chars.as_str();
    }
    out
}
