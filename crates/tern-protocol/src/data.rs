//! `Data`: a message payload.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

/// The `data` of a Message or PresenceMessage, relayed opaquely alongside its `encoding`.
///
/// What arrives decides the variant: a string is [`Data::String`], msgpack `bin` is
/// [`Data::Binary`], and any other value (object, array, number, bool) is [`Data::Json`].
/// So a decoded `Json` never holds a string, and never null (null data is `None`).
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// A string: plain text, or text that `encoding` says how to decode (json, base64, cipher).
    String(String),
    /// Raw bytes; msgpack only. In JSON they travel as base64 (see [`crate::Message`]).
    Binary(Bytes),
    /// Any other JSON value. SDKs stringify objects themselves, so this is rare.
    Json(Value),
}

impl Serialize for Data {
    /// A string as a string, bytes as msgpack `bin`, a JSON value as itself. Human-readable
    /// formats (JSON) have no bytes type, so there bytes become a standard base64 string; the
    /// containing message appends `base64` to its encoding to match.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Data::String(text) => serializer.serialize_str(text),
            Data::Binary(bytes) if serializer.is_human_readable() => {
                serializer.serialize_str(&STANDARD.encode(bytes))
            }
            Data::Binary(bytes) => serializer.serialize_bytes(bytes),
            Data::Json(value) => value.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DataVisitor)
    }
}

struct DataVisitor;

impl<'de> Visitor<'de> for DataVisitor {
    type Value = Data;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string, binary, or JSON value")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Data, E> {
        Ok(Data::String(value.to_owned()))
    }

    fn visit_string<E: de::Error>(self, value: String) -> Result<Data, E> {
        Ok(Data::String(value))
    }

    fn visit_bytes<E: de::Error>(self, value: &[u8]) -> Result<Data, E> {
        Ok(Data::Binary(Bytes::copy_from_slice(value)))
    }

    fn visit_byte_buf<E: de::Error>(self, value: Vec<u8>) -> Result<Data, E> {
        Ok(Data::Binary(Bytes::from(value)))
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<Data, E> {
        Ok(Data::Json(Value::Bool(value)))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Data, E> {
        Ok(Data::Json(Value::from(value)))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Data, E> {
        Ok(Data::Json(Value::from(value)))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Data, E> {
        // NaN and infinities have no JSON form; serde_json's own Value makes them null.
        Ok(Data::Json(
            serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number),
        ))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Data, E> {
        Ok(Data::Json(Value::Null))
    }

    fn visit_none<E: de::Error>(self) -> Result<Data, E> {
        Ok(Data::Json(Value::Null))
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Data, D::Error> {
        Data::deserialize(deserializer)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Data, A::Error> {
        Value::deserialize(MapAccessDeserializer::new(map)).map(Data::Json)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Data, A::Error> {
        Value::deserialize(SeqAccessDeserializer::new(seq)).map(Data::Json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Each JSON value lands in the variant the wire type implies.
    #[test]
    fn json_variants() {
        let decode = |text: &str| serde_json::from_str::<Data>(text).unwrap();
        assert_eq!(decode(r#""hi""#), Data::String("hi".into()));
        assert_eq!(
            decode(r#"{"a":[1,true]}"#),
            Data::Json(json!({"a":[1,true]}))
        );
        assert_eq!(decode("[1,2]"), Data::Json(json!([1, 2])));
        assert_eq!(decode("-7"), Data::Json(json!(-7)));
        assert_eq!(decode("false"), Data::Json(json!(false)));
    }

    /// msgpack bin and str decode to Binary and String, and each encodes back to its own type.
    #[test]
    fn msgpack_variants() {
        for data in [
            Data::Binary(Bytes::from_static(&[0, 159, 255])),
            Data::String("héllo".into()),
            Data::Json(json!({"k": [1, -2, "x"]})),
        ] {
            let bytes = rmp_serde::to_vec_named(&data).unwrap();
            assert_eq!(rmp_serde::from_slice::<Data>(&bytes).unwrap(), data);
        }
        // 0xc4 = bin8.
        assert_eq!(
            rmp_serde::to_vec_named(&Data::Binary(Bytes::from_static(b"a"))).unwrap(),
            [0xc4, 1, b'a']
        );
    }

    /// In JSON, binary data is written as standard padded base64.
    #[test]
    fn binary_as_json_is_base64() {
        let text = serde_json::to_string(&Data::Binary(Bytes::from_static(b"hi!?"))).unwrap();
        assert_eq!(text, r#""aGkhPw==""#);
    }
}
