//! Time as quiver stores it: microseconds since the Unix epoch (UTC), the
//! one RFC 3339 parser and formatter of the workspace (chrono), the accepted
//! range, and an injectable [`Clock`] so TTL logic is tested without waiting.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, SecondsFormat, Utc};

use crate::error::quote;

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

/// Earliest instant quiver accepts: `0001-01-01T00:00:00Z`, the start of
/// the range of `google.protobuf.Timestamp` (and of Python's `datetime`).
pub const MIN_MICROS: Micros = -62_135_596_800_000_000;

/// Latest instant quiver accepts: `9999-12-31T23:59:59.999999Z`, the end of
/// the range of `google.protobuf.Timestamp` at microsecond precision.
pub const MAX_MICROS: Micros = 253_402_300_799_999_999;

/// The accepted range, as written in error messages.
pub const RANGE_TEXT: &str = "0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z";

/// `m` if it lies in [`MIN_MICROS`]`..=`[`MAX_MICROS`], else a message
/// saying so (every path that accepts a time checks this, so that every
/// stored time can be written back as RFC 3339).
pub fn check_range(m: Micros) -> Result<Micros, String> {
    if (MIN_MICROS..=MAX_MICROS).contains(&m) {
        Ok(m)
    } else {
        Err(format!(
            "{} is outside the supported range {RANGE_TEXT}",
            format_rfc3339(m)
        ))
    }
}

/// Formats epoch microseconds as RFC 3339 in UTC with six fractional
/// digits: `2026-11-29T10:00:00.000000Z`. Every accepted time (see
/// [`check_range`]) formats this way; times outside that range, which no
/// input path accepts, are written in ISO 8601's expanded-year form
/// (`+20000-01-01T00:00:00.000000Z`) or, beyond what chrono represents, as
/// a count of microseconds, never with a panic.
pub fn format_rfc3339(m: Micros) -> String {
    match DateTime::<Utc>::from_timestamp_micros(m) {
        Some(t) => t.to_rfc3339_opts(SecondsFormat::Micros, true),
        None => format!("{m} microseconds since 1970-01-01T00:00:00Z"),
    }
}

/// Deserializes a duration written as humantime text (`"250ms"`, `"30s"`,
/// `"5m"`, `"1d"`): every duration of quiver's configuration
/// (`#[serde(deserialize_with = "quiver_core::time::deserialize_duration")]`).
///
/// # Errors
/// Text humantime cannot read, with the text and a valid example.
pub fn deserialize_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {s:?} ({e}); write e.g. \"250ms\", \"30s\", \"5m\", \"1d\""
        ))
    })
}

/// The UTC calendar date (`YYYY-MM-DD`) of an instant, as the archive's
/// `date` partitions name it.
pub fn utc_date(m: Micros) -> String {
    match DateTime::<Utc>::from_timestamp_micros(m) {
        Some(t) => t.format("%Y-%m-%d").to_string(),
        None => format_rfc3339(m),
    }
}

/// Parses an RFC 3339 timestamp into epoch microseconds (UTC).
///
/// Accepts every RFC 3339 `date-time` (section 5.6): `T`, `t` or a space
/// between date and time; any number of fractional digits (digits past the
/// sixth are dropped, i.e. rounded toward the past, as for protobuf
/// nanoseconds); `Z`, `z` or a numeric offset `+hh:mm`/`-hh:mm` (`-00:00`
/// included; ASCII only), which is converted to UTC; a leap second (`:60`,
/// with any fraction) reads as the first instant of the next minute, so it
/// never sorts after a later time. The result must lie in
/// [`check_range`]'s range. Errors say what was wrong and show a valid form.
pub fn parse_rfc3339(s: &str) -> Result<Micros, String> {
    const EXAMPLE: &str = "write e.g. 2026-11-29T10:00:00Z or 2026-11-29T15:30:00.5+05:30";
    if !s.is_ascii() {
        // chrono also takes U+2212 (minus sign) in offsets; RFC 3339 does not.
        return Err(format!(
            "{} is not an RFC 3339 timestamp (it has a non-ASCII character); {EXAMPLE}",
            quote(s)
        ));
    }
    let t = DateTime::parse_from_rfc3339(s)
        .map_err(|e| format!("{} is not an RFC 3339 timestamp ({e}); {EXAMPLE}", quote(s)))?;
    // chrono keeps a leap second as nanoseconds past 1e9 within second 59.
    let micros = if t.timestamp_subsec_nanos() >= 1_000_000_000 {
        (t.timestamp() + 1) * 1_000_000
    } else {
        t.timestamp_micros()
    };
    check_range(micros)
        .map_err(|_| format!("{} is outside the supported range {RANGE_TEXT}", quote(s)))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        let m = 1_764_000_000_123_456;
        assert_eq!(parse_rfc3339(&format_rfc3339(m)), Ok(m));
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(format_rfc3339(MIN_MICROS), "0001-01-01T00:00:00.000000Z");
        assert_eq!(format_rfc3339(MAX_MICROS), "9999-12-31T23:59:59.999999Z");
    }

    #[test]
    fn offsets_convert_to_utc() {
        let z = |s: &str| format_rfc3339(parse_rfc3339(s).unwrap());
        // The inputs: an offset is converted, never ignored or refused.
        assert_eq!(
            z("2026-11-29T15:30:00.000+05:30"),
            "2026-11-29T10:00:00.000000Z"
        );
        assert_eq!(
            z("2026-11-29T15:30:00+05:30"),
            "2026-11-29T10:00:00.000000Z"
        );
        assert_eq!(
            z("2026-11-29T05:00:00.000-05:00"),
            "2026-11-29T10:00:00.000000Z"
        );
        assert_eq!(
            z("2026-06-01T12:00:00.5+02:00"),
            "2026-06-01T10:00:00.500000Z"
        );
        // Every RFC 3339 spelling: lower-case t/z, a space, -00:00, many digits.
        assert_eq!(z("2026-11-29t10:00:00z"), "2026-11-29T10:00:00.000000Z");
        assert_eq!(z("2026-11-29 10:00:00Z"), "2026-11-29T10:00:00.000000Z");
        assert_eq!(
            z("2026-11-29T10:00:00-00:00"),
            "2026-11-29T10:00:00.000000Z"
        );
        assert_eq!(
            z("2026-11-29T10:00:00.123456789Z"),
            "2026-11-29T10:00:00.123456Z"
        );
        // A leap second is the first instant of the next minute, whatever
        // its fraction: 23:59:60.9 must not sort after 00:00:00.5.
        assert_eq!(z("2016-12-31T23:59:60Z"), "2017-01-01T00:00:00.000000Z");
        assert_eq!(z("2016-12-31T23:59:60.9Z"), "2017-01-01T00:00:00.000000Z");
        assert_eq!(
            z("2017-01-01T05:29:60.999999+05:30"),
            "2017-01-01T00:00:00.000000Z"
        );
        // An offset crossing a day and year boundary.
        assert_eq!(
            z("2027-01-01T01:00:00+02:00"),
            "2026-12-31T23:00:00.000000Z"
        );
    }

    #[test]
    fn bad_times_are_explained() {
        for (bad, needle) in [
            ("2026-11-29", "not an RFC 3339 timestamp"),
            ("2026-11-29T10:00:00", "not an RFC 3339 timestamp"),
            ("2026-11-29T10:00:00+0530", "not an RFC 3339 timestamp"),
            ("2026-13-01T00:00:00Z", "not an RFC 3339 timestamp"),
            ("0001-01-01T00:00:00+00:01", "outside the supported range"),
            ("9999-12-31T23:59:60Z", "outside the supported range"),
            ("2026-11-29T10:00:00\u{2212}05:30", "non-ASCII"),
        ] {
            let e = parse_rfc3339(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
        let e = parse_rfc3339(&"x".repeat(10_000)).unwrap_err();
        assert!(e.len() < 400 && e.contains("10000 bytes"), "{e}");
        assert!(check_range(MAX_MICROS + 1).is_err());
        assert!(check_range(MIN_MICROS - 1).is_err());
    }

    #[test]
    fn formatting_never_panics() {
        for m in [i64::MIN, i64::MAX, MIN_MICROS - 1, MAX_MICROS + 1, -1] {
            assert!(!format_rfc3339(m).is_empty());
        }
        assert_eq!(format_rfc3339(-1), "1969-12-31T23:59:59.999999Z");
    }

    fn offset_text(minutes: i32) -> String {
        let sign = if minutes < 0 { '-' } else { '+' };
        let a = minutes.abs();
        format!("{sign}{:02}:{:02}", a / 60, a % 60)
    }

    proptest! {
        /// Every accepted instant formats and parses back to itself.
        #[test]
        fn format_then_parse_is_identity(m in MIN_MICROS..=MAX_MICROS) {
            prop_assert_eq!(parse_rfc3339(&format_rfc3339(m)), Ok(m));
        }

        /// The same instant written with any offset, any number of
        /// fractional digits and any RFC 3339 separator parses to the
        /// same microsecond.
        #[test]
        fn every_offset_form_names_the_same_instant(
            m in (MIN_MICROS + 86_400_000_000)..=(MAX_MICROS - 86_400_000_000),
            offset_minutes in -(23 * 60 + 59)..=(23 * 60 + 59),
            extra_digits in 0usize..4,
            sep in prop::sample::select(vec!["T", "t", " "]),
        ) {
            let local = DateTime::<Utc>::from_timestamp_micros(m).unwrap().naive_utc()
                + chrono::Duration::minutes(i64::from(offset_minutes));
            let text = format!(
                "{}{sep}{}{}{}",
                local.format("%Y-%m-%d"),
                local.format("%H:%M:%S%.6f"),
                "0".repeat(extra_digits),
                if offset_minutes == 0 { "Z".to_owned() } else { offset_text(offset_minutes) },
            );
            prop_assert_eq!(parse_rfc3339(&text), Ok(m), "{}", text);
        }
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(-1), "1969-12-31");
        // 2026-11-25T10:00:00Z
        assert_eq!(utc_date(1_795_600_800_000_000), "2026-11-25");
        // 2024-02-29T23:59:59Z
        assert_eq!(utc_date(1_709_251_199_000_000), "2024-02-29");
        assert_eq!(utc_date(MIN_MICROS), "0001-01-01");
        assert_eq!(utc_date(MAX_MICROS), "9999-12-31");
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
