//! Release trains end to end: three services (schema → api → web), each
//! with a staging and a prod host running the sample service under load.
//! A good train goes through in dependency order per environment; a train
//! whose api fails in prod stops, and rolls back what was deployed,
//! dependents first; bad trains are refused and start nothing.

use drover_common::proto::{
    AuditKind, DeployPhase, ListDeploysRequest, StartTrainRequest, Train, TrainMemberSpec,
    TrainPhase, TrainRef,
};
use drover_tests::artifacts::sample_artifact;
use drover_tests::sample_fleet::SampleFleet;
use drover_tests::wait_until;
use std::time::Duration;

/// Host i runs SERVICES[i / 2], in staging (even i) or prod (odd i).
const SERVICES: [&str; 3] = ["schema", "api", "web"];

fn labels(i: usize) -> Vec<String> {
    let env = if i.is_multiple_of(2) {
        "staging"
    } else {
        "prod"
    };
    vec![
        "--label".into(),
        format!("svc={}", SERVICES[i / 2]),
        "--label".into(),
        format!("stage={env}"),
    ]
}

/// A pipeline for `service`: staging tolerates errors (so a release bad
/// only under prod's limits passes it), prod does not.
fn pipeline(service: &str) -> String {
    let gate = |max: f64| {
        format!(
            "{{ max_error_rate = {max}, samples = 2, bad_samples = 2, min_requests = 1, inconclusive = \"INCONCLUSIVE_POLICY_PASS\" }}"
        )
    };
    format!(
        r#"
name = "{service}"
service = "{service}"

[[stages]]
name = "staging"
selector = "svc={service},stage=staging"
batch_size = 1
gate = {staging}

[[stages]]
name = "prod"
selector = "svc={service},stage=prod"
batch_size = 1
gate = {prod}
"#,
        staging = gate(0.95),
        prod = gate(0.05)
    )
}

fn push(f: &SampleFleet, service: &str, version: &str, extra: &[&str]) -> String {
    let a = sample_artifact(f.dir.path(), service, version, extra);
    f.coord.push(&a.path, service, version)
}

/// `droverctl train start` of schema → api → web with these artifacts.
fn start_args(schema: &str, api: &str, web: &str) -> Vec<String> {
    [
        "train",
        "start",
        "--name",
        "release",
        "--member",
        &format!("schema={schema}"),
        "--member",
        &format!("api={api}"),
        "--member",
        &format!("web={web}"),
        "--after",
        "api=schema",
        "--after",
        "web=api",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn train(f: &SampleFleet, id: &str) -> Train {
    f.coord
        .deployer()
        .await
        .get_train(TrainRef {
            id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Every audit event of `service` with its kind, in time order.
async fn audit(f: &SampleFleet, service: &str) -> Vec<(AuditKind, u64, String)> {
    f.coord
        .audit(service)
        .await
        .into_iter()
        .map(|e| (e.event(), e.at_unix_ms, e.stage))
        .collect()
}

fn first(events: &[(AuditKind, u64, String)], kind: AuditKind, stage: &str) -> u64 {
    events
        .iter()
        .filter(|(k, _, s)| *k == kind && (stage.is_empty() || s == stage))
        .map(|(_, at, _)| *at)
        .next_back()
        .unwrap_or_else(|| panic!("no {kind:?} {stage} in {events:?}"))
}

#[tokio::test]
async fn a_train_goes_in_dependency_order_and_a_failure_in_prod_rolls_back_dependents_first() {
    let f = SampleFleet::start_with(6, 30, labels).await;
    for s in SERVICES {
        f.apply(&pipeline(s));
    }
    let v1: Vec<String> = SERVICES.iter().map(|s| push(&f, s, "v1", &[])).collect();

    // Bad trains are refused, naming what is wrong, and start nothing.
    let mut client = f.coord.deployer().await;
    let member = |p: &str, a: &str, after: &[&str]| TrainMemberSpec {
        pipeline: p.into(),
        artifact: a.into(),
        after: after.iter().map(|s| s.to_string()).collect(),
    };
    let refused = |members: Vec<TrainMemberSpec>| {
        let mut client = client.clone();
        async move {
            client
                .start_train(StartTrainRequest {
                    members,
                    ..Default::default()
                })
                .await
                .expect_err("refused")
        }
    };
    let cycle = refused(vec![
        member("schema", &v1[0], &["web"]),
        member("api", &v1[1], &["schema"]),
        member("web", &v1[2], &["api"]),
    ])
    .await;
    assert_eq!(cycle.code(), tonic::Code::InvalidArgument);
    assert!(
        cycle.message().contains("api → schema → web → api"),
        "{}",
        cycle.message()
    );
    let unknown = refused(vec![
        member("schema", &v1[0], &[]),
        member("ghost", &v1[1], &[]),
    ])
    .await;
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument, "{unknown:?}");
    assert!(unknown.message().contains("ghost"), "{}", unknown.message());
    let wrong = refused(vec![member("schema", &v1[1], &[])]).await;
    assert_eq!(wrong.code(), tonic::Code::InvalidArgument, "{wrong:?}");
    assert!(
        wrong.message().contains("is for service \"api\""),
        "{}",
        wrong.message()
    );
    let (code, _, err) = f.coord.droverctl(&[
        "train",
        "start",
        "--member",
        &format!("a={}", v1[0]),
        "--after",
        "b=a",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("b is not a --member"), "{err}");
    for p in SERVICES {
        let deploys = client
            .list_deploys(ListDeploysRequest { pipeline: p.into() })
            .await
            .unwrap()
            .into_inner()
            .deploys;
        assert!(
            deploys.is_empty(),
            "a refused train started {p}: {deploys:?}"
        );
    }
    assert!(
        client
            .list_trains(drover_common::proto::ListTrainsRequest {})
            .await
            .unwrap()
            .into_inner()
            .trains
            .is_empty()
    );

    // v1 of all three: a good train completes, in order per environment.
    let mut args = start_args(&v1[0], &v1[1], &v1[2]);
    args.push("--wait".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = f.coord.droverctl(&args);
    assert_eq!(code, 0, "the first train completes: {out}\n{err}");
    assert_eq!(f.versions().await, ["v1"; 6]);
    let (schema, api, web) = (
        audit(&f, "schema").await,
        audit(&f, "api").await,
        audit(&f, "web").await,
    );
    for env in ["staging", "prod"] {
        // api enters an environment only after schema completed it, web after api.
        let schema_done = first(&schema, AuditKind::EnvironmentChanged, env);
        let api_in = first(&api, AuditKind::TrainReleased, env);
        let api_done = first(&api, AuditKind::EnvironmentChanged, env);
        let web_in = first(&web, AuditKind::TrainReleased, env);
        assert!(
            schema_done <= api_in && api_in <= api_done && api_done <= web_in,
            "{env}: schema done {schema_done}, api in {api_in}, api done {api_done}, web in {web_in}"
        );
    }

    // v2, with api bad under prod's limits: it passes staging, fails prod
    // and rolls itself back; the train stops, web (held before prod)
    // goes back from staging, then schema (complete) goes back.
    let v2 = [
        push(&f, "schema", "v2", &[]),
        push(&f, "api", "v2", &["--error-rate", "0.5"]),
        push(&f, "web", "v2", &[]),
    ];
    let args = start_args(&v2[0], &v2[1], &v2[2]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, id, err) = f.coord.droverctl(&args);
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_string();
    // While it runs, status names what each member waits for.
    wait_until("web to wait for api", Duration::from_secs(60), || async {
        let t = train(&f, &id).await;
        let web = &t.members[2];
        if web.waiting_for.contains("api to complete") {
            Ok(())
        } else {
            Err(format!("{t:?}"))
        }
    })
    .await;
    let (code, out, err) = f.coord.droverctl(&["train", "watch", &id]);
    assert_eq!(code, 2, "the train ends rolled back: {out}\n{err}");
    let t = train(&f, &id).await;
    assert_eq!(t.phase(), TrainPhase::RolledBack, "{t:?}");
    assert!(
        t.reason.contains("member api failed and rolled back"),
        "{}",
        t.reason
    );
    let phases: Vec<(String, DeployPhase, bool)> = t
        .members
        .iter()
        .map(|m| (m.pipeline.clone(), m.phase(), m.rolled_back_by_train))
        .collect();
    assert_eq!(
        phases,
        [
            ("schema".to_string(), DeployPhase::RolledBack, true),
            ("api".to_string(), DeployPhase::RolledBack, false),
            ("web".to_string(), DeployPhase::RolledBack, false),
        ]
    );
    assert_eq!(f.versions().await, ["v1"; 6], "every host back on v1");
    // Reverse dependency order: api (its own rollback), then web, then schema.
    let (schema, api, web) = (
        audit(&f, "schema").await,
        audit(&f, "api").await,
        audit(&f, "web").await,
    );
    let api_back = first(&api, AuditKind::RolledBack, "");
    let web_back = first(&web, AuditKind::RolledBack, "");
    let schema_starts = first(&schema, AuditKind::RollbackStarted, "");
    assert!(
        api_back <= web_back && web_back <= schema_starts,
        "api back {api_back}, web back {web_back}, schema starts {schema_starts}"
    );
    let stopped = first(&web, AuditKind::TrainStopping, "");
    assert!(api_back <= stopped && stopped <= web_back);
    assert!(first(&schema, AuditKind::TrainRolledBack, "") >= schema_starts);
    let (_, status, _) = f.coord.droverctl(&["train", "status", &id]);
    assert!(status.contains("ROLLED_BACK (by the train)"), "{status}");
    assert!(status.contains("rolling back schema"), "{status}");
}

/// A single-stage pipeline `name` deploying the sample service to every
/// host, one host per batch.
fn everywhere(name: &str) -> String {
    drover_tests::cluster_fleet::rolling_spec(300).replace(
        &format!("name = \"{}\"", drover_tests::cluster_fleet::PIPELINE),
        &format!("name = \"{name}\""),
    )
}

async fn train_via(c: &drover_tests::Coordinator, id: &str) -> Result<Train, String> {
    let mut api = c.deployer().await;
    api.get_train(TrainRef {
        id: id.into(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
    .map_err(|s| s.to_string())
}

/// Two coordinators on etcd; the train's members on shards led by
/// different coordinators (so members are started and released through
/// the other's API). The leader of the train's shard is killed while the
/// second member deploys: the standby resumes the train where it was, the
/// third member follows, and nothing is restarted twice.
#[tokio::test]
async fn a_train_survives_the_failover_of_its_leader() {
    use drover_coordinator::ha::shards::shard_of;
    use drover_tests::cluster_fleet::ClusterFleet;
    let mut f = ClusterFleet::start(2, 3, &everywhere("unused"), 20).await;
    f.settled_leader().await;
    let leader_of = |name: String| {
        let cluster = &f.cluster;
        async move { cluster.wait_leader(shard_of(&name, 16), None).await.0 }
    };
    let a = "train-a".to_string();
    let home = leader_of(a.clone()).await;
    let mut b = None;
    for k in 0..64 {
        let name = format!("train-b{k}");
        if leader_of(name.clone()).await != home {
            b = Some(name);
            break;
        }
    }
    let b = b.expect("a pipeline name on a shard the other coordinator leads");
    let c = "train-c".to_string();
    for p in [&a, &b, &c] {
        f.apply(&everywhere(p));
    }
    let via = f.cluster.get(0);
    let (v2, v3, v4) = (
        f.push(via, "v2", &[]),
        f.push(via, "v3", &[]),
        f.push(via, "v4", &[]),
    );
    // Started through the coordinator that does not lead the train's shard.
    let home_index = f.cluster.index_of(&home);
    let other = f.cluster.other_than(home_index);
    let started = other
        .deployer()
        .await
        .start_train(StartTrainRequest {
            name: "failover".into(),
            members: vec![
                TrainMemberSpec {
                    pipeline: a.clone(),
                    artifact: v2,
                    after: vec![],
                },
                TrainMemberSpec {
                    pipeline: b.clone(),
                    artifact: v3,
                    after: vec![a.clone()],
                },
                TrainMemberSpec {
                    pipeline: c.clone(),
                    artifact: v4,
                    after: vec![b.clone()],
                },
            ],
            idempotency_key: "release-42".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let id = started.id.clone();
    wait_until(
        &format!("{b} to deploy"),
        Duration::from_secs(60),
        || async {
            let t = train_via(other, &id).await?;
            match t.members.iter().find(|m| m.pipeline == b) {
                Some(m) if m.phase() == DeployPhase::Rolling => Ok(()),
                _ => Err(format!("{t:?}")),
            }
        },
    )
    .await;
    f.cluster.kill(home_index);
    let survivor = f.cluster.other_than(home_index);
    let t = wait_until("the train to complete", Duration::from_secs(90), || async {
        let t = train_via(survivor, &id).await?;
        if TrainPhase::Complete == t.phase() {
            Ok(t)
        } else {
            Err(format!("{t:?}"))
        }
    })
    .await;
    assert!(
        t.log
            .iter()
            .any(|l| l.contains(&format!("released {c} into prod"))),
        "{:?}",
        t.log
    );
    assert!(
        survivor.child.log().contains("resuming release train"),
        "the standby took the train over"
    );
    assert_eq!(f.versions().await, ["v4"; 3]);
    for v in ["v2", "v3", "v4"] {
        assert_eq!(f.starts(v), [1, 1, 1], "{v} started once per host");
    }
    // The same key returns the same train.
    let again = survivor
        .deployer()
        .await
        .start_train(StartTrainRequest {
            members: vec![TrainMemberSpec {
                pipeline: a.clone(),
                artifact: started.members[0].artifact.clone(),
                after: vec![],
            }],
            idempotency_key: "release-42".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.id, id);
}
