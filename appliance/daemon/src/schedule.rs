//! What a forwarder sends next, and when it tries again: plain logic over
//! explicit `now` values, so a week-long outage is a microsecond test.

use std::collections::BTreeMap;
use std::time::Duration;

use kakehashi_config::RetryPolicy;
use kakehashi_spool::{InstanceRecord, Priority};

/// One instance waiting for one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub id: u64,
    pub priority: Priority,
    pub study: String,
    pub sop_class: String,
    pub sop_instance: String,
    pub transfer_syntax: String,
    pub size: u64,
    pub offset: u64,
    /// SHA-256 of the dataset as received, checked before sending.
    pub sha256: String,
    pub next_attempt_ms: u64,
    pub attempts: u32,
    pub received_ms: u64,
    /// Flagged stuck (see [`becomes_stuck`]).
    pub stuck_ms: Option<u64>,
}

impl Item {
    pub fn from_record(rec: &InstanceRecord, destination: &str) -> Option<Item> {
        let route = rec.route(destination)?;
        route.state.is_pending().then(|| Item {
            id: rec.id,
            priority: rec.meta.priority,
            study: rec.meta.study_instance_uid.clone(),
            sop_class: rec.meta.sop_class_uid.clone(),
            sop_instance: rec.meta.sop_instance_uid.clone(),
            transfer_syntax: rec.meta.transfer_syntax_uid.clone(),
            size: rec.dataset_size,
            offset: rec.dataset_offset,
            sha256: rec.sha256.clone(),
            next_attempt_ms: route.next_attempt_ms,
            attempts: route.attempts,
            received_ms: rec.received_ms,
            stuck_ms: route.stuck_ms,
        })
    }
}

/// The pending instances of one destination, in arrival order.
#[derive(Debug, Default)]
pub struct Queue {
    items: BTreeMap<u64, Item>,
}

impl Queue {
    pub fn push(&mut self, item: Item) {
        self.items.insert(item.id, item);
    }

    pub fn remove(&mut self, id: u64) -> Option<Item> {
        self.items.remove(&id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Item> {
        self.items.get_mut(&id)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// The next instance to send at `now`: highest priority first; within a
    /// priority, the study already on the wire (so a study travels on one
    /// association), then arrival order.
    pub fn pick(&self, now_ms: u64, current_study: Option<&str>) -> Option<&Item> {
        self.items
            .values()
            .filter(|i| i.next_attempt_ms <= now_ms)
            .max_by(|a, b| {
                let key = |i: &Item| (i.priority, current_study == Some(i.study.as_str()));
                key(a).cmp(&key(b)).then(b.id.cmp(&a.id))
            })
    }

    /// The (SOP class, transfer syntax) pairs ready in `study`, for the
    /// presentation contexts of a new association. At most 127 (the limit of
    /// odd context IDs).
    pub fn contexts_for_study(&self, study: &str, now_ms: u64) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for i in self
            .items
            .values()
            .filter(|i| i.study == study && i.next_attempt_ms <= now_ms)
        {
            let pair = (i.sop_class.clone(), i.transfer_syntax.clone());
            if !out.contains(&pair) {
                out.push(pair);
                if out.len() == 127 {
                    break;
                }
            }
        }
        out
    }

    /// When the earliest waiting item becomes due.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.items.values().map(|i| i.next_attempt_ms).min()
    }

    pub fn bytes(&self) -> u64 {
        self.items.values().map(|i| i.size).sum()
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
            next_attempt_ms: 0,
            attempts: 0,
            received_ms: 0,
            stuck_ms: None,
        }
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

    #[test]
    fn a_week_of_outage_keeps_retrying_at_the_cap() {
        let policy = RetryPolicy {
            initial: Duration::from_secs(5),
            max: Duration::from_secs(300),
            stuck_after_attempts: 20,
            stuck_after: Duration::from_secs(86_400),
        };
        assert!(backoff(policy, 1, 0.0) >= Duration::from_millis(2500));
        assert!(backoff(policy, 1, 0.999) <= Duration::from_secs(5));
        assert!(backoff(policy, 3, 0.999) <= Duration::from_secs(20));
        // simulate a week of failures: the delay never exceeds the cap, never reaches zero,
        // and attempts keep happening (no instance is given up for a transient outage)
        let week = 7 * 86_400_000u64;
        let (mut now, mut tries) = (0u64, 0u32);
        while now < week {
            tries += 1;
            let d = backoff(policy, tries, fastrand::f64());
            assert!(d <= policy.max && d >= policy.initial / 2);
            now += d.as_millis() as u64;
        }
        assert!(tries > 2016, "at least one try per cap interval: {tries}");
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
