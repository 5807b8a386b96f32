//! The box's WireGuard private key, read from a file `wg genkey` wrote.
//!
//! The file must be mode 0600 (no group or other bits) and owned by the user
//! kakehashid runs as, like `wg-quick` demands of its configs; anything else
//! is refused with the command that fixes it. The key lives in memory only as
//! a [`PrivateKey`], which is zeroized when dropped.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use base64::Engine as _;
use boringtun::x25519::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::TunnelError;

/// A WireGuard private key; its bytes are wiped when it is dropped.
pub struct PrivateKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey(public {})", encode(&self.public_key()))
    }
}

impl PrivateKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PrivateKey(Zeroizing::new(bytes))
    }

    /// Parses the base64 text `wg genkey` prints.
    pub fn from_base64(text: &str) -> Option<Self> {
        let decoded = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .ok()?,
        );
        let bytes: [u8; 32] = decoded.as_slice().try_into().ok()?;
        Some(PrivateKey::from_bytes(bytes))
    }

    pub fn public_key(&self) -> [u8; 32] {
        PublicKey::from(&StaticSecret::from(*self.0)).to_bytes()
    }

    /// Lowercase hex, as the UAPI protocol carries keys.
    pub(crate) fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(*self.0))
    }
}

/// Base64, as `wg` prints keys.
pub fn encode(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Reads the key file, refusing one others could read or that another user owns.
pub fn load(path: &Path) -> Result<PrivateKey, TunnelError> {
    let bad = |problem: String| TunnelError::Key {
        path: path.to_path_buf(),
        problem,
    };
    let meta = std::fs::metadata(path).map_err(|e| {
        bad(format!(
            "{e} (create it with: umask 077; wg genkey > {})",
            path.display()
        ))
    })?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(bad(format!(
            "mode is {mode:04o}; a private key must be readable by its owner only (chmod 600 {})",
            path.display()
        )));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(bad(format!(
            "owned by uid {}, but kakehashid runs as uid {me} (chown it to the service user)",
            meta.uid()
        )));
    }
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?);
    PrivateKey::from_base64(&text).ok_or_else(|| {
        bad("not a WireGuard private key (44 characters of base64, as `wg genkey` writes)".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn public_key_matches_wg() {
        // `echo qD8pDfAfyqzRbrxCrFPB3ZSYQYBKZ2e9KjhvEV9Z7nU= | wg pubkey`
        let k = PrivateKey::from_base64("qD8pDfAfyqzRbrxCrFPB3ZSYQYBKZ2e9KjhvEV9Z7nU=")
            .expect("valid key");
        assert_eq!(
            encode(&k.public_key()),
            "iD+KqZAoixFdxntz4ySeDqtVRVjmq+FTlkR486sEuXA="
        );
        assert!(PrivateKey::from_base64("c2hvcnQ=").is_none());
    }

    #[test]
    fn loose_modes_are_refused() {
        let dir = std::env::temp_dir().join(format!("kk-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("wg.key");
        std::fs::write(&path, "qD8pDfAfyqzRbrxCrFPB3ZSYQYBKZ2e9KjhvEV9Z7nU=\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = load(&path).expect_err("0644 must be refused").to_string();
        assert!(e.contains("0644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(load(&path).is_ok());
        std::fs::write(&path, "not a key").expect("write");
        let e = load(&path).expect_err("garbage").to_string();
        assert!(e.contains("wg genkey"), "{e}");
        let e = load(&dir.join("missing")).expect_err("missing").to_string();
        assert!(e.contains("umask 077"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
