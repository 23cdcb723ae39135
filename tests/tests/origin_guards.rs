//! Origin guards (issue 11, deliverable 4), end to end with the real
//! coordinator and droverctl: what an agent would refuse is refused at
//! push and cheaply; CI can pin the digest; a directory is pushed with its
//! manifest first; bytes belong to one service; a scrub finds missing and
//! damaged blobs, repairs them from a peer or marks them lost, and a push
//! restores a lost one.

use std::time::Duration;

use drover_common::artifact::build::ArchiveBuilder;
use drover_common::proto::{CommandStatus, ConnectionState};
use drover_tests::artifacts::{sample_artifact, sample_manifest, write};
use drover_tests::commands::{cmd, pull};
use drover_tests::procstat::cpu_seconds;
use drover_tests::{Agent, Cluster, Coordinator, TestDir, free_port};

const SERVICE: &str = "hello";
const WAIT: Duration = Duration::from_secs(20);

fn push(coord: &Coordinator, path: &std::path::Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "artifact",
        "push",
        path.to_str().unwrap(),
        "--service",
        SERVICE,
    ];
    args.extend_from_slice(extra);
    coord.droverctl(&args)
}

#[tokio::test]
async fn a_bomb_before_the_manifest_costs_the_origin_nothing_and_ci_pins_digests() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;

    // 1. 64 MB of zeros (~64 KB compressed) ahead of drover.toml: refused
    // at the bomb's header, before it is decompressed.
    let bomb = ArchiveBuilder::in_memory()
        .file("zeros.bin", &vec![0u8; 64 << 20])
        .file(
            "drover.toml",
            sample_manifest(SERVICE, "v1", &[]).as_bytes(),
        )
        .finish();
    let bomb = write(dir.path(), "bomb-first.tar.gz", bomb);
    let cpu_before = cpu_seconds(coord.child.pid());
    let (code, _, err) = push(&coord, &bomb.path, &[]);
    let cpu = cpu_seconds(coord.child.pid()) - cpu_before;
    assert_ne!(code, 0);
    assert!(
        err.contains("drover.toml must come first in an upload") && err.contains("\"zeros.bin\""),
        "{err}"
    );
    assert!(
        cpu < 0.5,
        "the refusal cost the origin {cpu:.2} CPU seconds"
    );

    // 2. --expect-sha256: a mismatch pushes nothing; a match pushes.
    let good = sample_artifact(dir.path(), SERVICE, "v1", &[]);
    let (code, _, err) = push(&coord, &good.path, &["--expect-sha256", &"ab".repeat(32)]);
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("hashes to {}, not the expected", good.digest))
            && err.contains("nothing was pushed"),
        "{err}"
    );
    let (_, listed, _) = coord.droverctl(&["artifact", "list"]);
    assert!(listed.contains("no artifacts"), "{listed}");
    let (code, out, err) = push(&coord, &good.path, &["--expect-sha256", &good.digest]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), good.digest);

    // 3. The same bytes under another service: refused, nothing changes.
    let (code, _, err) = coord.droverctl(&[
        "artifact",
        "push",
        good.path.to_str().unwrap(),
        "--service",
        "other",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("FailedPrecondition") && err.contains("is stored for service \"hello\""),
        "{err}"
    );
    let (_, shown, _) = coord.droverctl(&["artifact", "show", &good.digest]);
    assert!(shown.contains("hello"), "{shown}");

    // 4. A directory is built manifest first and pushed.
    let tree = dir.sub("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::write(tree.join("bin/start"), "#!/bin/sh\nexec sleep 60\n").unwrap();
    std::fs::write(
        tree.join("drover.toml"),
        "service = \"hello\"\nversion = \"dir\"\n[start]\ncommand = \"bin/start\"\n",
    )
    .unwrap();
    let (code, out, err) = push(&coord, &tree, &["--version", "dir"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim().len(), 64, "{out}");
}

#[tokio::test]
async fn a_scrub_marks_missing_or_damaged_blobs_lost_and_a_push_restores_them() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let _agent = Agent::start_sample(&dir, "web-1", &[&coord], free_port(), &[]);
    coord
        .wait_state("web-1", ConnectionState::Connected, WAIT)
        .await;
    let v1 = sample_artifact(dir.path(), SERVICE, "v1", &[]);
    let v2 = sample_artifact(dir.path(), SERVICE, "v2", &[]);
    coord.push(&v1.path, SERVICE, "v1");
    coord.push(&v2.path, SERVICE, "v2");
    let blob = |d: &str| coord.data_dir.join(format!("artifacts/blobs/{d}"));

    // Before any scrub, a missing blob is said plainly (no peer to blame).
    std::fs::remove_file(blob(&v1.digest)).unwrap();
    let update = coord
        .send("web-1", cmd("p1", 0, pull(SERVICE, &v1.digest)))
        .await
        .unwrap();
    assert_eq!(update.status(), CommandStatus::Failed);
    assert!(
        update
            .reason
            .contains("missing from this coordinator's disk"),
        "{}",
        update.reason
    );

    // One byte of v2 flipped.
    let mut bytes = std::fs::read(blob(&v2.digest)).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(blob(&v2.digest), bytes).unwrap();

    let (code, out, err) = coord.droverctl(&["artifact", "verify"]);
    assert_ne!(code, 0, "lost artifacts fail the command");
    assert!(err.contains("2 artifact(s) lost"), "{err}");
    assert!(out.contains("missing; no peer coordinator had it"), "{out}");
    assert!(out.contains("damaged: its bytes hash to"), "{out}");
    assert!(
        std::fs::read_dir(coord.data_dir.join("artifacts/damaged"))
            .unwrap()
            .count()
            == 1,
        "the damaged bytes are kept aside"
    );
    let (_, listed, _) = coord.droverctl(&["artifact", "list"]);
    assert!(
        listed.contains("no artifacts"),
        "lost ones are not listed: {listed}"
    );
    let update = coord
        .send("web-1", cmd("p2", 0, pull(SERVICE, &v2.digest)))
        .await
        .unwrap();
    assert_eq!(update.status(), CommandStatus::Failed);
    assert!(update.reason.contains("is lost"), "{}", update.reason);

    // Pushing the same bytes again restores it; the scrub agrees.
    coord.push(&v2.path, SERVICE, "v2");
    let (code, out, err) = coord.droverctl(&["artifact", "verify", &v2.digest]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(" ok "), "{out}");
    let update = coord
        .send("web-1", cmd("p2-again", 0, pull(SERVICE, &v2.digest)))
        .await
        .unwrap();
    assert_eq!(update.status(), CommandStatus::Succeeded, "{update:?}");
}

#[tokio::test]
async fn a_damaged_blob_is_repaired_from_a_peer_coordinator() {
    let dir = TestDir::new();
    let cluster = Cluster::start(&dir, 2, "2s", &[]).await;
    let (c1, c2) = (cluster.get(0), cluster.get(1));
    let v1 = sample_artifact(dir.path(), SERVICE, "v1", &[]);
    let digest = c1.push(&v1.path, SERVICE, "v1");
    // The push returned once a peer held a copy.
    assert!(
        c2.data_dir
            .join(format!("artifacts/blobs/{digest}"))
            .exists()
    );
    let blob = c1.data_dir.join(format!("artifacts/blobs/{digest}"));
    std::fs::write(&blob, b"rotten").unwrap();
    let (code, out, err) = c1.droverctl(&["artifact", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("REPAIRED") && out.contains("a verified copy was fetched from a peer"),
        "{out}"
    );
    let (actual, _) = drover_common::artifact::Digest::of_file(&blob).unwrap();
    assert_eq!(actual.hex(), digest);
}
