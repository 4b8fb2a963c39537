//! Passive ejection: failed connect attempts on real traffic take an upstream out of
//! rotation for a while, doubling on each repeated ejection.
//!
//! Pure state with `now` passed in (tokio's `Instant`, so tests run on paused time).

use std::time::Duration;

use tokio::time::Instant;

use crate::config::OutlierConfig;

#[derive(Debug, Default, Clone)]
pub struct Outlier {
    ejected_until: Option<Instant>,
    /// Ejections in the current series; the next lasts `base * 2^ejections`.
    ejections: u32,
    last_ejection_end: Option<Instant>,
}

// === impl Outlier ===

impl Outlier {
    /// `in_a_row` failed attempts have been seen. Returns the ejection time when this
    /// ejects the upstream.
    pub fn on_failures(
        &mut self,
        in_a_row: u32,
        policy: &OutlierConfig,
        now: Instant,
    ) -> Option<Duration> {
        if in_a_row < policy.consecutive_failures || self.is_ejected(now) {
            return None;
        }
        // A series of ejections ends once the upstream behaved for a whole max_ejection.
        if self
            .last_ejection_end
            .is_some_and(|end| now.saturating_duration_since(end) > policy.max_ejection)
        {
            self.ejections = 0;
        }
        // base * 2^ejections, saturating at max_ejection: the shift and the product
        // would both overflow after enough repeats of a small base.
        let factor = 1u32.checked_shl(self.ejections.min(31)).unwrap_or(u32::MAX);
        let duration = policy
            .base_ejection
            .checked_mul(factor)
            .unwrap_or(policy.max_ejection)
            .min(policy.max_ejection);
        // Config bounds keep this far from the clock's end; should one ever get there,
        // not ejecting beats a panic that would take the controller down.
        let until = now.checked_add(duration)?;
        self.ejections = self.ejections.saturating_add(1);
        self.ejected_until = Some(until);
        Some(duration)
    }

    /// A passing active check ends an ejection early. Returns whether one ended.
    pub fn on_check_passed(&mut self, now: Instant) -> bool {
        self.end(now)
    }

    /// Ends an ejection whose time is over. Returns whether one ended.
    pub fn expire(&mut self, now: Instant) -> bool {
        match self.ejected_until {
            Some(until) if until <= now => self.end(now),
            _ => false,
        }
    }

    fn end(&mut self, now: Instant) -> bool {
        if self.ejected_until.take().is_some() {
            self.last_ejection_end = Some(now);
            return true;
        }
        false
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| until > now)
    }

    pub fn ejected_until(&self) -> Option<Instant> {
        self.ejected_until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(35),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejects_after_consecutive_failures_doubling_up_to_max() {
        let mut o = Outlier::default();
        let p = policy();
        let now = Instant::now();
        assert_eq!(o.on_failures(2, &p, now), None);
        assert_eq!(o.on_failures(3, &p, now), Some(Duration::from_secs(10)));
        assert!(o.is_ejected(now + Duration::from_secs(9)));
        assert_eq!(o.on_failures(4, &p, now), None, "already ejected");
        assert!(!o.expire(now + Duration::from_secs(9)));
        assert!(o.expire(now + Duration::from_secs(10)));
        assert!(!o.is_ejected(now + Duration::from_secs(10)));

        let later = now + Duration::from_secs(11);
        assert_eq!(o.on_failures(3, &p, later), Some(Duration::from_secs(20)));
        assert!(o.expire(later + Duration::from_secs(20)));
        let later = later + Duration::from_secs(21);
        assert_eq!(
            o.on_failures(3, &p, later),
            Some(Duration::from_secs(35)),
            "capped at max_ejection"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_ejections_saturate_at_max_without_overflow() {
        let mut o = Outlier::default();
        let p = OutlierConfig {
            consecutive_failures: 1,
            base_ejection: Duration::from_millis(1),
            max_ejection: Duration::from_secs(24 * 60 * 60),
        };
        let mut now = Instant::now();
        let mut last = Duration::ZERO;
        // Enough repeats for both 2^n and base * 2^n to overflow.
        for _ in 0..100 {
            let ejected = o.on_failures(1, &p, now).expect("ejects");
            assert!(ejected >= last && ejected <= p.max_ejection);
            last = ejected;
            now = o.ejected_until().expect("ejected");
            assert!(o.expire(now));
        }
        assert_eq!(last, p.max_ejection);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejection_beyond_the_clock_does_not_panic() {
        let mut o = Outlier::default();
        let p = OutlierConfig {
            consecutive_failures: 1,
            base_ejection: Duration::MAX,
            max_ejection: Duration::MAX,
        };
        assert_eq!(o.on_failures(1, &p, Instant::now()), None);
        assert!(!o.is_ejected(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_passing_check_ends_the_ejection_and_good_behaviour_resets_the_series() {
        let mut o = Outlier::default();
        let p = policy();
        let now = Instant::now();
        o.on_failures(3, &p, now);
        assert!(o.on_check_passed(now + Duration::from_secs(1)));
        assert!(!o.is_ejected(now + Duration::from_secs(1)));
        assert!(
            !o.on_check_passed(now + Duration::from_secs(2)),
            "nothing to end"
        );
        // Well-behaved for longer than max_ejection: the next ejection is short again.
        let much_later = now + Duration::from_secs(100);
        assert_eq!(
            o.on_failures(3, &p, much_later),
            Some(Duration::from_secs(10))
        );
    }
}
