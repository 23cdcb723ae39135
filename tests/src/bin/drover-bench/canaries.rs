//! `drover-bench canaries`: healthy canaries in a row, end to end. Five
//! real agents each run the sample service under 100 requests a second,
//! every version drawing its errors at random (0.1%, on both sides); two
//! healthy versions take turns going through a canary stage (one canary
//! host) `runs` times, judged by the analysis of the example pipeline the
//! README shows (`coordinator/examples/pipeline.toml`: alpha 0.05, an
//! error-rate limit of 1% and of 3x the baseline, p99 within 1.5x).
//! Measured: how many healthy canaries were failed. Checked (exit 1
//! otherwise): at most alpha × runs plus the one-sided 95% binomial
//! margin.

use drover_common::proto::{AnalysisVerdict, DeployPhase};
use drover_tests::sample_fleet::SampleFleet;

const PIPELINE: &str = "hello-canaries";

/// The keys of the example pipeline's `[stages.canary.analysis]` table.
fn example_analysis() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../coordinator/examples/pipeline.toml"
    );
    let text = std::fs::read_to_string(path).expect("the example pipeline");
    text.lines()
        .skip_while(|l| l.trim() != "[stages.canary.analysis]")
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with('['))
        .collect::<Vec<_>>()
        .join("\n")
}

pub async fn canaries(runs: usize, bake_ms: u32) -> bool {
    let f = SampleFleet::start(5, 100).await;
    f.apply(&drover_tests::specs::canary_pipeline(
        PIPELINE,
        "batch_percent = 100\nmax_unavailable = 4\nsettle_ms = 0\nstuck_timeout_ms = 20000",
        &format!("[{{ count = 1, bake_ms = {bake_ms} }}]"),
        &example_analysis(),
    ));
    let healthy = ["--error-rate", "0.001", "--random-errors"];
    let versions = [f.push("a", &healthy), f.push("b", &healthy)];
    let (code, out, err) = f.deploy_through(PIPELINE, &versions[0]);
    assert_eq!(code, 0, "the first deploy (no canary): {out}\n{err}");
    let alpha = 0.05;
    let mut failed = Vec::new();
    let mut passed = 0;
    for run in 0..runs {
        let digest = &versions[(run + 1) % 2];
        let (code, _, _) = f.deploy_through(PIPELINE, digest);
        let d = f.coord.latest_deploy(PIPELINE).await;
        let a = d.analyses.first();
        match (code, d.phase(), a.map(|a| a.verdict())) {
            (0, DeployPhase::Complete, Some(AnalysisVerdict::Pass)) => passed += 1,
            (_, _, Some(AnalysisVerdict::Fail | AnalysisVerdict::Inconclusive)) => {
                let a = a.expect("matched");
                eprintln!("run {run}: healthy canary failed: {}", a.reason);
                failed.push(a.reason.clone());
                // Back to the version the next run deploys from.
                let (code, out, err) = f.deploy_through(PIPELINE, digest);
                assert_eq!(code, 0, "redeploying after a false failure: {out}\n{err}");
            }
            other => panic!("run {run}: unexpected end {other:?}: {}", d.reason),
        }
    }
    let margin = 1.645 * (runs as f64 * alpha * (1.0 - alpha)).sqrt();
    let allowed = runs as f64 * alpha + margin;
    let pass = failed.len() as f64 <= allowed;
    println!(
        "healthy canaries (1 of 5 real hosts, sample service at 100 req/s, random 0.1% errors both sides, the example pipeline's analysis, bake {bake_ms} ms): \
         {} of {runs} failed, {passed} passed (target ≤ alpha × runs + margin = {allowed:.1}): {}",
        failed.len(),
        if pass { "PASS" } else { "FAIL" }
    );
    for reason in &failed {
        println!("  failed: {reason}");
    }
    pass
}
