//! The write operations shared by the HTTP API and the Wasm client, and their parsing.
//!
//! Ops arrive as JSON from untrusted clients. They are parsed by hand rather than with a serde
//! derive so that every rejection names the op and field at fault (`ops[3].path[1]: …`) and so
//! that every bound of [`crate::limits`] is checked before anything touches a document.

use std::fmt;

use serde_json::Value as Json;

use crate::limits::{JSON_DEPTH_MAX, KEY_BYTES_MAX, OPS_PER_WRITE_MAX, PATH_DEPTH_MAX};

/// One step of a [`Path`]: a map key or a list index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PathSegment {
    /// A key of a map.
    Key(String),
    /// A position in a list (or in a text, for `splice`).
    Index(usize),
}

/// Where an op applies, from the document root. Non-empty, at most [`PATH_DEPTH_MAX`] long,
/// starting with a key (the root is a map) that is not reserved.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Path(Vec<PathSegment>);

/// Root keys starting with this are Verge's own (tombstone, expiry) and hidden from users.
pub const RESERVED_KEY_PREFIX: &str = "_verge";

impl Path {
    /// Checks a path built in code (the JSON parser goes through the same checks).
    pub fn new(segments: Vec<PathSegment>) -> Result<Self, OpError> {
        if segments.is_empty() {
            return Err(OpError::at("path", "must not be empty"));
        }
        if segments.len() > PATH_DEPTH_MAX {
            return Err(OpError::at(
                "path",
                format!(
                    "has {} elements, more than {PATH_DEPTH_MAX}",
                    segments.len()
                ),
            ));
        }
        match &segments[0] {
            PathSegment::Key(k) if k.starts_with(RESERVED_KEY_PREFIX) => {
                return Err(OpError::at(
                    "path[0]",
                    format!("keys starting with {RESERVED_KEY_PREFIX:?} are reserved"),
                ));
            }
            PathSegment::Key(_) => {}
            PathSegment::Index(_) => {
                return Err(OpError::at(
                    "path[0]",
                    "the root is a map: expected a string key",
                ));
            }
        }
        for (i, seg) in segments.iter().enumerate() {
            if let PathSegment::Key(k) = seg
                && k.len() > KEY_BYTES_MAX
            {
                return Err(OpError::at(
                    format!("path[{i}]"),
                    format!("key is {} bytes, more than {KEY_BYTES_MAX}", k.len()),
                ));
            }
        }
        Ok(Self(segments))
    }

    /// Shorthand for a path of map keys only.
    pub fn keys<S: AsRef<str>>(keys: &[S]) -> Result<Self, OpError> {
        Self::new(
            keys.iter()
                .map(|k| PathSegment::Key(k.as_ref().to_owned()))
                .collect(),
        )
    }

    /// The segments, root first.
    pub fn segments(&self) -> &[PathSegment] {
        &self.0
    }

    /// All segments but the last, and the last.
    pub fn split_last(&self) -> (&[PathSegment], &PathSegment) {
        let (last, parent) = self.0.split_last().expect("a Path is never empty");
        (parent, last)
    }

    fn parse(value: &Json) -> Result<Self, OpError> {
        let Json::Array(items) = value else {
            return Err(OpError::at("path", "expected an array of keys and indexes"));
        };
        if items.len() > PATH_DEPTH_MAX {
            return Err(OpError::at(
                "path",
                format!("has {} elements, more than {PATH_DEPTH_MAX}", items.len()),
            ));
        }
        let mut segments = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let seg = match item {
                Json::String(s) => PathSegment::Key(s.clone()),
                Json::Number(n) => match n.as_u64().and_then(|n| usize::try_from(n).ok()) {
                    Some(n) => PathSegment::Index(n),
                    None => {
                        return Err(OpError::at(
                            format!("path[{i}]"),
                            "a list index must be a non-negative integer",
                        ));
                    }
                },
                _ => {
                    return Err(OpError::at(
                        format!("path[{i}]"),
                        "expected a string key or a list index",
                    ));
                }
            };
            segments.push(seg);
        }
        Self::new(segments)
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, seg) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match seg {
                PathSegment::Key(k) => write!(f, "{}", Json::String(k.clone()))?,
                PathSegment::Index(n) => write!(f, "{n}")?,
            }
        }
        f.write_str("]")
    }
}

/// One write operation. A list of ops forms one change.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Set a map key or replace a list element with a JSON value.
    Set {
        /// Where to write.
        path: Path,
        /// The value; objects and arrays become nested maps and lists.
        value: Json,
    },
    /// Delete a map key (a missing key is no error) or a list element (the index must exist).
    Del {
        /// What to delete.
        path: Path,
    },
    /// Add to a counter, creating it at 0 when the key is missing.
    Inc {
        /// The counter.
        path: Path,
        /// The amount, may be negative.
        by: i64,
    },
    /// Insert into a list before the index that ends the path.
    Insert {
        /// The list followed by the index.
        path: Path,
        /// The value to insert.
        value: Json,
    },
    /// Append to a list, creating it when the key is missing.
    Push {
        /// The list.
        path: Path,
        /// The value to append.
        value: Json,
    },
    /// Edit a text, creating it empty when the key is missing.
    Splice {
        /// The text.
        path: Path,
        /// Where the edit starts, in Unicode scalar values.
        index: usize,
        /// How many characters to delete.
        delete: usize,
        /// What to insert.
        text: String,
    },
}

impl Op {
    /// The path the op addresses.
    pub fn path(&self) -> &Path {
        match self {
            Op::Set { path, .. }
            | Op::Del { path }
            | Op::Inc { path, .. }
            | Op::Insert { path, .. }
            | Op::Push { path, .. }
            | Op::Splice { path, .. } => path,
        }
    }

    /// The op in the JSON shape [`Op::parse`] reads (to keep ops, e.g. a client's log of
    /// writes the node has not acknowledged).
    pub fn to_json(&self) -> Json {
        let path = Json::Array(
            self.path()
                .segments()
                .iter()
                .map(|seg| match seg {
                    PathSegment::Key(k) => Json::from(k.as_str()),
                    PathSegment::Index(n) => Json::from(*n),
                })
                .collect(),
        );
        match self {
            Op::Set { value, .. } => serde_json::json!({"op": "set", "path": path, "value": value}),
            Op::Del { .. } => serde_json::json!({"op": "del", "path": path}),
            Op::Inc { by, .. } => serde_json::json!({"op": "inc", "path": path, "by": by}),
            Op::Insert { value, .. } => {
                serde_json::json!({"op": "insert", "path": path, "value": value})
            }
            Op::Push { value, .. } => {
                serde_json::json!({"op": "push", "path": path, "value": value})
            }
            Op::Splice {
                index,
                delete,
                text,
                ..
            } => serde_json::json!({
                "op": "splice", "path": path, "index": index, "delete": delete, "text": text
            }),
        }
    }

    /// Parses the `ops` array of a `PATCH` body: `{"ops": [...]}`.
    pub fn parse_patch(body: &Json) -> Result<Vec<Op>, OpError> {
        let Json::Object(obj) = body else {
            return Err(OpError::at("body", "expected an object {\"ops\": [...]}"));
        };
        if let Some(key) = obj.keys().find(|k| *k != "ops") {
            return Err(OpError::at("body", format!("unknown field {key:?}")));
        }
        let ops = obj
            .get("ops")
            .ok_or_else(|| OpError::at("body", "missing field \"ops\""))?;
        Self::parse_list(ops)
    }

    /// Parses a JSON array of ops.
    pub fn parse_list(ops: &Json) -> Result<Vec<Op>, OpError> {
        let Json::Array(items) = ops else {
            return Err(OpError::at("ops", "expected an array"));
        };
        if items.len() > OPS_PER_WRITE_MAX {
            return Err(OpError::at(
                "ops",
                format!("has {} ops, more than {OPS_PER_WRITE_MAX}", items.len()),
            ));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, item)| Self::parse(item).map_err(|e| e.within(&format!("ops[{i}]"))))
            .collect()
    }

    /// Parses one op object.
    pub fn parse(item: &Json) -> Result<Op, OpError> {
        let Json::Object(fields) = item else {
            return Err(OpError::at("", "expected an object"));
        };
        let kind = match fields.get("op") {
            Some(Json::String(s)) => s.as_str(),
            Some(_) => return Err(OpError::at("op", "expected a string")),
            None => return Err(OpError::at("", "missing field \"op\"")),
        };
        let allowed: &[&str] = match kind {
            "set" | "insert" | "push" => &["op", "path", "value"],
            "del" => &["op", "path"],
            "inc" => &["op", "path", "by"],
            "splice" => &["op", "path", "index", "delete", "text"],
            other => {
                return Err(OpError::at(
                    "op",
                    format!("unknown op {other:?}; expected set, del, inc, insert, push or splice"),
                ));
            }
        };
        if let Some(key) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(OpError::at(
                "",
                format!("unknown field {key:?} for op {kind:?}"),
            ));
        }
        let path = Path::parse(
            fields
                .get("path")
                .ok_or_else(|| OpError::at("", "missing field \"path\""))?,
        )?;
        let value = || -> Result<Json, OpError> {
            let v = fields
                .get("value")
                .ok_or_else(|| OpError::at("", "missing field \"value\""))?;
            check_depth(v, JSON_DEPTH_MAX).map_err(|e| e.within("value"))?;
            Ok(v.clone())
        };
        let uint = |name: &str, default: usize| -> Result<usize, OpError> {
            match fields.get(name) {
                None => Ok(default),
                Some(Json::Number(n)) => n
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| OpError::at(name, "expected a non-negative integer")),
                Some(_) => Err(OpError::at(name, "expected a non-negative integer")),
            }
        };
        Ok(match kind {
            "set" => Op::Set {
                path,
                value: value()?,
            },
            "insert" => {
                if !matches!(path.split_last().1, PathSegment::Index(_)) {
                    return Err(OpError::at(
                        "path",
                        "insert needs a path ending in a list index",
                    ));
                }
                Op::Insert {
                    path,
                    value: value()?,
                }
            }
            "push" => Op::Push {
                path,
                value: value()?,
            },
            "del" => Op::Del { path },
            "inc" => {
                let by = match fields.get("by") {
                    None => 1,
                    Some(Json::Number(n)) => n
                        .as_i64()
                        .ok_or_else(|| OpError::at("by", "expected a 64-bit integer"))?,
                    Some(_) => return Err(OpError::at("by", "expected an integer")),
                };
                Op::Inc { path, by }
            }
            "splice" => {
                let text = match fields.get("text") {
                    None => String::new(),
                    Some(Json::String(s)) => s.clone(),
                    Some(_) => return Err(OpError::at("text", "expected a string")),
                };
                if !fields.contains_key("index") {
                    return Err(OpError::at("", "missing field \"index\""));
                }
                Op::Splice {
                    path,
                    index: uint("index", 0)?,
                    delete: uint("delete", 0)?,
                    text,
                }
            }
            _ => unreachable!("op kinds were matched above"),
        })
    }
}

/// Fails when `value` nests objects and arrays deeper than `max`.
pub fn check_depth(value: &Json, max: usize) -> Result<(), OpError> {
    fn depth(v: &Json) -> usize {
        match v {
            Json::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            Json::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    let d = depth(value);
    if d > max {
        return Err(OpError::at(
            "",
            format!("nests {d} levels deep, more than {max}"),
        ));
    }
    Ok(())
}

/// A malformed op, with the location of the fault inside the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}{message}", .location, if .location.is_empty() { "" } else { ": " })]
pub struct OpError {
    location: String,
    message: String,
}

impl OpError {
    fn at(location: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            location: location.into(),
            message: message.into(),
        }
    }

    /// Prefixes the location with the enclosing field.
    pub(crate) fn within(mut self, outer: &str) -> Self {
        self.location = match (self.location.is_empty(), self.location.starts_with('[')) {
            (true, _) => outer.to_owned(),
            (false, true) => format!("{outer}{}", self.location),
            (false, false) => format!("{outer}.{}", self.location),
        };
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Json) -> Result<Vec<Op>, String> {
        Op::parse_patch(&v).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_every_op() {
        let ops = parse(json!({"ops": [
            {"op": "set", "path": ["a", 0, "b"], "value": {"x": [1, 2]}},
            {"op": "del", "path": ["a"]},
            {"op": "inc", "path": ["n"]},
            {"op": "inc", "path": ["n"], "by": -3},
            {"op": "insert", "path": ["l", 2], "value": true},
            {"op": "push", "path": ["l"], "value": null},
            {"op": "splice", "path": ["t"], "index": 1, "delete": 2, "text": "hé"},
            {"op": "splice", "path": ["t"], "index": 0},
        ]}))
        .expect("valid ops");
        assert_eq!(ops.len(), 8);
        assert_eq!(
            ops[3],
            Op::Inc {
                path: Path::keys(&["n"]).expect("path"),
                by: -3
            }
        );
        assert_eq!(
            ops[2],
            Op::Inc {
                path: Path::keys(&["n"]).expect("path"),
                by: 1
            }
        );
        assert_eq!(
            ops[7],
            Op::Splice {
                path: Path::keys(&["t"]).expect("path"),
                index: 0,
                delete: 0,
                text: String::new()
            }
        );
        assert_eq!(ops[0].path().to_string(), r#"["a",0,"b"]"#);
    }

    #[test]
    fn rejections_name_the_fault() {
        let cases = [
            (json!([]), "body: expected an object {\"ops\": [...]}"),
            (json!({"ops": [], "x": 1}), "body: unknown field \"x\""),
            (json!({"ops": {}}), "ops: expected an array"),
            (
                json!({"ops": [{"op": "bump", "path": ["a"]}]}),
                "ops[0].op: unknown op \"bump\"",
            ),
            (
                json!({"ops": [{"path": ["a"]}]}),
                "ops[0]: missing field \"op\"",
            ),
            (
                json!({"ops": [{"op": "inc", "path": ["a"], "by": "2"}]}),
                "ops[0].by: expected an integer",
            ),
            (
                json!({"ops": [{"op": "inc", "path": ["a"], "by": 1.5}]}),
                "ops[0].by: expected a 64-bit integer",
            ),
            (
                json!({"ops": [{"op": "set", "path": "a", "value": 1}]}),
                "ops[0].path: expected an array",
            ),
            (
                json!({"ops": [{"op": "set", "path": ["a", true], "value": 1}]}),
                "ops[0].path[1]: expected a string key",
            ),
            (
                json!({"ops": [{"op": "set", "path": ["a", -1], "value": 1}]}),
                "ops[0].path[1]: a list index",
            ),
            (
                json!({"ops": [{"op": "set", "path": [], "value": 1}]}),
                "ops[0].path: must not be empty",
            ),
            (
                json!({"ops": [{"op": "set", "path": [0], "value": 1}]}),
                "ops[0].path[0]: the root is a map",
            ),
            (
                json!({"ops": [{"op": "set", "path": ["_verge_deleted"], "value": 1}]}),
                "ops[0].path[0]: keys starting with",
            ),
            (
                json!({"ops": [{"op": "set", "path": ["a"]}]}),
                "ops[0]: missing field \"value\"",
            ),
            (
                json!({"ops": [{"op": "del", "path": ["a"], "value": 1}]}),
                "ops[0]: unknown field \"value\"",
            ),
            (
                json!({"ops": [{"op": "insert", "path": ["a"], "value": 1}]}),
                "ops[0].path: insert needs",
            ),
            (
                json!({"ops": [{"op": "splice", "path": ["a"]}]}),
                "ops[0]: missing field \"index\"",
            ),
            (
                json!({"ops": [{"op": "splice", "path": ["a"], "index": 0, "text": 3}]}),
                "ops[0].text: expected a string",
            ),
            (json!({"ops": [1]}), "ops[0]: expected an object"),
        ];
        for (body, want) in cases {
            let got = parse(body.clone()).expect_err("must be rejected");
            assert!(
                got.starts_with(want),
                "{body}: got {got:?}, want prefix {want:?}"
            );
        }
    }

    #[test]
    fn limits_are_enforced_at_their_boundary() {
        let op = json!({"op": "del", "path": ["a"]});
        assert!(parse(json!({"ops": vec![op.clone(); OPS_PER_WRITE_MAX]})).is_ok());
        assert!(parse(json!({"ops": vec![op; OPS_PER_WRITE_MAX + 1]})).is_err());

        let deep_path: Vec<Json> = (0..PATH_DEPTH_MAX).map(|_| json!("k")).collect();
        assert!(parse(json!({"ops": [{"op": "del", "path": deep_path}]})).is_ok());
        let too_deep: Vec<Json> = (0..=PATH_DEPTH_MAX).map(|_| json!("k")).collect();
        assert!(parse(json!({"ops": [{"op": "del", "path": too_deep}]})).is_err());

        let mut value = json!(1);
        for _ in 0..JSON_DEPTH_MAX {
            value = json!([value]);
        }
        assert!(
            parse(json!({"ops": [{"op": "set", "path": ["a"], "value": value.clone()}]})).is_ok()
        );
        let value = json!([value]);
        let err = parse(json!({"ops": [{"op": "set", "path": ["a"], "value": value}]}))
            .expect_err("too deep");
        assert!(err.starts_with("ops[0].value: nests 33 levels"), "{err}");

        let long_key = "k".repeat(KEY_BYTES_MAX + 1);
        assert!(parse(json!({"ops": [{"op": "del", "path": [long_key]}]})).is_err());
    }

    #[test]
    fn ops_read_back_from_their_json() {
        let ops = serde_json::json!([
            {"op": "set", "path": ["a", 0, "b"], "value": {"x": [1, null]}},
            {"op": "del", "path": ["a"]},
            {"op": "inc", "path": ["n"], "by": -3},
            {"op": "insert", "path": ["l", 2], "value": "v"},
            {"op": "push", "path": ["l"], "value": 1.5},
            {"op": "splice", "path": ["t"], "index": 1, "delete": 2, "text": "é"},
        ]);
        let parsed = Op::parse_list(&ops).expect("valid");
        let again: Vec<Op> = parsed
            .iter()
            .map(|op| Op::parse(&op.to_json()).expect("reads back"))
            .collect();
        assert_eq!(again, parsed);
    }
}
