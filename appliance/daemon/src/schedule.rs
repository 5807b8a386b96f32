//! What a forwarder sends next, and when it tries again: plain logic over
//! explicit `now` values, so a week-long outage is a microsecond test.
//!
//! - [`Queue`]: which instance next (priority, the study on the wire,
//!   arrival), and which are claimed by one of the destination's
//!   associations (in flight: no other association picks them, nor another
//!   version of the same SOP instance).
//! - [`Gate`]: whether the destination may be tried at all (paused while its
//!   tunnel is down, backing off after connection failures, tried at once
//!   after a fresh handshake).
//! - [`backoff`], [`becomes_stuck`]: per-instance retry decisions.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kakehashi_config::RetryPolicy;
use kakehashi_spool::{InstanceRecord, Priority};

/// One instance waiting for one destination. Strings shared by many
/// instances (study, SOP class, transfer syntax) are shared in memory too: a
/// week's backlog is 100 000+ items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub id: u64,
    pub priority: Priority,
    pub study: Arc<str>,
    pub sop_class: Arc<str>,
    pub sop_instance: String,
    pub transfer_syntax: Arc<str>,
    pub size: u64,
    pub offset: u64,
    /// SHA-256 of the dataset as received, checked before sending.
    pub sha256: String,
    /// Where the payload is (see [`kakehashi_spool::DatasetRef`]).
    pub segment: Option<kakehashi_spool::Location>,
    pub stored: u64,
    pub next_attempt_ms: u64,
    pub attempts: u32,
    pub received_ms: u64,
    /// Flagged stuck (see [`becomes_stuck`]).
    pub stuck_ms: Option<u64>,
}

/// Shares equal strings between items.
#[derive(Debug, Default)]
pub struct Interner(HashSet<Arc<str>>);

impl Interner {
    pub fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.0.get(s) {
            return Arc::clone(a);
        }
        let a: Arc<str> = Arc::from(s);
        self.0.insert(Arc::clone(&a));
        a
    }
}

impl Item {
    pub fn from_record(
        rec: &InstanceRecord,
        destination: &str,
        strings: &mut Interner,
    ) -> Option<Item> {
        let route = rec.route(destination)?;
        route.state.is_pending().then(|| Item {
            id: rec.id,
            priority: rec.meta.priority,
            study: strings.get(&rec.meta.study_instance_uid),
            sop_class: strings.get(&rec.meta.sop_class_uid),
            sop_instance: rec.meta.sop_instance_uid.clone(),
            transfer_syntax: strings.get(&rec.meta.transfer_syntax_uid),
            size: rec.dataset_size,
            offset: rec.dataset_offset,
            sha256: rec.sha256.clone(),
            segment: rec.segment,
            stored: rec.file_size(),
            next_attempt_ms: route.next_attempt_ms,
            attempts: route.attempts,
            received_ms: rec.received_ms,
            stuck_ms: route.stuck_ms,
        })
    }
}

/// Order among due items: highest priority first, then arrival (id).
type Rank = (Reverse<Priority>, u64);

/// The pending instances of one destination, indexed so that picking,
/// adding, rescheduling and the totals `status` shows cost O(log n) however
/// long the backlog (a week's outage at a busy site is 100 000+ items).
#[derive(Debug, Default)]
pub struct Queue {
    items: BTreeMap<u64, Item>,
    /// Items whose next attempt has come, by rank.
    due: BTreeSet<Rank>,
    /// The same, per study (to stay on the study on the wire).
    due_by_study: HashMap<Arc<str>, BTreeSet<Rank>>,
    /// Items waiting for their next attempt, by when.
    waiting: BTreeSet<(u64, u64)>,
    /// Items an association is sending (in none of the sets above).
    claimed: HashSet<u64>,
    /// SOP Instance UIDs on the wire, until [`Queue::finish`], even if
    /// their item was removed meanwhile (superseded): a corrected version
    /// waits until the old one is done, so the destination keeps the newest.
    in_flight: HashMap<String, (u64, Arc<str>)>,
    /// What is queued and on the wire, per study (progress in `status`).
    studies: HashMap<Arc<str>, StudyLoad>,
    /// (instances, bytes) queued per priority: low, medium, high.
    lanes: [(u64, u64); 3],
    bytes: u64,
    stuck: u64,
    strings: Interner,
}

fn lane_of(p: Priority) -> usize {
    match p {
        Priority::Low => 0,
        Priority::Medium => 1,
        Priority::High => 2,
    }
}

/// What a destination's queue holds of one study.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StudyLoad {
    /// Instances not delivered yet (those on the wire included).
    pub queued: u64,
    pub bytes: u64,
    pub on_the_wire: u64,
}

impl Queue {
    /// Shares the queue's strings with a new item (see [`Item::from_record`]).
    pub fn strings(&mut self) -> &mut Interner {
        &mut self.strings
    }

    pub fn push(&mut self, item: Item) {
        if let Some(old) = self.items.get(&item.id).cloned() {
            self.unindex(&old);
        }
        self.bytes += item.size;
        self.stuck += u64::from(item.stuck_ms.is_some());
        let load = self.studies.entry(Arc::clone(&item.study)).or_default();
        load.queued += 1;
        load.bytes += item.size;
        let lane = &mut self.lanes[lane_of(item.priority)];
        lane.0 += 1;
        lane.1 += item.size;
        // Due or not is decided at the next pick.
        self.waiting.insert((item.next_attempt_ms, item.id));
        self.items.insert(item.id, item);
    }

    /// Takes `item` out of the due sets.
    fn undue(&mut self, item: &Item) {
        let rank = (Reverse(item.priority), item.id);
        self.due.remove(&rank);
        if let Some(set) = self.due_by_study.get_mut(&item.study) {
            set.remove(&rank);
            if set.is_empty() {
                self.due_by_study.remove(&item.study);
            }
        }
    }

    fn unindex(&mut self, item: &Item) {
        self.undue(item);
        self.waiting.remove(&(item.next_attempt_ms, item.id));
        self.claimed.remove(&item.id);
        self.bytes -= item.size;
        self.stuck -= u64::from(item.stuck_ms.is_some());
        if let Some(load) = self.studies.get_mut(&item.study) {
            load.queued -= 1;
            load.bytes -= item.size;
        }
        self.forget_study(&item.study);
        let lane = &mut self.lanes[lane_of(item.priority)];
        lane.0 -= 1;
        lane.1 -= item.size;
    }

    /// (priority, instances, bytes) queued, per priority.
    pub fn lanes(&self) -> [(Priority, u64, u64); 3] {
        let [l, m, h] = self.lanes;
        [
            (Priority::Low, l.0, l.1),
            (Priority::Medium, m.0, m.1),
            (Priority::High, h.0, h.1),
        ]
    }

    fn forget_study(&mut self, study: &str) {
        if self
            .studies
            .get(study)
            .is_some_and(|l| l.queued == 0 && l.on_the_wire == 0)
        {
            self.studies.remove(study);
        }
    }

    /// Every study with instances queued or on the wire.
    pub fn studies(&self) -> impl Iterator<Item = (&Arc<str>, &StudyLoad)> {
        self.studies.iter()
    }

    pub fn remove(&mut self, id: u64) -> Option<Item> {
        let item = self.items.remove(&id)?;
        self.unindex(&item);
        Some(item)
    }

    /// A transient failure: the item waits until `next_attempt_ms`.
    pub fn reschedule(
        &mut self,
        id: u64,
        attempts: u32,
        next_attempt_ms: u64,
        stuck_ms: Option<u64>,
    ) {
        if let Some(mut item) = self.remove(id) {
            item.attempts = attempts;
            item.next_attempt_ms = next_attempt_ms;
            item.stuck_ms = item.stuck_ms.or(stuck_ms);
            self.push(item);
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Moves the items whose time has come into the due sets.
    fn promote(&mut self, now_ms: u64) {
        while let Some(&(at, id)) = self.waiting.first() {
            if at > now_ms {
                break;
            }
            self.waiting.pop_first();
            let Some(item) = self.items.get(&id) else {
                continue;
            };
            let rank = (Reverse(item.priority), id);
            self.due.insert(rank);
            self.due_by_study
                .entry(Arc::clone(&item.study))
                .or_default()
                .insert(rank);
        }
    }

    /// The next instance to send at `now`: highest priority first; within a
    /// priority, the study already on the association's wire, then arrival
    /// order. Claimed items are not due; an item whose SOP instance is in
    /// flight (an older version of it) waits.
    pub fn pick(&mut self, now_ms: u64, current_study: Option<&str>) -> Option<&Item> {
        self.promote(now_ms);
        let free = |(_, id): &&Rank| {
            self.items
                .get(id)
                .is_some_and(|i| !self.in_flight.contains_key(&i.sop_instance))
        };
        // Blocked items are at most one per association: skipping them is cheap.
        let &(Reverse(top), first) = self.due.iter().find(free)?;
        let same_study = current_study
            .and_then(|s| self.due_by_study.get(s))
            .and_then(|set| {
                set.range((Reverse(top), 0)..=(Reverse(top), u64::MAX))
                    .find(free)
            })
            .map(|(_, id)| *id);
        self.items.get(&same_study.unwrap_or(first))
    }

    /// [`Queue::pick`], and the item is claimed: no other association
    /// picks it until it is removed, rescheduled or [`Queue::unclaim`]ed;
    /// its SOP instance is in flight until [`Queue::finish`].
    pub fn claim(&mut self, now_ms: u64, current_study: Option<&str>) -> Option<Item> {
        let item = self.pick(now_ms, current_study)?.clone();
        self.undue(&item);
        self.claimed.insert(item.id);
        self.in_flight.insert(
            item.sop_instance.clone(),
            (item.id, Arc::clone(&item.study)),
        );
        if let Some(load) = self.studies.get_mut(&item.study) {
            load.on_the_wire += 1;
        }
        Some(item)
    }

    /// A claimed item was not attempted (its association failed first): it
    /// is due again, untouched.
    pub fn unclaim(&mut self, item: &Item) {
        if self.claimed.remove(&item.id) {
            self.waiting.insert((item.next_attempt_ms, item.id));
        }
        self.finish(item);
    }

    /// The association is done with `item` (its outcome recorded).
    pub fn finish(&mut self, item: &Item) {
        if self.in_flight.get(&item.sop_instance).map(|f| f.0) == Some(item.id) {
            self.in_flight.remove(&item.sop_instance);
            if let Some(load) = self.studies.get_mut(&item.study) {
                load.on_the_wire -= 1;
            }
            self.forget_study(&item.study);
        }
    }

    /// Instances on the wire right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The (SOP class, transfer syntax) pairs due in `study`, for the
    /// presentation contexts of a new association. At most 127 (the limit of
    /// odd context IDs).
    pub fn contexts_for_study(&mut self, study: &str, now_ms: u64) -> Vec<(String, String)> {
        self.promote(now_ms);
        let mut out: Vec<(String, String)> = Vec::new();
        let Some(set) = self.due_by_study.get(study) else {
            return out;
        };
        for (_, id) in set {
            let Some(i) = self.items.get(id) else {
                continue;
            };
            let pair = (i.sop_class.to_string(), i.transfer_syntax.to_string());
            if !out.contains(&pair) {
                out.push(pair);
                if out.len() == 127 {
                    break;
                }
            }
        }
        out
    }

    /// When the earliest waiting item becomes due (0: something is due;
    /// claimed items are not waiting).
    pub fn next_due_ms(&self) -> Option<u64> {
        if !self.due.is_empty() {
            return Some(0);
        }
        self.waiting.first().map(|(at, _)| *at)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn stuck(&self) -> u64 {
        self.stuck
    }

    /// When the oldest pending instance arrived.
    pub fn oldest_received_ms(&self) -> Option<u64> {
        // Ids grow with arrival; received_ms is taken at commit, so the
        // lowest id is the oldest within the commit's milliseconds.
        self.items.first_key_value().map(|(_, i)| i.received_ms)
    }
}

/// A change worth a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Paused,
    Resumed,
}

/// The destination-level decisions of a forwarder. Connection failures
/// back off the whole destination and never touch an instance's attempts;
/// a destination behind a tunnel that is down is paused (nothing tried,
/// nothing burnt); a fresh handshake clears the backoff so a restored link
/// carries traffic at once.
#[derive(Debug, Default, Clone)]
pub struct Gate {
    paused: bool,
    blocked_until_ms: u64,
    connect_failures: u32,
    handshakes: u64,
}

impl Gate {
    /// The tunnel as last seen (destinations behind one): `pending`, whether
    /// anything waits (an idle destination is not "paused").
    pub fn tunnel(&mut self, up: bool, handshakes: u64, pending: bool) -> Option<Transition> {
        if handshakes != self.handshakes {
            self.handshakes = handshakes;
            self.blocked_until_ms = 0;
            self.connect_failures = 0;
        }
        match (self.paused, !up && pending) {
            (false, true) => {
                self.paused = true;
                Some(Transition::Paused)
            }
            (true, false) => {
                self.paused = false;
                Some(Transition::Resumed)
            }
            _ => None,
        }
    }

    /// Paused for a reason other than the tunnel (the box's keys are gone).
    pub fn pause(&mut self) {
        self.paused = true;
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    /// No connection is attempted before this.
    pub fn blocked_until_ms(&self) -> u64 {
        self.blocked_until_ms
    }

    pub fn connect_failures(&self) -> u32 {
        self.connect_failures
    }

    /// A connection failed at `now`: the delay before the next attempt.
    /// `None` while paused: an attempt begun before the tunnel went down
    /// and failing after is the tunnel's failure, already known; it does
    /// not count against the destination (nothing is tried while paused).
    pub fn connect_failed(
        &mut self,
        policy: RetryPolicy,
        now_ms: u64,
        draw: f64,
    ) -> Option<Duration> {
        if self.paused {
            return None;
        }
        self.connect_failures = self.connect_failures.saturating_add(1);
        let delay = backoff(policy, self.connect_failures, draw);
        self.blocked_until_ms = now_ms + delay.as_millis() as u64;
        Some(delay)
    }

    pub fn connected(&mut self) {
        self.connect_failures = 0;
    }

    /// An operator's retry: try at once.
    pub fn wake(&mut self) {
        self.blocked_until_ms = 0;
    }
}

/// Whether a transient failure, the `attempts`-th, makes `item` stuck now:
/// it was not already, and it has been tried `stuck_after_attempts` times or
/// has waited `stuck_after` since it arrived.
pub fn becomes_stuck(policy: RetryPolicy, item: &Item, attempts: u32, now_ms: u64) -> bool {
    item.stuck_ms.is_none()
        && (attempts >= policy.stuck_after_attempts
            || now_ms.saturating_sub(item.received_ms) >= policy.stuck_after.as_millis() as u64)
}

/// Exponential backoff with full jitter: a uniform draw in
/// `[initial/2, min(max, initial * 2^(failures-1))]`. `draw` is in [0,1).
pub fn backoff(policy: RetryPolicy, failures: u32, draw: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let ceiling = policy.initial.saturating_mul(1u32 << exp).min(policy.max);
    let floor = (policy.initial / 2).min(ceiling);
    floor + (ceiling - floor).mul_f64(draw.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: u64, priority: Priority, study: &str) -> Item {
        Item {
            id,
            priority,
            study: study.into(),
            sop_class: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance: format!("1.2.{id}"),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            size: 10,
            offset: 0,
            sha256: String::new(),
            segment: None,
            stored: 10,
            next_attempt_ms: 0,
            attempts: 0,
            received_ms: 0,
            stuck_ms: None,
        }
    }

    #[test]
    fn a_study_is_counted_queued_until_delivered_and_on_the_wire_until_finished() {
        let mut q = Queue::default();
        q.push(item(1, Priority::Medium, "A"));
        q.push(item(2, Priority::Medium, "A"));
        q.push(item(3, Priority::Medium, "B"));
        let load = |q: &Queue, s: &str| q.studies().find(|(k, _)| &***k == s).map(|(_, l)| *l);
        let a = |queued, on_the_wire| {
            Some(StudyLoad {
                queued,
                bytes: 10 * queued,
                on_the_wire,
            })
        };
        let first = q.claim(0, None).expect("due");
        assert_eq!(first.id, 1);
        assert_eq!(load(&q, "A"), a(2, 1));
        // Delivered: out of the queue, still on the wire until finished.
        q.remove(1);
        assert_eq!(load(&q, "A"), a(1, 1));
        q.finish(&first);
        assert_eq!(load(&q, "A"), a(1, 0));
        // A failed association gives the item back untouched.
        let second = q.claim(0, Some("A")).expect("due");
        q.unclaim(&second);
        assert_eq!(load(&q, "A"), a(1, 0));
        q.reschedule(2, 1, 5, None);
        assert_eq!(load(&q, "A"), a(1, 0));
        q.remove(2);
        assert_eq!(
            load(&q, "A"),
            None,
            "a study with nothing left is forgotten"
        );
        assert_eq!(q.studies().count(), 1);
    }

    #[test]
    fn high_priority_first_then_current_study_then_arrival() {
        let mut q = Queue::default();
        q.push(item(1, Priority::Medium, "A"));
        q.push(item(2, Priority::Medium, "B"));
        q.push(item(3, Priority::Medium, "A"));
        assert_eq!(q.pick(0, None).map(|i| i.id), Some(1));
        assert_eq!(q.pick(0, Some("B")).map(|i| i.id), Some(2));
        q.push(item(4, Priority::High, "C"));
        assert_eq!(
            q.pick(0, Some("A")).map(|i| i.id),
            Some(4),
            "STAT jumps the queue"
        );
        q.remove(4);
        q.remove(1);
        assert_eq!(
            q.pick(0, Some("A")).map(|i| i.id),
            Some(3),
            "stay on the open study"
        );
    }

    #[test]
    fn items_wait_for_their_next_attempt() {
        let mut q = Queue::default();
        let mut a = item(1, Priority::High, "A");
        a.next_attempt_ms = 5_000;
        q.push(a);
        q.push(item(2, Priority::Low, "B"));
        assert_eq!(q.pick(1_000, None).map(|i| i.id), Some(2));
        assert_eq!(q.pick(5_000, None).map(|i| i.id), Some(1));
        assert_eq!(q.next_due_ms(), Some(0));
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_secs(5),
            max: Duration::from_secs(300),
            stuck_after_attempts: 20,
            stuck_after: Duration::from_secs(86_400),
        }
    }

    const WEEK: u64 = 7 * 86_400_000;

    /// A forwarder's loop on a simulated clock, as `forwarder::run` makes
    /// it: wait for the gate, pick, connect (fails while `center_up` says
    /// so), send. Returns (connection attempts before the center came back,
    /// when the last instance was delivered).
    fn simulate(
        gate: &mut Gate,
        queue: &mut Queue,
        center_up: impl Fn(u64) -> bool,
        tunnel_up: impl Fn(u64) -> bool,
        handshakes: impl Fn(u64) -> u64,
        (from, until): (u64, u64),
    ) -> (u64, Option<u64>) {
        let mut rng = fastrand::Rng::with_seed(7);
        let (mut now, mut attempts_down, mut last_delivery) = (from, 0u64, None);
        while now < until {
            gate.tunnel(tunnel_up(now), handshakes(now), queue.len() > 0);
            if gate.paused() {
                now += 1_000; // the forwarder re-checks the tunnel every second at most
                continue;
            }
            if now < gate.blocked_until_ms() {
                now = gate.blocked_until_ms().min(now + 10_000);
                continue;
            }
            let Some(item) = queue.pick(now, None).cloned() else {
                break;
            };
            if !center_up(now) {
                attempts_down += 1;
                gate.connect_failed(policy(), now, rng.f64());
                now += 10; // a refused connection is quick
                continue;
            }
            gate.connected();
            queue.remove(item.id);
            now += 50; // one C-STORE
            last_delivery = Some(now);
        }
        (attempts_down, last_delivery)
    }

    #[test]
    fn a_week_long_outage_of_the_center_burns_nothing_and_ends_within_one_backoff() {
        let mut q = Queue::default();
        for id in 0..10 {
            q.push(item(id, Priority::Medium, "A"));
        }
        let mut gate = Gate::default();
        let down = |now: u64| now >= WEEK;
        let (attempts, done) = simulate(&mut gate, &mut q, down, |_| true, |_| 0, (0, WEEK));
        // At least one attempt per 300 s cap; never faster than the 2.5 s floor.
        assert!(
            (2016..=WEEK / 2_500).contains(&attempts),
            "{attempts} connection attempts in a week"
        );
        assert_eq!(done, None);
        // Connection failures are the destination's, not the instances':
        // all ten still wait, untouched, due at once.
        assert_eq!(q.len(), 10);
        assert!(q
            .items
            .values()
            .all(|i| i.attempts == 0 && i.next_attempt_ms == 0));
        let resumed_at = gate.blocked_until_ms();
        let (_, done) = simulate(
            &mut gate,
            &mut q,
            down,
            |_| true,
            |_| 0,
            (WEEK, WEEK + 3_600_000),
        );
        assert!(q.len() == 0, "everything delivered after the outage");
        let done = done.expect("delivered");
        assert!(
            done - WEEK <= 300_000 + 10 * 50 && done >= resumed_at,
            "delivered {} s after the center came back (at most one capped backoff)",
            (done - WEEK) / 1000
        );
    }

    #[test]
    fn a_week_long_tunnel_outage_pauses_tries_nothing_and_resumes_at_the_first_handshake() {
        let mut q = Queue::default();
        for id in 0..10 {
            q.push(item(id, Priority::Medium, "A"));
        }
        let mut gate = Gate::default();
        // The tunnel comes back at WEEK + 7 s, with a fresh handshake; the
        // center behind it was up all along.
        let back = WEEK + 7_000;
        let (attempts, done) = simulate(
            &mut gate,
            &mut q,
            |_| true,
            |now| now >= back,
            |now| u64::from(now >= back),
            (0, WEEK + 60_000),
        );
        assert_eq!(attempts, 0, "nothing is tried while paused");
        let done = done.expect("delivered");
        assert!(
            done - back <= 1_000 + 10 * 50,
            "resumed {} ms after the handshake",
            done - back
        );
    }

    #[test]
    fn an_attempt_that_fails_after_the_pause_began_does_not_count() {
        let mut gate = Gate::default();
        assert!(gate.connect_failed(policy(), 0, 0.5).is_some());
        assert_eq!(gate.tunnel(false, 0, true), Some(Transition::Paused));
        // Begun before the tunnel went down, failed after.
        assert_eq!(gate.connect_failed(policy(), 5_000, 0.5), None);
        assert_eq!(gate.connect_failures(), 1);
    }

    #[test]
    fn a_fresh_handshake_clears_a_long_backoff() {
        let mut gate = Gate::default();
        for i in 0..20 {
            gate.connect_failed(policy(), i * 1_000, 0.99);
        }
        assert!(gate.blocked_until_ms() > 100_000);
        assert_eq!(gate.tunnel(true, 1, true), None);
        assert_eq!(gate.blocked_until_ms(), 0);
        assert_eq!(gate.connect_failures(), 0);
        assert_eq!(gate.tunnel(false, 1, true), Some(Transition::Paused));
        assert_eq!(
            gate.tunnel(false, 1, false),
            Some(Transition::Resumed),
            "idle, not paused"
        );
    }

    #[test]
    fn an_instance_becomes_stuck_once_by_attempts_or_age() {
        let policy = RetryPolicy {
            initial: Duration::from_secs(5),
            max: Duration::from_secs(300),
            stuck_after_attempts: 3,
            stuck_after: Duration::from_secs(3600),
        };
        let mut i = item(1, Priority::Medium, "A");
        i.received_ms = 1_000;
        assert!(!becomes_stuck(policy, &i, 2, 2_000));
        assert!(becomes_stuck(policy, &i, 3, 2_000), "by attempts");
        assert!(becomes_stuck(policy, &i, 1, 1_000 + 3_600_000), "by age");
        i.stuck_ms = Some(2_000);
        assert!(!becomes_stuck(policy, &i, 4, 2_000), "only once");
    }

    /// The indexed queue against the obvious O(n) definition, over random
    /// pushes, removals, reschedules and picks.
    #[test]
    fn the_indexed_queue_picks_what_a_full_scan_would() {
        fn reference(items: &BTreeMap<u64, Item>, now: u64, study: Option<&str>) -> Option<u64> {
            items
                .values()
                .filter(|i| i.next_attempt_ms <= now)
                .max_by(|a, b| {
                    let key = |i: &Item| (i.priority, study == Some(&*i.study));
                    key(a).cmp(&key(b)).then(b.id.cmp(&a.id))
                })
                .map(|i| i.id)
        }
        let mut rng = fastrand::Rng::with_seed(42);
        let mut q = Queue::default();
        let mut mirror: BTreeMap<u64, Item> = BTreeMap::new();
        let mut now = 0u64;
        for step in 0..20_000u64 {
            now += rng.u64(0..50);
            match rng.u8(0..10) {
                0..=3 => {
                    let prio = [Priority::Low, Priority::Medium, Priority::High][rng.usize(0..3)];
                    let study = ["A", "B", "C", "D"][rng.usize(0..4)];
                    let mut it = item(step, prio, study);
                    it.next_attempt_ms = now + rng.u64(0..200);
                    it.size = rng.u64(1..1000);
                    mirror.insert(it.id, it.clone());
                    q.push(it);
                }
                4 => {
                    if let Some(&id) = mirror.keys().nth(rng.usize(0..mirror.len().max(1))) {
                        mirror.remove(&id);
                        q.remove(id);
                    }
                }
                5 => {
                    if let Some(&id) = mirror.keys().nth(rng.usize(0..mirror.len().max(1))) {
                        let at = now + rng.u64(0..300);
                        if let Some(m) = mirror.get_mut(&id) {
                            m.attempts += 1;
                            m.next_attempt_ms = at;
                        }
                        q.reschedule(id, mirror[&id].attempts, at, None);
                    }
                }
                _ => {
                    let study = ["A", "B", "C", "D", "Z"][rng.usize(0..5)];
                    let want = reference(&mirror, now, Some(study));
                    let got = q.pick(now, Some(study)).map(|i| i.id);
                    assert_eq!(got, want, "step {step} at {now} on {study}");
                    if let Some(id) = got {
                        if rng.bool() {
                            mirror.remove(&id);
                            q.remove(id);
                        }
                    }
                }
            }
            assert_eq!(q.len(), mirror.len());
            assert_eq!(q.bytes(), mirror.values().map(|i| i.size).sum::<u64>());
        }
    }

    #[test]
    fn a_claimed_item_goes_to_one_association_and_a_correction_waits_for_it() {
        let mut q = Queue::default();
        q.push(item(1, Priority::Medium, "A"));
        q.push(item(2, Priority::Medium, "A"));
        q.push(item(4, Priority::Medium, "A"));
        let one = q.claim(0, None).expect("first");
        assert_eq!(one.id, 1);
        // A corrected version of 1 arrives: the spool supersedes 1, the
        // forwarder forgets it, but it is on the wire.
        q.remove(1);
        let mut fixed = item(3, Priority::High, "B");
        fixed.sop_instance = one.sop_instance.clone();
        q.push(fixed);
        assert_eq!(
            q.claim(0, Some("A")).map(|i| i.id),
            Some(2),
            "3 is HIGH, but the version it replaces is in flight"
        );
        assert_eq!((q.len(), q.in_flight()), (3, 2));
        assert_eq!(q.next_due_ms(), Some(0), "3 is due, only blocked");
        q.finish(&one);
        assert_eq!(q.claim(0, None).map(|i| i.id), Some(3));
        // 4's association fails before sending it: due again, untouched.
        let four = q.claim(0, None).expect("4");
        assert_eq!(q.claim(0, None), None, "everything is claimed");
        q.unclaim(&four);
        assert_eq!(q.pick(0, None).map(|i| i.id), Some(4));
        // A transient failure: 2 waits for its next attempt.
        q.reschedule(2, 1, 500, None);
        q.finish(&item(2, Priority::Medium, "A"));
        assert_eq!(q.claim(0, None).map(|i| i.id), Some(4));
        assert_eq!(q.claim(0, None), None);
        assert_eq!(q.claim(500, None).map(|i| i.id), Some(2));
    }

    #[test]
    fn contexts_cover_the_study() {
        let mut q = Queue::default();
        q.push(item(1, Priority::Medium, "A"));
        let mut b = item(2, Priority::Medium, "A");
        b.transfer_syntax = "1.2.840.10008.1.2.4.50".into();
        q.push(b);
        q.push(item(3, Priority::Medium, "A"));
        q.push(item(4, Priority::Medium, "Z"));
        assert_eq!(q.contexts_for_study("A", 0).len(), 2);
    }
}
