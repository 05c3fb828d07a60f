//! The checks of a Zuora "stop backfill job" request
//! (`PUT /v1/uno/data-backfill/{propagation/,bookingdate/,}jobs/{jobId}`):
//! the job ID is exactly 32 characters of `[0-9A-Za-z]`, and the body is a
//! JSON object whose `status` is `"Stopping"` (the only value Zuora allows).
//!
//! Pure functions over already-collected bytes; the
//! [`validate`](crate::layers::validate) layer collects and decodes the body.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::error::GatewayError;

/// Length of a Zuora job ID.
pub const JOB_ID_LEN: usize = 32;

/// The only `status` a stop request may carry.
pub const STOPPING: &str = "Stopping";

/// Checks a job ID: exactly 32 characters of `[0-9A-Za-z]`.
pub fn check_job_id(param: &str, id: &str) -> Result<(), GatewayError> {
    if let Some(bad) = id.chars().find(|c| !c.is_ascii_alphanumeric()) {
        return Err(GatewayError::InvalidValue(format!(
            "path parameter `{param}` must contain only letters and digits (0-9, A-Z, a-z); found {}",
            describe_char(bad)
        )));
    }
    if id.len() != JOB_ID_LEN {
        return Err(GatewayError::InvalidValue(format!(
            "path parameter `{param}` must be exactly {JOB_ID_LEN} characters long, got {}",
            id.len()
        )));
    }
    Ok(())
}

fn describe_char(c: char) -> String {
    if c.is_ascii_graphic() {
        format!("`{c}`")
    } else {
        format!("U+{:04X}", c as u32)
    }
}

/// Checks a (decoded) stop-request body.
///
/// - not JSON at all → `MalformedJson` (category 90)
/// - empty, or an object without `status` → `MissingField` (22)
/// - not an object, `status` not the string `"Stopping"`, or `status`
///   given twice → `InvalidValue` (20)
pub fn check_stop_body(body: &[u8]) -> Result<(), GatewayError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(GatewayError::MissingField(
            "the request body is empty; it must be {\"status\":\"Stopping\"}".to_owned(),
        ));
    }
    // A full parse first: the shape check below skips the other fields with
    // `IgnoredAny`, which does not check their UTF-8 or escapes, and Zuora
    // must only ever get JSON (found by the `stop_job` fuzz target).
    if let Err(e) = serde_json::from_slice::<Value>(body) {
        return Err(malformed(&e));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let shape = match (&mut de).deserialize_any(ShapeVisitor) {
        Ok(shape) => shape,
        Err(e) => return Err(malformed(&e)),
    };
    if let Err(e) = de.end() {
        return Err(malformed(&e));
    }
    match shape {
        Shape::NotObject(kind) => Err(GatewayError::InvalidValue(format!(
            "the request body must be a JSON object like {{\"status\":\"Stopping\"}}, got {kind}"
        ))),
        Shape::Object { status_count: 0, .. } => Err(GatewayError::MissingField(
            "the request body is missing the required field `status` (its only allowed value is \"Stopping\")"
                .to_owned(),
        )),
        Shape::Object { status_count: 2.., .. } => Err(GatewayError::InvalidValue(
            "the field `status` appears more than once in the request body".to_owned(),
        )),
        Shape::Object { status: Some(Value::String(s)), .. } if s == STOPPING => Ok(()),
        Shape::Object { status: Some(Value::String(s)), .. } => Err(GatewayError::InvalidValue(format!(
            "`status` must be \"Stopping\" (the only allowed value), got \"{}\"",
            sanitize(&s, 64)
        ))),
        Shape::Object { status, .. } => Err(GatewayError::InvalidValue(format!(
            "`status` must be the string \"Stopping\", got {}",
            kind_of(status.as_ref())
        ))),
    }
}

fn malformed(e: &serde_json::Error) -> GatewayError {
    // serde_json's messages name the problem and position, never the content.
    GatewayError::MalformedJson(format!("the request body is not valid JSON: {e}"))
}

fn kind_of(v: Option<&Value>) -> &'static str {
    match v {
        None | Some(Value::Null) => "null",
        Some(Value::Bool(_)) => "a boolean",
        Some(Value::Number(_)) => "a number",
        Some(Value::String(_)) => "a string",
        Some(Value::Array(_)) => "an array",
        Some(Value::Object(_)) => "an object",
    }
}

/// Printable ASCII only, at most `max` characters (for quoting caller input in messages).
fn sanitize(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .filter(|c| *c != '"' && *c != '\\')
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

enum Shape {
    NotObject(&'static str),
    Object {
        status: Option<Value>,
        status_count: u32,
    },
}

struct ShapeVisitor;

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = Shape;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Shape, E> {
        Ok(Shape::NotObject("a boolean"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Shape, E> {
        Ok(Shape::NotObject("a number"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Shape, E> {
        Ok(Shape::NotObject("a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Shape, E> {
        Ok(Shape::NotObject("a number"))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Shape, E> {
        Ok(Shape::NotObject("a string"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Shape, E> {
        Ok(Shape::NotObject("null"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        // Consume the array so that syntax errors inside it are still reported as such.
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Shape::NotObject("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        let mut status = None;
        let mut status_count = 0u32;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "status" {
                status_count = status_count.saturating_add(1);
                status = Some(map.next_value::<Value>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Shape::Object {
            status,
            status_count,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn category(e: &GatewayError) -> String {
        e.code()[6..].to_owned()
    }

    #[test]
    fn a_32_character_alphanumeric_job_id_is_accepted() {
        check_job_id("jobId", "ff8080818bb300af018bb325fe0c58f3").unwrap();
        check_job_id("jobId", "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345").unwrap();
    }

    #[test]
    fn malformed_job_ids_are_invalid_values_that_say_why() {
        for (id, says) in [
            ("", "exactly 32 characters long, got 0"),
            ("ff8080818bb300af018bb325fe0c58f", "got 31"),
            ("ff8080818bb300af018bb325fe0c58f30", "got 33"),
            ("ff8080818bb300af-18bb325fe0c58f3", "found `-`"),
            ("ff8080818bb300af_18bb325fe0c58f3", "found `_`"),
            ("ff8080818bb300af%18bb325fe0c58f3", "found `%`"),
            ("ff8080818bb300aé018bb325fe0c58f3", "found U+00E9"),
        ] {
            let e = check_job_id("jobId", id).unwrap_err();
            assert_eq!(category(&e), "20", "{id}");
            assert!(e.to_string().contains(says), "{id}: {e}");
            assert!(e.to_string().contains("`jobId`"), "{e}");
        }
    }

    #[test]
    fn only_status_stopping_is_accepted() {
        check_stop_body(br#"{"status":"Stopping"}"#).unwrap();
        check_stop_body(b" \n{ \"status\" : \"Stopping\" }\n").unwrap();
        check_stop_body(br#"{"status":"Stopping","comment":{"a":[1,2]}}"#).unwrap();
    }

    #[test]
    fn each_bad_body_gets_its_documented_category() {
        let cases: &[(&[u8], &str, &str)] = &[
            (b"", "22", "empty"),
            (b"   ", "22", "empty"),
            (b"{}", "22", "missing the required field `status`"),
            (br#"{"Status":"Stopping"}"#, "22", "missing"),
            (br#"{"status":"Running"}"#, "20", "got \"Running\""),
            (br#"{"status":"stopping"}"#, "20", "got \"stopping\""),
            (br#"{"status":null}"#, "20", "got null"),
            (br#"{"status":1}"#, "20", "got a number"),
            (br#"{"status":["Stopping"]}"#, "20", "got an array"),
            (
                br#"{"status":"Stopping","status":"Running"}"#,
                "20",
                "more than once",
            ),
            (br#"["Stopping"]"#, "20", "got an array"),
            (br#""Stopping""#, "20", "got a string"),
            (b"null", "20", "got null"),
            (b"42", "20", "got a number"),
            (b"{", "90", "not valid JSON"),
            (br#"{"status":"Stopping",}"#, "90", "not valid JSON"),
            (br#"{"status":"Stopping"} x"#, "90", "not valid JSON"),
            (br#"{"status":"Stopping"}{}"#, "90", "not valid JSON"),
            (br#"[1,}"#, "90", "not valid JSON"),
            (b"status=Stopping", "90", "not valid JSON"),
            (b"\xff\xfe", "90", "not valid JSON"),
        ];
        for (body, cat, says) in cases {
            let e = check_stop_body(body).unwrap_err();
            let text = String::from_utf8_lossy(body);
            assert_eq!(category(&e), *cat, "{text}: {e}");
            assert!(e.to_string().contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn quoted_caller_values_are_sanitized_and_bounded() {
        let long = format!(r#"{{"status":"{}\n\"x"}}"#, "a".repeat(100));
        let e = check_stop_body(long.as_bytes()).unwrap_err().to_string();
        assert!(e.len() < 200, "{e}");
        assert!(!e.contains('\n'));
    }
}
