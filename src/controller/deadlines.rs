//! Each pool's next timed change, kept in order, so that the controller knows when to
//! wake without looking at every pool after every message: with 1,000 pools checked
//! every second, that scan was most of the controller's work.

use std::collections::BTreeSet;

use tokio::time::Instant;

/// The next deadline of every pool (by index), and all of them in time order.
#[derive(Debug, Default)]
pub(super) struct Deadlines {
    by_pool: Vec<Option<Instant>>,
    in_order: BTreeSet<(Instant, usize)>,
}

impl Deadlines {
    /// Forgets every pool and takes `all` (one per pool, in pool order) instead.
    pub(super) fn reset(&mut self, all: impl Iterator<Item = Option<Instant>>) {
        self.by_pool.clear();
        self.in_order.clear();
        for (p, due) in all.enumerate() {
            self.by_pool.push(due);
            if let Some(due) = due {
                self.in_order.insert((due, p));
            }
        }
    }

    /// Pool `p`'s next deadline is now `due`.
    pub(super) fn set(&mut self, p: usize, due: Option<Instant>) {
        if p >= self.by_pool.len() {
            self.by_pool.resize(p + 1, None);
        }
        let old = std::mem::replace(&mut self.by_pool[p], due);
        if old == due {
            return;
        }
        if let Some(old) = old {
            self.in_order.remove(&(old, p));
        }
        if let Some(due) = due {
            self.in_order.insert((due, p));
        }
    }

    pub(super) fn earliest(&self) -> Option<Instant> {
        self.in_order.first().map(|&(due, _)| due)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_earliest_follows_every_change_of_any_pool() {
        let now = Instant::now();
        let at = |ms| Some(now + Duration::from_millis(ms));
        let mut deadlines = Deadlines::default();
        assert_eq!(deadlines.earliest(), None);
        deadlines.reset([at(30), None, at(10)].into_iter());
        assert_eq!(deadlines.earliest(), at(10));
        deadlines.set(2, at(50));
        assert_eq!(deadlines.earliest(), at(30));
        deadlines.set(0, None);
        assert_eq!(deadlines.earliest(), at(50));
        deadlines.set(1, at(50));
        deadlines.set(2, None);
        assert_eq!(deadlines.earliest(), at(50), "pool 1 has the same instant");
        deadlines.set(1, None);
        assert_eq!(deadlines.earliest(), None);
        deadlines.set(7, at(5));
        assert_eq!(deadlines.earliest(), at(5), "a pool past the end is added");
        deadlines.reset(std::iter::empty());
        assert_eq!(deadlines.earliest(), None);
    }
}
