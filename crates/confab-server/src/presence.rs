//! User-level presence: one status per user across all of their devices.
//!
//! A user is `online` from their first session, `away` when every session says so, and
//! `offline` only after their last session has been gone for the grace period, so a reconnect
//! (a page reload, a flaky train tunnel) produces no flicker. Only changes of the aggregate are
//! reported; the caller announces them.

use std::sync::{Arc, Mutex, Weak};

use confab_proto::{PresenceStatus, SettableStatus, UserRef};
use foldhash::HashMap;
use smallvec::SmallVec;

use crate::heartbeat::Signal;
use crate::hub::DepartureId;
use crate::outbound::{SessionHandle, SessionId, UserKey};

/// One connected session of a user.
#[derive(Debug)]
struct Device {
    /// The session.
    id: SessionId,
    /// The session's own status.
    status: SettableStatus,
    /// How to reach it with events meant for the user rather than a room (`room_added`).
    /// Weak: the session task owns its handle; this map must not keep it alive.
    handle: Weak<SessionHandle>,
}

#[derive(Debug)]
struct UserState {
    /// The user, shared with its newest session (the map's key shares it too).
    user: Arc<UserRef>,
    /// Each connected session. A list, not a map: a user has a handful at most (the
    /// connection cap), and with one entry per connected user its size adds up. The usual
    /// one is kept inline: a `Vec`'s first push allocates room for four (112 bytes per
    /// connected user).
    sessions: SmallVec<[Device; 1]>,
    /// The status last announced to others.
    announced: PresenceStatus,
    /// Set while the user has no session but is inside the grace period.
    departing: Option<DepartureId>,
}

/// What a session's disconnect means for its user's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterDisconnect {
    /// Other sessions remain and the aggregate did not change.
    Unchanged,
    /// Other sessions remain and the aggregate changed (the last `online` one left).
    Changed(PresenceStatus),
    /// It was the last session: call [`Presence::grace_expired`] after the grace period.
    GracePeriod,
}

/// A change of a user's aggregate status, for the caller to announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusChange {
    /// The new aggregate.
    pub status: PresenceStatus,
    /// The user had been offline. Rooms where they already have a session by the time this is
    /// announced were told by `user_joined`, which carries the status: a `presence` there as
    /// well would only repeat it, to every subscriber.
    pub came_online: bool,
}

impl StatusChange {
    /// A change between connected statuses, or to offline.
    pub fn to(status: PresenceStatus) -> StatusChange {
        StatusChange {
            status,
            came_online: false,
        }
    }
}

/// Too many concurrent connections for one user.
#[derive(Debug, thiserror::Error)]
#[error("user already has {0} connections")]
pub struct TooManyConnections(pub usize);

/// Tracks every connected user's sessions and aggregate status.
#[derive(Debug, Default)]
pub struct Presence {
    // A std mutex: critical sections are a few map operations; connects and status changes are
    // rare next to chat traffic, which never touches this map.
    // Entries boxed: the table is a power of two and at most 7/8 full, so its empty slots
    // would otherwise each cost a whole entry (about 100 bytes per connected user in W3).
    users: Mutex<HashMap<UserKey, Box<UserState>>>,
}

fn aggregate(sessions: &[Device]) -> Option<PresenceStatus> {
    if sessions.is_empty() {
        None
    } else if sessions.iter().any(|d| d.status == SettableStatus::Online) {
        Some(PresenceStatus::Online)
    } else {
        Some(PresenceStatus::Away)
    }
}

impl Presence {
    /// Registers a new session. Returns the change to announce if the aggregate changed.
    pub fn connect(
        &self,
        session: &Arc<SessionHandle>,
        max_sessions: usize,
    ) -> Result<Option<StatusChange>, TooManyConnections> {
        let user = &session.user;
        let mut users = self.users.lock().expect("presence lock");
        let state = users.entry(UserKey(Arc::clone(user))).or_insert_with(|| {
            Box::new(UserState {
                user: Arc::clone(user),
                sessions: SmallVec::new(),
                announced: PresenceStatus::Offline,
                departing: None,
            })
        });
        if state.sessions.len() >= max_sessions {
            return Err(TooManyConnections(state.sessions.len()));
        }
        if state.user.name != user.name {
            state.user = Arc::clone(user);
        }
        state.sessions.push(Device {
            id: session.id,
            status: SettableStatus::Online,
            handle: Arc::downgrade(session),
        });
        state.departing = None;
        let came_online = state.announced == PresenceStatus::Offline;
        Ok(Self::update(state).map(|status| StatusChange {
            status,
            came_online,
        }))
    }

    /// Removes a session and says what follows for the user's status.
    pub fn disconnect(
        &self,
        session: SessionId,
        user_id: &str,
        departure: DepartureId,
    ) -> AfterDisconnect {
        let mut users = self.users.lock().expect("presence lock");
        let Some(state) = users.get_mut(user_id) else {
            return AfterDisconnect::Unchanged;
        };
        state.sessions.retain(|d| d.id != session);
        if state.sessions.is_empty() {
            state.departing = Some(departure);
            AfterDisconnect::GracePeriod
        } else {
            // The sessions left may all be away.
            match Self::update(state) {
                Some(status) => AfterDisconnect::Changed(status),
                None => AfterDisconnect::Unchanged,
            }
        }
    }

    /// Ends a grace period: returns the user if they are now offline (nobody came back).
    pub fn grace_expired(&self, user_id: &str, departure: DepartureId) -> Option<UserRef> {
        let mut users = self.users.lock().expect("presence lock");
        let state = users.get(user_id)?;
        if !state.sessions.is_empty() || state.departing != Some(departure) {
            return None;
        }
        let (_, state) = users.remove_entry(user_id)?;
        (state.announced != PresenceStatus::Offline).then(|| UserRef::clone(&state.user))
    }

    /// Sets one session's status. Returns the status to announce if the aggregate changed.
    pub fn set_status(
        &self,
        session: SessionId,
        user_id: &str,
        status: SettableStatus,
    ) -> Option<PresenceStatus> {
        let mut users = self.users.lock().expect("presence lock");
        let state = users.get_mut(user_id)?;
        state.sessions.iter_mut().find(|d| d.id == session)?.status = status;
        Self::update(state)
    }

    fn update(state: &mut UserState) -> Option<PresenceStatus> {
        let now = aggregate(&state.sessions)?;
        (now != state.announced).then(|| {
            state.announced = now;
            now
        })
    }

    /// The status others currently see for a user.
    pub fn status(&self, user_id: &str) -> PresenceStatus {
        self.users
            .lock()
            .expect("presence lock")
            .get(user_id)
            .map_or(PresenceStatus::Offline, |s| s.announced)
    }

    /// The sessions the node's heartbeat has to act on at `now` (see
    /// `SessionHandle::beat_due`). Collected under the lock and acted on after it, so pings
    /// are not written while connects wait.
    pub fn sessions_due(
        &self,
        now: u64,
        interval_ms: u64,
        timeout_ms: u64,
    ) -> Vec<Arc<SessionHandle>> {
        let mut due = Vec::new();
        self.for_each_session(|handle| {
            if handle.beat_due(now, interval_ms, timeout_ms) {
                due.push(handle);
            }
        });
        due
    }

    /// Raises `signal` on every connected session.
    pub fn signal_all(&self, signal: Signal) {
        self.for_each_session(|handle| handle.raise(signal));
    }

    /// Calls `f` with every connected session, under the lock.
    fn for_each_session(&self, mut f: impl FnMut(Arc<SessionHandle>)) {
        let users = self.users.lock().expect("presence lock");
        for device in users.values().flat_map(|state| &state.sessions) {
            if let Some(handle) = device.handle.upgrade() {
                f(handle);
            }
        }
    }

    /// Every connected session of a user (for events addressed to the user).
    pub fn sessions_of(&self, user_id: &str) -> Vec<Arc<SessionHandle>> {
        self.users
            .lock()
            .expect("presence lock")
            .get(user_id)
            .map(|s| {
                s.sessions
                    .iter()
                    .filter_map(|d| d.handle.upgrade())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How many sessions a user has open.
    pub fn connections(&self, user_id: &str) -> usize {
        self.users
            .lock()
            .expect("presence lock")
            .get(user_id)
            .map_or(0, |s| s.sessions.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann() -> UserRef {
        UserRef {
            id: "ann".into(),
            name: "Ann".into(),
        }
    }

    fn departure(id: u64) -> DepartureId {
        DepartureId::new(id).expect("test departure ids are not 0")
    }

    /// A session of ann's (its queue receiver is dropped: these tests never deliver).
    fn device(id: SessionId) -> Arc<SessionHandle> {
        SessionHandle::new(id, ann(), 8).0
    }

    #[test]
    fn devices_aggregate_into_one_status() {
        let presence = Presence::default();
        assert_eq!(
            presence.connect(&device(1), 5).unwrap(),
            Some(StatusChange {
                status: PresenceStatus::Online,
                came_online: true
            })
        );
        assert_eq!(presence.connect(&device(2), 5).unwrap(), None);
        assert_eq!(presence.set_status(1, "ann", SettableStatus::Away), None);
        assert_eq!(
            presence.set_status(2, "ann", SettableStatus::Away),
            Some(PresenceStatus::Away)
        );
        assert_eq!(presence.status("ann"), PresenceStatus::Away);
        assert_eq!(
            presence.disconnect(1, "ann", departure(10)),
            AfterDisconnect::Unchanged
        );
        assert_eq!(
            presence.disconnect(2, "ann", departure(11)),
            AfterDisconnect::GracePeriod
        );
        // Still away (not offline) during the grace period.
        assert_eq!(presence.status("ann"), PresenceStatus::Away);
        assert_eq!(
            presence.grace_expired("ann", departure(11)).map(|u| u.id),
            Some("ann".into())
        );
        assert_eq!(presence.status("ann"), PresenceStatus::Offline);
    }

    #[test]
    fn reconnect_within_grace_is_silent() {
        let presence = Presence::default();
        presence.connect(&device(1), 5).unwrap();
        assert_eq!(
            presence.disconnect(1, "ann", departure(7)),
            AfterDisconnect::GracePeriod
        );
        assert_eq!(presence.connect(&device(2), 5).unwrap(), None);
        assert!(presence.grace_expired("ann", departure(7)).is_none());
        assert_eq!(presence.status("ann"), PresenceStatus::Online);
    }

    #[test]
    fn only_a_return_from_offline_is_coming_online() {
        let presence = Presence::default();
        presence.connect(&device(1), 5).unwrap();
        presence.set_status(1, "ann", SettableStatus::Away);
        // A new device of an away user makes them online, but they were connected all along.
        assert_eq!(
            presence.connect(&device(2), 5).unwrap(),
            Some(StatusChange::to(PresenceStatus::Online))
        );
        presence.disconnect(1, "ann", departure(4));
        presence.disconnect(2, "ann", departure(5));
        presence.grace_expired("ann", departure(5));
        assert_eq!(
            presence.connect(&device(3), 5).unwrap(),
            Some(StatusChange {
                status: PresenceStatus::Online,
                came_online: true
            })
        );
    }

    #[test]
    fn last_online_device_leaving_makes_the_user_away() {
        let presence = Presence::default();
        presence.connect(&device(1), 5).unwrap();
        presence.connect(&device(2), 5).unwrap();
        presence.set_status(2, "ann", SettableStatus::Away);
        assert_eq!(
            presence.disconnect(1, "ann", departure(3)),
            AfterDisconnect::Changed(PresenceStatus::Away)
        );
    }

    #[test]
    fn connection_cap() {
        let presence = Presence::default();
        presence.connect(&device(1), 2).unwrap();
        presence.connect(&device(2), 2).unwrap();
        assert!(presence.connect(&device(3), 2).is_err());
        assert_eq!(presence.connections("ann"), 2);
    }

    #[test]
    fn sessions_of_reaches_every_live_device() {
        let presence = Presence::default();
        let (phone, laptop) = (device(1), device(2));
        presence.connect(&phone, 5).unwrap();
        presence.connect(&laptop, 5).unwrap();
        let mut ids: Vec<_> = presence.sessions_of("ann").iter().map(|h| h.id).collect();
        ids.sort();
        assert_eq!(ids, [1, 2]);
        presence.disconnect(1, "ann", departure(1));
        drop(phone);
        assert_eq!(presence.sessions_of("ann").len(), 1);
        assert!(presence.sessions_of("bob").is_empty());
    }
}
