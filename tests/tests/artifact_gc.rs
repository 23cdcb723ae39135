//! Origin retention end to end (issue 15): `droverctl artifact gc` and the
//! periodic sweep keep every artifact an environment runs or a host can
//! roll back to, the last releases of each service and young ones, remove
//! the rest (blob and metadata), and audit each removal.

use std::time::Duration;

use drover_common::proto::artifacts_client::ArtifactsClient;
use drover_common::proto::{AuditKind, StatRequest};
use drover_tests::sample_fleet::SampleFleet;
use drover_tests::wait_until_ok;

const PIPELINE: &str = r#"
name = "hello-prod"
service = "hello"

[[stages]]
name = "prod"
selector = "env=prod"
batch_size = 2
settle_ms = 0
stuck_timeout_ms = 20000
gate = { max_error_rate = 0.5, samples = 1, bad_samples = 1, min_requests = 0, inconclusive = "INCONCLUSIVE_POLICY_PASS" }
"#;

async fn stored(fleet: &SampleFleet, sha256: &str) -> bool {
    let mut origin = ArtifactsClient::new(fleet.coord.connect().await);
    match origin
        .stat(StatRequest {
            sha256: sha256.into(),
        })
        .await
    {
        Ok(_) => true,
        Err(s) if s.code() == tonic::Code::NotFound => false,
        Err(s) => panic!("stat: {s:?}"),
    }
}

/// Artifacts the audit says were collected, and by whom.
async fn collected(fleet: &SampleFleet) -> Vec<(String, String)> {
    fleet
        .coord
        .audit("hello")
        .await
        .into_iter()
        .filter(|e| e.event() == AuditKind::ArtifactCollected)
        .map(|e| (e.artifact, e.actor))
        .collect()
}

#[tokio::test]
async fn gc_keeps_what_runs_or_can_roll_back_and_removes_the_rest() {
    let fleet = SampleFleet::start_configured(
        2,
        0,
        |_| Vec::new(),
        &[
            "--artifact-retention",
            "0s",
            "--artifact-keep-last",
            "1",
            "--gc-interval",
            "0s",
        ],
    )
    .await;
    fleet.apply(PIPELINE);
    let v0 = fleet.push("v0", &[]);
    let v1 = fleet.push("v1", &[]);
    let v2 = fleet.push("v2", &[]);
    let v3 = fleet.push("v3", &[]);
    for v in [&v1, &v2] {
        let (code, out, err) = fleet.deploy_through("hello-prod", v);
        assert_eq!(code, 0, "{out}\n{err}");
    }
    let v4 = fleet.push("v4", &[]);

    // A dry run lists and removes nothing.
    let (code, out, err) = fleet.coord.droverctl(&["artifact", "gc", "--dry-run"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("2 artifacts") && out.contains("would be removed (dry run)"),
        "{out}"
    );
    assert!(out.contains("kept: running in hello-prod/prod"), "{out}");
    assert!(out.contains("kept: one of the last 1 of hello"), "{out}");
    for v in [&v0, &v1, &v2, &v3, &v4] {
        assert!(stored(&fleet, v).await);
    }

    let (code, out, err) = fleet.coord.droverctl(&["artifact", "gc"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("2 artifacts") && out.contains("removed"),
        "{out}"
    );
    // v2 runs in prod, v1 is every host's previous release (a rollback
    // needs no download, but the origin keeps it too), v4 is the newest.
    for (v, kept) in [
        (&v0, false),
        (&v1, true),
        (&v2, true),
        (&v3, false),
        (&v4, true),
    ] {
        assert_eq!(stored(&fleet, v).await, kept, "{v}");
        let blob = fleet.coord.data_dir.join("artifacts/blobs").join(v);
        assert_eq!(blob.exists(), kept, "{}", blob.display());
    }
    // Each removal is audited once, by whoever asked (not "drover").
    let mut audited: Vec<String> = collected(&fleet)
        .await
        .into_iter()
        .map(|(artifact, actor)| {
            assert_ne!(actor, "drover");
            artifact
        })
        .collect();
    audited.sort();
    let mut expected = vec![v0.clone(), v3.clone()];
    expected.sort();
    assert_eq!(audited, expected);
    // A deploy of a collected artifact is refused; a second gc finds nothing.
    let (code, _, err) = fleet.deploy_through("hello-prod", &v3);
    assert_ne!(code, 0);
    assert!(
        err.contains(&v3[..12]) || err.contains("no artifact"),
        "{err}"
    );
    let (code, out, _) = fleet.coord.droverctl(&["artifact", "gc"]);
    assert_eq!(code, 0);
    assert!(out.contains("0 artifacts"), "{out}");
}

#[tokio::test]
async fn the_periodic_sweep_collects_by_itself_and_audits_as_drover() {
    let fleet = SampleFleet::start_configured(
        1,
        0,
        |_| Vec::new(),
        &[
            "--artifact-retention",
            "0s",
            "--artifact-keep-last",
            "1",
            "--gc-interval",
            "1s",
        ],
    )
    .await;
    let old = fleet.push("old", &[]);
    let new = fleet.push("new", &[]);
    wait_until_ok(
        "the sweep to collect the old artifact",
        Duration::from_secs(20),
        || async { !stored(&fleet, &old).await },
    )
    .await;
    assert!(stored(&fleet, &new).await, "the newest is kept");
    assert_eq!(collected(&fleet).await, vec![(old, "drover".to_string())]);
}
