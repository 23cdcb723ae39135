//! What is notified, to whom, and when it is tried again: pure.
//!
//! 1. An audit event is notifiable when its kind maps to a
//!    [`NotificationEvent`] (`event_of`); the ledger writes those to the
//!    outbox in the same transaction as the event itself.
//! 2. A subscription gets the notifiable events that match all of its
//!    filters (`matches`): pipeline, train, environment, event kinds.
//! 3. Each subscription gets its events in the order they were recorded
//!    (store revision, then key); one that fails is retried after
//!    `backoff(attempts)` (1 s doubling to 60 s, forever) and holds the
//!    ones after it, so nothing is skipped or lost.

use std::time::Duration;

use drover_common::proto::{AuditEvent, AuditKind, NotificationEvent, Subscription, WebhookFormat};

/// Rule 1.
pub fn event_of(kind: AuditKind) -> Option<NotificationEvent> {
    Some(match kind {
        AuditKind::Started | AuditKind::TrainStarted => NotificationEvent::Started,
        AuditKind::AwaitingApproval => NotificationEvent::AwaitingApproval,
        AuditKind::Failed | AuditKind::TrainFailed => NotificationEvent::Failed,
        AuditKind::RolledBack | AuditKind::TrainRolledBack => NotificationEvent::RolledBack,
        AuditKind::Complete | AuditKind::TrainComplete => NotificationEvent::Complete,
        AuditKind::HostStuck => NotificationEvent::StuckHost,
        _ => return None,
    })
}

/// A release train's own event (written to each member's service audit;
/// notified once per transaction).
pub fn train_wide(kind: AuditKind) -> bool {
    matches!(
        kind,
        AuditKind::TrainStarted
            | AuditKind::TrainStopping
            | AuditKind::TrainComplete
            | AuditKind::TrainFailed
            | AuditKind::TrainRolledBack
            | AuditKind::TrainAborted
    )
}

/// Rule 2.
pub fn matches(sub: &Subscription, e: &AuditEvent) -> bool {
    let Some(event) = event_of(e.event()) else {
        return false;
    };
    (sub.pipeline.is_empty() || sub.pipeline == e.pipeline)
        && match sub.train.as_str() {
            "" => true,
            "*" => !e.train_id.is_empty(),
            id => id == e.train_id,
        }
        && (sub.environment.is_empty() || sub.environment == e.stage)
        && (sub.events.is_empty() || sub.events.contains(&(event as i32)))
}

/// Rule 3: the wait before attempt `attempts + 1`.
pub fn backoff(attempts: u32) -> Duration {
    let secs = 1u64 << attempts.saturating_sub(1).min(6);
    Duration::from_secs(secs.min(60))
}

/// Why a subscription is refused (the field named), if it is.
pub fn invalid(sub: &Subscription) -> Option<String> {
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            && !s.starts_with('.')
    };
    if !name_ok(&sub.name) {
        return Some(format!(
            "name: {:?} is not 1 to 64 of [A-Za-z0-9._-] (not starting with a dot)",
            sub.name
        ));
    }
    match sub.url.parse::<hyper::Uri>() {
        Ok(uri)
            if matches!(uri.scheme_str(), Some("http" | "https"))
                && uri.host().is_some_and(|h| !h.is_empty()) => {}
        _ => {
            return Some(format!(
                "url: {:?} is not an http:// or https:// URL with a host",
                sub.url
            ));
        }
    }
    if WebhookFormat::try_from(sub.format).is_err() {
        return Some(format!("format: {} is not a webhook format", sub.format));
    }
    if let Some(bad) = sub
        .events
        .iter()
        .find(|e| !matches!(NotificationEvent::try_from(**e), Ok(ev) if ev != NotificationEvent::Unspecified))
    {
        return Some(format!("events: {bad} is not a notification event"));
    }
    if !sub.secret.is_empty() && !name_ok(&sub.secret) {
        return Some(format!(
            "secret: {:?} is not the name of a file in the coordinators' --webhook-secrets directory",
            sub.secret
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(pipeline: &str, train: &str, env: &str, events: &[NotificationEvent]) -> Subscription {
        Subscription {
            name: "ops".into(),
            url: "https://hooks.example.com/x".into(),
            pipeline: pipeline.into(),
            train: train.into(),
            environment: env.into(),
            events: events.iter().map(|e| *e as i32).collect(),
            ..Default::default()
        }
    }

    fn event(kind: AuditKind, pipeline: &str, train: &str, stage: &str) -> AuditEvent {
        AuditEvent {
            event: kind as i32,
            pipeline: pipeline.into(),
            train_id: train.into(),
            stage: stage.into(),
            ..Default::default()
        }
    }

    #[test]
    fn subscriptions_get_what_matches_every_filter() {
        let failed = event(AuditKind::Failed, "api", "", "prod");
        assert!(matches(&sub("", "", "", &[]), &failed));
        assert!(matches(
            &sub("api", "", "prod", &[NotificationEvent::Failed]),
            &failed
        ));
        assert!(!matches(&sub("web", "", "", &[]), &failed));
        assert!(!matches(&sub("", "", "staging", &[]), &failed));
        assert!(!matches(
            &sub("", "", "", &[NotificationEvent::Complete]),
            &failed
        ));
        assert!(!matches(&sub("", "*", "", &[]), &failed), "not a train's");
        let train = event(AuditKind::TrainRolledBack, "api", "train-1", "");
        assert!(matches(&sub("", "*", "", &[]), &train));
        assert!(matches(
            &sub("", "train-1", "", &[NotificationEvent::RolledBack]),
            &train
        ));
        assert!(!matches(&sub("", "train-2", "", &[]), &train));
        let stuck = event(AuditKind::HostStuck, "api", "", "prod");
        assert!(matches(
            &sub("", "", "prod", &[NotificationEvent::StuckHost]),
            &stuck
        ));
        // Not notifiable at all.
        assert!(!matches(
            &sub("", "", "", &[]),
            &event(AuditKind::BatchPassed, "api", "", "")
        ));
    }

    #[test]
    fn retries_back_off_to_a_minute_and_bad_subscriptions_are_named() {
        let waits: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(invalid(&sub("", "", "", &[])), None);
        let mut s = sub("", "", "", &[]);
        s.url = "ftp://x/y".into();
        assert!(invalid(&s).unwrap().starts_with("url:"));
        s.url = "not a url".into();
        assert!(invalid(&s).unwrap().starts_with("url:"));
        let mut s = sub("", "", "", &[]);
        s.name = "../etc".into();
        assert!(invalid(&s).unwrap().starts_with("name:"));
        let mut s = sub("", "", "", &[]);
        s.secret = "../../etc/shadow".into();
        assert!(invalid(&s).unwrap().starts_with("secret:"));
        let mut s = sub("", "", "", &[]);
        s.events = vec![99];
        assert!(invalid(&s).unwrap().starts_with("events:"));
    }
}
