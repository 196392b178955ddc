//! Typing indicators with a server-side expiry.
//!
//! Clients refresh `is_typing: true` every few seconds while the user types. Only the first one
//! is broadcast; refreshes just push the expiry out. If refreshes stop, or the session goes away,
//! the server itself broadcasts `is_typing: false`, so no indicator is ever stuck on.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use confab_proto::UserRef;
use foldhash::{HashMap, HashMapExt};

use crate::outbound::SessionId;

#[derive(Debug)]
struct Typist {
    user: UserRef,
    expires: Instant,
}

/// Who is typing where.
#[derive(Debug)]
pub struct Typing {
    // A std mutex: tiny critical sections, never held across an await.
    active: Mutex<HashMap<(Arc<str>, SessionId), Typist>>,
    timeout: Duration,
}

/// A typing indicator that has to be switched off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// Room.
    pub room: Arc<str>,
    /// Session that was typing.
    pub session: SessionId,
    /// User that was typing.
    pub user: UserRef,
}

impl Typing {
    /// Indicators expire after `timeout` without refresh.
    pub fn new(timeout: Duration) -> Typing {
        Typing {
            active: Mutex::new(HashMap::new()),
            timeout,
        }
    }

    /// Records typing; returns true if this starts it (broadcast), false for a refresh.
    pub fn start(&self, room: &Arc<str>, session: SessionId, user: &UserRef, now: Instant) -> bool {
        let mut active = self.active.lock().expect("typing lock");
        let expires = now + self.timeout;
        match active.get_mut(&(Arc::clone(room), session)) {
            Some(typist) => {
                typist.expires = expires;
                false
            }
            None => {
                active.insert(
                    (Arc::clone(room), session),
                    Typist {
                        user: user.clone(),
                        expires,
                    },
                );
                true
            }
        }
    }

    /// Clears typing; returns true if it was on (broadcast the stop).
    pub fn stop(&self, room: &str, session: SessionId) -> bool {
        let key: (Arc<str>, SessionId) = (Arc::from(room), session);
        self.active
            .lock()
            .expect("typing lock")
            .remove(&key)
            .is_some()
    }

    /// Removes and returns every indicator whose time is up.
    pub fn expire(&self, now: Instant) -> Vec<Expired> {
        let mut active = self.active.lock().expect("typing lock");
        let mut expired = Vec::new();
        active.retain(|(room, session), typist| {
            if typist.expires <= now {
                expired.push(Expired {
                    room: Arc::clone(room),
                    session: *session,
                    user: typist.user.clone(),
                });
                false
            } else {
                true
            }
        });
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_extends_and_silence_expires() {
        let typing = Typing::new(Duration::from_secs(5));
        let room: Arc<str> = Arc::from("r");
        let user = UserRef {
            id: "u".into(),
            name: "u".into(),
        };
        let t0 = Instant::now();
        assert!(typing.start(&room, 1, &user, t0));
        assert!(!typing.start(&room, 1, &user, t0 + Duration::from_secs(3)));
        assert!(typing.expire(t0 + Duration::from_secs(6)).is_empty());
        let expired = typing.expire(t0 + Duration::from_secs(9));
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].session, 1);
        assert!(!typing.stop("r", 1));
        assert!(typing.start(&room, 1, &user, t0));
        assert!(typing.stop("r", 1));
    }
}
