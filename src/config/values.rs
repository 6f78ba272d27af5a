//! Value syntax shared by every setting: durations (`250ms`, `2s`, …, capped at a year) and
//! `host:port` addresses.

use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::time::Duration;

/// Why a duration setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// No number where one was expected.
    #[error("invalid duration {0:?} (use e.g. 500ms, 2s, 5m, 1h)")]
    Invalid(String),
    /// A unit other than us, ms, s, m, h.
    #[error("invalid duration unit in {0:?} (use us, ms, s, m or h)")]
    Unit(String),
    /// The number times its unit does not fit in a `Duration`.
    #[error("duration {0:?} is too long")]
    Overflow(String),
    /// Longer than [`MAX_DURATION`].
    #[error("duration {0:?} is longer than the maximum of 365 days")]
    OverMax(Duration),
}

/// Why an address setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// No `:port`.
    #[error("{0:?} must be host:port")]
    NotHostPort(String),
    /// Empty, or holds `/` or a space.
    #[error("{0:?} has an invalid host")]
    Host(String),
    /// Not a number from 0 to 65535.
    #[error("{0:?} has an invalid port")]
    Port(String),
}

/// A duration written as `200us`, `500ms`, `2s`, `1m`, `1h`, or a bare number of milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Millis(pub Duration);

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        let d = match Raw::deserialize(d)? {
            Raw::N(n) => Duration::from_millis(n),
            Raw::S(s) => parse_duration(&s).map_err(de::Error::custom)?,
        };
        if d > MAX_DURATION {
            return Err(de::Error::custom(DurationError::OverMax(d)));
        }
        Ok(Millis(d))
    }
}

/// The longest duration a setting may take. Deadlines are `now + setting`; beyond a year no
/// timeout means anything, and near `u64::MAX` seconds the addition would overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// `now + d`, never overflowing: a setting built in code can exceed [`MAX_DURATION`].
pub fn deadline_after(d: Duration) -> std::time::Instant {
    let now = std::time::Instant::now();
    now.checked_add(d.min(MAX_DURATION)).unwrap_or(now)
}

/// Parses `250ms`, `3s`, `2m`, `1h` (or bare milliseconds).
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| DurationError::Invalid(s.into()))?;
    let d = match unit.trim() {
        "us" | "µs" => Duration::from_micros(n),
        "" | "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" | "h" => {
            let unit_secs = if unit.trim() == "m" { 60 } else { 3600 };
            Duration::from_secs(
                n.checked_mul(unit_secs)
                    .ok_or_else(|| DurationError::Overflow(s.into()))?,
            )
        }
        _ => return Err(DurationError::Unit(s.into())),
    };
    Ok(d)
}

/// Checks `host:port` shape (names are resolved at connect time).
pub fn check_addr(a: &str) -> Result<(), AddrError> {
    if a.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = a
        .rsplit_once(':')
        .ok_or_else(|| AddrError::NotHostPort(a.into()))?;
    if host.is_empty() || host.contains(['/', ' ']) {
        return Err(AddrError::Host(a.into()));
    }
    port.parse::<u16>().map_err(|_| AddrError::Port(a.into()))?;
    Ok(())
}

/// Whether a listen address is loopback (127.0.0.0/8, ::1 or localhost).
pub fn is_loopback(a: &str) -> bool {
    if let Ok(sa) = a.parse::<std::net::SocketAddr>() {
        return sa.ip().is_loopback();
    }
    a.rsplit_once(':').is_some_and(|(h, _)| h == "localhost")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1500").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("200us").unwrap(), Duration::from_micros(200));
        assert_eq!(parse_duration("50µs").unwrap(), Duration::from_micros(50));
        // Too many digits for a u64 is not a number; a u64 times its unit may not fit.
        assert!(matches!(
            parse_duration("99999999999999999999h"),
            Err(DurationError::Invalid(_))
        ));
        assert!(matches!(
            parse_duration("9999999999999999h"),
            Err(DurationError::Overflow(_))
        ));
        assert!(matches!(
            parse_duration("18446744073709551615m"),
            Err(DurationError::Overflow(_))
        ));
        assert_eq!(
            parse_duration("2 weeks").unwrap_err().to_string(),
            "invalid duration unit in \"2 weeks\" (use us, ms, s, m or h)"
        );
        assert_eq!(
            parse_duration("soon").unwrap_err().to_string(),
            "invalid duration \"soon\" (use e.g. 500ms, 2s, 5m, 1h)"
        );
        let c = Config::from_yaml("health:\n  interval: 250ms\n  timeout: 1s\n", "t").unwrap();
        assert_eq!(c.health.interval.0, Duration::from_millis(250));
    }

    #[test]
    fn addresses() {
        assert_eq!(check_addr("127.0.0.1:1"), Ok(()));
        assert_eq!(check_addr("[::1]:80"), Ok(()));
        assert_eq!(check_addr("cli-1.internal:4321"), Ok(()));
        assert_eq!(
            check_addr("nope"),
            Err(AddrError::NotHostPort("nope".into()))
        );
        assert_eq!(check_addr(":80"), Err(AddrError::Host(":80".into())));
        assert_eq!(check_addr("a b:80"), Err(AddrError::Host("a b:80".into())));
        assert_eq!(
            check_addr("h:99999"),
            Err(AddrError::Port("h:99999".into()))
        );
        assert_eq!(
            check_addr("nope").unwrap_err().to_string(),
            "\"nope\" must be host:port"
        );
    }
}
