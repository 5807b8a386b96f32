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

use kakehashi_config::{Config, KeyBackend, TpmConfig};
use kakehashi_tpm::keystore::{write_file, KeyStore, Replace, SPOOL};
use serde::Deserialize;

/// The site file: what a field engineer knows about the hospital and the center.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    site: SiteInfo,
    #[serde(rename = "box")]
    box_: BoxSection,
    #[serde(default)]
    pacs: Vec<Pacs>,
    center: Center,
    #[serde(default)]
    tpm: SiteTpm,
    #[serde(default)]
    spool: SiteSpool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteInfo {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BoxSection {
    #[serde(default = "default_ae")]
    ae_title: String,
    #[serde(default = "default_listen")]
    listen: String,
    tunnel_address: String,
    tunnel_interface: Option<String>,
    control_socket: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pacs {
    ae_title: String,
    address: String,
    port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Center {
    #[serde(default = "default_center_name")]
    name: String,
    ae_title: String,
    dicom_address: String,
    wg_public_key: String,
    wg_endpoint: String,
    allowed_ips: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteTpm {
    /// "tpm" (default) or "software" (development only).
    backend: Option<String>,
    tcti: Option<String>,
    key_dir: Option<String>,
    /// PCRs to bind the sealed keys to (SHA-256 bank).
    #[serde(default)]
    pcrs: Vec<u8>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteSpool {
    dir: Option<String>,
    max_size: Option<String>,
}

fn default_ae() -> String {
    "KAKEHASHI".into()
}
fn default_listen() -> String {
    "0.0.0.0:104".into()
}
fn default_center_name() -> String {
    "reading-center".into()
}

fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn list(v: &[String]) -> String {
    format!(
        "[{}]",
        v.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ")
    )
}

impl Site {
    pub fn load(path: &Path) -> Result<Site, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read site file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("site file {} is not valid: {e}", path.display()))
    }

    /// The box's kakehashi.toml for this site.
    pub fn config_text(&self, site_path: &Path) -> String {
        let b = &self.box_;
        let c = &self.center;
        let mut t = format!(
            "# Written by `kakehashi provision --site {}` for site {}.\n# Change the site file and provision again rather than editing this file.\n\n[dicom]\nae_title = {}\nlisten = {}\n",
            site_path.display(),
            q(&self.site.name),
            q(&b.ae_title),
            q(&b.listen)
        );
        for p in &self.pacs {
            t += &format!(
                "\n[[dicom.sources]]\nae_title = {}\naddress = {}\n",
                q(&p.ae_title),
                q(&p.address)
            );
            if let Some(port) = p.port {
                t += &format!("port = {port}\n");
            }
        }
        t += &format!(
            "\n[[destinations]]\nname = {}\nae_title = {}\naddress = {}\n",
            q(&c.name),
            q(&c.ae_title),
            q(&c.dicom_address)
        );
        t += &format!(
            "\n[spool]\ndir = {}\nmax_size = {}\n",
            q(self
                .spool
                .dir
                .as_deref()
                .unwrap_or("/var/lib/kakehashi/spool")),
            q(self.spool.max_size.as_deref().unwrap_or("50 GiB"))
        );
        if let Some(s) = &b.control_socket {
            t += &format!("\n[control]\nsocket = {}\n", q(s));
        }
        t += "\n[tunnel]\n";
        if let Some(i) = &b.tunnel_interface {
            t += &format!("interface = {}\n", q(i));
        }
        t += &format!(
            "address = {}\n\n[tunnel.peer]\npublic_key = {}\nendpoint = {}\nallowed_ips = {}\n",
            list(std::slice::from_ref(&b.tunnel_address)),
            q(&c.wg_public_key),
            q(&c.wg_endpoint),
            list(&c.allowed_ips)
        );
        t += "\n[tpm]\n";
        match self.tpm.backend.as_deref() {
            Some("software") => t += "backend = \"software\"   # development only\n",
            other => {
                if let Some(b) = other {
                    t += &format!("backend = {}\n", q(b));
                }
                t += &format!(
                    "tcti = {}\n",
                    q(self.tpm.tcti.as_deref().unwrap_or("device:/dev/tpmrm0"))
                );
            }
        }
        if !self.tpm.pcrs.is_empty() {
            t += &format!("pcrs = {:?}\n", self.tpm.pcrs);
        }
        t += &format!(
            "key_dir = {}\n",
            q(self
                .tpm
                .key_dir
                .as_deref()
                .unwrap_or("/var/lib/kakehashi/keys"))
        );
        t
    }
}

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

pub fn run(
    site_path: &Path,
    config_path: &Path,
    replace: Replace,
    json: bool,
) -> Result<(), String> {
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
    let say = |line: String| {
        if !json {
            println!("{line}");
        }
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
    let tunnel_ip = site
        .box_
        .tunnel_address
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    if json {
        let v = serde_json::json!({
            "serial": enrollment.serial,
            "wireguard_public_key": wg_public,
            "tunnel_address": tunnel_ip,
            "identity_public_key_pem": enrollment.identity_pem,
            "csr_pem": enrollment.csr_pem,
            "created": done.created,
            "kept": done.kept,
            "replaced": done.replaced.iter().map(|(k, why)| serde_json::json!({"key": k, "why": why})).collect::<Vec<_>>(),
            "config": config_path,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!(
        "\nFor the reading center (also in {}/identity.pub.pem and identity.csr.pem):",
        store.dir().display()
    );
    println!("  serial               {}", enrollment.serial);
    println!("  WireGuard public key {wg_public}");
    println!(
        "  on the center:       wg set <interface> peer {wg_public} allowed-ips {tunnel_ip}/32"
    );
    print!(
        "  identity public key\n{}",
        indent(&enrollment.identity_pem)
    );
    print!(
        "  certificate request (PKCS#10, signed in the TPM)\n{}",
        indent(&enrollment.csr_pem)
    );
    println!("\nNext: systemctl restart kakehashid, then `kakehashi selftest`.");
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_site_file_makes_a_valid_config() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../provisioning/site.toml");
        let site = Site::load(&path).expect("provisioning/site.toml parses");
        let text = site.config_text(&path);
        let config = Config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(config.dicom.sources[0].port, Some(104));
        assert!(config.destinations[0].via_tunnel);
        let t = config.tunnel.expect("tunnel");
        assert!(
            t.private_key_file.is_none(),
            "the key is sealed, not a file"
        );
        assert_eq!(
            config.tpm.expect("tpm").backend,
            KeyBackend::Tpm {
                tcti: "device:/dev/tpmrm0".into()
            }
        );
    }

    #[test]
    fn a_bad_site_file_names_the_problem() {
        let dir = std::env::temp_dir().join(format!("kk-site-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("site.toml");
        std::fs::write(
            &path,
            "[site]\nname = \"x\"\n[box]\ntunel_address = \"10.8.0.2/24\"\n",
        )
        .expect("write");
        let e = Site::load(&path).expect_err("typo").to_string();
        assert!(e.contains("tunel_address"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
