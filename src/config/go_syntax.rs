//! Values written the way Go's standard library reads them, so that an
//! environment written for envoyproxy/ratelimit (which reads its settings
//! with `strconv` and `time`) means the same here: [`parse_bool`] is
//! `strconv.ParseBool`, [`parse_int`] is `strconv.ParseInt(s, 0, bits)`
//! (what its settings library uses for integers: base prefixes and `_`
//! separators allowed) and [`parse_duration`] is `time.ParseDuration`.
//! Pure functions of their text; each error says what Go would have said.

/// `strconv.ParseBool`: exactly `1 t T TRUE true True` and
/// `0 f F FALSE false False`.
///
/// # Errors
///
/// Any other text, including the empty string and surrounding spaces.
pub fn parse_bool(text: &str) -> Result<bool, String> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!(
            "'{text}' is not a boolean (Go's strconv.ParseBool: true, false, 1, 0, t, f, TRUE, FALSE, True, False)"
        )),
    }
}

/// `strconv.ParseInt(text, 0, bits)`: an optional sign, then decimal, `0x`
/// hexadecimal, `0o` or leading-`0` octal, or `0b` binary digits, with `_`
/// allowed between digits; the value must fit in a signed `bits`-bit integer.
///
/// # Errors
///
/// Text that is not such an integer, or a value out of range.
pub fn parse_int(text: &str, bits: u32) -> Result<i64, String> {
    let invalid = || format!("'{text}' is not an integer");
    let (negative, unsigned) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let lower = unsigned.to_ascii_lowercase();
    let (radix, digits) = if let Some(rest) = lower.strip_prefix("0x") {
        (16, rest)
    } else if let Some(rest) = lower.strip_prefix("0o") {
        (8, rest)
    } else if let Some(rest) = lower.strip_prefix("0b") {
        (2, rest)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, &lower[1..])
    } else {
        (10, lower.as_str())
    };
    if digits.is_empty() || !underscores_ok(unsigned) {
        return Err(invalid());
    }
    let mut magnitude: u128 = 0;
    let mut any = false;
    for c in digits.chars() {
        if c == '_' {
            continue;
        }
        let digit = c.to_digit(radix).ok_or_else(invalid)?;
        any = true;
        magnitude = magnitude
            .checked_mul(u128::from(radix))
            .and_then(|m| m.checked_add(u128::from(digit)))
            .ok_or_else(|| out_of_range(text, bits))?;
    }
    if !any {
        return Err(invalid());
    }
    let limit = 1u128 << (bits - 1);
    let value = if negative {
        if magnitude > limit {
            return Err(out_of_range(text, bits));
        }
        -(i128::try_from(magnitude).map_err(|_| out_of_range(text, bits))?)
    } else {
        if magnitude >= limit {
            return Err(out_of_range(text, bits));
        }
        i128::try_from(magnitude).map_err(|_| out_of_range(text, bits))?
    };
    i64::try_from(value).map_err(|_| out_of_range(text, bits))
}

fn out_of_range(text: &str, bits: u32) -> String {
    format!("'{text}' is out of range for a {bits}-bit integer")
}

/// Go's rule for `_` in a number: only between digits, or between a base
/// prefix and a digit (the sign is not part of it).
fn underscores_ok(unsigned: &str) -> bool {
    let bytes = unsigned.as_bytes();
    let mut i = 0;
    // What came last: start, digit (or base prefix), underscore, other.
    #[derive(PartialEq)]
    enum Saw {
        Start,
        Digit,
        Underscore,
        Other,
    }
    let mut saw = Saw::Start;
    let mut hex = false;
    if bytes.len() >= 2 && bytes[0] == b'0' && matches!(bytes[1] | 0x20, b'b' | b'o' | b'x') {
        i = 2;
        saw = Saw::Digit;
        hex = bytes[1] | 0x20 == b'x';
    }
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_digit() || (hex && (c | 0x20).is_ascii_hexdigit()) {
            saw = Saw::Digit;
        } else if c == b'_' {
            if saw != Saw::Digit {
                return false;
            }
            saw = Saw::Underscore;
        } else {
            if saw == Saw::Underscore {
                return false;
            }
            saw = Saw::Other;
        }
        i += 1;
    }
    saw != Saw::Underscore
}

/// `time.ParseDuration`: an optional sign, then one or more decimal numbers
/// (fractions allowed), each with a unit — `ns`, `us` (or `µs`, `μs`), `ms`,
/// `s`, `m`, `h` — such as `300ms`, `-1.5h` or `2h45m`; `0` alone needs no
/// unit. Returns nanoseconds, as Go's `Duration` (an `i64`).
///
/// # Errors
///
/// Text that is not a duration, a missing or unknown unit, or a value
/// beyond Go's range (about 292 years).
pub fn parse_duration(text: &str) -> Result<i64, String> {
    let invalid =
        || format!("'{text}' is not a duration (Go's time.ParseDuration, e.g. 300ms, 10s, 1m30s)");
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    const LIMIT: u64 = 1 << 63;
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let first = rest.as_bytes()[0];
        if !(first == b'.' || first.is_ascii_digit()) {
            return Err(invalid());
        }
        // The integer part.
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let mut whole: u64 = 0;
        for b in rest[..int_len].bytes() {
            whole = whole
                .checked_mul(10)
                .and_then(|w| w.checked_add(u64::from(b - b'0')))
                .filter(|w| *w <= LIMIT)
                .ok_or_else(invalid)?;
        }
        rest = &rest[int_len..];
        // The fraction: digits past what a u64 holds only refine nothing.
        let mut fraction: u64 = 0;
        let mut scale: f64 = 1.0;
        let mut fraction_len = 0;
        if let Some(after_dot) = rest.strip_prefix('.') {
            fraction_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
            let mut overflow = false;
            for b in after_dot[..fraction_len].bytes() {
                if overflow {
                    continue;
                }
                match fraction
                    .checked_mul(10)
                    .and_then(|f| f.checked_add(u64::from(b - b'0')))
                    .filter(|f| *f <= LIMIT)
                {
                    Some(f) => {
                        fraction = f;
                        scale *= 10.0;
                    }
                    None => overflow = true,
                }
            }
            rest = &after_dot[fraction_len..];
        }
        if int_len == 0 && fraction_len == 0 {
            return Err(invalid());
        }
        // The unit: everything up to the next number.
        let unit_len = rest
            .bytes()
            .take_while(|b| !(*b == b'.' || b.is_ascii_digit()))
            .count();
        if unit_len == 0 {
            return Err(format!("missing unit in duration '{text}'"));
        }
        let unit_text = &rest[..unit_len];
        rest = &rest[unit_len..];
        let unit: u64 = match unit_text {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            other => {
                return Err(format!(
                    "unknown unit '{other}' in duration '{text}' (units: ns, us, ms, s, m, h)"
                ));
            }
        };
        if whole > LIMIT / unit {
            return Err(invalid());
        }
        let mut value = whole * unit;
        if fraction > 0 {
            // As Go: the fraction in floating point, nanosecond-accurate up
            // to hours.
            value += (fraction as f64 * (unit as f64 / scale)) as u64;
            if value > LIMIT {
                return Err(invalid());
            }
        }
        total = total
            .checked_add(value)
            .filter(|t| *t <= LIMIT)
            .ok_or_else(invalid)?;
    }
    if negative {
        // -2^63 is representable.
        Ok((total as i128).wrapping_neg() as i64)
    } else if total > LIMIT - 1 {
        Err(invalid())
    } else {
        Ok(total as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_are_exactly_gos() {
        for text in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_bool(text), Ok(true), "{text}");
        }
        for text in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_bool(text), Ok(false), "{text}");
        }
        for text in [
            "", "yes", "no", "on", "off", "tRUE", "True ", " 1", "2", "y",
        ] {
            let error = parse_bool(text).unwrap_err();
            assert!(error.contains("not a boolean"), "{text}: {error}");
        }
    }

    #[test]
    fn integers_take_gos_base_prefixes_and_separators() {
        let cases: &[(&str, i64)] = &[
            ("0", 0),
            ("8080", 8080),
            ("+8080", 8080),
            ("-5", -5),
            ("0x1F90", 8080),
            ("0X1f90", 8080),
            ("0o17620", 8080),
            ("017620", 8080),
            ("0b11", 3),
            ("1_000", 1000),
            ("0x_1F", 31),
            ("9223372036854775807", i64::MAX),
            ("-9223372036854775808", i64::MIN),
        ];
        for (text, value) in cases {
            assert_eq!(parse_int(text, 64), Ok(*value), "{text}");
        }
        for text in [
            "", " 1", "1 ", "1.5", "1e3", "_1", "1_", "1__0", "0x", "08", "abc", "--1", "+",
        ] {
            assert!(parse_int(text, 64).is_err(), "{text}");
        }
        let error = parse_int("9223372036854775808", 64).unwrap_err();
        assert!(error.contains("out of range"), "{error}");
        assert_eq!(parse_int("2147483647", 32), Ok(i64::from(i32::MAX)));
        assert!(
            parse_int("2147483648", 32)
                .unwrap_err()
                .contains("out of range")
        );
    }

    #[test]
    fn durations_are_gos() {
        const S: i64 = 1_000_000_000;
        let cases: &[(&str, i64)] = &[
            ("0", 0),
            ("-0", 0),
            ("+0", 0),
            ("10s", 10 * S),
            ("300ms", 300_000_000),
            ("1.5h", 5_400 * S),
            ("2h45m", 9_900 * S),
            ("1m30.5s", 90 * S + 500_000_000),
            (".5s", 500_000_000),
            ("1.s", S),
            ("-1.5s", -1_500_000_000),
            ("1us", 1_000),
            ("1\u{b5}s", 1_000),
            ("1\u{3bc}s", 1_000),
            ("15ns", 15),
            ("0s", 0),
            ("24h", 86_400 * S),
            ("9223372036854775807ns", i64::MAX),
            ("-9223372036854775808ns", i64::MIN),
        ];
        for (text, nanos) in cases {
            assert_eq!(parse_duration(text), Ok(*nanos), "{text}");
        }
        for text in [
            "",
            "1",
            "10",
            "s",
            ".s",
            "1d",
            "1sec",
            "1 s",
            " 1s",
            "-",
            "1s2",
            "9223372036854775808ns",
            "3000000h",
        ] {
            assert!(parse_duration(text).is_err(), "{text}");
        }
        assert!(parse_duration("10").unwrap_err().contains("missing unit"));
        assert!(
            parse_duration("1d")
                .unwrap_err()
                .contains("unknown unit 'd'")
        );
    }
}
