//! Notifications end to end: a real coordinator (and a real etcd cluster
//! for the failover), sample agents, and a webhook receiver (an HTTP
//! server in the test). Every notifiable event reaches each subscription
//! once, in the order it was recorded: while the receiver is up, after it
//! was down for a while, and across a failover of the delivering
//! coordinator. Bad subscriptions are refused and change nothing.

use std::time::Duration;

use drover_common::proto::{
    DeployPhase, ListSubscriptionsRequest, NotificationsStatusRequest, PutSubscriptionRequest,
    Subscription, WebhookFormat,
};
use drover_tests::sample_fleet::SampleFleet;
use drover_tests::wait_until;
use drover_tests::webhook::{Received, WebhookReceiver};

/// staging on web-0, prod (approved by people) on web-1.
const STAGED: &str = r#"
name = "hello"
service = "hello"

[[stages]]
name = "staging"
selector = "idx=0"
batch_size = 1
gate = { max_error_rate = 0.05, samples = 2, bad_samples = 2, min_requests = 1, inconclusive = "INCONCLUSIVE_POLICY_PASS" }

[[stages]]
name = "prod"
selector = "idx=1"
batch_size = 1
requires_approval = true
gate = { max_error_rate = 0.05, samples = 2, bad_samples = 2, min_requests = 1, inconclusive = "INCONCLUSIVE_POLICY_PASS" }
"#;

/// The notifiable events of `service`'s audit, in order, as the kinds a
/// receiver is told (`NOTIFICATION_EVENT_*`).
async fn expected(coord: &drover_tests::Coordinator, service: &str) -> Vec<String> {
    coord
        .audit(service)
        .await
        .iter()
        .filter_map(|e| drover_coordinator::notify::rules::event_of(e.event()))
        .map(|e| e.as_str_name().to_string())
        .collect()
}

fn kinds(got: &[Received]) -> Vec<String> {
    got.iter().map(|r| r.event.clone()).collect()
}

/// Per delivery, ms from its event's record (`occurred_at_unix_ms` in
/// the body) to its arrival.
fn latency_ms(got: &[Received]) -> Vec<u64> {
    got.iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            r.at_unix_ms
                .saturating_sub(v["occurred_at_unix_ms"].as_u64().unwrap())
        })
        .collect()
}

fn ids_once(got: &[Received]) {
    let mut ids: Vec<&str> = got.iter().map(|r| r.event_id.as_str()).collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "an event was delivered twice: {got:?}");
}

#[tokio::test]
async fn every_event_arrives_once_in_order_even_after_the_receiver_was_down() {
    let secrets_dir = drover_tests::TestDir::new();
    let secrets = secrets_dir.path().to_path_buf();
    std::fs::write(secrets.join("hook-key"), b"s3cret").unwrap();
    let secrets_arg = secrets.to_str().unwrap().to_string();
    let f =
        SampleFleet::start_configured(2, 30, |_| Vec::new(), &["--webhook-secrets", &secrets_arg])
            .await;
    f.apply(STAGED);
    let mut generic = WebhookReceiver::start().await;
    let slack = WebhookReceiver::start().await;
    let mut api = f.coord.deployer().await;
    let put = |sub: Subscription| {
        let mut api = api.clone();
        async move {
            api.put_subscription(PutSubscriptionRequest {
                subscription: Some(sub),
            })
            .await
        }
    };
    // Bad subscriptions: refused, naming the field; nothing is created.
    for (bad, field) in [
        (
            Subscription {
                name: "x".into(),
                url: "ftp://127.0.0.1/x".into(),
                ..Default::default()
            },
            "url:",
        ),
        (
            Subscription {
                name: "x".into(),
                url: generic.url("x"),
                pipeline: "ghost".into(),
                ..Default::default()
            },
            "pipeline:",
        ),
        (
            Subscription {
                name: "x".into(),
                url: generic.url("x"),
                secret: "nope".into(),
                ..Default::default()
            },
            "secret:",
        ),
        (
            Subscription {
                name: "a/b".into(),
                url: generic.url("x"),
                ..Default::default()
            },
            "name:",
        ),
    ] {
        let e = put(bad).await.expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    put(Subscription {
        name: "everything".into(),
        url: generic.url("hook"),
        format: WebhookFormat::Json as i32,
        secret: "hook-key".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (code, _, err) = f.coord.droverctl(&[
        "notifications",
        "subscribe",
        "--name",
        "slack",
        "--url",
        &slack.url("slack"),
        "--format",
        "slack",
        "--pipeline",
        "hello",
        "--event",
        "rolled-back",
        "--event",
        "failed",
    ]);
    assert_eq!(code, 0, "{err}");
    let subs = api
        .list_subscriptions(ListSubscriptionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .subscriptions;
    assert_eq!(
        subs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["everything", "slack"]
    );

    // v1: started, waits for approval of prod, approved, complete.
    let v1 = f.push("v1", &[]);
    let id = f.coord.start_deploy("hello", &v1).await;
    f.coord.wait_phase(&id, DeployPhase::AwaitingApproval).await;
    assert_eq!(f.coord.droverctl(&["deploy", "approve", &id]).0, 0);
    f.coord.wait_phase(&id, DeployPhase::Complete).await;
    wait_until(
        "the first deploy's events",
        Duration::from_secs(20),
        || async {
            let got = kinds(&generic.got());
            if got
                == [
                    "NOTIFICATION_EVENT_STARTED",
                    "NOTIFICATION_EVENT_AWAITING_APPROVAL",
                    "NOTIFICATION_EVENT_COMPLETE",
                ]
            {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    )
    .await;
    // Latency while the receiver is up: from the event's record to its arrival.
    let latency = latency_ms(&generic.got());
    eprintln!("delivery latency (ms), receiver up: {latency:?}");
    assert!(latency.iter().all(|ms| *ms < 2000), "{latency:?}");

    // The receiver goes down; v2 is bad and rolls back meanwhile.
    generic.stop();
    let v2 = f.push("v2", &["--error-rate", "0.5"]);
    let id2 = f.coord.start_deploy("hello", &v2).await;
    f.coord.wait_phase(&id2, DeployPhase::RolledBack).await;
    let status = wait_until(
        "a failing delivery to show",
        Duration::from_secs(20),
        || async {
            let mut api = api.clone();
            let s = api
                .notifications_status(NotificationsStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            match s.head.iter().find(|d| d.subscription == "everything") {
                Some(d) if d.attempts >= 2 => Ok(s),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let head = status
        .head
        .iter()
        .find(|d| d.subscription == "everything")
        .unwrap();
    assert!(head.last_error.contains("connect"), "{head:?}");
    let pending = status
        .subscriptions
        .iter()
        .find(|s| s.name == "everything")
        .unwrap();
    assert_eq!((pending.delivered, pending.pending), (3, 2), "{status:?}");
    let (code, out, _) = f.coord.droverctl(&["notifications", "status"]);
    assert_eq!(code, 0);
    assert!(out.contains("failing after"), "{out}");
    // Back up: the rest arrives, in order, each once (backoff is at most a minute).
    generic.restart().await;
    let want = expected(&f.coord, "hello").await;
    assert_eq!(want.len(), 5, "{want:?}");
    wait_until(
        "every event at the receiver",
        Duration::from_secs(70),
        || async {
            let got = kinds(&generic.got());
            if got == want {
                Ok(())
            } else {
                Err(format!("{got:?} of {want:?}"))
            }
        },
    )
    .await;
    let got = generic.got();
    ids_once(&got);
    for r in &got {
        assert_eq!(
            r.signature,
            drover_coordinator::notify::payload::signature(b"s3cret", &r.body),
            "signed with the secret"
        );
    }
    // Slack got only hello's rollback, as Slack text.
    wait_until("slack's message", Duration::from_secs(20), || async {
        if slack.got().len() == 1 {
            Ok(())
        } else {
            Err(format!("{:?}", slack.got()))
        }
    })
    .await;
    let text: serde_json::Value = serde_json::from_slice(&slack.got()[0].body).unwrap();
    let text = text["text"].as_str().unwrap();
    assert!(
        text.contains(&format!("deploy {id2} of hello rolled back")),
        "{text}"
    );
    let audit = f.coord.droverctl(&["audit", "--service", "hello"]).1;
    assert!(
        audit.contains("AWAITING_APPROVAL") || audit.contains("waits for approval"),
        "{audit}"
    );
}

/// Two coordinators on etcd: the one delivering (shard 0's leader) is
/// killed while a deploy runs; the standby delivers from where it got, so
/// the receiver gets every event of the deploy once, in order.
#[tokio::test]
async fn no_event_is_lost_or_repeated_across_a_failover_of_the_deliverer() {
    use drover_tests::cluster_fleet::{ClusterFleet, rolling_spec};
    let mut f = ClusterFleet::start(2, 3, &rolling_spec(300), 20).await;
    f.settled_leader().await;
    let receiver = WebhookReceiver::start().await;
    let first = f.cluster.get(0);
    first
        .deployer()
        .await
        .put_subscription(PutSubscriptionRequest {
            subscription: Some(Subscription {
                name: "ops".into(),
                url: receiver.url("hook"),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let v1 = f.push(first, "v1", &[]);
    let id = f.start_deploy(first, &v1).await;
    wait_until(
        "the start to be delivered",
        Duration::from_secs(20),
        || async {
            if receiver.got().is_empty() {
                Err("nothing yet".to_string())
            } else {
                Ok(())
            }
        },
    )
    .await;
    let (deliverer, _) = f.cluster.wait_leader(0, None).await;
    let i = f.cluster.index_of(&deliverer);
    f.cluster.kill(i);
    let survivor = f.cluster.other_than(i);
    f.cluster.wait_finished(&id, Duration::from_secs(90)).await;
    let v2 = f.push(survivor, "v2", &["--error-rate", "0.5"]);
    let id2 = f.start_deploy(survivor, &v2).await;
    let d = f.cluster.wait_finished(&id2, Duration::from_secs(90)).await;
    assert_eq!(d.phase(), DeployPhase::RolledBack);
    let want = expected(survivor, "hello").await;
    assert_eq!(want.len(), 4, "{want:?}");
    wait_until(
        "every event at the receiver",
        Duration::from_secs(60),
        || async {
            let got = kinds(&receiver.got());
            if got == want {
                Ok(())
            } else {
                Err(format!("{got:?} of {want:?}"))
            }
        },
    )
    .await;
    ids_once(&receiver.got());
}

/// One stage that waits for people: each start is two notifiable events
/// (started, awaiting approval) at once, and an abort ends it.
const APPROVAL_FIRST: &str = r#"
name = "hello"
service = "hello"

[[stages]]
name = "prod"
selector = "env=prod"
batch_size = 1
requires_approval = true
"#;

/// Deploys started and aborted for the latency sample (two events each).
const CYCLES: usize = 100;

#[tokio::test]
async fn delivery_latency_p99_over_two_hundred_events_is_under_a_second() {
    let f = SampleFleet::start(1, 0).await;
    f.apply(APPROVAL_FIRST);
    let receiver = WebhookReceiver::start().await;
    let mut api = f.coord.deployer().await;
    api.put_subscription(PutSubscriptionRequest {
        subscription: Some(Subscription {
            name: "latency".into(),
            url: receiver.url("hook"),
            format: WebhookFormat::Json as i32,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let v1 = f.push("v1", &[]);
    for i in 0..CYCLES {
        // The pipeline is free again once the abort is written.
        let d = wait_until("the pipeline to be free", Duration::from_secs(10), || {
            let mut api = api.clone();
            let v1 = v1.clone();
            async move {
                api.start_deploy(drover_common::proto::StartDeployRequest {
                    pipeline: "hello".into(),
                    artifact: v1,
                    idempotency_key: format!("latency-{i}"),
                    requester: "bench".into(),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner())
                .map_err(|e| e.to_string())
            }
        })
        .await;
        api.abort_deploy(drover_common::proto::DeployRef {
            id: d.id,
            requester: "bench".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    wait_until("every event delivered", Duration::from_secs(60), || async {
        let n = receiver.got().len();
        if n >= 2 * CYCLES {
            Ok(())
        } else {
            Err(format!("{n} of {}", 2 * CYCLES))
        }
    })
    .await;
    let got = receiver.got();
    ids_once(&got);
    assert_eq!(got.len(), 2 * CYCLES, "nothing more than the events");
    assert_eq!(kinds(&got), expected(&f.coord, "hello").await, "in order");
    let mut latency = latency_ms(&got);
    latency.sort_unstable();
    let q = |p: f64| latency[((latency.len() as f64 * p).ceil() as usize).min(latency.len()) - 1];
    eprintln!(
        "delivery latency over {} events (ms, event recorded → received): p50 {} p90 {} p99 {} max {}",
        latency.len(),
        q(0.50),
        q(0.90),
        q(0.99),
        latency[latency.len() - 1]
    );
    assert!(q(0.99) < 1000, "p99 {} ms: {latency:?}", q(0.99));
}
