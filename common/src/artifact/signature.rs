//! Artifact signatures: CI signs, agents check, nobody in between can
//! forge one. ed25519 (ed25519-dalek, with its PKCS#8 PEM key files).
//!
//! Rules:
//! 1. What is signed binds the service to the bytes:
//!    `drover-artifact-v1\n<service>\n<sha256>` (a signature for another
//!    service's artifact is worthless here).
//! 2. A key is named by its id, the first 16 hex digits of the sha256 of
//!    its 32-byte public key; signatures carry it.
//! 3. An agent with trusted signers accepts an artifact only with a valid
//!    signature from one of them; without trusted signers it checks nothing
//!    (and says so at start).
//! 4. A signature may also name the artifact's chunk index
//!    (`drover-artifact-v2\n<service>\n<sha256>\n<index sha256>`): an
//!    agent that pulls by chunks never sees the tar.gz, so it needs the
//!    signer's word for the index too; it accepts only such a signature
//!    for a chunked pull (and fetches the whole file otherwise).

use std::path::Path;

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest as _, Sha256};

use crate::proto::ArtifactSignature;

#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("{path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error(
        "artifact {digest} of service {service} has no valid signature from a trusted signer ({detail})"
    )]
    Untrusted {
        service: String,
        digest: String,
        detail: String,
    },
}

/// Rule 1.
pub fn signed_message(service: &str, sha256: &str) -> Vec<u8> {
    format!("drover-artifact-v1\n{service}\n{sha256}").into_bytes()
}

/// Rule 4: what a signature that also vouches for the chunk index signs.
pub fn signed_message_with_index(service: &str, sha256: &str, index_sha256: &str) -> Vec<u8> {
    format!("drover-artifact-v2\n{service}\n{sha256}\n{index_sha256}").into_bytes()
}

/// What `sig` is a signature of (v1, or v2 when it names an index).
fn message_of(service: &str, sha256: &str, sig: &ArtifactSignature) -> Vec<u8> {
    match sig.index_sha256.as_str() {
        "" => signed_message(service, sha256),
        index => signed_message_with_index(service, sha256, index),
    }
}

/// Rule 2.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

fn key_err(path: &Path, e: impl ToString) -> SignatureError {
    SignatureError::KeyFile {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// A CI signing key.
pub struct SigningIdentity {
    key: SigningKey,
}

impl SigningIdentity {
    /// A new key from the system's random source.
    pub fn generate() -> SigningIdentity {
        let mut seed = [0u8; 32];
        rustls::crypto::ring::default_provider()
            .secure_random
            .fill(&mut seed)
            .expect("system random");
        SigningIdentity {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// Reads a PKCS#8 PEM private key.
    pub fn load(path: &Path) -> Result<SigningIdentity, SignatureError> {
        let pem = std::fs::read_to_string(path).map_err(|e| key_err(path, e))?;
        let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| key_err(path, e))?;
        Ok(SigningIdentity { key })
    }

    /// The private key (PKCS#8 PEM) and the public key (SPKI PEM).
    pub fn to_pem(&self) -> (String, String) {
        let private = self
            .key
            .to_pkcs8_pem(Default::default())
            .expect("encoding an ed25519 key")
            .to_string();
        let public = self
            .key
            .verifying_key()
            .to_public_key_pem(Default::default())
            .expect("encoding an ed25519 public key");
        (private, public)
    }

    pub fn key_id(&self) -> String {
        key_id(&self.key.verifying_key())
    }

    pub fn sign(&self, service: &str, sha256: &str) -> ArtifactSignature {
        let sig = self.key.sign(&signed_message(service, sha256));
        ArtifactSignature {
            key_id: self.key_id(),
            signature: sig.to_bytes().to_vec(),
            index_sha256: String::new(),
        }
    }

    /// Rule 4: a signature over the artifact and its chunk index.
    pub fn sign_with_index(
        &self,
        service: &str,
        sha256: &str,
        index_sha256: &str,
    ) -> ArtifactSignature {
        let sig = self
            .key
            .sign(&signed_message_with_index(service, sha256, index_sha256));
        ArtifactSignature {
            key_id: self.key_id(),
            signature: sig.to_bytes().to_vec(),
            index_sha256: index_sha256.to_string(),
        }
    }
}

/// The public keys an agent trusts.
#[derive(Debug, Clone, Default)]
pub struct TrustedSigners {
    keys: Vec<(String, VerifyingKey)>,
}

impl TrustedSigners {
    /// Reads SPKI PEM public keys.
    pub fn load(paths: &[impl AsRef<Path>]) -> Result<TrustedSigners, SignatureError> {
        let mut keys = Vec::new();
        for path in paths {
            let path = path.as_ref();
            let pem = std::fs::read_to_string(path).map_err(|e| key_err(path, e))?;
            let key = VerifyingKey::from_public_key_pem(&pem).map_err(|e| key_err(path, e))?;
            keys.push((key_id(&key), key));
        }
        Ok(TrustedSigners { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(|(id, _)| id.clone()).collect()
    }

    /// Rule 3: the id of the trusted key that signed, or why none did.
    pub fn verify(
        &self,
        service: &str,
        sha256: &str,
        signatures: &[ArtifactSignature],
    ) -> Result<String, SignatureError> {
        self.verify_for(service, sha256, None, signatures)
    }

    /// Rules 3 and 4: with `index`, only a signature over that chunk index
    /// counts.
    pub fn verify_for(
        &self,
        service: &str,
        sha256: &str,
        index: Option<&str>,
        signatures: &[ArtifactSignature],
    ) -> Result<String, SignatureError> {
        let mut detail = Vec::new();
        for sig in signatures {
            if let Some(index) = index
                && sig.index_sha256 != index
            {
                detail.push(format!(
                    "key {}: the signature does not cover chunk index {index}",
                    sig.key_id
                ));
                continue;
            }
            let message = message_of(service, sha256, sig);
            let Some((id, key)) = self.keys.iter().find(|(id, _)| *id == sig.key_id) else {
                detail.push(format!("key {} is not trusted", sig.key_id));
                continue;
            };
            let Ok(signature) = Signature::from_slice(&sig.signature) else {
                detail.push(format!("key {id}: not a 64-byte signature"));
                continue;
            };
            match key.verify(&message, &signature) {
                Ok(()) => return Ok(id.clone()),
                Err(_) => detail.push(format!("key {id}: the signature does not verify")),
            }
        }
        if signatures.is_empty() {
            detail.push("it carries no signature".into());
        }
        Err(SignatureError::Untrusted {
            service: service.to_string(),
            digest: sha256.to_string(),
            detail: detail.join("; "),
        })
    }
}

/// Checks a signature's shape (the origin stores only well-formed ones).
pub fn validate_shape(sig: &ArtifactSignature) -> Result<(), String> {
    if sig.key_id.len() != 16 || !sig.key_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("key_id {:?} is not 16 hex digits", sig.key_id));
    }
    if sig.signature.len() != 64 {
        return Err(format!(
            "an ed25519 signature is 64 bytes, got {}",
            sig.signature.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_for_the_signed_service_and_digest_and_trusted_keys() {
        let dir = tempfile::tempdir().unwrap();
        let ci = SigningIdentity::generate();
        let (private, public) = ci.to_pem();
        std::fs::write(dir.path().join("ci.key"), &private).unwrap();
        std::fs::write(dir.path().join("ci.pub"), &public).unwrap();
        let loaded = SigningIdentity::load(&dir.path().join("ci.key")).unwrap();
        assert_eq!(loaded.key_id(), ci.key_id());
        let trusted = TrustedSigners::load(&[dir.path().join("ci.pub")]).unwrap();
        let digest = "a".repeat(64);
        let sig = ci.sign("hello", &digest);
        assert!(validate_shape(&sig).is_ok());
        assert_eq!(
            trusted
                .verify("hello", &digest, std::slice::from_ref(&sig))
                .unwrap(),
            ci.key_id()
        );
        // Another service, another digest, another key, no signature, junk.
        assert!(
            trusted
                .verify("other", &digest, std::slice::from_ref(&sig))
                .is_err()
        );
        assert!(
            trusted
                .verify("hello", &"b".repeat(64), std::slice::from_ref(&sig))
                .is_err()
        );
        let rogue = SigningIdentity::generate().sign("hello", &digest);
        let err = trusted
            .verify("hello", &digest, &[rogue])
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not trusted"), "{err}");
        let err = trusted
            .verify("hello", &digest, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("carries no signature"), "{err}");
        let mut forged = sig.clone();
        forged.signature[0] ^= 1;
        let err = trusted
            .verify("hello", &digest, &[forged])
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not verify"), "{err}");
        // Rule 4: a v1 signature does not cover an index; a v2 one does,
        // only for its own index, and still vouches for the whole file.
        let index = "c".repeat(64);
        let v2 = ci.sign_with_index("hello", &digest, &index);
        let v1 = std::slice::from_ref(&sig);
        assert!(
            trusted
                .verify_for("hello", &digest, Some(&index), v1)
                .is_err()
        );
        let both = [sig.clone(), v2.clone()];
        assert_eq!(
            trusted
                .verify_for("hello", &digest, Some(&index), &both)
                .unwrap(),
            ci.key_id()
        );
        assert!(
            trusted
                .verify_for("hello", &digest, Some(&"d".repeat(64)), &both)
                .is_err()
        );
        assert!(
            trusted
                .verify("hello", &digest, std::slice::from_ref(&v2))
                .is_ok()
        );
        let mut moved = v2;
        moved.index_sha256 = "d".repeat(64);
        assert!(trusted.verify("hello", &digest, &[moved]).is_err());
    }
}
