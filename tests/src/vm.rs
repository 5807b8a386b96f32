//! The appliance image in qemu: TCG (this machine's KVM cannot boot a stock
//! kernel), OVMF with Secure Boot (an empty variable store is in setup
//! mode: systemd-boot enrolls the image's keys at the first boot and
//! restarts, Secure Boot is enforced from then on), swtpm as the box's TPM,
//! its LAN and WAN ports on tap devices bridged into a [`Site`]'s box
//! namespace (which then only switches frames: the addresses are the VM's),
//! and a USB stick as the provisioning medium.
//!
//! The image comes from `make image` (image-build/out, or
//! `KAKEHASHI_IMAGE_DIR`); it is built once per test run and shared.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{
    ip, ns_command, run, Site, BOX_LAN_IP, BOX_TUNNEL_IP, BOX_WAN_IP, CENTER_TUNNEL_IP,
    CENTER_WAN_IP, HOSPITAL_IP, WG_PORT,
};
use crate::{read, sop_instance_of_file, testdata, workspace_root, Proc, StoreScp};

/// The built image.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
}

impl Image {
    pub fn get() -> Image {
        let dir = std::env::var_os("KAKEHASHI_IMAGE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("image-build/out"));
        assert!(
            dir.join("disk.img").exists(),
            "{} has no disk.img: run `make image` (make test does)",
            dir.display()
        );
        Image { dir }
    }

    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.img")
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Byte offset and length of partition `label` in disk.img.
    pub fn partition(&self, label: &str) -> (u64, u64) {
        let out = run(Command::new("sfdisk").args(["--json"]).arg(self.disk()));
        let v: serde_json::Value = serde_json::from_str(&out).expect("sfdisk JSON");
        let p = v["partitiontable"]["partitions"]
            .as_array()
            .expect("partitions")
            .iter()
            .find(|p| p["name"] == label)
            .unwrap_or_else(|| panic!("no partition {label}"));
        let sector = 512;
        (
            p["start"].as_u64().expect("start") * sector,
            p["size"].as_u64().expect("size") * sector,
        )
    }
}

/// The box's ports as the VM's kernel names them (the site file says which
/// is which).
pub const VM_LAN_IF: &str = "enp0s3";
pub const VM_WAN_IF: &str = "enp0s4";
/// The reading center's storescp, on its tunnel address.
pub const CENTER_DICOM_PORT: u16 = 11113;
/// The DICOM port a box listens on by default.
pub const DICOM_PORT: u16 = 104;
/// How long a boot of the image may take under TCG (40–60 s is usual).
pub const BOOT: Duration = Duration::from_secs(240);
/// storescu must give up on a box whose power was cut (by default it would
/// wait for a response forever).
pub const STORESCU_TIMEOUTS: &[&str] = &["-to", "10", "-ta", "10", "-td", "20"];
/// systemd's console line once kakehashid has said `READY=1`.
pub const READY: &str = "Started kakehashid.service";
/// The last line of the provisioning summary on the console.
pub const DONE: &str = "the medium can be removed";

/// The site file a field engineer would put on the stick for a box on
/// `site`: the hospital's modality, the center (its key, endpoint and
/// storescp), and which port is the LAN and which the WAN.
pub fn site_toml(site: &Site) -> String {
    format!(
        r#"[site]
name = "Test General Hospital (qemu)"

[box]
tunnel_address = "{BOX_TUNNEL_IP}/24"

[[pacs]]
ae_title = "MODALITY1"
address = "{HOSPITAL_IP}"

[center]
ae_title = "READCENTER"
dicom_address = "{CENTER_TUNNEL_IP}:{CENTER_DICOM_PORT}"
wg_public_key = "{}"
wg_endpoint = "{CENTER_WAN_IP}:{WG_PORT}"
allowed_ips = ["10.8.0.0/24"]

[network.lan]
interface = "{VM_LAN_IF}"
address = "{BOX_LAN_IP}/24"

[network.wan]
interface = "{VM_WAN_IF}"
address = "{BOX_WAN_IP}/24"
"#,
        site.center_public
    )
}

impl Site {
    /// Turns the box namespace into a switch for a VM: its addresses go,
    /// and a bridge per side joins the veth to a tap device qemu opens.
    pub fn for_vm(&self) {
        let b = self.boxns.name();
        ip(&["-n", b, "addr", "flush", "dev", "lan1"]);
        ip(&["-n", b, "addr", "flush", "dev", "wan0"]);
        for (br, veth, tap) in [("brlan", "lan1", "taplan"), ("brwan", "wan0", "tapwan")] {
            ip(&["-n", b, "link", "add", br, "type", "bridge"]);
            ip(&["-n", b, "tuntap", "add", "dev", tap, "mode", "tap"]);
            ip(&["-n", b, "link", "set", veth, "master", br]);
            ip(&["-n", b, "link", "set", tap, "master", br]);
            for dev in [br, tap] {
                ip(&["-n", b, "link", "set", dev, "up"]);
            }
        }
    }
}

/// One box: its disk, firmware variables and TPM state persist across
/// boots, as a real box's would.
#[derive(Debug)]
pub struct BoxVm {
    pub dir: tempfile::TempDir,
    pub disk: PathBuf,
    pub serial: PathBuf,
    medium: Option<PathBuf>,
    medium_inserted: bool,
    ns: Option<String>,
    tpm_state: PathBuf,
    qemu: Option<Proc>,
    swtpm: Option<Proc>,
    boot_offset: u64,
    /// The disk the box runs from (a restart keeps it).
    disk_on: PathBuf,
    /// USB hot plugs so far (each needs its own drive and device id).
    plugs: u32,
    /// The qemu device id of the stick in the box now, if any.
    stick: Option<String>,
    /// A recovery stick in the box, booted first (`image-build/recovery.sh`).
    recovery: Option<PathBuf>,
    pub boots: u32,
    pub started: Option<Instant>,
}

impl BoxVm {
    /// A new box from `image`, its ports on `site` (or unplugged).
    pub fn new(image: &Image, site: Option<&Site>) -> BoxVm {
        let dir = tempfile::Builder::new()
            .prefix("kakehashi-vm-")
            .tempdir()
            .expect("tempdir");
        let disk = dir.path().join("disk.img");
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(image.disk())
            .arg(&disk));
        // An empty variable store: Secure Boot setup mode, as a new box.
        std::fs::copy(
            "/usr/share/OVMF/OVMF_VARS_4M.fd",
            dir.path().join("vars.fd"),
        )
        .expect("OVMF variables (apt-get install ovmf)");
        let tpm_state = dir.path().join("tpm");
        std::fs::create_dir_all(&tpm_state).expect("tpm dir");
        BoxVm {
            serial: dir.path().join("serial.log"),
            disk,
            medium: None,
            medium_inserted: false,
            ns: site.map(|s| s.boxns.name().to_string()),
            tpm_state,
            qemu: None,
            swtpm: None,
            boot_offset: 0,
            disk_on: PathBuf::new(),
            plugs: 0,
            stick: None,
            recovery: None,
            boots: 0,
            started: None,
            dir,
        }
    }

    /// A USB stick: FAT, labelled KAKEHASHI, holding `site.toml` (if given).
    pub fn insert_medium(&mut self, site_toml: Option<&str>) {
        let img = self.dir.path().join("medium.img");
        let _ = std::fs::remove_file(&img);
        // Sparse: room for an update bundle, little of it written.
        run(Command::new("truncate").args(["-s", "640M"]).arg(&img));
        run(Command::new("mkfs.vfat")
            .args(["-n", "KAKEHASHI"])
            .arg(&img));
        if let Some(text) = site_toml {
            let site = self.dir.path().join("site.toml");
            std::fs::write(&site, text).expect("site.toml");
            run(Command::new("mcopy")
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-i")
                .arg(&img)
                .arg(&site)
                .arg("::site.toml"));
        }
        self.medium = Some(img);
        self.medium_inserted = true;
    }

    /// The field engineer's visit: the stick with `site`'s site.toml in,
    /// power on, provisioned; the center learns the box's WireGuard key.
    /// The stick stays in. Returns the box's serial.
    pub fn provision(&mut self, site: &mut Site) -> String {
        self.insert_medium(Some(&site_toml(site)));
        self.boot();
        self.wait_console(DONE, BOOT);
        let serial = self
            .medium_serials()
            .first()
            .cloned()
            .expect("a result directory on the medium");
        let wg = self
            .medium_file(&format!("kakehashi/{serial}/wireguard.pub"))
            .expect("wireguard.pub on the medium");
        site.set_box_public(wg.trim());
        serial
    }

    /// Copies `file` onto the medium as `name` (an update bundle, a
    /// `reboot-now` flag).
    pub fn put_on_medium(&mut self, file: &Path, name: &str) {
        let img = self.medium.clone().expect("a medium (insert_medium first)");
        run(Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-o", "-i"])
            .arg(&img)
            .arg(file)
            .arg(format!("::{name}")));
    }

    /// Removes `name` from the medium.
    pub fn remove_from_medium(&mut self, name: &str) {
        let img = self.medium.clone().expect("a medium");
        let _ = Command::new("mdel")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(&img)
            .arg(format!("::{name}"))
            .output();
    }

    /// A qemu monitor command.
    fn monitor(&self, command: &str) -> String {
        use std::io::{Read as _, Write as _};
        let mon = self.dir.path().join("monitor.sock");
        let mut s = std::os::unix::net::UnixStream::connect(&mon).expect("qemu monitor");
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        s.write_all(format!("{command}\n").as_bytes())
            .expect("monitor write");
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) if !out.is_empty() => break,
                Err(_) => {}
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The stick is plugged into the running box (USB hot plug).
    pub fn plug_medium(&mut self) {
        let img = self.medium.clone().expect("a medium (insert_medium first)");
        self.plugs += 1;
        let n = self.plugs;
        self.monitor(&format!(
            "drive_add 0 if=none,id=hot{n},format=raw,file={}",
            img.display()
        ));
        self.monitor(&format!(
            "device_add usb-storage,bus=xhci.0,drive=hot{n},id=hotstick{n}"
        ));
        self.stick = Some(format!("hotstick{n}"));
        self.medium_inserted = true;
    }

    /// The stick is pulled out of the running box.
    pub fn unplug_medium(&mut self) {
        if let Some(id) = self.stick.take() {
            self.monitor(&format!("device_del {id}"));
        }
        self.medium_inserted = false;
        // The guest lets go of it.
        std::thread::sleep(Duration::from_secs(2));
    }

    /// Where the console is now: [`BoxVm::wait_console_after`] looks only
    /// past it (the box restarts by itself without a new power-on).
    pub fn mark(&self) -> u64 {
        std::fs::metadata(&self.serial).map_or(0, |m| m.len())
    }

    /// The console past `mark`.
    pub fn console_after(&self, mark: u64) -> String {
        let all = std::fs::read(&self.serial).unwrap_or_default();
        strip_escapes(&String::from_utf8_lossy(
            &all[(mark as usize).min(all.len())..],
        ))
    }

    /// Waits until the console past `mark` shows `needle`.
    pub fn wait_console_after(&mut self, mark: u64, needle: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if self.console_after(mark).contains(needle) {
                return start.elapsed();
            }
            if !self.restarted() {
                if let Some(q) = self.qemu.as_mut() {
                    if let Ok(Some(status)) = q.0.try_wait() {
                        panic!(
                            "qemu exited ({status}) before the console showed {needle:?}:\n{}",
                            tail(&self.console_after(mark), 60)
                        );
                    }
                }
            }
            assert!(
                start.elapsed() < timeout,
                "no {needle:?} on the console after {timeout:?}; the last lines:\n{}",
                tail(&self.console_after(mark), 60)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The stick is pulled out (its contents stay readable here).
    pub fn eject_medium(&mut self) {
        self.medium_inserted = false;
    }

    /// The stick goes back in.
    pub fn reinsert_medium(&mut self) {
        self.medium_inserted = self.medium.is_some();
    }

    /// A file from the medium (`kakehashi/…`), if it is there.
    pub fn medium_file(&self, path: &str) -> Option<String> {
        let img = self.medium.as_ref()?;
        let out = Command::new("mtype")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(img)
            .arg(format!("::{path}"))
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The result directories on the medium (one per box serial).
    pub fn medium_serials(&self) -> Vec<String> {
        let Some(img) = &self.medium else {
            return Vec::new();
        };
        let out = Command::new("mdir")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-b", "-i"])
            .arg(img)
            .arg("::kakehashi")
            .output();
        out.ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter_map(|l| l.rsplit('/').find(|s| !s.is_empty()).map(String::from))
                    .filter(|s| s.starts_with("KKH-"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A new TPM: the box's board was swapped (or its TPM cleared).
    pub fn replace_tpm(&mut self) {
        let _ = std::fs::remove_dir_all(&self.tpm_state);
        std::fs::create_dir_all(&self.tpm_state).expect("tpm dir");
    }

    /// Flips one bit of slot `slot`'s erofs superblock (read at every
    /// mount) on the box's disk: its blocks are damaged, and dm-verity
    /// must refuse the root at the next boot.
    pub fn damage_root(&self, image: &Image, slot: &str) {
        let (offset, _) = image.partition(&format!("root-{slot}"));
        let at = offset + 1024 + 16;
        let mut disk = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.disk)
            .expect("disk");
        use std::io::{Read as _, Seek as _, Write as _};
        let mut byte = [0u8];
        disk.seek(std::io::SeekFrom::Start(at)).expect("seek");
        disk.read_exact(&mut byte).expect("read");
        byte[0] ^= 0x01;
        disk.seek(std::io::SeekFrom::Start(at)).expect("seek");
        disk.write_all(&byte).expect("write");
    }

    /// Powers the box on with a recovery stick in, booted first (as a
    /// field engineer picks it in the firmware's boot menu).
    pub fn boot_recovery(&mut self, stick: &Path) {
        self.recovery = Some(stick.to_path_buf());
        self.boot();
    }

    /// The recovery stick is pulled out of the running box.
    pub fn pull_recovery(&mut self) {
        if self.recovery.take().is_some() {
            self.monitor("device_del recoverydev");
        }
    }

    /// The firmware's variable store (Secure Boot keys, boot entries).
    pub fn vars(&self) -> PathBuf {
        self.dir.path().join("vars.fd")
    }

    /// Powers the box on (disk, firmware variables and TPM as they are).
    pub fn boot(&mut self) {
        self.boot_with(&self.disk.clone());
    }

    pub fn boot_with(&mut self, disk: &Path) {
        assert!(self.qemu.is_none(), "the box is already on");
        self.boots += 1;
        self.note(&format!("power on #{}", self.boots));
        self.boot_offset = std::fs::metadata(&self.serial).map_or(0, |m| m.len());
        self.disk_on = disk.to_path_buf();
        self.spawn();
        self.started = Some(Instant::now());
    }

    /// A line of the test's own in the console log.
    fn note(&self, what: &str) {
        let mut serial = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.serial)
            .expect("serial log");
        use std::io::Write as _;
        writeln!(serial, "\n===== test: {what} =====").expect("serial");
    }

    /// The guest restarted itself (qemu runs with -no-reboot and exits):
    /// it is started again with everything as it is, as a real box's
    /// restart would be. qemu's own warm reset under TCG once hung in the
    /// firmware for minutes (CI), which no real box does.
    fn restarted(&mut self) -> bool {
        let Some(q) = self.qemu.as_mut() else {
            return false;
        };
        match q.0.try_wait() {
            Ok(Some(status)) if status.success() => {
                self.qemu = None;
                self.swtpm = None;
                self.note("the guest restarted itself");
                self.spawn();
                true
            }
            _ => false,
        }
    }

    /// qemu and swtpm with the box's state (no bookkeeping of a power-on).
    fn spawn(&mut self) {
        let disk = self.disk_on.clone();
        let sock = self.dir.path().join("swtpm.sock");
        let _ = std::fs::remove_file(&sock);
        let swtpm = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", self.tpm_state.display()))
            .args(["--ctrl"])
            .arg(format!("type=unixio,path={}", sock.display()))
            .arg("--terminate")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm (apt-get install swtpm)");
        self.swtpm = Some(Proc(swtpm));
        crate::wait_until("swtpm's socket", Duration::from_secs(10), || sock.exists());
        let d = self.dir.path();
        let mut cmd = ns_command(self.ns.as_deref(), "qemu-system-x86_64");
        cmd.args([
            "-machine",
            "q35,smm=on,accel=tcg",
            "-m",
            "1024",
            "-smp",
            "2",
        ])
        .args(["-global", "driver=cfi.pflash01,property=secure,value=on"])
        .args([
            "-drive",
            "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
        ])
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            d.join("vars.fd").display()
        ))
        // cache=none: the guest's flushes reach the host's disk, and a
        // power cut (SIGKILL) loses whatever the guest had not flushed.
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=disk,cache=none",
            disk.display()
        ))
        // Fixed PCI addresses: the firmware's boot entry names the disk by
        // its path, which must not move when the stick is pulled out (a
        // real box's USB controller stays where it is).
        .args(["-device", "virtio-blk-pci,drive=disk,addr=0x5"])
        .args(["-device", "qemu-xhci,id=xhci,addr=0x2"])
        .arg("-chardev")
        .arg(format!("socket,id=chrtpm,path={}", sock.display()))
        .args([
            "-tpmdev",
            "emulator,id=tpm0,chardev=chrtpm",
            "-device",
            "tpm-tis,tpmdev=tpm0",
        ])
        .args(["-display", "none", "-chardev"])
        .arg(format!(
            "file,id=ser,path={},append=on",
            self.serial.display()
        ))
        .args(["-serial", "chardev:ser", "-no-reboot"])
        .arg("-monitor")
        .arg(format!(
            "unix:{},server,nowait",
            d.join("monitor.sock").display()
        ));
        if self.ns.is_some() {
            cmd.args([
                "-netdev",
                "tap,id=lan,ifname=taplan,script=no,downscript=no",
            ])
            .args([
                "-device",
                // romfile= (no boot ROM): a box boots from its disk only.
                "virtio-net-pci,netdev=lan,addr=0x3,mac=52:54:00:4b:00:01,romfile=",
            ])
            .args([
                "-netdev",
                "tap,id=wan,ifname=tapwan,script=no,downscript=no",
            ])
            .args([
                "-device",
                "virtio-net-pci,netdev=wan,addr=0x4,mac=52:54:00:4b:00:02,romfile=",
            ]);
        } else {
            cmd.args(["-nic", "none"]);
        }
        self.stick = None;
        if let Some(m) = self.medium.as_ref().filter(|_| self.medium_inserted) {
            cmd.arg("-drive")
                .arg(format!("if=none,id=stick,format=raw,file={}", m.display()))
                .args(["-device", "usb-storage,bus=xhci.0,drive=stick,id=stickdev"]);
            self.stick = Some("stickdev".into());
        }
        if let Some(r) = &self.recovery {
            cmd.arg("-drive")
                .arg(format!(
                    "if=none,id=recovery,format=raw,readonly=on,file={}",
                    r.display()
                ))
                .args([
                    "-device",
                    "usb-storage,bus=xhci.0,drive=recovery,id=recoverydev,bootindex=0",
                ]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join(format!("qemu-{}.log", self.boots)))
            .expect("log");
        let child = cmd
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("qemu (apt-get install qemu-system-x86)");
        self.qemu = Some(Proc(child));
    }

    /// The serial console since this boot began, without terminal escape
    /// sequences (systemd colours its status lines).
    pub fn console(&self) -> String {
        let all = std::fs::read(&self.serial).unwrap_or_default();
        strip_escapes(&String::from_utf8_lossy(
            &all[(self.boot_offset as usize).min(all.len())..],
        ))
    }

    /// Waits until the console (this boot) shows `needle`; how long since
    /// power on.
    pub fn wait_console(&mut self, needle: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if self.console().contains(needle) {
                return self.started.map_or(Duration::ZERO, |s| s.elapsed());
            }
            if !self.restarted() {
                if let Some(q) = self.qemu.as_mut() {
                    if let Ok(Some(status)) = q.0.try_wait() {
                        panic!(
                            "qemu exited ({status}) before the console showed {needle:?}:\n{}",
                            tail(&self.console(), 60)
                        );
                    }
                }
            }
            assert!(
                start.elapsed() < timeout,
                "no {needle:?} on the console after {timeout:?}; the last lines:\n{}",
                tail(&self.console(), 60)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Pulls the plug: qemu is killed, the guest's memory is lost, and with
    /// it everything the guest had not flushed to its disk.
    pub fn power_cut(&mut self) {
        self.qemu = None;
        self.swtpm = None;
    }

    /// An orderly shutdown (ACPI power button), at most `timeout`.
    pub fn shutdown(&mut self, timeout: Duration) {
        let mon = self.dir.path().join("monitor.sock");
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&mon) {
            use std::io::Write as _;
            let _ = s.write_all(b"system_powerdown\n");
        }
        let start = Instant::now();
        if let Some(q) = self.qemu.as_mut() {
            while start.elapsed() < timeout {
                if let Ok(Some(_)) = q.0.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        self.power_cut();
    }
}

impl Drop for BoxVm {
    /// A failed test keeps the box's console (its directory goes).
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Tests of one binary run side by side: one file per box.
            let keep = std::env::temp_dir().join(format!(
                "kakehashi-vm-failed-{}-{}.log",
                std::process::id(),
                self.dir
                    .path()
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
            if std::fs::copy(&self.serial, &keep).is_ok() {
                eprintln!("the box's serial console: {}", keep.display());
            }
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Text without ANSI escape sequences (CSI `ESC [ … letter`, and the
/// `ESC [ = 3 h` mode switches OVMF sends).
pub fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            if c != '\r' {
                out.push(c);
            }
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        }
    }
    out
}

/// The reading center: like any PACS it serves several associations at
/// once and gives up on one whose peer went silent (storescp `--fork`,
/// `--dimse-timeout`). A single-process storescp without a timeout waits
/// for ever on an association whose box lost its power in the middle of an
/// instance, and answers no other: no box could deliver to it again.
/// Each reception gets a file of its own (`--unique-filenames`): an instance
/// the box sends again after a power cut is written next to the first copy,
/// and the child that gave up on the cut association deletes only its own
/// partial file (with file names from the SOP Instance UID it deleted the
/// whole copy another child had written meanwhile).
pub fn center_scp(site: &Site) -> StoreScp {
    StoreScp::start_with(
        CENTER_DICOM_PORT,
        &std::env::temp_dir(),
        Some(site.center.name()),
        "READCENTER",
        &["--fork", "--dimse-timeout", "60", "--unique-filenames"],
    )
}

/// The center's files by SOP instance UID (a file storescp is still writing
/// has none yet).
/// A UID received more than once (sent again after a power cut) keeps its
/// longest file: a whole copy, not one cut short.
pub fn by_uid(scp: &StoreScp) -> HashMap<String, Vec<u8>> {
    let mut out: HashMap<String, Vec<u8>> = HashMap::new();
    for f in scp.files() {
        let bytes = read(&f);
        let Some(uid) = sop_instance_of_file(&bytes) else {
            continue;
        };
        if out.get(&uid).is_none_or(|b| b.len() < bytes.len()) {
            out.insert(uid, bytes);
        }
    }
    out
}

pub fn uid_of(path: &Path) -> String {
    sop_instance_of_file(&read(path)).expect("uid")
}

/// Every file in `sent` is at the center with an identical dataset.
pub fn assert_arrived_identical(sent: &[PathBuf], scp: &StoreScp) {
    let got = by_uid(scp);
    for f in sent {
        let original = read(f);
        let uid = sop_instance_of_file(&original).expect("uid");
        let arrived = got
            .get(&uid)
            .unwrap_or_else(|| panic!("{uid} did not arrive at the center"));
        assert!(
            testdata::dataset_of_file(arrived) == testdata::dataset_of_file(&original),
            "{uid}: the dataset changed on the way"
        );
    }
}

/// Waits until every file in `sent` is at the center, whole (storescp
/// writes a file as it receives it): then checks each is identical.
pub fn wait_delivered(scp: &StoreScp, sent: &[PathBuf], timeout: Duration) {
    let want: HashMap<String, usize> = sent
        .iter()
        .map(|f| {
            let bytes = read(f);
            let len = testdata::dataset_of_file(&bytes).map_or(0, <[u8]>::len);
            (sop_instance_of_file(&bytes).expect("uid"), len)
        })
        .collect();
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        let got = by_uid(scp);
        let whole = want.iter().all(|(u, len)| {
            got.get(u)
                .and_then(|b| testdata::dataset_of_file(b))
                .is_some_and(|d| d.len() >= *len)
        });
        if whole {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_arrived_identical(sent, scp);
}
