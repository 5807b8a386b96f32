//! One forwarder per destination: `destinations.associations` workers
//! (4 by default), each with its own association, take instances from the
//! destination's one queue (see [`crate::schedule`]: highest priority first,
//! each worker staying on its study, so a study is spread over the
//! associations), send them, and record each outcome in the spool. DICOM
//! waits for every C-STORE-RSP, so one association moves one instance per
//! round trip; several fill a long link. A destination that refuses another
//! association (A-ASSOCIATE-RJ transient, or no answer) while others are
//! open is not "down": the forwarder uses as many as it accepted and tries
//! one more every [`MORE_ASSOCIATIONS_AFTER_MS`].
//!
//! Failure handling: anything about the connection (refused, timeout,
//! abort, association rejected — except a refusal of one more association
//! while others are open, above) backs off the whole destination and burns
//! nothing; a transient C-STORE status (0xA7xx, 0x0110…) backs off that
//! instance; a permanent status or a refused SOP class/transfer syntax
//! dead-letters it with the reason. Transient failures never dead-letter.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kakehashi_config::Destination;
use kakehashi_control::DestinationStatus;
use kakehashi_dicom::dimse::{classify_store_status, StatusClass};
use kakehashi_dicom::scu::{Scu, ScuError, ScuOptions};
use kakehashi_spool::Durability;
use kakehashi_spool::{AuditEvent, DatasetRef, InstanceRecord, RouteState, RouteUpdate};
use std::io::Read as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::schedule::{Gate, Item, Queue, Transition};
use crate::{now_ms, Shared};

/// Added to an operation's own timeout for the watchdog's budget.
const OPERATION_MARGIN: Duration = Duration::from_secs(30);

/// A C-STORE without progress this long shows as stalled in `status`.
const STALLED_AFTER_MS: u64 = 15_000;

/// After a destination refused an association, one more is tried this
/// long after (each time).
pub const MORE_ASSOCIATIONS_AFTER_MS: u64 = 300_000;

#[derive(Debug, Default)]
struct Stats {
    /// Per worker with a C-STORE under way: since when, and the last
    /// fragment written (or the start of the C-STORE).
    sending: std::collections::BTreeMap<usize, (u64, u64)>,
    delivered: u64,
    last_success_ms: Option<u64>,
    last_error: Option<String>,
    last_error_ms: Option<u64>,
    /// Paused, backing off, or open (see [`Gate`]).
    gate: Gate,
    /// The last refusal to connect outside the tunnel (audited once).
    last_refusal: Option<String>,
    /// Deliveries per study, for its rate and ETA.
    by_study: std::collections::HashMap<Arc<str>, Deliveries>,
    delivered_bytes: u64,
    /// Seconds from C-STORE-RQ to a success response, of delivered instances.
    latency: crate::metrics::Histogram,
}

/// What a destination acknowledged of one study since the start.
#[derive(Debug, Default)]
struct Deliveries {
    instances: u64,
    bytes: u64,
    /// (when, bytes) of the acknowledgements of the last [`RATE_WINDOW_MS`].
    recent: std::collections::VecDeque<(u64, u64)>,
    /// When its first C-STORE began, since it last had nothing
    /// acknowledged for a window: several associations acknowledge
    /// together, so the rate is measured from the start of the sending,
    /// not between acknowledgements.
    started_ms: Option<u64>,
}

/// A study at one destination (see [`Handle::study_loads`]).
#[derive(Debug, Clone, Copy)]
pub struct StudyFlow {
    pub queued: u64,
    pub queued_bytes: u64,
    pub on_the_wire: u64,
    /// Acknowledged here since the start.
    pub delivered: u64,
    pub delivered_bytes: u64,
    /// Bytes acknowledged per second (see [`Deliveries::rate`]).
    pub rate: Option<u64>,
}

/// The window a study's rate is measured over.
const RATE_WINDOW_MS: u64 = 60_000;

impl Deliveries {
    fn begin(&mut self, now: u64) {
        self.prune(now);
        if self.recent.is_empty() || self.started_ms.is_none() {
            self.started_ms = Some(now);
        }
    }

    fn add(&mut self, now: u64, bytes: u64) {
        self.instances += 1;
        self.bytes += bytes;
        self.recent.push_back((now, bytes));
        self.prune(now);
    }

    fn prune(&mut self, now: u64) {
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) > RATE_WINDOW_MS)
        {
            self.recent.pop_front();
        }
    }

    /// Bytes acknowledged per second, from the start of the sending or
    /// over the last window when that is longer ago.
    fn rate(&self, now: u64) -> Option<u64> {
        let from = self.started_ms?.max(now.saturating_sub(RATE_WINDOW_MS));
        let bytes: u64 = self
            .recent
            .iter()
            .filter(|(t, _)| *t >= from)
            .map(|(_, b)| *b)
            .sum();
        let span = now.saturating_sub(from);
        (bytes > 0 && span > 0).then(|| bytes * 1000 / span)
    }
}

/// How many workers may hold an association.
#[derive(Debug)]
struct Limit {
    now: usize,
    /// The last refusal (or the last step up after one).
    since_ms: u64,
}

#[derive(Debug)]
pub struct Handle {
    pub dest: Destination,
    queue: Mutex<Queue>,
    /// Wakes a worker for new work (see [`Handle::wake_one`]).
    notify: Notify,
    /// Wakes a worker idle with an association open.
    notify_open: Notify,
    /// Workers idle with an association open, waiting for work.
    idle_open: AtomicUsize,
    stats: Mutex<Stats>,
    /// Associations open now.
    open: AtomicUsize,
    /// Associations open or being opened (what [`Handle::allowed`] bounds).
    slots: AtomicUsize,
    limit: Mutex<Limit>,
}

impl Handle {
    /// An empty queue; [`Handle::enqueue`] fills it (at start, from the spool).
    pub fn new(dest: Destination) -> Handle {
        let queue = Queue::default();
        let most = dest.associations.max(1);
        Handle {
            dest,
            queue: Mutex::new(queue),
            notify: Notify::new(),
            notify_open: Notify::new(),
            idle_open: AtomicUsize::new(0),
            stats: Mutex::new(Stats::default()),
            open: AtomicUsize::new(0),
            slots: AtomicUsize::new(0),
            limit: Mutex::new(Limit {
                now: most,
                since_ms: 0,
            }),
        }
    }

    fn limit(&self) -> std::sync::MutexGuard<'_, Limit> {
        self.limit.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many associations may be open at `now`: the configured number,
    /// fewer after a refusal, one more each [`MORE_ASSOCIATIONS_AFTER_MS`].
    fn allowed(&self, now: u64) -> usize {
        let most = self.dest.associations.max(1);
        let mut l = self.limit();
        if l.now < most && now.saturating_sub(l.since_ms) >= MORE_ASSOCIATIONS_AFTER_MS {
            l.now += 1;
            l.since_ms = now;
        }
        l.now
    }

    /// A slot for one more association, if fewer than allowed are open or
    /// being opened. Associations already open are never closed for a
    /// lower limit (a center frees its slots only as they close).
    fn take_slot(&self, now: u64) -> bool {
        let allowed = self.allowed(now);
        self.slots
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < allowed).then_some(n + 1)
            })
            .is_ok()
    }

    fn give_slot(&self) {
        let _ = self
            .slots
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// The destination refused one more association while `open` were
    /// open: that many, for now.
    fn refused_more(&self, open: usize, now: u64) -> usize {
        let mut l = self.limit();
        l.now = open.clamp(1, l.now.max(1));
        l.since_ms = now;
        l.now
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding this lock is a bug that already killed the
        // task; the queue itself stays consistent (single-field updates).
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called at start for every record, by the ingress after a commit, and
    /// by `queue retry`.
    pub fn enqueue(&self, rec: &InstanceRecord) {
        let mut q = self.queue();
        if let Some(item) = Item::from_record(rec, &self.dest.name, q.strings()) {
            q.push(item);
            drop(q);
            self.wake_one();
        }
    }

    /// Drops an instance that will not be sent after all (superseded by a
    /// corrected version). One being sent right now finishes first: its
    /// SOP instance stays in flight, so the correction follows it.
    pub fn forget(&self, id: u64) {
        self.queue().remove(id);
    }

    /// Lets an operator's retry skip the current backoff.
    pub fn wake(&self) {
        self.stats().gate.wake();
        self.wake_one();
    }

    /// Wakes one worker for new work, preferring one idle with an
    /// association open: it can send at once, while a worker without one
    /// would open another association (to a center serving one at a time,
    /// a wait until the idle one's linger ends). Every worker looks at the
    /// queue again whenever it wakes, for whatever reason, so if the idle
    /// one is leaving just now, it still finds the work.
    fn wake_one(&self) {
        if self.idle_open.load(Ordering::SeqCst) > 0 {
            self.notify_open.notify_one();
        } else {
            self.notify.notify_one();
        }
    }

    /// The destination's status; `dead_letter` comes from the spool (the
    /// queue holds only pending instances). O(log n) in the backlog.
    pub fn status(&self, dead_letter: u64) -> DestinationStatus {
        let now = now_ms();
        let s = self.stats();
        let q = self.queue();
        let next_due = q.next_due_ms().map(|d| d.max(s.gate.blocked_until_ms()));
        // Nothing moves when no worker has written for a while.
        let last_progress = s.sending.values().map(|(_, p)| *p).max();
        let sending_since = s.sending.values().map(|(t, _)| *t).min();
        DestinationStatus {
            name: self.dest.name.clone(),
            ae_title: self.dest.ae_title.to_string(),
            address: self.dest.address.clone(),
            via_tunnel: self.dest.via_tunnel,
            state: if s.gate.paused() {
                "paused"
            } else if last_progress.is_some_and(|p| now.saturating_sub(p) >= STALLED_AFTER_MS) {
                "stalled"
            } else if last_progress.is_some() {
                "sending"
            } else if s.gate.blocked_until_ms() > now && q.len() > 0 {
                "backoff"
            } else {
                "idle"
            }
            .to_string(),
            queued: q.len() as u64,
            queued_bytes: q.bytes(),
            dead_letter,
            held: 0,
            stuck: q.stuck(),
            oldest_age_s: q.oldest_received_ms().map(|t| now.saturating_sub(t) / 1000),
            delivered_since_start: s.delivered,
            last_success_ms: s.last_success_ms,
            last_error: s.last_error.clone(),
            last_error_ms: s.last_error_ms,
            next_attempt_in_s: next_due
                .filter(|d| *d > now)
                .map(|d| (d - now).div_ceil(1000)),
            connect_failures: s.gate.connect_failures(),
            sending_for_s: sending_since.map(|t| now.saturating_sub(t) / 1000),
            no_progress_for_s: last_progress.map(|p| now.saturating_sub(p) / 1000),
            associations: self.open.load(Ordering::SeqCst) as u64,
            associations_allowed: self.allowed(now) as u64,
            associations_max: self.dest.associations as u64,
            in_flight: q.in_flight() as u64,
            studies: Vec::new(),
        }
    }

    /// Every study queued here: what is queued and on the wire, what was
    /// delivered of it and the rate it is acknowledged at.
    fn study_rows(&self) -> Vec<(Arc<str>, StudyFlow)> {
        let now = now_ms();
        let loads: Vec<_> = {
            let q = self.queue();
            q.studies().map(|(s, l)| (Arc::clone(s), *l)).collect()
        };
        let s = self.stats();
        loads
            .into_iter()
            .map(|(study, load)| {
                let done = s.by_study.get(&study);
                let flow = StudyFlow {
                    queued: load.queued,
                    queued_bytes: load.bytes,
                    on_the_wire: load.on_the_wire,
                    delivered: done.map_or(0, |d| d.instances),
                    delivered_bytes: done.map_or(0, |d| d.bytes),
                    rate: done.and_then(|d| d.rate(now)),
                };
                (study, flow)
            })
            .collect()
    }

    /// The studies queued here (at most `most`, those on the wire first,
    /// then the largest backlog); `received` is left for the caller, who
    /// has the spool.
    pub fn studies(&self, most: usize) -> Vec<kakehashi_control::StudyProgress> {
        let mut rows = self.study_rows();
        rows.sort_by(|a, b| {
            (b.1.on_the_wire, b.1.queued_bytes, &a.0).cmp(&(
                a.1.on_the_wire,
                a.1.queued_bytes,
                &b.0,
            ))
        });
        rows.truncate(most);
        rows.into_iter()
            .map(|(study, f)| kakehashi_control::StudyProgress {
                study_instance_uid: study.to_string(),
                received: 0,
                received_bytes: 0,
                queued: f.queued,
                queued_bytes: f.queued_bytes,
                on_the_wire: f.on_the_wire,
                delivered: f.delivered,
                delivered_bytes: f.delivered_bytes,
                rate_bytes_per_s: f.rate,
                eta_s: f.rate.map(|r| f.queued_bytes.div_ceil(r)),
            })
            .collect()
    }

    /// What `GET /metrics` shows of this destination.
    pub fn metrics(&self) -> crate::metrics::Destination {
        let now = now_ms();
        let (lanes, oldest, in_flight) = {
            let q = self.queue();
            (q.lanes(), q.oldest_received_ms(), q.in_flight())
        };
        let s = self.stats();
        crate::metrics::Destination {
            name: self.dest.name.clone(),
            lanes,
            oldest_age_s: oldest.map(|t| now.saturating_sub(t) as f64 / 1000.0),
            delivered: s.delivered,
            delivered_bytes: s.delivered_bytes,
            latency: s.latency.clone(),
            associations_open: self.open.load(Ordering::SeqCst) as u64,
            associations_allowed: self.allowed(now) as u64,
            in_flight: in_flight as u64,
            connect_failures: u64::from(s.gate.connect_failures()),
        }
    }

    /// Per study queued here: bytes queued, instances on the wire, and the
    /// rate this destination acknowledges it at.
    pub fn study_loads(&self) -> std::collections::HashMap<String, StudyFlow> {
        self.study_rows()
            .into_iter()
            .map(|(study, f)| (study.to_string(), f))
            .collect()
    }

    fn note_error(&self, message: String) {
        let mut s = self.stats();
        s.last_error = Some(message);
        s.last_error_ms = Some(now_ms());
    }
}

/// Outcome of one C-STORE, as the forwarder acts on it.
enum Sent {
    /// The payload failed its check in the middle of a C-STORE: dead-letter
    /// it and abort the association, so the receiver discards the part it got.
    Corrupt(String),
    /// The payload could not be read (EIO…) in the middle of a C-STORE: abort
    /// the association (the receiver discards the part it got) and retry.
    ReadFailed(String),
    Delivered(u16),
    Retry(String),
    Dead(String),
    /// The association is unusable; back off the destination.
    Connection(ScuError),
}

/// The destination's workers, until `token` is cancelled.
pub async fn run(shared: Arc<Shared>, handle: Arc<Handle>, token: CancellationToken) {
    let mut workers = tokio::task::JoinSet::new();
    for n in 0..handle.dest.associations.max(1) {
        workers.spawn(worker(
            Arc::clone(&shared),
            Arc::clone(&handle),
            token.clone(),
            n,
        ));
    }
    while let Some(done) = workers.join_next().await {
        if let Err(e) = done {
            tracing::error!(destination = %handle.dest.name, "forwarder worker failed: {e}");
        }
    }
}

type Assoc = Option<(Scu, Arc<str>)>;

/// Releases (or aborts) the worker's association, if any.
async fn close(handle: &Handle, assoc: &mut Assoc, abort: bool) {
    if let Some((a, _)) = assoc.take() {
        handle.open.fetch_sub(1, Ordering::SeqCst);
        handle.give_slot();
        if abort {
            a.abort().await;
        } else {
            a.release().await;
        }
    }
}

/// A refusal that says "not one more", not "down": an association
/// rejected as transient, or one left unanswered (a peer that serves one
/// association at a time), while others are open.
fn refuses_more(e: &ScuError) -> bool {
    matches!(
        e,
        ScuError::Rejected {
            permanent: false,
            ..
        } | ScuError::Timeout {
            what: "negotiating the association",
            ..
        }
    )
}

/// Worker `n` of a destination: one association at a time.
async fn worker(shared: Arc<Shared>, handle: Arc<Handle>, token: CancellationToken, n: usize) {
    let dest = handle.dest.clone();
    let opts = ScuOptions {
        calling_ae: dest.calling_ae_title.to_string(),
        called_ae: dest.ae_title.to_string(),
        max_pdu: dest.max_pdu,
        connect_timeout: dest.connect_timeout,
        response_timeout: dest.response_timeout,
    };
    let mut assoc: Assoc = None;
    // Whether the open association has carried an instance yet.
    let mut carried = false;
    // Behind the tunnel: pause while it is down, and retry at once after a
    // fresh handshake instead of sitting out a connection backoff.
    let mut tunnel = if dest.via_tunnel {
        shared.tunnel_health.clone()
    } else {
        None
    };
    if let Some(t) = &tunnel {
        // The handshakes before this forwarder started are not news.
        let h = t.borrow().handshakes;
        handle.stats().gate.tunnel(true, h, false);
    }
    let beat = shared.liveness.register(
        format!("forwarder {} #{n}", dest.name),
        Duration::from_secs(60),
    );
    loop {
        beat.beat();
        if token.is_cancelled() {
            break;
        }
        if shared.keys_problem().is_some() {
            // Without its keys the box cannot read what it holds: send nothing.
            handle.stats().gate.pause();
            tokio::select! {
                _ = token.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
            continue;
        }
        if let Some(t) = tunnel.as_mut() {
            let (up, seen) = {
                let h = t.borrow_and_update();
                (h.up, h.handshakes)
            };
            let pending = handle.queue().len() > 0;
            let change = handle.stats().gate.tunnel(up, seen, pending);
            match change {
                Some(Transition::Paused) => {
                    tracing::info!(destination = %dest.name, queued = handle.queue().len(), "paused: the tunnel is down; nothing is retried or dead-lettered until it is up");
                }
                Some(Transition::Resumed) => {
                    tracing::info!(destination = %dest.name, "resumed: tunnel up")
                }
                None => {}
            }
            if handle.stats().gate.paused() {
                close(&handle, &mut assoc, true).await;
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = t.wait_for(|h| h.up) => {}
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                }
                continue;
            }
        }
        let now = now_ms();
        let blocked_until = handle.stats().gate.blocked_until_ms();
        // What is next, looked at only: it is claimed once an association
        // can carry it, so no instance waits on a worker that is still
        // connecting (to a peer that serves one association at a time,
        // for instance).
        let picked = if blocked_until > now {
            None
        } else {
            handle
                .queue()
                .pick(now, assoc.as_ref().map(|(_, s)| &**s))
                .cloned()
        };
        let Some(item) = picked else {
            // Nothing due. If nothing waits at all, make the deliveries durable
            // now so their payloads are freed (and `status` shows it) at once.
            if handle.queue().len() == 0 {
                let spool = Arc::clone(&shared.spool);
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || spool.checkpoint()).await {
                    tracing::error!("spool checkpoint failed: {e}");
                }
            }
            // Wait for new work, the next due time, or cancellation; an open
            // association lingers a little for more of its study. One that
            // carried nothing (it was answered only after other workers had
            // sent everything: a center serving one association at a time
            // answers them in turn) is released at once, so such a center
            // is not held for a linger per worker.
            let due = handle.queue().next_due_ms().map(|d| d.max(blocked_until));
            let wait = due.map_or(Duration::from_secs(3600), |d| {
                Duration::from_millis(d.saturating_sub(now).max(10))
            });
            let linger = if assoc.is_some() {
                if carried {
                    dest.linger
                } else {
                    Duration::ZERO
                }
            } else {
                Duration::MAX
            };
            // Wake at least every 10 s: the watchdog hears from this loop,
            // and the tunnel state is looked at again.
            let wait = wait.min(Duration::from_secs(10));
            let tunnel_changed = async {
                match tunnel.as_mut() {
                    Some(t) => {
                        let _ = t.changed().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let open = assoc.is_some();
            if open {
                handle.idle_open.fetch_add(1, Ordering::SeqCst);
            }
            let lingered = tokio::select! {
                _ = token.cancelled() => break,
                _ = handle.notify.notified() => false,
                _ = handle.notify_open.notified(), if open => false,
                _ = tokio::time::sleep(wait) => false,
                _ = tunnel_changed, if blocked_until > now => false,
                _ = tokio::time::sleep(linger) => true,
            };
            if open {
                handle.idle_open.fetch_sub(1, Ordering::SeqCst);
            }
            if lingered {
                close(&handle, &mut assoc, false).await;
            }
            continue;
        };

        // Reuse the association only if it carries this exact context.
        let reusable = assoc
            .as_ref()
            .and_then(|(a, _)| a.context_for(&item.sop_class, &item.transfer_syntax))
            .is_some();
        if !reusable {
            close(&handle, &mut assoc, false).await;
            if !handle.take_slot(now_ms()) {
                // As many associations as the destination takes are open
                // (or opening): wait for one to finish.
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = handle.notify.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            let contexts = {
                let mut q = handle.queue();
                let mut c = q.contexts_for_study(&item.study, now);
                let own = (item.sop_class.to_string(), item.transfer_syntax.to_string());
                if !c.contains(&own) {
                    c.insert(0, own);
                }
                c
            };
            // Resolve, connect and negotiate each have their own timeout.
            beat.busy(Some(
                dest.connect_timeout * 2 + dest.response_timeout + OPERATION_MARGIN,
            ));
            let connected = tokio::select! {
                _ = token.cancelled() => break,
                c = connect(&shared, &dest, &opts, &contexts) => c,
            };
            beat.busy(None);
            if connected.is_err() {
                handle.give_slot();
            }
            match connected {
                Ok(a) => {
                    handle.stats().gate.connected();
                    let open = handle.open.fetch_add(1, Ordering::SeqCst) + 1;
                    tracing::debug!(destination = %dest.name, study = %item.study, contexts = contexts.len(), open, "association open");
                    assoc = Some((a, item.study.clone()));
                    carried = false;
                }
                Err(Refused::Scu(e)) => {
                    let open = handle.open.load(Ordering::SeqCst);
                    if open > 0 && refuses_more(&e) {
                        let now = handle.refused_more(open, now_ms());
                        tracing::info!(destination = %dest.name, open, "the destination refused one more association ({e}): {now} for now, one more tried in {} s", MORE_ASSOCIATIONS_AFTER_MS / 1000);
                    } else {
                        destination_failed(&handle, &shared, e);
                    }
                    continue;
                }
                Err(Refused::OutsideTunnel(why)) => {
                    outside_tunnel(&handle, &shared, why).await;
                    continue;
                }
            }
        }
        let Some((scu, study)) = assoc.as_mut() else {
            continue;
        };
        // Claimed now: another worker may have taken the one looked at.
        let item = {
            let mut q = handle.queue();
            let Some(claimed) = q.claim(now_ms(), Some(&item.study)) else {
                continue;
            };
            if claimed.id != item.id
                && scu
                    .context_for(&claimed.sop_class, &claimed.transfer_syntax)
                    .is_none()
            {
                // Not what this association was opened for: next round.
                q.unclaim(&claimed);
                continue;
            }
            if q.next_due_ms() == Some(0) {
                // More is due: another worker may take it.
                handle.wake_one();
            }
            claimed
        };
        carried = true;
        *study = item.study.clone();
        let Some(pc) = scu.context_for(&item.sop_class, &item.transfer_syntax) else {
            let why = format!(
                "destination {} refused SOP class {} with transfer syntax {} (presentation context not accepted)",
                dest.name, item.sop_class, item.transfer_syntax
            );
            settle(&shared, &handle, &item, Sent::Dead(why)).await;
            continue;
        };

        {
            let now = now_ms();
            let mut s = handle.stats();
            s.sending.insert(n, (now, now));
            s.by_study
                .entry(Arc::clone(&item.study))
                .or_default()
                .begin(now);
        }
        // Each step of a C-STORE has its own timeout; progress beats.
        beat.busy(Some(dest.response_timeout + OPERATION_MARGIN));
        let progress = |_sent: u64| {
            beat.beat();
            if let Some(s) = handle.stats().sending.get_mut(&n) {
                s.1 = now_ms();
            }
        };
        let started = std::time::Instant::now();
        let outcome = tokio::select! {
            _ = token.cancelled() => { handle.stats().sending.remove(&n); break }
            o = send_one(&shared, scu, pc, &item, progress) => o,
        };
        if let Sent::Delivered(_) = &outcome {
            handle.stats().latency.observe(started.elapsed());
        }
        beat.busy(None);
        handle.stats().sending.remove(&n);
        if let Sent::Connection(_) | Sent::Corrupt(_) | Sent::ReadFailed(_) = &outcome {
            close(&handle, &mut assoc, true).await;
        }
        settle(&shared, &handle, &item, outcome).await;
    }
    close(&handle, &mut assoc, false).await;
}

/// Why no association was opened.
enum Refused {
    Scu(ScuError),
    /// The destination's name resolved to an address the tunnel does not
    /// carry: connecting would send patient data outside it.
    OutsideTunnel(String),
}

/// Resolves the destination afresh and, if it is reached through the
/// tunnel, checks every address it resolved to against the tunnel's
/// allowed networks before connecting: a name can point anywhere (a typo,
/// a changed DNS record, a spoofed answer), and only a literal address is
/// checked when the config is loaded.
async fn connect(
    shared: &Shared,
    dest: &kakehashi_config::Destination,
    opts: &ScuOptions,
    contexts: &[(String, String)],
) -> Result<Scu, Refused> {
    let addrs = kakehashi_dicom::scu::resolve(&dest.address, dest.connect_timeout)
        .await
        .map_err(Refused::Scu)?;
    let ips: Vec<_> = addrs.iter().map(|a| a.ip()).collect();
    if let Some(why) = dest.leaves_tunnel(shared.config.tunnel.as_ref(), &ips) {
        return Err(Refused::OutsideTunnel(why));
    }
    Scu::connect_to(&dest.address, &addrs, opts, contexts)
        .await
        .map_err(Refused::Scu)
}

/// Backs the destination off like a connection failure (nothing is sent,
/// burnt or dead-lettered) and records the refusal in the audit trail once
/// per distinct reason, not at every retry.
async fn outside_tunnel(handle: &Handle, shared: &Arc<Shared>, why: String) {
    let first = {
        let mut s = handle.stats();
        let first = s.last_refusal.as_deref() != Some(why.as_str());
        s.last_refusal = Some(why.clone());
        first
    };
    tracing::error!(destination = %handle.dest.name, "{why}");
    destination_failed(handle, shared, &why);
    if first {
        let spool = Arc::clone(&shared.spool);
        let rec = kakehashi_spool::AuditRecord::new(
            now_ms(),
            AuditEvent::OutsideTunnel,
            "kakehashid",
            why,
        )
        .destination(&handle.dest.name);
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || spool.audit(rec)).await {
            tracing::error!("cannot write the audit record: {e}");
        }
    }
}

fn destination_failed(handle: &Handle, shared: &Shared, e: impl std::fmt::Display) {
    let mut s = handle.stats();
    let Some(delay) = s
        .gate
        .connect_failed(shared.config.retry, now_ms(), fastrand::f64())
    else {
        drop(s);
        tracing::debug!(destination = %handle.dest.name, "an association begun before the pause failed: {e}");
        return;
    };
    let failures = s.gate.connect_failures();
    drop(s);
    tracing::warn!(destination = %handle.dest.name, failures, retry_in = ?delay, "destination unreachable: {e}");
    handle.note_error(e.to_string());
}

async fn send_one(
    shared: &Shared,
    scu: &mut Scu,
    pc: u8,
    item: &Item,
    progress: impl FnMut(u64),
) -> Sent {
    // Everything needed is in the queued item: no index read per instance.
    let dataset = DatasetRef {
        id: item.id,
        sop_instance_uid: item.sop_instance.clone(),
        offset: item.offset,
        size: item.size,
        sha256: item.sha256.clone(),
        segment: item.segment,
        stored: item.stored,
    };
    // Nothing leaves the box unchecked: a sealed payload must authenticate
    // to its last chunk and every dataset must match its recorded digest
    // before the receiver has all of it. A small dataset, within the memory
    // budget shared by all associations, is checked into memory before its
    // C-STORE starts and sent from there. A larger one (or one that does not
    // fit what is left) is read once and checked as it is sent: its reader
    // checks the whole payload before it gives the bytes of the last
    // fragment, and a failure aborts the association, so the receiver
    // discards the part it got. Checking first and then streaming would
    // read a mammogram twice and send nothing meanwhile.
    let held = if item.size <= HELD_MAX {
        let units = u32::try_from(item.size.div_ceil(HELD_UNIT).max(1)).unwrap_or(u32::MAX);
        Arc::clone(&shared.held).try_acquire_many_owned(units).ok()
    } else {
        None
    };
    let reader: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if held.is_some() {
        let spool = Arc::clone(&shared.spool);
        let d = dataset.clone();
        let loaded = tokio::task::spawn_blocking(move || spool.read_dataset(&d)).await;
        match loaded {
            Ok(Ok(bytes)) => Box::new(std::io::Cursor::new(bytes)),
            Ok(Err(e)) => return unreadable(e),
            Err(e) => return Sent::Retry(format!("payload read task failed: {e}")),
        }
    } else {
        // Opened before the C-STORE starts: a missing file, a lost key or
        // a damaged header dead-letters it without sending anything.
        let spool = Arc::clone(&shared.spool);
        let d = dataset.clone();
        match tokio::task::spawn_blocking(move || spool.checked_reader(&d)).await {
            Ok(Ok(r)) => Box::new(stream_dataset(r)),
            Ok(Err(e)) => return unreadable(e),
            Err(e) => return Sent::Retry(format!("payload open task failed: {e}")),
        }
    };
    match scu
        .store(
            pc,
            &item.sop_class,
            &item.sop_instance,
            item.priority.to_dimse(),
            reader,
            item.size,
            progress,
        )
        .await
    {
        Ok((status, comment)) => {
            let detail = |what: &str| {
                format!(
                    "{what} 0x{status:04X} from {}{}",
                    scu.peer(),
                    comment
                        .as_deref()
                        .map(|c| format!(": {c}"))
                        .unwrap_or_default()
                )
            };
            match classify_store_status(status) {
                StatusClass::Delivered => Sent::Delivered(status),
                StatusClass::Transient => Sent::Retry(detail("transient status")),
                StatusClass::Permanent => Sent::Dead(detail("permanent status")),
            }
        }
        Err(ScuError::Source(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
            Sent::Corrupt(format!(
                "integrity: payload {} failed its check while it was sent (association aborted before its last fragment): {e}",
                item.id
            ))
        }
        Err(ScuError::Source(e)) => Sent::ReadFailed(format!(
            "cannot read payload {} while sending it (will retry): {e}",
            item.id
        )),
        Err(e) => Sent::Connection(e),
    }
}

/// A payload that cannot be read: integrity is final (dead letter, never
/// sent); any other error (EIO, ENOSPC…) is the disk's, retried.
fn unreadable(e: kakehashi_spool::SpoolError) -> Sent {
    match e {
        kakehashi_spool::SpoolError::Integrity { .. }
        | kakehashi_spool::SpoolError::KeyLost { .. } => Sent::Dead(e.to_string()),
        other => Sent::Retry(format!("cannot read the payload (will retry): {other}")),
    }
}

/// Records the outcome in the spool (and the queue, and the stats).
async fn settle(shared: &Arc<Shared>, handle: &Arc<Handle>, item: &Item, outcome: Sent) {
    let now = now_ms();
    let name = handle.dest.name.clone();
    let retention = !shared.config.spool.retention.is_zero();
    let mut stuck = false;
    let (state, error, event, attempts, next) = match &outcome {
        Sent::Delivered(status) => {
            let mut s = handle.stats();
            s.delivered += 1;
            s.delivered_bytes += item.size;
            s.last_success_ms = Some(now);
            s.by_study
                .entry(Arc::clone(&item.study))
                .or_default()
                .add(now, item.size);
            if s.by_study.len() > 64 {
                // Studies done here a window ago have nothing left to show.
                let q = handle.queue();
                let queued: std::collections::HashSet<&str> =
                    q.studies().map(|(s, _)| &**s).collect();
                s.by_study.retain(|study, d| {
                    d.prune(now);
                    !d.recent.is_empty() || queued.contains(&**study)
                });
            }
            drop(s);
            handle.queue().remove(item.id);
            (
                RouteState::Delivered,
                None,
                Some((AuditEvent::Delivered, format!("status 0x{status:04X}"))),
                item.attempts + 1,
                0,
            )
        }
        Sent::Retry(why) | Sent::ReadFailed(why) => {
            let attempts = item.attempts + 1;
            let next = now
                + crate::schedule::backoff(shared.config.retry, attempts, fastrand::f64())
                    .as_millis() as u64;
            let newly_stuck =
                crate::schedule::becomes_stuck(shared.config.retry, item, attempts, now);
            handle
                .queue()
                .reschedule(item.id, attempts, next, newly_stuck.then_some(now));
            tracing::warn!(destination = %name, sop_instance = %item.sop_instance, attempts, "will retry: {why}");
            handle.note_error(why.clone());
            let event = newly_stuck.then(|| {
                let said = format!(
                    "stuck: refused {attempts} times since it arrived {} s ago, last: {why}; still retried (retry.stuck_after_attempts / retry.stuck_after); `kakehashi queue dead-letter` takes it out",
                    now.saturating_sub(item.received_ms) / 1000
                );
                tracing::error!(destination = %name, sop_instance = %item.sop_instance, "{said}");
                (AuditEvent::Stuck, said)
            });
            stuck = newly_stuck;
            (RouteState::Queued, Some(why.clone()), event, attempts, next)
        }
        Sent::Dead(why) | Sent::Corrupt(why) => {
            handle.queue().remove(item.id);
            tracing::error!(destination = %name, sop_instance = %item.sop_instance, "dead-lettered: {why}");
            handle.note_error(why.clone());
            (
                RouteState::DeadLetter,
                Some(why.clone()),
                Some((AuditEvent::DeadLettered, why.clone())),
                item.attempts + 1,
                0,
            )
        }
        Sent::Connection(e) => {
            destination_failed(handle, shared, e);
            // Not the instance's fault: its attempts and schedule stay as they were.
            handle.queue().unclaim(item);
            return;
        }
    };
    let spool = Arc::clone(&shared.spool);
    let id = item.id;
    // A delivery need not be durable at once: if a crash loses it, the
    // instance is sent again (allowed), and its payload is only unlinked
    // after a later durable commit. Dead letters are durable immediately.
    let durability = if state == RouteState::DeadLetter || stuck {
        Durability::Immediate
    } else {
        Durability::None
    };
    let result = tokio::task::spawn_blocking(move || {
        spool.update_route(
            id,
            &name,
            RouteUpdate {
                durability,
                audit: event,
                now_ms: now,
                keep_payload: retention,
            },
            |r| {
                r.state = state;
                r.attempts = attempts;
                r.next_attempt_ms = next;
                if error.is_some() {
                    r.last_error = error;
                }
                if state == RouteState::Delivered {
                    r.delivered_ms = Some(now);
                }
                if stuck {
                    r.stuck_ms = Some(now);
                }
            },
        )
    })
    .await;
    // Recorded: a corrected version of it may go now.
    handle.queue().finish(item);
    match result {
        Ok(Ok(_)) => {}
        Ok(Err(kakehashi_spool::SpoolError::NotFound(_))) => {
            tracing::info!(id, "instance left the spool while it was being sent (superseded by a corrected version, or purged)")
        }
        Ok(Err(e)) => tracing::error!(id, "cannot record the delivery outcome (the instance may be sent again after a restart): {e}"),
        Err(e) => tracing::error!(id, "delivery bookkeeping task failed: {e}"),
    }
}

/// How many bytes of datasets all associations together may hold in memory
/// while sending them: a dataset of at most [`HELD_MAX`] that fits what is
/// left is checked into memory and sent from there (CT and MR slices); the
/// others are streamed in 64 KiB blocks, checked as they are sent. Without
/// a shared budget each association of every destination could hold one.
pub const HELD_BUDGET: u64 = 32 << 20;
/// The largest dataset held in memory to be checked before its C-STORE
/// starts. A larger one held would be read and checked whole before its
/// first byte is sent (a 27 MiB mammogram: 40–50 ms here, then as long
/// again to send it): streamed, the two overlap.
pub const HELD_MAX: u64 = 4 << 20;
/// The budget's unit (a semaphore permit).
const HELD_UNIT: u64 = 64 << 10;
pub const HELD_UNITS: usize = (HELD_BUDGET / HELD_UNIT) as usize;

/// Streams a dataset from a blocking reader (decrypting if sealed, checking
/// as it goes) to the async sender through a small bounded channel.
fn stream_dataset(mut reader: kakehashi_spool::CheckedReader) -> ChannelReader {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    tokio::task::spawn_blocking(move || {
        loop {
            // 64 KiB blocks, at most 4 queued: each association in flight
            // holds about half a megabyte (8 by default).
            let mut block = vec![0u8; 64 * 1024];
            match reader.read(&mut block) {
                Ok(0) => return,
                Ok(n) => {
                    block.truncate(n);
                    if tx.blocking_send(Ok(block)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    ChannelReader {
        rx,
        block: Vec::new(),
        pos: 0,
    }
}

struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    block: Vec<u8>,
    pos: usize,
}

impl tokio::io::AsyncRead for ChannelReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        loop {
            if self.pos < self.block.len() {
                let n = (self.block.len() - self.pos).min(out.remaining());
                let start = self.pos;
                out.put_slice(&self.block[start..start + n]);
                self.pos += n;
                return Poll::Ready(Ok(()));
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(Some(Ok(block))) => {
                    self.block = block;
                    self.pos = 0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_counts_from_the_start_of_the_sending_not_between_acknowledgements() {
        let mut d = Deliveries::default();
        assert_eq!(d.rate(0), None);
        // Four associations start at t=0 and are acknowledged together at
        // t=1 s: 4 × 64 KiB in one second, not in the milliseconds between
        // the acknowledgements.
        d.begin(0);
        for t in [1000, 1001, 1002, 1003] {
            d.add(t, 65_536);
        }
        assert_eq!(d.rate(1003), Some(4 * 65_536 * 1000 / 1003));
        // Nothing more for a while: the rate falls.
        assert_eq!(d.rate(4012), Some(4 * 65_536 * 1000 / 4012));
        // Over a long transfer, only the last window counts: the 61
        // acknowledgements from 140 s to 200 s.
        for s in 5..=200u64 {
            d.add(s * 1000, 1000);
        }
        assert_eq!(d.rate(200_000), Some(61 * 1000 * 1000 / RATE_WINDOW_MS));
        // A window with nothing acknowledged: no rate, and a new sending
        // starts a new measurement.
        assert_eq!(d.rate(300_000), None);
        d.begin(300_000);
        d.add(302_000, 2000);
        assert_eq!(d.rate(302_000), Some(1000));
        assert_eq!(
            (d.instances, d.bytes),
            (201, 4 * 65_536 + 196 * 1000 + 2000)
        );
    }
}
