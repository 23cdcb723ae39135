//! Labels (`region=eu`) describe hosts; selectors (`region=eu,env!=dev`)
//! pick hosts by their labels.

use std::collections::HashMap;
use std::fmt;

use thiserror::Error;

/// Longest label key or value.
pub const MAX_LABEL_PART_LEN: usize = 63;
/// Most labels one host may carry.
pub const MAX_LABELS: usize = 64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LabelError {
    #[error("label {0:?} is not key=value")]
    NotKeyValue(String),
    #[error("label key {0:?} is invalid: {1}")]
    BadKey(String, &'static str),
    #[error("label value {value:?} of key {key:?} is invalid: {why}")]
    BadValue {
        key: String,
        value: String,
        why: &'static str,
    },
    #[error("{0} labels given; the limit is {MAX_LABELS}")]
    TooMany(usize),
    #[error("label key {0:?} is given twice")]
    Duplicate(String),
    #[error("selector term {0:?} is not key=value or key!=value")]
    BadSelectorTerm(String),
}

fn check_part(part: &str, allow_slash: bool) -> Result<(), &'static str> {
    if part.is_empty() {
        return Err("it is empty");
    }
    if part.len() > MAX_LABEL_PART_LEN {
        return Err("it is longer than 63 characters");
    }
    if !part.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("it must start with a letter or digit");
    }
    let ok = |c: char| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || (allow_slash && c == '/')
    };
    if !part.chars().all(ok) {
        return Err(if allow_slash {
            "use letters, digits, '.', '_', '-' and '/'"
        } else {
            "use letters, digits, '.', '_' and '-'"
        });
    }
    Ok(())
}

/// Checks one label.
pub fn validate_label(key: &str, value: &str) -> Result<(), LabelError> {
    check_part(key, true).map_err(|why| LabelError::BadKey(key.to_string(), why))?;
    check_part(value, false).map_err(|why| LabelError::BadValue {
        key: key.to_string(),
        value: value.to_string(),
        why,
    })
}

/// Checks a host's whole label set.
pub fn validate_labels<'a>(
    labels: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), LabelError> {
    if labels.len() > MAX_LABELS {
        return Err(LabelError::TooMany(labels.len()));
    }
    for (k, v) in labels {
        validate_label(k, v)?;
    }
    Ok(())
}

/// Parses `key=value` as given on a command line.
pub fn parse_label(s: &str) -> Result<(String, String), LabelError> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| LabelError::NotKeyValue(s.to_string()))?;
    validate_label(k, v)?;
    Ok((k.to_string(), v.to_string()))
}

/// Parses repeated `key=value` arguments into a map, refusing duplicates.
pub fn parse_labels<S: AsRef<str>>(items: &[S]) -> Result<HashMap<String, String>, LabelError> {
    let mut out = HashMap::new();
    for item in items {
        let (k, v) = parse_label(item.as_ref())?;
        if out.insert(k.clone(), v).is_some() {
            return Err(LabelError::Duplicate(k));
        }
    }
    if out.len() > MAX_LABELS {
        return Err(LabelError::TooMany(out.len()));
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Equals(String, String),
    NotEquals(String, String),
}

/// A conjunction of `key=value` and `key!=value` terms. The empty selector
/// matches every host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    terms: Vec<Term>,
}

impl Selector {
    /// Parses `region=eu,env!=dev`; blanks around terms are ignored.
    pub fn parse(s: &str) -> Result<Selector, LabelError> {
        let mut terms = Vec::new();
        for raw in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let term = if let Some((k, v)) = raw.split_once("!=") {
                validate_label(k.trim(), v.trim())?;
                Term::NotEquals(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = raw.split_once('=') {
                validate_label(k.trim(), v.trim())?;
                Term::Equals(k.trim().to_string(), v.trim().to_string())
            } else {
                return Err(LabelError::BadSelectorTerm(raw.to_string()));
            };
            terms.push(term);
        }
        Ok(Selector { terms })
    }

    /// True when every term holds for `labels`. `k!=v` holds when the host
    /// has no label `k` at all.
    pub fn matches(&self, labels: &HashMap<String, String>) -> bool {
        self.terms.iter().all(|t| match t {
            Term::Equals(k, v) => labels.get(k) == Some(v),
            Term::NotEquals(k, v) => labels.get(k) != Some(v),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match t {
                Term::Equals(k, v) => write!(f, "{k}={v}")?,
                Term::NotEquals(k, v) => write!(f, "{k}!={v}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_labels_and_refuses_bad_ones() {
        assert_eq!(
            parse_label("region=eu-west"),
            Ok(("region".into(), "eu-west".into()))
        );
        assert_eq!(
            parse_label("region"),
            Err(LabelError::NotKeyValue("region".into()))
        );
        assert!(matches!(parse_label("=eu"), Err(LabelError::BadKey(..))));
        assert!(matches!(
            parse_label("region="),
            Err(LabelError::BadValue { .. })
        ));
        assert!(matches!(
            parse_label("region=eu west"),
            Err(LabelError::BadValue { .. })
        ));
        assert!(matches!(
            parse_labels(&["a=1", "a=2"]),
            Err(LabelError::Duplicate(k)) if k == "a"
        ));
        assert!(parse_label(&format!("k={}", "v".repeat(64))).is_err());
    }

    #[test]
    fn selector_matches_conjunction() {
        let host = labels(&[("region", "eu"), ("env", "prod")]);
        let sel = |s: &str| Selector::parse(s).unwrap();
        assert!(sel("").matches(&host));
        assert!(sel("region=eu").matches(&host));
        assert!(sel("region=eu, env=prod").matches(&host));
        assert!(!sel("region=eu,env=dev").matches(&host));
        assert!(sel("env!=dev").matches(&host));
        assert!(!sel("env!=prod").matches(&host));
        assert!(sel("zone!=a").matches(&host));
        assert!(!sel("zone=a").matches(&host));
        assert_eq!(sel("region=eu,env!=dev").to_string(), "region=eu,env!=dev");
    }

    #[test]
    fn selector_rejects_bad_terms() {
        assert_eq!(
            Selector::parse("region"),
            Err(LabelError::BadSelectorTerm("region".into()))
        );
        assert!(Selector::parse("region=eu,=x").is_err());
    }
}
