//! Request ids: taken from an incoming `x-request-id` when it is acceptable,
//! generated otherwise.
//!
//! Owns the header name, the check of client-given ids (length and charset,
//! so a log line cannot be forged or bloated through them) and generating
//! new ids. The middleware that attaches them is [`super::access_log`].

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use axum::http::{HeaderMap, HeaderName};

/// The request and response header.
pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-given id accepted, in bytes.
pub const MAX_LEN: usize = 128;

/// Whether `id` may be used as given: 1 to [`MAX_LEN`] bytes of ASCII
/// letters, digits and `-_.:/+=@`.
pub fn acceptable(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(&b))
}

/// A new id: 32 lowercase hex digits, unique within the process and
/// unpredictable across processes (keyed by the standard library's random
/// hash seed, no extra dependency).
pub fn generate() -> String {
    static SEED: OnceLock<RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = SEED.get_or_init(RandomState::new);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let half = |salt: u64| {
        let mut h = seed.build_hasher();
        h.write_u64(n);
        h.write_u64(salt);
        h.finish()
    };
    format!("{:016x}{:016x}", half(0x5eed), half(0x1d))
}

/// What became of a request's incoming header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// No header: an id was generated.
    Absent,
    /// Used as given.
    Accepted,
    /// Present but refused (too long, empty or bad characters): an id was
    /// generated instead.
    Refused,
}

/// The id for a request with `headers`.
pub fn for_request(headers: &HeaderMap) -> (String, Incoming) {
    match headers.get(&HEADER) {
        None => (generate(), Incoming::Absent),
        Some(v) => match v.to_str() {
            Ok(s) if acceptable(s) => (s.to_string(), Incoming::Accepted),
            _ => (generate(), Incoming::Refused),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn checks_length_and_charset() {
        assert!(acceptable("abc-123_x.y:z/1+2=3@host"));
        assert!(acceptable(&"a".repeat(MAX_LEN)));
        assert!(!acceptable(&"a".repeat(MAX_LEN + 1)));
        assert!(!acceptable(""));
        assert!(!acceptable("has space"));
        assert!(!acceptable("new\nline"));
        assert!(!acceptable("quote\""));
        assert!(!acceptable("é"));
    }

    #[test]
    fn generated_ids_are_distinct_and_acceptable() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(acceptable(&a));
    }

    #[test]
    fn header_is_used_or_replaced() {
        let mut h = HeaderMap::new();
        assert_eq!(for_request(&h).1, Incoming::Absent);
        h.insert(HEADER, HeaderValue::from_static("given-1"));
        assert_eq!(for_request(&h), ("given-1".into(), Incoming::Accepted));
        h.insert(HEADER, HeaderValue::from_static("bad id"));
        let (id, how) = for_request(&h);
        assert_eq!(how, Incoming::Refused);
        assert_ne!(id, "bad id");
    }
}
