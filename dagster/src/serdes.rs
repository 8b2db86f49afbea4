//! Dagster's serdes JSON (`dagster_shared/serdes/serdes.py`), both directions.
//!
//! Dagster stores and ships its objects as `json.dumps(pack_value(x), sort_keys=True)`: named tuples are
//! objects tagged with `"__class__"`, enums `{"__enum__": "Cls.MEMBER"}`, sets `{"__set__": [...]}` and
//! frozensets `{"__frozenset__": [...]}` (items sorted by Python's `str()` of the object), maps with
//! non-string keys `{"__mapping_items__": [[k, v], ...]}`.
//!
//! On load Dagster ignores unknown *fields* and refuses unknown *classes*. celeriac does the same for the
//! classes whose meaning it needs ([`Obj::expect`] names the class and where it was found), and keeps the
//! rest as opaque JSON, so a value written by a newer Dagster passes through unchanged.

use std::io::Read as _;

use serde_json::{Map, Value};

/// Why a serdes value could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SerdesError {
    /// A `__class__` celeriac does not know where it needs to understand the value.
    #[error("unknown serdes class {class:?} at {path} (known here: {known})")]
    UnknownClass {
        class: String,
        path: String,
        known: String,
    },
    /// The value does not have the shape its class requires.
    #[error("malformed serdes value at {path}: expected {expected}, found {found}")]
    Shape {
        path: String,
        expected: String,
        found: String,
    },
    /// The bytes are not JSON (or not zlib-compressed JSON where that is stored).
    #[error("unreadable serdes document: {0}")]
    Unreadable(String),
}

/// The JSON type of a value, in Python's words, for error messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "None",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(m) if m.contains_key("__class__") => "object",
        Value::Object(_) => "dict",
    }
}

fn shape(path: &str, expected: &str, found: &Value) -> SerdesError {
    SerdesError::Shape {
        path: path.to_string(),
        expected: expected.to_string(),
        found: match found.get("__class__").and_then(Value::as_str) {
            Some(class) => format!("object of class {class}"),
            None => kind(found).to_string(),
        },
    }
}

/// `serialize_value`'s text: Python's `json.dumps(..., sort_keys=True)` of the packed value.
pub fn to_string(value: &Value) -> String {
    celeriac_wire::json::to_python_string(value, true)
}

/// Parses serdes JSON text (Python's `json.loads`: bare `NaN`/`Infinity` allowed).
pub fn parse(text: &[u8]) -> Result<Value, SerdesError> {
    celeriac_wire::json::parse_lenient(text).map_err(|e| SerdesError::Unreadable(e.to_string()))
}

/// Decompresses a zlib-compressed serdes document (`snapshots.snapshot_body`) and parses it.
pub fn parse_zlib(bytes: &[u8]) -> Result<Value, SerdesError> {
    let mut text = Vec::with_capacity(bytes.len() * 4);
    flate2::read::ZlibDecoder::new(bytes)
        .read_to_end(&mut text)
        .map_err(|e| SerdesError::Unreadable(format!("not zlib-compressed JSON: {e}")))?;
    parse(&text)
}

/// A serdes object (`{"__class__": ..., fields}`) being read, with the path it was found at so that
/// every error names where it happened.
#[derive(Debug, Clone)]
pub struct Obj<'a> {
    pub class: &'a str,
    fields: &'a Map<String, Value>,
    path: String,
}

impl<'a> Obj<'a> {
    /// Reads `v` as an object of one of `classes` (storage names).
    pub fn expect(v: &'a Value, classes: &[&str], path: &str) -> Result<Obj<'a>, SerdesError> {
        let Value::Object(fields) = v else {
            return Err(shape(path, &classes.join(" or "), v));
        };
        let class = fields
            .get("__class__")
            .and_then(Value::as_str)
            .ok_or_else(|| shape(path, &classes.join(" or "), v))?;
        if !classes.contains(&class) {
            return Err(SerdesError::UnknownClass {
                class: class.to_string(),
                path: path.to_string(),
                known: classes.join(", "),
            });
        }
        Ok(Obj {
            class,
            fields,
            path: path.to_string(),
        })
    }

    /// The path of a field, for errors further down.
    pub fn path_of(&self, field: &str) -> String {
        format!("{}.{field}", self.path)
    }

    /// A field as raw JSON (`None` if absent: Dagster fills defaults for fields older writers lacked).
    pub fn get(&self, field: &str) -> Option<&'a Value> {
        self.fields.get(field)
    }

    /// A field that must be present (any value).
    pub fn field(&self, field: &str) -> Result<&'a Value, SerdesError> {
        self.fields.get(field).ok_or_else(|| SerdesError::Shape {
            path: self.path_of(field),
            expected: "a value".into(),
            found: "nothing".into(),
        })
    }

    pub fn str(&self, field: &str) -> Result<&'a str, SerdesError> {
        let v = self.field(field)?;
        v.as_str()
            .ok_or_else(|| shape(&self.path_of(field), "str", v))
    }

    /// A string field that may be absent or `null`.
    pub fn opt_str(&self, field: &str) -> Result<Option<&'a str>, SerdesError> {
        match self.fields.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(shape(&self.path_of(field), "str or None", other)),
        }
    }

    /// A boolean field; `default` when absent (fields added by later Dagster versions).
    pub fn bool_or(&self, field: &str, default: bool) -> Result<bool, SerdesError> {
        match self.fields.get(field) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(shape(&self.path_of(field), "bool", other)),
        }
    }

    /// A list field; empty when absent or `null`.
    pub fn list(&self, field: &str) -> Result<&'a [Value], SerdesError> {
        match self.fields.get(field) {
            None | Some(Value::Null) => Ok(&[]),
            Some(Value::Array(items)) => Ok(items),
            Some(other) => Err(shape(&self.path_of(field), "list", other)),
        }
    }

    /// A dict field with string keys; empty when absent or `null`.
    pub fn dict(&self, field: &str) -> Result<Option<&'a Map<String, Value>>, SerdesError> {
        match self.fields.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) if !m.contains_key("__class__") => Ok(Some(m)),
            Some(other) => Err(shape(&self.path_of(field), "dict", other)),
        }
    }
}

/// The items of a packed set or frozenset (a plain list is accepted too: some fields are stored as
/// sorted lists by a field serializer).
pub fn set_items<'a>(v: &'a Value, path: &str) -> Result<&'a [Value], SerdesError> {
    match v {
        Value::Array(items) => Ok(items),
        Value::Object(m) => match (m.get("__set__"), m.get("__frozenset__")) {
            (Some(Value::Array(items)), _) | (_, Some(Value::Array(items))) => Ok(items),
            _ => Err(shape(path, "set", v)),
        },
        Value::Null => Ok(&[]),
        other => Err(shape(path, "set", other)),
    }
}

/// The member name of a packed enum: `{"__enum__": "StepKind.COMPUTE"}` → `COMPUTE`.
pub fn enum_member<'a>(v: &'a Value, enum_name: &str, path: &str) -> Result<&'a str, SerdesError> {
    let text = v
        .get("__enum__")
        .and_then(Value::as_str)
        .ok_or_else(|| shape(path, &format!("{enum_name} enum"), v))?;
    match text.split_once('.') {
        Some((name, member)) if name == enum_name => Ok(member),
        _ => Err(SerdesError::UnknownClass {
            class: text.to_string(),
            path: path.to_string(),
            known: format!("{enum_name}.*"),
        }),
    }
}

/// `{"__enum__": "Name.MEMBER"}`.
pub fn pack_enum(enum_name: &str, member: &str) -> Value {
    let mut m = Map::new();
    m.insert(
        "__enum__".into(),
        Value::String(format!("{enum_name}.{member}")),
    );
    Value::Object(m)
}

/// `{"__set__": items}` with the items in the order given (callers sort as Python's `str()` would).
pub fn pack_set(items: Vec<Value>) -> Value {
    let mut m = Map::new();
    m.insert("__set__".into(), Value::Array(items));
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_class_names_class_and_path() {
        let v = json!({"__class__": "FromTheFuture", "x": 1});
        let err = Obj::expect(&v, &["FromStepOutput"], "steps[3].inputs[0].source").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("FromTheFuture"), "{text}");
        assert!(text.contains("steps[3].inputs[0].source"), "{text}");
    }

    #[test]
    fn reads_fields_and_tolerates_unknown_ones() {
        let v = json!({"__class__": "StepOutputHandle", "step_key": "a", "output_name": "result",
                       "mapping_key": null, "added_in_2030": {"x": 1}});
        let o = Obj::expect(&v, &["StepOutputHandle"], "h").expect("object");
        assert_eq!(o.str("step_key").expect("key"), "a");
        assert_eq!(o.opt_str("mapping_key").expect("mk"), None);
        assert!(o.str("missing").is_err());
        assert!(o.bool_or("missing", true).expect("default"));
    }

    #[test]
    fn sets_enums_and_zlib() {
        assert_eq!(
            set_items(&json!({"__frozenset__": [1]}), "p")
                .expect("set")
                .len(),
            1
        );
        assert_eq!(
            set_items(&json!({"__set__": []}), "p").expect("set").len(),
            0
        );
        assert!(set_items(&json!("x"), "p").is_err());
        let e = json!({"__enum__": "StepKind.UNRESOLVED_MAPPED"});
        assert_eq!(
            enum_member(&e, "StepKind", "k").expect("enum"),
            "UNRESOLVED_MAPPED"
        );
        assert!(enum_member(&e, "RetryMode", "k").is_err());
        assert_eq!(
            to_string(&pack_enum("RetryMode", "DEFERRED")),
            r#"{"__enum__": "RetryMode.DEFERRED"}"#
        );

        use std::io::Write as _;
        let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(br#"{"a": NaN}"#).expect("write");
        let bytes = enc.finish().expect("finish");
        assert!(parse_zlib(&bytes).expect("parse")["a"].is_object());
        assert!(matches!(
            parse_zlib(b"not zlib"),
            Err(SerdesError::Unreadable(_))
        ));
    }
}
