//! `kakehashid`, the supervisor daemon of a Kakehashi box.
//!
//! It runs the DICOM ingress (the hospital sends here), the durable spool,
//! one forwarder per destination, and the operator control socket; all stop
//! together on SIGTERM/SIGINT through one cancellation token.
//!
//! With a `[tunnel]` section it also brings up the WireGuard interface and
//! supervises it (`kakehashi-tunnel`); destinations behind the tunnel pause
//! while it is down. Under systemd (`Type=notify`) it reports READY, a
//! one-line STATUS, and feeds the watchdog while its loops are alive.
//!
//! Exit codes: 0 clean stop; 78 configuration error, including an unusable
//! tunnel key file (do not restart); 73 spool cannot be opened; 69 a socket
//! cannot be bound or the tunnel interface cannot be created; 1 other failures.
//!
//! With a `[tpm]` section it unseals the box's keys at start (`keys`): the
//! spool is then sealed and the tunnel key comes from the TPM; without the
//! keys it still starts, says why in `status`, and accepts and sends nothing.
//!
//! Modules: `ingress` (the SCP), `forwarder` and `schedule` (what to send,
//! when; the pause/backoff gate), `control` (the operator socket), `notify`
//! (sd_notify, watchdog liveness), `rejections` (rate-limited audit of
//! rejected associations), `keys`, `logging`, `prefetch` (with `[priors]`:
//! C-FIND/C-MOVE of a new study's priors on the hospital's PACS), `urgent`.
//!
//! With `[results]` a second ingress listener takes the reading center's
//! reports for the hospital's PACS.
//!
//! With `[urgent]`, `urgent` mails urgent findings (results sent with
//! priority HIGH) and sends them to the RIS as HL7 until they are
//! acknowledged.
//!
//! With `[metrics]`, `metrics` serves the Prometheus text format on the
//! hospital side (`GET /metrics`; its own few lines of HTTP).
//!
//! Unsafe code is denied, and allowed in one function: the call that fixes
//! the allocator's mmap threshold at start (`large_blocks_go_back_when_freed`).

#![deny(unsafe_code)]

mod control;
mod forwarder;
mod ingress;
mod keys;
mod logging;
mod metrics;
mod notify;
mod ondemand;
mod prefetch;
mod rejections;
mod retrieve_get;
mod schedule;
mod urgent;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use kakehashi_config::{Config, DEFAULT_CONFIG_PATH};
use kakehashi_spool::{Limits, Spool};
use kakehashi_tunnel::{Health, Tunnel};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Kakehashi supervisor daemon: receives DICOM studies from the hospital,
/// spools them durably and forwards them to the reading center.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Site configuration file.
    #[arg(short, long, env = "KAKEHASHI_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Validate the configuration, print a summary and exit (0 valid, 78 invalid).
    #[arg(long)]
    check_config: bool,
}

pub const EXIT_CONFIG: u8 = 78;
pub const EXIT_CANTCREAT: u8 = 73;
pub const EXIT_UNAVAILABLE: u8 = 69;

/// Wall-clock milliseconds since the epoch, for records and the audit trail.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What every task of the daemon shares.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub spool: Arc<Spool>,
    pub started: Instant,
    pub forwarders: Vec<Arc<forwarder::Handle>>,
    pub active_associations: std::sync::atomic::AtomicUsize,
    pub tunnel: Option<Arc<Tunnel>>,
    /// What the tunnel supervisor last saw; forwarders behind the tunnel wait on it.
    pub tunnel_health: Option<watch::Receiver<Health>>,
    pub liveness: notify::Liveness,
    /// The key store as found at start (`None` without a `[tpm]` section).
    pub tpm: Option<kakehashi_control::TpmStatus>,
    /// Rejected associations, counted for the audit trail.
    pub rejections: std::sync::Mutex<rejections::Rejections>,
    /// `results.trusted_signers`, parsed.
    pub signers: kakehashi_dicom::signature::TrustedSigners,
    /// Instances and bytes accepted into the spool since the start.
    pub received: std::sync::atomic::AtomicU64,
    pub received_bytes: std::sync::atomic::AtomicU64,
    /// The budget of datasets held in memory while they are sent, shared by
    /// every outgoing association (see `forwarder::HELD_BUDGET`).
    pub held: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    pub fn rejections(&self) -> std::sync::MutexGuard<'_, rejections::Rejections> {
        // Plain counters: consistent whatever panicked while holding them.
        self.rejections.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why the box must not accept or send data now (its keys are unusable).
    pub fn keys_problem(&self) -> Option<&str> {
        self.tpm.as_ref().and_then(|t| t.problem.as_deref())
    }
}

/// `results.trusted_signers`, parsed; the error names the key and file.
fn trusted_signers(config: &Config) -> Result<kakehashi_dicom::signature::TrustedSigners, String> {
    let mut ders = Vec::new();
    for (i, (path, pem)) in config
        .results
        .iter()
        .flat_map(|r| r.trusted_signers.iter())
        .enumerate()
    {
        let certs = kakehashi_dicom::signature::TrustedSigners::parse(pem).map_err(|e| {
            format!(
                "invalid results.trusted_signers[{i}] = {:?}: {e}",
                path.display()
            )
        })?;
        if certs.is_empty() {
            return Err(format!(
                "invalid results.trusted_signers[{i}] = {:?}: no certificate in it",
                path.display()
            ));
        }
        ders.extend(certs);
    }
    Ok(kakehashi_dicom::signature::TrustedSigners::new(&ders))
}

/// glibc gives each thread an arena of its own, and once a large block
/// (a dataset held while it is sent) has been freed it raises its mmap
/// threshold to that size (up to 32 MiB), so the next large blocks come from
/// the arenas, which keep them when freed: every blocking thread that once
/// read a mammogram kept one (six 24 MiB mammograms sent over parallel
/// associations left kakehashid at 136 MiB, though the forwarder's budget
/// let one be held at a time; durability.rs). A threshold set once stays
/// fixed: blocks of 1 MiB and more are mapped when allocated and given back
/// when freed, smaller ones stay in the arenas.
///
/// Setting it also fixes the trim threshold, at 128 KiB unless set: every
/// free that left more than that at the top of a thread's heap gave it back
/// (`madvise(DONTNEED)`), and the next instance faulted the same pages in
/// again (5044 madvise calls in one CT bench run, about 4 per instance;
/// page faults, memory-cgroup charges and TLB shootdowns in the profile).
/// It is set to 2 MiB, twice the mmap threshold, which is the ratio glibc
/// keeps itself when it moves the threshold: 10 calls in the same run, and
/// 12–16 % less of kakehashid's CPU for a CT or MR study, for about 3 MiB
/// more peak RSS (docs/benchmarks.md).
#[cfg(target_env = "gnu")]
#[allow(unsafe_code)]
fn large_blocks_go_back_when_freed() {
    // SAFETY: mallopt sets one parameter of the allocator and touches no
    // memory of ours; it is called first in main, before any other thread.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) }
        & unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, 2 << 20) };
    if ok != 1 {
        eprintln!("kakehashid: could not set the allocator's mmap and trim thresholds (memory freed after large datasets may stay with the process)");
    }
}

#[cfg(not(target_env = "gnu"))]
fn large_blocks_go_back_when_freed() {}

fn main() -> ExitCode {
    large_blocks_go_back_when_freed();
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kakehashid: {e}");
            if matches!(&e, kakehashi_config::ConfigError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
            {
                eprintln!(
                    "kakehashid: start from the documented example (every key, with its default):\n  \
                     install -m 0640 examples/kakehashi.toml {}",
                    args.config.display()
                );
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The tunnel key is part of the configuration: refused before anything starts.
    let key = match config
        .tunnel
        .as_ref()
        .and_then(|t| t.private_key_file.as_ref())
        .map(|f| kakehashi_tunnel::key::load(f))
        .transpose()
    {
        Ok(k) => k,
        Err(e) => {
            eprintln!("kakehashid: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Certificates of the center's signers, parsed before anything starts.
    let signers = match trusted_signers(&config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kakehashid: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check_config {
        if config
            .tunnel
            .as_ref()
            .is_some_and(|t| t.private_key_file.is_none())
        {
            println!("tunnel: its key is sealed by the TPM (see `kakehashi selftest`)");
        }
        println!(
            "{}: valid. AE {} on {}, {} source(s), destination(s): {}; spool {} (max {})",
            args.config.display(),
            config.dicom.ae_title,
            config.dicom.listen,
            config.dicom.sources.len(),
            config
                .destinations
                .iter()
                .map(|d| format!("{} ({}@{})", d.name, d.ae_title, d.address))
                .collect::<Vec<_>>()
                .join(", "),
            config.spool.dir.display(),
            kakehashi_config::format_bytes(config.spool.max_size),
        );
        if let (Some(p), Some(r)) = (&config.pacs, &config.results) {
            println!(
                "results: AE {} on {} from {}; delivered to the PACS {}@{}",
                r.ae_title,
                r.listen,
                r.from
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                p.ae_title,
                p.address
            );
        }
        if let (Some(t), Some(key)) = (&config.tunnel, &key) {
            println!(
                "tunnel {}: box public key {}, peer {} at {}, allowed IPs {}",
                t.interface,
                kakehashi_tunnel::key::encode(&key.public_key()),
                kakehashi_tunnel::key::encode(&t.peer.public_key),
                t.peer.endpoint,
                t.peer
                    .allowed_ips
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        return ExitCode::SUCCESS;
    }
    logging::init(&config.log);
    let keys = config.tpm.as_ref().map(keys::load);
    if let Some(k) = &keys {
        if let Some(w) = &k.status.warning {
            tracing::warn!("{w}");
        }
        match &k.status.problem {
            None => tracing::info!(
                backend = %k.status.backend,
                serial = k.status.serial.as_deref().unwrap_or("-"),
                "box keys unsealed"
            ),
            Some(p) => tracing::error!("box keys unavailable; accepting and sending nothing: {p}"),
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config, key, keys, signers))
}

async fn run(
    config: Config,
    key: Option<kakehashi_tunnel::PrivateKey>,
    keys: Option<keys::Keys>,
    signers: kakehashi_dicom::signature::TrustedSigners,
) -> ExitCode {
    let (tpm_status, key, spool_key) = match keys {
        Some(k) => (Some(k.status), key.or(k.wireguard), k.spool),
        None => {
            tracing::warn!("no [tpm] section: the spool is stored in clear (development only); provision the box to seal it");
            (None, key, None)
        }
    };
    let routing = kakehashi_spool::Routing {
        current: config.destinations.iter().map(|d| d.name.clone()).collect(),
        results: config.pacs.iter().map(|p| p.name.clone()).collect(),
        prefetch: config.priors.is_some(),
        urgent: config.urgent.is_some(),
        report_notices: config.results.as_ref().is_some_and(|r| r.hl7.is_some()),
    };
    let limits = Limits {
        max_size: config.spool.max_size,
        min_free: config.spool.min_free,
    };
    let dir = config.spool.dir.clone();
    let opening = std::time::Instant::now();
    let opened = tokio::task::spawn_blocking(move || {
        Spool::open_with_key(&dir, routing, limits, now_ms(), spool_key)
    })
    .await;
    let (spool, report) = match opened {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::error!("cannot open the spool: {e}");
            return ExitCode::from(EXIT_CANTCREAT);
        }
        Err(e) => {
            tracing::error!("spool open task failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    if report.is_clean() {
        tracing::info!(
            records = report.records,
            seconds = format!("{:.2}", opening.elapsed().as_secs_f64()),
            "spool opened"
        );
    } else {
        tracing::warn!(
            records = report.records,
            temp_files_removed = report.temp_files_removed,
            orphan_files_removed = report.orphan_files_removed,
            missing_payloads = report.missing_payloads.len(),
            key_lost = report.key_lost.len(),
            log_entries_replayed = report.replayed,
            seconds = format!("{:.2}", opening.elapsed().as_secs_f64()),
            "spool recovered after an unclean stop (log entries acknowledged before the stop were applied to the index again; temp and orphan files were never acknowledged; missing payloads are dead-lettered)"
        );
    }

    let mut unavailable_tunnel = None;
    let tunnel = match (&config.tunnel, key) {
        (Some(t), Some(key)) => match start_tunnel(t.clone(), key).await {
            Ok(started) => Some(started),
            Err(code) => return code,
        },
        (Some(t), None) => {
            // Keys unavailable: no tunnel, and its destinations stay paused.
            let problem = tpm_status
                .as_ref()
                .and_then(|s| s.problem.clone())
                .unwrap_or_else(|| "the tunnel key is unavailable".into());
            unavailable_tunnel = Some(watch::Sender::new(Health::not_started(t, problem)));
            None
        }
        _ => None,
    };

    let token = CancellationToken::new();
    let forwarders: Vec<Arc<forwarder::Handle>> = config
        .destinations
        .iter()
        .chain(&config.pacs)
        .map(|d| Arc::new(forwarder::Handle::new(d.clone())))
        .collect();
    // One pass over the index, one record at a time.
    let filled = {
        let spool = Arc::clone(&spool);
        let forwarders = forwarders.clone();
        tokio::task::spawn_blocking(move || {
            spool.for_each_record(|rec| {
                for f in &forwarders {
                    f.enqueue(rec);
                }
            })
        })
        .await
    };
    match filled {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!("cannot read the spool index: {e}");
            return ExitCode::from(EXIT_CANTCREAT);
        }
        Err(e) => {
            tracing::error!("spool read task failed: {e}");
            return ExitCode::FAILURE;
        }
    }
    let (tunnel, endpoint, health) = match tunnel {
        Some((t, e, h)) => (Some(t), e, Some(h)),
        None => (None, None, None),
    };
    let shared = Arc::new(Shared {
        signers,
        config,
        spool,
        started: Instant::now(),
        forwarders,
        active_associations: Default::default(),
        tunnel_health: health
            .as_ref()
            .or(unavailable_tunnel.as_ref())
            .map(|h| h.subscribe()),
        tunnel,
        liveness: notify::Liveness::default(),
        tpm: tpm_status,
        rejections: Default::default(),
        received: Default::default(),
        received_bytes: Default::default(),
        held: Arc::new(tokio::sync::Semaphore::new(forwarder::HELD_UNITS)),
    });

    let listener = match tokio::net::TcpListener::bind(shared.config.dicom.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(
                "cannot listen for DICOM on {}: {e}",
                shared.config.dicom.listen
            );
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    let results_listener = match &shared.config.results {
        None => None,
        Some(r) => match tokio::net::TcpListener::bind(r.listen).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::error!(
                    "cannot listen for results on {} (results.listen): {e}",
                    r.listen
                );
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        },
    };
    let metrics_listener = match &shared.config.metrics {
        None => None,
        Some(m) => match tokio::net::TcpListener::bind(m.listen).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::error!(
                    "cannot listen for metrics on {} (metrics.listen): {e}",
                    m.listen
                );
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        },
    };
    let control = match control::bind(&shared.config.control.socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };

    let mut tasks = tokio::task::JoinSet::new();
    for f in &shared.forwarders {
        tasks.spawn(forwarder::run(
            Arc::clone(&shared),
            Arc::clone(f),
            token.clone(),
        ));
    }
    tasks.spawn(control::serve(Arc::clone(&shared), control, token.clone()));
    tasks.spawn(ingress::serve(
        Arc::clone(&shared),
        listener,
        token.clone(),
        ingress::Kind::Hospital,
    ));
    if let Some(l) = results_listener {
        tasks.spawn(ingress::serve(
            Arc::clone(&shared),
            l,
            token.clone(),
            ingress::Kind::Results,
        ));
    }
    if let Some(l) = metrics_listener {
        tasks.spawn(metrics::serve(Arc::clone(&shared), l, token.clone()));
    }
    tasks.spawn(checkpointer(Arc::clone(&shared), token.clone()));
    if shared.config.priors.is_some() {
        tasks.spawn(prefetch::run(Arc::clone(&shared), token.clone()));
    }
    if shared.config.urgent.is_some()
        || shared
            .config
            .results
            .as_ref()
            .is_some_and(|r| r.hl7.is_some())
    {
        tasks.spawn(urgent::run(Arc::clone(&shared), token.clone()));
    }
    if let (Some(t), Some(h)) = (&shared.tunnel, health) {
        let beat = shared
            .liveness
            .register("tunnel supervisor", std::time::Duration::from_secs(30));
        tasks.spawn(kakehashi_tunnel::supervise(
            Arc::clone(t),
            endpoint,
            h,
            token.clone(),
            move || beat.beat(),
        ));
        tasks.spawn(kakehashi_tunnel::serve_uapi(Arc::clone(t), token.clone()));
    }
    tasks.spawn(systemd(Arc::clone(&shared), token.clone()));
    if !shared.config.spool.retention.is_zero() {
        tasks.spawn(retention_sweeper(Arc::clone(&shared), token.clone()));
    }
    tasks.spawn(audit_pruner(Arc::clone(&shared), token.clone()));
    tracing::info!(
        ae_title = %shared.config.dicom.ae_title,
        listen = %shared.config.dicom.listen,
        destinations = shared.forwarders.len(),
        "kakehashid serving"
    );

    shutdown_signal(token.clone()).await;
    tracing::info!("stopping: finishing current operations");
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(std::time::Duration::from_secs(15), drain)
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop in 15 s; exiting anyway (an unfinished C-STORE is sent again at next start)");
    }
    // Deliveries settled after the checkpointer's last round: make them
    // durable and free their payloads, so the next start finds a clean spool.
    let spool = Arc::clone(&shared.spool);
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || spool.checkpoint()).await {
        tracing::error!("final spool checkpoint failed: {e}");
    }
    let _ = std::fs::remove_file(&shared.config.control.socket);
    if let Some(t) = &shared.tunnel {
        t.stop();
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

type StartedTunnel = (
    Arc<Tunnel>,
    Option<std::net::SocketAddr>,
    watch::Sender<Health>,
);

/// Resolves the endpoint (a failure only delays the tunnel:
/// the supervisor keeps resolving) and brings the interface up.
async fn start_tunnel(
    cfg: kakehashi_config::TunnelConfig,
    key: kakehashi_tunnel::PrivateKey,
) -> Result<StartedTunnel, ExitCode> {
    let endpoint = match kakehashi_tunnel::resolve(&cfg.peer.endpoint).await {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::warn!("tunnel endpoint: {e}; starting without it and retrying");
            None
        }
    };
    let interface = cfg.interface.clone();
    let started = tokio::task::spawn_blocking(move || Tunnel::start(cfg, key, endpoint)).await;
    let tunnel = match started {
        Ok(Ok(t)) => Arc::new(t),
        Ok(Err(e)) => {
            tracing::error!("{e}");
            return Err(ExitCode::from(EXIT_UNAVAILABLE));
        }
        Err(e) => {
            tracing::error!("tunnel start task failed: {e}");
            return Err(ExitCode::FAILURE);
        }
    };
    tracing::info!(
        interface = %interface,
        public_key = %tunnel.public_key(),
        endpoint = %endpoint.map_or("unresolved".into(), |e| e.to_string()),
        "tunnel interface up, waiting for the first handshake"
    );
    let health = watch::Sender::new(Health::starting(&tunnel));
    Ok((tunnel, endpoint, health))
}

/// sd_notify: READY once serving, a one-line STATUS, and WATCHDOG=1 only
/// while every loop is alive.
async fn systemd(shared: Arc<Shared>, token: CancellationToken) {
    let Some(notifier) = notify::Notifier::from_env() else {
        return;
    };
    notifier.send("READY=1");
    let watchdog = notify::watchdog_interval();
    let every = watchdog.map_or(std::time::Duration::from_secs(5), |w| {
        (w / 2).min(std::time::Duration::from_secs(5))
    });
    let mut last_status = String::new();
    let mut reported_stall = false;
    loop {
        let status = status_line(&shared).await;
        if status != last_status {
            notifier.send(&format!("STATUS={status}"));
            last_status = status;
        }
        if watchdog.is_some() {
            let stalled = shared.liveness.stalled();
            if stalled.is_empty() {
                notifier.send("WATCHDOG=1");
                reported_stall = false;
            } else if !reported_stall {
                tracing::error!(
                    "not feeding the systemd watchdog: no sign of life from {}",
                    stalled.join(", ")
                );
                reported_stall = true;
            }
        }
        tokio::select! {
            _ = token.cancelled() => {
                notifier.send("STOPPING=1");
                return;
            }
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// "tunnel up (handshake 12 s ago); 3 queued, 0 dead-letter"
async fn status_line(shared: &Shared) -> String {
    // Cheap whatever the backlog (it runs every few seconds).
    let (queued, dead) = shared.forwarders.iter().fold((0, 0), |(q, d), f| {
        let s = f.status(shared.spool.dead_letters(&f.dest.name));
        (q + s.queued, d + s.dead_letter)
    });
    let tunnel = match &shared.tunnel_health {
        None => String::new(),
        Some(h) => {
            let h = h.borrow();
            match (h.up, h.last_handshake_age) {
                (true, Some(a)) => format!("tunnel up (handshake {} s ago); ", a.as_secs()),
                _ => format!(
                    "tunnel DOWN: {}; ",
                    h.problem.as_deref().unwrap_or("no handshake")
                ),
            }
        }
    };
    format!("{tunnel}{queued} queued, {dead} dead-letter")
}

async fn shutdown_signal(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        token.cancelled().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = token.cancelled() => {}
    }
    token.cancel();
}

/// Makes non-durable index updates (deliveries, and instances accepted
/// through the spool's log) durable within a second, and frees their
/// payloads.
async fn checkpointer(shared: Arc<Shared>, token: CancellationToken) {
    let beat = shared
        .liveness
        .register("spool checkpointer", std::time::Duration::from_secs(30));
    loop {
        beat.beat();
        let stop = tokio::select! {
            _ = token.cancelled() => true,
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => false,
        };
        let spool = Arc::clone(&shared.spool);
        match tokio::task::spawn_blocking(move || spool.checkpoint()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("spool checkpoint failed: {e}"),
            Err(e) => tracing::error!("spool checkpoint task failed: {e}"),
        }
        if stop {
            return;
        }
    }
}

/// Keeps the audit trail in the index within `[audit]` (age, count): at
/// start, then every hour; what leaves the index is exported first.
async fn audit_pruner(shared: Arc<Shared>, token: CancellationToken) {
    const BATCH: usize = 10_000;
    loop {
        let audit = shared.config.audit.clone();
        let spool = Arc::clone(&shared.spool);
        let cutoff = now_ms().saturating_sub(audit.keep.as_millis() as u64);
        let pruned = tokio::task::spawn_blocking(move || {
            let mut total = 0;
            loop {
                let n = spool.prune_audit(cutoff, audit.max_records, &audit.dir, BATCH)?;
                total += n;
                if n < BATCH {
                    return Ok::<_, kakehashi_spool::SpoolError>(total);
                }
            }
        })
        .await;
        match pruned {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(
                moved = n,
                dir = %shared.config.audit.dir.display(),
                "audit: older records exported to the audit directory and removed from the index"
            ),
            Ok(Err(e)) => tracing::error!(
                "audit pruning failed (nothing was removed that was not exported): {e}"
            ),
            Err(e) => tracing::error!("audit pruning task failed: {e}"),
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
        }
    }
}

async fn retention_sweeper(shared: Arc<Shared>, token: CancellationToken) {
    let every = std::time::Duration::from_secs(60);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let spool = Arc::clone(&shared.spool);
        let cutoff = now_ms().saturating_sub(shared.config.spool.retention.as_millis() as u64);
        match tokio::task::spawn_blocking(move || spool.sweep_retained(cutoff)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(
                removed = n,
                "retention: removed delivered instances past retention"
            ),
            Ok(Err(e)) => tracing::error!("retention sweep failed: {e}"),
            Err(e) => tracing::error!("retention sweep task failed: {e}"),
        }
    }
}
