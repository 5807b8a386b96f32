//! systemd integration without libsystemd: the `sd_notify` datagram protocol
//! (`READY=1`, `STATUS=…`, `WATCHDOG=1`) and the liveness of the daemon's
//! loops that decides whether the watchdog is fed.
//!
//! The watchdog is fed only while every registered loop has reported within
//! its allowed silence. A loop inside a long operation (a connect, a
//! C-STORE) declares a budget for it — the operation's own timeout and a
//! margin — and beats on progress; it is judged against that budget, so an
//! operation whose timeout failed to fire still stops the watchdog.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where systemd listens, if it started us with `Type=notify`.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let path = path.to_str()?;
        let addr = match path.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes()).ok()?,
            None => SocketAddr::from_pathname(path).ok()?,
        };
        let socket = UnixDatagram::unbound().ok()?;
        Some(Notifier { socket, addr })
    }

    pub fn send(&self, message: &str) {
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            tracing::debug!("sd_notify: {e}");
        }
    }
}

/// The watchdog interval systemd asked for (`WatchdogSec=`), if it is for us.
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str()?.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

#[derive(Debug)]
struct LoopState {
    name: String,
    max_silence: Duration,
    last_ms: AtomicU64,
    /// The allowed silence inside the current operation; 0 when not in one.
    busy_ms: AtomicU64,
}

/// The loops whose silence stops the watchdog.
#[derive(Debug)]
pub struct Liveness {
    started: Instant,
    loops: Mutex<Vec<Arc<LoopState>>>,
}

/// A loop's handle for reporting that it is alive.
#[derive(Debug, Clone)]
pub struct Beat {
    state: Arc<LoopState>,
    started: Instant,
}

impl Beat {
    pub fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.state.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Entering an operation that may be silent for up to `budget` between
    /// beats (its own timeout and a margin); `None` when it ends.
    pub fn busy(&self, budget: Option<Duration>) {
        self.beat();
        let ms = budget.map_or(0, |b| (b.as_millis() as u64).max(1));
        self.state.busy_ms.store(ms, Ordering::Relaxed);
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            started: Instant::now(),
            loops: Mutex::new(Vec::new()),
        }
    }
}

impl Liveness {
    pub fn register(&self, name: impl Into<String>, max_silence: Duration) -> Beat {
        let state = Arc::new(LoopState {
            name: name.into(),
            max_silence,
            last_ms: AtomicU64::new(self.started.elapsed().as_millis() as u64),
            busy_ms: AtomicU64::new(0),
        });
        self.loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(&state));
        Beat {
            state,
            started: self.started,
        }
    }

    /// The loops that have been silent for too long.
    pub fn stalled(&self) -> Vec<String> {
        let now = self.started.elapsed().as_millis() as u64;
        self.loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|l| {
                let allowed = match l.busy_ms.load(Ordering::Relaxed) {
                    0 => l.max_silence.as_millis() as u64,
                    budget => budget,
                };
                now.saturating_sub(l.last_ms.load(Ordering::Relaxed)) > allowed
            })
            .map(|l| l.name.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_loop_is_named_and_a_busy_one_is_judged_by_its_budget() {
        let l = Liveness::default();
        let quick = l.register("checkpointer", Duration::ZERO);
        let _slow = l.register("forwarder", Duration::from_secs(3600));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(l.stalled(), vec!["checkpointer".to_string()]);
        quick.busy(Some(Duration::from_secs(3600)));
        assert!(l.stalled().is_empty(), "within its operation's budget");
        quick.busy(Some(Duration::from_millis(1)));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            l.stalled(),
            vec!["checkpointer".to_string()],
            "an operation that outlives its budget stops the watchdog"
        );
        quick.busy(None);
        quick.beat();
        assert!(l.stalled().is_empty());
    }
}
