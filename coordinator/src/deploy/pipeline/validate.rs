//! Validation of a pipeline: every problem names its field
//! (`stages[1].canary.steps[0].percent: …`), all problems at once.

use std::collections::HashSet;

use drover_common::ids::{validate_pipeline_name, validate_service};
use drover_common::labels::Selector;
use drover_common::proto::{
    ApprovalTimeoutOutcome, Canary, HealthGate, InconclusiveAction, InconclusivePolicy,
    MetricDirection, Pipeline, Stage, Strategy,
};

use super::{
    ERROR_RATE, LATENCY_P50, LATENCY_P99, MAX_BAKE_MS, MAX_STAGES, PipelineError, is_metric_name,
};

/// Every problem of a pipeline spec, each naming its field.
pub fn validate(p: &Pipeline) -> Result<(), PipelineError> {
    let mut problems = Vec::new();
    if let Err(e) = validate_pipeline_name(&p.name) {
        problems.push(format!("name: {e}"));
    }
    if let Err(e) = validate_service(&p.service) {
        problems.push(format!("service: {e}"));
    }
    if p.stages.is_empty() {
        problems.push("stages: at least one stage is required".into());
    }
    if p.stages.len() > MAX_STAGES {
        problems.push(format!("stages: at most {MAX_STAGES} stages"));
    }
    let mut names = HashSet::new();
    for (i, s) in p.stages.iter().enumerate() {
        let at = |field: &str| format!("stages[{i}].{field}");
        if let Err(e) = validate_pipeline_name(&s.name) {
            problems.push(format!(
                "{}: {}",
                at("name"),
                e.replace("pipeline name", "stage name")
            ));
        }
        if !names.insert(s.name.as_str()) {
            problems.push(format!(
                "{}: {:?} is used by an earlier stage",
                at("name"),
                s.name
            ));
        }
        match Selector::parse(&s.selector) {
            Ok(sel) if sel.is_empty() => problems.push(format!(
                "{}: must select some hosts (e.g. env=prod)",
                at("selector")
            )),
            Ok(_) => {}
            Err(e) => problems.push(format!("{}: {e}", at("selector"))),
        }
        match (s.batch_size, s.batch_percent) {
            (0, 0) => problems.push(format!(
                "{}: give batch_size or batch_percent",
                at("batch_size")
            )),
            (n, 0) if n > 0 => {}
            (0, pct) if (1..=100).contains(&pct) => {}
            (0, _) => problems.push(format!(
                "{}: must be between 1 and 100",
                at("batch_percent")
            )),
            _ => problems.push(format!(
                "{}: give batch_size or batch_percent, not both",
                at("batch_size")
            )),
        }
        if let Some(g) = &s.gate {
            validate_gate(g, "gate", &at, &mut problems);
        }
        if let Some(c) = &s.canary {
            validate_canary(c, &at, &mut problems);
        }
        if let Some(r) = &s.router {
            match (r.haproxy.is_empty(), r.name.is_empty()) {
                (false, false) => {
                    problems.push(format!("{}: give haproxy or name, not both", at("router")))
                }
                (true, false) if !crate::router::valid_name(&r.name) => problems.push(format!(
                    "{}: {:?} is not a router name (letters, digits, '-', '_', '.', ':')",
                    at("router.name"),
                    r.name
                )),
                (true, false) => {}
                _ => {
                    if let Err(e) = r.haproxy.parse::<crate::router::haproxy::RuntimeAddr>() {
                        problems.push(format!("{}: {e}", at("router.haproxy")));
                    }
                }
            }
            if !crate::router::valid_name(&r.backend) {
                problems.push(format!(
                    "{}: {:?} is not a backend name (letters, digits, '-', '_', '.', ':')",
                    at("router.backend"),
                    r.backend
                ));
            }
        }
        match Strategy::try_from(s.strategy) {
            Ok(Strategy::BlueGreen | Strategy::WeightedCanary) => {
                validate_blue_green(s, &at, &mut problems)
            }
            Ok(Strategy::Rolling) => {
                if s.blue_green.is_some() {
                    problems.push(format!(
                        "{}: given, but the strategy is rolling (set strategy = \"STRATEGY_BLUE_GREEN\")",
                        at("blue_green")
                    ));
                }
            }
            Err(_) => problems.push(format!(
                "{}: unknown strategy {}",
                at("strategy"),
                s.strategy
            )),
        }
        if ApprovalTimeoutOutcome::try_from(s.on_approval_timeout).is_err() {
            problems.push(format!(
                "{}: unknown outcome {}",
                at("on_approval_timeout"),
                s.on_approval_timeout
            ));
        }
        if s.required_approvals > 10 {
            problems.push(format!("{}: at most 10", at("required_approvals")));
        }
        if (s.required_approvals > 1 || s.four_eyes || !s.approver_roles.is_empty())
            && !s.requires_approval
        {
            problems.push(format!(
                "{}: required_approvals, four_eyes and approver_roles need requires_approval = true",
                at("requires_approval")
            ));
        }
        for r in &s.approver_roles {
            if drover_common::tls::identity::validate_name(r).is_err() {
                problems.push(format!(
                    "{}: {r:?} is not a role name",
                    at("approver_roles")
                ));
            }
        }
        let mut wave_names = HashSet::new();
        for (k, w) in s.waves.iter().enumerate() {
            let f = |field: &str| at(&format!("waves[{k}].{field}"));
            if w.name.is_empty() || w.name.len() > 63 {
                problems.push(format!("{}: 1-63 characters", f("name")));
            } else if !wave_names.insert(w.name.as_str()) {
                problems.push(format!(
                    "{}: {:?} is used by an earlier wave",
                    f("name"),
                    w.name
                ));
            }
            if w.selectors.is_empty() {
                problems.push(format!(
                    "{}: at least one selector (e.g. region=eu)",
                    f("selectors")
                ));
            }
            for (j, sel) in w.selectors.iter().enumerate() {
                match Selector::parse(sel) {
                    Ok(p) if p.is_empty() => problems.push(format!(
                        "{}: must select some hosts",
                        f(&format!("selectors[{j}]"))
                    )),
                    Ok(_) => {}
                    Err(e) => problems.push(format!("{}: {e}", f(&format!("selectors[{j}]")))),
                }
            }
            if w.bake_ms > MAX_BAKE_MS {
                problems.push(format!("{}: at most {MAX_BAKE_MS} ms", f("bake_ms")));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(PipelineError::Invalid(problems))
    }
}

/// The problems of a stage's canary, each naming its field.
fn validate_canary(c: &Canary, at: &dyn Fn(&str) -> String, problems: &mut Vec<String>) {
    if c.steps.is_empty() {
        problems.push(format!("{}: at least one step", at("canary.steps")));
    }
    let mut last: Option<(u32, u32)> = None;
    for (k, step) in c.steps.iter().enumerate() {
        let f = |field: &str| at(&format!("canary.steps[{k}].{field}"));
        match (step.percent, step.count) {
            (0, 0) => problems.push(format!("{}: give percent or count", f("percent"))),
            (p, 0) if !(1..=99).contains(&p) => {
                problems.push(format!("{}: must be between 1 and 99", f("percent")))
            }
            (p, c) if p > 0 && c > 0 => {
                problems.push(format!("{}: give percent or count, not both", f("percent")))
            }
            _ => {}
        }
        if let Some((lp, lc)) = last
            && ((step.percent > 0 && step.percent <= lp) || (step.count > 0 && step.count <= lc))
        {
            problems.push(format!(
                "{}: cohorts must grow from step to step",
                f("percent")
            ));
        }
        last = Some((step.percent, step.count));
        if step.bake_ms == 0 || step.bake_ms > MAX_BAKE_MS {
            problems.push(format!(
                "{}: must be between 1 and {MAX_BAKE_MS} ms",
                f("bake_ms")
            ));
        }
    }
    let Some(a) = &c.analysis else { return };
    if !(a.alpha > 0.0 && a.alpha <= 0.5) {
        problems.push(format!(
            "{}: must be in (0, 0.5]",
            at("canary.analysis.alpha")
        ));
    }
    if InconclusiveAction::try_from(a.inconclusive).is_err() {
        problems.push(format!(
            "{}: unknown action {}",
            at("canary.analysis.inconclusive"),
            a.inconclusive
        ));
    }
    let mut seen = HashSet::new();
    for (k, m) in a.metrics.iter().enumerate() {
        let f = |field: &str| at(&format!("canary.analysis.metrics[{k}].{field}"));
        if !is_metric_name(&m.name) {
            problems.push(format!(
                "{}: {:?} is neither a built-in metric ({ERROR_RATE}, {LATENCY_P99}, {LATENCY_P50}) nor a Prometheus metric name",
                f("name"),
                m.name
            ));
        }
        if !seen.insert(m.name.as_str()) {
            problems.push(format!("{}: {:?} is judged twice", f("name"), m.name));
        }
        if MetricDirection::try_from(m.direction).is_err() {
            problems.push(format!(
                "{}: unknown direction {}",
                f("direction"),
                m.direction
            ));
        }
        for (name, v) in [
            ("max", m.max),
            ("max_ratio", m.max_ratio),
            ("tolerance", m.tolerance),
        ] {
            if !v.is_finite() || v < 0.0 {
                problems.push(format!("{}: must be zero or positive", f(name)));
            }
        }
    }
}

/// Checks a health gate's limits; problems are named `field.…`.
fn validate_gate(
    g: &HealthGate,
    field: &str,
    at: &dyn Fn(&str) -> String,
    problems: &mut Vec<String>,
) {
    for (name, v) in [
        ("max_error_rate", g.max_error_rate),
        ("max_error_rate_ratio", g.max_error_rate_ratio),
        ("max_p99_ms", g.max_p99_ms),
        ("max_p99_ratio", g.max_p99_ratio),
    ] {
        if !v.is_finite() || v < 0.0 {
            problems.push(format!(
                "{}: must be zero (no limit) or positive",
                at(&format!("{field}.{name}"))
            ));
        }
    }
    if g.max_error_rate > 1.0 {
        problems.push(format!(
            "{}: is a share, at most 1.0",
            at(&format!("{field}.max_error_rate"))
        ));
    }
    if g.bad_samples > g.samples && g.samples > 0 {
        problems.push(format!(
            "{}: cannot exceed {field}.samples ({})",
            at(&format!("{field}.bad_samples")),
            g.samples
        ));
    }
    if InconclusivePolicy::try_from(g.inconclusive).is_err() {
        problems.push(format!(
            "{}: unknown policy {}",
            at(&format!("{field}.inconclusive")),
            g.inconclusive
        ));
    }
}

/// A blue-green stage needs a router with a backend, moves traffic, not
/// host cohorts (no canary), and its gates are gates.
fn validate_blue_green(s: &Stage, at: &dyn Fn(&str) -> String, problems: &mut Vec<String>) {
    if s.router.is_none() {
        problems.push(format!(
            "{}: a blue-green stage needs a router (the backend whose <host>-blue and <host>-green servers it switches)",
            at("router")
        ));
    }
    match (s.strategy(), &s.canary) {
        (Strategy::BlueGreen, Some(_)) => problems.push(format!(
            "{}: a blue-green stage has no host canary (its pre-promotion gate judges the new slot; STRATEGY_WEIGHTED_CANARY canaries by traffic)",
            at("canary")
        )),
        (Strategy::WeightedCanary, None) => problems.push(format!(
            "{}: a weighted canary needs its steps (percent of the traffic, e.g. 1, 5, 25)",
            at("canary")
        )),
        (Strategy::WeightedCanary, Some(c)) => {
            // Percents are checked as for any canary (validate_canary).
            for (k, step) in c.steps.iter().enumerate() {
                if step.count > 0 {
                    problems.push(format!(
                        "{}: a weighted canary's steps give a percent of the traffic, not a count of hosts",
                        at(&format!("canary.steps[{k}].count"))
                    ));
                }
            }
        }
        _ => {}
    }
    let Some(bg) = &s.blue_green else {
        return;
    };
    if !bg.preview_backend.is_empty() && !crate::router::valid_name(&bg.preview_backend) {
        problems.push(format!(
            "{}: {:?} is not a backend name (letters, digits, '-', '_', '.', ':')",
            at("blue_green.preview_backend"),
            bg.preview_backend
        ));
    }
    if s.router
        .as_ref()
        .is_some_and(|r| !bg.preview_backend.is_empty() && r.backend == bg.preview_backend)
    {
        problems.push(format!(
            "{}: must differ from router.backend",
            at("blue_green.preview_backend")
        ));
    }
    if let Some(g) = &bg.pre_promotion {
        validate_gate(g, "blue_green.pre_promotion", at, problems);
    }
    if !bg.green_selector.is_empty() {
        if let Err(e) = drover_common::labels::Selector::parse(&bg.green_selector) {
            problems.push(format!("{}: {e}", at("blue_green.green_selector")));
        }
        if !s.waves.is_empty() {
            problems.push(format!(
                "{}: host groups switch all at once; waves are for slots",
                at("blue_green.green_selector")
            ));
        }
    }
    if let Some(g) = &bg.post_promotion {
        validate_gate(g, "blue_green.post_promotion", at, problems);
    }
    if ApprovalTimeoutOutcome::try_from(bg.on_promotion_timeout).is_err() {
        problems.push(format!(
            "{}: unknown outcome {}",
            at("blue_green.on_promotion_timeout"),
            bg.on_promotion_timeout
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::pipeline::tests::pipeline;

    #[test]
    fn every_problem_names_its_field() {
        let mut p = pipeline();
        p.name = "Hello".into();
        p.stages[0].selector = "".into();
        p.stages[1].name = "staging".into();
        p.stages[1].batch_size = 3;
        p.stages[0].batch_percent = 101;
        p.stages[0].gate = Some(HealthGate {
            max_error_rate: -1.0,
            bad_samples: 9,
            samples: 5,
            ..Default::default()
        });
        let PipelineError::Invalid(problems) = validate(&p).unwrap_err() else {
            panic!()
        };
        let fields: Vec<&str> = problems
            .iter()
            .map(|p| p.split(':').next().unwrap())
            .collect();
        assert_eq!(
            fields,
            [
                "name",
                "stages[0].selector",
                "stages[0].batch_percent",
                "stages[0].gate.max_error_rate",
                "stages[0].gate.bad_samples",
                "stages[1].name",
                "stages[1].batch_size",
            ],
            "{problems:?}"
        );
        // A router whose address or backend is not one.
        let mut routed = pipeline();
        routed.stages[0].router = Some(drover_common::proto::RouterTarget {
            haproxy: "haproxy.sock".into(),
            backend: "web\nshutdown".into(),
            ..Default::default()
        });
        let PipelineError::Invalid(problems) = validate(&routed).unwrap_err() else {
            panic!()
        };
        assert!(
            problems[0].starts_with("stages[0].router.haproxy: "),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("stages[0].router.backend: "),
            "{problems:?}"
        );
        let problems_of = |p: &Pipeline| match validate(p) {
            Err(PipelineError::Invalid(problems)) => problems,
            other => panic!("{other:?}"),
        };
        // Blue-green without a router, with a host canary, a preview that
        // is the live backend, a router named twice over.
        let mut bg = pipeline();
        bg.stages[0].strategy = Strategy::BlueGreen as i32;
        assert_eq!(
            problems_of(&bg)[0].split(':').next(),
            Some("stages[0].router"),
            "{:?}",
            problems_of(&bg)
        );
        bg.stages[0].router = Some(drover_common::proto::RouterTarget {
            haproxy: "unix:/run/haproxy.sock".into(),
            backend: "web".into(),
            name: "edge".into(),
            ..Default::default()
        });
        bg.stages[0].canary = Some(Canary::default());
        bg.stages[0].blue_green = Some(drover_common::proto::BlueGreen {
            preview_backend: "web".into(),
            ..Default::default()
        });
        let problems = problems_of(&bg);
        for field in [
            "stages[0].router: give haproxy or name",
            "stages[0].canary: a blue-green stage has no host canary",
            "stages[0].blue_green.preview_backend: must differ",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(field)),
                "{field}: {problems:?}"
            );
        }
        // A weighted canary's steps are rising percents, never counts.
        let mut weighted = pipeline();
        weighted.stages[0].strategy = Strategy::WeightedCanary as i32;
        weighted.stages[0].router = Some(drover_common::proto::RouterTarget {
            name: "edge".into(),
            backend: "web".into(),
            ..Default::default()
        });
        let step = |percent, count| drover_common::proto::CanaryStep {
            percent,
            count,
            bake_ms: 1000,
        };
        weighted.stages[0].canary = Some(Canary {
            steps: vec![step(5, 0), step(5, 0), step(0, 2), step(100, 0)],
            ..Default::default()
        });
        let problems = problems_of(&weighted);
        let bad: Vec<&str> = problems
            .iter()
            .map(|p| p.split(':').next().unwrap())
            .collect();
        assert_eq!(
            bad,
            [
                "stages[0].canary.steps[1].percent",
                "stages[0].canary.steps[3].percent",
                "stages[0].canary.steps[2].count",
            ],
            "{problems:?}"
        );
        weighted.stages[0].canary = Some(Canary {
            steps: vec![step(1, 0), step(5, 0), step(25, 0)],
            ..Default::default()
        });
        assert!(validate(&weighted).is_ok(), "{:?}", validate(&weighted));
        // Host groups: a selector that is one, and no waves.
        let mut groups = weighted.clone();
        groups.stages[0].blue_green = Some(drover_common::proto::BlueGreen {
            green_selector: "fleet=".into(),
            ..Default::default()
        });
        groups.stages[0].waves = vec![drover_common::proto::Wave {
            name: "eu".into(),
            selectors: vec!["region=eu".into()],
            bake_ms: 0,
        }];
        let problems = problems_of(&groups);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems
                .iter()
                .all(|p| p.starts_with("stages[0].blue_green.green_selector: ")),
            "{problems:?}"
        );
        // A strategy this coordinator does not know.
        let mut unknown = pipeline();
        unknown.stages[0].strategy = 7;
        assert!(problems_of(&unknown)[0].starts_with("stages[0].strategy: unknown strategy 7"));
        let mut empty = pipeline();
        empty.stages.clear();
        assert!(
            validate(&empty)
                .unwrap_err()
                .to_string()
                .contains("stages: at least one stage")
        );
    }
}
