//! systemd integration without libsystemd: the `sd_notify` datagram protocol
//! (`READY=1`, `STATUS=…`, `WATCHDOG=1`) and the liveness of the daemon's
//! loops that decides whether the watchdog is fed.
//!
//! The watchdog is fed only while every registered loop has reported within
//! its allowed silence; a loop inside an operation that has its own timeout
//! (a C-STORE, a connect) marks itself busy and is not judged meanwhile.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    busy: AtomicBool,
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

    /// Inside an operation bounded by its own timeouts.
    pub fn busy(&self, busy: bool) {
        self.beat();
        self.state.busy.store(busy, Ordering::Relaxed);
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
            busy: AtomicBool::new(false),
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
            .filter(|l| !l.busy.load(Ordering::Relaxed))
            .filter(|l| {
                now.saturating_sub(l.last_ms.load(Ordering::Relaxed))
                    > l.max_silence.as_millis() as u64
            })
            .map(|l| l.name.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_loop_is_named_unless_busy() {
        let l = Liveness::default();
        let quick = l.register("checkpointer", Duration::ZERO);
        let _slow = l.register("forwarder", Duration::from_secs(3600));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(l.stalled(), vec!["checkpointer".to_string()]);
        quick.busy(true);
        assert!(l.stalled().is_empty());
    }
}
