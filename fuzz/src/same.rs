//! Whether two decoded values are the same, allowing for floats.
//!
//! serde_json (without its `float_roundtrip` feature, which Tern does not enable) may
//! parse a decimal to a float one unit in the last place away from the nearest, so a
//! JSON number that goes out and comes back can differ in its last bit. Everything
//! else must match exactly.

use serde::Serialize;
use serde_json::Value;

/// Most relative difference two floats may have and still count as the same number.
const FLOAT_RELATIVE_ERROR_MAX: f64 = 1e-14;

/// Whether `a` and `b` are equal, or serialize to JSON values equal up to float error.
pub fn same<T: PartialEq + Serialize>(a: &T, b: &T) -> bool {
    a == b
        || match (serde_json::to_value(a), serde_json::to_value(b)) {
            (Ok(a), Ok(b)) => same_json(&a, &b),
            _ => false,
        }
}

/// Structural equality of JSON values with floats compared up to rounding.
pub fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => close(x, y),
                _ => false,
            }
        }
        (Value::Array(xs), Value::Array(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(xs), Value::Object(ys)) => {
            xs.len() == ys.len()
                && xs
                    .iter()
                    .all(|(key, x)| ys.get(key).is_some_and(|y| same_json(x, y)))
        }
        _ => a == b,
    }
}

fn close(x: f64, y: f64) -> bool {
    x == y || (x - y).abs() <= FLOAT_RELATIVE_ERROR_MAX * x.abs().max(y.abs())
}
