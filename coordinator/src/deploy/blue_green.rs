//! A blue-green stage as pure data and decisions: its steps, its progress
//! in the deploy record, and the router state each host's two servers
//! should be in. No I/O here; `driver/blue_green.rs` does the effects.
//!
//! Every host runs the service in two slots (the agent's `--slot-ports`),
//! each behind its own server in the stage's router backend,
//! `<host>-blue` and `<host>-green`. One slot is *live* (its servers
//! ready); the deploy starts the new release in the other.
//!
//! ```text
//! plan entries:  [StandUp: all hosts] [Switch: wave 1] … [Switch: wave n] [ScaleDown: all hosts]
//!
//! StandUp    start `to` on every host → preview backend: `to` ready →
//!            pre-promotion gate (`to` against `from`) → promotion
//!            (automatic, or a hold until promoted by hand / its timeout)
//! Switch     record the wave's hosts as switched, then per host: `to`
//!            ready, `from` drain → post-promotion gate on `to`
//! ScaleDown  wait until the scale-down delay has passed since the last
//!            switch → stop `from` → its servers to maintenance
//! RollBack   `from` running again if it was stopped → every switched host
//!            back (`from` ready, `to` drain) → `to` stopped, in maintenance
//! ```
//!
//! Architecture Invariant: the router's intended state is a function of
//! the recorded progress ([`BlueGreenStage::intended`]), written before the
//! router is told, so any leader re-asserts the same state (idempotent).

use std::collections::BTreeMap;

use drover_common::proto::Slot;
use serde::{Deserialize, Serialize};

use crate::router::ServerState;

/// One of a host's two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Color {
    Blue,
    Green,
}

impl Color {
    pub fn other(self) -> Color {
        match self {
            Color::Blue => Color::Green,
            Color::Green => Color::Blue,
        }
    }

    pub fn slot(self) -> Slot {
        match self {
            Color::Blue => Slot::Blue,
            Color::Green => Slot::Green,
        }
    }

    /// The live color an environment records (none recorded: blue).
    pub fn live(slot: Slot) -> Color {
        match slot {
            Slot::Green => Color::Green,
            Slot::Blue | Slot::None => Color::Blue,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Color::Blue => "blue",
            Color::Green => "green",
        }
    }
}

/// The router server of `host`'s `color` slot.
pub fn server_name(host: &str, color: Color) -> String {
    format!("{host}-{}", color.name())
}

/// What an entry of a blue-green stage's plan does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    StandUp,
    /// The `n`th switch (0-based; one per wave, or one for all hosts).
    Switch(usize),
    ScaleDown,
}

/// A blue-green stage's progress, kept in the deploy record so a new
/// leader resumes it (and re-asserts its traffic) exactly where it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlueGreenStage {
    /// The slot that served when the deploy started.
    pub from: Color,
    /// The slot the new release starts in.
    pub to: Color,
    /// Switch steps in the plan (one per wave, at least one).
    pub switches: usize,
    /// Hosts whose `to` slot answered ready, with the last heartbeat
    /// sequence seen then: its evidence is what comes after.
    pub started: BTreeMap<String, u64>,
    /// The `to` slot's restart count on each host before it was asked to
    /// start (every host of the stage once StandUp began).
    pub restarts_before: BTreeMap<String, u32>,
    /// Hosts whose traffic is meant to be on `to` (recorded before the
    /// router is told).
    pub switched: Vec<String>,
    /// When the last switch was made (the scale-down delay counts from
    /// it); 0: none yet.
    pub switched_unix_ms: u64,
    /// When the wait for a manual promotion began (0: not waiting).
    pub promotion_asked_unix_ms: u64,
    /// The old slot was stopped after the scale-down delay.
    pub scaled_down: bool,
}

impl BlueGreenStage {
    pub fn new(live: Color, switches: usize) -> BlueGreenStage {
        BlueGreenStage {
            from: live,
            to: live.other(),
            switches: switches.max(1),
            started: BTreeMap::new(),
            restarts_before: BTreeMap::new(),
            switched: Vec::new(),
            switched_unix_ms: 0,
            promotion_asked_unix_ms: 0,
            scaled_down: false,
        }
    }

    /// The step plan entry `batch` is.
    pub fn step(&self, batch: usize) -> Step {
        match batch {
            0 => Step::StandUp,
            b if b <= self.switches => Step::Switch(b - 1),
            _ => Step::ScaleDown,
        }
    }

    /// The state `host`'s two servers should be in, in the stage's main
    /// backend: the live one ready; the other drained while it is warm
    /// (an instant switch back), in maintenance when it is not running.
    pub fn intended(&self, host: &str) -> [(Color, ServerState); 2] {
        if self.switched.iter().any(|h| h == host) {
            let old = if self.scaled_down {
                ServerState::Maint
            } else {
                ServerState::Drain
            };
            [(self.to, ServerState::Ready), (self.from, old)]
        } else {
            [
                (self.from, ServerState::Ready),
                (self.to, ServerState::Maint),
            ]
        }
    }

    /// In the preview backend the new slot is the one that answers.
    pub fn preview(&self) -> [(Color, ServerState); 2] {
        [
            (self.to, ServerState::Ready),
            (self.from, ServerState::Maint),
        ]
    }

    /// Rolled back: every host's traffic is on `from` again, `to` stopped.
    pub fn rolled_back(&mut self) {
        self.switched.clear();
        self.scaled_down = false;
    }

    /// The slot live once the stage passed.
    pub fn live_after(&self) -> Color {
        self.to
    }
}

/// The plan of a blue-green stage over `hosts`: standing up on every host,
/// one switch per wave (`waves`: the hosts of each, in order; none: one
/// switch of all), scaling down on every host.
pub fn plan(hosts: &[String], waves: &[Vec<String>]) -> Vec<Vec<String>> {
    if hosts.is_empty() {
        return Vec::new();
    }
    let mut entries = vec![hosts.to_vec()];
    let waved: Vec<&Vec<String>> = waves.iter().filter(|w| !w.is_empty()).collect();
    if waved.is_empty() {
        entries.push(hosts.to_vec());
    } else {
        let mut rest: Vec<String> = hosts.to_vec();
        for w in waved {
            rest.retain(|h| !w.contains(h));
            entries.push(w.clone());
        }
        if !rest.is_empty() {
            entries.push(rest);
        }
    }
    entries.push(hosts.to_vec());
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("web-{i}")).collect()
    }

    #[test]
    fn the_plan_stands_up_switches_per_wave_and_scales_down() {
        let all = hosts(4);
        let one = plan(&all, &[]);
        assert_eq!(one, vec![all.clone(), all.clone(), all.clone()]);
        let eu = vec!["web-0".to_string(), "web-1".to_string()];
        let waved = plan(&all, &[eu.clone(), vec![]]);
        assert_eq!(
            waved,
            vec![
                all.clone(),
                eu,
                vec!["web-2".to_string(), "web-3".to_string()],
                all.clone()
            ],
            "hosts in no wave switch last"
        );
        assert!(plan(&[], &[]).is_empty());
        let bg = BlueGreenStage::new(Color::Blue, 2);
        let steps: Vec<Step> = (0..4).map(|b| bg.step(b)).collect();
        assert_eq!(
            steps,
            [
                Step::StandUp,
                Step::Switch(0),
                Step::Switch(1),
                Step::ScaleDown
            ]
        );
    }

    #[test]
    fn the_intended_traffic_follows_the_recorded_progress() {
        let mut bg = BlueGreenStage::new(Color::live(Slot::None), 1);
        assert_eq!((bg.from, bg.to), (Color::Blue, Color::Green));
        let before = [
            (Color::Blue, ServerState::Ready),
            (Color::Green, ServerState::Maint),
        ];
        assert_eq!(bg.intended("web-0"), before);
        bg.switched.push("web-0".into());
        assert_eq!(
            bg.intended("web-0"),
            [
                (Color::Green, ServerState::Ready),
                (Color::Blue, ServerState::Drain)
            ],
            "blue stays warm"
        );
        assert_eq!(bg.intended("web-1"), before, "a host not yet switched");
        bg.scaled_down = true;
        assert_eq!(bg.intended("web-0")[1], (Color::Blue, ServerState::Maint));
        bg.rolled_back();
        assert_eq!(bg.intended("web-0"), before);
        // The next deploy starts from green.
        let next = BlueGreenStage::new(Color::live(Slot::Green), 1);
        assert_eq!((next.from, next.to), (Color::Green, Color::Blue));
        assert_eq!(server_name("web-0", Color::Green), "web-0-green");
    }
}
