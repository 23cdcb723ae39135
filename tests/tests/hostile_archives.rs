//! Hostile archives end to end: what the origin refuses at push, and what
//! only the agent's unpacking stops on pull; nothing lands outside the
//! release and nothing is left behind.

use drover_tests::TestDir;
use drover_tests::artifacts::{BuiltArtifact, sample_manifest, write};
use drover_tests::commands::{cmd, failed, pull};
use drover_tests::one_agent::{artifacts_dir, one_agent};

const SERVICE: &str = "hello";

/// A hostile archive with a valid manifest, so the origin stores it and
/// only the agent's unpacking stands in the way.
fn hostile(
    dir: &TestDir,
    name: &str,
    build: impl FnOnce(
        drover_common::artifact::build::ArchiveBuilder<Vec<u8>>,
    ) -> drover_common::artifact::build::ArchiveBuilder<Vec<u8>>,
) -> BuiltArtifact {
    let builder = drover_common::artifact::build::ArchiveBuilder::in_memory().file(
        "drover.toml",
        sample_manifest(SERVICE, name, &[]).as_bytes(),
    );
    write(
        &artifacts_dir(dir),
        &format!("{name}.tar.gz"),
        build(builder).finish(),
    )
}

#[tokio::test]
async fn hostile_archives_are_refused_at_push_or_on_pull_and_nothing_lands_outside() {
    use tar::EntryType::*;
    let dir = TestDir::new();
    let (coord, agent, _port) = one_agent(
        &dir,
        &["--max-entries", "50", "--max-unpacked-bytes", "100000"],
    )
    .await;
    let target = dir.path().join("evil-target");
    let abs = format!("{}/evil-abs", dir.path().display());
    // Every agent refuses these: the origin refuses them at push, naming
    // the entry, and stores nothing.
    let at_push: Vec<(&str, BuiltArtifact, String)> = vec![
        (
            "abs",
            hostile(&dir, "abs", |b| b.file(&abs, b"x")),
            format!("archive entry {abs:?} has an absolute path"),
        ),
        (
            "dotdot",
            hostile(&dir, "dotdot", |b| b.file("../../../../evil-dotdot", b"x")),
            "archive entry \"../../../../evil-dotdot\" has a '..' component".into(),
        ),
        (
            "symlink",
            hostile(&dir, "symlink", |b| {
                b.raw("evil", Symlink, Some(target.to_str().unwrap()), 0o777, b"")
            }),
            "archive entry \"evil\" links to".into(),
        ),
        (
            "relsymlink",
            hostile(&dir, "relsymlink", |b| {
                b.raw("evil", Symlink, Some("../../../../evil-target"), 0o777, b"")
            }),
            "outside the release".into(),
        ),
        (
            "chain",
            hostile(&dir, "chain", |b| {
                b.raw("s", Symlink, Some("."), 0o777, b"")
                    .raw("up", Symlink, Some("s/.."), 0o777, b"")
                    .file("up/evil-chain", b"x")
            }),
            "outside the release".into(),
        ),
        (
            "hardlink",
            hostile(&dir, "hardlink", |b| {
                b.raw("evil", Link, Some("../../../../evil-target"), 0o644, b"")
            }),
            "outside the release".into(),
        ),
        (
            "device",
            hostile(&dir, "device", |b| b.raw("dev", Char, None, 0o644, b"")),
            "archive entry \"dev\" is a character device".into(),
        ),
        (
            "fifo",
            hostile(&dir, "fifo", |b| b.raw("pipe", Fifo, None, 0o644, b"")),
            "archive entry \"pipe\" is a fifo".into(),
        ),
    ];
    for (name, artifact, reason) in &at_push {
        let (code, _, err) = coord.droverctl(&[
            "artifact",
            "push",
            artifact.path.to_str().unwrap(),
            "--service",
            SERVICE,
        ]);
        assert_ne!(code, 0, "{name}: pushed");
        assert!(
            err.contains("InvalidArgument") && err.contains(reason.as_str()),
            "{name}: {err}"
        );
        assert!(err.contains("nothing was stored"), "{name}: {err}");
    }
    let (_, listed, _) = coord.droverctl(&["artifact", "list"]);
    assert!(listed.contains("no artifacts"), "{listed}");

    // Within the origin's limits but over this agent's: refused on pull.
    let on_pull: Vec<(&str, BuiltArtifact, &str)> = vec![
        (
            "many",
            hostile(&dir, "many", |b| {
                (0..60).fold(b, |b, i| b.file(&format!("f{i}"), b"x"))
            }),
            "more than 50 entries",
        ),
        (
            "big",
            hostile(&dir, "big", |b| b.file("big", &vec![0u8; 200_000])),
            "more than 100000 bytes",
        ),
    ];
    for (name, artifact, reason) in &on_pull {
        coord.push(&artifact.path, SERVICE, name);
        let update = coord
            .send(
                "web-1",
                cmd(&format!("pull-{name}"), 1, pull(SERVICE, &artifact.digest)),
            )
            .await
            .unwrap();
        failed(&update, reason);
        assert!(
            update.reason.starts_with("refused to unpack"),
            "{name}: {update:?}"
        );
        let release = agent
            .data_dir
            .join("services/hello/releases")
            .join(&artifact.digest);
        assert!(!release.exists(), "{name}: no release");
    }
    // Nothing escaped anywhere in the test's directory tree.
    let mut stack = vec![dir.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with("evil"),
                "{} escaped",
                entry.path().display()
            );
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            }
        }
    }
    let releases = agent.data_dir.join("services/hello/releases");
    let left: Vec<_> = std::fs::read_dir(&releases)
        .map(|r| r.count())
        .into_iter()
        .collect();
    assert_eq!(left, vec![0], "no release and no temp dir left behind");
}
