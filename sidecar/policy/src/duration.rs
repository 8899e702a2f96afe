//! Durations as users write them in policies: `500ms`, `30s`, `1m`, `1h30m`, `7d`.
//!
//! The syntax is one or more `<digits><unit>` pairs with units `ms`, `s`, `m`, `h`, `d`,
//! largest first. Nothing else is accepted (no spaces, signs, fractions or `µs`), so a typo
//! is an error instead of a surprise.

use std::time::Duration;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (expected e.g. 500ms, 30s, 1m, 1h30m, 7d)")]
pub struct DurationError {
    /// The text that was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// The regular expression the CRD schema uses for the same syntax.
pub const DURATION_PATTERN: &str = "^([0-9]{1,9}(ms|s|m|h|d))+$";

/// Parses a policy duration. Units must appear largest first and at most once each.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let err = |reason| DurationError {
        input: input.to_owned(),
        reason,
    };
    if input.is_empty() {
        return Err(err("empty"));
    }
    let bytes = input.as_bytes();
    let mut i = 0;
    let mut total: u128 = 0;
    let mut last_rank = usize::MAX;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(err("a number must come before each unit"));
        }
        if i - start > 9 {
            return Err(err("number too large"));
        }
        // Digits only, at most 9 of them: always fits.
        let n: u128 = input[start..i].parse().map_err(|_| err("bad number"))?;
        let (unit_ms, rank, len) = match &bytes[i..] {
            [b'm', b's', ..] => (1, 0, 2),
            [b's', ..] => (1_000, 1, 1),
            [b'm', ..] => (60_000, 2, 1),
            [b'h', ..] => (3_600_000, 3, 1),
            [b'd', ..] => (86_400_000, 4, 1),
            [] => return Err(err("missing unit")),
            _ => return Err(err("unknown unit")),
        };
        if rank >= last_rank {
            return Err(err("units must appear once each, largest first"));
        }
        last_rank = rank;
        total += n * unit_ms;
        i += len;
    }
    u64::try_from(total)
        .map(Duration::from_millis)
        .map_err(|_| err("too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_forms() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("24h").unwrap(),
            parse_duration("1d").unwrap()
        );
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
    }

    #[test]
    fn refuses_typos_with_a_reason() {
        for bad in [
            "", "1", "m", "1x", "1.5s", "-1s", "1m1h", "1s1s", " 1s", "1 s", "1us", "1mm",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert_eq!(e.input, bad);
            assert!(e.to_string().contains("invalid duration"), "{e}");
        }
        assert_eq!(
            parse_duration("1m1h").unwrap_err().reason,
            "units must appear once each, largest first"
        );
    }
}
