//! The embedded store: one coordinator per data dir, and what it holds
//! survives a crash.

use std::process::Command;
use std::time::Duration;

use drover_tests::artifacts::sample_artifact;
use drover_tests::{Coordinator, TestDir, bins};
use nix::sys::signal::Signal;

#[tokio::test]
async fn a_second_coordinator_on_the_same_data_dir_is_refused() {
    let dir = TestDir::new();
    let first = Coordinator::start(&dir, "coord", &[]).await;
    let out = Command::new(bins::bin("drover-coordinator"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&first.data_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is in use by another coordinator"),
        "{stderr}"
    );
    first.wait_serving().await;
}

#[tokio::test]
async fn artifact_metadata_survives_a_kill_9_of_the_coordinator() {
    let dir = TestDir::new();
    let mut coord = Coordinator::start(&dir, "coord", &[]).await;
    let v1 = sample_artifact(dir.path(), "hello", "v1", &[]);
    coord.push(&v1.path, "hello", "v1");
    coord.child.signal(Signal::SIGKILL);
    coord.child.wait_exit(Duration::from_secs(5)).await;
    drop(coord);
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let (code, out, err) = coord.droverctl(&["artifact", "show", &v1.digest]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("service:   hello"), "{out}");
}

#[tokio::test]
async fn the_etcd_backend_passes_the_behaviour_suite_against_a_real_etcd() {
    use drover_coordinator::store::etcd::EtcdStore;
    let dir = TestDir::new();
    let etcd = drover_tests::Etcd::start(&dir, "etcd").await;
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), None)
        .await
        .expect("connecting to etcd");
    drover_coordinator::store::suite::run(&store).await;
}

#[tokio::test]
async fn a_coordinator_on_etcd_keeps_its_state_there() {
    let dir = TestDir::new();
    let etcd = drover_tests::Etcd::start(&dir, "etcd").await;
    let args = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        etcd.endpoint.as_str(),
    ];
    let mut first = Coordinator::start(&dir, "coord-a", &args).await;
    let spec = dir.path().join("pipeline.toml");
    std::fs::write(&spec, "name = \"web\"\nservice = \"web\"\n[[stages]]\nname = \"prod\"\nselector = \"env=prod\"\nbatch_size = 1\n").unwrap();
    assert_eq!(
        first
            .droverctl(&["pipeline", "apply", "-f", spec.to_str().unwrap()])
            .0,
        0
    );
    assert!(
        !first.data_dir.join("store.redb").exists(),
        "nothing in the embedded store"
    );
    first.child.signal(Signal::SIGKILL);
    first.child.wait_exit(Duration::from_secs(5)).await;
    // Another coordinator, another data dir, the same etcd: the pipeline is there.
    let second = Coordinator::start(&dir, "coord-b", &args).await;
    let (code, out, err) = second.droverctl(&["pipeline", "get", "web"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("pipeline:  web"), "{out}");
    let mut client = etcd.client().await.unwrap();
    let kv = client.get("/drover/pipelines/web", None).await.unwrap();
    assert_eq!(kv.kvs().len(), 1, "stored under the default prefix");
}

#[tokio::test]
async fn the_coordinator_refuses_an_unreachable_etcd_with_a_clear_error() {
    let out = Command::new(bins::bin("drover-coordinator"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(TestDir::new().path())
        .args(["--store", "etcd", "--etcd-endpoints", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("connecting to etcd at http://127.0.0.1:1"),
        "{stderr}"
    );
}

#[tokio::test]
async fn elections_fence_a_deposed_leader_on_a_real_etcd() {
    use drover_coordinator::store::etcd::EtcdStore;
    let dir = TestDir::new();
    let etcd = drover_tests::Etcd::start(&dir, "etcd").await;
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), None)
        .await
        .expect("connecting to etcd");
    // etcd leases count whole seconds.
    drover_coordinator::ha::election::scenario(std::sync::Arc::new(store), Duration::from_secs(2))
        .await;
}
