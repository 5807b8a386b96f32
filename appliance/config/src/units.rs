//! Human units in the config file: sizes ("50 GiB") and durations ("90s").

use std::time::Duration;

/// Splits `"50 GiB"` into `(50.0, "GiB")`.
fn number_and_unit(value: &str) -> Option<(f64, &str)> {
    let v = value.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    Some((num.parse().ok()?, unit.trim()))
}

/// Parses a size such as `"50 GiB"`, `"500 MB"`, `"4096"` (bytes) into bytes.
pub fn parse_bytes(value: &str) -> Option<u64> {
    let (num, unit) = number_and_unit(value)?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "MB" => 1000 * 1000,
        "GB" => 1000 * 1000 * 1000,
        "TB" => 1000 * 1000 * 1000 * 1000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    let bytes = num * mult as f64;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// Formats bytes the way operators read them (binary units, one decimal).
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Parses a duration such as `"250ms"`, `"30s"`, `"5m"`, `"2h"`, `"7d"`.
pub fn parse_duration(value: &str) -> Option<Duration> {
    let (num, unit) = number_and_unit(value)?;
    let secs = match unit {
        "ms" => num / 1000.0,
        "s" => num,
        "m" | "min" => num * 60.0,
        "h" => num * 3600.0,
        "d" | "day" | "days" => num * 86400.0,
        "w" | "week" | "weeks" => num * 7.0 * 86400.0,
        // A year of 365.25 days: for ages of studies, not for timers.
        "y" | "year" | "years" => num * 365.25 * 86400.0,
        _ => return None,
    };
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}
