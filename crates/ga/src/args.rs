//! Command arguments checked the way qemu-ga's generated marshallers and
//! QAPI input visitor check them: members visited in schema order, the
//! first missing or mistyped one reported with QEMU's text, then the first
//! unvisited member (in GLib hash order) reported as unexpected.

use qvirt_qga::unicode::to_mod_utf8;
use qvirt_qga::{Dict, QgaError, Value};

use crate::ghash::StrSet;

/// The arguments of one command, being visited.
pub struct Args {
    dict: Dict,
    unvisited: StrSet,
}

fn type_error(name: &str, expected: &str) -> QgaError {
    QgaError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

fn missing(name: &str) -> QgaError {
    QgaError::generic(format!("Parameter '{name}' is missing"))
}

impl Args {
    /// Starts visiting `dict`.
    pub fn new(dict: Dict) -> Self {
        let mut unvisited = StrSet::new();
        for (k, _) in dict.iter() {
            unvisited.insert(&to_mod_utf8(k));
        }
        Args { dict, unvisited }
    }

    /// Visits (consumes) member `name`.
    fn take(&mut self, name: &str) -> Option<Value> {
        let v = self.dict.take_value(name)?;
        self.unvisited.remove(&to_mod_utf8(name));
        Some(v)
    }

    fn int_of(name: &str, v: &Value) -> Result<i64, QgaError> {
        v.as_i64().ok_or_else(|| type_error(name, "integer"))
    }

    /// A required `int` member.
    pub fn int(&mut self, name: &str) -> Result<i64, QgaError> {
        let v = self.take(name).ok_or_else(|| missing(name))?;
        Self::int_of(name, &v)
    }

    /// An optional `int` member.
    pub fn opt_int(&mut self, name: &str) -> Result<Option<i64>, QgaError> {
        self.take(name).map(|v| Self::int_of(name, &v)).transpose()
    }

    fn str_of(name: &str, v: Value) -> Result<String, QgaError> {
        match v {
            Value::String(s) => Ok(s),
            _ => Err(type_error(name, "string")),
        }
    }

    /// A required `str` member.
    pub fn str(&mut self, name: &str) -> Result<String, QgaError> {
        let v = self.take(name).ok_or_else(|| missing(name))?;
        Self::str_of(name, v)
    }

    /// An optional `str` member.
    pub fn opt_str(&mut self, name: &str) -> Result<Option<String>, QgaError> {
        self.take(name).map(|v| Self::str_of(name, v)).transpose()
    }

    /// An optional `bool` member.
    pub fn opt_bool(&mut self, name: &str) -> Result<Option<bool>, QgaError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(type_error(name, "boolean")),
        }
    }

    /// A required `bool` member.
    pub fn bool(&mut self, name: &str) -> Result<bool, QgaError> {
        match self.take(name) {
            None => Err(missing(name)),
            Some(Value::Bool(b)) => Ok(b),
            Some(_) => Err(type_error(name, "boolean")),
        }
    }

    /// An optional `['str']` member; items are named `name[i]`.
    pub fn opt_str_list(&mut self, name: &str) -> Result<Option<Vec<String>>, QgaError> {
        self.take(name)
            .map(|v| Self::str_list_of(name, v))
            .transpose()
    }

    /// A required `['str']` member.
    pub fn str_list(&mut self, name: &str) -> Result<Vec<String>, QgaError> {
        let v = self.take(name).ok_or_else(|| missing(name))?;
        Self::str_list_of(name, v)
    }

    fn str_list_of(name: &str, v: Value) -> Result<Vec<String>, QgaError> {
        let Value::Array(items) = v else {
            return Err(type_error(name, "array"));
        };
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| Self::str_of(&format!("{name}[{i}]"), item))
            .collect()
    }

    /// A required member of any type (for commands whose argument types
    /// are not modelled here).
    pub fn any(&mut self, name: &str) -> Result<Value, QgaError> {
        self.take(name).ok_or_else(|| missing(name))
    }

    /// An optional member of any type.
    pub fn opt_any(&mut self, name: &str) -> Option<Value> {
        self.take(name)
    }

    /// The visitor's `check_struct`: any member left is unexpected.
    pub fn done(&mut self) -> Result<(), QgaError> {
        match self.unvisited.first() {
            None => Ok(()),
            Some(key) => Err(QgaError::generic(format!(
                "Parameter '{}' is unexpected",
                qvirt_qga::unicode::lossy(key)
            ))),
        }
    }
}
