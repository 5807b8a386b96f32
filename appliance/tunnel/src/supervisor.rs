//! Keeps the tunnel alive: watches the handshake age, re-resolves the
//! endpoint's name and re-applies the peer when the handshake is stale (with
//! backoff), probes the tunnel while it is down so boringtun keeps trying,
//! and publishes [`Health`] for the forwarders, `kakehashi status` and logs.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{key, probe_target, resolve, Tunnel};

/// WireGuard's REJECT_AFTER_TIME: a session older than this carries nothing.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(180);
const BACKOFF_FIRST: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
const WARN_EVERY: Duration = Duration::from_secs(30);

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
    /// A session is established: a handshake completed less than 180 s ago.
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
pub async fn supervise(
    tunnel: Arc<Tunnel>,
    mut endpoint: Option<SocketAddr>,
    health: watch::Sender<Health>,
    token: CancellationToken,
    beat: impl Fn() + Send,
) {
    let cfg = tunnel.config().clone();
    let peer_key = key::encode(&cfg.peer.public_key);
    let probe = probe_target(&cfg);
    let probe_socket = UdpSocket::bind(("0.0.0.0", 0)).ok();
    let mut backoff = BACKOFF_FIRST;
    let mut next_try = Instant::now() + BACKOFF_FIRST;
    let mut resolve_problem: Option<String> = None;
    let mut was_up = false;
    let mut last_warn: Option<Instant> = None;
    let mut handshakes = 0u64;
    let mut previous_age: Option<Duration> = None;
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
        let age = peer.handshake_age;
        // A handshake is new when its age went down (polls are 1 s apart).
        if let Some(a) = age {
            if previous_age.is_none_or(|p| a < p) {
                handshakes += 1;
            }
        }
        previous_age = age;
        let up = age.is_some_and(|a| a < SESSION_LIFETIME);
        let stale = age.is_none_or(|a| a > cfg.handshake_timeout);
        let now = Instant::now();
        if !stale {
            backoff = BACKOFF_FIRST;
            next_try = now;
        } else if now >= next_try {
            match resolve(&cfg.peer.endpoint).await {
                Ok(addr) => {
                    resolve_problem = None;
                    let moved = Some(addr) != endpoint;
                    if moved || !up {
                        let t = Arc::clone(&tunnel);
                        match tokio::task::spawn_blocking(move || t.reapply_peer(Some(addr))).await
                        {
                            Ok(Ok(())) if moved => {
                                tracing::info!(
                                    "tunnel endpoint {} now resolves to {addr} (was {}); peer re-applied",
                                    cfg.peer.endpoint,
                                    endpoint.map_or("unresolved".into(), |e| e.to_string())
                                );
                                endpoint = Some(addr);
                            }
                            Ok(Ok(())) => tracing::debug!("tunnel peer re-applied"),
                            Ok(Err(e)) => tracing::error!("re-applying the tunnel peer: {e}"),
                            Err(e) => tracing::error!("re-applying the tunnel peer: {e}"),
                        }
                    }
                }
                Err(e) => {
                    if resolve_problem.as_deref() != Some(e.as_str()) {
                        tracing::warn!("tunnel endpoint: {e}");
                    }
                    resolve_problem = Some(e);
                }
            }
            next_try = now + backoff;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        if !up {
            if let (Some(sock), Some(target)) = (&probe_socket, probe) {
                // Any packet routed into the interface makes boringtun
                // (re)start a handshake; its content never leaves encrypted.
                let _ = sock.send_to(b"kakehashi-probe", (target, 9));
            }
        }
        let silent_for = age.unwrap_or_else(|| tunnel.started().elapsed());
        let problem = if up {
            resolve_problem.clone()
        } else {
            let mut p = format!(
                "no handshake with peer {peer_key} at {} for {} s",
                cfg.peer.endpoint,
                silent_for.as_secs()
            );
            if let Some(r) = &resolve_problem {
                p.push_str(&format!(" ({r})"));
            } else {
                p.push_str(
                    " (check the center's public key, its endpoint and that UDP reaches it)",
                );
            }
            Some(p)
        };
        if up && !was_up {
            tracing::info!(
                endpoint = %peer.endpoint.map_or("-".into(), |e| e.to_string()),
                "tunnel up: handshake with peer {peer_key}"
            );
            last_warn = None;
        } else if !up && was_up {
            tracing::warn!("tunnel down: {}", problem.as_deref().unwrap_or(""));
            last_warn = Some(now);
        } else if !up
            && silent_for >= Duration::from_secs(10)
            && last_warn.is_none_or(|w| now.duration_since(w) >= WARN_EVERY)
        {
            tracing::warn!("tunnel down: {}", problem.as_deref().unwrap_or(""));
            last_warn = Some(now);
        }
        was_up = up;
        health.send_replace(Health {
            interface: cfg.interface.clone(),
            public_key: tunnel.public_key(),
            peer_public_key: peer_key.clone(),
            configured_endpoint: cfg.peer.endpoint.clone(),
            endpoint: peer.endpoint.or(endpoint),
            up,
            last_handshake_age: age,
            handshakes,
            rx_bytes: peer.rx_bytes,
            tx_bytes: peer.tx_bytes,
            problem,
        });
    }
}
