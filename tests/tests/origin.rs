//! The origin: uploads are checked before anything is stored.

use std::time::Duration;

use drover_common::proto::artifacts_client::ArtifactsClient;
use drover_common::proto::{
    ArtifactInfo, StatRequest, UploadHeader, UploadRequest, upload_request,
};
use drover_tests::artifacts::{sample_artifact, write};
use drover_tests::{Coordinator, TestDir};
use tonic::Code;

async fn upload(
    coord: &Coordinator,
    header: UploadHeader,
    bytes: &[u8],
) -> Result<ArtifactInfo, tonic::Status> {
    let mut parts = vec![UploadRequest {
        part: Some(upload_request::Part::Header(header)),
    }];
    for chunk in bytes.chunks(64 * 1024) {
        parts.push(UploadRequest {
            part: Some(upload_request::Part::Chunk(chunk.to_vec())),
        });
    }
    let mut client = ArtifactsClient::new(coord.channel().await);
    tokio::time::timeout(
        Duration::from_secs(20),
        client.upload(tokio_stream::iter(parts)),
    )
    .await
    .expect("upload answered")
    .map(|r| r.into_inner())
}

fn header(service: &str, sha256: &str, size: u64) -> UploadHeader {
    UploadHeader {
        service: service.into(),
        version: "1.0".into(),
        git_sha: "abc123".into(),
        sha256: sha256.into(),
        size_bytes: size,
        signatures: vec![],
    }
}

/// Files in the origin's blob and tmp dirs.
fn stored(coord: &Coordinator) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["blobs", "tmp"] {
        for e in std::fs::read_dir(coord.data_dir.join("artifacts").join(sub)).unwrap() {
            out.push(format!(
                "{sub}/{}",
                e.unwrap().file_name().to_string_lossy()
            ));
        }
    }
    out
}

#[tokio::test]
async fn bad_uploads_get_invalid_argument_and_leave_nothing_behind() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &["--max-artifact-bytes", "200000"]).await;
    let good = sample_artifact(dir.path(), "hello", "v1", &[]);
    let bytes = std::fs::read(&good.path).unwrap();

    let wrong = "0".repeat(64);
    let s = upload(&coord, header("hello", &wrong, 0), &bytes)
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains(&format!(
            "declared sha256 {wrong} but the uploaded bytes hash to {}",
            good.digest
        )),
        "{}",
        s.message()
    );

    let s = upload(&coord, header("hello", "not-a-digest", 0), &bytes)
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("is not a sha256 digest"),
        "{}",
        s.message()
    );

    let s = upload(&coord, header("Hello World", &good.digest, 0), &bytes)
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);

    let s = upload(&coord, header("other", &good.digest, 0), &bytes)
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("its drover.toml says \"hello\""),
        "{}",
        s.message()
    );

    let s = upload(
        &coord,
        header("hello", &good.digest, bytes.len() as u64 + 1),
        &bytes,
    )
    .await
    .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("arrived"), "{}", s.message());

    // A real artifact, over the limit: refused by size while it arrives.
    let big = drover_tests::artifacts::artifact_with(
        dir.path(),
        "big.tar.gz",
        &drover_tests::artifacts::sample_manifest("hello", "big", &[]),
        &[("noise", &drover_tests::artifacts::noise(300_000))],
    );
    let big_bytes = std::fs::read(&big.path).unwrap();
    let s = upload(&coord, header("hello", &big.digest, 0), &big_bytes)
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message()
            .contains("larger than the limit of 200000 bytes"),
        "{}",
        s.message()
    );

    let not_artifact = write(dir.path(), "plain.txt", b"just text".to_vec());
    let s = upload(
        &coord,
        header("hello", &not_artifact.digest, 0),
        b"just text",
    )
    .await
    .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message()
            .contains("refused: archive is not a valid tar.gz"),
        "{}",
        s.message()
    );

    assert_eq!(
        stored(&coord),
        Vec::<String>::new(),
        "nothing stored, no temp file left"
    );
    let s = ArtifactsClient::new(coord.channel().await)
        .stat(StatRequest {
            sha256: good.digest.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);

    // The same bytes, declared right, are stored once and deduplicated after.
    let first = upload(
        &coord,
        header("hello", &good.digest, bytes.len() as u64),
        &bytes,
    )
    .await
    .unwrap();
    assert!(!first.deduplicated);
    assert_eq!(first.manifest_version, "v1");
    let second = upload(&coord, header("hello", &good.digest, 0), &bytes)
        .await
        .unwrap();
    assert!(second.deduplicated);
    assert_eq!(
        stored(&coord),
        vec![format!("blobs/{}", good.digest)],
        "one blob"
    );
    let listed =
        drover_common::proto::artifacts_client::ArtifactsClient::new(coord.channel().await)
            .list(drover_common::proto::ListArtifactsRequest {
                service: String::new(),
                include_lost: true,
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(listed.artifacts.len(), 1, "one metadata record");
}

#[tokio::test]
async fn droverctl_pushes_lists_and_shows_artifacts() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let v1 = sample_artifact(dir.path(), "hello", "v1", &[]);
    let (code, out, err) = coord.droverctl(&[
        "artifact",
        "push",
        v1.path.to_str().unwrap(),
        "--service",
        "hello",
        "--version",
        "1.0.0",
        "--git-sha",
        "deadbeef",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), v1.digest);
    let (code, _, err) = coord.droverctl(&[
        "artifact",
        "push",
        v1.path.to_str().unwrap(),
        "--service",
        "hello",
    ]);
    assert_eq!(code, 0);
    assert!(err.contains("already stored"), "{err}");

    let (code, out, _) = coord.droverctl(&["artifact", "list"]);
    assert_eq!(code, 0);
    let row = out
        .lines()
        .find(|l| l.contains(&v1.digest[..12]))
        .expect("a row for the artifact");
    assert!(
        row.contains("hello") && row.contains("1.0.0") && row.contains("deadbeef"),
        "{row}"
    );

    let (code, out, _) = coord.droverctl(&["artifact", "show", &v1.digest, "--json"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["sha256"], v1.digest.as_str());
    assert_eq!(json["gitSha"], "deadbeef");
    assert_eq!(json["sizeBytes"], v1.size.to_string());

    let (code, _, err) = coord.droverctl(&["artifact", "show", &"0".repeat(64)]);
    assert_eq!(code, 1);
    assert!(err.contains("NotFound"), "{err}");
    let (code, _, err) = coord.droverctl(&[
        "artifact",
        "push",
        "/nonexistent.tar.gz",
        "--service",
        "hello",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent.tar.gz"), "{err}");
}
