//! `kakehashi provision --site SITE.toml`: a field engineer's one command.
//!
//! Checks the TPM, creates the identity and the sealed keys (keeping those
//! that already load on this TPM; `--force` replaces those that do not,
//! `--rotate` all of them), writes the box's config from the site file
//! (validated before it is written), and prints what the reading center
//! needs to enroll the box.
//!
//! The spool key is special: everything in the spool is sealed with it. A
//! key that still loads is never replaced while the spool holds instances
//! (they would become unreadable); one that no longer loads is replaced with
//! `--force`, and kakehashid then keeps what it sealed as "key lost" dead
//! letters.

use std::path::Path;

use kakehashi_config::site::Site;
use kakehashi_config::{Config, KeyBackend, TpmConfig};
use kakehashi_tpm::keystore::{write_file, KeyStore, Replace, SPOOL};

/// How many instances the box's spool holds (queued or dead letter): asked
/// of kakehashid if it runs, else read from the spool's index.
fn held_instances(config: &Config) -> Result<u64, String> {
    use kakehashi_control::{call, Request, Response};
    if let Ok(Response::Status(s)) = call(&config.control.socket, &Request::Status) {
        return Ok(s
            .destinations
            .iter()
            .map(|d| d.queued + d.dead_letter)
            .max()
            .unwrap_or(0));
    }
    match kakehashi_spool::inspect(&config.spool.dir) {
        Ok(held) => Ok(held.map_or(0, |h| h.instances)),
        Err(e) => Err(format!(
            "cannot tell what the spool holds ({e}); is kakehashid running with another control socket?"
        )),
    }
}

/// What provisioning made, for the reading center and for the record.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub serial: String,
    pub wireguard_public_key: String,
    pub tunnel_address: String,
    pub identity_public_key_pem: String,
    pub csr_pem: String,
    pub created: Vec<&'static str>,
    pub kept: Vec<&'static str>,
    pub replaced: Vec<(&'static str, String)>,
    pub config: std::path::PathBuf,
    pub key_dir: std::path::PathBuf,
    /// What was done, line by line (`[ok] …`, `[!!] …`).
    pub log: Vec<String>,
}

/// `kakehashi provision`: provisions, then prints the outcome.
pub fn run(
    site_path: &Path,
    config_path: &Path,
    replace: Replace,
    json: bool,
) -> Result<(), String> {
    let live = |line: &str| {
        if !json {
            println!("{line}");
        }
    };
    let o = provision(site_path, config_path, replace, &live)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&o).unwrap_or_default());
        return Ok(());
    }
    print!("{}", for_the_center(&o));
    println!("\nNext: systemctl restart kakehashid, then `kakehashi selftest`.");
    Ok(())
}

/// What the reading center needs, as the field engineer reads it.
pub fn for_the_center(o: &Outcome) -> String {
    format!(
        "\nFor the reading center (also in {}/identity.pub.pem and identity.csr.pem):\n  serial               {}\n  WireGuard public key {}\n  on the center:       wg set <interface> peer {} allowed-ips {}/32\n  identity public key\n{}  certificate request (PKCS#10, signed in the TPM)\n{}",
        o.key_dir.display(),
        o.serial,
        o.wireguard_public_key,
        o.wireguard_public_key,
        o.tunnel_address,
        indent(&o.identity_public_key_pem),
        indent(&o.csr_pem)
    )
}

/// Checks the TPM, makes or keeps the keys, writes the config. `live` sees
/// each step as it happens.
pub fn provision(
    site_path: &Path,
    config_path: &Path,
    replace: Replace,
    live: &dyn Fn(&str),
) -> Result<Outcome, String> {
    let site = Site::load(site_path)?;
    let text = site.config_text(site_path);
    let config = Config::parse(&text).map_err(|e| {
        format!(
            "the site file {} makes an invalid config: {e}",
            site_path.display()
        )
    })?;
    let tpm: TpmConfig = config
        .tpm
        .clone()
        .ok_or("no [tpm] in the generated config")?;
    let tcti = match &tpm.backend {
        KeyBackend::Tpm { tcti } => tcti.clone(),
        KeyBackend::Software => "software".into(),
    };
    let log = std::cell::RefCell::new(Vec::new());
    let say = |line: String| {
        live(&line);
        log.borrow_mut().push(line);
    };
    let mut store = KeyStore::open(&tpm).map_err(|e| {
        format!("{e}\n  fix: is the TPM enabled in the firmware setup, and /dev/tpmrm0 present (ls -l /dev/tpmrm0)? Run as root or as a member of group tss.")
    })?;
    if store.is_software() {
        say(format!(
            "[!!] {}",
            kakehashi_tpm::keystore::SOFTWARE_WARNING
        ));
    } else {
        say(format!("[ok] TPM {tcti} reachable"));
    }
    // Never replace a spool key that still works while data sealed with it
    // is in the spool: those instances would become unreadable.
    let spool_key_loads = store.loads(SPOOL).unwrap_or(false);
    if replace == Replace::All && spool_key_loads {
        let held = held_instances(&config)?;
        if held > 0 {
            return Err(format!(
                "refusing to replace the spool key: it still works, and the spool holds {held} instance(s) sealed with it, which would become unreadable.\n  fix: let them be delivered (`kakehashi status` shows 0 queued), retry or purge the dead letters (`kakehashi queue list --dead`), then run provision --rotate again"
            ));
        }
    }
    let done = store.provision(replace).map_err(|e| {
        format!(
            "{e}\n  fix: if the TPM was reset or replaced, run again with --force (keys that still load are kept). {}",
            kakehashi_tpm::keystore::REENROLL
        )
    })?;
    for k in &done.kept {
        say(format!("[ok] {k}: kept (loads on this TPM)"));
    }
    for k in &done.created {
        say(format!("[ok] {k}: created in {}", store.dir().display()));
    }
    for (k, why) in &done.replaced {
        say(format!("[!!] {k}: replaced ({why})"));
    }
    if done.replaced.iter().any(|(k, _)| *k == SPOOL) && !spool_key_loads {
        match held_instances(&config) {
            Ok(0) => {}
            Ok(n) => say(format!(
                "[!!] the spool holds {n} instance(s) sealed with the old spool key: they cannot be decrypted. kakehashid keeps them as dead letters marked \"key lost\" at its next start; have the hospital send them again, then `kakehashi queue purge`."
            )),
            Err(e) => say(format!("[!!] {e}")),
        }
    }
    let enrollment = store.enrollment().map_err(|e| e.to_string())?;
    let wg = store.wireguard_key().map_err(|e| e.to_string())?;
    let wg_public =
        kakehashi_tunnel::key::encode(&kakehashi_tunnel::PrivateKey::from_bytes(*wg).public_key());
    if let Some(dir) = config_path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    write_file(config_path, text.as_bytes(), 0o640).map_err(|e| e.to_string())?;
    say(format!(
        "[ok] config {} written and valid",
        config_path.display()
    ));
    if let Some(line) = hand_over(store.dir(), config_path)? {
        say(line);
    }
    Ok(Outcome {
        serial: enrollment.serial,
        wireguard_public_key: wg_public,
        tunnel_address: site.tunnel_ip().to_string(),
        identity_public_key_pem: enrollment.identity_pem,
        csr_pem: enrollment.csr_pem,
        created: done.created,
        kept: done.kept,
        replaced: done.replaced,
        config: config_path.to_path_buf(),
        key_dir: store.dir().to_path_buf(),
        log: log.into_inner(),
    })
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

/// The service user kakehashid runs as (systemd/kakehashi.sysusers).
const SERVICE_USER: &str = "kakehashi";

/// Provision runs as root; kakehashid runs as the service user. When that
/// user exists, give it the key directory and its files (0700/0600) and
/// let its group read the config (root:kakehashi 0640), so the daemon can
/// read what provision wrote. Without the user (a development machine) the
/// files stay with whoever ran provision.
fn hand_over(key_dir: &Path, config: &Path) -> Result<Option<String>, String> {
    use nix::unistd::{chown, Gid, Uid, User};
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let Ok(Some(user)) = User::from_name(SERVICE_USER) else {
        return Ok(None);
    };
    let own = |path: &Path, uid: Option<Uid>, gid: Option<Gid>| {
        chown(path, uid, gid).map_err(|e| format!("cannot chown {}: {e}", path.display()))
    };
    own(key_dir, Some(user.uid), Some(user.gid))?;
    let entries = std::fs::read_dir(key_dir)
        .map_err(|e| format!("cannot list {}: {e}", key_dir.display()))?;
    for entry in entries.flatten() {
        own(&entry.path(), Some(user.uid), Some(user.gid))?;
    }
    own(config, Some(Uid::from_raw(0)), Some(user.gid))?;
    Ok(Some(format!(
        "[ok] keys owned by {SERVICE_USER} (the service user), config readable by its group"
    )))
}
