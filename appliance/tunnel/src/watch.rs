//! What the tunnel supervisor decides, as plain logic on an injected clock:
//! each poll of boringtun's state goes in (with the time since the
//! supervisor started), and out come whether the tunnel is up, whether to
//! probe it, whether to resolve the endpoint's name again, and what to log.
//! [`crate::supervise`] only moves those between boringtun, the resolver and
//! the forwarders; a week of a dead link is a microsecond test here.
//!
//! Up means a live session: a handshake younger than WireGuard's 180 s
//! session lifetime, *and* something received within [`SILENCE`]. The
//! second part matters when a link dies silently: the session would count as
//! valid for up to three minutes while nothing can cross. To tell, the
//! supervisor sends a small probe into the tunnel whenever nothing has been
//! received for [`PROBE_EVERY`]: a data packet makes the center's WireGuard
//! answer with a keepalive within 10 s (WireGuard's passive keepalive), so
//! on a live link something always arrives within [`SILENCE`].

use std::net::SocketAddr;
use std::time::Duration;

/// WireGuard's REJECT_AFTER_TIME: a session older than this carries nothing.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(180);
/// Probe when nothing was received for this long.
pub const PROBE_EVERY: Duration = Duration::from_secs(10);
/// Down when nothing was received for this long despite probes (a probe, the
/// 10 s passive keepalive it triggers, and a lost packet or two).
pub const SILENCE: Duration = Duration::from_secs(40);
const BACKOFF_FIRST: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
const WARN_EVERY: Duration = Duration::from_secs(30);

/// One reading of boringtun's peer state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Observation {
    pub handshake_age: Option<Duration>,
    pub rx_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Log {
    Info(String),
    Warn(String),
}

/// What to do after a poll.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Step {
    pub up: bool,
    /// Handshakes seen since the start (a change: a fresh session).
    pub handshakes: u64,
    /// Send a probe into the tunnel now.
    pub probe: bool,
    /// Resolve the endpoint's name now, then report with [`Watch::resolved`].
    pub resolve: bool,
    /// Why the tunnel is down, or what else is wrong.
    pub problem: Option<String>,
    pub log: Option<Log>,
}

/// What to do with a resolved endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reapply {
    pub addr: SocketAddr,
    /// The name points elsewhere now (log it).
    pub moved: bool,
    pub was: Option<SocketAddr>,
}

/// The supervisor's memory between polls.
#[derive(Debug)]
pub struct Watch {
    handshake_timeout: Duration,
    peer: String,
    endpoint_name: String,
    endpoint: Option<SocketAddr>,
    previous_age: Option<Duration>,
    handshakes: u64,
    last_rx: u64,
    /// When something was last received (or a handshake completed).
    heard_at: Option<Duration>,
    last_probe: Option<Duration>,
    next_resolve: Duration,
    backoff: Duration,
    resolve_problem: Option<String>,
    was_up: bool,
    last_warn: Option<Duration>,
    up: bool,
}

impl Watch {
    /// `peer`: the center's public key (for messages); `endpoint`: what the
    /// name resolved to at start, if it did.
    pub fn new(
        handshake_timeout: Duration,
        peer: String,
        endpoint_name: String,
        endpoint: Option<SocketAddr>,
    ) -> Watch {
        Watch {
            handshake_timeout,
            peer,
            endpoint_name,
            endpoint,
            previous_age: None,
            handshakes: 0,
            last_rx: 0,
            heard_at: None,
            last_probe: None,
            next_resolve: BACKOFF_FIRST,
            backoff: BACKOFF_FIRST,
            resolve_problem: None,
            was_up: false,
            last_warn: None,
            up: false,
        }
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint
    }

    /// One poll, `now` after the supervisor started.
    pub fn observe(&mut self, now: Duration, obs: Observation) -> Step {
        let age = obs.handshake_age;
        // A handshake is new when its age went down (polls are a second apart).
        let fresh = age.is_some_and(|a| self.previous_age.is_none_or(|p| a < p));
        if fresh {
            self.handshakes += 1;
        }
        self.previous_age = age;
        if fresh || obs.rx_bytes != self.last_rx {
            self.heard_at = Some(now);
            self.last_rx = obs.rx_bytes;
        }
        let quiet = self.heard_at.map(|t| now.saturating_sub(t));
        let session = age.is_some_and(|a| a < SESSION_LIFETIME);
        let up = session && quiet.is_some_and(|q| q < SILENCE);
        self.up = up;

        let stale = age.is_none_or(|a| a > self.handshake_timeout);
        let resolve = if !stale {
            self.backoff = BACKOFF_FIRST;
            self.next_resolve = now;
            false
        } else if now >= self.next_resolve {
            self.next_resolve = now + self.backoff;
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            true
        } else {
            false
        };

        // Down: make boringtun (re)start a handshake. Up but quiet: make the
        // center's WireGuard answer, so a dead link is noticed.
        let probe = !up
            || (quiet.is_none_or(|q| q >= PROBE_EVERY)
                && self
                    .last_probe
                    .is_none_or(|p| now.saturating_sub(p) >= PROBE_EVERY));
        if probe {
            self.last_probe = Some(now);
        }

        let problem = if up {
            self.resolve_problem.clone()
        } else {
            let what = if session {
                format!(
                    "nothing received from peer {} at {} for {} s (the link or the center went away)",
                    self.peer,
                    self.endpoint_name,
                    quiet.unwrap_or(now).as_secs()
                )
            } else {
                format!(
                    "no handshake with peer {} at {} for {} s",
                    self.peer,
                    self.endpoint_name,
                    age.unwrap_or(now).as_secs()
                )
            };
            Some(match &self.resolve_problem {
                Some(r) => format!("{what} ({r})"),
                None if session => what,
                None => format!(
                    "{what} (check the center's public key, its endpoint and that UDP reaches it)"
                ),
            })
        };

        let silent_for = quiet.unwrap_or(now);
        let log = if up && !self.was_up {
            self.last_warn = None;
            Some(Log::Info(format!(
                "tunnel up: handshake with peer {}",
                self.peer
            )))
        } else if !up && self.was_up {
            self.last_warn = Some(now);
            problem
                .clone()
                .map(|p| Log::Warn(format!("tunnel down: {p}")))
        } else if !up
            && silent_for >= Duration::from_secs(10)
            && self
                .last_warn
                .is_none_or(|w| now.saturating_sub(w) >= WARN_EVERY)
        {
            self.last_warn = Some(now);
            problem
                .clone()
                .map(|p| Log::Warn(format!("tunnel down: {p}")))
        } else {
            None
        };
        self.was_up = up;
        Step {
            up,
            handshakes: self.handshakes,
            probe,
            resolve,
            problem,
            log,
        }
    }

    /// The outcome of a resolution asked for by [`Step::resolve`]: whether
    /// to replace the peer (the address changed, or the tunnel is down and
    /// a fresh peer makes boringtun start over).
    pub fn resolved(
        &mut self,
        result: Result<SocketAddr, String>,
    ) -> (Option<Reapply>, Option<Log>) {
        match result {
            Ok(addr) => {
                self.resolve_problem = None;
                let moved = Some(addr) != self.endpoint;
                let was = self.endpoint;
                if moved {
                    self.endpoint = Some(addr);
                }
                let reapply = (moved || !self.up).then_some(Reapply { addr, moved, was });
                (reapply, None)
            }
            Err(e) => {
                let log = (self.resolve_problem.as_deref() != Some(e.as_str()))
                    .then(|| Log::Warn(format!("tunnel endpoint: {e}")));
                self.resolve_problem = Some(e);
                (None, log)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch() -> Watch {
        Watch::new(
            Duration::from_secs(150),
            "KEY".into(),
            "center.test:51820".into(),
            None,
        )
    }

    /// A live link: the handshake renews every 2 minutes, keepalives come
    /// back whenever the box probes.
    fn live(now: u64, rx: &mut u64, probed: bool) -> Observation {
        if probed {
            *rx += 32;
        }
        Observation {
            handshake_age: Some(Duration::from_secs(now % 120)),
            rx_bytes: *rx,
        }
    }

    #[test]
    fn a_live_link_stays_up_for_a_day_with_a_probe_every_ten_seconds_at_most() {
        let mut w = watch();
        let (mut rx, mut probed, mut probes) = (0, false, 0);
        for s in 0..86_400u64 {
            let step = w.observe(Duration::from_secs(s), live(s, &mut rx, probed));
            if s > 2 {
                assert!(step.up, "down at {s} s: {:?}", step.problem);
            }
            assert!(!step.resolve, "a fresh handshake needs no resolving");
            probed = step.probe;
            probes += u64::from(step.probe);
        }
        assert!(probes <= 86_400 / 10 + 1, "{probes} probes");
    }

    #[test]
    fn a_silent_link_is_down_within_a_minute_though_the_session_is_valid() {
        let mut w = watch();
        let mut rx = 0;
        for s in 0..60 {
            w.observe(Duration::from_secs(s), live(s, &mut rx, true));
        }
        // The WAN is cut at 60 s, right after a handshake: for another two
        // minutes the session is valid, but nothing comes back.
        let mut down_at = None;
        let mut probes_while_down = 0;
        for s in 60..200 {
            let step = w.observe(
                Duration::from_secs(s),
                Observation {
                    handshake_age: Some(Duration::from_secs(s - 60)),
                    rx_bytes: rx,
                },
            );
            if !step.up && down_at.is_none() {
                down_at = Some(s);
                assert!(
                    matches!(&step.log, Some(Log::Warn(m)) if m.contains("nothing received")),
                    "{step:?}"
                );
            }
            if !step.up {
                probes_while_down += u64::from(step.probe);
            }
        }
        let down_at = down_at.expect("noticed");
        assert!(down_at - 60 <= 45, "down after {} s", down_at - 60);
        assert!(
            probes_while_down >= 200 - down_at,
            "a probe every second while down keeps boringtun handshaking"
        );
    }

    #[test]
    fn a_stale_handshake_re_resolves_with_backoff_and_follows_a_moved_center() {
        let mut w = watch();
        let mut resolves = Vec::new();
        for s in 0..400u64 {
            let step = w.observe(Duration::from_secs(s), Observation::default());
            assert!(!step.up);
            if step.resolve {
                resolves.push(s);
                let (reapply, _) = w.resolved(Ok("198.51.100.2:51820".parse().expect("addr")));
                assert!(reapply.is_some(), "down: the peer is re-applied");
            }
        }
        // 5 s doubling to 60 s: 5, 10, 20, 40, 80, 140, 200, 260, 320, 380
        let gaps: Vec<u64> = resolves.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(&gaps[..5], &[5, 10, 20, 40, 60], "{resolves:?}");
        assert!(gaps[5..].iter().all(|g| *g == 60), "{gaps:?}");
        let (reapply, _) = w.resolved(Ok("198.51.100.3:51820".parse().expect("addr")));
        let r = reapply.expect("moved");
        assert!(r.moved && r.was.is_some());
    }

    #[test]
    fn a_resolver_failure_is_said_once_and_shown() {
        let mut w = watch();
        let step = w.observe(Duration::from_secs(10), Observation::default());
        assert!(step.resolve);
        let (_, log) = w.resolved(Err("cannot resolve center.test:51820: timed out".into()));
        assert!(log.is_some());
        let (_, log) = w.resolved(Err("cannot resolve center.test:51820: timed out".into()));
        assert!(log.is_none(), "not repeated");
        let step = w.observe(Duration::from_secs(11), Observation::default());
        assert!(step.problem.expect("down").contains("timed out"));
    }
}
