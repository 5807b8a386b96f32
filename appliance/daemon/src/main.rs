//! `kakehashid`, the supervisor daemon of a Kakehashi box.
//!
//! It runs the DICOM ingress (the hospital sends here), the durable spool,
//! one forwarder per destination, and the operator control socket; all stop
//! together on SIGTERM/SIGINT through one cancellation token.
//!
//! Exit codes: 0 clean stop; 78 configuration error (do not restart);
//! 73 spool cannot be opened; 69 a socket cannot be bound; 1 other failures.
//!
//! Not yet here: the WireGuard tunnel, TPM identity and sealed spool, the
//! systemd watchdog (later issues).

#![forbid(unsafe_code)]

mod control;
mod forwarder;
mod ingress;
mod logging;
mod schedule;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use kakehashi_config::{Config, DEFAULT_CONFIG_PATH};
use kakehashi_spool::{Limits, Spool};
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
}

fn main() -> ExitCode {
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
    if args.check_config {
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
        return ExitCode::SUCCESS;
    }
    logging::init(&config.log);
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
    runtime.block_on(run(config))
}

async fn run(config: Config) -> ExitCode {
    let names = config.destinations.iter().map(|d| d.name.clone()).collect();
    let limits = Limits {
        max_size: config.spool.max_size,
        min_free: config.spool.min_free,
    };
    let dir = config.spool.dir.clone();
    let opened =
        tokio::task::spawn_blocking(move || Spool::open(&dir, names, limits, now_ms())).await;
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
        tracing::info!(records = report.records, "spool opened");
    } else {
        tracing::warn!(
            records = report.records,
            in_flight_requeued = report.in_flight_requeued,
            temp_files_removed = report.temp_files_removed,
            orphan_files_removed = report.orphan_files_removed,
            missing_payloads = report.missing_payloads.len(),
            "spool recovered after an unclean stop (temp and orphan files were never acknowledged; missing payloads are dead-lettered)"
        );
    }

    let token = CancellationToken::new();
    let records = match spool.records() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot read the spool index: {e}");
            return ExitCode::from(EXIT_CANTCREAT);
        }
    };
    let forwarders: Vec<Arc<forwarder::Handle>> = config
        .destinations
        .iter()
        .map(|d| Arc::new(forwarder::Handle::new(d.clone(), &records)))
        .collect();
    drop(records);
    let shared = Arc::new(Shared {
        config,
        spool,
        started: Instant::now(),
        forwarders,
        active_associations: Default::default(),
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
    tasks.spawn(ingress::serve(Arc::clone(&shared), listener, token.clone()));
    tasks.spawn(checkpointer(Arc::clone(&shared), token.clone()));
    if !shared.config.spool.retention.is_zero() {
        tasks.spawn(retention_sweeper(Arc::clone(&shared), token.clone()));
    }
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
        tracing::warn!("some tasks did not stop in 15 s; exiting anyway (in-flight work is requeued at next start)");
    }
    let _ = std::fs::remove_file(&shared.config.control.socket);
    tracing::info!("stopped");
    ExitCode::SUCCESS
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

/// Makes non-durable delivery records durable within a second, and frees
/// their payloads.
async fn checkpointer(shared: Arc<Shared>, token: CancellationToken) {
    loop {
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
