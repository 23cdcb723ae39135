//! What a webhook receives: the body for its format, a line for people,
//! and the HMAC signature of the generic JSON body. Pure.

use drover_common::proto::{AuditEvent, NotificationEvent, WebhookFormat};
use hmac::{KeyInit, Mac};

/// The header carrying the signature: `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "x-drover-signature";
/// The header carrying the event's id (the same on every retry).
pub const EVENT_ID_HEADER: &str = "x-drover-event-id";
/// The header carrying the event's kind (`NOTIFICATION_EVENT_FAILED`).
pub const EVENT_HEADER: &str = "x-drover-event";

/// A line for people: what happened, where and why.
pub fn summary(event: NotificationEvent, e: &AuditEvent) -> String {
    let what = match event {
        NotificationEvent::Started => "started",
        NotificationEvent::AwaitingApproval => "waits for approval",
        NotificationEvent::Failed => "failed",
        NotificationEvent::RolledBack => "rolled back",
        NotificationEvent::Complete => "completed",
        NotificationEvent::StuckHost => "has a stuck host",
        NotificationEvent::Unspecified => "changed",
    };
    let subject = if e.deploy_id.starts_with("train-")
        || (e.train_id == e.deploy_id && !e.train_id.is_empty())
    {
        format!("release train {}", e.train_id)
    } else {
        format!("deploy {} of {}", e.deploy_id, e.pipeline)
    };
    let mut line = format!("{subject} {what}");
    if !e.stage.is_empty() {
        line.push_str(&format!(" in {}", e.stage));
    }
    if !e.reason.is_empty() {
        line.push_str(&format!(": {}", e.reason));
    }
    line
}

/// The body for `format`.
pub fn body(format: WebhookFormat, id: &str, event: NotificationEvent, e: &AuditEvent) -> Vec<u8> {
    let value = match format {
        WebhookFormat::Slack => serde_json::json!({ "text": summary(event, e) }),
        WebhookFormat::Json | WebhookFormat::Unspecified => serde_json::json!({
            "id": id,
            "event": event.as_str_name(),
            "summary": summary(event, e),
            "occurred_at_unix_ms": e.at_unix_ms,
            "audit": e,
        }),
    };
    serde_json::to_vec(&value).expect("a notification always serializes")
}

/// `sha256=<hex>` of `body` keyed by `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    format!(
        "sha256={}",
        tag.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_common::proto::AuditKind;

    #[test]
    fn bodies_say_what_happened_and_the_signature_is_rfc_4231s() {
        let e = AuditEvent {
            event: AuditKind::Failed as i32,
            deploy_id: "api-1".into(),
            pipeline: "api".into(),
            stage: "prod".into(),
            reason: "error rate 0.5".into(),
            at_unix_ms: 7,
            ..Default::default()
        };
        let slack: serde_json::Value = serde_json::from_slice(&body(
            WebhookFormat::Slack,
            "x",
            NotificationEvent::Failed,
            &e,
        ))
        .unwrap();
        assert_eq!(
            slack["text"],
            "deploy api-1 of api failed in prod: error rate 0.5"
        );
        let json: serde_json::Value = serde_json::from_slice(&body(
            WebhookFormat::Json,
            "id-1",
            NotificationEvent::Failed,
            &e,
        ))
        .unwrap();
        assert_eq!(json["id"], "id-1");
        assert_eq!(json["event"], "NOTIFICATION_EVENT_FAILED");
        assert_eq!(json["audit"]["deployId"], "api-1");
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
