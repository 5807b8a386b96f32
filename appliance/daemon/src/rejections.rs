//! Rejected associations go into the audit trail without letting anyone
//! who can reach the port grow it: the first rejection of a (caller,
//! reason) pair in a window is written; the rest of that window are
//! counted, and the count is written when the window closes. Plain logic on
//! an explicit clock; the ingress writes what it returns.

use std::collections::HashMap;

/// How long repeats of one rejection are only counted.
pub const WINDOW_MS: u64 = 60_000;
/// Distinct (caller, reason) pairs remembered; beyond, one shared entry.
const MAX_KEYS: usize = 1024;

/// An audit record to write: who, and what to say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub actor: String,
    pub detail: String,
}

#[derive(Debug)]
struct Window {
    opened_ms: u64,
    suppressed: u64,
}

#[derive(Debug, Default)]
pub struct Rejections {
    windows: HashMap<(String, String), Window>,
}

impl Rejections {
    /// A rejection of `actor` (calling AE @ address) for `reason` at `now`:
    /// what to write now, if anything.
    pub fn reject(&mut self, now_ms: u64, actor: &str, reason: &str) -> Option<Entry> {
        let mut key = (actor.to_string(), reason.to_string());
        if !self.windows.contains_key(&key) && self.windows.len() >= MAX_KEYS {
            key = ("(many callers)".to_string(), "(many reasons)".to_string());
        }
        match self.windows.get_mut(&key) {
            Some(w) if now_ms.saturating_sub(w.opened_ms) < WINDOW_MS => {
                w.suppressed += 1;
                None
            }
            _ => {
                self.windows.insert(
                    key.clone(),
                    Window {
                        opened_ms: now_ms,
                        suppressed: 0,
                    },
                );
                Some(Entry {
                    actor: key.0,
                    detail: key.1,
                })
            }
        }
    }

    /// Closes the windows older than [`WINDOW_MS`]: a record for each that
    /// counted repeats. Called periodically.
    pub fn close_windows(&mut self, now_ms: u64) -> Vec<Entry> {
        let mut out = Vec::new();
        self.windows.retain(|(actor, reason), w| {
            if now_ms.saturating_sub(w.opened_ms) < WINDOW_MS {
                return true;
            }
            if w.suppressed > 0 {
                out.push(Entry {
                    actor: actor.clone(),
                    detail: format!(
                        "{} more rejection(s) in {} s: {reason}",
                        w.suppressed,
                        WINDOW_MS / 1000
                    ),
                });
            }
            false
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_rejections_costs_two_records_a_minute() {
        let mut r = Rejections::default();
        let mut written = 0;
        for i in 0..10_000u64 {
            let now = i * 6; // 10 000 rejections in 60 s
            written += usize::from(r.reject(now, "STRANGER@10.0.0.9", "unknown AE").is_some());
            written += r.close_windows(now).len();
        }
        let closing = r.close_windows(60_000);
        assert_eq!(written, 1);
        assert_eq!(closing.len(), 1);
        assert!(
            closing[0].detail.starts_with("9999 more rejection(s)"),
            "{closing:?}"
        );
        // A different caller or reason is its own record.
        assert!(r.reject(60_001, "OTHER@10.0.0.9", "unknown AE").is_some());
        assert!(r
            .reject(60_002, "STRANGER@10.0.0.9", "wrong address")
            .is_some());
    }

    #[test]
    fn many_distinct_callers_share_one_entry_beyond_the_cap() {
        let mut r = Rejections::default();
        let written = (0..5000u64)
            .filter(|i| {
                r.reject(0, &format!("AE{i}@10.0.0.1"), "unknown AE")
                    .is_some()
            })
            .count();
        assert_eq!(written, MAX_KEYS + 1);
        assert!(r.windows.len() <= MAX_KEYS + 1);
    }
}
