//! Host ids: the name an agent registers under.

use thiserror::Error;

/// Longest host id accepted (a DNS name's limit).
pub const MAX_HOST_ID_LEN: usize = 253;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HostIdError {
    #[error("host id is empty")]
    Empty,
    #[error("host id is {len} characters long; the limit is {MAX_HOST_ID_LEN}")]
    TooLong { len: usize },
    #[error(
        "host id {id:?} has the character {bad:?}; use letters, digits, '.', '_' and '-', starting with a letter or digit"
    )]
    BadCharacter { id: String, bad: char },
}

/// Checks that `id` is a usable host id: 1 to 253 characters of
/// `[A-Za-z0-9._-]`, starting with a letter or digit.
pub fn validate_host_id(id: &str) -> Result<(), HostIdError> {
    if id.is_empty() {
        return Err(HostIdError::Empty);
    }
    if id.len() > MAX_HOST_ID_LEN {
        return Err(HostIdError::TooLong { len: id.len() });
    }
    for (i, c) in id.chars().enumerate() {
        let ok = c.is_ascii_alphanumeric() || (i > 0 && matches!(c, '.' | '_' | '-'));
        if !ok {
            return Err(HostIdError::BadCharacter {
                id: id.to_string(),
                bad: c,
            });
        }
    }
    Ok(())
}

/// Checks a service name (also a path component on hosts): 1 to 63
/// characters of `[a-z0-9_-]`, starting with a letter or digit.
pub fn validate_service(name: &str) -> Result<(), String> {
    validate_lower_name(name, true).map_err(|why| format!("service {name:?} {why}"))
}

/// Checks a pipeline name: 1 to 63 characters of `[a-z0-9-]`, starting with
/// a letter or digit.
pub fn validate_pipeline_name(name: &str) -> Result<(), String> {
    validate_lower_name(name, false).map_err(|why| format!("pipeline name {name:?} {why}"))
}

fn validate_lower_name(name: &str, underscore: bool) -> Result<(), &'static str> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (underscore && c == '_')
        });
    match (ok, underscore) {
        (true, _) => Ok(()),
        (false, true) => {
            Err("must be 1-63 characters of a-z, 0-9, '-' and '_', starting with a letter or digit")
        }
        (false, false) => {
            Err("must be 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_like_names() {
        for id in ["web-1", "a", "web-1.eu-west.example.com", "db_2"] {
            assert_eq!(validate_host_id(id), Ok(()), "{id}");
        }
    }

    #[test]
    fn service_and_pipeline_names() {
        assert!(validate_service("web-api_2").is_ok());
        assert!(validate_pipeline_name("web-prod").is_ok());
        for bad in ["", "../x", "a/b", "Web", ".hidden", &"a".repeat(64)] {
            assert!(validate_service(bad).is_err(), "{bad}");
        }
        assert!(validate_pipeline_name("web_prod").is_err());
    }

    #[test]
    fn rejects_empty_long_and_odd_characters() {
        assert_eq!(validate_host_id(""), Err(HostIdError::Empty));
        let long = "a".repeat(254);
        assert_eq!(
            validate_host_id(&long),
            Err(HostIdError::TooLong { len: 254 })
        );
        assert!(matches!(
            validate_host_id("-web"),
            Err(HostIdError::BadCharacter { bad: '-', .. })
        ));
        assert!(matches!(
            validate_host_id("web 1"),
            Err(HostIdError::BadCharacter { bad: ' ', .. })
        ));
        assert!(matches!(
            validate_host_id("wéb"),
            Err(HostIdError::BadCharacter { bad: 'é', .. })
        ));
    }
}
