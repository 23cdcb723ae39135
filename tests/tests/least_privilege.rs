//! Least privilege (issue 11, deliverable 1), end to end as root with a
//! real unprivileged user made by the test: a service and its hooks run as
//! that user with no supplementary groups and a rebuilt environment (the
//! agent's own secrets never reach them), cannot change their release or
//! read the agent's files, and root is refused unless the agent allows it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use drover_common::artifact::build::ArchiveBuilder;
use drover_common::proto::{CommandStatus, ConnectionState};
use drover_tests::artifacts::{BuiltArtifact, write};
use drover_tests::commands::{cmd, pull, restart};
use drover_tests::users::SystemUser;
use drover_tests::{Agent, Coordinator, TestDir, wait_until_ok};

const SERVICE: &str = "facts";
const WAIT: Duration = Duration::from_secs(20);

/// Prints who it runs as and what it may touch, then stays up.
const START: &str = r#"#!/bin/sh
data="$DROVER_RELEASE_DIR/../../../.."
echo "uid=$(id -u) gid=$(id -g) groups=$(id -G)"
env | sort | sed 's/^/env:/'
if echo tampered >> "$DROVER_RELEASE_DIR/bin/start" 2>/dev/null; then echo release=writable; else echo release=read-only; fi
if cat "$data/state.json" >/dev/null 2>&1; then echo journal=readable; else echo journal=private; fi
if ls "$data" >/dev/null 2>&1; then echo datadir=listable; else echo datadir=closed; fi
if ls "$data/cache" >/dev/null 2>&1; then echo cache=listable; else echo cache=private; fi
echo facts-done
exec sleep 600
"#;

/// An artifact whose `bin/start` is [`START`], stored with mode 0777, run as
/// `user` (or the agent's default), with a pre_start hook that writes its
/// own facts to `$FACTS_DIR/hook-<release>.txt`.
fn facts_artifact(dir: &TestDir, name: &str, user: Option<&str>) -> BuiltArtifact {
    let user_line = user.map(|u| format!("user = {u:?}\n")).unwrap_or_default();
    let manifest = format!(
        "service = \"{SERVICE}\"\nversion = \"{name}\"\n\n[start]\ncommand = \"bin/start\"\n\
         stop_grace = \"1s\"\n{user_line}env = {{ FROM_MANIFEST = \"yes\" }}\n\n[hooks]\n\
         pre_start = {{ command = [\"/bin/sh\", \"-c\", \"{{ id -u; id -G; env; }} > $FACTS_DIR/hook-$DROVER_RELEASE.txt\"] }}\n"
    );
    let bytes = ArchiveBuilder::in_memory()
        .file("drover.toml", manifest.as_bytes())
        .raw(
            "bin/start",
            tar::EntryType::Regular,
            None,
            0o777,
            START.as_bytes(),
        )
        .finish();
    write(&dir.sub("artifacts"), &format!("{name}.tar.gz"), bytes)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn services_and_hooks_run_unprivileged_with_a_clean_environment() {
    let user = SystemUser::create();
    let dir = TestDir::new();
    // Hooks may write only here (sticky, world-writable, like /tmp).
    let facts_dir = dir.sub("facts");
    std::fs::set_permissions(&facts_dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let facts_env = format!("FACTS_DIR={}", facts_dir.display());
    let agent = Agent::start_with_env(
        &dir,
        "web-1",
        &[coord.addr_arg()],
        &["--heartbeat-interval", "200ms", "--env", &facts_env],
        &[
            ("SECRET_TOKEN", "hunter2"),
            ("AWS_SECRET_ACCESS_KEY", "xyz"),
        ],
    );
    coord
        .wait_state("web-1", ConnectionState::Connected, WAIT)
        .await;

    // 1. Root is refused unless the agent allows it; nothing starts.
    let as_root = facts_artifact(&dir, "as-root", Some("root"));
    coord.push(&as_root.path, SERVICE, "as-root");
    let ok = |u: &drover_common::proto::CommandUpdate| {
        assert_eq!(u.status(), CommandStatus::Succeeded, "{u:?}")
    };
    ok(&coord
        .send("web-1", cmd("p0", 0, pull(SERVICE, &as_root.digest)))
        .await
        .unwrap());
    let refused = coord
        .send("web-1", cmd("r0", 0, restart(SERVICE, &as_root.digest)))
        .await
        .unwrap();
    assert_eq!(refused.status(), CommandStatus::Failed);
    assert!(
        refused.reason.contains("--allow-root-services"),
        "{}",
        refused.reason
    );
    assert!(
        std::fs::read_dir(&facts_dir).unwrap().next().is_none(),
        "no hook ran for a refused user"
    );

    // 2. The service and its hook run as the manifest's user.
    let facts = facts_artifact(&dir, "v1", Some(&user.name));
    coord.push(&facts.path, SERVICE, "v1");
    ok(&coord
        .send("web-1", cmd("p1", 0, pull(SERVICE, &facts.digest)))
        .await
        .unwrap());
    ok(&coord
        .send("web-1", cmd("r1", 0, restart(SERVICE, &facts.digest)))
        .await
        .unwrap());
    let log = agent
        .data_dir
        .join(format!("services/{SERVICE}/logs/service.log"));
    wait_until_ok("the service to report its facts", WAIT, || async {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("facts-done"))
    })
    .await;
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains(&format!(
            "uid={} gid={} groups={}\n",
            user.uid, user.gid, user.gid
        )),
        "runs as the user, supplementary groups dropped: {said}"
    );
    for secret in ["SECRET_TOKEN", "AWS_SECRET_ACCESS_KEY", "hunter2"] {
        assert!(!said.contains(secret), "{secret} leaked: {said}");
    }
    for expected in [
        "env:FROM_MANIFEST=yes",
        "env:DROVER_SERVICE=facts",
        &format!("env:USER={}", user.name),
        "env:HOME=/nonexistent",
        "env:PATH=/usr/local/sbin:",
        &format!("env:{facts_env}"),
    ] {
        assert!(said.contains(expected), "{expected} missing: {said}");
    }
    for fact in [
        "release=read-only",
        "journal=private",
        "datadir=closed",
        "cache=private",
    ] {
        assert!(said.contains(fact), "{fact}: {said}");
    }
    let hook =
        std::fs::read_to_string(facts_dir.join(format!("hook-{}.txt", facts.digest))).unwrap();
    assert!(
        hook.starts_with(&format!("{}\n{}\n", user.uid, user.gid)),
        "the hook runs as the user too: {hook}"
    );
    assert!(!hook.contains("SECRET_TOKEN"), "{hook}");

    // 3. On disk: the release is root's and masked; the agent's files are its own.
    let release = agent
        .data_dir
        .join(format!("services/{SERVICE}/releases/{}", facts.digest));
    let start = release.join("bin/start");
    assert_eq!(mode(&start), 0o755, "0777 in the archive, masked at unpack");
    assert_eq!(std::fs::metadata(&start).unwrap().uid(), 0);
    assert_eq!(mode(&release.join("bin")), 0o755);
    assert!(
        std::fs::read_to_string(&start)
            .unwrap()
            .ends_with("exec sleep 600\n"),
        "unchanged"
    );
    assert_eq!(mode(&agent.data_dir), 0o711);
    assert_eq!(mode(&agent.data_dir.join("cache")), 0o700);
    assert_eq!(mode(&agent.data_dir.join("state.json")), 0o600);
    assert_eq!(mode(&agent.data_dir.join("agent.lock")), 0o600);
    assert_eq!(
        mode(&agent.data_dir.join(format!("services/{SERVICE}/logs"))),
        0o700
    );

    // 4. Without a user in the manifest, the agent's default (nobody).
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let default_user = facts_artifact(&dir, "v2", None);
    coord.push(&default_user.path, SERVICE, "v2");
    ok(&coord
        .send("web-1", cmd("p2", 0, pull(SERVICE, &default_user.digest)))
        .await
        .unwrap());
    ok(&coord
        .send(
            "web-1",
            cmd("r2", 0, restart(SERVICE, &default_user.digest)),
        )
        .await
        .unwrap());
    wait_until_ok("v2 to report its facts", WAIT, || async {
        std::fs::read_to_string(&log).is_ok_and(|t| t.matches("facts-done").count() == 2)
    })
    .await;
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains(&format!("uid={} ", nobody.uid)),
        "the default service user: {said}"
    );

    // The agent kept working throughout.
    let h = coord.host("web-1").await.unwrap();
    assert_eq!(h.state(), ConnectionState::Connected);
}
