//! Which hosts a feature flag is on for: pure.
//!
//! 1. A flag of environment E of pipeline P concerns the hosts E's stage
//!    selector matches (its environment's hosts); each of them gets the
//!    flag, on or off.
//! 2. Of those, the flag's own selector picks the eligible hosts; they are
//!    ordered by sha256(flag name, host id) (an order fixed per flag, the
//!    same on every coordinator) and the first round(percent × eligible /
//!    100) are on. Raising the percentage only adds hosts; lowering it
//!    only removes them.
//! 3. A host of several environments gets each flag of each; a service's
//!    flags are those of its pipelines' environments.

use std::collections::{BTreeMap, BTreeSet};

use drover_common::labels::Selector;
use drover_common::proto::{Flag, FlagState, HostFlags, Pipeline, ServiceFlags};
use sha2::{Digest, Sha256};

/// A host as the assignment sees it.
pub struct HostLabels<'a> {
    pub id: &'a str,
    pub labels: &'a std::collections::HashMap<String, String>,
}

/// Why a flag is refused (the field named), if it is.
pub fn invalid(flag: &Flag) -> Option<String> {
    let name_ok = !flag.name.is_empty()
        && flag.name.len() <= 64
        && flag
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !name_ok {
        return Some(format!(
            "flag.name: {:?} is not 1 to 64 of [A-Za-z0-9._-]",
            flag.name
        ));
    }
    if flag.percent > 100 {
        return Some(format!(
            "flag.percent: {} is outside 0 to 100",
            flag.percent
        ));
    }
    if let Err(e) = Selector::parse(&flag.selector) {
        return Some(format!("flag.selector: {e}"));
    }
    if let Some(a) = &flag.analysis {
        if !(0.0..0.5).contains(&a.alpha) {
            return Some(format!(
                "flag.analysis.alpha: {} is outside 0 to 0.5",
                a.alpha
            ));
        }
        if flag.bake_ms > 3_600_000 {
            return Some(format!("flag.bake_ms: {} is over an hour", flag.bake_ms));
        }
    }
    None
}

/// Rule 2: the hosts of `eligible` the flag is on for.
pub fn on_hosts<'a>(flag: &Flag, eligible: &[&'a str]) -> BTreeSet<&'a str> {
    let mut ordered: Vec<(Vec<u8>, &str)> = eligible
        .iter()
        .map(|h| {
            let mut d = Sha256::new();
            d.update(flag.name.as_bytes());
            d.update([0]);
            d.update(h.as_bytes());
            (d.finalize().to_vec(), *h)
        })
        .collect();
    ordered.sort();
    let n = (u64::from(flag.percent) * eligible.len() as u64 + 50) / 100;
    ordered
        .into_iter()
        .take(n as usize)
        .map(|(_, h)| h)
        .collect()
}

/// A flag's place: (pipeline, environment, name).
pub type FlagKey = (String, String, String);

/// What the flags come to.
#[derive(Debug, Default)]
pub struct Assignment {
    /// Each host's flags.
    pub per_host: BTreeMap<String, HostFlags>,
    /// Per flag, its eligible hosts and whether it is on for each.
    pub eligible: BTreeMap<FlagKey, Vec<(String, bool)>>,
}

impl Assignment {
    /// Hosts `key` is on for, and its eligible hosts.
    pub fn count(&self, key: &FlagKey) -> (u32, u32) {
        self.eligible.get(key).map_or((0, 0), |hosts| {
            let on = hosts.iter().filter(|(_, on)| *on).count();
            (on as u32, hosts.len() as u32)
        })
    }
}

/// Rules 1 to 3.
pub fn assign(
    states: &[FlagState],
    pipelines: &[Pipeline],
    hosts: &[HostLabels<'_>],
) -> Assignment {
    let mut per_host: BTreeMap<String, BTreeMap<String, BTreeMap<String, bool>>> = BTreeMap::new();
    let mut sides = BTreeMap::new();
    for state in states {
        let Some(flag) = &state.flag else { continue };
        let Some(pipeline) = pipelines.iter().find(|p| p.name == state.pipeline) else {
            continue;
        };
        let Some(stage) = pipeline.stages.iter().find(|s| s.name == state.environment) else {
            continue;
        };
        let (Ok(env), Ok(only)) = (
            Selector::parse(&stage.selector),
            Selector::parse(&flag.selector),
        ) else {
            continue;
        };
        let in_env: Vec<&HostLabels> = hosts.iter().filter(|h| env.matches(h.labels)).collect();
        let eligible: Vec<&str> = in_env
            .iter()
            .filter(|h| only.matches(h.labels))
            .map(|h| h.id)
            .collect();
        let on = on_hosts(flag, &eligible);
        for h in &in_env {
            per_host
                .entry(h.id.to_string())
                .or_default()
                .entry(pipeline.service.clone())
                .or_default()
                .insert(flag.name.clone(), on.contains(h.id));
        }
        sides.insert(
            (
                state.pipeline.clone(),
                state.environment.clone(),
                flag.name.clone(),
            ),
            eligible
                .iter()
                .map(|h| (h.to_string(), on.contains(h)))
                .collect(),
        );
    }
    let per_host = per_host
        .into_iter()
        .map(|(host, services)| {
            let services = services
                .into_iter()
                .map(|(service, flags)| ServiceFlags {
                    service,
                    flags: flags.into_iter().collect(),
                })
                .collect();
            (host, HostFlags { services })
        })
        .collect();
    Assignment {
        per_host,
        eligible: sides,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_common::proto::Stage;
    use std::collections::HashMap;

    fn flag(name: &str, percent: u32, selector: &str) -> Flag {
        Flag {
            name: name.into(),
            percent,
            selector: selector.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_percentage_is_that_share_of_the_eligible_and_only_grows_with_it() {
        let hosts: Vec<String> = (0..10).map(|i| format!("web-{i}")).collect();
        let ids: Vec<&str> = hosts.iter().map(String::as_str).collect();
        let f = |p| on_hosts(&flag("checkout", p, ""), &ids);
        assert_eq!(f(30).len(), 3);
        assert_eq!(f(0).len(), 0);
        assert_eq!(f(100).len(), 10);
        assert_eq!(f(25).len(), 3, "2.5 rounds up");
        for p in 0..100 {
            assert!(f(p).is_subset(&f(p + 1)), "{p}% ⊆ {}%", p + 1);
        }
        // Another flag picks other hosts (its own order).
        let other = on_hosts(&flag("search", 30, ""), &ids);
        assert_eq!(other.len(), 3);
        assert_ne!(other, f(30));
    }

    #[test]
    fn every_host_of_the_environment_gets_the_flag_on_or_off() {
        let labels: Vec<HashMap<String, String>> = (0..4)
            .map(|i| {
                HashMap::from([
                    (
                        "env".to_string(),
                        if i < 3 { "prod" } else { "staging" }.to_string(),
                    ),
                    ("zone".to_string(), format!("z{}", i % 2)),
                ])
            })
            .collect();
        let ids: Vec<String> = (0..4).map(|i| format!("h{i}")).collect();
        let hosts: Vec<HostLabels> = ids
            .iter()
            .zip(&labels)
            .map(|(id, labels)| HostLabels { id, labels })
            .collect();
        let pipeline = Pipeline {
            name: "web".into(),
            service: "web".into(),
            stages: vec![Stage {
                name: "prod".into(),
                selector: "env=prod".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let state = FlagState {
            pipeline: "web".into(),
            environment: "prod".into(),
            flag: Some(flag("beta", 100, "zone=z0")),
            ..Default::default()
        };
        let assigned = assign(&[state], &[pipeline], &hosts);
        let per_host = &assigned.per_host;
        let on = |h: &str| per_host.get(h).map(|f| f.services[0].flags["beta"]);
        assert_eq!(on("h0"), Some(true));
        assert_eq!(on("h1"), Some(false), "in prod, not eligible: off");
        assert_eq!(on("h2"), Some(true));
        assert_eq!(on("h3"), None, "not in the environment");
        assert_eq!(
            assigned.count(&("web".into(), "prod".into(), "beta".into())),
            (2, 2)
        );
        assert!(
            invalid(&flag("beta", 101, ""))
                .unwrap()
                .starts_with("flag.percent")
        );
        assert!(
            invalid(&flag("a b", 1, ""))
                .unwrap()
                .starts_with("flag.name")
        );
        assert!(
            invalid(&flag("b", 1, "=x"))
                .unwrap()
                .starts_with("flag.selector")
        );
    }
}
