//! Cron expressions: five fields (minute hour day-of-month month
//! day-of-week) or six with seconds first, evaluated in a time zone.

use jiff::Timestamp;
use jiff::tz::TimeZone;

/// A parsed cron expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    seconds: u64,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    /// Day-of-month or day-of-week restricted (classic cron: either matches).
    dom_star: bool,
    dow_star: bool,
    has_seconds: bool,
}

/// A cron expression or time zone that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error(
        "invalid cron expression {expr:?}: {why}; write five fields (minute hour day month weekday, for example \"*/5 * * * *\") or six with seconds first"
    )]
    Expr { expr: String, why: String },
    #[error("unknown time zone {0:?}; give an IANA name such as Europe/Berlin or UTC")]
    Zone(String),
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

fn field(spec: &str, min: u32, max: u32, names: &[&str], name_base: u32) -> Result<u64, String> {
    let mut bits = 0u64;
    for part in spec.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<u32>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("bad step {s:?}"))?,
            ),
            None => (part, 1),
        };
        let value = |v: &str| -> Result<u32, String> {
            let lower = v.to_ascii_lowercase();
            if let Some(i) = names.iter().position(|n| *n == lower) {
                return Ok(i as u32 + name_base);
            }
            v.parse::<u32>()
                .map_err(|_| format!("{v:?} is not a number"))
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else {
            let v = value(range)?;
            (v, if part.contains('/') { max } else { v })
        };
        // Sunday may be written 7.
        let hi = if max == 6 && hi == 7 { 7 } else { hi };
        if lo < min || hi > max.max(if max == 6 { 7 } else { max }) || lo > hi {
            return Err(format!("{part:?} is outside {min}-{max}"));
        }
        let mut v = lo;
        while v <= hi {
            bits |= 1 << (if max == 6 { v % 7 } else { v });
            v += step;
        }
    }
    Ok(bits)
}

impl Cron {
    /// Parses five or six fields.
    pub fn parse(expr: &str) -> Result<Self, CronError> {
        let err = |why: String| CronError::Expr {
            expr: expr.to_string(),
            why,
        };
        let parts: Vec<&str> = expr.split_whitespace().collect();
        let (sec, rest) = match parts.len() {
            5 => ("0", &parts[..]),
            6 => (parts[0], &parts[1..]),
            n => return Err(err(format!("it has {n} fields"))),
        };
        Ok(Self {
            seconds: field(sec, 0, 59, &[], 0).map_err(err)?,
            minutes: field(rest[0], 0, 59, &[], 0).map_err(err)?,
            hours: field(rest[1], 0, 23, &[], 0).map_err(err)?,
            days: field(rest[2], 1, 31, &[], 0).map_err(err)?,
            months: field(rest[3], 1, 12, &MONTHS, 1).map_err(err)?,
            weekdays: field(rest[4], 0, 6, &DAYS, 0).map_err(err)?,
            dom_star: rest[2] == "*",
            dow_star: rest[4] == "*",
            has_seconds: parts.len() == 6,
        })
    }

    fn day_matches(&self, day: u32, weekday: u32) -> bool {
        let dom = self.days & (1 << day) != 0;
        let dow = self.weekdays & (1 << weekday) != 0;
        match (self.dom_star, self.dow_star) {
            (true, true) => true,
            (false, true) => dom,
            (true, false) => dow,
            (false, false) => dom || dow,
        }
    }

    /// The first firing strictly after `after`, in `tz` (None within ~4 years).
    pub fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        // Walk minute by minute in absolute time (DST-safe: each instant is
        // checked against its local wall-clock time), then seconds within a
        // matching minute.
        let start = after.as_second() + 1;
        let mut minute_start = start - start.rem_euclid(60);
        let limit = minute_start + 4 * 366 * 86_400;
        while minute_start < limit {
            let ts = Timestamp::from_second(minute_start).ok()?;
            let dt = ts.to_zoned(tz.clone());
            let (mo, d, h, mi) = (
                dt.month() as u32,
                dt.day() as u32,
                dt.hour() as u32,
                dt.minute() as u32,
            );
            let wd = dt.weekday().to_sunday_zero_offset() as u32;
            if self.months & (1 << mo) == 0 || !self.day_matches(d, wd) {
                minute_start += 60;
                continue;
            }
            if self.hours & (1 << h) != 0 && self.minutes & (1 << mi) != 0 {
                // Local seconds follow absolute seconds within a minute.
                let sec_offset = dt.second() as i64;
                for s in 0..60i64 {
                    let local_s = (sec_offset + s) % 60;
                    let at = minute_start + s;
                    if at >= start && self.seconds & (1 << local_s) != 0 {
                        return Timestamp::from_second(at).ok();
                    }
                }
            }
            minute_start += 60;
        }
        None
    }

    /// Was it written with a seconds field?
    pub fn has_seconds(&self) -> bool {
        self.has_seconds
    }
}

/// Looks up an IANA time zone (bundled database; `UTC` by default).
pub fn zone(name: Option<&str>) -> Result<TimeZone, CronError> {
    match name {
        None | Some("UTC") | Some("utc") => Ok(TimeZone::UTC),
        Some(n) => TimeZone::get(n).map_err(|_| CronError::Zone(n.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn five_and_six_fields() {
        let utc = zone(None).unwrap();
        let c = Cron::parse("*/5 * * * *").unwrap();
        assert_eq!(
            c.next_after(ts("2026-11-26T10:02:30Z"), &utc),
            Some(ts("2026-11-26T10:05:00Z"))
        );
        let every_second = Cron::parse("* * * * * *").unwrap();
        assert_eq!(
            every_second.next_after(ts("2026-11-26T10:02:30Z"), &utc),
            Some(ts("2026-11-26T10:02:31Z"))
        );
        let weekly = Cron::parse("30 9 * * mon").unwrap();
        // 2026-11-26 is a Thursday: next Monday is 11-30.
        assert_eq!(
            weekly.next_after(ts("2026-11-26T10:00:00Z"), &utc),
            Some(ts("2026-11-30T09:30:00Z"))
        );
        assert!(Cron::parse("* * *").is_err());
        assert!(Cron::parse("61 * * * *").is_err());
        assert!(Cron::parse("*/0 * * * *").is_err());
        assert!(Cron::parse("0 0 1 jan-mar sun,7").is_ok());
    }

    #[test]
    fn time_zones() {
        let berlin = zone(Some("Europe/Berlin")).unwrap();
        let daily = Cron::parse("0 9 * * *").unwrap();
        // 09:00 in Berlin in winter is 08:00 UTC.
        assert_eq!(
            daily.next_after(ts("2026-11-26T10:00:00Z"), &berlin),
            Some(ts("2026-11-27T08:00:00Z"))
        );
        assert!(zone(Some("Mars/Olympus")).is_err());
    }
}
