//! Trust, end to end with the real binaries and real certificates made by
//! `droverctl ca`: mutual TLS on every connection, identities from
//! certificates, refusals at the handshake, rotation, etcd and peers over
//! TLS, systemd notify. Authorization is in authorization.rs.

use std::time::Duration;

use drover_common::proto::agent_control_client::AgentControlClient;
use drover_common::proto::{AgentMessage, ConnectionState, Hello, agent_message};
use drover_tests::pki::{Creds, Pki};
use drover_tests::{Agent, Coordinator, TestDir, http_get, wait_until_ok};
use nix::sys::signal::Signal;

const WAIT: Duration = Duration::from_secs(20);

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The serial of the certificate `coord` serves to a new connection.
async fn served_serial(coord: &Coordinator, creds: &Creds) -> String {
    use rustls::pki_types::ServerName;
    let files = drover_common::tls::TlsFiles {
        cert: creds.cert.clone(),
        key: creds.key.clone(),
        ca: creds.ca.clone(),
        deny_list: None,
    };
    let config = files.client_config().unwrap();
    let tcp = tokio::net::TcpStream::connect(coord.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let der = &tls.get_ref().1.peer_certificates().unwrap()[0];
    drover_common::tls::identity::PeerCert::from_der(der)
        .unwrap()
        .serial
}

/// A TLS coordinator reading an (empty) deny list; returns the list's path.
async fn with_deny_list(dir: &TestDir, pki: &Pki) -> (Coordinator, std::path::PathBuf) {
    let deny = dir.path().join("deny.list");
    std::fs::write(&deny, "# revoked certificates\n").unwrap();
    let coord =
        Coordinator::start_tls(dir, "c1", pki, &["--tls-deny-list", deny.to_str().unwrap()]).await;
    (coord, deny)
}

/// Opens an agent stream with `creds` and says Hello as `host`.
async fn hello_as(coord: &Coordinator, creds: &Creds, host: &str) -> Result<(), tonic::Status> {
    let channel = creds.dialer().connect(&coord.addr_arg()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            host_id: host.into(),
            heartbeat_interval_ms: 1000,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut inbound = AgentControlClient::new(channel)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    inbound.message().await.map(|_| ())
}

#[tokio::test]
async fn every_connection_is_mutual_tls_and_identity_comes_from_the_certificate() {
    let dir = TestDir::new();
    let pki = Pki::new(&dir);
    let (coord, deny) = with_deny_list(&dir, &pki).await;
    let _web1 = Agent::start(&dir, "web-1", &[&coord], &strs(&pki.agent_flags("web-1")));
    let host = coord
        .wait_state("web-1", ConnectionState::Connected, WAIT)
        .await;

    // No certificate, a certificate that expired, one from another CA:
    // refused at the handshake, each with a log line that says why.
    let no_cert = drover_tests::bins::bin("droverctl");
    let out = std::process::Command::new(&no_cert)
        .args(["--coordinator", &coord.addr_arg(), "hosts"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = std::process::Command::new(&no_cert)
        .args(["--coordinator", &format!("https://{}", coord.addr), "hosts"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("asks for TLS"),
        "never plaintext for https://: {err}"
    );
    let expired = pki.user(
        "old",
        &[
            "--role",
            "admin",
            "--not-before",
            "2020-01-01T00:00:00Z",
            "--valid-for",
            "1d",
        ],
    );
    let (code, _, _) = coord.droverctl_as(&expired, &["hosts"]);
    assert_eq!(code, 1);
    let foreign = Pki::with_domain(&dir, "other-ca", "evil.test").user("eve", &["--role", "admin"]);
    let foreign = Creds {
        ca: pki.ca(),
        ..foreign
    };
    let (code, _, _) = coord.droverctl_as(&foreign, &["hosts"]);
    assert_eq!(code, 1);
    wait_until_ok("three refusals in the log", WAIT, || async {
        let log = coord.child.log();
        log.contains("TLS handshake refused")
            && log.contains("expired")
            && log.contains("UnknownIssuer")
    })
    .await;

    // grpcurl with the user's certificate, the way the README shows.
    let admin = coord.client.clone().unwrap();
    let grpcurl = drover_tests::require_tool("grpcurl", "scripts/test installs it");
    let out = std::process::Command::new(grpcurl)
        .args([
            "-cacert",
            admin.ca.to_str().unwrap(),
            "-cert",
            admin.cert.to_str().unwrap(),
            "-key",
            admin.key.to_str().unwrap(),
            &coord.addr_arg(),
            "drover.v1.Deployer/ListHosts",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("web-1"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An agent certificate for web-2 cannot say Hello as web-1, and the
    // real web-1 is not displaced.
    let web2 = pki.agent("web-2");
    let status = hello_as(&coord, &web2, "web-1").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status
            .message()
            .contains("spiffe://drover.test/agent/web-2 may not connect as agent \"web-1\""),
        "{status:?}"
    );
    let still = coord.host("web-1").await.unwrap();
    assert_eq!(still.state(), ConnectionState::Connected);
    assert_eq!(
        still.connected_at_unix_ms, host.connected_at_unix_ms,
        "the real web-1 kept its stream"
    );
    // Agents get no API rights: not even a host list.
    let (code, _, err) = coord.droverctl_as(&web2, &["hosts"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("PermissionDenied") && err.contains("hosts.read"),
        "{err}"
    );

    // A command sent by hand is audited with the sender's identity.
    let (code, _, _) = coord.droverctl(&[
        "command",
        "web-1",
        "verify",
        "--service",
        "hello",
        "--artifact",
        &"a".repeat(64),
    ]);
    assert_eq!(code, 1, "nothing to verify on web-1");
    let (_, audit, _) = coord.droverctl(&["audit", "--service", "hello"]);
    assert!(
        audit.contains("user/harness-admin") && audit.contains("verify sent to host web-1 by hand"),
        "{audit}"
    );

    // Revoked on the deny list, reloaded on SIGHUP: refused from then on.
    let mallory = pki.user("mallory", &["--role", "admin"]);
    assert_eq!(coord.droverctl_as(&mallory, &["hosts"]).0, 0);
    std::fs::write(&deny, format!("serial:{}\n", Pki::serial(&mallory))).unwrap();
    coord.child.signal(Signal::SIGHUP);
    wait_until_ok("mallory refused", WAIT, || async {
        coord.droverctl_as(&mallory, &["hosts"]).0 == 1
    })
    .await;
    assert!(coord.child.log().contains("is on the deny list"));
    assert_eq!(coord.droverctl(&["hosts"]).0, 0, "others still get in");
}

#[tokio::test]
async fn certificates_rotate_on_sighup_without_dropping_streams() {
    let dir = TestDir::new();
    let pki = Pki::new(&dir);
    let (coord, deny) = with_deny_list(&dir, &pki).await;
    let agent_creds = pki.agent("web-1");
    let agent = Agent::start(&dir, "web-1", &[&coord], &strs(&agent_creds.daemon_flags()));
    let before = coord
        .wait_state("web-1", ConnectionState::Connected, WAIT)
        .await;
    let admin = coord.client.clone().unwrap();
    let old_coord_serial = served_serial(&coord, &admin).await;
    let old_agent_serial = Pki::serial(&agent_creds);

    // New certificates for both, picked up on SIGHUP.
    let new_coord = pki.coordinator("c1");
    let new_agent = pki.agent("web-1");
    assert_ne!(Pki::serial(&new_agent), old_agent_serial);
    coord.child.signal(Signal::SIGHUP);
    agent.child.signal(Signal::SIGHUP);
    wait_until_ok(
        "the coordinator serving its new certificate",
        WAIT,
        || async { served_serial(&coord, &admin).await == Pki::serial(&new_coord) },
    )
    .await;
    assert_ne!(old_coord_serial, Pki::serial(&new_coord));
    wait_until_ok("the agent's reload logged", WAIT, || async {
        agent.child.log().contains("certificates reloaded")
    })
    .await;
    // The stream made with the old certificates is still the same one.
    let now = coord.host("web-1").await.unwrap();
    assert_eq!(now.state(), ConnectionState::Connected);
    assert_eq!(now.connected_at_unix_ms, before.connected_at_unix_ms);

    // Revoke the agent's old certificate and restart the coordinator: the
    // agent reconnects with its new one (the old would be refused).
    std::fs::write(&deny, format!("serial:{old_agent_serial}\n")).unwrap();
    let addr = coord.addr;
    drop(coord);
    let coord = Coordinator::start_tls_on(
        &dir,
        "c1",
        &pki,
        addr,
        &["--tls-deny-list", deny.to_str().unwrap()],
    )
    .await;
    coord
        .wait_state("web-1", ConnectionState::Connected, WAIT)
        .await;
}

/// A certificate with two URI SANs, signed by the test's CA (our CA never
/// issues one; an external CA might).
fn two_identities(pki: &Pki, dir: &TestDir) -> Creds {
    let (issuer, _) = drover_common::tls::ca::load(&pki.dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![
        rcgen::SanType::URI("spiffe://drover.test/user/a".try_into().unwrap()),
        rcgen::SanType::URI("spiffe://drover.test/user/b".try_into().unwrap()),
    ];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let out = dir.sub("two-uris");
    std::fs::write(out.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(out.join("key.pem"), key.serialize_pem()).unwrap();
    Creds {
        cert: out.join("cert.pem"),
        key: out.join("key.pem"),
        ca: pki.ca(),
    }
}

#[tokio::test]
async fn two_identities_and_servers_that_are_not_coordinators_are_refused() {
    let dir = TestDir::new();
    let pki = Pki::new(&dir);
    let coord = Coordinator::start_tls(&dir, "c1", &pki, &[]).await;

    // Two URI SANs: droverctl will not even present it; grpcurl does, and
    // the handshake is refused, saying why.
    let two = two_identities(&pki, &dir);
    let (code, _, err) = coord.droverctl_as(&two, &["hosts"]);
    assert_eq!(code, 1);
    assert!(err.contains("2 URI SANs"), "{err}");
    let grpcurl = drover_tests::require_tool("grpcurl", "scripts/test installs it");
    let out = std::process::Command::new(grpcurl)
        .args([
            "-cacert",
            two.ca.to_str().unwrap(),
            "-cert",
            two.cert.to_str().unwrap(),
            "-key",
            two.key.to_str().unwrap(),
            &coord.addr_arg(),
            "drover.v1.Deployer/ListHosts",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    wait_until_ok("the refusal logged", WAIT, || async {
        coord
            .child
            .log()
            .contains("certificate has 2 URI SANs; a Drover identity has exactly one")
    })
    .await;

    // A server holding a valid certificate of our CA, but an agent's: an
    // agent never takes it for a coordinator (nothing it says, a Fence
    // included, is ever read).
    let impostor = pki.agent("web-9");
    let config = drover_common::tls::TlsFiles {
        cert: impostor.cert.clone(),
        key: impostor.key.clone(),
        ca: impostor.ca.clone(),
        deny_list: None,
    }
    .server_config()
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let server = tokio::spawn(async move {
        let mut refused = 0;
        while refused < 2 {
            let (tcp, _) = listener.accept().await.unwrap();
            if acceptor.accept(tcp).await.is_err() {
                refused += 1;
            }
        }
        refused
    });
    let agent = Agent::start_with_addrs(
        &dir,
        "web-1",
        &[addr.to_string()],
        &strs(&pki.agent_flags("web-1")),
    );
    assert_eq!(
        tokio::time::timeout(WAIT, server).await.unwrap().unwrap(),
        2,
        "the agent gave up on every handshake"
    );
    wait_until_ok("the agent saying why", WAIT, || async {
        agent.child.log().contains(
            "the server presented spiffe://drover.test/agent/web-9, not a coordinator certificate",
        )
    })
    .await;
}

/// Reads datagrams from a notify socket until `want` has arrived in order.
async fn notified(socket: &tokio::net::UnixDatagram, want: &[&str]) -> Vec<String> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    let mut next = 0;
    tokio::time::timeout(WAIT, async {
        while next < want.len() {
            let n = socket.recv(&mut buf).await.unwrap();
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.contains(want[next]) {
                next += 1;
            }
            got.push(msg);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("waiting for {want:?}, got {got:?}"));
    got
}

#[tokio::test]
async fn daemons_speak_systemds_notify_protocol() {
    let dir = TestDir::new();
    let pki = Pki::new(&dir);
    let sock_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&sock_path).unwrap();
    // The harness passes its environment on: these reach the coordinator.
    // SAFETY: set before any child starts; this test's own threads do not
    // read the environment.
    unsafe {
        std::env::set_var("NOTIFY_SOCKET", &sock_path);
        std::env::set_var("WATCHDOG_USEC", "200000");
    }
    let coord = Coordinator::start_tls(&dir, "c1", &pki, &[]).await;
    let agent = Agent::start(&dir, "web-1", &[&coord], &strs(&pki.agent_flags("web-1")));
    unsafe {
        std::env::remove_var("NOTIFY_SOCKET");
        std::env::remove_var("WATCHDOG_USEC");
    }
    // Ready (both daemons), then watchdog pings every 100 ms.
    let got = notified(&socket, &["READY=1", "READY=1", "WATCHDOG=1", "WATCHDOG=1"]).await;
    assert!(
        got.iter().filter(|m| m.contains("READY=1")).count() >= 2,
        "{got:?}"
    );
    coord.child.signal(Signal::SIGHUP);
    notified(&socket, &["RELOADING=1", "READY=1"]).await;
    agent.child.signal(Signal::SIGTERM);
    notified(&socket, &["STOPPING=1"]).await;
}

#[tokio::test]
async fn coordinators_talk_to_etcd_and_each_other_over_mutual_tls() {
    let dir = TestDir::new();
    let pki = Pki::new(&dir);
    let etcd = drover_tests::Etcd::start_tls(&dir, "etcd", &pki).await;
    assert!(etcd.endpoint.starts_with("https://"));
    let store = ["--store", "etcd", "--etcd-endpoints", &etcd.endpoint];
    let c1 = Coordinator::start_tls(&dir, "c1", &pki, &store).await;
    let c2 = Coordinator::start_tls(&dir, "c2", &pki, &store).await;

    // Without a client certificate etcd refuses the coordinator, which says so.
    let plain_endpoint = etcd.endpoint.replace("https://", "http://");
    let out = std::process::Command::new(drover_tests::bins::bin("drover-coordinator"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.sub("c3"))
        .args(["--store", "etcd", "--etcd-endpoints", &plain_endpoint])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("connecting to etcd"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // c2 is still warming up, so c1 leads every shard: a deploy start sent
    // to c2 is forwarded to c1 over mutual TLS, as the caller.
    c2.apply_pipeline(
        &dir,
        "name = \"hello\"\nservice = \"hello\"\n\n[[stages]]\nname = \"prod\"\nselector = \"env=prod\"\nbatch_size = 1\n",
    );
    let (code, _, err) = c2.droverctl(&[
        "deploy",
        "start",
        "--pipeline",
        "hello",
        "--artifact",
        &"c".repeat(64),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("is not on the origin"),
        "answered by the leader: {err}"
    );
    let metrics = http_get(c2.metrics_addr, "/metrics").await;
    assert!(
        metrics.contains("drover_forwarded_requests_total 1"),
        "{metrics}"
    );
    // An upload to c1 is copied to c2 (coordinator to coordinator, mTLS).
    let artifact =
        drover_tests::artifacts::sample_artifact(&dir.sub("artifacts"), "hello", "v1", &[]);
    let digest = c1.push(&artifact.path, "hello", "v1");
    wait_until_ok("c2 holding a copy", WAIT, || async {
        c2.data_dir.join("artifacts/blobs").join(&digest).is_file()
    })
    .await;
}

/// Runs `sh -c script` in `dir`; panics with its output when it fails.
fn sh(dir: &std::path::Path, script: &str) {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn an_external_ca_made_with_openssl_works_the_same_way() {
    drover_tests::require_tool("openssl", "apt-get install -y openssl (scripts/test does)");
    let dir = TestDir::new();
    let ca = dir.sub("external");
    // The README's commands, for the CA and then one leaf per identity.
    sh(
        &ca,
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
         -keyout ca-key.pem -out ca.pem -subj '/CN=Example CA' \
         -addext 'subjectAltName=URI:spiffe://example.org' \
         -addext 'basicConstraints=critical,CA:TRUE' -addext 'keyUsage=critical,keyCertSign,cRLSign'",
    );
    let leaf = |stem: &str, id: &str, subject: &str, extra_san: &str| {
        sh(
            &ca,
            &format!(
                "openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
                 -keyout {stem}-key.pem -out {stem}.csr -subj '{subject}' && \
                 printf 'subjectAltName=URI:{id}{extra_san}\\nextendedKeyUsage=serverAuth,clientAuth\\nkeyUsage=digitalSignature,keyEncipherment\\n' > {stem}.ext && \
                 openssl x509 -req -in {stem}.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 90 \
                 -extfile {stem}.ext -out {stem}.pem"
            ),
        );
        Creds {
            cert: ca.join(format!("{stem}.pem")),
            key: ca.join(format!("{stem}-key.pem")),
            ca: ca.join("ca.pem"),
        }
    };
    let coordinator = leaf(
        "coordinator-c1",
        "spiffe://example.org/coordinator/c1",
        "/CN=coordinator c1",
        ",IP:127.0.0.1",
    );
    let agent = leaf(
        "agent-web-1",
        "spiffe://example.org/agent/web-1",
        "/CN=agent web-1",
        "",
    );
    let viewer = leaf(
        "user-val",
        "spiffe://example.org/user/val",
        "/O=viewer/CN=user val",
        "",
    );
    let coord_flags = coordinator.daemon_flags();
    let coord = Coordinator::start_as(&dir, "c1", &strs(&coord_flags), viewer.clone()).await;
    let _agent = Agent::start(&dir, "web-1", &[&coord], &strs(&agent.daemon_flags()));
    // The viewer's group (O=viewer) gives it the viewer role by default.
    wait_until_ok("web-1 listed to the viewer", WAIT, || async {
        let (code, out, _) = coord.droverctl_as(&viewer, &["hosts"]);
        code == 0 && out.contains("web-1  connected")
    })
    .await;
    let (code, _, err) = coord.droverctl_as(&viewer, &["pipeline", "list"]);
    assert_eq!(code, 0, "{err}");
    let spec = dir.path().join("p.toml");
    std::fs::write(&spec, "name = \"p\"\nservice = \"s\"\n").unwrap();
    let (_, _, err) = coord.droverctl_as(
        &viewer,
        &["pipeline", "apply", "-f", spec.to_str().unwrap()],
    );
    assert!(err.contains("PermissionDenied"), "{err}");
}

#[tokio::test]
async fn rotating_every_certificate_mid_deploy_drops_nothing() {
    use drover_common::proto::DeployPhase;
    use drover_tests::sample_fleet::SampleFleet;
    let fleet = SampleFleet::start_tls(3, 0, |_| Vec::new(), &[]).await;
    fleet.apply(
        r#"
name = "hello"
service = "hello"

[[stages]]
name = "prod"
selector = "env=prod"
batch_size = 1
settle_ms = 1500
gate = { samples = 1, bad_samples = 1, min_requests = 1, inconclusive = "INCONCLUSIVE_POLICY_PASS" }
"#,
    );
    let before: Vec<u64> = {
        let mut v = Vec::new();
        for (h, _) in &fleet.ports {
            v.push(fleet.coord.host(h).await.unwrap().connected_at_unix_ms);
        }
        v
    };
    let v1 = fleet.push("v1", &[]);
    let id = fleet.coord.start_deploy("hello", &v1).await;
    wait_until_ok("the first host on v1", WAIT, || async {
        fleet.starts("v1").iter().sum::<usize>() >= 1
    })
    .await;
    // New certificates for the coordinator and every agent, mid-deploy.
    let pki = fleet.pki.as_ref().unwrap();
    let admin = fleet.coord.client.clone().unwrap();
    let new_coord = pki.coordinator("coord");
    for (h, _) in &fleet.ports {
        pki.agent(h);
    }
    fleet.coord.child.signal(Signal::SIGHUP);
    for a in &fleet.agents {
        a.child.signal(Signal::SIGHUP);
    }
    wait_until_ok("the new coordinator certificate served", WAIT, || async {
        served_serial(&fleet.coord, &admin).await == Pki::serial(&new_coord)
    })
    .await;
    assert!(
        fleet.starts("v1").iter().sum::<usize>() < 3,
        "the rotation happened mid-deploy"
    );
    let d = fleet.coord.wait_phase(&id, DeployPhase::Complete).await;
    assert_eq!(d.batches.len(), 3);
    assert_eq!(fleet.starts("v1"), vec![1, 1, 1], "each host started once");
    for ((h, _), at) in fleet.ports.iter().zip(before) {
        let host = fleet.coord.host(h).await.unwrap();
        assert_eq!(host.state(), ConnectionState::Connected);
        assert_eq!(host.connected_at_unix_ms, at, "{h} kept its stream");
    }
}

#[tokio::test]
async fn a_stream_ends_when_its_certificate_expires_and_a_renewed_one_reconnects() {
    let dir = TestDir::new();
    let pki = Pki::new(&dir);
    let coord = Coordinator::start_tls(&dir, "c1", &pki, &[]).await;
    // Valid for about five more seconds (validity starts a minute back).
    let short = pki.issue("agent", "web-1", &["--valid-for", "65s"]);
    let agent = Agent::start(&dir, "web-1", &[&coord], &strs(&short.daemon_flags()));
    coord
        .wait_state("web-1", ConnectionState::Connected, WAIT)
        .await;
    // The coordinator ends the stream at expiry; the expired certificate
    // gets no new one.
    coord
        .wait_state("web-1", ConnectionState::Disconnected, WAIT)
        .await;
    wait_until_ok("the expiry logged on both sides", WAIT, || async {
        coord.child.log().contains("certificate expired")
            && agent.child.log().contains("has expired")
    })
    .await;
    // Renewed in place and reloaded: back.
    pki.agent("web-1");
    agent.child.signal(Signal::SIGHUP);
    coord
        .wait_state("web-1", ConnectionState::Connected, WAIT)
        .await;
}
