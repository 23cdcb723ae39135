//! Signed artifacts, end to end: CI signs with `droverctl artifact push
//! --sign-key` (or `artifact sign`), the origin keeps the signatures and
//! passes them on, and an agent with `--trust-signer` pulls and starts only
//! what a trusted key signed. The coordinator here never signs anything: it
//! plays the compromised coordinator that hands a host an artifact CI never
//! signed, and the host refuses it.

use std::time::Duration;

use drover_common::proto::{CommandStatus, CommandUpdate};
use drover_tests::artifacts::sample_artifact;
use drover_tests::commands::{cmd, pull, restart};
use drover_tests::{Agent, Coordinator, TestDir, free_port, wait_until_ok};

const SERVICE: &str = "hello";

fn status(update: &CommandUpdate, want: CommandStatus, reason_part: &str) {
    assert_eq!(update.status(), want, "{update:?}");
    assert!(update.reason.contains(reason_part), "{update:?}");
}

#[tokio::test]
async fn an_agent_with_trusted_signers_runs_only_signed_artifacts() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let keys = dir.sub("keys");
    for name in ["ci", "rogue"] {
        let (code, out, err) = coord.droverctl(&[
            "artifact",
            "keygen",
            "--out",
            keys.to_str().unwrap(),
            "--name",
            name,
        ]);
        assert_eq!(code, 0, "{out}{err}");
    }
    let trusted = keys.join("ci.pub");
    let port = free_port();
    let _agent = Agent::start_sample(
        &dir,
        "web-1",
        &[&coord],
        port,
        &["--trust-signer", trusted.to_str().unwrap()],
    );
    wait_until_ok("the agent", Duration::from_secs(20), || async {
        coord.host("web-1").await.is_ok()
    })
    .await;

    let artifacts = dir.sub("artifacts");
    let push_signed = |version: &str, key: &str| {
        let a = sample_artifact(&artifacts, SERVICE, version, &[]);
        let key = keys.join(format!("{key}.key"));
        let (code, out, err) = coord.droverctl(&[
            "artifact",
            "push",
            a.path.to_str().unwrap(),
            "--service",
            SERVICE,
            "--sign-key",
            key.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        out.trim().to_string()
    };
    let signed = push_signed("v1", "ci");
    let by_rogue = push_signed("v2", "rogue");
    let unsigned_art = sample_artifact(&artifacts, SERVICE, "v3", &[]);
    let unsigned = coord.push(&unsigned_art.path, SERVICE, "v3");

    // Signed by the trusted key: pulled and started.
    let update = coord
        .send("web-1", cmd("pull-1", 0, pull(SERVICE, &signed)))
        .await
        .unwrap();
    status(&update, CommandStatus::Succeeded, "pulled");
    let update = coord
        .send("web-1", cmd("restart-1", 0, restart(SERVICE, &signed)))
        .await
        .unwrap();
    status(&update, CommandStatus::Succeeded, "");

    // Unsigned, or signed by a key the host does not trust: refused before
    // a byte is fetched, and nothing can start it.
    let update = coord
        .send("web-1", cmd("pull-3", 0, pull(SERVICE, &unsigned)))
        .await
        .unwrap();
    status(&update, CommandStatus::Failed, "carries no signature");
    let update = coord
        .send("web-1", cmd("pull-2", 0, pull(SERVICE, &by_rogue)))
        .await
        .unwrap();
    status(&update, CommandStatus::Failed, "is not trusted");
    let update = coord
        .send("web-1", cmd("restart-3", 0, restart(SERVICE, &unsigned)))
        .await
        .unwrap();
    assert_eq!(update.status(), CommandStatus::Failed, "{update:?}");
    let cache = dir.path().join("agent-web-1/cache");
    let cached: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !cached
            .iter()
            .any(|f| f.starts_with(&unsigned) || f.starts_with(&by_rogue)),
        "nothing untrusted was downloaded: {cached:?}"
    );
    let running = drover_tests::http_get(format!("127.0.0.1:{port}").parse().unwrap(), "/").await;
    assert_eq!(running, "hello from v1\n", "v1 still serves");

    // A signature under the trusted key id that is not its signature: the
    // origin stores it (it holds no keys), the agent refuses it.
    let (code, _, err) = coord.droverctl(&[
        "artifact",
        "sign",
        &unsigned,
        "--sign-key",
        keys.join("rogue.key").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let update = coord
        .send("web-1", cmd("pull-3b", 0, pull(SERVICE, &unsigned)))
        .await
        .unwrap();
    status(&update, CommandStatus::Failed, "is not trusted");

    // CI signs it after the fact: now it pulls and starts.
    let (code, out, err) = coord.droverctl(&[
        "artifact",
        "sign",
        &unsigned,
        "--sign-key",
        keys.join("ci.key").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 signature(s)"), "{out}");
    let update = coord
        .send("web-1", cmd("pull-3c", 0, pull(SERVICE, &unsigned)))
        .await
        .unwrap();
    status(&update, CommandStatus::Succeeded, "pulled");
    let update = coord
        .send("web-1", cmd("restart-3c", 0, restart(SERVICE, &unsigned)))
        .await
        .unwrap();
    status(&update, CommandStatus::Succeeded, "");

    // Bad input: a malformed signature is refused by the origin.
    let (code, _, err) = coord.droverctl(&[
        "artifact",
        "sign",
        &"0".repeat(64),
        "--sign-key",
        keys.join("ci.key").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("NotFound"), "{err}");
}
