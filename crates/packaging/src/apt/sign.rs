//! OpenPGP signing of Release files with rPGP: a v4 Ed25519 key (EdDSA,
//! accepted by gpgv 2.2, apt 2.6 and apt 3.0's sqv), SHA-512 digests.

use pgp::composed::{
    ArmorOptions, CleartextSignedMessage, Deserializable, DetachedSignature, KeyType,
    SecretKeyParamsBuilder, SignedPublicKey, SignedSecretKey,
};
use pgp::crypto::hash::HashAlgorithm;
use pgp::ser::Serialize;
use pgp::types::{KeyDetails, Password};

use super::AptError;

/// A secret signing key.
#[derive(Debug, Clone)]
pub struct SigningKey {
    key: SignedSecretKey,
}

impl SigningKey {
    /// Generates a new v4 Ed25519 key for `user_id` ("Name <mail>").
    pub fn generate(user_id: &str) -> Result<Self, AptError> {
        let mut params = SecretKeyParamsBuilder::default();
        params
            .key_type(KeyType::Ed25519Legacy)
            .can_certify(true)
            .can_sign(true)
            .primary_user_id(user_id.into())
            .preferred_hash_algorithms(
                [HashAlgorithm::Sha512, HashAlgorithm::Sha256]
                    .into_iter()
                    .collect(),
            );
        let params = params.build().map_err(|e| AptError::Pgp {
            action: "key generation",
            reason: e.to_string(),
        })?;
        let key = params
            .generate(rand::thread_rng())
            .map_err(AptError::pgp("key generation"))?;
        Ok(Self { key })
    }

    /// Parses an armored secret key (unprotected: no passphrase).
    pub fn from_armored(armored: &str) -> Result<Self, AptError> {
        let (key, _) =
            SignedSecretKey::from_string(armored).map_err(AptError::pgp("key import"))?;
        key.verify_bindings().map_err(AptError::pgp("key import"))?;
        Ok(Self { key })
    }

    /// The armored secret key (to store it).
    pub fn to_armored(&self) -> Result<String, AptError> {
        self.key
            .to_armored_string(ArmorOptions::default())
            .map_err(AptError::pgp("key export"))
    }

    /// Fingerprint, uppercase hex.
    pub fn fingerprint(&self) -> String {
        hex::encode_upper(self.key.fingerprint().as_bytes())
    }

    /// The public key (certificate).
    fn public(&self) -> SignedPublicKey {
        self.key.to_public_key()
    }

    /// Binary OpenPGP public key, the format of `/etc/apt/keyrings/*.gpg`.
    pub fn public_binary(&self) -> Result<Vec<u8>, AptError> {
        self.public()
            .to_bytes()
            .map_err(AptError::pgp("public key export"))
    }

    /// ASCII-armored public key (`*.asc`).
    pub fn public_armored(&self) -> Result<String, AptError> {
        self.public()
            .to_armored_string(ArmorOptions::default())
            .map_err(AptError::pgp("public key export"))
    }

    /// A cleartext-signed copy of `text` (the InRelease format).
    pub fn clearsign(&self, text: &str) -> Result<String, AptError> {
        let msg = CleartextSignedMessage::sign(
            rand::thread_rng(),
            text,
            &self.key.primary_key,
            &Password::empty(),
        )
        .map_err(AptError::pgp("signing"))?;
        msg.to_armored_string(ArmorOptions::default())
            .map_err(AptError::pgp("signing"))
    }

    /// An armored detached binary signature of `data` (the Release.gpg format).
    pub fn detached(&self, data: &[u8]) -> Result<String, AptError> {
        let sig = DetachedSignature::sign_binary_data(
            rand::thread_rng(),
            &self.key.primary_key,
            &Password::empty(),
            HashAlgorithm::Sha512,
            data,
        )
        .map_err(AptError::pgp("signing"))?;
        sig.to_armored_string(ArmorOptions::default())
            .map_err(AptError::pgp("signing"))
    }
}
