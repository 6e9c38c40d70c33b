//! GitHub webhook signature tests: valid, missing, malformed, wrong.

#![allow(clippy::unwrap_used)]

use aviary_core::signature::{SignatureError, github_signature, verify_github_signature};

const SECRET: &[u8] = b"It's a Secret to Everybody";
const BODY: &[u8] = b"Hello, World!";

#[test]
fn github_documented_example() {
    // Test vector from GitHub's "Validating webhook deliveries" docs.
    let sig = github_signature(SECRET, BODY);
    assert_eq!(
        sig,
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    );
    verify_github_signature(SECRET, BODY, Some(&sig)).unwrap();
    verify_github_signature(
        SECRET,
        BODY,
        Some(&sig.to_uppercase().replace("SHA256=", "sha256=")),
    )
    .unwrap();
    verify_github_signature(SECRET, BODY, Some(&format!("  {sig} "))).unwrap();
}

#[test]
fn refusals() {
    let good = github_signature(SECRET, BODY);
    let cases: Vec<(Option<String>, SignatureError)> = vec![
        (None, SignatureError::Missing),
        (Some(String::new()), SignatureError::Missing),
        (
            Some(good.trim_start_matches("sha256=").to_string()),
            SignatureError::Malformed,
        ),
        (
            Some(good.replace("sha256=", "sha1=")),
            SignatureError::Malformed,
        ),
        (Some("sha256=zz".to_string()), SignatureError::Malformed),
        (Some(format!("{good}00")), SignatureError::Malformed),
        (
            Some(format!("sha256={}", "g".repeat(64))),
            SignatureError::Malformed,
        ),
        (
            Some(github_signature(b"other secret", BODY)),
            SignatureError::Mismatch,
        ),
        (
            Some(github_signature(SECRET, b"Hello, World?")),
            SignatureError::Mismatch,
        ),
    ];
    for (header, expected) in cases {
        assert_eq!(
            verify_github_signature(SECRET, BODY, header.as_deref()),
            Err(expected),
            "{header:?}"
        );
    }
    let msg = SignatureError::Malformed.to_string();
    assert!(
        msg.contains("X-Hub-Signature-256") && msg.contains("sha256=<"),
        "{msg}"
    );
    assert!(
        SignatureError::Missing
            .to_string()
            .contains("X-Hub-Signature-256")
    );
}

#[test]
fn empty_secret_and_body_still_work() {
    let sig = github_signature(b"", b"");
    verify_github_signature(b"", b"", Some(&sig)).unwrap();
    assert_eq!(
        verify_github_signature(b"x", b"", Some(&sig)),
        Err(SignatureError::Mismatch)
    );
}
