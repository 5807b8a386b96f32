//! `kakehashi selftest`: a pass/fail checklist for the field engineer, each
//! failure with its fix. Exit 0 when every check passes, 1 otherwise.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kakehashi_config::{format_bytes, Config, KeyBackend};
use kakehashi_control::{call, Request, Response};
use kakehashi_dicom::scu::{Scu, ScuOptions};
use kakehashi_dicom::uids;
use kakehashi_tpm::keystore::{KeyStore, REENROLL};

pub(crate) struct Check {
    pub(crate) ok: bool,
    pub(crate) what: String,
    fix: Option<String>,
}

fn pass(what: String) -> Check {
    Check {
        ok: true,
        what,
        fix: None,
    }
}

fn fail(what: String, fix: impl Into<String>) -> Check {
    Check {
        ok: false,
        what,
        fix: Some(fix.into()),
    }
}

/// C-ECHO to a destination, never outside the tunnel it must be reached by.
async fn echo_destination(
    config: &Config,
    d: &kakehashi_config::Destination,
) -> Result<Duration, String> {
    let addrs = kakehashi_dicom::scu::resolve(&d.address, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    let ips: Vec<_> = addrs.iter().map(|a| a.ip()).collect();
    if let Some(why) = d.leaves_tunnel(config.tunnel.as_ref(), &ips) {
        return Err(why);
    }
    echo_to(
        &d.address,
        &addrs,
        d.calling_ae_title.as_str(),
        d.ae_title.as_str(),
    )
    .await
}

pub(crate) async fn echo(address: &str, calling: &str, called: &str) -> Result<Duration, String> {
    let addrs = kakehashi_dicom::scu::resolve(address, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    echo_to(address, &addrs, calling, called).await
}

async fn echo_to(
    address: &str,
    addrs: &[std::net::SocketAddr],
    calling: &str,
    called: &str,
) -> Result<Duration, String> {
    let opts = ScuOptions {
        calling_ae: calling.to_string(),
        called_ae: called.to_string(),
        max_pdu: 16384,
        connect_timeout: Duration::from_secs(10),
        // A single-threaded SCP (storescp) answers after the association it
        // serves ends, e.g. the forwarder's lingering one.
        response_timeout: Duration::from_secs(20),
    };
    let t = Instant::now();
    let contexts = [(
        uids::VERIFICATION.to_string(),
        uids::IMPLICIT_VR_LE.to_string(),
    )];
    let mut scu = Scu::connect_to(address, addrs, &opts, &contexts)
        .await
        .map_err(|e| e.to_string())?;
    let pc = scu
        .context_for(uids::VERIFICATION, uids::IMPLICIT_VR_LE)
        .ok_or("the peer refused the Verification SOP class")?;
    let status = scu.echo(pc).await.map_err(|e| e.to_string())?;
    scu.release().await;
    if status != 0 {
        return Err(format!("C-ECHO status 0x{status:04X}"));
    }
    Ok(t.elapsed())
}

/// A Study Root C-FIND for a Patient ID no hospital uses: proves the PACS
/// takes queries from the box (what `[priors]` needs) without reading any
/// patient's data.
async fn find_on_pacs(p: &kakehashi_config::Destination) -> Result<Duration, String> {
    use kakehashi_dicom::query::{tag, Identifier, STUDY_ROOT_FIND};
    let opts = ScuOptions {
        calling_ae: p.calling_ae_title.to_string(),
        called_ae: p.ae_title.to_string(),
        max_pdu: p.max_pdu,
        connect_timeout: p.connect_timeout,
        response_timeout: p.response_timeout,
    };
    let t = Instant::now();
    let contexts = [(
        STUDY_ROOT_FIND.to_string(),
        uids::IMPLICIT_VR_LE.to_string(),
    )];
    let mut scu = Scu::connect(&p.address, &opts, &contexts)
        .await
        .map_err(|e| e.to_string())?;
    let pc = scu
        .context_for(STUDY_ROOT_FIND, uids::IMPLICIT_VR_LE)
        .ok_or("the PACS refused Study Root Query/Retrieve – FIND")?;
    let query = Identifier::new()
        .with(tag::QUERY_RETRIEVE_LEVEL, "STUDY")
        .with(tag::PATIENT_ID, "KAKEHASHI-SELFTEST-NO-SUCH-PATIENT")
        .with(tag::STUDY_INSTANCE_UID, "");
    let (status, _) = scu
        .find(pc, STUDY_ROOT_FIND, &query)
        .await
        .map_err(|e| e.to_string())?;
    scu.release().await;
    if status != 0 {
        return Err(format!("C-FIND status 0x{status:04X}"));
    }
    Ok(t.elapsed())
}

/// Runs every check; the report as text or JSON, and whether all passed.
pub fn report(config_path: &Path, socket: Option<&Path>, json: bool) -> (String, bool) {
    let mut checks = Vec::new();
    let config = match Config::load(config_path) {
        Ok(c) => {
            checks.push(pass(format!("config {} is valid", config_path.display())));
            Some(c)
        }
        Err(e) => {
            checks.push(fail(
                format!("config: {e}"),
                format!("fix the key named above, or run `kakehashi provision --site SITE.toml` again; check with `kakehashid --check-config --config {}`", config_path.display()),
            ));
            None
        }
    };
    if let Some(config) = &config {
        checks.extend(with_config(config, socket));
    }
    checks.extend(appliance_root());
    let failed = checks.iter().filter(|c| !c.ok).count();
    let text = if json {
        let v: Vec<_> = checks
            .iter()
            .map(|c| serde_json::json!({"ok": c.ok, "check": c.what, "fix": c.fix}))
            .collect();
        serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
    } else {
        let mut t = String::new();
        for c in &checks {
            t += &format!("[{}] {}\n", if c.ok { "PASS" } else { "FAIL" }, c.what);
            if let Some(f) = &c.fix {
                t += &format!("       fix: {f}\n");
            }
        }
        t + &format!("{} passed, {failed} failed\n", checks.len() - failed)
    };
    (text, failed == 0)
}

pub fn run(config_path: &Path, socket: Option<&Path>, json: bool) -> i32 {
    let (text, ok) = report(config_path, socket, json);
    print!("{text}");
    i32::from(!ok)
}

/// On the appliance image (root on dm-verity): the root cannot be written,
/// and it is the verified one. Elsewhere: nothing to check.
pub(crate) fn appliance_root() -> Vec<Check> {
    let Some(hash) = std::fs::read_to_string("/proc/cmdline").ok().and_then(|c| {
        c.split_whitespace()
            .find_map(|a| a.strip_prefix("kakehashi.roothash=").map(String::from))
    }) else {
        return Vec::new();
    };
    let mut checks = Vec::new();
    // A write is the real proof; the mount flag answers when the caller
    // could not have written anyway (not root).
    let probe = Path::new("/usr/.kakehashi-write-probe");
    let read_only = match std::fs::write(probe, b"x") {
        Ok(()) => {
            let _ = std::fs::remove_file(probe);
            Ok(false)
        }
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EROFS as i32) => Ok(true),
        Err(_) => nix::sys::statvfs::statvfs("/")
            .map(|v| v.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY)),
    };
    match read_only {
        Ok(true) => checks.push(pass(
            "root filesystem: read-only (a write to /usr fails)".into(),
        )),
        Ok(false) => checks.push(fail(
            "root filesystem: /usr is writable".into(),
            "the box did not boot its read-only image: reflash it",
        )),
        Err(e) => checks.push(fail(
            format!("root filesystem: cannot be inspected ({e})"),
            "the box did not boot its read-only image: reflash it",
        )),
    }
    // veritysetup names the device "root" with a CRYPT-VERITY uuid.
    let verity = std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .any(|d| {
            let dm = d.path().join("dm");
            std::fs::read_to_string(dm.join("name")).is_ok_and(|n| n.trim() == "root")
                && std::fs::read_to_string(dm.join("uuid"))
                    .is_ok_and(|u| u.starts_with("CRYPT-VERITY"))
        });
    if verity {
        checks.push(pass(format!(
            "root filesystem: verified by dm-verity (root hash {hash})"
        )));
    } else {
        checks.push(fail(
            "root filesystem: not on dm-verity".into(),
            "the box did not boot its verified image: reflash it",
        ));
    }
    checks
}

fn with_config(config: &Config, socket: Option<&Path>) -> Vec<Check> {
    let mut checks = Vec::new();
    match &config.tpm {
        None => checks.push(fail(
            "TPM: no [tpm] section; keys are not sealed".into(),
            "provision the box: kakehashi provision --site SITE.toml",
        )),
        Some(tpm) => {
            let name = match &tpm.backend {
                KeyBackend::Tpm { tcti } => tcti.clone(),
                KeyBackend::Software => "software key store".into(),
            };
            match KeyStore::open(tpm).and_then(|mut s| {
                s.check()?;
                s.serial()
            }) {
                Ok(serial) => checks.push(pass(format!(
                    "TPM {name} reachable; identity {serial} signs; the WireGuard and spool keys unseal"
                ))),
                Err(e @ kakehashi_tpm::TpmError::Unreachable { .. }) => checks.push(fail(
                    format!("TPM: {e}"),
                    "enable the TPM in the firmware setup; check that /dev/tpmrm0 exists and kakehashi may use it (group tss)",
                )),
                Err(e @ kakehashi_tpm::TpmError::Blob { .. })
                    if e.to_string().contains("Permission denied") =>
                {
                    checks.push(fail(
                        format!("TPM: {e}"),
                        "run kakehashi selftest as root: the keys are readable by the service user only",
                    ))
                }
                Err(e @ kakehashi_tpm::TpmError::Blob { .. })
                    if e.to_string().contains("No such file") =>
                {
                    checks.push(fail(
                        format!("TPM: {e}"),
                        "this box is not provisioned: kakehashi provision --site SITE.toml",
                    ))
                }
                Err(e) => checks.push(fail(format!("TPM: {e}"), REENROLL)),
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            checks.push(fail(
                format!("cannot start an async runtime: {e}"),
                "report this",
            ));
            return checks;
        }
    };
    let me = config.dicom.ae_title.to_string();
    for s in &config.dicom.sources {
        let (Some(net), Some(port)) = (s.address, s.port) else {
            continue;
        };
        if net.prefix() != if net.addr().is_ipv4() { 32 } else { 128 } {
            continue;
        }
        let address = std::net::SocketAddr::new(net.addr(), port).to_string();
        match runtime.block_on(echo(&address, &me, s.ae_title.as_str())) {
            Ok(t) => checks.push(pass(format!("C-ECHO to local source {} at {address}: {} ms", s.ae_title, t.as_millis()))),
            Err(e) => checks.push(fail(
                format!("C-ECHO to local source {} at {address}: {e}", s.ae_title),
                format!("is the PACS up, and does it know this box as AE {me}? Check the LAN cable and the address in the site file"),
            )),
        }
    }
    let socket = socket.unwrap_or(&config.control.socket);
    let status = match call(socket, &Request::Status) {
        Ok(Response::Status(s)) => Some(s),
        Ok(other) => {
            checks.push(fail(
                format!("kakehashid: unexpected answer {other:?}"),
                "restart kakehashid",
            ));
            None
        }
        Err(e) => {
            checks.push(fail(
                format!("kakehashid: {e}"),
                "start it: systemctl start kakehashid; why it stopped: journalctl -u kakehashid",
            ));
            None
        }
    };
    if let Some(s) = &status {
        if let Some(t) = &s.tpm {
            if let Some(p) = &t.problem {
                checks.push(fail(format!("kakehashid reports its keys: {p}"), REENROLL));
            }
        }
        if config.tunnel.is_some() {
            match &s.tunnel {
                Some(t) if t.up => checks.push(pass(format!(
                    "tunnel {}: handshake {} s ago with {} ({})",
                    t.interface,
                    t.last_handshake_age_s.unwrap_or(0),
                    t.configured_endpoint,
                    t.endpoint.as_deref().unwrap_or("-")
                ))),
                Some(t) => checks.push(fail(
                    format!("tunnel {}: {}", t.interface, t.problem.as_deref().unwrap_or("down")),
                    format!("give the reading center this box's WireGuard public key {} (allowed IPs: the box's tunnel address), check tunnel.peer.public_key, and that UDP to {} leaves the site", t.public_key, t.configured_endpoint),
                )),
                None => checks.push(fail("tunnel: kakehashid runs without it".into(), "restart kakehashid after provisioning")),
            }
        }
    }
    if let Some(p) = &config.pacs {
        match runtime.block_on(echo_destination(config, p)) {
            Ok(t) => checks.push(pass(format!("C-ECHO to the hospital PACS ({}@{}), where results go: {} ms", p.ae_title, p.address, t.as_millis()))),
            Err(e) => checks.push(fail(
                format!("C-ECHO to the hospital PACS ({}@{}): {e}", p.ae_title, p.address),
                format!("the PACS must know this box as calling AE {} (results are stored into it); check pacs.address and pacs.ae_title", p.calling_ae_title),
            )),
        }
    }
    if let (Some(p), Some(priors)) = (&config.pacs, &config.priors) {
        let me = format!(
            "{} at port {}",
            config.dicom.ae_title,
            config.dicom.listen.port()
        );
        let (note, need) = if priors.get {
            (
                "priors come by C-GET on this box's association: the PACS must accept Study Root C-GET".to_string(),
                format!("the PACS must accept Study Root queries and C-GET from calling AE {}", p.calling_ae_title),
            )
        } else {
            (
                format!("it must also know this box as move destination {me}; a C-MOVE cannot be tried without moving a study"),
                format!("the PACS must accept Study Root queries and moves from calling AE {}, and know this box as move destination {me}", p.calling_ae_title),
            )
        };
        match runtime.block_on(find_on_pacs(p)) {
            Ok(t) => checks.push(pass(format!(
                "C-FIND on the hospital PACS ({}@{}) for priors: {} ms ({note})",
                p.ae_title,
                p.address,
                t.as_millis()
            ))),
            Err(e) => checks.push(fail(
                format!(
                    "C-FIND on the hospital PACS ({}@{}) for priors: {e}",
                    p.ae_title, p.address
                ),
                need,
            )),
        }
    }
    for d in &config.destinations {
        let via = if d.via_tunnel {
            " through the tunnel"
        } else {
            ""
        };
        match runtime.block_on(echo_destination(config, d)) {
            Ok(t) => checks.push(pass(format!("C-ECHO to destination {} ({}@{}){via}: {} ms", d.name, d.ae_title, d.address, t.as_millis()))),
            Err(e) => checks.push(fail(
                format!("C-ECHO to destination {} ({}@{}){via}: {e}", d.name, d.ae_title, d.address),
                format!("the reading center must accept calling AE {} at AE {}; if the tunnel check failed, fix that first", d.calling_ae_title, d.ae_title),
            )),
        }
    }
    let dir = &config.spool.dir;
    let probe = std::iter::successors(Some(dir.as_path()), |p| p.parent()).find(|p| p.exists());
    match probe.map(nix::sys::statvfs::statvfs) {
        Some(Ok(st)) => {
            let free = st.blocks_available() * st.fragment_size();
            if free >= config.spool.min_free {
                checks.push(pass(format!(
                    "spool {}: {} free (minimum {})",
                    dir.display(),
                    format_bytes(free),
                    format_bytes(config.spool.min_free)
                )));
            } else {
                checks.push(fail(
                    format!(
                        "spool {}: only {} free, below spool.min_free {}",
                        dir.display(),
                        format_bytes(free),
                        format_bytes(config.spool.min_free)
                    ),
                    "free space on that filesystem, or give the spool a larger disk",
                ));
            }
        }
        _ => checks.push(fail(
            format!("spool {}: cannot read free space", dir.display()),
            "check that the spool directory exists",
        )),
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // 2025-01-01 .. 2100-01-01: a clock outside is surely wrong (a dead RTC battery shows 1970).
    if (1_735_689_600..4_102_444_800).contains(&now) {
        checks.push(pass(format!("clock: {now} s since 1970, plausible")));
    } else {
        checks.push(fail(
            format!("clock: {now} s since 1970 is not plausible"),
            "set the time (timedatectl set-ntp true, or timedatectl set-time), and check the RTC battery",
        ));
    }
    checks
}
