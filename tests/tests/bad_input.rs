//! Bad input on the agent stream and the API: each gets a clear status, and
//! nothing else changes — a real agent connected meanwhile never notices.

use std::time::Duration;

use drover_common::proto::{AgentMessage, ConnectionState, Goodbye, agent_message};
use drover_tests::raw::{self, RawStream};
use drover_tests::{Agent, Coordinator, TestDir, wait_until, wait_until_ok};
use tonic::Code;

async fn refused(addr: &str, first: AgentMessage) -> tonic::Status {
    match RawStream::open(addr, first, 8 << 20).await {
        Err(status) => status,
        Ok(mut stream) => stream
            .next(Duration::from_secs(10))
            .await
            .expect_err("the coordinator must refuse this stream"),
    }
}

#[tokio::test]
async fn bad_streams_get_a_clear_status_and_no_other_agent_notices() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &["--hello-timeout", "1s"]).await;
    let _bystander = Agent::start(
        &dir,
        "bystander",
        &[&coord],
        &["--heartbeat-interval", "200ms"],
    );
    let before = wait_until(
        "the bystander to connect",
        Duration::from_secs(20),
        || async {
            match coord.host("bystander").await {
                Ok(h) if h.heartbeat_sequence >= 2 => Ok(h),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let addr = coord.addr_arg();

    // The first message is not a Hello.
    let s = refused(&addr, raw::heartbeat(1)).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(
        s.message(),
        "the first message on a Connect stream must be Hello, got Heartbeat"
    );

    let goodbye = AgentMessage {
        msg: Some(agent_message::Msg::Goodbye(Goodbye::default())),
    };
    let s = refused(&addr, goodbye).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().ends_with("got Goodbye"), "{}", s.message());

    // Empty and over-long host ids, and a bad character.
    let s = refused(&addr, raw::hello("", &[])).await;
    assert_eq!(
        (s.code(), s.message()),
        (Code::InvalidArgument, "host id is empty")
    );
    let long = "h".repeat(300);
    let s = refused(&addr, raw::hello(&long, &[])).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(
        s.message(),
        "host id is 300 characters long; the limit is 253"
    );
    let s = refused(&addr, raw::hello("web/1", &[])).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("'/'"), "{}", s.message());

    // Labels that are not key=value pairs of the allowed shape.
    let s = refused(&addr, raw::hello("web-9", &[("", "eu")])).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("label key \"\" is invalid"),
        "{}",
        s.message()
    );
    let s = refused(&addr, raw::hello("web-9", &[("region", "eu west")])).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message()
            .contains("label value \"eu west\" of key \"region\""),
        "{}",
        s.message()
    );

    // A message over the coordinator's limit (1 MiB by default).
    let huge = "x".repeat(2 << 20);
    let s = refused(&addr, raw::hello("web-9", &[("blob", &huge)])).await;
    assert_eq!(s.code(), Code::OutOfRange);
    assert!(
        s.message().contains("too large") && s.message().contains("the limit is: 1048576"),
        "{}",
        s.message()
    );

    // A stream that never says Hello.
    let status = silent_stream_status(&addr).await;
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(
        status
            .message()
            .contains("first message on a Connect stream must be Hello"),
        "{}",
        status.message()
    );

    // None of it registered anything, and the bystander never reconnected.
    let hosts = coord.hosts("").await;
    assert_eq!(
        hosts.iter().map(|h| h.host_id.as_str()).collect::<Vec<_>>(),
        ["bystander"]
    );
    let seq_then = coord.host("bystander").await.unwrap().heartbeat_sequence;
    wait_until_ok(
        "the bystander's heartbeats to keep coming",
        Duration::from_secs(5),
        || async { coord.host("bystander").await.unwrap().heartbeat_sequence > seq_then },
    )
    .await;
    let after = coord.host("bystander").await.unwrap();
    assert_eq!(after.state(), ConnectionState::Connected);
    assert_eq!(
        after.connected_at_unix_ms, before.connected_at_unix_ms,
        "it never reconnected"
    );
    let metrics = coord_metrics(&coord).await;
    for (reason, count) in [
        ("invalid_hello", 5),
        ("not_hello", 2),
        ("bad_message", 1),
        ("hello_timeout", 1),
    ] {
        let line = format!("drover_streams_rejected_total{{reason=\"{reason}\"}} {count}\n");
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
}

/// Opens a stream and sends nothing at all.
async fn silent_stream_status(addr: &str) -> tonic::Status {
    use drover_common::proto::agent_control_client::AgentControlClient;
    let channel = drover_common::grpc::connect(addr).await.unwrap();
    let (_tx, rx) = tokio::sync::mpsc::channel::<AgentMessage>(1);
    let mut client = AgentControlClient::new(channel);
    let call = client.connect(tokio_stream::wrappers::ReceiverStream::new(rx));
    match tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("answer within 10s")
    {
        Err(s) => s,
        Ok(mut resp) => resp.get_mut().message().await.expect_err("refused"),
    }
}

async fn coord_metrics(coord: &Coordinator) -> String {
    drover_tests::http_get(coord.metrics_addr, "/metrics").await
}

#[tokio::test]
async fn an_oversized_message_after_hello_ends_only_that_stream() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let addr = coord.addr_arg();
    let mut stream = RawStream::open(&addr, raw::hello("big", &[]), 8 << 20)
        .await
        .unwrap();
    assert!(
        stream.next(Duration::from_secs(5)).await.unwrap().is_some(),
        "welcome"
    );
    let mut hb = raw::heartbeat(1);
    if let Some(agent_message::Msg::Heartbeat(h)) = &mut hb.msg {
        h.services.push(drover_common::proto::ServiceHealth {
            service: "x".repeat(2 << 20),
            ..Default::default()
        });
    }
    stream.outbound.send(hb).await.unwrap();
    let status = stream.next(Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let host = coord
        .wait_state("big", ConnectionState::Disconnected, Duration::from_secs(5))
        .await;
    assert!(host.state_reason.contains("too large"), "{host:?}");
}

#[tokio::test]
async fn bad_agent_flags_are_refused_before_connecting() {
    let dir = TestDir::new();
    let run = |args: &[&str]| {
        std::process::Command::new(drover_tests::bins::bin("drover-agent"))
            .args(["--coordinator", "127.0.0.1:1", "--data-dir"])
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--host-id", "a", "--label", "region"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("label \"region\" is not key=value"));
    let out = run(&["--host-id", ""]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("host id is empty"));
    let out = run(&["--host-id", "a", "--label", "k=1", "--label", "k=2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("label \"k\" is given twice"));
}

#[tokio::test]
async fn bad_api_requests_get_invalid_argument() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let mut api = coord.deployer().await;
    let err = api
        .list_hosts(drover_common::proto::ListHostsRequest {
            selector: "region".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "selector term \"region\" is not key=value or key!=value"
    );
    for (bad, expected) in [
        (
            drover_common::proto::ListHostsRequest {
                page_size: 5001,
                ..Default::default()
            },
            "page_size 5001 is over the most, 5000",
        ),
        (
            drover_common::proto::ListHostsRequest {
                page_token: "../x".into(),
                ..Default::default()
            },
            "page_token: ",
        ),
    ] {
        let err = api.list_hosts(bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(expected), "{}", err.message());
    }
    let err = api
        .get_host(drover_common::proto::GetHostRequest {
            host_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "host id is empty")
    );
}
