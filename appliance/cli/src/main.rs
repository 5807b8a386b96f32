//! `kakehashi`, the operator CLI. It talks to a running kakehashid over the
//! control socket; it never opens the spool itself (the daemon owns it).
//! `provision` and `selftest` are for the box's installer (module
//! `provision`, `selftest`); `appliance render|medium` are what the
//! appliance image's units run (module `appliance`, `render`);
//! `appliance slots` reads the A/B slots' boot entries (module `boot`);
//! `update` and `appliance rauc-*|health|update-settle` are the A/B update
//! path (module `update`, docs/updates.md).
//!
//! Exit codes: 0 done; 1 the daemon answered with an error; 2 usage;
//! 69 the daemon cannot be reached.

#![forbid(unsafe_code)]

mod appliance;
mod boot;
mod provision;
mod render;
mod selftest;
mod update;

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use kakehashi_config::{format_bytes, DEFAULT_CONTROL_SOCKET};
use kakehashi_control::{
    call, QueueEntry, Request, Response, ResultEntry, StatusReport, StudyInfo, UrgentInfo,
    UrgentState,
};

/// Operate a Kakehashi box: see what waits, what failed, and act on it.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = "Examples:\n  kakehashi provision --site site.toml\n  kakehashi selftest\n  kakehashi status\n  kakehashi queue list --dead\n  kakehashi queue retry --all\n  kakehashi queue purge 42 --yes\n  kakehashi results\n  kakehashi results release 57\n  kakehashi audit --limit 50 --json"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Common {
    /// Control socket of kakehashid.
    #[arg(long, global = true, env = "KAKEHASHI_SOCKET", default_value = DEFAULT_CONTROL_SOCKET)]
    socket: PathBuf,
    /// Machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Health of the box: spool use, and per destination queue, age, last success and error.
    Status,
    /// The store-and-forward queue.
    #[command(subcommand)]
    Queue(QueueCmd),
    /// The studies received from the hospital (current) and the priors
    /// fetched for them: instances, bytes, and where the prefetch stands.
    Studies,
    /// Results (reports, SRs, KOS) from the reading center on their way to
    /// the hospital's PACS, and those held because they match no study this
    /// box relayed. Delivered ones are in the audit trail.
    #[command(subcommand_required = false, args_conflicts_with_subcommands = true)]
    Results {
        #[command(subcommand)]
        action: Option<ResultsCmd>,
    },
    /// Urgent findings (results the center sent with priority HIGH), who was
    /// told and when; acknowledge one to stop its notices.
    #[command(subcommand_required = false, args_conflicts_with_subcommands = true)]
    Urgent {
        #[command(subcommand)]
        action: Option<UrgentCmd>,
    },
    /// The audit trail: associations, receptions, deliveries, dead letters, operator actions.
    Audit {
        /// Show records after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many records.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Set up this box on site: check the TPM, create the identity and sealed
    /// keys (kept if they exist and load), write the config from a site file,
    /// and print what the reading center needs (WireGuard key, identity, CSR).
    Provision {
        /// The site file (see provisioning/site.toml).
        #[arg(long)]
        site: PathBuf,
        /// Where to write the box's config.
        #[arg(long, default_value = kakehashi_config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Replace the keys that no longer load on this TPM (after a TPM reset
        /// or replacement, or a firmware change with PCR-bound keys); keys that
        /// still load are kept. The center must re-enroll what is replaced.
        #[arg(long, conflicts_with = "rotate")]
        force: bool,
        /// Replace every key, also those that still load (a suspected
        /// compromise). Refused while the spool holds instances sealed with
        /// the current spool key.
        #[arg(long)]
        rotate: bool,
    },
    /// What the appliance image's units run (not for a person at a prompt).
    #[command(subcommand)]
    Appliance(ApplianceCmd),
    /// Signed A/B updates of the appliance image (docs/updates.md).
    #[command(subcommand)]
    Update(UpdateCmd),
    /// Check everything a working box needs, with a fix for each failure:
    /// config, TPM and keys, C-ECHO to local sources and destinations, tunnel,
    /// spool space, clock. Exit 0 only if all pass.
    Selftest {
        /// The box's config.
        #[arg(long, env = "KAKEHASHI_CONFIG", default_value = kakehashi_config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum UpdateCmd {
    /// Install a signed bundle (`make update-bundle`) into the slot that did
    /// not boot, to be tried once at the next boot. Refused: a bundle not
    /// signed by the build's update key, for another compatible, or not
    /// newer than the version running and the floor.
    Install {
        /// A file, file:///path, or http://host[:port]/path.
        source: String,
        /// When to restart into the new slot.
        #[arg(long, value_enum, default_value = "when-idle")]
        reboot: update::RebootWhen,
    },
    /// Both slots (version, good/trying/bad, which booted) and the last
    /// update's outcome with its reason.
    Status,
    /// Restart once the relay is idle (what `install --reboot when-idle`
    /// schedules).
    Reboot {
        #[arg(long, required = true)]
        when_idle: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ApplianceCmd {
    /// Write the network (systemd-networkd), the tunnel's TUN and the
    /// firewall (nftables) from the config, and load the firewall.
    Render {
        #[arg(long, env = "KAKEHASHI_CONFIG", default_value = kakehashi_config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Write under this directory instead of / and apply nothing (to look).
        #[arg(long)]
        root: Option<PathBuf>,
    },
    /// Provision from a FAT medium labelled KAKEHASHI holding site.toml (or
    /// only report), and write the results back to it.
    Medium {
        /// The medium's block device (/dev/sdb1).
        device: PathBuf,
        #[arg(long, env = "KAKEHASHI_CONFIG", default_value = kakehashi_config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// The A/B slots: each one's boot entry (good, trying, bad, none), the
    /// version of its UKI, and which one this boot came from.
    Slots {
        /// The ESP's directory of UKIs.
        #[arg(long, default_value = "/efi/EFI/Linux")]
        esp_linux: PathBuf,
        /// The kernel command line to find the booted slot in.
        #[arg(long, default_value = "/proc/cmdline")]
        cmdline: PathBuf,
    },
    /// RAUC's custom bootloader backend: get-primary, set-primary SLOT,
    /// get-state SLOT, set-state SLOT good|bad.
    RaucBackend {
        #[arg(num_args = 1..=3)]
        args: Vec<String>,
    },
    /// RAUC's pre-install handler: refuses what is not newer.
    RaucPreInstall,
    /// RAUC's post-install handler: the new slot's UKI to the ESP, tried once.
    RaucPostInstall,
    /// The boot's health check (before boot-complete.target): kakehashid
    /// serves, the keys unseal, the spool opens, the tunnel handshakes,
    /// the DICOM port answers C-ECHO. A failure in a counted boot restarts
    /// the box into the previous slot.
    Health {
        #[arg(long, env = "KAKEHASHI_CONFIG", default_value = kakehashi_config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// How long to wait for the box to come good.
        #[arg(long, default_value = "180", value_name = "SECONDS")]
        wait: u64,
        /// Record only; never restart.
        #[arg(long)]
        no_reboot: bool,
    },
    /// After the boot's assessment: the last update's outcome.
    UpdateSettle,
}

#[derive(Debug, Subcommand)]
enum ResultsCmd {
    /// List them (the default).
    List,
    /// Deliver held results to the PACS after all: you checked that they
    /// belong to the hospital (by id, or --all).
    Release {
        /// Result ids as shown by `kakehashi results`.
        ids: Vec<u64>,
        /// Every held result.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Delete held results for good (by id). Asks for confirmation.
    Purge {
        /// Result ids as shown by `kakehashi results`.
        #[arg(required = true)]
        ids: Vec<u64>,
        /// Do not ask.
        #[arg(long, short)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
enum UrgentCmd {
    /// List them (the default): open ones are not acknowledged yet.
    List,
    /// The finding reached someone who acts on it: stop the notices.
    Ack {
        /// The id shown by `kakehashi urgent` (and in the e-mail).
        id: u64,
        /// Who took note, e.g. "Dr Sato, by phone" (recorded in the audit trail).
        #[arg(long)]
        by: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum QueueCmd {
    /// Instances waiting or dead-lettered.
    List {
        /// Only this destination.
        #[arg(long)]
        destination: Option<String>,
        /// Only dead letters.
        #[arg(long)]
        dead: bool,
        /// At most this many, oldest first (0: all).
        #[arg(long, default_value_t = 200)]
        limit: usize,
    },
    /// Put dead letters back in the queue (by id, or --all).
    Retry(Select),
    /// Give up on queued instances: they become dead letters (to be
    /// purged, or retried later). By id, or --stuck for every instance
    /// flagged stuck (still refused after retry.stuck_after*).
    DeadLetter {
        /// Instance ids as shown by `queue list`.
        ids: Vec<u64>,
        /// Every queued instance flagged stuck (of --destination, if given).
        #[arg(long, conflicts_with = "ids")]
        stuck: bool,
        /// Only this destination.
        #[arg(long)]
        destination: Option<String>,
    },
    /// Delete dead letters for good (by id, or --all). Asks for confirmation.
    Purge {
        #[command(flatten)]
        select: Select,
        /// Do not ask.
        #[arg(long, short)]
        yes: bool,
    },
}

#[derive(Debug, Args)]
struct Select {
    /// Instance ids as shown by `queue list`.
    ids: Vec<u64>,
    /// Every dead letter (of --destination, if given).
    #[arg(long, conflicts_with = "ids")]
    all: bool,
    /// Only this destination.
    #[arg(long)]
    destination: Option<String>,
}

impl Select {
    fn check(&self) -> Result<(), String> {
        if self.ids.is_empty() && !self.all {
            return Err("name instance ids, or --all for every dead letter".into());
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kakehashi: {e}");
            ExitCode::from(69)
        }
    }
}

fn run(cli: &Cli) -> Result<ExitCode, kakehashi_control::ClientError> {
    let request = match &cli.command {
        Command::Provision {
            site,
            config,
            force,
            rotate,
        } => {
            use kakehashi_tpm::keystore::Replace;
            let replace = match (force, rotate) {
                (_, true) => Replace::All,
                (true, _) => Replace::Unloadable,
                _ => Replace::Nothing,
            };
            return Ok(
                match provision::run(site, config, replace, cli.common.json) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("kakehashi provision: {e}");
                        ExitCode::from(1)
                    }
                },
            );
        }
        Command::Appliance(ApplianceCmd::Render { config, root }) => {
            let result = match root {
                Some(r) => appliance::render(config, r, false),
                None => appliance::render(config, std::path::Path::new("/"), true),
            };
            return Ok(match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kakehashi appliance render: {e}");
                    ExitCode::from(1)
                }
            });
        }
        Command::Appliance(ApplianceCmd::Medium { device, config }) => {
            return Ok(ExitCode::from(appliance::medium(device, config) as u8));
        }
        Command::Appliance(ApplianceCmd::RaucBackend { args }) => {
            return Ok(match update::backend(&update::Paths::default(), args) {
                Ok(out) => {
                    if let Some(o) = out {
                        println!("{o}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kakehashi rauc-backend: {e}");
                    ExitCode::from(1)
                }
            });
        }
        Command::Appliance(ApplianceCmd::RaucPreInstall | ApplianceCmd::RaucPostInstall) => {
            let env = |k: &str| std::env::var(k).ok();
            let paths = update::Paths::default();
            let (what, result) = match &cli.command {
                Command::Appliance(ApplianceCmd::RaucPreInstall) => {
                    ("pre-install", update::pre_install(&paths, &env))
                }
                _ => ("post-install", update::post_install(&paths, &env)),
            };
            return Ok(match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kakehashi {what}: {e}");
                    ExitCode::from(1)
                }
            });
        }
        Command::Appliance(ApplianceCmd::Health {
            config,
            wait,
            no_reboot,
        }) => {
            let paths = update::Paths::default();
            let wait = std::time::Duration::from_secs(*wait);
            return Ok(match update::health(&paths, config, wait, !no_reboot) {
                Ok(s) => {
                    println!("healthy: {s}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kakehashi health: FAILED: {e}");
                    ExitCode::from(1)
                }
            });
        }
        Command::Appliance(ApplianceCmd::UpdateSettle) => {
            return Ok(match update::settle(&update::Paths::default()) {
                Ok(Some(last)) => {
                    println!(
                        "last update: {} {} (slot {}){}",
                        last.state,
                        last.version,
                        last.slot,
                        last.reason.map(|r| format!(": {r}")).unwrap_or_default()
                    );
                    ExitCode::SUCCESS
                }
                Ok(None) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kakehashi update-settle: {e}");
                    ExitCode::from(1)
                }
            });
        }
        Command::Update(UpdateCmd::Install { source, reboot }) => {
            let paths = update::Paths::default();
            let say = |l: &str| eprintln!("kakehashi update: {l}");
            return Ok(match update::install(&paths, source, &say) {
                Ok(last) => {
                    if cli.common.json {
                        println!("{}", serde_json::to_string_pretty(&last)?);
                    }
                    update::restart(*reboot, &say);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kakehashi update install: {e}");
                    ExitCode::from(1)
                }
            });
        }
        Command::Update(UpdateCmd::Status) => {
            return Ok(match update::report(&update::Paths::default()) {
                Ok(r) if cli.common.json => {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                    ExitCode::SUCCESS
                }
                Ok(r) => {
                    for l in r.lines() {
                        println!("{l}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kakehashi update status: {e}");
                    ExitCode::from(1)
                }
            });
        }
        Command::Update(UpdateCmd::Reboot { .. }) => {
            return Ok(
                match update::reboot_when_idle(
                    &cli.common.socket,
                    std::time::Duration::from_secs(10),
                ) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("kakehashi update reboot: {e}");
                        ExitCode::from(1)
                    }
                },
            );
        }
        Command::Appliance(ApplianceCmd::Slots { esp_linux, cmdline }) => {
            let line = std::fs::read_to_string(cmdline).unwrap_or_default();
            return Ok(match boot::slots(esp_linux, &line) {
                Ok(slots) if cli.common.json => {
                    println!("{}", serde_json::to_string_pretty(&slots)?);
                    ExitCode::SUCCESS
                }
                Ok(slots) => {
                    for s in slots {
                        println!(
                            "slot {}: {}, version {}{}{}",
                            s.slot,
                            s.state,
                            s.version.as_deref().unwrap_or("unknown"),
                            if s.booted { " (booted)" } else { "" },
                            s.problem.map(|p| format!(" ({p})")).unwrap_or_default()
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kakehashi appliance slots: {e}");
                    ExitCode::from(1)
                }
            });
        }
        Command::Selftest { config } => {
            let socket = std::env::var_os("KAKEHASHI_SOCKET")
                .map(|_| cli.common.socket.clone())
                .or_else(|| {
                    (cli.common.socket != std::path::Path::new(DEFAULT_CONTROL_SOCKET))
                        .then(|| cli.common.socket.clone())
                });
            let code = selftest::run(config, socket.as_deref(), cli.common.json);
            return Ok(ExitCode::from(code as u8));
        }
        Command::Status => Request::Status,
        Command::Studies => Request::Studies,
        Command::Urgent { action } => match action {
            None | Some(UrgentCmd::List) => Request::Urgent,
            Some(UrgentCmd::Ack { id, by }) => Request::UrgentAck {
                id: *id,
                by: by.clone(),
            },
        },
        Command::Results { action } => match action {
            None | Some(ResultsCmd::List) => Request::Results,
            Some(ResultsCmd::Release { ids, all }) => {
                if ids.is_empty() && !all {
                    eprintln!("kakehashi results release: name result ids, or --all for every held result");
                    return Ok(ExitCode::from(2));
                }
                Request::ResultsRelease { ids: ids.clone() }
            }
            Some(ResultsCmd::Purge { ids, yes }) => {
                if !*yes
                    && !confirm(&format!(
                        "Delete held result(s) {} for good? They will never reach the PACS.",
                        join(ids)
                    ))
                {
                    println!("Nothing purged.");
                    return Ok(ExitCode::from(1));
                }
                Request::ResultsPurge { ids: ids.clone() }
            }
        },
        Command::Audit { after, limit } => Request::Audit {
            after: *after,
            limit: *limit,
        },
        Command::Queue(QueueCmd::DeadLetter {
            ids,
            stuck,
            destination,
        }) => {
            if ids.is_empty() && !stuck {
                eprintln!("kakehashi queue dead-letter: name instance ids, or --stuck for every instance flagged stuck");
                return Ok(ExitCode::from(2));
            }
            Request::QueueDeadLetter {
                destination: destination.clone(),
                ids: ids.clone(),
                stuck_only: *stuck,
            }
        }
        Command::Queue(QueueCmd::List {
            destination,
            dead,
            limit,
        }) => Request::QueueList {
            destination: destination.clone(),
            dead_only: *dead,
            limit: (*limit > 0).then_some(*limit),
        },
        Command::Queue(QueueCmd::Retry(sel)) => {
            if let Err(e) = sel.check() {
                eprintln!("kakehashi queue retry: {e}");
                return Ok(ExitCode::from(2));
            }
            Request::QueueRetry {
                destination: sel.destination.clone(),
                ids: sel.ids.clone(),
            }
        }
        Command::Queue(QueueCmd::Purge { select, yes }) => {
            if let Err(e) = select.check() {
                eprintln!("kakehashi queue purge: {e}");
                return Ok(ExitCode::from(2));
            }
            // Show what would go, then ask.
            let listing = call(
                &cli.common.socket,
                &Request::QueueList {
                    destination: select.destination.clone(),
                    dead_only: true,
                    limit: None,
                },
            )?;
            let victims: Vec<QueueEntry> = match listing {
                Response::Queue { entries, .. } => entries
                    .into_iter()
                    .filter(|e| select.all || select.ids.contains(&e.id))
                    .collect(),
                other => return Ok(print_error(&other)),
            };
            if victims.is_empty() {
                println!(
                    "No matching dead letters; nothing to purge (only dead letters can be purged)."
                );
                return Ok(ExitCode::SUCCESS);
            }
            if !*yes {
                print_queue(&victims);
                if !confirm(&format!("Delete these {} dead-lettered instance(s) for good? They will never reach the destination.", victims.len())) {
                    println!("Nothing purged.");
                    return Ok(ExitCode::from(1));
                }
            }
            Request::QueuePurge {
                destination: select.destination.clone(),
                ids: victims.iter().map(|v| v.id).collect(),
            }
        }
    };
    let response = call(&cli.common.socket, &request)?;
    if cli.common.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&response).unwrap_or_default()
        );
        return Ok(if matches!(response, Response::Error { .. }) {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        });
    }
    match &response {
        Response::Status(s) => print_status(s),
        Response::Queue { entries, .. } => print_queue(entries),
        Response::Retried { ids } => println!("Requeued {} instance(s): {}", ids.len(), join(ids)),
        Response::Purged { ids } => println!("Purged {} instance(s): {}", ids.len(), join(ids)),
        Response::Results { entries } => print_results(entries),
        Response::Studies { entries } => print_studies(entries),
        Response::Urgent { entries } => print_urgent(entries),
        Response::Released { ids } => println!(
            "Released {} held result(s) for delivery to the PACS: {}",
            ids.len(),
            join(ids)
        ),
        Response::DeadLettered { ids } => println!(
            "Dead-lettered {} instance(s): {} (`kakehashi queue purge` deletes them, `queue retry` puts them back)",
            ids.len(),
            join(ids)
        ),
        Response::Audit { records } => {
            for r in records {
                println!(
                    "{:>6}  {}  {:<20} {:<24} {}{}{}",
                    r.seq,
                    when(r.time_ms),
                    word(r.event),
                    r.actor,
                    r.sop_instance_uid
                        .as_deref()
                        .map(|u| format!("{u} "))
                        .unwrap_or_default(),
                    r.destination
                        .as_deref()
                        .map(|d| format!("→ {d} "))
                        .unwrap_or_default(),
                    r.detail
                );
            }
        }
        Response::Error { .. } => return Ok(print_error(&response)),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_error(r: &Response) -> ExitCode {
    if let Response::Error { message } = r {
        eprintln!("kakehashi: kakehashid says: {message}");
    } else {
        eprintln!("kakehashi: unexpected answer from kakehashid");
    }
    ExitCode::from(1)
}

fn confirm(question: &str) -> bool {
    if !std::io::stdin().is_terminal() {
        eprintln!("{question}\nNot a terminal: pass --yes to confirm.");
        return false;
    }
    print!("{question} [y/N] ");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    matches!(line.trim(), "y" | "Y" | "yes")
}

/// How a state, priority or event is spelled on the wire (`dead-letter`).
fn word(value: impl serde::Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

fn join(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn age(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn when(ms: u64) -> String {
    format!("{} ago", age(now_ms().saturating_sub(ms) / 1000))
}

fn print_status(s: &StatusReport) {
    println!(
        "kakehashid {}  AE {} on {}  up {}  associations {}",
        s.version,
        s.ae_title,
        s.listen,
        age(s.uptime_s),
        s.active_associations
    );
    println!(
        "spool {}: {} of {} used (payloads held {}, index {}), {} free on disk",
        s.spool.dir,
        format_bytes(s.spool.used_bytes),
        format_bytes(s.spool.max_bytes),
        format_bytes(s.spool.payload_bytes),
        format_bytes(s.spool.index_bytes),
        format_bytes(s.spool.free_bytes)
    );
    if let Some(n) = s.urgent_open.filter(|n| *n > 0) {
        println!("URGENT: {n} finding(s) not acknowledged — kakehashi urgent");
    }
    if let Some(k) = &s.tpm {
        println!();
        match &k.problem {
            None => println!(
                "keys: {} — identity {}",
                k.backend,
                k.serial.as_deref().unwrap_or("-")
            ),
            Some(p) => {
                println!(
                    "keys: {} — UNAVAILABLE: accepting and sending nothing",
                    k.backend
                );
                println!("  problem: {p}");
                if let Some(n) = k.undecryptable {
                    println!("  {n} queued instance(s) cannot be decrypted without the old keys; nothing has been deleted");
                }
            }
        }
        if let Some(w) = &k.warning {
            println!("  WARNING: {w}");
        }
    }
    if let Some(t) = &s.tunnel {
        println!();
        println!(
            "tunnel {}: {}",
            t.interface,
            if t.up { "up" } else { "DOWN" }
        );
        println!("  box public key {}", t.public_key);
        println!(
            "  peer {} at {} (now {})",
            t.peer_public_key,
            t.configured_endpoint,
            t.endpoint.as_deref().unwrap_or("unresolved")
        );
        println!(
            "  last handshake {} ({} since kakehashid started), received {}, sent {}",
            t.last_handshake_age_s
                .map_or("never".into(), |a| format!("{} ago", age(a))),
            t.handshakes,
            format_bytes(t.rx_bytes),
            format_bytes(t.tx_bytes)
        );
        if let Some(p) = &t.problem {
            println!("  problem: {p}");
        }
    }
    for d in &s.destinations {
        println!();
        println!(
            "destination {} ({}@{}{}): {}",
            d.name,
            d.ae_title,
            d.address,
            if d.via_tunnel { " via tunnel" } else { "" },
            match d.state.as_str() {
                "paused" => "paused (tunnel down; nothing is retried or dead-lettered meanwhile)",
                "stalled" => "STALLED (a C-STORE makes no progress: the center stopped reading or answering; it is given up at the response timeout)",
                other => other,
            }
        );
        if let (Some(t), Some(p)) = (d.sending_for_s, d.no_progress_for_s) {
            println!(
                "  C-STORE under way for {}, last progress {} ago",
                age(t),
                age(p)
            );
        }
        if d.associations_allowed > 0 {
            println!(
                "  associations open {} of {}{}, instances on the wire {}",
                d.associations,
                d.associations_allowed,
                if d.associations_allowed < d.associations_max {
                    format!(
                        " (configured {}: the destination refused more)",
                        d.associations_max
                    )
                } else {
                    String::new()
                },
                d.in_flight
            );
        }
        println!(
            "  queued {} ({}), oldest {}, dead letters {}",
            d.queued,
            format_bytes(d.queued_bytes),
            d.oldest_age_s.map_or("-".into(), age),
            d.dead_letter
        );
        if d.held > 0 {
            println!(
                "  HELD {}: results matching no study this box relayed; see `kakehashi results`",
                d.held
            );
        }
        if d.stuck > 0 {
            println!(
                "  STUCK {}: still refused after retry.stuck_after*; see `kakehashi queue list`, then `kakehashi queue dead-letter --stuck` to give up on them",
                d.stuck
            );
        }
        println!(
            "  delivered since start {}, last success {}",
            d.delivered_since_start,
            d.last_success_ms.map_or("never".into(), when)
        );
        if let Some(e) = &d.last_error {
            // An error older than the last success is history, not a fault now.
            let resolved =
                matches!((d.last_error_ms, d.last_success_ms), (Some(err), Some(ok)) if ok > err);
            println!(
                "  last error {}{}: {e}",
                d.last_error_ms.map_or("-".into(), when),
                if resolved { " (resolved since)" } else { "" }
            );
        }
        if let Some(n) = d.next_attempt_in_s {
            println!("  next attempt in {}", age(n));
        }
        for p in &d.studies {
            println!(
                "  study {}: {} of {} to send ({} of {}), {} on the wire, {}",
                p.study_instance_uid,
                p.queued,
                p.received,
                format_bytes(p.queued_bytes),
                format_bytes(p.received_bytes),
                p.on_the_wire,
                flow(p.rate_bytes_per_s, p.eta_s)
            );
        }
    }
}

/// "6.1 MiB/s, about 9 s left", or what is known of it.
fn flow(rate: Option<u64>, eta_s: Option<u64>) -> String {
    match (rate, eta_s) {
        (Some(r), Some(e)) => format!("{}/s, about {} left", format_bytes(r), age(e)),
        (Some(r), None) => format!("{}/s", format_bytes(r)),
        (None, _) => "no rate yet".into(),
    }
}

fn print_queue(entries: &[QueueEntry]) {
    if entries.is_empty() {
        println!("Queue is empty.");
        return;
    }
    println!(
        "{:>6}  {:<16} {:<11} {:<6} {:>10}  {:>8}  {:<12} SOP instance / last error",
        "id", "destination", "state", "prio", "size", "age", "patient"
    );
    for e in entries {
        let (state, prio) = (word(e.state), word(e.priority));
        println!(
            "{:>6}  {:<16} {:<11} {:<6} {:>10}  {:>8}  {:<12} {}",
            e.id,
            e.destination,
            state,
            prio,
            format_bytes(e.size),
            age(now_ms().saturating_sub(e.received_ms) / 1000),
            e.patient_id,
            e.sop_instance_uid
        );
        if let Some(err) = &e.last_error {
            println!(
                "{:>6}  └ attempts {}{}: {err}",
                "",
                e.attempts,
                if e.stuck { ", STUCK" } else { "" }
            );
        }
    }
}

fn print_results(entries: &[ResultEntry]) {
    if entries.is_empty() {
        println!("No results waiting or held.");
        return;
    }
    println!(
        "{:>6}  {:<11} {:<6} {:>10}  {:>8}  {:<12} {:<22} SOP instance / study",
        "id", "state", "prio", "size", "age", "patient", "from"
    );
    for e in entries {
        let (state, prio) = (word(e.state), word(e.priority));
        println!(
            "{:>6}  {:<11} {:<6} {:>10}  {:>8}  {:<12} {:<22} {}{}",
            e.id,
            state,
            prio,
            format_bytes(e.size),
            age(now_ms().saturating_sub(e.received_ms) / 1000),
            e.patient_id,
            format!("{}@{}", e.source_ae, e.source_ip),
            e.sop_instance_uid,
            if e.amendment { " (amendment)" } else { "" }
        );
        println!("{:>6}  study {}", "", e.study_instance_uid);
        if let Some(r) = &e.reason {
            println!("{:>6}  └ {r}", "");
        }
    }
}

fn print_urgent(entries: &[UrgentInfo]) {
    if entries.is_empty() {
        println!("No urgent findings.");
        return;
    }
    for e in entries {
        let state = match e.state {
            UrgentState::Acknowledged => format!(
                "acknowledged {} by {}",
                e.acknowledged_ms.map(when).unwrap_or_default(),
                e.acknowledged_by.as_deref().unwrap_or("-")
            ),
            s => format!("{} — NOT ACKNOWLEDGED", word(s).to_uppercase()),
        };
        println!(
            "urgent {}  {state}  (result {}{})",
            e.id,
            e.result_id,
            if e.held { ", HELD" } else { "" }
        );
        println!("  patient {}  study {}", e.patient_id, e.study_instance_uid);
        println!("  finding: {}", e.finding);
        println!("  urgent because: {}", e.reason);
        println!(
            "  reported {} by {}; received {} from {}",
            e.made.as_deref().unwrap_or("-"),
            e.physician.as_deref().unwrap_or("-"),
            when(e.received_ms),
            e.from
        );
        for (i, n) in e.notices.iter().enumerate() {
            println!(
                "  notice {}: {} by {} to {}",
                i + 1,
                when(n.time_ms),
                n.method,
                n.recipients.join(", ")
            );
        }
        if let Some(err) = &e.last_error {
            println!("  last notice FAILED: {err}");
        }
        if e.state != UrgentState::Acknowledged {
            let next = e.next_ms.saturating_sub(now_ms()) / 1000;
            println!(
                "  next notice in {}; acknowledge: kakehashi urgent ack {}",
                age(next),
                e.id
            );
        }
    }
}

fn print_studies(entries: &[StudyInfo]) {
    if entries.is_empty() {
        println!("No studies yet.");
        return;
    }
    println!(
        "{:<8} {:>9} {:>7} {:>7} {:>10} {:>8}  {:<12} {:<11} study",
        "role", "instances", "acked", "pending", "size", "last", "patient", "prefetch"
    );
    for e in entries {
        println!(
            "{:<8} {:>9} {:>7} {:>7} {:>10} {:>8}  {:<12} {:<11} {}",
            e.role,
            e.instances,
            e.acknowledged,
            if e.dead_letters > 0 {
                format!("{}+{}DL", e.pending, e.dead_letters)
            } else {
                e.pending.to_string()
            },
            format_bytes(e.bytes),
            when(e.last_received_ms),
            e.patient_id,
            e.prefetch.as_deref().unwrap_or("-"),
            e.study_instance_uid
        );
        if e.complete {
            println!("{:>8} └ complete at the destinations", "");
        } else if e.pending > 0 {
            println!(
                "{:>8} └ {} acknowledged of {}, {} to send, {} on the wire, {}",
                "",
                format_bytes(e.acknowledged_bytes),
                format_bytes(e.bytes),
                format_bytes(e.pending_bytes),
                e.on_the_wire,
                flow(e.rate_bytes_per_s, e.eta_s)
            );
        }
        if let Some(d) = &e.detail {
            println!("{:>8} └ {d}", "");
        }
    }
}
