//! Updates of the A/B slots (docs/updates.md): what RAUC calls on the box
//! while it installs a bundle, the boot's health check, the outcome of the
//! last update, and `kakehashi update install`.
//!
//! RAUC writes the root filesystem and its hash tree into the slot that did
//! not boot. Around that:
//! - `rauc-pre-install` refuses a bundle that is not newer than both the
//!   version running and the floor (the version of the last update that
//!   succeeded, kept on the data partition): no downgrade, whatever the
//!   bundle says of itself (this check lives in the verified root, never in
//!   a bundle).
//! - RAUC marks the target slot bad before writing it: the custom backend
//!   deletes its boot entry, so a slot cut in the middle of its writing is
//!   never booted.
//! - `rauc-post-install` copies the bundle's UKI for that slot to the ESP as
//!   `kakehashi-<slot>+1.efi`: tried once (systemd-boot's boot counting).
//! - At the next boot systemd-boot starts the newest entry with tries left,
//!   counting the try. `kakehashi appliance health` passes only when the box
//!   works; then `systemd-bless-boot` drops the counter (good). A failed
//!   health check in a counted boot records why and restarts: the entry has
//!   no tries left, sorts last, and the previous slot boots by itself.
//! - `kakehashi appliance update-settle` runs after every boot's assessment
//!   and turns "installed" into "succeeded" (booted, blessed, healthy; the
//!   floor is raised) or "failed" with the reason.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::boot::{self, SlotState};

/// Where the update machinery reads and writes.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The ESP's `EFI/Linux`: the slots' UKIs.
    pub esp_linux: PathBuf,
    /// Root's own directory on the data partition: the last update, the
    /// floor, the health reports (not the daemon's, which it could write).
    pub state: PathBuf,
    pub cmdline: PathBuf,
    pub os_release: PathBuf,
}

impl Default for Paths {
    fn default() -> Paths {
        Paths {
            esp_linux: PathBuf::from("/efi/EFI/Linux"),
            state: PathBuf::from("/var/lib/kakehashi-update"),
            cmdline: PathBuf::from("/proc/cmdline"),
            os_release: PathBuf::from("/usr/lib/os-release"),
        }
    }
}

impl Paths {
    fn last(&self) -> PathBuf {
        self.state.join("last.json")
    }
    fn floor(&self) -> PathBuf {
        self.state.join("floor")
    }
    fn health(&self, slot: &str) -> PathBuf {
        self.state.join(format!("health-{slot}.json"))
    }
    /// The slot this boot came from.
    pub fn booted(&self) -> Option<String> {
        let line = std::fs::read_to_string(&self.cmdline).ok()?;
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("kakehashi.slot="))
            .map(String::from)
    }
    /// The version running (`IMAGE_VERSION` of this root's os-release).
    pub fn running_version(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.os_release).ok()?;
        boot::os_release_value(&text, "IMAGE_VERSION")
    }
    /// `Err` naming what is missing when this is not the appliance image
    /// (a development machine, a container): no slots to report or write.
    pub fn appliance(&self) -> Result<(), String> {
        if self.esp_linux.is_dir() {
            Ok(())
        } else {
            Err(format!(
                "not an appliance image: no boot entries at {} (the appliance mounts its ESP at /efi)",
                self.esp_linux.display()
            ))
        }
    }
    fn read_floor(&self) -> Option<String> {
        std::fs::read_to_string(self.floor())
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `MAJOR.MINOR.PATCH` at the start of a version (`0.2.0+abc`, `1.4.10`).
pub fn release(version: &str) -> Option<(u64, u64, u64)> {
    let core = version.split(['+', '-', '~']).next()?;
    let mut parts = core.split('.');
    let mut next = || parts.next()?.parse::<u64>().ok();
    let r = (next()?, next()?, next()?);
    parts.next().is_none().then_some(r)
}

/// Why `candidate` may not be installed on a box running `running` with
/// floor `floor`, or `None` if it may: it must be a newer release than
/// both (the same release again is not an update).
pub fn refuse_version(
    candidate: &str,
    running: Option<&str>,
    floor: Option<&str>,
) -> Option<String> {
    let Some(new) = release(candidate) else {
        return Some(format!(
            "the bundle's version {candidate:?} does not start with MAJOR.MINOR.PATCH"
        ));
    };
    for (what, v) in [("the box runs", running), ("the floor is", floor)] {
        let Some(v) = v else { continue };
        match release(v) {
            Some(old) if new <= old => {
                return Some(format!(
                    "version {candidate} is not newer than {v} ({what} {v}): downgrades and reinstalls are refused"
                ))
            }
            Some(_) => {}
            None => return Some(format!("{what} {v:?}, which is not MAJOR.MINOR.PATCH")),
        }
    }
    None
}

/// A slot's boot entry with its UKI's version, for ordering.
struct Candidate {
    slot: String,
    state: SlotState,
    version: Option<String>,
}

fn candidates(paths: &Paths) -> Result<Vec<Candidate>, String> {
    let entries = boot::scan(&paths.esp_linux)?;
    Ok(entries
        .values()
        .map(|e| Candidate {
            slot: e.slot.clone(),
            state: e.state(),
            version: boot::osrel(&paths.esp_linux.join(&e.file))
                .ok()
                .and_then(|t| boot::os_release_value(&t, "IMAGE_VERSION")),
        })
        .collect())
}

/// The slot systemd-boot starts next: entries with tries left first, then
/// the newest version, then the greater name (systemd-boot 252's order for
/// type #2 entries of one `IMAGE_ID`, with no `default` in loader.conf).
fn primary(paths: &Paths) -> Result<Option<String>, String> {
    let mut c = candidates(paths)?;
    c.sort_by(|a, b| {
        let bad = |x: &Candidate| matches!(x.state, SlotState::Bad { .. });
        let v = |x: &Candidate| x.version.as_deref().and_then(release);
        bad(a)
            .cmp(&bad(b))
            .then_with(|| v(b).cmp(&v(a)))
            .then_with(|| b.slot.cmp(&a.slot))
    });
    Ok(c.first().map(|c| c.slot.clone()))
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// Writes `text` to `path` whole or not at all (temporary file, fsync,
/// rename, fsync of the directory).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    sync_dir(dir)
}

/// RAUC's custom bootloader backend (`[handlers]
/// bootloader-custom-backend`): `get-primary`, `set-primary SLOT`,
/// `get-state SLOT`, `set-state SLOT good|bad`. Prints what a get asks for.
pub fn backend(paths: &Paths, args: &[String]) -> Result<Option<String>, String> {
    let arg = |i: usize| {
        args.get(i)
            .map(String::as_str)
            .ok_or_else(|| format!("usage: rauc-backend get-primary | set-primary SLOT | get-state SLOT | set-state SLOT good|bad (got {args:?})"))
    };
    let slot_arg = |i: usize| -> Result<&str, String> {
        let s = arg(i)?;
        boot::SLOTS
            .contains(&s)
            .then_some(s)
            .ok_or_else(|| format!("unknown slot {s:?} (this box has slots a and b)"))
    };
    let entries = || boot::scan(&paths.esp_linux);
    match arg(0)? {
        "get-primary" => primary(paths)?
            .map(Some)
            .ok_or_else(|| format!("{}: no boot entry at all", paths.esp_linux.display())),
        "set-primary" => {
            // The order follows versions and tries; nothing to change, but
            // never claim a slot is primary when it is not.
            let slot = slot_arg(1)?;
            match primary(paths)? {
                Some(p) if p == slot => Ok(None),
                other => Err(format!(
                    "slot {slot} cannot be made primary: systemd-boot starts {} (the newest entry with tries left); install a newer bundle instead",
                    other.as_deref().unwrap_or("nothing")
                )),
            }
        }
        "get-state" => {
            let slot = slot_arg(1)?;
            let state = entries()?
                .get(slot)
                .map_or(SlotState::Missing, |e| e.state());
            Ok(Some(
                match state {
                    SlotState::Good | SlotState::Trying { .. } => "good",
                    SlotState::Bad { .. } | SlotState::Missing => "bad",
                }
                .into(),
            ))
        }
        "set-state" => {
            let slot = slot_arg(1)?;
            let all = entries()?;
            match (arg(2)?, all.get(slot)) {
                ("bad", None) => Ok(None),
                ("bad", Some(e)) => {
                    // Before its slot is written: no entry, no boot of a
                    // half-written root.
                    let p = paths.esp_linux.join(&e.file);
                    std::fs::remove_file(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                    sync_dir(&paths.esp_linux)?;
                    Ok(None)
                }
                ("good", None) => Err(format!("slot {slot} has no boot entry to mark good")),
                ("good", Some(e)) => {
                    let good = paths.esp_linux.join(format!("kakehashi-{slot}.efi"));
                    if e.counter.is_some() {
                        std::fs::rename(paths.esp_linux.join(&e.file), &good)
                            .map_err(|e| format!("{}: {e}", good.display()))?;
                        sync_dir(&paths.esp_linux)?;
                    }
                    Ok(None)
                }
                (other, _) => Err(format!("set-state {slot} {other:?}: expected good or bad")),
            }
        }
        other => Err(format!(
            "unknown backend command {other:?} (get-primary, set-primary, get-state, set-state)"
        )),
    }
}

/// The last update, as a fleet service will read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Last {
    /// installing | installed | succeeded | failed
    pub state: String,
    pub version: String,
    /// The slot written.
    pub slot: String,
    /// What ran when it was installed.
    pub from_version: Option<String>,
    pub from_slot: Option<String>,
    pub reason: Option<String>,
    pub started_ms: u64,
    pub changed_ms: u64,
}

pub fn read_last(paths: &Paths) -> Option<Last> {
    let bytes = std::fs::read(paths.last()).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write_last(paths: &Paths, last: &Last) -> Result<(), String> {
    let text = serde_json::to_vec_pretty(last).map_err(|e| e.to_string())?;
    write_atomic(&paths.last(), &text)
}

/// The slot RAUC writes, from its handler environment
/// (`RAUC_TARGET_SLOTS`, `RAUC_SLOT_CLASS_n`, `RAUC_SLOT_BOOTNAME_n`).
fn target_slot(env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let targets =
        env("RAUC_TARGET_SLOTS").ok_or("RAUC_TARGET_SLOTS is not set (run by RAUC only)")?;
    for n in targets.split_whitespace() {
        if env(&format!("RAUC_SLOT_CLASS_{n}")).as_deref() == Some("rootfs") {
            return env(&format!("RAUC_SLOT_BOOTNAME_{n}"))
                .filter(|b| boot::SLOTS.contains(&b.as_str()))
                .ok_or_else(|| format!("target slot {n} has no bootname a or b"));
        }
    }
    Err(format!("no rootfs slot among RAUC's targets {targets:?}"))
}

/// The bundle's version: RAUC 1.8 gives its handlers the bundle's mount
/// point, not the manifest's fields (`RAUC_MF_VERSION` is only for a
/// bundle's own install handler).
fn bundle_version(env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    if let Some(v) = env("RAUC_MF_VERSION").filter(|v| !v.is_empty()) {
        return Ok(v);
    }
    let mount = env("RAUC_BUNDLE_MOUNT_POINT")
        .ok_or("RAUC_BUNDLE_MOUNT_POINT is not set (run by RAUC only)")?;
    let manifest = Path::new(&mount).join("manifest.raucm");
    let text =
        std::fs::read_to_string(&manifest).map_err(|e| format!("{}: {e}", manifest.display()))?;
    let mut section = "";
    for line in text.lines().map(str::trim) {
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s;
        } else if let Some(v) = line.strip_prefix("version=") {
            if section == "update" {
                return Ok(v.trim().to_string());
            }
        }
    }
    Err(format!("{}: no version in [update]", manifest.display()))
}

/// RAUC's pre-install handler: refuses what is not newer, records the
/// update as installing.
pub fn pre_install(paths: &Paths, env: &dyn Fn(&str) -> Option<String>) -> Result<(), String> {
    let version = bundle_version(env)?;
    let running = paths.running_version();
    if let Some(why) = refuse_version(&version, running.as_deref(), paths.read_floor().as_deref()) {
        return Err(why);
    }
    let slot = target_slot(env)?;
    let now = now_ms();
    write_last(
        paths,
        &Last {
            state: "installing".into(),
            version,
            slot,
            from_version: running,
            from_slot: paths.booted(),
            reason: None,
            started_ms: now,
            changed_ms: now,
        },
    )
}

/// RAUC's post-install handler: the bundle's UKI for the written slot goes
/// to the ESP with one try.
pub fn post_install(paths: &Paths, env: &dyn Fn(&str) -> Option<String>) -> Result<(), String> {
    let slot = target_slot(env)?;
    let mount = env("RAUC_BUNDLE_MOUNT_POINT").ok_or("RAUC_BUNDLE_MOUNT_POINT is not set")?;
    let version = bundle_version(env)?;
    let uki = Path::new(&mount).join(format!("kakehashi-{slot}.efi"));
    let osrel = boot::osrel(&uki)?;
    let carried = boot::os_release_value(&osrel, "IMAGE_VERSION");
    if carried.as_deref() != Some(version.as_str()) {
        return Err(format!(
            "{}: its version {carried:?} is not the bundle's {version:?}",
            uki.display()
        ));
    }
    // Nothing of this slot may be left (RAUC marked it bad: no entry).
    if let Some(e) = boot::scan(&paths.esp_linux)?.get(&slot) {
        let p = paths.esp_linux.join(&e.file);
        std::fs::remove_file(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let bytes = std::fs::read(&uki).map_err(|e| format!("{}: {e}", uki.display()))?;
    write_atomic(
        &paths.esp_linux.join(format!("kakehashi-{slot}+1.efi")),
        &bytes,
    )?;
    let mut last = read_last(paths).ok_or("no record of this update (pre-install did not run)")?;
    last.state = "installed".into();
    last.changed_ms = now_ms();
    write_last(paths, &last)
}

/// What a health check found, kept per slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub slot: String,
    pub version: Option<String>,
    pub ok: bool,
    pub reason: Option<String>,
    pub at_ms: u64,
    /// This boot was counted (a slot being tried).
    pub counted: bool,
}

pub fn read_health(paths: &Paths, slot: &str) -> Option<Health> {
    serde_json::from_slice(&std::fs::read(paths.health(slot)).ok()?).ok()
}

/// `systemctl show` properties of kakehashid.
fn daemon_restarts() -> Option<(u32, String)> {
    let out = std::process::Command::new("systemctl")
        .args([
            "show",
            "-p",
            "NRestarts",
            "-p",
            "Result",
            "kakehashid.service",
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let restarts = text
        .lines()
        .find_map(|l| l.strip_prefix("NRestarts="))?
        .trim()
        .parse()
        .ok()?;
    let result = text
        .lines()
        .find_map(|l| l.strip_prefix("Result="))
        .unwrap_or("")
        .trim()
        .to_string();
    Some((restarts, result))
}

/// Why a check failed, and whether waiting can help: not for keys the
/// TPM refuses to unseal, nor for a daemon systemd has restarted 3 times.
struct Unhealthy {
    reason: String,
    final_: bool,
}

impl From<String> for Unhealthy {
    fn from(reason: String) -> Unhealthy {
        Unhealthy {
            reason,
            final_: false,
        }
    }
}

/// One pass of the checks: `Ok` when the box works, `Err` why not.
fn check_once(config_path: &Path, socket: Option<&Path>) -> Result<String, Unhealthy> {
    use kakehashi_control::{call, Request, Response};
    if !config_path.exists() {
        return Ok("not provisioned: nothing runs yet".into());
    }
    let config = kakehashi_config::Config::load(config_path)
        .map_err(|e| format!("config {}: {e}", config_path.display()))?;
    let socket = socket.unwrap_or(&config.control.socket);
    let status = match call(socket, &Request::Status) {
        Ok(Response::Status(s)) => s,
        Ok(other) => return Err(format!("kakehashid answered {other:?}").into()),
        Err(e) => {
            return Err(match daemon_restarts() {
                Some((n, result)) if n > 0 => Unhealthy {
                    reason: format!("kakehashid is not serving ({e}); it failed and was restarted {n} time(s) (last result: {result})"),
                    final_: n >= 3,
                },
                _ => format!("kakehashid is not serving: {e}").into(),
            });
        }
    };
    if let Some(p) = status.tpm.as_ref().and_then(|t| t.problem.as_ref()) {
        return Err(Unhealthy {
            reason: format!("the TPM keys do not unseal: {p}"),
            final_: true,
        });
    }
    if config.tunnel.is_some() {
        match &status.tunnel {
            None => {
                return Err(
                    String::from("the tunnel is configured but kakehashid runs none").into(),
                )
            }
            Some(t) if t.problem.is_some() => {
                return Err(format!(
                    "tunnel {}: {}",
                    t.interface,
                    t.problem.as_deref().unwrap_or_default()
                )
                .into())
            }
            Some(t) if t.last_handshake_age_s.is_none() => {
                return Err(format!(
                    "tunnel {}: no handshake with {} yet",
                    t.interface, t.configured_endpoint
                )
                .into())
            }
            Some(_) => {}
        }
    }
    let listen = config.dicom.listen;
    let host = if listen.ip().is_unspecified() {
        std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), listen.port())
    } else {
        listen
    };
    let ae = config.dicom.ae_title.to_string();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start an async runtime: {e}"))?;
    let t = runtime
        .block_on(crate::selftest::echo(&host.to_string(), &ae, &ae))
        .map_err(|e| format!("C-ECHO to this box's DICOM port {host}: {e}"))?;
    Ok(format!(
        "kakehashid serves; keys unseal; spool open; {}C-ECHO to {host} in {} ms",
        if config.tunnel.is_some() {
            "tunnel handshake seen; "
        } else {
            ""
        },
        t.as_millis()
    ))
}

/// The boot's health check (`kakehashi-health.service`, before
/// `boot-complete.target`): tries until `wait` is up; records the outcome
/// for the booted slot; in a counted boot that fails, restarts the box so
/// the previous slot boots.
pub fn health(
    paths: &Paths,
    config_path: &Path,
    wait: Duration,
    reboot: bool,
) -> Result<String, String> {
    let start = Instant::now();
    let mut root_problem = None;
    for c in crate::selftest::appliance_root() {
        if !c.ok {
            root_problem = Some(c.what);
        }
    }
    let outcome = match root_problem {
        Some(p) => Err(p),
        None => loop {
            match check_once(config_path, None) {
                Ok(s) => break Ok(s),
                Err(e) if e.final_ => break Err(e.reason),
                Err(e) if start.elapsed() >= wait => {
                    break Err(format!(
                        "{} (after {} s)",
                        e.reason,
                        start.elapsed().as_secs()
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_secs(2)),
            }
        },
    };
    let slot = paths.booted().unwrap_or_else(|| "?".into());
    let counted = boot::scan(&paths.esp_linux)
        .ok()
        .and_then(|e| e.get(&slot).map(|e| e.counter.is_some()))
        .unwrap_or(false);
    let record = Health {
        slot: slot.clone(),
        version: paths.running_version(),
        ok: outcome.is_ok(),
        reason: outcome.as_ref().err().cloned(),
        at_ms: now_ms(),
        counted,
    };
    if let Ok(text) = serde_json::to_vec_pretty(&record) {
        if let Err(e) = write_atomic(&paths.health(&slot), &text) {
            eprintln!("kakehashi appliance health: cannot record the outcome: {e}");
        }
    }
    if let Err(why) = &outcome {
        if counted && reboot {
            crate::appliance::console(&[
                format!("KAKEHASHI — slot {slot} failed its health check: {why}"),
                "it is not marked good; the box restarts and the previous slot boots".into(),
            ]);
            let _ = std::process::Command::new("systemctl")
                .args(["reboot", "--no-block"])
                .status();
        }
    }
    outcome
}

/// After the boot's assessment: the last update's outcome.
pub fn settle(paths: &Paths) -> Result<Option<Last>, String> {
    let Some(mut last) = read_last(paths) else {
        return Ok(None);
    };
    if last.state != "installing" && last.state != "installed" {
        return Ok(Some(last));
    }
    let booted = paths.booted();
    let entries = boot::scan(&paths.esp_linux)?;
    let state = entries
        .get(&last.slot)
        .map_or(SlotState::Missing, |e| e.state());
    let now = now_ms();
    if booted.as_deref() == Some(last.slot.as_str()) {
        if state != SlotState::Good {
            // Not assessed yet (health failed: the box restarts).
            return Ok(Some(last));
        }
        let healthy = read_health(paths, &last.slot).filter(|h| h.at_ms >= last.changed_ms);
        if healthy.as_ref().is_some_and(|h| h.ok) {
            last.state = "succeeded".into();
            last.reason = None;
            write_atomic(&paths.floor(), format!("{}\n", last.version).as_bytes())?;
        } else {
            return Ok(Some(last));
        }
    } else if last.state == "installing" {
        last.state = "failed".into();
        last.reason = Some(format!(
            "the writing of slot {} was interrupted (power lost or RAUC stopped); the slot was never made bootable",
            last.slot
        ));
    } else {
        match state {
            SlotState::Trying { done: 0, .. } => return Ok(Some(last)),
            _ => {
                last.state = "failed".into();
                let health =
                    read_health(paths, &last.slot).filter(|h| h.at_ms >= last.changed_ms && !h.ok);
                last.reason = Some(match health {
                    Some(h) => format!(
                        "version {} booted from slot {} but failed its health check: {}; the box went back to slot {}",
                        last.version,
                        last.slot,
                        h.reason.unwrap_or_default(),
                        booted.as_deref().unwrap_or("?")
                    ),
                    None => format!(
                        "version {} in slot {} did not come up within its try (no health report: a kernel panic, a root refused by dm-verity, or power lost while it booted); the box went back to slot {}",
                        last.version,
                        last.slot,
                        booted.as_deref().unwrap_or("?")
                    ),
                });
            }
        }
    }
    last.changed_ms = now;
    write_last(paths, &last)?;
    Ok(Some(last))
}

/// When `kakehashi update install` restarts the box into the new slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RebootWhen {
    /// At once (kakehashid stops cleanly first: whatever it acknowledged
    /// is on the data partition).
    Now,
    /// Once nothing is received or sent for 10 s (queued instances wait on
    /// the data partition and go out after the restart).
    WhenIdle,
    /// Not: the new slot boots at the next restart.
    No,
}

/// The RAUC configuration the image carries.
const RAUC_SYSTEM_CONF: &str = "/etc/rauc/system.conf";

/// `http://host[:port]/path`: the bundle streamed to `to` (a local update
/// server; the bundle's signature, not the transport, is what is trusted).
fn http_get(url: &str, to: &Path) -> Result<(), String> {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs")?;
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
    let host_port = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&host_port)
        .map_err(|e| format!("{url}: cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: {authority} has no address"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(15))
        .map_err(|e| format!("{url}: cannot connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    // One write: the request leaves whole, not in pieces.
    stream
        .write_all(
            format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: kakehashi\r\n\r\n")
                .as_bytes(),
        )
        .map_err(|e| format!("{url}: {e}"))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("{url}: {e}"))?;
    let code = line.split_whitespace().nth(1).unwrap_or("");
    if code != "200" {
        return Err(format!("{url}: the server answered {:?}", line.trim()));
    }
    let mut length = None;
    loop {
        line.clear();
        reader
            .read_line(&mut line)
            .map_err(|e| format!("{url}: {e}"))?;
        let l = line.trim();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse::<u64>().ok();
            }
        }
    }
    let mut file = std::fs::File::create(to).map_err(|e| format!("{}: {e}", to.display()))?;
    let copied = std::io::copy(
        &mut reader.by_ref().take(length.unwrap_or(u64::MAX)),
        &mut file,
    )
    .map_err(|e| format!("{url}: {e}"))?;
    if length.is_some_and(|n| n != copied) {
        return Err(format!(
            "{url}: the download ended after {copied} of {} bytes",
            length.unwrap_or(0)
        ));
    }
    file.sync_all()
        .map_err(|e| format!("{}: {e}", to.display()))
}

fn rauc(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("rauc")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run rauc: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text.trim().to_string())
    }
}

/// The compatible this box's RAUC accepts.
fn system_compatible() -> Result<String, String> {
    let text = std::fs::read_to_string(RAUC_SYSTEM_CONF)
        .map_err(|e| format!("{RAUC_SYSTEM_CONF}: {e} (this image cannot install updates)"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("compatible="))
        .map(|c| c.trim().to_string())
        .ok_or_else(|| format!("{RAUC_SYSTEM_CONF}: no compatible="))
}

/// What `rauc info` says of a bundle, its signature checked against the
/// box's keyring.
fn bundle_info(bundle: &Path) -> Result<(String, String), String> {
    let b = bundle.to_string_lossy();
    let text = rauc(&["info", "--output-format=json", &b]).map_err(|e| {
        let lower = e.to_lowercase();
        if lower.contains("signature") || lower.contains("verif") || lower.contains("certificate") {
            format!(
                "refused: {b} is not signed by a key this box trusts ({})",
                last_line(&e)
            )
        } else {
            format!(
                "refused: {b} is not a bundle this box can read ({})",
                last_line(&e)
            )
        }
    })?;
    let json = text
        .lines()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| format!("rauc info printed no JSON: {text}"))?;
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("rauc info: {e}"))?;
    let field = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_string()
    };
    Ok((field("compatible"), field("version")))
}

fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(text)
        .trim()
}

/// `kakehashi update install`: fetch, check, install into the other slot.
/// Each step is told to `say`; the restart is the caller's
/// ([`restart`]).
pub fn install(paths: &Paths, source: &str, say: &dyn Fn(&str)) -> Result<Last, String> {
    paths.appliance()?;
    if !nix::unistd::geteuid().is_root() {
        return Err("run as root: an update writes a slot and the ESP".into());
    }
    std::fs::create_dir_all(&paths.state).map_err(|e| format!("{}: {e}", paths.state.display()))?;
    let incoming = paths.state.join("incoming.raucb");
    let _ = std::fs::remove_file(&incoming);
    let fetched = if source.starts_with("http://") {
        say(&format!("downloading {source}"));
        http_get(source, &incoming)
    } else {
        let from = source.strip_prefix("file://").unwrap_or(source);
        say(&format!("copying {from}"));
        std::fs::copy(from, &incoming)
            .map_err(|e| format!("{from}: {e}"))
            .and_then(|_| {
                std::fs::File::open(&incoming)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| format!("{}: {e}", incoming.display()))
            })
    };
    let result = fetched.and_then(|()| install_fetched(paths, &incoming, say));
    let _ = std::fs::remove_file(&incoming);
    result
}

/// Says when the new slot boots, and restarts accordingly.
pub fn restart(when: RebootWhen, say: &dyn Fn(&str)) {
    say(match when {
        RebootWhen::No => "the new slot boots at the next restart",
        RebootWhen::Now => "restarting now",
        RebootWhen::WhenIdle => {
            "restarting once the relay is idle (nothing received or sent for 10 s)"
        }
    });
    schedule_reboot(when);
}

/// Restarts now (kakehashid is stopped cleanly first), or leaves a
/// transient unit that restarts once the relay is idle.
pub fn schedule_reboot(when: RebootWhen) {
    let result = match when {
        RebootWhen::No => return,
        RebootWhen::Now => std::process::Command::new("systemctl")
            .args(["reboot", "--no-block"])
            .status(),
        RebootWhen::WhenIdle => std::process::Command::new("systemd-run")
            .args([
                "--unit=kakehashi-update-reboot",
                "--collect",
                "--description=Kakehashi: restart into the new slot once the relay is idle",
                "/usr/bin/kakehashi",
                "update",
                "reboot",
                "--when-idle",
            ])
            .status(),
    };
    if let Err(e) = result {
        eprintln!("kakehashi update: cannot restart: {e}");
    }
}

fn install_fetched(paths: &Paths, bundle: &Path, say: &dyn Fn(&str)) -> Result<Last, String> {
    let (compatible, version) = bundle_info(bundle)?;
    let ours = system_compatible()?;
    if compatible != ours {
        return Err(format!(
            "refused: the bundle is for {compatible:?}, this box is {ours:?}"
        ));
    }
    if let Some(why) = refuse_version(
        &version,
        paths.running_version().as_deref(),
        paths.read_floor().as_deref(),
    ) {
        return Err(format!("refused: {why}"));
    }
    say(&format!(
        "bundle {version} for {compatible}: signature good; installing into the slot that did not boot"
    ));
    if let Err(e) = rauc(&["install", &bundle.to_string_lossy()]) {
        // RAUC's LastError says why (a handler's refusal, RAUC's own).
        let why = e
            .lines()
            .find_map(|l| l.trim().strip_prefix("LastError:"))
            .unwrap_or_else(|| last_line(&e))
            .trim()
            .to_string();
        // The record the pre-install handler began says so too (else the
        // next boot would call it interrupted).
        if let Some(mut last) =
            read_last(paths).filter(|l| l.state == "installing" && l.version == version)
        {
            last.state = "failed".into();
            last.reason = Some(format!("rauc install failed: {why}"));
            last.changed_ms = now_ms();
            let _ = write_last(paths, &last);
        }
        return Err(format!("rauc install failed: {why}"));
    }
    let last = read_last(paths).ok_or("rauc installed, but no update record was written")?;
    if last.state != "installed" || last.version != version {
        return Err(format!("rauc installed, but the record says {last:?}"));
    }
    say(&format!(
        "installed {} into slot {}: it is tried once at the next boot",
        last.version, last.slot
    ));
    Ok(last)
}

/// Waits until nothing is received or sent for `quiet`, then restarts.
pub fn reboot_when_idle(socket: &Path, quiet: Duration) -> Result<(), String> {
    use kakehashi_control::{call, Request, Response};
    let mut since = Instant::now();
    loop {
        let busy = match call(socket, &Request::Status) {
            Ok(Response::Status(s)) => {
                s.active_associations > 0 || s.destinations.iter().any(|d| d.in_flight > 0)
            }
            // Nothing runs that could be interrupted.
            _ => false,
        };
        if busy {
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let status = std::process::Command::new("systemctl")
        .arg("reboot")
        .status()
        .map_err(|e| format!("systemctl reboot: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("systemctl reboot: {status}"))
}

/// Both slots and the last update, for `kakehashi update status` and the
/// medium's report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub slots: Vec<boot::SlotReport>,
    pub floor: Option<String>,
    pub last: Option<Last>,
    pub health: Vec<Health>,
}

pub fn report(paths: &Paths) -> Result<Report, String> {
    paths.appliance()?;
    let cmdline = std::fs::read_to_string(&paths.cmdline).unwrap_or_default();
    Ok(Report {
        slots: boot::slots(&paths.esp_linux, &cmdline)?,
        floor: paths.read_floor(),
        last: read_last(paths),
        health: boot::SLOTS
            .iter()
            .filter_map(|s| read_health(paths, s))
            .collect(),
    })
}

impl Report {
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.slots {
            out.push(format!(
                "slot {}: {}, version {}{}",
                s.slot,
                s.state,
                s.version.as_deref().unwrap_or("unknown"),
                if s.booted { " (booted)" } else { "" }
            ));
        }
        match &self.last {
            None => out.push("last update: none".into()),
            Some(l) => {
                out.push(format!(
                    "last update: {} {} into slot {} (from {})",
                    l.state,
                    l.version,
                    l.slot,
                    l.from_version.as_deref().unwrap_or("?")
                ));
                if let Some(r) = &l.reason {
                    out.push(format!("  reason: {r}"));
                }
            }
        }
        for h in &self.health {
            out.push(format!(
                "health of slot {} ({}): {}",
                h.slot,
                h.version.as_deref().unwrap_or("?"),
                if h.ok {
                    "passed".to_string()
                } else {
                    format!("FAILED: {}", h.reason.as_deref().unwrap_or(""))
                }
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Python's own web server over `dir` on a free port, stopped on drop.
    struct PyHttp(std::process::Child, u16);
    impl PyHttp {
        fn serve(dir: &Path) -> PyHttp {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .expect("port")
                .local_addr()
                .expect("addr")
                .port();
            let child = std::process::Command::new("python3")
                .args(["-m", "http.server", "--bind", "127.0.0.1"])
                .arg(port.to_string())
                .current_dir(dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("python3");
            let start = std::time::Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "http.server did not start"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            PyHttp(child, port)
        }
    }
    impl Drop for PyHttp {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn a_bundle_is_fetched_byte_identical_from_a_real_http_server() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Larger than any buffer on the way, and not a repeating pattern.
        let body: Vec<u8> = (0..3_000_003u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(dir.path().join("kakehashi-0.2.0.raucb"), &body).expect("write");
        let server = PyHttp::serve(dir.path());
        let to = dir.path().join("incoming.raucb");
        let url = format!("http://127.0.0.1:{}/kakehashi-0.2.0.raucb", server.1);
        http_get(&url, &to).expect("download");
        assert!(
            std::fs::read(&to).expect("read") == body,
            "not byte-identical"
        );

        let missing = format!("http://127.0.0.1:{}/kakehashi-9.9.9.raucb", server.1);
        let e = http_get(&missing, &to).expect_err("a 404 is an error");
        assert!(
            e.contains("the server answered") && e.contains("404"),
            "{e}"
        );
    }

    #[test]
    fn a_download_cut_short_or_refused_is_an_error_naming_the_url() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            let (mut s, _) = listener.accept().expect("accept");
            // The whole request is read first: unread bytes at close
            // would reset the connection instead of ending it.
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).expect("read");
                assert!(n > 0, "the request ended early");
                request.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
                .expect("write");
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let to = dir.path().join("incoming.raucb");
        let url = format!("http://127.0.0.1:{port}/b.raucb");
        let e = http_get(&url, &to).expect_err("cut short");
        server.join().expect("server");
        assert!(
            e.contains(&url) && e.contains("ended after 10 of 1000 bytes"),
            "{e}"
        );

        // Nothing listens there any more.
        let e = http_get(&url, &to).expect_err("refused");
        assert!(e.contains("cannot connect to 127.0.0.1"), "{e}");
    }

    #[test]
    fn releases_are_compared_by_number_not_text() {
        assert_eq!(release("0.10.0+abc"), Some((0, 10, 0)));
        assert_eq!(release("1.2"), None);
        assert_eq!(release("1.2.3.4"), None);
        assert_eq!(refuse_version("0.10.0", Some("0.9.1+x"), None), None);
        assert!(refuse_version("0.2.0", Some("0.2.0+abc"), None)
            .is_some_and(|w| w.contains("not newer")));
        assert!(refuse_version("0.3.0", Some("0.2.0"), Some("0.4.0"))
            .is_some_and(|w| w.contains("floor is 0.4.0")));
        assert!(refuse_version("latest", Some("0.2.0"), None).is_some());
    }

    fn uki(version: &str) -> Vec<u8> {
        let osrel = format!("ID=debian\nIMAGE_ID=kakehashi\nIMAGE_VERSION={version}\n");
        crate::boot::tests::pe_with(&[(".osrel", osrel.as_bytes()), (".linux", b"kernel")])
    }

    struct Box_ {
        _dir: tempfile::TempDir,
        paths: Paths,
        bundle: PathBuf,
    }

    /// A box running `version` from slot `booted`, its ESP holding `entries`.
    fn a_box(version: &str, booted: &str, entries: &[(&str, &str)]) -> Box_ {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = Paths {
            esp_linux: dir.path().join("esp"),
            state: dir.path().join("state"),
            cmdline: dir.path().join("cmdline"),
            os_release: dir.path().join("os-release"),
        };
        std::fs::create_dir_all(&paths.esp_linux).expect("esp");
        for (file, v) in entries {
            std::fs::write(paths.esp_linux.join(file), uki(v)).expect("uki");
        }
        let b = Box_ {
            bundle: dir.path().join("bundle"),
            _dir: dir,
            paths,
        };
        b.boot(booted, version);
        b
    }

    impl Box_ {
        fn boot(&self, slot: &str, version: &str) {
            std::fs::write(
                &self.paths.cmdline,
                format!("ro kakehashi.slot={slot} panic=10\n"),
            )
            .expect("cmdline");
            std::fs::write(&self.paths.os_release, format!("IMAGE_VERSION={version}\n"))
                .expect("os-release");
        }
        fn backend(&self, args: &[&str]) -> Result<Option<String>, String> {
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            backend(&self.paths, &args)
        }
        fn files(&self) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(&self.paths.esp_linux)
                .expect("esp")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
        /// What RAUC does for a bundle of `version` written to `slot`.
        fn rauc_install(&self, version: &str, slot: &str) -> Result<(), String> {
            std::fs::create_dir_all(&self.bundle).expect("bundle");
            for s in ["a", "b"] {
                std::fs::write(self.bundle.join(format!("kakehashi-{s}.efi")), uki(version))
                    .expect("bundle uki");
            }
            std::fs::write(
                self.bundle.join("manifest.raucm"),
                format!("[update]\ncompatible=kakehashi-appliance-x86_64\nversion={version}\n\n[image.rootfs]\nfilename=root.erofs\n"),
            )
            .expect("manifest");
            let mount = self.bundle.to_string_lossy().into_owned();
            let env = |k: &str| match k {
                "RAUC_TARGET_SLOTS" => Some("1 2".into()),
                "RAUC_SLOT_CLASS_1" => Some("rootfs".into()),
                "RAUC_SLOT_BOOTNAME_1" => Some(slot.into()),
                "RAUC_SLOT_CLASS_2" => Some("verity".into()),
                "RAUC_BUNDLE_MOUNT_POINT" => Some(mount.clone()),
                _ => None,
            };
            pre_install(&self.paths, &env)?;
            self.backend(&["set-state", slot, "bad"])?;
            post_install(&self.paths, &env)
        }
        /// systemd-boot starting `slot`: a counted entry spends a try.
        fn start(&self, slot: &str) {
            let e = crate::boot::scan(&self.paths.esp_linux).expect("scan")[slot].clone();
            if let Some((left, done)) = e.counter {
                std::fs::rename(
                    self.paths.esp_linux.join(&e.file),
                    self.paths.esp_linux.join(format!(
                        "kakehashi-{slot}+{}-{}.efi",
                        left - 1,
                        done + 1
                    )),
                )
                .expect("count");
            }
        }
        fn health(&self, slot: &str, ok: bool, reason: &str) {
            let h = Health {
                slot: slot.into(),
                version: None,
                ok,
                reason: (!ok).then(|| reason.to_string()),
                at_ms: now_ms() + 1,
                counted: true,
            };
            write_atomic(
                &self.paths.health(slot),
                &serde_json::to_vec(&h).expect("json"),
            )
            .expect("health");
        }
    }

    #[test]
    fn the_backend_follows_systemd_boots_order_and_names() {
        let b = a_box("0.1.0", "a", &[("kakehashi-a.efi", "0.1.0")]);
        assert_eq!(b.backend(&["get-primary"]), Ok(Some("a".into())));
        assert_eq!(b.backend(&["get-state", "b"]), Ok(Some("bad".into())));
        // A newer entry being tried starts first; once its try is spent
        // it sorts last, whatever its version.
        std::fs::write(b.paths.esp_linux.join("kakehashi-b+1.efi"), uki("0.2.0")).expect("b");
        assert_eq!(b.backend(&["get-primary"]), Ok(Some("b".into())));
        assert_eq!(b.backend(&["get-state", "b"]), Ok(Some("good".into())));
        b.start("b");
        assert_eq!(b.backend(&["get-primary"]), Ok(Some("a".into())));
        assert_eq!(b.backend(&["get-state", "b"]), Ok(Some("bad".into())));
        assert!(b.backend(&["set-primary", "b"]).is_err());
        assert_eq!(b.backend(&["set-state", "b", "good"]), Ok(None));
        assert_eq!(b.files(), ["kakehashi-a.efi", "kakehashi-b.efi"]);
        assert_eq!(b.backend(&["get-primary"]), Ok(Some("b".into())));
        assert_eq!(b.backend(&["set-state", "a", "bad"]), Ok(None));
        assert_eq!(b.files(), ["kakehashi-b.efi"]);
        assert!(b
            .backend(&["get-state", "c"])
            .is_err_and(|e| e.contains("unknown slot")));
        assert!(b.backend(&["reboot"]).is_err());
    }

    #[test]
    fn an_update_that_boots_and_is_blessed_succeeds_and_raises_the_floor() {
        let b = a_box("0.1.0+x", "a", &[("kakehashi-a.efi", "0.1.0+x")]);
        b.rauc_install("0.2.0", "b").expect("install");
        assert_eq!(b.files(), ["kakehashi-a.efi", "kakehashi-b+1.efi"]);
        assert_eq!(
            read_last(&b.paths).map(|l| l.state),
            Some("installed".into())
        );
        // The next boot: b is tried, passes its health check, is blessed.
        b.start("b");
        b.boot("b", "0.2.0");
        b.health("b", true, "");
        std::fs::rename(
            b.paths.esp_linux.join("kakehashi-b+0-1.efi"),
            b.paths.esp_linux.join("kakehashi-b.efi"),
        )
        .expect("bless");
        let last = settle(&b.paths).expect("settle").expect("last");
        assert_eq!((last.state.as_str(), last.reason), ("succeeded", None));
        assert_eq!(b.paths.read_floor().as_deref(), Some("0.2.0"));
        // Older than the floor (or what runs) is refused before anything is written.
        b.boot("a", "0.1.0+x");
        let err = b.rauc_install("0.1.5", "b").expect_err("downgrade");
        assert!(err.contains("floor is 0.2.0"), "{err}");
        assert_eq!(b.files(), ["kakehashi-a.efi", "kakehashi-b.efi"]);
    }

    #[test]
    fn an_update_that_fails_its_try_is_failed_with_the_reason() {
        let b = a_box("0.2.0", "b", &[("kakehashi-b.efi", "0.2.0")]);
        b.rauc_install("0.3.0", "a").expect("install");
        b.start("a");
        b.boot("a", "0.3.0");
        b.health("a", false, "kakehashid is not serving");
        // Not assessed yet while a runs: the box restarts.
        assert_eq!(
            settle(&b.paths).expect("settle").map(|l| l.state),
            Some("installed".into())
        );
        b.boot("b", "0.2.0");
        let last = settle(&b.paths).expect("settle").expect("last");
        assert_eq!(last.state, "failed");
        let reason = last.reason.unwrap_or_default();
        assert!(
            reason.contains("failed its health check: kakehashid is not serving"),
            "{reason}"
        );
        assert!(reason.contains("went back to slot b"), "{reason}");
        assert_eq!(b.paths.read_floor(), None);

        // One that never reports (a kernel panic, a root dm-verity refuses).
        b.rauc_install("0.3.1", "a").expect("install");
        b.start("a");
        let last = settle(&b.paths).expect("settle").expect("last");
        assert!(
            last.reason
                .unwrap_or_default()
                .contains("did not come up within its try"),
            "{:?}",
            last.state
        );

        // The power lost while slot a was written: pre-install ran, RAUC
        // removed a's entry, post-install never did.
        let env = |k: &str| match k {
            "RAUC_MF_VERSION" => Some("0.3.2".to_string()),
            "RAUC_TARGET_SLOTS" => Some("1".into()),
            "RAUC_SLOT_CLASS_1" => Some("rootfs".into()),
            "RAUC_SLOT_BOOTNAME_1" => Some("a".into()),
            _ => None,
        };
        pre_install(&b.paths, &env).expect("pre-install");
        b.backend(&["set-state", "a", "bad"]).expect("bad");
        assert_eq!(b.backend(&["get-primary"]), Ok(Some("b".into())));
        let last = settle(&b.paths).expect("settle").expect("last");
        assert_eq!(last.state, "failed");
        assert!(last.reason.unwrap_or_default().contains("interrupted"));
    }
}
