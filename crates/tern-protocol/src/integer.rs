//! Integers as they arrive on the wire.
//!
//! msgpack senders pick whatever width fits, and @ably/msgpack-js writes any number outside
//! the 32-bit signed range (a millisecond timestamp, for one) as a float64. So every integer
//! field accepts any integer width, and a float with no fractional part, as long as the value
//! fits the field. Anything else, including an out-of-range value, is a decode error.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, Unexpected, Visitor};

/// An integer type a wire field can have.
pub(crate) trait WireInt: TryFrom<u64> + TryFrom<i64> {
    /// The type's name, for error messages.
    const NAME: &'static str;
}

macro_rules! wire_int {
    ($($t:ty),*) => { $(impl WireInt for $t { const NAME: &'static str = stringify!($t); })* };
}
wire_int!(u8, u16, u32, u64, i64);

/// `deserialize_with` for a required integer field.
pub(crate) fn required<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: WireInt,
{
    deserializer.deserialize_any(IntVisitor(PhantomData))
}

/// `deserialize_with` for an optional integer field; `null`/`nil` is `None`.
/// Pair it with `#[serde(default)]` so that a missing field is `None` too.
pub(crate) fn optional<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: WireInt,
{
    deserializer.deserialize_option(OptionVisitor(PhantomData))
}

struct IntVisitor<T>(PhantomData<T>);

impl<T: WireInt> Visitor<'_> for IntVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an integer that fits in {}", T::NAME)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<T, E> {
        T::try_from(value).map_err(|_| E::invalid_value(Unexpected::Unsigned(value), &self))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<T, E> {
        T::try_from(value).map_err(|_| E::invalid_value(Unexpected::Signed(value), &self))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<T, E> {
        // 2^64 and -2^63 are exact in f64; checking the range first keeps `as` from saturating.
        const U64_END: f64 = 18_446_744_073_709_551_616.0;
        const I64_START: f64 = -9_223_372_036_854_775_808.0;
        let integral = value.is_finite() && value.fract() == 0.0;
        if integral && (0.0..U64_END).contains(&value) {
            self.visit_u64(value as u64)
        } else if integral && (I64_START..0.0).contains(&value) {
            self.visit_i64(value as i64)
        } else {
            Err(E::invalid_value(Unexpected::Float(value), &self))
        }
    }
}

struct OptionVisitor<T>(PhantomData<T>);

impl<'de, T: WireInt> Visitor<'de> for OptionVisitor<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "null or an integer that fits in {}", T::NAME)
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Option<T>, D::Error> {
        required(deserializer).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Probe {
        #[serde(deserialize_with = "super::required")]
        small: u8,
        #[serde(default, deserialize_with = "super::optional")]
        big: Option<i64>,
    }

    fn json(text: &str) -> Result<Probe, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Integral floats are accepted, fractional and out-of-range values are errors.
    #[test]
    fn floats_and_ranges() {
        assert_eq!(
            json(r#"{"small":15.0,"big":1.7e12}"#).unwrap(),
            Probe {
                small: 15,
                big: Some(1_700_000_000_000)
            }
        );
        assert_eq!(
            json(r#"{"small":1,"big":null}"#).unwrap(),
            Probe {
                small: 1,
                big: None
            }
        );
        assert_eq!(
            json(r#"{"small":1}"#).unwrap(),
            Probe {
                small: 1,
                big: None
            }
        );
        assert!(json(r#"{"small":256}"#).is_err());
        assert!(json(r#"{"small":-1}"#).is_err());
        assert!(json(r#"{"small":1.5}"#).is_err());
        assert!(json(r#"{"small":1,"big":1e300}"#).is_err());
        assert!(json(r#"{"small":"1"}"#).is_err());
        assert_eq!(
            json(r#"{"small":0,"big":-9223372036854775808}"#)
                .unwrap()
                .big,
            Some(i64::MIN)
        );
    }

    /// A msgpack float64 timestamp (how msgpack-js sends numbers beyond 32 bits) decodes.
    #[test]
    fn msgpack_float_timestamp() {
        #[derive(serde::Serialize)]
        struct Sent {
            small: u16,
            big: f64,
        }
        let bytes = rmp_serde::to_vec_named(&Sent {
            small: 200,
            big: 1_700_000_000_123.0,
        })
        .unwrap();
        let probe: Probe = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(
            probe,
            Probe {
                small: 200,
                big: Some(1_700_000_000_123)
            }
        );
    }
}
