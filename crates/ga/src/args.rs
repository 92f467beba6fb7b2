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
    /// How members are named in errors: `""` at the top level,
    /// `"vcpus[0]."` inside a list item.
    prefix: String,
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
        Self::nested(dict, String::new())
    }

    fn nested(dict: Dict, prefix: String) -> Self {
        let mut unvisited = StrSet::new();
        for (k, _) in dict.iter() {
            unvisited.insert(&to_mod_utf8(k));
        }
        Args {
            dict,
            unvisited,
            prefix,
        }
    }

    /// The name of member `name` in errors (QAPI's full name).
    fn full(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
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
        let full = self.full(name);
        let v = self.take(name).ok_or_else(|| missing(&full))?;
        Self::int_of(&full, &v)
    }

    /// A required `uint64` member: a negative int64 is taken modulo 2^64,
    /// as QEMU's input visitor does.
    pub fn uint(&mut self, name: &str) -> Result<u64, QgaError> {
        let full = self.full(name);
        match self.take(name) {
            None => Err(missing(&full)),
            Some(Value::Int(i)) => Ok(i as u64),
            Some(Value::UInt(u)) => Ok(u),
            Some(_) => Err(QgaError::generic(format!(
                "Parameter '{full}' expects uint64"
            ))),
        }
    }

    /// An optional `int` member.
    pub fn opt_int(&mut self, name: &str) -> Result<Option<i64>, QgaError> {
        let full = self.full(name);
        self.take(name).map(|v| Self::int_of(&full, &v)).transpose()
    }

    fn str_of(name: &str, v: Value) -> Result<String, QgaError> {
        match v {
            Value::String(s) => Ok(s),
            _ => Err(type_error(name, "string")),
        }
    }

    /// A required `str` member.
    pub fn str(&mut self, name: &str) -> Result<String, QgaError> {
        let full = self.full(name);
        let v = self.take(name).ok_or_else(|| missing(&full))?;
        Self::str_of(&full, v)
    }

    /// An optional `str` member.
    pub fn opt_str(&mut self, name: &str) -> Result<Option<String>, QgaError> {
        let full = self.full(name);
        self.take(name).map(|v| Self::str_of(&full, v)).transpose()
    }

    /// An optional `bool` member.
    pub fn opt_bool(&mut self, name: &str) -> Result<Option<bool>, QgaError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(type_error(&self.full(name), "boolean")),
        }
    }

    /// A required `bool` member.
    pub fn bool(&mut self, name: &str) -> Result<bool, QgaError> {
        match self.take(name) {
            None => Err(missing(&self.full(name))),
            Some(Value::Bool(b)) => Ok(b),
            Some(_) => Err(type_error(&self.full(name), "boolean")),
        }
    }

    /// A required list of structs: each item must be an object, visited
    /// by `item` (members named `name[i].member` in errors) and checked
    /// for unexpected members before the next, as QAPI's generated list
    /// visitors do.
    pub fn struct_list<T>(
        &mut self,
        name: &str,
        mut item: impl FnMut(&mut Args) -> Result<T, QgaError>,
    ) -> Result<Vec<T>, QgaError> {
        let full = self.full(name);
        let v = self.take(name).ok_or_else(|| missing(&full))?;
        let Value::Array(items) = v else {
            return Err(type_error(&full, "array"));
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, v) in items.into_iter().enumerate() {
            let Value::Object(dict) = v else {
                return Err(type_error(&format!("{full}[{i}]"), "object"));
            };
            let mut args = Args::nested(dict, format!("{full}[{i}]."));
            out.push(item(&mut args)?);
            args.done()?;
        }
        Ok(out)
    }

    /// An optional `['str']` member; items are named `name[i]`.
    pub fn opt_str_list(&mut self, name: &str) -> Result<Option<Vec<String>>, QgaError> {
        let full = self.full(name);
        self.take(name)
            .map(|v| Self::str_list_of(&full, v))
            .transpose()
    }

    /// A required `['str']` member.
    pub fn str_list(&mut self, name: &str) -> Result<Vec<String>, QgaError> {
        let full = self.full(name);
        let v = self.take(name).ok_or_else(|| missing(&full))?;
        Self::str_list_of(&full, v)
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
        let full = self.full(name);
        self.take(name).ok_or_else(|| missing(&full))
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
                "Parameter '{}{}' is unexpected",
                self.prefix,
                qvirt_qga::unicode::lossy(key)
            ))),
        }
    }
}
