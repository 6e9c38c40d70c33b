//! Secret encryption and masking tests: roundtrip, tampering, wrong key,
//! key loading, and masking of short and overlapping secrets.

#![allow(clippy::unwrap_used)]

use aviary_core::model::MASK;
use aviary_core::secret::{SecretError, SecretKey, mask};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

#[test]
fn roundtrip_and_fresh_nonces() {
    let key = SecretKey::generate();
    for plain in ["", "hunter2", "ünïcödé 🔑", &"x".repeat(10_000)] {
        let ct = key.encrypt(plain);
        assert!(ct.starts_with("v1:"));
        if !plain.is_empty() {
            assert!(!ct.contains(plain));
        }
        assert_eq!(key.decrypt(&ct).unwrap(), plain);
    }
    assert_ne!(key.encrypt("same"), key.encrypt("same"));
}

#[test]
fn key_base64_roundtrip_and_debug_redacted() {
    let key = SecretKey::generate();
    let b64 = key.to_base64();
    let again = SecretKey::from_base64(&format!(" {b64}\n")).unwrap();
    assert_eq!(again.decrypt(&key.encrypt("v")).unwrap(), "v");
    let dbg = format!("{key:?}");
    assert!(!dbg.contains(&b64) && dbg.contains("redacted"), "{dbg}");
    assert!(matches!(
        SecretKey::from_base64("not base64!"),
        Err(SecretError::BadKey(_))
    ));
    assert!(matches!(
        SecretKey::from_base64(&STANDARD.encode([0u8; 16])),
        Err(SecretError::BadKey(_))
    ));
}

#[test]
fn tampering_and_wrong_key_fail() {
    let key = SecretKey::generate();
    let ct = key.encrypt("deploy-token-123");
    let raw = STANDARD.decode(&ct[3..]).unwrap();
    for i in [0, 11, 12, raw.len() - 1] {
        let mut bad = raw.clone();
        bad[i] ^= 0x01;
        let bad = format!("v1:{}", STANDARD.encode(&bad));
        assert_eq!(key.decrypt(&bad), Err(SecretError::Decrypt), "byte {i}");
    }
    assert_eq!(
        SecretKey::generate().decrypt(&ct),
        Err(SecretError::Decrypt)
    );
    assert!(matches!(
        key.decrypt("plaintext"),
        Err(SecretError::Malformed(_))
    ));
    assert!(matches!(
        key.decrypt("v1:%%%"),
        Err(SecretError::Malformed(_))
    ));
    assert!(matches!(
        key.decrypt("v1:AAAA"),
        Err(SecretError::Malformed(_))
    ));
    let truncated = format!("v1:{}", STANDARD.encode(&raw[..raw.len() - 1]));
    assert_eq!(key.decrypt(&truncated), Err(SecretError::Decrypt));
}

#[test]
fn masking() {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        mask("token=abc123 again abc123", &s(&["abc123"])),
        format!("token={MASK} again {MASK}")
    );
    // Short secrets are masked too, however short.
    assert_eq!(mask("a-b-a", &s(&["a"])), format!("{MASK}-b-{MASK}"));
    // Overlapping secrets: the longer one is masked whole.
    assert_eq!(
        mask("pw=secretvalue", &s(&["secret", "secretvalue"])),
        format!("pw={MASK}")
    );
    // Empty secrets are ignored; the mask itself is not re-masked.
    assert_eq!(mask("nothing here", &s(&["", "zzz"])), "nothing here");
    assert_eq!(mask("***", &s(&["*"])), MASK.repeat(3));
    assert_eq!(mask("ünï ü", &s(&["ü"])), format!("{MASK}nï {MASK}"));
    assert_eq!(mask("", &s(&["x"])), "");
}
