//! The box's key store: the identity key and the sealed secrets, as files
//! in `tpm.key_dir` (mode 0700), each usable only with the TPM that made it.
//!
//! | file | what |
//! |---|---|
//! | `identity.tpm` | the device identity key (TPM-encrypted private part, public part) |
//! | `wireguard.sealed` | the tunnel's private key, sealed |
//! | `spool.sealed` | the spool's data key, sealed |
//! | `identity.pub.pem`, `identity.csr.pem` | for the reading center (public) |
//!
//! The **software** backend (`tpm.backend = "software"`) is for development
//! and CI machines without a TPM: the same files hold the keys themselves,
//! protected by nothing but their mode (0600). kakehashid warns about it at
//! every start and in `status`.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kakehashi_config::{KeyBackend, TpmConfig};
use zeroize::Zeroizing;

use crate::{csr, sha256, EcPoint, KeyBlob, Tpm, TpmError};

pub const IDENTITY: &str = "identity.tpm";
pub const WIREGUARD: &str = "wireguard.sealed";
pub const SPOOL: &str = "spool.sealed";

/// What the reading center needs to enroll the box.
#[derive(Debug, Clone)]
pub struct Enrollment {
    pub serial: String,
    pub identity_pem: String,
    pub csr_pem: String,
}

/// What `provision` did with each key.
#[derive(Debug, Clone, Default)]
pub struct Provisioned {
    pub created: Vec<&'static str>,
    pub kept: Vec<&'static str>,
    /// Keys that existed and were replaced, with why.
    pub replaced: Vec<(&'static str, String)>,
}

/// Which existing keys [`KeyStore::provision`] may replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// None: a key that exists but does not load is an error.
    Nothing,
    /// Keys that no longer load on this TPM (reset, replaced, PCRs changed,
    /// damaged); keys that load are kept. `provision --force`.
    Unloadable,
    /// Every key, also those that load (a suspected compromise).
    /// `provision --rotate`; the caller makes sure nothing sealed with the
    /// spool key is still spooled.
    All,
}

#[derive(Debug)]
enum Backend {
    Tpm(Tpm),
    Software,
}

#[derive(Debug)]
pub struct KeyStore {
    backend: Backend,
    dir: PathBuf,
    /// PCRs new sealed keys are bound to (from `tpm.pcrs`).
    pcrs: Vec<u8>,
}

/// Said at every start and in `status` when keys are in files.
pub const SOFTWARE_WARNING: &str = "software key store: the box's keys are files protected only by their mode, not by a TPM; for development and CI, never for patient data";

fn urandom(n: usize) -> Result<Zeroizing<Vec<u8>>, TpmError> {
    use std::io::Read as _;
    let mut out = Zeroizing::new(vec![0u8; n]);
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut out))
        .map_err(|e| blob_error(Path::new("/dev/urandom"), e))?;
    Ok(out)
}

fn software_identity(bytes: &[u8], path: &Path) -> Result<p256::ecdsa::SigningKey, TpmError> {
    p256::ecdsa::SigningKey::from_slice(bytes)
        .map_err(|_| blob_error(path, "not a P-256 private key (damaged?)"))
}

fn blob_error(path: &Path, e: impl std::fmt::Display) -> TpmError {
    TpmError::Blob {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Writes a file atomically with `mode`.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TpmError> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| blob_error(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| blob_error(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| blob_error(path, e))
}

/// "KKH-" and the first 12 hex digits of SHA-256 of the identity's public key.
pub fn serial_of(point: &EcPoint) -> String {
    let h = sha256(point);
    let hex: String = h[..6].iter().map(|b| format!("{b:02X}")).collect();
    format!("KKH-{hex}")
}

impl KeyStore {
    /// Opens the TPM named in `[tpm]`.
    pub fn open(config: &TpmConfig) -> Result<KeyStore, TpmError> {
        let backend = match &config.backend {
            KeyBackend::Tpm { tcti } => Backend::Tpm(Tpm::open(tcti)?),
            KeyBackend::Software => Backend::Software,
        };
        Ok(KeyStore {
            backend,
            dir: config.key_dir.clone(),
            pcrs: config.pcrs.clone(),
        })
    }

    pub fn is_software(&self) -> bool {
        matches!(self.backend, Backend::Software)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn tcti(&self) -> &str {
        match &self.backend {
            Backend::Tpm(t) => t.tcti(),
            Backend::Software => "software",
        }
    }

    fn read_raw(&self, name: &str) -> Result<Zeroizing<Vec<u8>>, TpmError> {
        let path = self.path(name);
        std::fs::read(&path)
            .map(Zeroizing::new)
            .map_err(|e| blob_error(&path, e))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn blob(&self, name: &str) -> Result<KeyBlob, TpmError> {
        KeyBlob::read(&self.path(name))
    }

    /// Creates what is missing and, as `replace` allows, replaces what
    /// exists (see [`Replace`]). Whether a key "loads" is tested for real:
    /// the identity signs, a sealed key unseals.
    pub fn provision(&mut self, replace: Replace) -> Result<Provisioned, TpmError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| blob_error(&self.dir, e))?;
        let mut done = Provisioned::default();
        for name in [IDENTITY, WIREGUARD, SPOOL] {
            let path = self.path(name);
            if path.exists() {
                match (self.check_one(name), replace) {
                    (Ok(()), Replace::All) => done
                        .replaced
                        .push((name, "rotated (it still loaded)".into())),
                    (Ok(()), _) => {
                        done.kept.push(name);
                        continue;
                    }
                    (Err(e), Replace::Nothing) => return Err(e),
                    // Only a key this TPM can never load again is replaced:
                    // a locked-out, unreachable or failing TPM may answer
                    // tomorrow, and replacing the spool key loses the spool.
                    (
                        Err(
                            e @ (TpmError::Lockout { .. }
                            | TpmError::Unreachable { .. }
                            | TpmError::Command { .. }),
                        ),
                        _,
                    ) => return Err(e),
                    (Err(e), _) => done.replaced.push((name, e.to_string())),
                }
            }
            let bytes = match &mut self.backend {
                Backend::Tpm(tpm) if name == IDENTITY => tpm.create_identity()?.encode(),
                Backend::Tpm(tpm) => {
                    let secret = tpm.random(32)?;
                    tpm.seal(&secret, &self.pcrs)?.encode()
                }
                Backend::Software if name == IDENTITY => loop {
                    // A uniformly random 32-byte string is a valid scalar
                    // with overwhelming probability; retry otherwise.
                    let candidate = urandom(32)?;
                    if p256::ecdsa::SigningKey::from_slice(&candidate).is_ok() {
                        break candidate.to_vec();
                    }
                },
                Backend::Software => urandom(32)?.to_vec(),
            };
            write_file(&path, &bytes, 0o600)?;
            if !done.replaced.iter().any(|(n, _)| *n == name) {
                done.created.push(name);
            }
        }
        let e = self.enrollment()?;
        write_file(
            &self.path("identity.pub.pem"),
            e.identity_pem.as_bytes(),
            0o644,
        )?;
        write_file(&self.path("identity.csr.pem"), e.csr_pem.as_bytes(), 0o644)?;
        Ok(done)
    }

    /// Whether the key `name` exists and loads on this TPM (see
    /// [`KeyStore::provision`]); `Ok(false)` when it does not exist.
    pub fn loads(&mut self, name: &str) -> Result<bool, TpmError> {
        if !self.path(name).exists() {
            return Ok(false);
        }
        self.check_one(name).map(|()| true)
    }

    fn check_one(&mut self, name: &str) -> Result<(), TpmError> {
        if name == IDENTITY {
            return self.sign(b"kakehashi self-test").map(drop);
        }
        self.secret(name).map(drop)
    }

    /// Every key loads on this TPM and the identity signs.
    pub fn check(&mut self) -> Result<(), TpmError> {
        for name in [IDENTITY, WIREGUARD, SPOOL] {
            self.check_one(name)?;
        }
        Ok(())
    }

    pub fn identity_point(&self) -> Result<EcPoint, TpmError> {
        let path = self.path(IDENTITY);
        match &self.backend {
            Backend::Tpm(_) => Tpm::identity_point(&self.blob(IDENTITY)?)
                .ok_or_else(|| blob_error(&path, "not an ECC P-256 identity key")),
            Backend::Software => {
                let key = software_identity(&self.read_raw(IDENTITY)?, &path)?;
                let point = key.verifying_key().to_encoded_point(false);
                point
                    .as_bytes()
                    .try_into()
                    .map_err(|_| blob_error(&path, "unexpected public key encoding"))
            }
        }
    }

    pub fn serial(&self) -> Result<String, TpmError> {
        Ok(serial_of(&self.identity_point()?))
    }

    /// Signs SHA-256(`data`) with the identity key (DER ECDSA).
    pub fn sign(&mut self, data: &[u8]) -> Result<Vec<u8>, TpmError> {
        let path = self.path(IDENTITY);
        if matches!(self.backend, Backend::Software) {
            use p256::ecdsa::signature::hazmat::PrehashSigner;
            let key = software_identity(&self.read_raw(IDENTITY)?, &path)?;
            let signature: p256::ecdsa::Signature = key
                .sign_prehash(&sha256(data))
                .map_err(|e| blob_error(&path, e))?;
            return Ok(signature.to_der().as_bytes().to_vec());
        }
        let blob = self.blob(IDENTITY)?;
        let Backend::Tpm(tpm) = &mut self.backend else {
            unreachable!("software handled above")
        };
        tpm.sign(&blob, &path.display().to_string(), &sha256(data))
    }

    pub fn enrollment(&mut self) -> Result<Enrollment, TpmError> {
        let point = self.identity_point()?;
        let serial = serial_of(&point);
        let info = csr::request_info(&point, &serial, "Kakehashi");
        let signature = self.sign(&info)?;
        Ok(Enrollment {
            identity_pem: csr::pem("PUBLIC KEY", &csr::spki_der(&point)),
            csr_pem: csr::pem("CERTIFICATE REQUEST", &csr::request(&info, &signature)),
            serial,
        })
    }

    fn secret(&mut self, name: &str) -> Result<Zeroizing<[u8; 32]>, TpmError> {
        let path = self.path(name);
        let bytes = match &mut self.backend {
            Backend::Software => self.read_raw(name)?,
            Backend::Tpm(_) => {
                let blob = self.blob(name)?;
                let Backend::Tpm(tpm) = &mut self.backend else {
                    unreachable!("matched above")
                };
                tpm.unseal(&blob, what(name), &path.display().to_string())?
            }
        };
        let mut out = Zeroizing::new([0u8; 32]);
        if bytes.len() != 32 {
            return Err(blob_error(&path, "sealed secret is not 32 bytes"));
        }
        out.copy_from_slice(&bytes);
        Ok(out)
    }

    /// The tunnel's private key, unsealed.
    pub fn wireguard_key(&mut self) -> Result<Zeroizing<[u8; 32]>, TpmError> {
        self.secret(WIREGUARD)
    }

    /// The spool's data key, unsealed.
    pub fn spool_key(&mut self) -> Result<Zeroizing<[u8; 32]>, TpmError> {
        self.secret(SPOOL)
    }
}

fn what(name: &str) -> &'static str {
    match name {
        WIREGUARD => "the sealed WireGuard key",
        SPOOL => "the sealed spool key",
        _ => "the box identity key",
    }
}

/// What to do when the keys no longer load, for logs, status and selftest.
pub const REENROLL: &str = "the TPM no longer holds this box's keys (reset, cleared or replaced). \
Re-enroll: 1) `kakehashi provision --site SITE.toml --force` replaces the keys that no longer load (those that still load are kept); \
2) give the reading center the new WireGuard public key, identity key and CSR it prints; \
3) instances already in the spool were sealed with the old spool key and cannot be decrypted: \
kakehashid keeps them as dead letters marked \"key lost\" at its next start (nothing is deleted); \
list them with `kakehashi queue list --dead`, have the hospital resend them, then `kakehashi queue purge`.";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn software_store_provisions_signs_and_keeps_its_keys() {
        use p256::ecdsa::signature::hazmat::PrehashVerifier;
        let dir = std::env::temp_dir().join(format!("kk-soft-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = TpmConfig {
            backend: KeyBackend::Software,
            key_dir: dir.clone(),
            pcrs: Vec::new(),
        };
        let mut store = KeyStore::open(&config).expect("open");
        assert!(store.is_software());
        let done = store.provision(Replace::Nothing).expect("provision");
        assert_eq!(done.created, vec![IDENTITY, WIREGUARD, SPOOL]);
        let wg = store.wireguard_key().expect("wg");
        let point = store.identity_point().expect("point");
        let sig = store.sign(b"hello").expect("sign");
        let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).expect("public key");
        let sig = p256::ecdsa::Signature::from_der(&sig).expect("DER signature");
        key.verify_prehash(&sha256(b"hello"), &sig)
            .expect("verifies");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join(WIREGUARD))
                .expect("meta")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let mut again = KeyStore::open(&config).expect("reopen");
        let done = again
            .provision(Replace::Unloadable)
            .expect("provision again");
        assert_eq!(done.kept.len(), 3);
        assert_eq!(*again.wireguard_key().expect("wg"), *wg, "keys are kept");
        // --force keeps what loads; a damaged key is replaced, the rest kept.
        std::fs::write(dir.join(IDENTITY), b"damaged").expect("damage");
        let done = again.provision(Replace::Unloadable).expect("force");
        assert_eq!(done.kept, vec![WIREGUARD, SPOOL]);
        assert_eq!(done.replaced.len(), 1);
        assert_eq!(done.replaced[0].0, IDENTITY);
        assert_eq!(*again.wireguard_key().expect("wg"), *wg, "still kept");
        // Rotation replaces everything.
        let done = again.provision(Replace::All).expect("rotate");
        assert_eq!(done.replaced.len(), 3);
        assert_ne!(*again.wireguard_key().expect("wg"), *wg, "rotated");
        assert!(again
            .enrollment()
            .expect("csr")
            .csr_pem
            .contains("CERTIFICATE REQUEST"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
