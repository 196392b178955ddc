//! Fan-out between nodes.
//!
//! Everything that goes to a room's subscribers is published through a [`Broker`], which
//! delivers it to every node's [`Hub`]. A single node uses [`LocalBroker`], which hands the
//! frame straight to the local hub. A multi-node deployment puts Redis pub/sub behind the same
//! trait, so the chat logic never knows how many nodes there are.
//!
//! `publish` never blocks: it is called from the committer in seq order, and a room's events
//! must leave in the order they were published.

use std::sync::Arc;

use crate::hub::Hub;
use crate::outbound::{Outbound, Priority, SessionId};

/// Delivers room events to every subscriber on every node.
pub trait Broker: Send + Sync + std::fmt::Debug + 'static {
    /// Publishes one encoded frame to `room`, skipping the session `except` (if any).
    fn publish(&self, room: &str, item: Outbound, priority: Priority, except: Option<SessionId>);
}

/// Single-node broker: publishing is local delivery.
#[derive(Debug)]
pub struct LocalBroker {
    hub: Arc<Hub>,
}

impl LocalBroker {
    /// A broker delivering to `hub`.
    pub fn new(hub: Arc<Hub>) -> LocalBroker {
        LocalBroker { hub }
    }
}

impl Broker for LocalBroker {
    fn publish(&self, room: &str, item: Outbound, priority: Priority, except: Option<SessionId>) {
        self.hub.deliver(room, &item, priority, except);
    }
}
