//! Pipelines through droverctl and the API: apply is create-or-update,
//! invalid specs are refused naming the field, nothing is half-written.

use drover_common::proto::{CreatePipelineRequest, Pipeline, Stage, UpdatePipelineRequest};
use drover_tests::{Coordinator, TestDir};
use tonic::Code;

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../coordinator/examples/pipeline.toml"
);

#[tokio::test]
async fn droverctl_applies_gets_and_lists_pipelines() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let (code, out, err) = coord.droverctl(&["pipeline", "apply", "-f", EXAMPLE]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("pipeline hello-prod created (version "),
        "{out}"
    );
    let (code, out, err) = coord.droverctl(&["pipeline", "apply", "-f", EXAMPLE]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("pipeline hello-prod updated"), "{out}");

    let (code, out, _) = coord.droverctl(&["pipeline", "get", "hello-prod"]);
    assert_eq!(code, 0);
    let prod = out
        .lines()
        .find(|l| l.trim_start().starts_with("prod"))
        .expect("a prod row");
    assert!(
        prod.contains("env=prod") && prod.contains("25%") && prod.contains("required"),
        "{prod}"
    );
    let (code, out, _) = coord.droverctl(&["pipeline", "get", "hello-prod", "--json"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        json["stages"][1]["gate"]["inconclusive"],
        "INCONCLUSIVE_POLICY_PAUSE"
    );
    assert_eq!(json["stages"][0]["gate"]["badSamples"], 3);

    let (code, out, _) = coord.droverctl(&["pipeline", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("hello-prod") && out.contains("staging -> prod"),
        "{out}"
    );

    let (code, _, err) = coord.droverctl(&["pipeline", "get", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("NotFound") && err.contains("nope"), "{err}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"x\"\nservice = \"hello\"\n[[stages]]\nname = \"prod\"\nselector = \"env\"\nbatch_percent = 200\n").unwrap();
    let (code, _, err) = coord.droverctl(&["pipeline", "apply", "-f", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("InvalidArgument")
            && err.contains("stages[0].selector")
            && err.contains("stages[0].batch_percent"),
        "{err}"
    );
    let garbled = dir.path().join("garbled.toml");
    std::fs::write(&garbled, "name = \"x\"\nstages = 3\n").unwrap();
    let (code, _, err) = coord.droverctl(&["pipeline", "apply", "-f", garbled.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("garbled.toml"), "{err}");
    let (_, out, _) = coord.droverctl(&["pipeline", "list"]);
    assert!(
        !out.contains(" x "),
        "nothing of the bad specs was stored: {out}"
    );
}

#[tokio::test]
async fn the_api_refuses_duplicates_and_stale_updates() {
    let dir = TestDir::new();
    let coord = Coordinator::start(&dir, "coord", &[]).await;
    let mut api = coord.deployer().await;
    let spec = Pipeline {
        name: "web".into(),
        service: "web".into(),
        stages: vec![Stage {
            name: "prod".into(),
            selector: "env=prod".into(),
            batch_size: 2,
            ..Default::default()
        }],
        ..Default::default()
    };
    let created = api
        .create_pipeline(CreatePipelineRequest {
            pipeline: Some(spec.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    let dup = api
        .create_pipeline(CreatePipelineRequest {
            pipeline: Some(spec.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let updated = api
        .update_pipeline(UpdatePipelineRequest {
            pipeline: Some(spec.clone()),
            expected_version: created.version,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(updated.version > created.version);
    let stale = api
        .update_pipeline(UpdatePipelineRequest {
            pipeline: Some(spec.clone()),
            expected_version: created.version,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert!(
        stale.message().contains("read it again and retry"),
        "{}",
        stale.message()
    );
    let empty = api
        .create_pipeline(CreatePipelineRequest { pipeline: None })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
}
