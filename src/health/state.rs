//! One upstream's state: active-check health with rise/fall, passive ejection and the
//! operator's override, combined into the state routing sees.
//!
//! Pure: inputs are check results, failure counts and `now`; the controller compares
//! [`UpstreamState::state`] before and after each input to find transitions.

use std::fmt;

use tokio::time::Instant;

use super::outlier::Outlier;

/// What routing and operators see (SPEC §3). Only `Up` is usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Up,
    Down,
    Ejected,
    Drain,
    Maint,
}

/// An operator's override; `None` leaves the upstream to health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AdminOverride {
    Drain,
    Maint,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// No check completed yet: counts as up, and the first result decides.
    Unknown,
    Up,
    Down,
}

/// What a binary upgrade carries to the new process: the checks' verdict and counts
/// and the operator's override. A passive ejection is not carried: its end is an instant
/// of this process's clock, and the checks that go on decide again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CarriedState {
    /// `None` while no check has completed.
    pub checked_up: Option<bool>,
    pub passes_in_a_row: u32,
    pub failures_in_a_row: u32,
    pub admin: Option<AdminOverride>,
}

#[derive(Debug, Clone)]
pub struct UpstreamState {
    health: Health,
    passes_in_a_row: u32,
    failures_in_a_row: u32,
    admin: Option<AdminOverride>,
    pub outlier: Outlier,
}

// === impl State ===

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
            State::Ejected => "ejected",
            State::Drain => "drain",
            State::Maint => "maint",
        }
    }

    pub fn is_usable(self) -> bool {
        self == State::Up
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl UpstreamState ===

impl UpstreamState {
    /// Before any check: up until the first result. With checks disabled, up for good.
    pub fn new() -> Self {
        Self {
            health: Health::Unknown,
            passes_in_a_row: 0,
            failures_in_a_row: 0,
            admin: None,
            outlier: Outlier::default(),
        }
    }

    pub fn state(&self, now: Instant) -> State {
        match self.admin {
            Some(AdminOverride::Maint) => State::Maint,
            Some(AdminOverride::Drain) => State::Drain,
            None if self.outlier.is_ejected(now) => State::Ejected,
            None if self.health == Health::Down => State::Down,
            None => State::Up,
        }
    }

    pub fn carried(&self) -> CarriedState {
        CarriedState {
            checked_up: match self.health {
                Health::Unknown => None,
                Health::Up => Some(true),
                Health::Down => Some(false),
            },
            passes_in_a_row: self.passes_in_a_row,
            failures_in_a_row: self.failures_in_a_row,
            admin: self.admin,
        }
    }

    /// The state a previous process handed over, so that the next check goes on from
    /// where it left off instead of deciding afresh.
    pub fn from_carried(carried: CarriedState) -> Self {
        Self {
            health: match carried.checked_up {
                None => Health::Unknown,
                Some(true) => Health::Up,
                Some(false) => Health::Down,
            },
            passes_in_a_row: carried.passes_in_a_row,
            failures_in_a_row: carried.failures_in_a_row,
            admin: carried.admin,
            outlier: Outlier::default(),
        }
    }

    /// Applies one active check result with the pool's `rise` and `fall`.
    pub fn on_check(&mut self, passed: bool, rise: u32, fall: u32, now: Instant) {
        if passed {
            self.failures_in_a_row = 0;
            self.passes_in_a_row = self.passes_in_a_row.saturating_add(1);
            self.outlier.on_check_passed(now);
            if self.health == Health::Unknown || self.passes_in_a_row >= rise {
                self.health = Health::Up;
            }
        } else {
            self.passes_in_a_row = 0;
            self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
            if self.health == Health::Unknown || self.failures_in_a_row >= fall {
                self.health = Health::Down;
            }
        }
    }

    /// Whether checks should run at `fast_interval`: the first result is pending, or
    /// the upstream is counting towards rise or fall.
    pub fn is_deciding(&self) -> bool {
        match self.health {
            Health::Unknown => true,
            Health::Up => self.failures_in_a_row > 0,
            Health::Down => self.passes_in_a_row > 0,
        }
    }

    /// Active checks were turned off: their verdict no longer holds, and with no checks
    /// to end it a `down` would last for ever. Passive ejection and operator states stay.
    pub fn forget_checks(&mut self) {
        self.health = Health::Unknown;
        self.passes_in_a_row = 0;
        self.failures_in_a_row = 0;
    }

    pub fn set_admin(&mut self, admin: Option<AdminOverride>) {
        self.admin = admin;
    }

    pub fn admin(&self) -> Option<AdminOverride> {
        self.admin
    }

    /// Consecutive (passes, failures) of active checks.
    pub fn counts(&self) -> (u32, u32) {
        (self.passes_in_a_row, self.failures_in_a_row)
    }
}

impl Default for UpstreamState {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_first_check_decides_then_rise_and_fall_count() {
        let now = Instant::now();
        let mut s = UpstreamState::new();
        assert_eq!(s.state(now), State::Up, "up until the first check");
        assert!(s.is_deciding());
        s.on_check(false, 2, 3, now);
        assert_eq!(s.state(now), State::Down, "first failure decides at once");
        assert!(!s.is_deciding());

        s.on_check(true, 2, 3, now);
        assert_eq!(s.state(now), State::Down);
        assert!(s.is_deciding(), "counting towards rise");
        s.on_check(true, 2, 3, now);
        assert_eq!(s.state(now), State::Up);

        s.on_check(false, 2, 3, now);
        s.on_check(false, 2, 3, now);
        assert_eq!(s.state(now), State::Up);
        s.on_check(true, 2, 3, now);
        s.on_check(false, 2, 3, now);
        s.on_check(false, 2, 3, now);
        assert_eq!(s.state(now), State::Up, "a pass resets the fall count");
        s.on_check(false, 2, 3, now);
        assert_eq!(s.state(now), State::Down);
    }

    #[tokio::test(start_paused = true)]
    async fn admin_overrides_win_and_ejection_hides_health() {
        use crate::config::OutlierConfig;
        use std::time::Duration;
        let now = Instant::now();
        let mut s = UpstreamState::new();
        s.on_check(true, 2, 3, now);
        let policy = OutlierConfig {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(60),
        };
        s.outlier.on_failures(1, &policy, now);
        assert_eq!(s.state(now), State::Ejected);
        s.set_admin(Some(AdminOverride::Drain));
        assert_eq!(s.state(now), State::Drain);
        s.set_admin(Some(AdminOverride::Maint));
        assert_eq!(s.state(now), State::Maint);
        s.set_admin(None);
        assert_eq!(
            s.state(now + Duration::from_secs(6)),
            State::Up,
            "ejection over"
        );
        s.outlier
            .on_failures(1, &policy, now + Duration::from_secs(6));
        s.on_check(true, 2, 3, now + Duration::from_secs(7));
        assert_eq!(
            s.state(now + Duration::from_secs(7)),
            State::Up,
            "a passing check ends the ejection"
        );
    }
}
