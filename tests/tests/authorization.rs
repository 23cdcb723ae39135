//! Authorization end to end, on mutual TLS with real certificates: roles
//! scoped by pipeline and environment from a policy file (reloaded on
//! SIGHUP), filtered reads, free text that cannot forge audit lines, and
//! approvals that need several approvers and never the starter.

use std::time::Duration;

use drover_tests::pki::{Creds, Pki};
use drover_tests::{Coordinator, TestDir, http_get, wait_until, wait_until_ok};
use nix::sys::signal::Signal;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn roles_scopes_and_the_policy_decide_every_call() {
    let dir = TestDir::new();
    let pki = Pki::new(&dir);
    let policy = dir.path().join("policy.toml");
    let good = r#"
[roles]
starter = ["deploys.read", "deploys.start"]

[groups]
sre = ["user/sam"]

[[grant]]
to = ["group/admin"]
role = "admin"

[[grant]]
to = ["user/ci"]
role = "deployer"
environments = ["staging"]

[[grant]]
to = ["user/ci"]
role = "starter"
environments = ["prod"]

[[grant]]
to = ["user/dev"]
role = "deployer"
environments = ["staging"]

[[grant]]
to = ["group/sre"]
role = "approver"
environments = ["prod"]

[[grant]]
to = ["user/val"]
role = "viewer"
pipelines = ["web-*"]
"#;
    std::fs::write(&policy, good).unwrap();
    let coord =
        Coordinator::start_tls(&dir, "c1", &pki, &["--policy", policy.to_str().unwrap()]).await;
    for name in ["web-app", "hello"] {
        coord.apply_pipeline(
            &dir,
            &format!(
                "name = \"{name}\"\nservice = \"hello\"\n\n[[stages]]\nname = \"staging\"\nselector = \"env=staging\"\nbatch_size = 1\n\n[[stages]]\nname = \"prod\"\nselector = \"env=prod\"\nbatch_size = 1\n"
            ),
        );
    }
    let ci = pki.user("ci", &[]);
    let dev = pki.user("dev", &[]);
    let val = pki.user("val", &[]);
    let artifact = "b".repeat(64);
    let start = |creds: &Creds, pipeline: &str, from: &str| {
        let mut args = vec![
            "deploy",
            "start",
            "--pipeline",
            pipeline,
            "--artifact",
            &artifact,
        ];
        if !from.is_empty() {
            args.extend(["--from-stage", from]);
        }
        coord.droverctl_as(creds, &args)
    };
    // CI may start deploys in staging and prod (past authorization, the
    // unknown artifact is what stops these); dev only in staging.
    for (who, from) in [(&ci, ""), (&ci, "prod"), (&dev, "")] {
        let (code, _, err) = start(who, "hello", from);
        assert_eq!(code, 1);
        assert!(!err.contains("PermissionDenied"), "{err}");
    }
    let (_, _, err) = start(&dev, "hello", "prod");
    assert!(
        err.contains("PermissionDenied")
            && err.contains(
                "user/dev lacks permission deploys.start on pipeline hello, environment prod"
            ),
        "{err}"
    );
    // A viewer reads what its scope covers, and only that; writes nothing.
    let (code, out, err) = coord.droverctl_as(&val, &["pipeline", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("web-app") && !out.lines().any(|l| l.trim_start().starts_with("hello")),
        "{out}"
    );
    let spec = dir.path().join("p.toml");
    std::fs::write(&spec, "name = \"web-app\"\nservice = \"x\"\n").unwrap();
    let (_, _, err) =
        coord.droverctl_as(&val, &["pipeline", "apply", "-f", spec.to_str().unwrap()]);
    assert!(
        err.contains("PermissionDenied") && err.contains("pipelines.write"),
        "{err}"
    );
    // A user nobody granted anything gets nothing.
    let nobody = pki.user("nobody", &["--role", "viewer"]);
    let (_, _, err) = coord.droverctl_as(&nobody, &["hosts"]);
    assert!(err.contains("PermissionDenied"), "{err}");
    // Free text cannot forge audit lines.
    let (_, _, err) = coord.droverctl_as(
        &ci,
        &[
            "deploy",
            "start",
            "--pipeline",
            "hello",
            "--artifact",
            &artifact,
            "--requester",
            "ci\n2026-01-01 approved by root",
        ],
    );
    assert!(
        err.contains("InvalidArgument") && err.contains("control character"),
        "{err}"
    );

    // A policy that does not parse: the old one stays, the error is logged
    // and counted.
    std::fs::write(&policy, "[[grant]]\nto = [\"user/ci\"]\nrole = \"god\"\n").unwrap();
    coord.child.signal(Signal::SIGHUP);
    wait_until("the failed reload counted", WAIT, || async {
        let m = http_get(coord.metrics_addr, "/metrics").await;
        if m.contains("drover_reload_errors_total 1") {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    })
    .await;
    let log = coord.child.log();
    assert!(
        log.contains("policy reload failed") && log.contains("grant[0].role: unknown role"),
        "{log}"
    );
    assert_eq!(coord.droverctl_as(&val, &["pipeline", "list"]).0, 0);
    // A good one takes effect: val loses the grant.
    std::fs::write(
        &policy,
        good.replace("to = [\"user/val\"]", "to = [\"user/vic\"]"),
    )
    .unwrap();
    coord.child.signal(Signal::SIGHUP);
    wait_until_ok("val's grant gone", WAIT, || async {
        coord.droverctl_as(&val, &["pipeline", "list"]).0 == 1
    })
    .await;
}

#[tokio::test]
async fn prod_needs_two_approvers_from_sre_and_never_the_starter() {
    use drover_common::proto::DeployPhase;
    use drover_tests::sample_fleet::SampleFleet;
    let policy_dir = tempfile::tempdir().unwrap();
    let policy = policy_dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        r#"
[groups]
sre = ["user/bob", "user/carol", "user/alice"]

[[grant]]
to = ["group/admin"]
role = "admin"

[[grant]]
to = ["user/alice", "user/dave"]
role = "deployer"

[[grant]]
to = ["group/sre"]
role = "approver"
environments = ["prod"]

[[grant]]
to = ["user/dave"]
role = "viewer"
"#,
    )
    .unwrap();
    let fleet = SampleFleet::start_tls(
        2,
        0,
        |_| Vec::new(),
        &["--policy", policy.to_str().unwrap()],
    )
    .await;
    fleet.apply(
        r#"
name = "hello"
service = "hello"

[[stages]]
name = "staging"
selector = "idx=0"
batch_size = 1
gate = { samples = 1, bad_samples = 1, min_requests = 1, inconclusive = "INCONCLUSIVE_POLICY_PASS" }

[[stages]]
name = "prod"
selector = "env=prod"
batch_size = 1
requires_approval = true
required_approvals = 2
four_eyes = true
approver_roles = ["approver"]
gate = { samples = 1, bad_samples = 1, min_requests = 1, inconclusive = "INCONCLUSIVE_POLICY_PASS" }
"#,
    );
    let pki = fleet.pki.as_ref().unwrap();
    let [alice, bob, carol, dave] = ["alice", "bob", "carol", "dave"].map(|u| pki.user(u, &[]));
    let v1 = fleet.push("v1", &[]);
    let (code, out, err) = fleet.coord.droverctl_as(
        &alice,
        &[
            "deploy",
            "start",
            "--pipeline",
            "hello",
            "--artifact",
            &v1,
            "--requester",
            "release 42",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let id = out.split_whitespace().next().unwrap().to_string();
    fleet
        .coord
        .wait_phase(&id, DeployPhase::AwaitingApproval)
        .await;
    let approve = |who: &Creds| fleet.coord.droverctl_as(who, &["deploy", "approve", &id]);

    // A deployer who is not an approver, then the starter (four eyes).
    let (code, _, err) = approve(&dave);
    assert_eq!(code, 1);
    assert!(
        err.contains("PermissionDenied") && err.contains("deploys.approve"),
        "{err}"
    );
    let (code, _, err) = approve(&alice);
    assert_eq!(code, 1);
    assert!(
        err.contains("PermissionDenied") && err.contains("four eyes: user/alice started deploy"),
        "{err}"
    );
    // Two distinct approvers from sre; the same one twice counts once.
    assert_eq!(approve(&bob).0, 0);
    assert_eq!(approve(&bob).0, 0);
    let d = fleet.coord.get_deploy(&id).await;
    assert_eq!(
        d.phase(),
        DeployPhase::AwaitingApproval,
        "{:?}",
        d.approvals
    );
    assert_eq!(approve(&carol).0, 0);
    fleet.coord.wait_phase(&id, DeployPhase::Complete).await;

    // The audit names authenticated identities; free text is only a note.
    let (_, audit, _) = fleet.coord.droverctl(&["audit", "--service", "hello"]);
    assert!(audit.contains("user/alice (note: release 42)"), "{audit}");
    assert!(
        audit.contains("user/bob") && audit.contains("user/carol"),
        "{audit}"
    );
    assert!(
        audit.contains("approval 1 of 2 for stage prod by user/bob"),
        "{audit}"
    );
}
