//! The registry's unit tests.
use super::*;

fn hello(host: &str, labels: &[(&str, &str)], interval_ms: u32) -> Hello {
    Hello {
        host_id: host.to_string(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        agent_version: "test".into(),
        services: vec![],
        heartbeat_interval_ms: interval_ms,
        ..Default::default()
    }
}

fn session() -> (SessionHandle, mpsc::Receiver<OutboundItem>) {
    let (tx, rx) = mpsc::channel(4);
    (
        SessionHandle {
            outbound: tx,
            cancel: CancellationToken::new(),
            fenced: tokio::sync::watch::channel(HashMap::new()).1,
        },
        rx,
    )
}

fn state(r: &Registry, host: &str) -> ConnectionState {
    r.get(host).unwrap().state()
}

#[test]
fn heartbeat_updates_host_and_selector_filters() {
    let r = Registry::new(Metrics::default(), Retention::default());
    let (s1, _rx1) = session();
    let (s2, _rx2) = session();
    let (id1, _) = r
        .connect(hello("a", &[("region", "eu")], 1000), "p".into(), s1)
        .unwrap();
    r.connect(hello("b", &[("region", "us")], 1000), "p".into(), s2)
        .unwrap();
    let hb = Heartbeat {
        sequence: 7,
        sent_at_unix_micros: now_unix_micros(),
        ..Default::default()
    };
    assert!(r.heartbeat("a", id1, hb));
    let a = r.get("a").unwrap();
    assert_eq!(a.heartbeat_sequence, 7);
    assert_eq!(a.state(), ConnectionState::Connected);
    let eu = r.list(&Selector::parse("region=eu").unwrap());
    assert_eq!(eu.len(), 1);
    assert_eq!(eu[0].host_id, "a");
    assert_eq!(r.list(&Selector::default()).len(), 2);
}

#[test]
fn newer_session_replaces_older_and_older_updates_are_ignored() {
    let r = Registry::new(Metrics::default(), Retention::default());
    let (s1, _rx1) = session();
    let (s2, _rx2) = session();
    let (old, none) = r.connect(hello("a", &[], 1000), "p1".into(), s1).unwrap();
    assert!(none.is_none());
    let (new, replaced) = r.connect(hello("a", &[], 1000), "p2".into(), s2).unwrap();
    assert!(replaced.is_some());
    assert!(!r.heartbeat("a", old, Heartbeat::default()));
    r.disconnect("a", old, Departure::Dropped("old stream ended".into()));
    assert_eq!(state(&r, "a"), ConnectionState::Connected);
    assert!(r.heartbeat("a", new, Heartbeat::default()));
    assert_eq!(r.get("a").unwrap().peer_address, "p2");
}

#[test]
fn goodbye_is_gone_and_a_drop_is_disconnected() {
    let r = Registry::new(Metrics::default(), Retention::default());
    let (s1, _rx1) = session();
    let (s2, _rx2) = session();
    let (a, _) = r.connect(hello("a", &[], 1000), "p".into(), s1).unwrap();
    let (b, _) = r.connect(hello("b", &[], 1000), "p".into(), s2).unwrap();
    r.disconnect("a", a, Departure::Left("agent shutting down".into()));
    r.disconnect("a", a, Departure::Dropped("stream ended".into()));
    r.disconnect("b", b, Departure::Dropped("connection reset".into()));
    let host_a = r.get("a").unwrap();
    assert_eq!(host_a.state(), ConnectionState::Gone);
    assert_eq!(host_a.state_reason, "agent shutting down");
    let host_b = r.get("b").unwrap();
    assert_eq!(host_b.state(), ConnectionState::Disconnected);
    assert_eq!(host_b.state_reason, "connection reset");
}

#[test]
fn silent_host_turns_late_after_three_intervals() {
    let r = Registry::new(Metrics::default(), Retention::default());
    let (s1, _rx1) = session();
    r.connect(hello("a", &[], 10), "p".into(), s1).unwrap();
    let later = Instant::now() + Duration::from_millis(31);
    let hosts = r.hosts.lock().unwrap();
    let entry = hosts.get("a").unwrap();
    assert_eq!(entry.state(Instant::now()), ConnectionState::Connected);
    assert_eq!(entry.state(later), ConnectionState::Late);
}

#[test]
fn close_all_sends_the_status_to_every_stream() {
    let r = Registry::new(Metrics::default(), Retention::default());
    let (s1, mut rx1) = session();
    let cancel = s1.cancel.clone();
    r.connect(hello("a", &[], 1000), "p".into(), s1).unwrap();
    r.close_all(Status::unavailable("bye"));
    let err = rx1.try_recv().unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(cancel.is_cancelled());
}

#[test]
fn away_hosts_are_forgotten_and_the_limit_displaces_the_longest_away() {
    let r = Registry::new(
        Metrics::default(),
        Retention {
            forget_after: Duration::from_millis(50),
            max_hosts: 3,
        },
    );
    let mut ids = HashMap::new();
    for h in ["a", "b", "c"] {
        let (s, _rx) = session();
        let (id, _) = r.connect(hello(h, &[], 1000), "p".into(), s).unwrap();
        ids.insert(h, id);
    }
    // All connected: a fourth is refused, nobody displaced.
    let (s, _rx) = session();
    assert_eq!(
        r.connect(hello("d", &[], 1000), "p".into(), s).err(),
        Some(RegistryFull(3))
    );
    // b leaves first, then a: the fourth displaces b.
    r.disconnect("b", ids["b"], Departure::Dropped("x".into()));
    std::thread::sleep(Duration::from_millis(5));
    r.disconnect("a", ids["a"], Departure::Left("bye".into()));
    let (s, _rx) = session();
    r.connect(hello("d", &[], 1000), "p".into(), s).unwrap();
    assert!(r.get("b").is_none() && r.get("a").is_some());
    // Past the retention, a (away) goes; c and d (connected) stay.
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(r.sweep(), 1);
    let left: Vec<String> = r
        .list(&Selector::default())
        .into_iter()
        .map(|h| h.host_id)
        .collect();
    assert_eq!(left, ["c", "d"]);
}

#[test]
fn pages_walk_every_matching_host_once_in_id_order() {
    let r = Registry::new(Metrics::default(), Retention::default());
    let mut rxs = Vec::new();
    for i in 0..25 {
        let (s, rx) = session();
        rxs.push(rx);
        let region = if i % 2 == 0 { "eu" } else { "us" };
        r.connect(
            hello(&format!("h{i:02}"), &[("region", region)], 1000),
            "p".into(),
            s,
        )
        .unwrap();
    }
    let eu = Selector::parse("region=eu").unwrap();
    let (mut seen, mut after) = (Vec::new(), String::new());
    loop {
        let (page, next) = r.page(&eu, &after, 5);
        assert!(page.len() <= 5);
        seen.extend(page.into_iter().map(|h| h.host_id));
        match next {
            Some(n) => after = n,
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).step_by(2).map(|i| format!("h{i:02}")).collect();
    assert_eq!(seen, expected);
}
