//! The box's keys at start: the identity is checked (it signs), every sealed
//! key is unsealed once, the WireGuard key is kept in memory (zeroized on
//! drop) with the spool's data key, and the TPM is closed again (so `kakehashi selftest` can use it; swtpm serves one client).
//!
//! When the keys cannot be had — no TPM, a TPM that was reset or replaced,
//! a box never provisioned — kakehashid still starts, so that `kakehashi
//! status` can say exactly that and what to do; it then accepts no new
//! studies and sends nothing, and deletes nothing.

use kakehashi_config::{KeyBackend, TpmConfig};
use kakehashi_control::TpmStatus;
use kakehashi_spool::SpoolKey;
use kakehashi_tpm::keystore::{KeyStore, REENROLL};
use kakehashi_tpm::TpmError;
use kakehashi_tunnel::PrivateKey;

#[derive(Debug)]
pub struct Keys {
    pub status: TpmStatus,
    pub wireguard: Option<PrivateKey>,
    pub spool: Option<SpoolKey>,
}

pub fn load(config: &TpmConfig) -> Keys {
    let backend = match &config.backend {
        KeyBackend::Tpm { tcti } => tcti.clone(),
        KeyBackend::Software => "software".to_string(),
    };
    let mut status = TpmStatus {
        backend,
        serial: None,
        problem: None,
        undecryptable: None,
        warning: None,
    };
    if config.backend == KeyBackend::Software {
        status.warning = Some(kakehashi_tpm::keystore::SOFTWARE_WARNING.to_string());
    }
    let opened = KeyStore::open(config).and_then(|mut store| {
        // The identity must sign; the two unseals below prove the rest.
        store.sign(b"kakehashid start")?;
        let serial = store.serial()?;
        let wg = store.wireguard_key()?;
        let spool = SpoolKey::new(store.spool_key()?);
        Ok((serial, PrivateKey::from_bytes(*wg), spool))
    });
    match opened {
        Ok((serial, wg, spool)) => {
            status.serial = Some(serial);
            Keys {
                status,
                wireguard: Some(wg),
                spool: Some(spool),
            }
        }
        Err(e) => {
            status.problem = Some(describe(&e));
            Keys {
                status,
                wireguard: None,
                spool: None,
            }
        }
    }
}

fn describe(e: &TpmError) -> String {
    match e {
        TpmError::Unreachable { .. } => format!(
            "{e}. The box cannot unseal its keys: is the TPM enabled in the firmware setup and /dev/tpmrm0 present? If the TPM was replaced: {REENROLL}"
        ),
        TpmError::Blob { message, .. } if message.contains("No such file") => format!(
            "{e}: this box is not provisioned. Run `kakehashi provision --site SITE.toml`."
        ),
        TpmError::Blob { message, .. } if message.contains("Permission denied") => format!(
            "{e}: kakehashid cannot read its keys. They must belong to the user it runs as (provision gives them to user kakehashi when it exists): chown -R kakehashi: on the key directory."
        ),
        _ => format!("{e}. {REENROLL}"),
    }
}
