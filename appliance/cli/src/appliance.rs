//! `kakehashi appliance …`: what the appliance image's units run (a field
//! engineer never types these).
//!
//! - `render` (kakehashi-render.service, at every boot before networking):
//!   the network, the WireGuard TUN and the firewall from the config.
//! - `medium DEVICE` (kakehashi-medium@.service, when a FAT filesystem
//!   labelled `KAKEHASHI` appears, at boot or later): provisioning without a
//!   shell. With a `site.toml` on it the box provisions itself (keys in its
//!   TPM, config), brings its network and daemon up, and writes back to the
//!   medium what the reading center needs and its self-test; without one it
//!   only writes the self-test and status. A one-screen summary goes to the
//!   console. Idempotent: keys that load are kept.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kakehashi_config::Config;
use kakehashi_tpm::keystore::Replace;

use crate::render;

/// Where the rendered files go (under a root, so tests can look).
const NETWORK_DIR: &str = "run/systemd/network";
/// Not in /run/kakehashi: that is the daemon's, removed when it stops.
const FIREWALL: &str = "run/kakehashi-render/firewall.nft";

/// Renders and applies the network and firewall. Without a config (not
/// provisioned yet) the firewall drops everything but loopback.
///
/// With `apply` (on the box) the console also says when there is nothing
/// to run yet, or when the config cannot be used: a field engineer has no
/// other way to learn it.
pub fn render(config_path: &Path, root: &Path, apply: bool) -> Result<(), String> {
    let mut problem = None;
    let config = if config_path.exists() {
        match Config::load(config_path) {
            Ok(c) => Some(c),
            Err(e) => {
                problem = Some(e.to_string());
                None
            }
        }
    } else {
        if apply {
            console(&[
                "KAKEHASHI — not provisioned: nothing is relayed yet.".into(),
                "Insert the provisioning medium: a FAT USB stick labelled KAKEHASHI".into(),
                "holding the site's site.toml. The box provisions itself and writes".into(),
                "its results back to the stick.".into(),
            ]);
        }
        None
    };
    let net_dir = root.join(NETWORK_DIR);
    std::fs::create_dir_all(&net_dir)
        .map_err(|e| format!("cannot create {}: {e}", net_dir.display()))?;
    // Files of an earlier render that this config no longer has go.
    for entry in std::fs::read_dir(&net_dir).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().contains("-kakehashi-") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    if let Some(c) = &config {
        for (name, text) in render::networkd(c) {
            let path = net_dir.join(name);
            std::fs::write(&path, text)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
    }
    let firewall = root.join(FIREWALL);
    if let Some(d) = firewall.parent() {
        std::fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    }
    std::fs::write(&firewall, render::nftables(config.as_ref()))
        .map_err(|e| format!("cannot write {}: {e}", firewall.display()))?;
    if apply {
        run("nft", &["-f", &firewall.display().to_string()])?;
    }
    match problem {
        None => Ok(()),
        Some(e) => {
            if apply {
                console(&[
                    format!(
                        "KAKEHASHI — the config {} cannot be used:",
                        config_path.display()
                    ),
                    format!("  {e}"),
                    "Nothing is relayed and the firewall is closed. Provision again from".into(),
                    "the medium with a corrected site.toml.".into(),
                ]);
            }
            Err(e)
        }
    }
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Mounted at this place while it is read and written.
/// Not under /run/kakehashi: systemd chowns that tree for the daemon, and
/// FAT files cannot be chowned.
const MOUNT: &str = "/run/kakehashi-medium";

pub fn medium(device: &Path, config_path: &Path) -> i32 {
    let mount = PathBuf::from(MOUNT);
    if let Err(e) = std::fs::create_dir_all(&mount) {
        console(&[format!(
            "PROVISIONING MEDIUM {}: cannot create {MOUNT}: {e}",
            device.display()
        )]);
        return 1;
    }
    use nix::mount::{mount as do_mount, umount, MsFlags};
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if let Err(e) = do_mount(
        Some(device),
        &mount,
        Some("vfat"),
        flags,
        Some("umask=077,utf8"),
    ) {
        console(&[format!(
            "PROVISIONING MEDIUM {}: cannot mount it ({e}); it must be a FAT filesystem labelled KAKEHASHI",
            device.display()
        )]);
        return 1;
    }
    let summary = with_medium(&mount, config_path);
    nix::unistd::sync();
    if let Err(e) = umount(&mount) {
        eprintln!("kakehashi: cannot unmount {MOUNT}: {e}");
    }
    console(&summary.lines);
    if let Some(when) = summary.reboot {
        crate::update::schedule_reboot(when);
    }
    i32::from(!summary.ok)
}

struct Summary {
    lines: Vec<String>,
    ok: bool,
    /// An update was installed: restart into it, now or once idle.
    reboot: Option<crate::update::RebootWhen>,
}

fn with_medium(mount: &Path, config_path: &Path) -> Summary {
    let mut lines = vec!["KAKEHASHI — provisioning medium".to_string()];
    let site = mount.join("site.toml");
    let mut outcome = None;
    let mut ok = true;
    if site.exists() {
        // A file named `force` on the medium: replace keys that no longer
        // load (a TPM that was reset or replaced), keep the rest.
        let replace = if mount.join("force").exists() {
            Replace::Unloadable
        } else {
            Replace::Nothing
        };
        match crate::provision::provision(&site, config_path, replace, &|l| eprintln!("{l}")) {
            Ok(o) => {
                lines.push(format!("provisioned from site.toml: serial {}", o.serial));
                for l in &o.log {
                    lines.push(format!("  {l}"));
                }
                outcome = Some(o);
                if let Err(e) = bring_up(config_path) {
                    lines.push(format!("[!!] {e}"));
                    ok = false;
                }
            }
            Err(e) => {
                ok = false;
                lines.push("PROVISIONING FAILED:".into());
                lines.extend(e.lines().map(|l| format!("  {l}")));
                if e.contains("--force") {
                    lines.push(
                        "  (on a medium: put an empty file named `force` next to site.toml)".into(),
                    );
                }
            }
        }
    } else {
        lines.push("no site.toml on the medium: report only".into());
    }
    let socket = Config::load(config_path).ok().map(|c| c.control.socket);
    if let Some(s) = &socket {
        wait_ready(s, Duration::from_secs(90));
    }
    let (selftest, passed) = crate::selftest::report(config_path, socket.as_deref(), false);
    ok &= passed;
    let status = socket
        .as_deref()
        .and_then(|s| kakehashi_control::call(s, &kakehashi_control::Request::Status).ok())
        .map(|r| serde_json::to_string_pretty(&r).unwrap_or_default());
    let serial = outcome
        .as_ref()
        .map(|o| o.serial.clone())
        .or_else(|| serial_from_config(config_path))
        .unwrap_or_else(|| "unprovisioned".into());
    if let Some(o) = &outcome {
        lines.push(format!(
            "WireGuard public key {} (tunnel address {})",
            o.wireguard_public_key, o.tunnel_address
        ));
    }
    lines.push(format!(
        "self-test: {}",
        if passed {
            "all PASS"
        } else {
            "some FAIL (see selftest.txt on the medium)"
        }
    ));
    lines.extend(
        selftest
            .lines()
            .filter(|l| l.starts_with("[FAIL]"))
            .map(String::from),
    );
    // An update bundle on the medium (`*.raucb` at its top): installed into
    // the slot that did not boot and renamed `*.raucb.installed`; the box
    // restarts once the relay is idle, or at once with a file named
    // `reboot-now` next to it.
    let paths = crate::update::Paths::default();
    let mut bundles: Vec<PathBuf> = std::fs::read_dir(mount)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "raucb"))
        .collect();
    bundles.sort();
    let mut reboot = None;
    for bundle in bundles.iter().take(1) {
        let when = if mount.join("reboot-now").exists() {
            crate::update::RebootWhen::Now
        } else {
            crate::update::RebootWhen::WhenIdle
        };
        let name = bundle
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        lines.push(format!("update from {name}:"));
        let said = std::cell::RefCell::new(Vec::new());
        let say = |l: &str| said.borrow_mut().push(format!("  {l}"));
        // The restart waits until the results are on the medium.
        match crate::update::install(&paths, &bundle.to_string_lossy(), &say) {
            Ok(_) => {
                // Not installed again at the next boot while the stick is
                // still in (a release that fails its try would loop).
                let done = bundle.with_file_name(format!("{name}.installed"));
                match std::fs::rename(bundle, &done) {
                    Ok(()) => {
                        say(&format!(
                            "renamed to {name}.installed on the medium: it is not installed again"
                        ));
                        say(match when {
                            crate::update::RebootWhen::Now => {
                                "restarting now (a file reboot-now is on the medium)"
                            }
                            _ => "restarting once the relay is idle (nothing received or sent for 10 s)",
                        });
                        reboot = Some(when);
                    }
                    Err(e) => {
                        ok = false;
                        say(&format!(
                            "[!!] cannot rename {name} on the medium ({e}): no restart now; remove the medium, then restart the box to boot the new slot"
                        ));
                    }
                }
            }
            Err(e) => {
                ok = false;
                said.borrow_mut()
                    .push(format!("  UPDATE REFUSED OR FAILED: {e}"));
            }
        }
        lines.extend(said.into_inner());
    }
    if bundles.len() > 1 {
        lines.push(format!(
            "[!!] {} bundles on the medium: only the first ({}) was looked at",
            bundles.len(),
            bundles[0].display()
        ));
    }
    let update = crate::update::report(&paths);
    match &update {
        Ok(r) => lines.extend(r.lines()),
        Err(e) => lines.push(format!("slots: {e}")),
    }
    let dir = mount.join("kakehashi").join(&serial);
    let written = write_results(&dir, outcome.as_ref(), &selftest, status.as_deref(), &lines);
    if let Ok(r) = &update {
        if let Ok(text) = serde_json::to_string_pretty(r) {
            let _ = std::fs::write(dir.join("update.json"), text);
        }
    }
    match written {
        Ok(()) => lines.push(format!(
            "results written to the medium: kakehashi/{serial}/"
        )),
        Err(e) => {
            ok = false;
            lines.push(format!("[!!] cannot write the results to the medium: {e}"));
        }
    }
    lines.push(if ok {
        "done: the medium can be removed".into()
    } else {
        "done, with problems (above): the medium can be removed".into()
    });
    Summary { lines, ok, reboot }
}

fn serial_from_config(config_path: &Path) -> Option<String> {
    let config = Config::load(config_path).ok()?;
    kakehashi_tpm::KeyStore::open(config.tpm.as_ref()?)
        .ok()?
        .serial()
        .ok()
}

/// The new config's network and firewall, then the daemon.
fn bring_up(config_path: &Path) -> Result<(), String> {
    render(config_path, Path::new("/"), true)?;
    run("networkctl", &["reload"])?;
    if let Ok(c) = Config::load(config_path) {
        if let Some(n) = &c.network {
            let _ = run(
                "networkctl",
                &["reconfigure", &n.lan.interface, &n.wan.interface],
            );
        }
    }
    run("systemctl", &["restart", "kakehashid.service"])
        .map(drop)
        .map_err(|e| format!("kakehashid did not start: {e}"))
}

fn wait_ready(socket: &Path, within: Duration) {
    let start = Instant::now();
    while start.elapsed() < within {
        if kakehashi_control::call(socket, &kakehashi_control::Request::Status).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn write_results(
    dir: &Path,
    outcome: Option<&crate::provision::Outcome>,
    selftest: &str,
    status: Option<&str>,
    summary: &[String],
) -> Result<(), String> {
    let put = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let _ = std::fs::remove_file(dir.join("done"));
    if let Some(o) = outcome {
        put(
            "provision.json",
            &serde_json::to_string_pretty(o).unwrap_or_default(),
        )?;
        put("wireguard.pub", &format!("{}\n", o.wireguard_public_key))?;
        put("identity.pub.pem", &o.identity_public_key_pem)?;
        put("identity.csr.pem", &o.csr_pem)?;
        put("for-the-center.txt", &crate::provision::for_the_center(o))?;
    }
    put("selftest.txt", selftest)?;
    if let Some(s) = status {
        put("status.json", s)?;
    }
    put("summary.txt", &(summary.join("\n") + "\n"))?;
    // Last: a reader that sees it knows the rest is complete.
    put("done", "")
}

/// The summary on the box's screen and serial console.
pub(crate) fn console(lines: &[String]) {
    let text = format!(
        "\n{}\n{}\n{}\n",
        "=".repeat(72),
        lines.join("\n"),
        "=".repeat(72)
    );
    for tty in ["/dev/tty1", "/dev/ttyS0"] {
        if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(tty) {
            use std::io::Write as _;
            let _ = f.write_all(text.replace('\n', "\r\n").as_bytes());
        }
    }
    eprint!("{text}");
}
