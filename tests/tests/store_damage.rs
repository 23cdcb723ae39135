//! A damaged embedded store is an error, not a panic, and one command gets
//! it back (issue 11, deliverable 6): real coordinators, real redb files
//! with real pages overwritten, `drover-coordinator store check|backup|
//! restore` and `droverctl store backup`.

use std::process::Command;
use std::time::Duration;

use drover_tests::artifacts::sample_artifact;
use drover_tests::{Coordinator, TestDir, bins};

const PIPELINE: &str = r#"
name = "hello-prod"
service = "hello"
[[stages]]
name = "prod"
selector = "env=prod"
batch_size = 1
"#;

fn tool(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bins::bin("drover-coordinator"))
        .args(args)
        .output()
        .expect("running drover-coordinator");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts a coordinator on `data_dir` expecting it to refuse; returns its
/// exit code and output.
fn start_expecting_exit(data_dir: &std::path::Path) -> (i32, String) {
    let mut child = Command::new(bins::bin("drover-coordinator"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            return (status.code().unwrap_or(-1), text);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the coordinator started on a damaged store");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn a_damaged_store_stops_the_coordinator_cleanly_and_a_backup_restores_it() {
    let dir = TestDir::new();
    let mut coord = Coordinator::start(&dir, "coord", &[]).await;
    let v1 = sample_artifact(dir.path(), "hello", "v1", &[]);
    coord.push(&v1.path, "hello", "v1");
    coord.apply_pipeline(&dir, PIPELINE);

    // Online backups, while it serves: droverctl and drover-coordinator.
    let b1 = dir.path().join("backup-1.redb");
    let (code, out, err) = coord.droverctl(&["store", "backup", "--to", b1.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("backed up"), "{out}");
    let b2 = dir.path().join("backup-2.redb");
    let (code, out, err) = tool(&[
        "store",
        "backup",
        "--to",
        b2.to_str().unwrap(),
        "--coordinator",
        &coord.addr_arg(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("backed up"), "{out}");
    // Restoring under a running coordinator is refused.
    let data = coord.data_dir.to_str().unwrap().to_string();
    let (code, _, err) = tool(&[
        "store",
        "restore",
        "--data-dir",
        &data,
        "--from",
        b1.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("a coordinator is running"), "{err}");

    coord.child.signal(nix::sys::signal::Signal::SIGTERM);
    coord.child.wait_exit(Duration::from_secs(20)).await;
    let (code, out, err) = tool(&["store", "check", "--data-dir", &data]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("sound: "), "{out}");

    // Every 4 KiB page overwritten in turn (up to 24, spread over the
    // file): each copy checks sound or damaged, never a panic (exit 101).
    let store = coord.data_dir.join("store.redb");
    let good = std::fs::read(&store).unwrap();
    let pages = good.len() / 4096;
    let mut damaged = 0;
    for i in 0..pages.min(24) {
        let page = i * pages / pages.min(24);
        let mut bad = good.clone();
        for (j, b) in bad[page * 4096..(page + 1) * 4096].iter_mut().enumerate() {
            *b = (j as u8).wrapping_mul(31) ^ 0xA5;
        }
        let copy = dir.sub(&format!("damaged-{page}"));
        std::fs::write(copy.join("store.redb"), &bad).unwrap();
        let (code, out, err) = tool(&["store", "check", "--data-dir", copy.to_str().unwrap()]);
        assert_ne!(code, 101, "page {page}: a panic: {err}");
        match code {
            0 => assert!(out.starts_with("sound: "), "{out}"),
            1 => {
                assert!(err.contains("is damaged"), "page {page}: {err}");
                damaged += 1;
            }
            other => panic!("page {page}: exit {other}: {err}"),
        }
    }
    assert!(
        damaged > 0,
        "no overwritten page was noticed in {pages} pages"
    );

    // The coordinator itself on a damaged store: exit 65 (systemd does not
    // restart it) and a message that says what to do.
    let mut bad = good.clone();
    bad[..4096].fill(0x5a);
    std::fs::write(&store, &bad).unwrap();
    let (code, text) = start_expecting_exit(&coord.data_dir);
    assert_eq!(code, 65, "{text}");
    assert!(
        text.contains("is damaged") && text.contains("drover-coordinator store restore"),
        "{text}"
    );

    // One command restores the backup; the damaged file is kept aside.
    let (code, out, err) = tool(&[
        "store",
        "restore",
        "--data-dir",
        &data,
        "--from",
        b1.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("restored "), "{out}");
    assert!(
        std::fs::read_dir(&coord.data_dir).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("store.redb.replaced-")),
        "the damaged file is kept"
    );
    drop(coord);
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let (code, out, err) = coord.droverctl(&["artifact", "show", &v1.digest]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("hello"), "{out}");
    let (code, out, err) = coord.droverctl(&["pipeline", "get", "hello-prod"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("hello-prod"), "{out}");
}
