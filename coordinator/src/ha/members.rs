//! Membership: each live coordinator has a key `<prefix>/members/<id>`
//! bound to its session lease, holding the address agents and peers use.
//! A coordinator that dies or freezes drops out when its lease expires.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::session::Session;
use crate::store::{Compare, Op, Result, Store, StoreError, Txn};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    /// host:port of its API (agents, droverctl, forwarding, artifact fetches).
    pub address: String,
    /// Past its warm-up: agents have had time to reconnect, so its view of
    /// the fleet is whole and it may lead shards next to ready peers.
    #[serde(default)]
    pub ready: bool,
}

pub struct Members {
    store: Arc<dyn Store>,
    prefix: String,
}

impl Members {
    pub fn new(store: Arc<dyn Store>, key_prefix: &str) -> Members {
        Members {
            store,
            prefix: crate::store::keys::Keys::new(key_prefix).members(),
        }
    }

    /// The prefix the membership keys live under (for watches).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Announces `me` for as long as `session` lives. Refused while
    /// another live session holds the same id (two coordinators sharing an
    /// id, or this one's previous run whose lease has not expired yet).
    pub async fn register(&self, me: &Member, session: &Session) -> Result<()> {
        let key = format!("{}{}", self.prefix, me.id);
        let put = Op::Put {
            key: key.clone(),
            value: serde_json::to_vec(me).expect("a member serializes"),
            lease: session.lease,
        };
        let created = self
            .store
            .txn(Txn {
                compares: vec![Compare::Missing(key.clone())],
                success: vec![put.clone()],
                failure: vec![],
            })
            .await?;
        if created.succeeded {
            return Ok(());
        }
        // Ours already (an update, e.g. ready): overwrite it, still ours.
        let r = self
            .store
            .txn(Txn {
                compares: vec![Compare::Lease(key.clone(), session.lease)],
                success: vec![put],
                failure: vec![],
            })
            .await?;
        if r.succeeded {
            Ok(())
        } else {
            Err(StoreError::Backend(format!(
                "coordinator id {:?} is held by another live session (a second coordinator with this --id, or this one's previous run until its lease expires)",
                me.id
            )))
        }
    }

    /// Every live coordinator, ordered by id.
    pub async fn live(&self) -> Result<Vec<Member>> {
        let (kvs, _) = self.store.range(&self.prefix).await?;
        let mut members: Vec<Member> = kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(members)
    }
}
