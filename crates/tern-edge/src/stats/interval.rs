//! Statistics intervals in UTC: units, interval ids (`2025-02-03:15:04`), and the
//! `start`/`end` query params (ms since the epoch or an interval id). Pure: no clock.

/// Milliseconds in a minute, hour and day.
const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;
/// Latest instant handled: the end of year 9999 (interval ids have four-digit years).
pub(crate) const TIME_MAX_MS: i64 = 253_402_300_799_999;

/// The length of the intervals statistics are read in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unit {
    Minute,
    Hour,
    Day,
    Month,
}

impl Unit {
    /// The `unit` (or `by`) query param's value.
    pub(crate) fn parse(name: &str) -> Option<Unit> {
        match name {
            "minute" => Some(Unit::Minute),
            "hour" => Some(Unit::Hour),
            "day" => Some(Unit::Day),
            "month" => Some(Unit::Month),
            _ => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Month => "month",
        }
    }

    /// The start of the interval holding `ms` (`ms` in `0..=TIME_MAX_MS`).
    pub(crate) fn floor(self, ms: i64) -> i64 {
        match self {
            Unit::Minute => ms - ms.rem_euclid(MINUTE_MS),
            Unit::Hour => ms - ms.rem_euclid(HOUR_MS),
            Unit::Day => ms - ms.rem_euclid(DAY_MS),
            Unit::Month => {
                let (year, month, _) = civil_from_days(ms.div_euclid(DAY_MS));
                days_from_civil(year, month, 1) * DAY_MS
            }
        }
    }

    /// The start of the interval after the one starting at `start`.
    pub(crate) fn next(self, start: i64) -> i64 {
        match self {
            Unit::Minute => start + MINUTE_MS,
            Unit::Hour => start + HOUR_MS,
            Unit::Day => start + DAY_MS,
            Unit::Month => {
                let (year, month, _) = civil_from_days(start.div_euclid(DAY_MS));
                let (year, month) = if month == 12 {
                    (year + 1, 1)
                } else {
                    (year, month + 1)
                };
                days_from_civil(year, month, 1) * DAY_MS
            }
        }
    }

    /// The interval id of the interval starting at `start`, as Ably writes it (TS12a):
    /// `yyyy-mm-dd:hh:mm` for a minute, `yyyy-mm-dd:hh` for an hour, `yyyy-mm-dd:00` for
    /// a day and `yyyy-mm-01:00` for a month.
    pub(crate) fn id(self, start: i64) -> String {
        let (year, month, day, hour, minute, _) = civil(start);
        match self {
            Unit::Minute => format!("{year:04}-{month:02}-{day:02}:{hour:02}:{minute:02}"),
            Unit::Hour => format!("{year:04}-{month:02}-{day:02}:{hour:02}"),
            Unit::Day => format!("{year:04}-{month:02}-{day:02}:00"),
            Unit::Month => format!("{year:04}-{month:02}-01:00"),
        }
    }
}

/// `ms` as `yyyy-mm-dd:hh:mm:ss` (a statistics entry's `inProgress`).
pub(crate) fn second_id(ms: i64) -> String {
    let (year, month, day, hour, minute, second) = civil(ms);
    format!("{year:04}-{month:02}-{day:02}:{hour:02}:{minute:02}:{second:02}")
}

/// A `start` or `end` param: an instant, or an interval named by its id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TimeParam {
    /// The instant, or the start of the named interval.
    pub(crate) ms: i64,
    /// The named interval's unit; `None` for an instant.
    pub(crate) unit: Option<Unit>,
}

impl TimeParam {
    /// Ms since the epoch (clamped to `0..=TIME_MAX_MS`), or an interval id:
    /// `yyyy-mm-dd:hh:mm`, `yyyy-mm-dd:hh`, `yyyy-mm-dd` or `yyyy-mm`. `None` when it is
    /// neither.
    pub(crate) fn parse(text: &str) -> Option<TimeParam> {
        if let Ok(ms) = text.parse::<i64>() {
            return Some(TimeParam {
                ms: ms.clamp(0, TIME_MAX_MS),
                unit: None,
            });
        }
        let (start, unit) = parse_interval_id(text)?;
        Some(TimeParam {
            ms: start,
            unit: Some(unit),
        })
    }

    /// As the first instant of a range: the instant, or the start of the interval.
    pub(crate) fn first_ms(self) -> i64 {
        self.ms
    }

    /// As the last instant of a range: the instant, or the interval's last millisecond,
    /// so `end=2025-02-03:15:04` includes that whole minute.
    pub(crate) fn last_ms(self) -> i64 {
        match self.unit {
            None => self.ms,
            Some(unit) => unit.next(self.ms) - 1,
        }
    }
}

/// The start and unit of an interval id; `None` unless it is one of the four shapes
/// with a real date and time.
pub(crate) fn parse_interval_id(text: &str) -> Option<(i64, Unit)> {
    let bytes = text.as_bytes();
    let unit = match bytes.len() {
        7 => Unit::Month,
        10 => Unit::Day,
        13 => Unit::Hour,
        16 => Unit::Minute,
        _ => return None,
    };
    // Separators at fixed places: yyyy-mm-dd:hh:mm.
    let separators = [(4, b'-'), (7, b'-'), (10, b':'), (13, b':')];
    if separators
        .iter()
        .any(|&(at, sep)| at < bytes.len() && bytes[at] != sep)
    {
        return None;
    }
    let field = |from: usize, len: usize| -> Option<u32> {
        let digits = text.get(from..from + len)?;
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    };
    let year = field(0, 4)?;
    let month = field(5, 2)?;
    let day = if bytes.len() >= 10 { field(8, 2)? } else { 1 };
    let hour = if bytes.len() >= 13 { field(11, 2)? } else { 0 };
    let minute = if bytes.len() >= 16 { field(14, 2)? } else { 0 };
    let valid = (1..=12).contains(&month)
        && (1..=days_in_month(i64::from(year), month)).contains(&day)
        && hour < 24
        && minute < 60;
    if !valid {
        return None;
    }
    let days = days_from_civil(i64::from(year), month, day);
    let start = days * DAY_MS + i64::from(hour) * HOUR_MS + i64::from(minute) * MINUTE_MS;
    (0..=TIME_MAX_MS).contains(&start).then_some((start, unit))
}

fn days_in_month(year: i64, month: u32) -> u32 {
    let (next_year, next_month) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    (days_from_civil(next_year, next_month, 1) - days_from_civil(year, month, 1)) as u32
}

/// (year, month, day, hour, minute, second) of `ms` in UTC.
fn civil(ms: i64) -> (i64, u32, u32, i64, i64, i64) {
    let (year, month, day) = civil_from_days(ms.div_euclid(DAY_MS));
    let in_day = ms.rem_euclid(DAY_MS);
    (
        year,
        month,
        day,
        in_day / HOUR_MS,
        in_day % HOUR_MS / MINUTE_MS,
        in_day % MINUTE_MS / 1_000,
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (i64::from(month) + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day count since 1970-01-01 (inverse of [`days_from_civil`]).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 2025-02-03 15:04:05.678 UTC.
    const SAMPLE_MS: i64 = 1_738_595_045_678;

    /// Interval ids are Ably's shapes for each unit, in UTC.
    #[test]
    fn ids_per_unit() {
        assert_eq!(
            Unit::Minute.id(Unit::Minute.floor(SAMPLE_MS)),
            "2025-02-03:15:04"
        );
        assert_eq!(Unit::Hour.id(Unit::Hour.floor(SAMPLE_MS)), "2025-02-03:15");
        assert_eq!(Unit::Day.id(Unit::Day.floor(SAMPLE_MS)), "2025-02-03:00");
        assert_eq!(
            Unit::Month.id(Unit::Month.floor(SAMPLE_MS)),
            "2025-02-01:00"
        );
        assert_eq!(second_id(SAMPLE_MS), "2025-02-03:15:04:05");
        assert_eq!(Unit::Minute.id(0), "1970-01-01:00:00");
    }

    /// Months have their real lengths: December rolls into the next year, leap
    /// Februaries have 29 days.
    #[test]
    fn months_roll_over() {
        let (dec, unit) = parse_interval_id("2023-12").unwrap();
        assert_eq!(unit, Unit::Month);
        assert_eq!(Unit::Month.id(Unit::Month.next(dec)), "2024-01-01:00");
        let (feb, _) = parse_interval_id("2024-02").unwrap();
        assert_eq!(Unit::Month.next(feb) - feb, 29 * DAY_MS);
        let (feb, _) = parse_interval_id("2023-02").unwrap();
        assert_eq!(Unit::Month.next(feb) - feb, 28 * DAY_MS);
        assert_eq!(Unit::Month.floor(Unit::Month.next(feb) - 1), feb);
    }

    /// `start`/`end` take ms or any of the four id shapes; an id as `end` includes its
    /// whole interval; anything else is refused.
    #[test]
    fn time_params() {
        let minute = TimeParam::parse("2025-02-03:15:04").unwrap();
        assert_eq!(minute.first_ms(), Unit::Minute.floor(SAMPLE_MS));
        assert_eq!(minute.last_ms(), Unit::Minute.floor(SAMPLE_MS) + 59_999);
        let hour = TimeParam::parse("2025-02-03:15").unwrap();
        assert_eq!(hour.last_ms(), Unit::Hour.floor(SAMPLE_MS) + HOUR_MS - 1);
        assert_eq!(
            TimeParam::parse("2025-02-03").unwrap().first_ms(),
            Unit::Day.floor(SAMPLE_MS)
        );
        assert_eq!(
            TimeParam::parse("1738595045678"),
            Some(TimeParam {
                ms: SAMPLE_MS,
                unit: None
            })
        );
        assert_eq!(TimeParam::parse("-5").unwrap().ms, 0);
        assert_eq!(
            TimeParam::parse("99999999999999999").unwrap().ms,
            TIME_MAX_MS
        );
        // Digits alone are ms, however short.
        assert_eq!(TimeParam::parse("2025").unwrap().ms, 2025);
        for bad in [
            "",
            "2025-13",
            "2025-02-30",
            "2025-02-03:24",
            "2025-02-03:15:60",
            "2025/02/03",
            "2025-02-03T15",
            "+025-02",
            "2025-02-03:15:04:05",
            "２０２５-02",
        ] {
            assert_eq!(TimeParam::parse(bad), None, "{bad}");
        }
    }

    proptest! {
        /// Every instant lies in the interval `floor` gives it, for every unit; the id
        /// of that interval parses back to its start; dates round-trip.
        #[test]
        fn floor_next_and_ids_agree(ms in 0i64..=TIME_MAX_MS) {
            for unit in [Unit::Minute, Unit::Hour, Unit::Day, Unit::Month] {
                let start = unit.floor(ms);
                prop_assert!(start <= ms && ms < unit.next(start));
                prop_assert_eq!(unit.floor(start), start);
                let (parsed, _) = parse_interval_id(&unit.id(start)).unwrap();
                prop_assert_eq!(parsed, start);
            }
            let days = ms.div_euclid(DAY_MS);
            let (y, m, d) = civil_from_days(days);
            prop_assert_eq!(days_from_civil(y, m, d), days);
        }

        /// Parsing never panics on arbitrary text.
        #[test]
        fn parse_never_panics(text in "\\PC{0,20}") {
            let _ = TimeParam::parse(&text);
        }
    }
}
