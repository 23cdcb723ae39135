//! The shards this coordinator leads, and how they are shared.
//!
//! One session lease per coordinator (membership + every election key it
//! holds). Every round — each TTL/3, and at once when a coordinator joins or
//! leaves or an election key is deleted — it:
//! 1. opens a new session if the old one was lost (all its shards are lost
//!    with it: leadership is never carried across sessions);
//! 2. reads the live members and computes its fair share,
//!    `ceil(shards / ready members)`; a coordinator still in its warm-up
//!    (agents have not all reconnected to it yet) counts for nothing and
//!    leads nothing while a ready peer exists — only a cold cluster (nobody
//!    ready, e.g. a lone coordinator at start) shares among everyone;
//! 3. resigns the shards it holds beyond the share (its least preferred), so
//!    work spreads when a coordinator joins;
//! 4. campaigns for free shards, most preferred first, up to the share, so
//!    work gathers when one leaves.
//!
//! Preference is rendezvous hashing of (coordinator id, shard): stable, and
//! different coordinators prefer different shards, so they rarely race.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_common::proto::ShardEpoch;
use tokio::sync::broadcast;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::election::{Election, Leadership};
use super::members::{Member, Members};
use super::session::Session;
use crate::store::{Compare, Store, WatchEvent, WatchStream};

/// How many shards `me` should lead among the `live` members: an equal
/// share among the ready ones (`me` included); among everyone in a cold
/// cluster (nobody ready); none while `me` warms up next to ready peers.
pub fn fair_share(shards: u32, me: &Member, live: &[Member]) -> usize {
    let others = live.iter().filter(|m| m.id != me.id);
    let ready_others = others.clone().filter(|m| m.ready).count();
    let sharing = match (me.ready, ready_others) {
        (true, n) => n + 1,
        (false, 0) => others.count() + 1,
        (false, _) => return 0,
    };
    shards.div_ceil(sharing as u32) as usize
}

/// A change of leadership of one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardEvent {
    Gained(u32),
    Lost(u32),
    /// A coordinator joined or left (see [`ShardLeases::members`]).
    MembersChanged,
}

pub struct ShardLeases {
    store: Arc<dyn Store>,
    prefix: String,
    me: Member,
    started: std::time::Instant,
    warmup: Duration,
    /// Registered as ready (past the warm-up) in the current session.
    announced_ready: AtomicBool,
    members: Members,
    pub shards: u32,
    ttl: Duration,
    session: Mutex<Option<Arc<Session>>>,
    held: Mutex<BTreeMap<u32, (Arc<Election>, Leadership)>>,
    /// Live members as of the last round.
    live: Mutex<Vec<Member>>,
    events: broadcast::Sender<ShardEvent>,
    /// Fault injection (`--fault-ignore-lease-loss`).
    ignore_lease_loss: bool,
}

impl ShardLeases {
    pub fn new(
        store: Arc<dyn Store>,
        key_prefix: &str,
        me: Member,
        shards: u32,
        ttl: Duration,
        warmup: Duration,
        ignore_lease_loss: bool,
    ) -> Arc<ShardLeases> {
        Arc::new(ShardLeases {
            members: Members::new(store.clone(), key_prefix),
            store,
            prefix: crate::store::keys::Keys::new(key_prefix).elections(),
            me,
            started: std::time::Instant::now(),
            warmup,
            announced_ready: AtomicBool::new(false),
            shards: shards.max(1),
            ttl,
            session: Mutex::new(None),
            held: Mutex::new(BTreeMap::new()),
            live: Mutex::new(Vec::new()),
            events: broadcast::channel(256).0,
            ignore_lease_loss,
        })
    }

    pub fn id(&self) -> &str {
        &self.me.id
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ShardEvent> {
        self.events.subscribe()
    }

    fn election(&self, shard: u32) -> Election {
        Election::new(
            self.store.clone(),
            format!("{}{shard}", self.prefix),
            self.me.id.clone(),
        )
    }

    /// Leadership of `shard`, while it can be proven.
    pub fn leadership(&self, shard: u32) -> Option<Leadership> {
        self.held
            .lock()
            .expect("held lock")
            .get(&shard)
            .map(|(_, l)| l.clone())
            .filter(|l| !l.lost.is_cancelled())
    }

    /// The shards held right now with their epochs (Welcome, Fence).
    pub fn epochs(&self) -> Vec<ShardEpoch> {
        self.held
            .lock()
            .expect("held lock")
            .iter()
            .filter(|(_, (_, l))| !l.lost.is_cancelled())
            .map(|(s, (_, l))| ShardEpoch {
                shard: *s,
                epoch: l.epoch,
            })
            .collect()
    }

    /// The live coordinators as of the last round (this one included once
    /// it has registered).
    pub fn members(&self) -> Vec<Member> {
        self.live.lock().expect("live lock").clone()
    }

    /// Every live coordinator's address (Welcome, Peers).
    pub fn addresses(&self) -> Vec<String> {
        self.members()
            .into_iter()
            .map(|m| m.address)
            .filter(|a| !a.is_empty())
            .collect()
    }

    /// Every other live coordinator's address.
    pub fn peer_addresses(&self) -> Vec<String> {
        self.members()
            .into_iter()
            .filter(|m| m.id != self.me.id && !m.address.is_empty())
            .map(|m| m.address)
            .collect()
    }

    /// The compare that fences a write for `shard` (None: not the leader).
    pub fn guard(&self, shard: u32) -> Option<Compare> {
        let held = self.held.lock().expect("held lock");
        held.get(&shard)
            .filter(|(_, l)| !l.lost.is_cancelled())
            .map(|(e, l)| e.guard(l))
    }

    /// Checks with the store that our election key for `shard` is still the
    /// one we created; if not, steps down (a frozen leader learns it here).
    pub async fn still_leader(&self, shard: u32) -> bool {
        let Some(leadership) = self.leadership(shard) else {
            return false;
        };
        let current = self.store.get(&format!("{}{shard}", self.prefix)).await;
        let ours = matches!(&current, Ok(Some(kv)) if kv.create_revision == leadership.epoch);
        if !ours && current.is_ok() {
            warn!(
                shard,
                "our election key is gone or another's: stepping down"
            );
            leadership.lost.cancel();
        }
        ours
    }

    /// Who leads `shard` (None: nobody right now). The address comes from
    /// the membership keys.
    pub async fn leader_of(&self, shard: u32) -> Option<Member> {
        let (id, _) = self.election(shard).leader().await.ok().flatten()?;
        if let Some(m) = self.members().into_iter().find(|m| m.id == id) {
            return Some(m);
        }
        let live = self.members.live().await.ok()?;
        live.into_iter().find(|m| m.id == id).or(Some(Member {
            id,
            address: String::new(),
            ready: false,
        }))
    }

    /// Every live coordinator with the shards it leads, and the shards
    /// nobody leads, as the store says now.
    pub async fn overview(
        &self,
    ) -> crate::store::Result<(Vec<(Member, Vec<ShardEpoch>)>, Vec<u32>)> {
        let live = self.members.live().await?;
        let (kvs, _) = self.store.range(&self.prefix).await?;
        let mut led: BTreeMap<String, Vec<ShardEpoch>> = BTreeMap::new();
        let mut leaderless: Vec<u32> = (0..self.shards).collect();
        for kv in kvs {
            let Some(shard) = kv
                .key
                .strip_prefix(&self.prefix)
                .and_then(|s| s.parse().ok())
            else {
                continue;
            };
            leaderless.retain(|s| *s != shard);
            led.entry(String::from_utf8_lossy(&kv.value).into_owned())
                .or_default()
                .push(ShardEpoch {
                    shard,
                    epoch: kv.create_revision,
                });
        }
        let out = live
            .into_iter()
            .map(|m| {
                let mut shards = led.remove(&m.id).unwrap_or_default();
                shards.sort_by_key(|s| s.shard);
                (m, shards)
            })
            .collect();
        Ok((out, leaderless))
    }

    /// This coordinator's preference for `shard` (higher first).
    fn preference(&self, shard: u32) -> u64 {
        super::shards::preference(&self.me.id, shard)
    }

    fn forget_lost(&self) {
        let lost: Vec<u32> = {
            let mut held = self.held.lock().expect("held lock");
            let lost: Vec<u32> = held
                .iter()
                .filter(|(_, (_, l))| l.lost.is_cancelled())
                .map(|(s, _)| *s)
                .collect();
            for s in &lost {
                held.remove(s);
            }
            lost
        };
        for s in lost {
            warn!(shard = s, "lost the shard's leadership");
            let _ = self.events.send(ShardEvent::Lost(s));
        }
    }

    /// The current session, or a new one (registered as a member) if there
    /// is none or it was lost. None while the store is unreachable.
    async fn ensure_session(&self) -> Option<Arc<Session>> {
        let current = self.session.lock().expect("session lock").clone();
        if let Some(s) = current.filter(|s| !s.is_lost()) {
            return Some(s);
        }
        let session =
            match Session::open(self.store.clone(), self.ttl, self.ignore_lease_loss).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "cannot open a session with the store; leading nothing");
                    return None;
                }
            };
        let me = self.me_now();
        if let Err(e) = self.members.register(&me, &session).await {
            warn!(error = %e, "cannot register as a member; leading nothing");
            session.close().await;
            return None;
        }
        self.announced_ready.store(me.ready, Ordering::Relaxed);
        info!(id = %self.me.id, address = %self.me.address, lease = session.lease, "joined the coordinators");
        *self.session.lock().expect("session lock") = Some(session.clone());
        Some(session)
    }

    /// This coordinator's membership record as of now.
    fn me_now(&self) -> Member {
        Member {
            ready: self.started.elapsed() >= self.warmup,
            ..self.me.clone()
        }
    }

    /// One round: forget lost shards, renew the session if needed, resign
    /// beyond the fair share, campaign up to it.
    pub async fn campaign_once(&self) {
        self.forget_lost();
        let Some(session) = self.ensure_session().await else {
            return;
        };
        self.forget_lost();
        let me = self.me_now();
        if me.ready && !self.announced_ready.load(Ordering::Relaxed) {
            match self.members.register(&me, &session).await {
                Ok(()) => {
                    info!(id = %me.id, "warm-up over: ready to lead shards");
                    self.announced_ready.store(true, Ordering::Relaxed);
                }
                Err(e) => warn!(error = %e, "cannot announce readiness"),
            }
        }
        let live = match self.members.live().await {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "cannot read the membership");
                return;
            }
        };
        let live_count = live.len();
        let share = fair_share(self.shards, &me, &live);
        let changed = {
            let mut known = self.live.lock().expect("live lock");
            let changed = *known != live;
            *known = live;
            changed
        };
        if changed {
            let _ = self.events.send(ShardEvent::MembersChanged);
        }

        // Resign the least preferred shards beyond the share.
        let mut held: Vec<u32> = self
            .held
            .lock()
            .expect("held lock")
            .keys()
            .copied()
            .collect();
        if held.len() > share {
            held.sort_by_key(|s| std::cmp::Reverse(self.preference(*s)));
            for shard in held.split_off(share) {
                let entry = self.held.lock().expect("held lock").remove(&shard);
                if let Some((election, leadership)) = entry {
                    info!(
                        shard,
                        share,
                        live = live_count,
                        "resigning the shard (fair share)"
                    );
                    if let Err(e) = election.resign(&leadership).await {
                        warn!(shard, error = %e, "resigning failed; the lease will free it");
                    }
                    let _ = self.events.send(ShardEvent::Lost(shard));
                }
            }
            return;
        }
        if held.len() == share {
            return;
        }

        // Campaign for free shards, most preferred first, up to the share.
        let taken: HashSet<u32> = match self.store.range(&self.prefix).await {
            Ok((kvs, _)) => kvs
                .iter()
                .filter_map(|kv| kv.key.strip_prefix(&self.prefix)?.parse().ok())
                .collect(),
            Err(e) => {
                warn!(error = %e, "cannot read the elections");
                return;
            }
        };
        let mut free: Vec<u32> = (0..self.shards).filter(|s| !taken.contains(s)).collect();
        free.sort_by_key(|s| std::cmp::Reverse(self.preference(*s)));
        let mut holding = held.len();
        for shard in free {
            if holding >= share {
                break;
            }
            let election = Arc::new(self.election(shard));
            match election.try_acquire(&session).await {
                Ok(Some(leadership)) => {
                    self.held
                        .lock()
                        .expect("held lock")
                        .insert(shard, (election, leadership));
                    holding += 1;
                    let _ = self.events.send(ShardEvent::Gained(shard));
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(shard, error = %e, "campaign failed");
                    return;
                }
            }
        }
    }

    /// Changes that call for a round at once: a coordinator joining or
    /// leaving, an election key deleted (resigned or expired).
    async fn watch_changes(&self) -> Option<WatchStream> {
        let members = self.store.watch(self.members.prefix()).await.ok()?;
        let elections = self.store.watch(&self.prefix).await.ok()?;
        // A lagged watch is a change too (a round runs, then it is watched again).
        let elections = elections.filter(|e| matches!(e, Ok(WatchEvent::Delete { .. }) | Err(_)));
        Some(Box::pin(members.merge(elections)))
    }

    /// Runs rounds until `stop`; then ends the session, which frees every
    /// shard at once for the standbys.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut changes: Option<WatchStream> = None;
        loop {
            self.campaign_once().await;
            if changes.is_none() {
                changes = self.watch_changes().await;
            }
            let session_lost = self
                .session
                .lock()
                .expect("session lock")
                .as_ref()
                .filter(|s| !s.is_lost())
                .map(|s| s.lost.clone());
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(self.ttl / 3) => {}
                _ = async { session_lost.expect("checked").cancelled().await }, if session_lost.is_some() => {}
                change = async { changes.as_mut().expect("checked").next().await }, if changes.is_some() => {
                    if change.is_none() {
                        changes = None;
                    }
                }
            }
        }
        let session = self.session.lock().expect("session lock").take();
        let held: Vec<u32> = std::mem::take(&mut *self.held.lock().expect("held lock"))
            .into_keys()
            .collect();
        if let Some(session) = session {
            session.close().await;
        }
        for shard in held {
            let _ = self.events.send(ShardEvent::Lost(shard));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    fn member(id: &str, ready: bool) -> Member {
        Member {
            id: id.into(),
            address: format!("{id}:1"),
            ready,
        }
    }

    #[test]
    fn fair_share_counts_ready_members_and_cold_clusters() {
        let (a, b, c) = (member("a", true), member("b", true), member("c", false));
        // Alone, ready or not: everything.
        assert_eq!(fair_share(16, &a, std::slice::from_ref(&a)), 16);
        assert_eq!(fair_share(16, &c, std::slice::from_ref(&c)), 16);
        // Two ready: half each; a third warming up counts for nothing and
        // leads nothing.
        let live = [a.clone(), b.clone(), c.clone()];
        assert_eq!(fair_share(16, &a, &live), 8);
        assert_eq!(fair_share(16, &c, &live), 0);
        // Once ready: ceil(16 / 3).
        let c = member("c", true);
        assert_eq!(fair_share(16, &a, &[a.clone(), b.clone(), c.clone()]), 6);
        // A cold cluster (nobody ready) shares among everyone.
        let cold = [member("a", false), member("b", false)];
        assert_eq!(fair_share(16, &cold[0], &cold), 8);
        // Before its own key is read back, a member counts itself.
        assert_eq!(fair_share(16, &a, std::slice::from_ref(&b)), 8);
        // Shares always cover every shard.
        for n in 1..=20u32 {
            let live: Vec<Member> = (0..n).map(|i| member(&format!("m{i}"), true)).collect();
            assert!(fair_share(16, &live[0], &live) * n as usize >= 16);
        }
    }

    async fn leases(store: &Arc<dyn Store>, id: &str, warmup: Duration) -> Arc<ShardLeases> {
        ShardLeases::new(
            store.clone(),
            "/t",
            Member {
                id: id.into(),
                address: format!("{id}:1"),
                ready: false,
            },
            16,
            Duration::from_secs(3),
            warmup,
            false,
        )
    }

    fn held(l: &ShardLeases) -> usize {
        l.epochs().len()
    }

    #[tokio::test]
    async fn shards_spread_when_coordinators_join_and_gather_when_one_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let a = leases(&store, "a", Duration::ZERO).await;
        a.campaign_once().await;
        assert_eq!(held(&a), 16, "alone, a leads everything");

        let b = leases(&store, "b", Duration::ZERO).await;
        for _ in 0..3 {
            b.campaign_once().await;
            a.campaign_once().await;
        }
        assert_eq!((held(&a), held(&b)), (8, 8));

        let c = leases(&store, "c", Duration::ZERO).await;
        for _ in 0..3 {
            c.campaign_once().await;
            a.campaign_once().await;
            b.campaign_once().await;
        }
        let (ha, hb, hc) = (held(&a), held(&b), held(&c));
        assert_eq!(ha + hb + hc, 16, "every shard led once");
        assert!(ha <= 6 && hb <= 6 && hc <= 6, "{ha} {hb} {hc}");
        let (overview, leaderless) = a.overview().await.unwrap();
        assert!(leaderless.is_empty());
        assert_eq!(overview.len(), 3);

        // c leaves (its session ends): a and b take its shards.
        let stop = CancellationToken::new();
        stop.cancel();
        c.clone().run(stop).await;
        for _ in 0..2 {
            a.campaign_once().await;
            b.campaign_once().await;
        }
        assert_eq!((held(&a), held(&b)), (8, 8));
    }

    #[tokio::test]
    async fn a_second_coordinator_with_the_same_id_leads_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let first = leases(&store, "a", Duration::ZERO).await;
        first.campaign_once().await;
        let twin = leases(&store, "a", Duration::ZERO).await;
        for _ in 0..3 {
            twin.campaign_once().await;
            first.campaign_once().await;
        }
        assert_eq!((held(&first), held(&twin)), (16, 0));
        // Once the first has left, the id is free again.
        let stop = CancellationToken::new();
        stop.cancel();
        first.clone().run(stop).await;
        twin.campaign_once().await;
        assert_eq!(held(&twin), 16);
    }

    #[tokio::test]
    async fn a_coordinator_warming_up_takes_nothing_from_ready_peers() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let a = leases(&store, "a", Duration::ZERO).await;
        a.campaign_once().await;
        let b = leases(&store, "b", Duration::from_secs(3600)).await;
        for _ in 0..3 {
            b.campaign_once().await;
            a.campaign_once().await;
        }
        assert_eq!((held(&a), held(&b)), (16, 0));
    }
}
