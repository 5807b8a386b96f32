//! Keeps the tunnel alive: watches the handshake and what is received,
//! re-resolves the endpoint's name and re-applies the peer when the
//! handshake is stale (with backoff), probes the tunnel (so boringtun keeps
//! trying while it is down, and so a silently dead link is noticed while it
//! is up), and publishes [`Health`] for the forwarders, `kakehashi status`
//! and logs. The decisions are [`crate::watch::Watch`]'s.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::watch::{Log, Observation, Watch};
use crate::{key, probe_target, resolve, Tunnel};

/// What the supervisor last saw of the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub interface: String,
    pub public_key: String,
    pub peer_public_key: String,
    /// The endpoint as configured (`host:port`).
    pub configured_endpoint: String,
    /// The address packets go to now (boringtun follows a roaming peer).
    pub endpoint: Option<SocketAddr>,
    /// A live session: a handshake less than 180 s old and something
    /// received within the last 40 s (see [`crate::watch`]).
    pub up: bool,
    pub last_handshake_age: Option<Duration>,
    /// Handshakes completed since the supervisor started; a change means a
    /// fresh session (forwarders waiting in backoff retry at once).
    pub handshakes: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Why the tunnel is down, or what else is wrong, in words.
    pub problem: Option<String>,
}

impl Health {
    /// A tunnel that could not be started (e.g. its key is unavailable):
    /// down, with `problem`, so its destinations stay paused.
    pub fn not_started(config: &kakehashi_config::TunnelConfig, problem: String) -> Health {
        Health {
            interface: config.interface.clone(),
            public_key: String::new(),
            peer_public_key: key::encode(&config.peer.public_key),
            configured_endpoint: config.peer.endpoint.clone(),
            endpoint: None,
            up: false,
            last_handshake_age: None,
            handshakes: 0,
            rx_bytes: 0,
            tx_bytes: 0,
            problem: Some(format!("not started: {problem}")),
        }
    }

    pub fn starting(tunnel: &Tunnel) -> Health {
        Health {
            public_key: tunnel.public_key(),
            problem: Some("starting".into()),
            ..Health::not_started(tunnel.config(), String::new())
        }
    }
}

/// Runs until cancelled. `endpoint` is what [`Tunnel::start`] was given;
/// `beat` is called on every round (the daemon's liveness for systemd).
/// The decisions are [`Watch`]'s; this loop polls boringtun once a second,
/// resolves (never longer than [`crate::RESOLVE_TIMEOUT`]), re-applies the peer,
/// sends probes and publishes [`Health`].
pub async fn supervise(
    tunnel: Arc<Tunnel>,
    endpoint: Option<SocketAddr>,
    health: watch::Sender<Health>,
    token: CancellationToken,
    beat: impl Fn() + Send,
) {
    let cfg = tunnel.config().clone();
    let peer_key = key::encode(&cfg.peer.public_key);
    let probe = probe_target(&cfg);
    let probe_socket = UdpSocket::bind(("0.0.0.0", 0)).ok();
    let mut w = Watch::new(
        cfg.handshake_timeout,
        peer_key.clone(),
        cfg.peer.endpoint.clone(),
        endpoint,
    );
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        beat();
        let t = Arc::clone(&tunnel);
        let peer = match tokio::task::spawn_blocking(move || t.peer()).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::error!("{e}");
                health.send_modify(|h| {
                    h.up = false;
                    h.problem = Some(e.to_string());
                });
                continue;
            }
            Err(e) => {
                tracing::error!("tunnel state task failed: {e}");
                continue;
            }
        };
        let step = w.observe(
            started.elapsed(),
            Observation {
                handshake_age: peer.handshake_age,
                rx_bytes: peer.rx_bytes,
            },
        );
        if step.resolve {
            let result = resolve(&cfg.peer.endpoint).await;
            let (reapply, log) = w.resolved(result);
            say(log);
            if let Some(r) = reapply {
                let t = Arc::clone(&tunnel);
                match tokio::task::spawn_blocking(move || t.reapply_peer(Some(r.addr))).await {
                    Ok(Ok(())) if r.moved => tracing::info!(
                        "tunnel endpoint {} now resolves to {} (was {}); peer re-applied",
                        cfg.peer.endpoint,
                        r.addr,
                        r.was.map_or("unresolved".into(), |e| e.to_string())
                    ),
                    Ok(Ok(())) => tracing::debug!("tunnel peer re-applied"),
                    Ok(Err(e)) => tracing::error!("re-applying the tunnel peer: {e}"),
                    Err(e) => tracing::error!("re-applying the tunnel peer: {e}"),
                }
            }
        }
        if step.probe {
            if let (Some(sock), Some(target)) = (&probe_socket, probe) {
                // Any packet routed into the interface makes boringtun
                // (re)start a handshake, and the center's WireGuard answer
                // (passive keepalive); its content never leaves encrypted.
                let _ = sock.send_to(b"kakehashi-probe", (target, 9));
            }
        }
        if let (true, Some(Log::Info(_))) = (step.up, &step.log) {
            tracing::info!(
                endpoint = %peer.endpoint.map_or("-".into(), |e| e.to_string()),
                "tunnel up: handshake with peer {peer_key}"
            );
        } else {
            say(step.log);
        }
        health.send_replace(Health {
            interface: cfg.interface.clone(),
            public_key: tunnel.public_key(),
            peer_public_key: peer_key.clone(),
            configured_endpoint: cfg.peer.endpoint.clone(),
            endpoint: peer.endpoint.or(w.endpoint()),
            up: step.up,
            last_handshake_age: peer.handshake_age,
            handshakes: step.handshakes,
            rx_bytes: peer.rx_bytes,
            tx_bytes: peer.tx_bytes,
            problem: step.problem,
        });
    }
}

fn say(log: Option<Log>) {
    match log {
        Some(Log::Info(m)) => tracing::info!("{m}"),
        Some(Log::Warn(m)) => tracing::warn!("{m}"),
        None => {}
    }
}
