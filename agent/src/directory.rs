//! The coordinators this agent keeps a stream to. It starts with the
//! configured addresses and learns the rest from Welcome (each coordinator
//! lists every live member), so an agent given one address ends up
//! connected to all of them.
//!
//! Two addresses may reach the same coordinator (`localhost` and
//! `127.0.0.1`); two streams from one host to one coordinator would replace
//! each other forever, so a stream whose Welcome names a coordinator that
//! another live stream already reaches is ended for good.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use tokio::sync::mpsc;
use tracing::info;

pub struct Directory {
    /// Addresses that have a connection (normalized).
    claimed: Mutex<HashSet<String>>,
    /// Coordinator id → (address of the stream that reached it, stream up).
    reached: Mutex<HashMap<String, (String, bool)>>,
    found: mpsc::UnboundedSender<String>,
}

/// `http://host:port/` and `host:port` are one address.
pub fn normalize(address: &str) -> String {
    let a = address.trim();
    let a = a
        .strip_prefix("http://")
        .or_else(|| a.strip_prefix("https://"))
        .unwrap_or(a);
    a.trim_end_matches('/').to_string()
}

impl Directory {
    /// The directory, and the receiver of newly discovered addresses (the
    /// agent starts a connection for each).
    pub fn new() -> (Directory, mpsc::UnboundedReceiver<String>) {
        let (found, rx) = mpsc::unbounded_channel();
        (
            Directory {
                claimed: Mutex::new(HashSet::new()),
                reached: Mutex::new(HashMap::new()),
                found,
            },
            rx,
        )
    }

    /// True when `address` is new: the caller starts its connection.
    pub fn claim(&self, address: &str) -> bool {
        self.claimed
            .lock()
            .expect("claimed lock")
            .insert(normalize(address))
    }

    /// A stream to `address` was welcomed by `coordinator_id`, which listed
    /// `peers`. Announces unknown peers. False: another live stream already
    /// reaches this coordinator, so this one must end.
    pub fn welcomed(&self, address: &str, coordinator_id: &str, peers: &[String]) -> bool {
        let address = normalize(address);
        {
            let mut reached = self.reached.lock().expect("reached lock");
            match reached.get(coordinator_id) {
                Some((other, true)) if *other != address => return false,
                _ => {
                    reached.insert(coordinator_id.to_string(), (address, true));
                }
            }
        }
        self.peers(coordinator_id, peers);
        true
    }

    /// `coordinator_id` listed the live coordinators (Welcome, Peers):
    /// announces the unknown ones.
    pub fn peers(&self, coordinator_id: &str, peers: &[String]) {
        for peer in peers {
            if self.claim(peer) {
                info!(coordinator = %peer, via = %coordinator_id, "discovered a coordinator");
                let _ = self.found.send(peer.clone());
            }
        }
    }

    /// The welcomed stream to `address` ended.
    pub fn down(&self, address: &str, coordinator_id: &str) {
        let address = normalize(address);
        let mut reached = self.reached.lock().expect("reached lock");
        if let Some((a, up)) = reached.get_mut(coordinator_id)
            && *a == address
        {
            *up = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovers_each_peer_once_and_refuses_a_second_route_to_one_coordinator() {
        let (d, mut found) = Directory::new();
        assert!(d.claim("http://127.0.0.1:1/"));
        assert!(!d.claim("127.0.0.1:1"), "one address, two spellings");
        let peers = vec!["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        assert!(d.welcomed("127.0.0.1:1", "c1", &peers));
        assert_eq!(found.try_recv().unwrap(), "127.0.0.1:2");
        assert!(found.try_recv().is_err(), "each peer once");
        assert!(d.welcomed("127.0.0.1:1", "c1", &peers));
        assert!(found.try_recv().is_err());

        // localhost:1 reaches c1 too while 127.0.0.1:1 is up: refused.
        assert!(!d.welcomed("localhost:1", "c1", &[]));
        // Once that stream is down (c1 moved), the other route may take over.
        d.down("127.0.0.1:1", "c1");
        assert!(d.welcomed("localhost:1", "c1", &[]));
    }
}
