//! Failover events: every change of an upstream's state and of a pool's active tier.
//!
//! The controller is the only writer. Each event is logged once (tracing, structured
//! fields) and kept in a bounded ring of the last [`RING_CAPACITY`] for the admin API,
//! the demo and tests. The ring's lock is never taken on the connection hot path.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

pub const RING_CAPACITY: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// An upstream's state changed (`old`/`new` are states: up, down, ejected, ...).
    Upstream,
    /// A pool's active tier changed (`old`/`new` are priorities, or "none").
    Tier,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Increasing from 1; `/events?since=<id>` returns the newer ones.
    pub id: u64,
    /// Milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    pub kind: EventKind,
    pub pool: String,
    /// The upstream's label, for upstream events.
    pub upstream: Option<String>,
    pub old: String,
    pub new: String,
    pub reason: String,
}

/// The bounded ring of the last events.
#[derive(Debug, Default)]
pub struct EventLog {
    ring: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    next_id: u64,
    events: VecDeque<Event>,
}

// === impl EventLog ===

impl EventLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Logs and records one event; returns its id.
    pub fn record(
        &self,
        kind: EventKind,
        pool: &str,
        upstream: Option<&str>,
        old: &str,
        new: &str,
        reason: &str,
    ) -> u64 {
        match (kind, new) {
            (EventKind::Upstream, "up") | (EventKind::Upstream, "drain") => {
                info!(pool, upstream, old, new, reason, "upstream state changed")
            }
            (EventKind::Upstream, _) => {
                warn!(pool, upstream, old, new, reason, "upstream state changed")
            }
            (EventKind::Tier, _) => warn!(pool, old, new, reason, "active tier changed"),
        }
        let at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut ring = self.lock();
        ring.next_id += 1;
        let id = ring.next_id;
        if ring.events.len() == RING_CAPACITY {
            ring.events.pop_front();
        }
        ring.events.push_back(Event {
            id,
            at_unix_ms,
            kind,
            pool: pool.to_string(),
            upstream: upstream.map(str::to_string),
            old: old.to_string(),
            new: new.to_string(),
            reason: reason.to_string(),
        });
        id
    }

    /// Events with an id greater than `since`, oldest first.
    pub fn since(&self, since: u64) -> Vec<Event> {
        self.lock()
            .events
            .iter()
            .filter(|e| e.id > since)
            .cloned()
            .collect()
    }

    pub fn all(&self) -> Vec<Event> {
        self.since(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        // A panic while holding this lock cannot leave the ring inconsistent (each
        // mutation is one push/pop), so a poisoned lock is still usable.
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_thousand_with_increasing_ids() {
        let log = EventLog::new();
        for i in 0..1500 {
            log.record(
                EventKind::Upstream,
                "p",
                Some("u"),
                "up",
                "down",
                &format!("r{i}"),
            );
        }
        let all = log.all();
        assert_eq!(all.len(), RING_CAPACITY);
        assert_eq!(all[0].id, 501);
        assert_eq!(all[999].id, 1500);
        assert_eq!(all[999].reason, "r1499");
        let newer = log.since(1498);
        assert_eq!(
            newer.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![1499, 1500]
        );
        assert!(log.since(1500).is_empty());
    }
}
