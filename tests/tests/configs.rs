//! Configuration bundles end to end: real agents running the sample
//! service, which reads the bundle's document (`--config
//! ${DROVER_CONFIG_DIR}/sample.toml`). A config-only deploy goes through
//! the environment's stage with its gate; a bad value is caught and
//! rolled back to the previous config while the code stays; secrets are
//! resolved on the hosts and never reach the coordinator; a host that
//! lacks a secret fails its command by the secret's name and nothing
//! starts with a blank; a config deploy through a canary stage is judged
//! like code, its cohort against the hosts on the old config.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use drover_common::proto::{
    AnalysisVerdict, AuditKind, ConfigBundle, ConfigFormat, DeployPhase, ListConfigsRequest,
    PushConfigRequest, StartDeployRequest, WhatWasRunningRequest,
};
use drover_tests::artifacts::{artifact_with, sample_manifest};
use drover_tests::http_get_status;
use drover_tests::sample_fleet::SampleFleet;

const PIPELINE: &str = r#"
name = "hello"
service = "hello"

[[stages]]
name = "prod"
selector = "env=prod"
batch_size = 2
settle_ms = 0
stuck_timeout_ms = 20000
gate = { max_error_rate = 0.05, samples = 3, bad_samples = 2, min_requests = 1, inconclusive = "INCONCLUSIVE_POLICY_PASS" }
"#;

/// The secret the hosts hold; it must never be seen by the coordinator.
const SECRET: &str = "hunter2-never-leaves-the-host";

/// Pushes a sample-service version that reads its config bundle's
/// document and takes a new one as `reload` says.
fn push_reading_config(f: &SampleFleet, version: &str, reload: &str) -> String {
    let manifest = sample_manifest(
        "hello",
        version,
        &["--config", "${DROVER_CONFIG_DIR}/sample.toml"],
    ) + &format!("\n[config]\ndocument = \"sample.toml\"\nreload = \"{reload}\"\n");
    let a = artifact_with(
        f.dir.path(),
        &format!("hello-{version}.tar.gz"),
        &manifest,
        &[],
    );
    f.coord.push(&a.path, "hello", version)
}

/// What each host's service says on /config, as key → value.
async fn configs_served(f: &SampleFleet) -> Vec<std::collections::BTreeMap<String, String>> {
    let mut out = Vec::new();
    for (_, port) in &f.ports {
        let (status, body) = http_get_status(SocketAddr::from(([127, 0, 0, 1], *port)), "/config")
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        out.push(
            body.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
    }
    out
}

/// `droverctl config push` of `document` (TOML) and the files in `files`;
/// (exit code, stdout, stderr).
fn push_config(
    f: &SampleFleet,
    name: &str,
    env: &str,
    document: &str,
    files: Option<&Path>,
) -> (i32, String, String) {
    let path = f.dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, document).unwrap();
    let path = path.display().to_string();
    let mut args = vec![
        "config",
        "push",
        "--service",
        "hello",
        "--env",
        env,
        "--document",
        &path,
    ];
    let files = files.map(|p| p.display().to_string());
    if let Some(dir) = &files {
        args.extend(["--files", dir]);
    }
    f.coord.droverctl(&args)
}

/// The digest `droverctl config push` printed.
fn digest_of(out: &str) -> String {
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn deploy_config(f: &SampleFleet, digest: &str) -> (i32, String, String) {
    f.coord.droverctl(&[
        "deploy",
        "start",
        "--pipeline",
        "hello",
        "--config",
        digest,
        "--wait",
    ])
}

#[tokio::test]
async fn a_config_only_deploy_with_a_bad_value_is_caught_by_its_gate_and_rolled_back_while_the_code_stays()
 {
    let secrets = tempfile::tempdir().unwrap();
    let secrets_file = secrets.path().join("secrets");
    std::fs::write(&secrets_file, format!("DB_PASSWORD={SECRET}\n")).unwrap();
    std::fs::set_permissions(&secrets_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let file_flag = secrets_file.display().to_string();
    let f = SampleFleet::start_with(4, 40, |_| {
        vec!["--secrets-file".to_string(), file_flag.clone()]
    })
    .await;
    f.apply(PIPELINE);
    let v1 = push_reading_config(&f, "v1", "sighup");
    let (code, out, err) = f.deploy_through("hello", &v1);
    assert_eq!(code, 0, "{out}\n{err}");
    let before = configs_served(&f).await;
    assert!(
        before.iter().all(|c| c["greeting"].is_empty()),
        "{before:?}"
    );

    // Bad input: refused naming the field, nothing kept.
    let mut api = f.coord.deployer().await;
    let bundle = |service: &str, env: &str, doc: &str| ConfigBundle {
        service: service.into(),
        environment: env.into(),
        format: ConfigFormat::Toml as i32,
        document: doc.as_bytes().to_vec(),
        ..Default::default()
    };
    for (b, field) in [
        (bundle("ghost", "prod", "x = 1"), "service"),
        (bundle("hello", "qa", "x = 1"), "environment"),
        (bundle("hello", "prod", "x = = 1"), "document"),
        (
            bundle("hello", "prod", "p = \"secret://bad name\""),
            "document",
        ),
    ] {
        let e = api
            .push_config(PushConfigRequest { bundle: Some(b) })
            .await
            .expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    let listed = |api: &mut drover_common::proto::deployer_client::DeployerClient<_>| {
        let mut api = api.clone();
        async move {
            api.list_configs(ListConfigsRequest {
                service: "hello".into(),
                environment: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .versions
        }
    };
    assert!(listed(&mut api).await.is_empty());
    let e = api
        .start_deploy(StartDeployRequest {
            pipeline: "hello".into(),
            config: "ab".repeat(32),
            ..Default::default()
        })
        .await
        .expect_err("no such bundle");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("push it first"), "{}", e.message());

    // A good config: a document whose password is a secret reference, and
    // a file. Pushing the same content again answers the same digest.
    let files = f.dir.path().join("config-files");
    std::fs::create_dir_all(files.join("certs")).unwrap();
    std::fs::write(files.join("certs/ca.pem"), "PEM").unwrap();
    let good = "greeting = \"hi\"\nerror_rate = 0.0\npassword = \"secret://DB_PASSWORD\"\n";
    let (code, out, err) = push_config(&f, "good", "prod", good, Some(&files));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("secrets on hosts: DB_PASSWORD"), "{out}");
    let c1 = digest_of(&out);
    assert_eq!(c1.len(), 64, "{out}");
    let (code, again, _) = push_config(&f, "good-again", "prod", good, Some(&files));
    assert_eq!((code, digest_of(&again)), (0, c1.clone()), "{again}");

    // Deployed alone: the same processes reload it on SIGHUP (the manifest
    // says so), with the secret resolved on the host.
    let (code, out, err) = deploy_config(&f, &c1);
    assert_eq!(code, 0, "{out}\n{err}");
    let after = configs_served(&f).await;
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(a["greeting"], "hi", "{a:?}");
        assert_eq!(a["password_set"], "true", "{a:?}");
        assert_eq!(a["pid"], b["pid"], "reloaded, not restarted: {a:?}");
    }
    assert_eq!(f.versions().await, vec!["v1"; 4], "the code stays");
    for (host, _) in &f.ports {
        let dir = f
            .dir
            .path()
            .join(format!("agent-{host}/services/hello/config"));
        let doc = std::fs::read_to_string(dir.join("sample.toml")).unwrap();
        assert!(doc.contains(SECRET), "resolved on the host: {doc}");
        let mode = std::fs::metadata(dir.join("sample.toml"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read(dir.join("certs/ca.pem")).unwrap(), b"PEM");
    }
    let between = drover_common::time::now_unix_ms();

    // A bad value: half the requests fail. The gate catches it in the
    // first batch and every host goes back to c1; the code never changed.
    let bad = "greeting = \"bad\"\nerror_rate = 0.5\npassword = \"secret://DB_PASSWORD\"\n";
    let (code, out, _) = push_config(&f, "bad", "prod", bad, None);
    assert_eq!(code, 0, "{out}");
    let c2 = digest_of(&out);
    let (code, out, err) = deploy_config(&f, &c2);
    assert_eq!(code, 2, "rolled back: {out}\n{err}");
    let back = configs_served(&f).await;
    for (a, b) in after.iter().zip(&back) {
        assert_eq!(b["greeting"], "hi", "{b:?}");
        assert_eq!(b["error_rate"], "0", "{b:?}");
        assert_eq!(b["pid"], a["pid"], "{b:?}");
    }
    assert_eq!(f.versions().await, vec!["v1"; 4], "the code stays");
    // Each host says so itself (its next heartbeat).
    drover_tests::wait_until_ok(
        "every host reports v1 with c1",
        Duration::from_secs(5),
        || async {
            f.coord.hosts("env=prod").await.iter().all(|h| {
                h.services
                    .iter()
                    .all(|s| (&s.current_artifact, &s.config) == (&v1, &c1))
            })
        },
    )
    .await;

    // The audit records code and config; the secret is nowhere in it.
    let events = f.coord.audit("hello").await;
    assert!(!format!("{events:?}").contains(SECRET));
    let changes: Vec<(String, String, String)> = events
        .iter()
        .filter(|e| e.event() == AuditKind::EnvironmentChanged)
        .map(|e| {
            (
                e.to_artifact.clone(),
                e.from_config.clone(),
                e.to_config.clone(),
            )
        })
        .collect();
    assert_eq!(
        changes,
        [
            (v1.clone(), String::new(), String::new()),
            (v1.clone(), String::new(), c1.clone()),
            (v1.clone(), c2.clone(), c1.clone()),
        ]
    );
    let caught = events
        .iter()
        .find(|e| e.event() == AuditKind::BatchFailed)
        .expect("the gate failed a batch");
    assert!(caught.reason.contains("health gate failed"), "{caught:?}");
    assert_eq!(caught.config, c2, "the batch's event names the config");
    let rolled_back = events
        .iter()
        .find(|e| e.event() == AuditKind::RolledBack)
        .expect("rolled back");
    assert_eq!((&rolled_back.artifact, &rolled_back.config), (&v1, &c2));
    let versions = listed(&mut api).await;
    assert_eq!(versions.len(), 2);
    assert!(versions.iter().all(|v| v.secrets == ["DB_PASSWORD"]));

    // What ran when: both digests, then and now.
    let at = |t: u64| WhatWasRunningRequest {
        service: "hello".into(),
        at_unix_ms: t,
    };
    let then = api
        .what_was_running(at(between))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((&then.artifact, &then.config), (&v1, &c1));
    let (code, out, _) = f.coord.droverctl(&["running", "--service", "hello"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with(&format!("hello: {v1} with config {c1} since")),
        "{out}"
    );
}

#[tokio::test]
async fn a_host_without_the_secret_fails_its_restart_by_the_secrets_name_and_nothing_starts_blank()
{
    let secrets = tempfile::tempdir().unwrap();
    let secrets_file = secrets.path().join("secrets");
    std::fs::write(&secrets_file, "API_TOKEN=t0ken\n").unwrap();
    let file_flag = secrets_file.display().to_string();
    // web-0 holds the secret; web-1 does not.
    let f = SampleFleet::start_with(2, 0, |i| match i {
        0 => vec!["--secrets-file".to_string(), file_flag.clone()],
        _ => Vec::new(),
    })
    .await;
    f.apply(&PIPELINE.replace("batch_size = 2", "batch_size = 1"));
    let v1 = push_reading_config(&f, "v1", "restart");
    assert_eq!(f.deploy_through("hello", &v1).0, 0);
    let before = configs_served(&f).await;

    let doc = "greeting = \"with token\"\ntoken = \"secret://API_TOKEN\"\n";
    let (code, out, err) = push_config(&f, "token", "prod", doc, None);
    assert_eq!(code, 0, "{out}\n{err}");
    let c1 = digest_of(&out);
    let mut api = f.coord.deployer().await;
    let d = api
        .start_deploy(StartDeployRequest {
            pipeline: "hello".into(),
            config: c1.clone(),
            requester: "ci".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((&d.artifact, &d.config), (&v1, &c1));
    let d = f.coord.wait_phase(&d.id, DeployPhase::RolledBack).await;
    assert!(
        d.reason.contains("web-1: restart: config ")
            && d.reason
                .contains("secret API_TOKEN not available on this host; nothing was changed"),
        "{}",
        d.reason
    );
    // web-0 restarted with the token (reload = restart) and was put back
    // without a config; web-1's service was never touched.
    let now = configs_served(&f).await;
    assert_ne!(now[0]["pid"], before[0]["pid"], "web-0 restarted");
    assert_eq!(now[0]["greeting"], "", "{:?}", now[0]);
    assert_eq!(now[1]["pid"], before[1]["pid"], "web-1 untouched");
    assert_eq!(now[1]["greeting"], "", "{:?}", now[1]);
    let web1 = f.dir.path().join("agent-web-1/services/hello");
    assert!(!web1.join("config").exists(), "nothing placed on web-1");
    assert!(
        !web1.join("configs").exists()
            || std::fs::read_dir(web1.join("configs")).unwrap().count() == 0
    );
    assert!(
        !f.dir
            .path()
            .join("agent-web-0/services/hello/config")
            .exists()
    );
}

#[tokio::test]
async fn a_bad_config_fails_its_canary_against_the_hosts_on_the_old_config() {
    let f = SampleFleet::start(5, 100).await;
    f.apply(&drover_tests::specs::canary_pipeline(
        "hello",
        "batch_percent = 50\nsettle_ms = 0\nstuck_timeout_ms = 20000\n\
         gate = { max_error_rate = 0.05, samples = 2, bad_samples = 2, min_requests = 1, inconclusive = \"INCONCLUSIVE_POLICY_PASS\" }",
        "[{ count = 1, bake_ms = 20000 }]",
        "",
    ));
    // Real services' noise: 0.1% errors, drawn at random.
    let manifest = sample_manifest(
        "hello",
        "v1",
        &[
            "--error-rate",
            "0.001",
            "--random-errors",
            "--config",
            "${DROVER_CONFIG_DIR}/sample.toml",
        ],
    ) + "\n[config]\ndocument = \"sample.toml\"\nreload = \"sighup\"\n";
    let a = artifact_with(f.dir.path(), "hello-v1.tar.gz", &manifest, &[]);
    let v1 = f.coord.push(&a.path, "hello", "v1");
    let (code, out, err) = f.deploy_through("hello", &v1);
    assert_eq!(code, 0, "{out}\n{err}");
    let before = configs_served(&f).await;

    // The environment's first config, and a bad one: 3% errors.
    let (code, out, _) = push_config(&f, "bad", "prod", "error_rate = 0.03\n", None);
    assert_eq!(code, 0, "{out}");
    let c1 = digest_of(&out);
    let (code, out, err) = deploy_config(&f, &c1);
    assert_eq!(code, 2, "rolled back: {out}\n{err}");
    let d = f.coord.latest_deploy("hello").await;
    assert_eq!(
        (d.config.as_str(), d.artifact.as_str()),
        (c1.as_str(), v1.as_str())
    );
    let a = &d.analyses[0];
    assert_eq!(a.verdict(), AnalysisVerdict::Fail, "{a:?}");
    assert!(a.reason.contains("error_rate"), "{}", a.reason);
    assert!(a.baked_ms < 20_000, "inside the first window: {a:?}");
    assert_eq!(a.canary_hosts, ["web-0"]);
    // Only the canary took the config (read at start, on SIGHUP with it
    // and without it); it went back to none, and every process is the one
    // that ran before.
    let after = configs_served(&f).await;
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert_eq!(a["pid"], b["pid"], "web-{i}");
        assert_eq!(a["error_rate"], "0.001", "web-{i}: {a:?}");
        let reloads = if i == 0 { "3" } else { "1" };
        assert_eq!(a["loaded"], reloads, "web-{i}: {a:?}");
    }
    assert!(
        !f.dir
            .path()
            .join("agent-web-0/services/hello/config")
            .exists()
    );
}

#[tokio::test]
async fn with_reload_none_the_files_change_and_the_process_is_left_alone() {
    let f = SampleFleet::start(1, 0).await;
    f.apply(PIPELINE);
    let v1 = push_reading_config(&f, "v1", "none");
    assert_eq!(f.deploy_through("hello", &v1).0, 0);
    let before = configs_served(&f).await;
    let (code, out, _) = push_config(&f, "quiet", "prod", "greeting = \"later\"\n", None);
    assert_eq!(code, 0, "{out}");
    let (code, out, err) = deploy_config(&f, &digest_of(&out));
    assert_eq!(code, 0, "{out}\n{err}");
    let after = configs_served(&f).await;
    assert_eq!(after, before, "not restarted, not signalled");
    let doc = f
        .dir
        .path()
        .join("agent-web-0/services/hello/config/sample.toml");
    assert_eq!(
        std::fs::read_to_string(doc).unwrap().trim(),
        "greeting = \"later\""
    );
}
