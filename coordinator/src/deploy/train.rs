//! Release trains (issue 16, started): several pipelines, each with its
//! artifact, released together in the order a dependency graph gives
//! ("the schema service before the API, the API before the web tier").
//! This file is the pure model; nothing runs trains yet.
//!
//! Rules:
//! 1. A train names each member pipeline once, with its artifact and the
//!    members it comes after; every name after `after` must be a member,
//!    and the graph must have no cycle (a cycle is refused naming it,
//!    `a → b → a`).
//! 2. A member may deploy to an environment once every member it comes
//!    after has completed that same environment (`ready`).
//! 3. A failed member stops the train: nothing more starts.
//! 4. Rolled back (by policy), the members that completed go back in
//!    reverse dependency order: dependents before what they depend on
//!    (`rollback_order`).

use std::collections::{BTreeMap, BTreeSet};

/// One member of a train.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub pipeline: String,
    pub artifact: String,
    /// Members (pipelines) that must complete an environment first.
    pub after: Vec<String>,
}

/// Why a train is refused (rule 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrainError {
    #[error("a train needs at least one member")]
    Empty,
    #[error("pipeline {0:?} is a member twice")]
    Duplicate(String),
    #[error("member {member:?} comes after {after:?}, which is not a member of the train")]
    UnknownAfter { member: String, after: String },
    #[error("the members form a cycle: {}", .0.join(" → "))]
    Cycle(Vec<String>),
}

/// Rule 1: the members in an order that respects every `after` (ties by
/// name, so the order is stable), or why there is none.
pub fn order(members: &[Member]) -> Result<Vec<String>, TrainError> {
    if members.is_empty() {
        return Err(TrainError::Empty);
    }
    let mut after: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for m in members {
        if after.insert(m.pipeline.as_str(), BTreeSet::new()).is_some() {
            return Err(TrainError::Duplicate(m.pipeline.clone()));
        }
    }
    for m in members {
        for a in &m.after {
            if !after.contains_key(a.as_str()) {
                return Err(TrainError::UnknownAfter {
                    member: m.pipeline.clone(),
                    after: a.clone(),
                });
            }
            after
                .get_mut(m.pipeline.as_str())
                .expect("inserted above")
                .insert(a.as_str());
        }
    }
    // Kahn's algorithm, smallest name first among the ready.
    let mut done: Vec<String> = Vec::new();
    let mut left = after.clone();
    while !left.is_empty() {
        let next = left
            .iter()
            .find(|(_, deps)| deps.iter().all(|d| done.iter().any(|x| x.as_str() == *d)))
            .map(|(name, _)| *name);
        match next {
            Some(name) => {
                left.remove(name);
                done.push(name.to_string());
            }
            None => return Err(TrainError::Cycle(cycle_in(&left))),
        }
    }
    Ok(done)
}

/// A cycle among `left` (every one of them waits on another of them):
/// follow first dependencies until a name repeats.
fn cycle_in(left: &BTreeMap<&str, BTreeSet<&str>>) -> Vec<String> {
    let mut path: Vec<&str> = Vec::new();
    let mut at = *left.keys().next().expect("called with members left");
    loop {
        if let Some(start) = path.iter().position(|p| *p == at) {
            let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
            cycle.push(at.to_string());
            return cycle;
        }
        path.push(at);
        at = left[at]
            .iter()
            .find(|d| left.contains_key(*d))
            .copied()
            .expect("a member left waits on another member left");
    }
}

/// Where a member stands in one environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    Waiting,
    Deploying,
    Complete,
    Failed,
    RolledBack,
}

/// Rules 2 and 3: the members that may start deploying `states`' environment
/// now (none once any member failed).
pub fn ready(members: &[Member], states: &BTreeMap<String, MemberState>) -> Vec<String> {
    let state = |p: &str| states.get(p).copied().unwrap_or(MemberState::Waiting);
    if members
        .iter()
        .any(|m| state(&m.pipeline) == MemberState::Failed)
    {
        return Vec::new();
    }
    members
        .iter()
        .filter(|m| state(&m.pipeline) == MemberState::Waiting)
        .filter(|m| m.after.iter().all(|a| state(a) == MemberState::Complete))
        .map(|m| m.pipeline.clone())
        .collect()
}

/// Rule 4: the completed members, dependents first.
pub fn rollback_order(
    members: &[Member],
    states: &BTreeMap<String, MemberState>,
) -> Result<Vec<String>, TrainError> {
    let mut order = order(members)?;
    order.reverse();
    order.retain(|p| states.get(p) == Some(&MemberState::Complete));
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pipeline: &str, after: &[&str]) -> Member {
        Member {
            pipeline: pipeline.into(),
            artifact: format!("{pipeline}-sha"),
            after: after.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn states(pairs: &[(&str, MemberState)]) -> BTreeMap<String, MemberState> {
        pairs.iter().map(|(p, s)| (p.to_string(), *s)).collect()
    }

    #[test]
    fn the_order_respects_every_dependency_and_bad_trains_are_named() {
        let train = [
            m("web", &["api"]),
            m("api", &["schema"]),
            m("schema", &[]),
            m("docs", &[]),
        ];
        assert_eq!(order(&train).unwrap(), ["docs", "schema", "api", "web"]);
        assert_eq!(order(&[]), Err(TrainError::Empty));
        assert_eq!(
            order(&[m("a", &[]), m("a", &[])]),
            Err(TrainError::Duplicate("a".into()))
        );
        assert_eq!(
            order(&[m("a", &["ghost"])]),
            Err(TrainError::UnknownAfter {
                member: "a".into(),
                after: "ghost".into()
            })
        );
        let cyclic = [m("a", &["c"]), m("b", &["a"]), m("c", &["b"]), m("d", &[])];
        let err = order(&cyclic).unwrap_err();
        assert_eq!(err.to_string(), "the members form a cycle: a → c → b → a");
        assert_eq!(
            order(&[m("a", &["a"])]).unwrap_err().to_string(),
            "the members form a cycle: a → a"
        );
    }

    #[test]
    fn members_wait_for_what_they_come_after_and_a_failure_stops_the_train() {
        use MemberState::*;
        let train = [
            m("schema", &[]),
            m("api", &["schema"]),
            m("web", &["api"]),
            m("docs", &[]),
        ];
        assert_eq!(ready(&train, &states(&[])), ["schema", "docs"]);
        assert_eq!(
            ready(
                &train,
                &states(&[("schema", Deploying), ("docs", Complete)])
            ),
            Vec::<String>::new()
        );
        assert_eq!(
            ready(&train, &states(&[("schema", Complete)])),
            ["api", "docs"]
        );
        assert_eq!(
            ready(&train, &states(&[("schema", Complete), ("api", Failed)])),
            Vec::<String>::new(),
            "nothing starts after a failure"
        );
        // Rolled back: the completed ones, dependents first.
        let s = states(&[
            ("schema", Complete),
            ("api", Complete),
            ("web", Failed),
            ("docs", Complete),
        ]);
        assert_eq!(
            rollback_order(&train, &s).unwrap(),
            ["api", "schema", "docs"]
        );
    }
}
