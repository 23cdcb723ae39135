//! `droverctl notifications ...`: subscribe a webhook, unsubscribe, list,
//! and status (per subscription: delivered, pending, and the delivery it
//! is on with its attempts and last error).

use std::io::Write;

use clap::Subcommand;
use comfy_table::{Table, presets};
use drover_common::proto::deployer_client::DeployerClient;
use drover_common::proto::{
    DeleteSubscriptionRequest, ListSubscriptionsRequest, NotificationEvent,
    NotificationsStatusRequest, PutSubscriptionRequest, Subscription, WebhookFormat,
};
use tonic::transport::Channel;

use super::{print_json, status_error};

#[derive(Debug, Subcommand)]
pub enum NotificationsCommand {
    /// Create (or replace) a webhook subscription.
    Subscribe {
        #[arg(long)]
        name: String,
        /// http:// or https:// URL the events are POSTed to.
        #[arg(long)]
        url: String,
        #[arg(long, default_value = "json", value_parser = ["json", "slack"])]
        format: String,
        #[arg(long, default_value = "")]
        pipeline: String,
        /// A release train's id, or * for every train's events.
        #[arg(long, default_value = "")]
        train: String,
        #[arg(long, default_value = "")]
        environment: String,
        /// started, awaiting-approval, failed, rolled-back, complete,
        /// stuck-host (repeat; none: all).
        #[arg(long = "event", value_parser = event)]
        events: Vec<NotificationEvent>,
        /// A file in the coordinators' --webhook-secrets directory keying
        /// the body's HMAC (X-Drover-Signature).
        #[arg(long, default_value = "")]
        secret: String,
    },
    Unsubscribe {
        name: String,
    },
    List,
    /// Delivered and pending per subscription, and the delivery each is on.
    Status,
}

fn event(s: &str) -> Result<NotificationEvent, String> {
    let name = format!("NOTIFICATION_EVENT_{}", s.to_uppercase().replace('-', "_"));
    NotificationEvent::from_str_name(&name)
        .filter(|e| *e != NotificationEvent::Unspecified)
        .ok_or_else(|| format!("{s:?} is not one of started, awaiting-approval, failed, rolled-back, complete, stuck-host"))
}

fn event_label(e: i32) -> String {
    NotificationEvent::try_from(e)
        .map(|e| {
            e.as_str_name()
                .trim_start_matches("NOTIFICATION_EVENT_")
                .to_lowercase()
                .replace('_', "-")
        })
        .unwrap_or_else(|_| e.to_string())
}

pub async fn run(
    client: &mut DeployerClient<Channel>,
    cmd: NotificationsCommand,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    match cmd {
        NotificationsCommand::Subscribe {
            name,
            url,
            format,
            pipeline,
            train,
            environment,
            events,
            secret,
        } => {
            let sub = Subscription {
                name,
                url,
                format: if format == "slack" {
                    WebhookFormat::Slack
                } else {
                    WebhookFormat::Json
                } as i32,
                pipeline,
                train,
                environment,
                events: events.into_iter().map(|e| e as i32).collect(),
                secret,
                created_at_unix_ms: 0,
            };
            let sub = client
                .put_subscription(PutSubscriptionRequest {
                    subscription: Some(sub),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                return print_json(out, &sub);
            }
            writeln!(out, "subscribed {} → {}", sub.name, sub.url)?;
        }
        NotificationsCommand::Unsubscribe { name } => {
            let sub = client
                .delete_subscription(DeleteSubscriptionRequest { name })
                .await
                .map_err(status_error)?
                .into_inner();
            writeln!(out, "unsubscribed {}", sub.name)?;
        }
        NotificationsCommand::List => {
            let subs = client
                .list_subscriptions(ListSubscriptionsRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .subscriptions;
            if json {
                return print_json(out, &subs);
            }
            let mut table = Table::new();
            table.load_preset(presets::NOTHING).set_header([
                "NAME",
                "URL",
                "FORMAT",
                "PIPELINE",
                "TRAIN",
                "ENVIRONMENT",
                "EVENTS",
                "SIGNED",
            ]);
            for s in &subs {
                let events: Vec<String> = s.events.iter().map(|e| event_label(*e)).collect();
                table.add_row([
                    s.name.clone(),
                    s.url.clone(),
                    format!("{:?}", s.format()),
                    s.pipeline.clone(),
                    s.train.clone(),
                    s.environment.clone(),
                    if events.is_empty() {
                        "all".into()
                    } else {
                        events.join(",")
                    },
                    if s.secret.is_empty() {
                        "no".into()
                    } else {
                        format!("with {}", s.secret)
                    },
                ]);
            }
            writeln!(out, "{table}")?;
        }
        NotificationsCommand::Status => {
            let status = client
                .notifications_status(NotificationsStatusRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                return print_json(out, &status);
            }
            let mut table = Table::new();
            table.load_preset(presets::NOTHING).set_header([
                "SUBSCRIPTION",
                "DELIVERED",
                "PENDING",
                "LAST DELIVERED",
            ]);
            for s in &status.subscriptions {
                table.add_row([
                    s.name.clone(),
                    s.delivered.to_string(),
                    s.pending.to_string(),
                    if s.last_delivered_unix_ms == 0 {
                        "never".into()
                    } else {
                        super::audit::rfc3339(s.last_delivered_unix_ms)
                    },
                ]);
            }
            writeln!(out, "{table}")?;
            for d in &status.head {
                let state = if d.attempts == 0 {
                    "pending".to_string()
                } else {
                    format!(
                        "failing after {} attempts ({}); next try at {}",
                        d.attempts,
                        d.last_error,
                        super::audit::rfc3339(d.next_attempt_unix_ms)
                    )
                };
                writeln!(
                    out,
                    "{}: {} {} [{}]: {state}",
                    d.subscription,
                    d.event_id,
                    d.summary,
                    event_label(d.event)
                )?;
            }
        }
    }
    Ok(())
}
