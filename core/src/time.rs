//! Time as quiver stores it: microseconds since the Unix epoch (UTC), and an
//! injectable [`Clock`] so TTL logic is tested without waiting.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch, UTC.
pub type Micros = i64;

/// A source of "now".
pub trait Clock: Send + Sync + 'static {
    /// The current time in microseconds since the epoch.
    fn now_micros(&self) -> Micros;
}

/// The system wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> Micros {
        system_time_to_micros(SystemTime::now())
    }
}

/// A clock that only moves when told to; for tests.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock showing `now`.
    pub fn new(now: Micros) -> Self {
        ManualClock(AtomicI64::new(now))
    }
    /// Sets the time.
    pub fn set(&self, now: Micros) {
        self.0.store(now, Ordering::SeqCst);
    }
    /// Moves the time forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(duration_micros(d), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_micros(&self) -> Micros {
        self.0.load(Ordering::SeqCst)
    }
}

/// Converts a `SystemTime` to epoch microseconds (negative before 1970).
pub fn system_time_to_micros(t: SystemTime) -> Micros {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => duration_micros(d),
        Err(e) => -duration_micros(e.duration()),
    }
}

/// Converts epoch microseconds to a `SystemTime`.
pub fn micros_to_system_time(m: Micros) -> SystemTime {
    if m >= 0 {
        UNIX_EPOCH + Duration::from_micros(m as u64)
    } else {
        UNIX_EPOCH - Duration::from_micros(m.unsigned_abs())
    }
}

/// A duration in whole microseconds, saturating at `i64::MAX`.
pub fn duration_micros(d: Duration) -> Micros {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Formats epoch microseconds as RFC 3339 with microsecond precision.
pub fn format_rfc3339(m: Micros) -> String {
    humantime::format_rfc3339_micros(micros_to_system_time(m)).to_string()
}

/// Parses an RFC 3339 timestamp (`2026-01-02T03:04:05Z`, fractions allowed).
pub fn parse_rfc3339(s: &str) -> Option<Micros> {
    humantime::parse_rfc3339_weak(s)
        .ok()
        .map(system_time_to_micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        let m = 1_764_000_000_123_456;
        assert_eq!(parse_rfc3339(&format_rfc3339(m)), Some(m));
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn negative_times_convert() {
        let m = -1_500_000;
        assert_eq!(system_time_to_micros(micros_to_system_time(m)), m);
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(10);
        assert_eq!(c.now_micros(), 10);
        c.advance(Duration::from_secs(1));
        assert_eq!(c.now_micros(), 1_000_010);
    }
}
