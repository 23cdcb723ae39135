//! Notifications: webhooks told about deploys and release trains
//! (`rules.rs` says what and when, `payload.rs` what is sent, `http.rs`
//! how). The ledger writes each notifiable audit event to the outbox in
//! the same transaction as the event (so nothing acknowledged is lost);
//! [`Notifier::run`] delivers them, on the leader of shard 0 only, in
//! order per subscription, and records how far each got with that
//! shard's fencing guard (a deposed leader's progress never lands: at
//! worst an event is sent twice, with the same X-Drover-Event-Id).

pub mod http;
pub mod payload;
pub mod rules;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use drover_common::proto::{
    AuditEvent, Delivery, NotificationsStatusResponse, Subscription, SubscriptionStatus,
    WebhookFormat,
};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::deploy::clock::{Clock, SystemClock};
use crate::ha::leases::ShardLeases;
use crate::store::keys::Keys;
use crate::store::{Compare, KeyValue, Op, Store, StoreError, Txn};

/// The shard whose leader delivers.
const DELIVERING_SHARD: u32 = 0;
/// A webhook's answer is waited for this long.
const POST_TIMEOUT: Duration = Duration::from_secs(5);
/// Delivered outbox entries are kept this long (for `status`), then removed.
const OUTBOX_RETENTION_MS: u64 = 3_600_000;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How far a subscription's deliveries got: the last entry delivered (or
/// passed over as not matching), by store revision then key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Cursor {
    revision: u64,
    key: String,
    delivered: u64,
    last_delivered_unix_ms: u64,
}

impl Cursor {
    fn passed(&self, kv: &KeyValue) -> bool {
        (kv.create_revision, kv.key.as_str()) <= (self.revision, self.key.as_str())
    }
}

/// The delivery being retried at a subscription's head.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Head {
    key: String,
    attempts: u32,
    last_error: String,
    next_attempt_unix_ms: u64,
}

pub struct Notifier {
    store: Arc<dyn Store>,
    keys: Keys,
    leases: Arc<ShardLeases>,
    clock: Arc<dyn Clock>,
    /// `--webhook-secrets`.
    secrets: Option<PathBuf>,
}

fn id_of(keys: &Keys, kv: &KeyValue) -> String {
    kv.key
        .strip_prefix(&keys.outbox())
        .unwrap_or(&kv.key)
        .to_string()
}

impl Notifier {
    pub fn new(
        store: Arc<dyn Store>,
        key_prefix: &str,
        leases: Arc<ShardLeases>,
        secrets: Option<PathBuf>,
    ) -> Arc<Notifier> {
        Arc::new(Notifier {
            store,
            keys: Keys::new(key_prefix),
            leases,
            clock: Arc::new(SystemClock),
            secrets,
        })
    }

    /// Creates or replaces a subscription (a new one is told only of
    /// events after now; a replaced one keeps its place).
    pub async fn put(&self, mut sub: Subscription) -> Result<Subscription, NotifyError> {
        if let Some(why) = rules::invalid(&sub) {
            return Err(NotifyError::Invalid(why));
        }
        if !sub.secret.is_empty() {
            let Some(dir) = &self.secrets else {
                return Err(NotifyError::Invalid(
                    "secret: this coordinator has no --webhook-secrets directory".into(),
                ));
            };
            if !dir.join(&sub.secret).is_file() {
                return Err(NotifyError::Invalid(format!(
                    "secret: no file {:?} in the coordinator's --webhook-secrets directory",
                    sub.secret
                )));
            }
        }
        sub.created_at_unix_ms = self.clock.now_unix_ms();
        let key = self.keys.subscription(&sub.name);
        let (_, revision) = self.store.range(&self.keys.outbox()).await?;
        let cursor = Cursor {
            revision,
            key: String::new(),
            ..Default::default()
        };
        // The cursor only when new: replacing keeps the place.
        let cursor_key = self.keys.notify_cursor(&sub.name);
        self.store
            .txn(Txn {
                compares: vec![Compare::Missing(cursor_key.clone())],
                success: vec![
                    Op::put(key.clone(), sub.encode_to_vec()),
                    Op::put(cursor_key, serde_json::to_vec(&cursor).expect("serializes")),
                ],
                failure: vec![Op::put(key, sub.encode_to_vec())],
            })
            .await?;
        info!(subscription = %sub.name, url = %sub.url, "subscription saved");
        Ok(sub)
    }

    pub async fn delete(&self, name: &str) -> Result<Subscription, NotifyError> {
        let key = self.keys.subscription(name);
        let kv = self
            .store
            .get(&key)
            .await?
            .ok_or_else(|| NotifyError::NotFound(format!("no subscription {name:?}")))?;
        let sub = Subscription::decode(kv.value.as_slice()).unwrap_or_default();
        self.store
            .txn(Txn {
                compares: vec![],
                success: vec![
                    Op::Delete(key),
                    Op::Delete(self.keys.notify_cursor(name)),
                    Op::Delete(self.keys.notify_head(name)),
                ],
                failure: vec![],
            })
            .await?;
        Ok(sub)
    }

    pub async fn list(&self) -> Result<Vec<Subscription>, NotifyError> {
        let (kvs, _) = self.store.range(&self.keys.subscriptions()).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| Subscription::decode(kv.value.as_slice()).ok())
            .collect())
    }

    /// Per subscription: delivered so far, pending, and its head delivery.
    pub async fn status(&self) -> Result<NotificationsStatusResponse, NotifyError> {
        let outbox = self.outbox().await?;
        let mut out = NotificationsStatusResponse::default();
        for sub in self.list().await? {
            let cursor = self.cursor(&sub.name).await?;
            let head = self.head(&sub.name).await?;
            let pending: Vec<&(KeyValue, AuditEvent)> = outbox
                .iter()
                .filter(|(kv, e)| !cursor.passed(kv) && rules::matches(&sub, e))
                .collect();
            out.subscriptions.push(SubscriptionStatus {
                name: sub.name.clone(),
                delivered: cursor.delivered,
                last_delivered_unix_ms: cursor.last_delivered_unix_ms,
                pending: pending.len() as u64,
            });
            if let Some((kv, e)) = pending.first() {
                let event = rules::event_of(e.event()).unwrap_or_default();
                let retried = head.as_ref().filter(|h| h.key == kv.key);
                out.head.push(Delivery {
                    subscription: sub.name.clone(),
                    event_id: id_of(&self.keys, kv),
                    event: event as i32,
                    summary: payload::summary(event, e),
                    attempts: retried.map_or(0, |h| h.attempts),
                    last_error: retried.map_or(String::new(), |h| h.last_error.clone()),
                    next_attempt_unix_ms: retried.map_or(0, |h| h.next_attempt_unix_ms),
                    at_unix_ms: e.at_unix_ms,
                });
            }
        }
        Ok(out)
    }

    /// Delivers while this coordinator leads shard 0: a round when the
    /// outbox changes, and at least every second (retries come due).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut changes = None;
        loop {
            // Only the deliverer watches the outbox.
            let leading = self.leases.leadership(DELIVERING_SHARD).is_some();
            if !leading {
                changes = None;
            } else if changes.is_none() {
                changes = self.store.watch(&self.keys.outbox()).await.ok();
            }
            let tick = tokio::time::sleep(Duration::from_secs(1));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick => {}
                change = async {
                    match changes.as_mut() {
                        Some(c) => c.next().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if change.is_none() {
                        changes = None;
                    }
                }
            }
            if self.leases.leadership(DELIVERING_SHARD).is_none() {
                continue;
            }
            if let Err(e) = self.round().await {
                warn!(error = %e, "notification round failed; trying again");
            }
        }
    }

    /// One round: each subscription as far as it gets, at once.
    async fn round(self: &Arc<Self>) -> Result<(), NotifyError> {
        let outbox = Arc::new(self.outbox().await?);
        let subs = self.list().await?;
        let mut tasks = tokio::task::JoinSet::new();
        for sub in subs.clone() {
            let (this, outbox) = (self.clone(), outbox.clone());
            tasks.spawn(async move { this.advance(&sub, &outbox).await });
        }
        while let Some(done) = tasks.join_next().await {
            if let Ok(Err(e)) = done {
                warn!(error = %e, "a subscription's deliveries stopped this round");
            }
        }
        self.collect(&subs, &outbox).await
    }

    /// Rule 3 for one subscription: deliver in order until one fails or
    /// is not due yet.
    async fn advance(
        &self,
        sub: &Subscription,
        outbox: &[(KeyValue, AuditEvent)],
    ) -> Result<(), NotifyError> {
        let mut cursor = self.cursor(&sub.name).await?;
        let head = self.head(&sub.name).await?;
        let start = cursor.clone();
        for (kv, e) in outbox.iter().filter(|(kv, _)| !start.passed(kv)) {
            if !rules::matches(sub, e) {
                cursor.revision = kv.create_revision;
                cursor.key = kv.key.clone();
                continue;
            }
            let now = self.clock.now_unix_ms();
            let retried = head.as_ref().filter(|h| h.key == kv.key);
            if retried.is_some_and(|h| h.next_attempt_unix_ms > now) {
                break;
            }
            match self.deliver(sub, kv, e).await {
                Ok(()) => {
                    cursor.revision = kv.create_revision;
                    cursor.key = kv.key.clone();
                    cursor.delivered += 1;
                    cursor.last_delivered_unix_ms = self.clock.now_unix_ms();
                    let ops = vec![Op::Delete(self.keys.notify_head(&sub.name))];
                    if !self.save(sub, &cursor, ops).await? {
                        return Ok(());
                    }
                }
                Err(why) => {
                    let attempts = retried.map_or(0, |h| h.attempts) + 1;
                    let wait = rules::backoff(attempts);
                    warn!(subscription = %sub.name, event = %id_of(&self.keys, kv), attempts, error = %why, "webhook delivery failed; retrying in {wait:?}");
                    let head = Head {
                        key: kv.key.clone(),
                        attempts,
                        last_error: why,
                        next_attempt_unix_ms: now + wait.as_millis() as u64,
                    };
                    let ops = vec![Op::put(
                        self.keys.notify_head(&sub.name),
                        serde_json::to_vec(&head).expect("serializes"),
                    )];
                    self.save(sub, &cursor, ops).await?;
                    return Ok(());
                }
            }
        }
        if cursor != start {
            self.save(sub, &cursor, Vec::new()).await?;
        }
        Ok(())
    }

    /// Writes `cursor` (and `ops`) as shard 0's leader while the
    /// subscription exists; false if it was deleted or we lost the shard.
    async fn save(
        &self,
        sub: &Subscription,
        cursor: &Cursor,
        mut ops: Vec<Op>,
    ) -> Result<bool, NotifyError> {
        let Some(guard) = self.leases.guard(DELIVERING_SHARD) else {
            return Ok(false);
        };
        ops.push(Op::put(
            self.keys.notify_cursor(&sub.name),
            serde_json::to_vec(cursor).expect("serializes"),
        ));
        let r = self
            .store
            .txn(Txn {
                compares: vec![guard, Compare::Exists(self.keys.subscription(&sub.name))],
                success: ops,
                failure: vec![],
            })
            .await?;
        Ok(r.succeeded)
    }

    /// One POST of one event to one subscription.
    async fn deliver(
        &self,
        sub: &Subscription,
        kv: &KeyValue,
        e: &AuditEvent,
    ) -> Result<(), String> {
        let event = rules::event_of(e.event()).unwrap_or_default();
        let id = id_of(&self.keys, kv);
        let format = WebhookFormat::try_from(sub.format).unwrap_or(WebhookFormat::Json);
        let body = payload::body(format, &id, event, e);
        let mut headers = vec![
            (payload::EVENT_ID_HEADER, id.clone()),
            (payload::EVENT_HEADER, event.as_str_name().to_string()),
        ];
        if !sub.secret.is_empty() {
            let dir = self
                .secrets
                .as_ref()
                .ok_or("no --webhook-secrets directory here")?;
            let secret = std::fs::read(dir.join(&sub.secret))
                .map_err(|err| format!("secret {:?}: {err}", sub.secret))?;
            headers.push((
                payload::SIGNATURE_HEADER,
                payload::signature(&secret, &body),
            ));
        }
        let started = std::time::Instant::now();
        http::post(&sub.url, &headers, body, POST_TIMEOUT).await?;
        info!(subscription = %sub.name, event = %id, kind = event.as_str_name(), took_ms = started.elapsed().as_millis() as u64, "webhook delivered");
        Ok(())
    }

    /// Removes outbox entries every subscription has passed, once older
    /// than an hour.
    async fn collect(
        &self,
        subs: &[Subscription],
        outbox: &[(KeyValue, AuditEvent)],
    ) -> Result<(), NotifyError> {
        let mut cursors = Vec::new();
        for sub in subs {
            cursors.push(self.cursor(&sub.name).await?);
        }
        let now = self.clock.now_unix_ms();
        let old: Vec<Op> = outbox
            .iter()
            .filter(|(kv, e)| {
                now.saturating_sub(e.at_unix_ms) > OUTBOX_RETENTION_MS
                    && cursors.iter().all(|c| c.passed(kv))
            })
            .map(|(kv, _)| Op::Delete(kv.key.clone()))
            .collect();
        if let (false, Some(guard)) = (old.is_empty(), self.leases.guard(DELIVERING_SHARD)) {
            self.store
                .txn(Txn {
                    compares: vec![guard],
                    success: old,
                    failure: vec![],
                })
                .await?;
        }
        Ok(())
    }

    /// Every outbox entry, in the order it was recorded.
    async fn outbox(&self) -> Result<Vec<(KeyValue, AuditEvent)>, NotifyError> {
        let (mut kvs, _) = self.store.range(&self.keys.outbox()).await?;
        kvs.sort_by(|a, b| (a.create_revision, &a.key).cmp(&(b.create_revision, &b.key)));
        Ok(kvs
            .into_iter()
            .filter_map(|kv| {
                let e = AuditEvent::decode(kv.value.as_slice()).ok()?;
                Some((kv, e))
            })
            .collect())
    }

    async fn cursor(&self, name: &str) -> Result<Cursor, NotifyError> {
        Ok(self
            .store
            .get(&self.keys.notify_cursor(name))
            .await?
            .and_then(|kv| serde_json::from_slice(&kv.value).ok())
            .unwrap_or_default())
    }

    async fn head(&self, name: &str) -> Result<Option<Head>, NotifyError> {
        Ok(self
            .store
            .get(&self.keys.notify_head(name))
            .await?
            .and_then(|kv| serde_json::from_slice(&kv.value).ok()))
    }
}
