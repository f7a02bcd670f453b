//! Session affinity's memory: which endpoint each session (conversation) was last sent to,
//! for sessions named by a header. (A session cookie names its endpoint itself, see
//! [`endpoint_token`], and needs no memory.)
//!
//! Bounded: at most `max_sessions` keys (a 64-bit hash of the key and an endpoint index, about
//! 70 bytes each), least recently used forgotten first: an LRU (the `lru` crate) behind one
//! short mutex section per request. (A concurrent S3-FIFO cache such as `quick_cache` keeps
//! established keys over new ones instead, so a memory full of idle sessions would forget
//! every new conversation first.)

use std::num::NonZeroUsize;

use fleetpick_config::SessionAffinity;
use lru::LruCache;
use parking_lot::Mutex;

/// Where a session key is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionKey {
    Header(String),
    /// A cookie that fleetpick sets on the response when the request has none.
    Cookie(String),
}

#[derive(Debug)]
pub struct Sessions {
    pub key: SessionKey,
    /// Session key hash -> endpoint index, most recently used first.
    bound: Mutex<LruCache<u64, u32>>,
}

impl Sessions {
    pub fn new(spec: &SessionAffinity) -> Sessions {
        let key = match (&spec.header, &spec.cookie) {
            (Some(h), _) => SessionKey::Header(h.to_ascii_lowercase()),
            (None, Some(c)) => SessionKey::Cookie(c.clone()),
            // Validation requires one of them; a header nobody sends switches affinity off.
            (None, None) => SessionKey::Header(String::new()),
        };
        let capacity = NonZeroUsize::new(spec.max_sessions).unwrap_or(NonZeroUsize::MIN);
        Sessions {
            key,
            bound: Mutex::new(LruCache::new(capacity)),
        }
    }

    /// The sessions of the next generation of the fleet, for `spec` (as reloaded): the bindings
    /// to endpoints that stay, at their new indices (`moved[old]`); none when the key changed.
    pub fn carried(&self, spec: &SessionAffinity, moved: &[Option<usize>]) -> Sessions {
        let next = Sessions::new(spec);
        if next.key != self.key {
            return next;
        }
        {
            let old = self.bound.lock();
            let mut new = next.bound.lock();
            // Least recent first, so the copy keeps the order.
            for (&h, &e) in old.iter().rev() {
                if let Some(e) = moved.get(e as usize).copied().flatten()
                    && let Ok(e) = u32::try_from(e)
                {
                    new.put(h, e);
                }
            }
        }
        next
    }

    /// The endpoint `session` was last bound to.
    pub fn get(&self, session: &str) -> Option<usize> {
        self.bound.lock().get(&hash(session)).map(|&e| e as usize)
    }

    /// Binds `session` to `endpoint` (the endpoint its latest request was sent to).
    pub fn bind(&self, session: &str, endpoint: usize) {
        let Ok(e) = u32::try_from(endpoint) else {
            return;
        };
        self.bound.lock().put(hash(session), e);
    }

    /// Sessions remembered now.
    pub fn len(&self) -> usize {
        self.bound.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn hash(session: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(session.as_bytes())
}

/// The value of cookie `name` in a `cookie` request header (`a=1; b=2`).
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"'))
    })
}

/// The session cookie's value for an endpoint: a hash of its address, so the cookie itself
/// says where the session lives. Cookie sessions cost the picker no memory, clients that drop
/// cookies cannot flush anyone's session, and the cookie outlives a restart of the picker.
/// It only routes (it grants nothing, and names no address), so it needs no secret.
pub fn endpoint_token(addr: &str) -> String {
    format!("{:016x}", token_of(addr))
}

/// The hash an [`endpoint_token`] stands for.
pub fn token_of(addr: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(addr.as_bytes(), 0x5e55_1011)
}

/// Reads a cookie value back into the hash it carries (`None`: not one of ours).
pub fn parse_token(value: &str) -> Option<u64> {
    (value.len() == 16)
        .then(|| u64::from_str_radix(value, 16).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions(max: usize) -> Sessions {
        Sessions::new(&SessionAffinity {
            header: Some("X-Session-Id".into()),
            cookie: None,
            max_sessions: max,
        })
    }

    #[test]
    fn binds_moves_and_reads_back() {
        let s = sessions(100);
        assert_eq!(s.key, SessionKey::Header("x-session-id".into()));
        assert_eq!(s.get("a"), None);
        s.bind("a", 3);
        s.bind("b", 4);
        assert_eq!(s.get("a"), Some(3));
        s.bind("a", 7);
        assert_eq!(s.get("a"), Some(7));
        assert_eq!(s.get("b"), Some(4));
    }

    #[test]
    fn memory_is_bounded_and_idle_sessions_go_first() {
        let s = sessions(10);
        s.bind("kept", 1);
        for i in 0..1000 {
            s.bind(&format!("s{i}"), i % 5);
            // Used all along: survives every generation change.
            assert_eq!(s.get("kept"), Some(1));
            assert!(s.len() <= 10, "{} sessions", s.len());
        }
        assert_eq!(s.get("s0"), None, "the idle session is forgotten");
        assert_eq!(s.get("s999"), Some(999 % 5));
    }

    #[test]
    fn carried_sessions_follow_their_endpoints_or_are_forgotten() {
        let s = sessions(100);
        s.bind("stays", 2);
        s.bind("left", 0);
        let spec = SessionAffinity {
            header: Some("x-session-id".into()),
            cookie: None,
            max_sessions: 100,
        };
        let next = s.carried(&spec, &[None, Some(5), Some(1)]);
        assert_eq!(next.get("stays"), Some(1));
        assert_eq!(next.get("left"), None);
        let other = SessionAffinity {
            header: Some("x-conversation".into()),
            ..spec
        };
        assert!(s.carried(&other, &[None, Some(5), Some(1)]).is_empty());
    }

    #[test]
    fn cookies_are_found_by_name() {
        let h = "theme=dark; fp-session=abc123 ; other=\"q\"";
        assert_eq!(cookie_value(h, "fp-session"), Some("abc123"));
        assert_eq!(cookie_value(h, "other"), Some("q"));
        assert_eq!(cookie_value(h, "session"), None);
        assert_eq!(cookie_value("", "x"), None);
        let (a, b) = (
            endpoint_token("10.0.0.1:8000"),
            endpoint_token("10.0.0.2:8000"),
        );
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
        assert_eq!(parse_token(&a), Some(token_of("10.0.0.1:8000")));
        assert_eq!(parse_token("nothex!!nothex!!"), None);
        assert_eq!(parse_token("abc"), None);
    }
}
