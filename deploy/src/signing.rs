//! Bundle signatures (ed25519, `ed25519-dalek`): who blessed a bundle, on top of the digest that
//! only says it is whole. `mangrove cache keygen` writes a signing key (32-byte seed, hex) and its
//! public key (`.pub`, hex); `cache bless --sign-key` signs the manifest bytes into
//! `manifest.sig`; `--trusted-key` on `cache verify`, `cache import` and `serve --blessed` refuses
//! a bundle that is unsigned or not signed by one of the trusted keys.

use std::path::{Path, PathBuf};

pub use ed25519_dalek::{SigningKey, VerifyingKey};
use ed25519_dalek::{Signature, Signer, Verifier};

/// What is signed: a domain tag, then the manifest bytes exactly as stored.
const DOMAIN: &[u8] = b"mangrove blessed bundle manifest v2\n";

/// Errors of reading or writing keys, each naming the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("key file {}: {reason}", .path.display())]
    Format { path: PathBuf, reason: String },
    #[error("{} exists; refusing to overwrite a key", .0.display())]
    Exists(PathBuf),
}

fn read_hex32(path: &Path) -> Result<[u8; 32], KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io { path: path.into(), source })?;
    let h = blake3::Hash::from_hex(text.trim())
        .map_err(|_| KeyError::Format { path: path.into(), reason: "expected 64 hex digits (32 bytes)".into() })?;
    Ok(*h.as_bytes())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a signing key (the `cache keygen` secret file).
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    Ok(SigningKey::from_bytes(&read_hex32(path)?))
}

/// Reads a trusted public key (a `.pub` file).
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    VerifyingKey::from_bytes(&read_hex32(path)?).map_err(|e| KeyError::Format { path: path.into(), reason: format!("not an ed25519 public key: {e}") })
}

/// Writes a fresh signing key to `out` (mode 0600) and its public key to `out.pub`; returns the
/// public key's path.
pub fn generate(out: &Path) -> Result<PathBuf, KeyError> {
    let public = PathBuf::from(format!("{}.pub", out.display()));
    for p in [out, &public] {
        if p.exists() {
            return Err(KeyError::Exists(p.to_path_buf()));
        }
    }
    let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KeyError::Io { path, source }
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(out).map_err(io(out))?;
    std::io::Write::write_all(&mut f, (hex(key.as_bytes()) + "\n").as_bytes()).map_err(io(out))?;
    std::fs::write(&public, hex(key.verifying_key().as_bytes()) + "\n").map_err(io(&public))?;
    Ok(public)
}

/// The signature file's text for `manifest` (hex, one line).
pub fn sign(key: &SigningKey, manifest: &[u8]) -> String {
    hex(&key.sign(&[DOMAIN, manifest].concat()).to_bytes()) + "\n"
}

/// Checks the signature file's text against `manifest` and the `trusted` keys; says what is
/// wrong otherwise.
pub fn check(sig_text: &str, manifest: &[u8], trusted: &[VerifyingKey]) -> Result<(), String> {
    let t = sig_text.trim();
    let malformed = || "not a hex ed25519 signature (128 hex digits)".to_string();
    if t.len() != 128 || !t.is_ascii() {
        return Err(malformed());
    }
    let bytes: Vec<u8> = (0..64).map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16)).collect::<Result<_, _>>().map_err(|_| malformed())?;
    let sig = Signature::from_bytes(&bytes.try_into().map_err(|_| malformed())?);
    let signed = [DOMAIN, manifest].concat();
    if trusted.iter().any(|k| k.verify(&signed, &sig).is_ok()) {
        Ok(())
    } else {
        Err(format!("the signature does not verify under any of the {} trusted key(s)", trusted.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_then_check_and_tampering_fails() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        let public = generate(&k).unwrap();
        assert!(matches!(generate(&k), Err(KeyError::Exists(_))));
        let (sk, pk) = (load_signing_key(&k).unwrap(), load_verifying_key(&public).unwrap());
        let sig = sign(&sk, b"manifest");
        assert_eq!(check(&sig, b"manifest", &[pk]), Ok(()));
        assert!(check(&sig, b"manifest!", &[pk]).is_err());
        let other = SigningKey::from_bytes(&[7; 32]).verifying_key();
        assert!(check(&sig, b"manifest", &[other]).unwrap_err().contains("trusted"));
        assert!(check("zz", b"manifest", &[pk]).is_err());
    }
}
