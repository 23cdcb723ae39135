//! A blue-green stage as pure data and decisions: its steps, its progress
//! in the deploy record, and the router state each host's two servers
//! should be in. No I/O here; `driver/blue_green.rs` does the effects.
//!
//! Every host runs the service in two slots (the agent's `--slot-ports`),
//! each behind its own server in the stage's router backend,
//! `<host>-blue` and `<host>-green`. One slot is *live* (its servers
//! ready); the deploy starts the new release in the other.
//!
//! A weighted canary (`STRATEGY_WEIGHTED_CANARY`) is the same stage with
//! a step per canary share before the switch: `to` takes that share of
//! the backend's traffic through server weights, judged by the canary
//! analysis (`to` against `from` on every host).
//!
//! ```text
//! plan entries:  [StandUp: all hosts] [Weight: 1%] … [Weight: 25%] (weighted canary only)
//!                [Switch: wave 1] … [Switch: wave n] [ScaleDown: all hosts]
//!
//! StandUp    start `to` on every host → preview backend: `to` ready →
//!            pre-promotion gate (`to` against `from`) → promotion
//!            (automatic, or a hold until promoted by hand / its timeout)
//! Weight     record the share, then weights: `to` servers share%, `from`
//!            servers the rest → bake, judged by the canary analysis
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

/// Blue-green across host groups (a replacement fleet): the stage's hosts
/// matching `green_selector` are the green group, the rest blue; each host
/// runs the service's one process and is its own router server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Groups {
    pub blue: Vec<String>,
    pub green: Vec<String>,
}

impl Groups {
    pub fn of(&self, color: Color) -> &[String] {
        match color {
            Color::Blue => &self.blue,
            Color::Green => &self.green,
        }
    }
}

/// What an entry of a blue-green stage's plan does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    StandUp,
    /// The `n`th share of a weighted canary (0-based).
    Weight(usize),
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
    /// A weighted canary's shares of the traffic (percent), in order, and
    /// the bake of each (ms); empty for plain blue-green.
    #[serde(default)]
    pub shares: Vec<u32>,
    #[serde(default)]
    pub bakes: Vec<u32>,
    /// The share of traffic `to` is meant to take now (0: none, or all
    /// once switched).
    #[serde(default)]
    pub share: u32,
    /// Each server's weight before the deploy changed any (read once, at
    /// the first weighted step): what a switch or rollback restores.
    #[serde(default)]
    pub weights: BTreeMap<String, u32>,
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
    /// Blue-green across host groups (None: two slots on every host).
    #[serde(default)]
    pub groups: Option<Groups>,
    /// Whether `from` runs the service at the start (false on a stage's
    /// first blue-green deploy over slots: nothing is behind its servers,
    /// so they stay in maintenance rather than take traffic).
    #[serde(default = "serving")]
    pub from_serving: bool,
}

fn serving() -> bool {
    true
}

impl BlueGreenStage {
    pub fn new(live: Color, switches: usize) -> BlueGreenStage {
        BlueGreenStage {
            from: live,
            to: live.other(),
            switches: switches.max(1),
            shares: Vec::new(),
            bakes: Vec::new(),
            share: 0,
            weights: BTreeMap::new(),
            started: BTreeMap::new(),
            restarts_before: BTreeMap::new(),
            switched: Vec::new(),
            switched_unix_ms: 0,
            promotion_asked_unix_ms: 0,
            scaled_down: false,
            groups: None,
            from_serving: true,
        }
    }

    /// The router server of `host`'s `color`: the host itself across
    /// groups, else its slot's server.
    pub fn server(&self, host: &str, color: Color) -> String {
        match self.groups {
            Some(_) => host.to_string(),
            None => server_name(host, color),
        }
    }

    /// The process `color` is on a host: its one process across groups,
    /// else the slot.
    pub fn slot(&self, color: Color) -> Slot {
        match self.groups {
            Some(_) => Slot::None,
            None => color.slot(),
        }
    }

    /// Whether `host` runs `color` (every host runs both slots; across
    /// groups, a host is of one color).
    pub fn runs(&self, host: &str, color: Color) -> bool {
        match &self.groups {
            Some(g) => g.of(color).iter().any(|h| h == host),
            None => true,
        }
    }

    /// Those of `hosts` that run `color`.
    pub fn running(&self, hosts: &[String], color: Color) -> Vec<String> {
        hosts
            .iter()
            .filter(|h| self.runs(h, color))
            .cloned()
            .collect()
    }

    /// The router servers of `hosts` (each host's one or two).
    pub fn servers_of(&self, hosts: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for h in hosts {
            for color in [Color::Blue, Color::Green] {
                let server = self.server(h, color);
                if self.runs(h, color) && !out.contains(&server) {
                    out.push(server);
                }
            }
        }
        out
    }

    /// The step plan entry `batch` is.
    pub fn step(&self, batch: usize) -> Step {
        let weighted = self.shares.len();
        match batch {
            0 => Step::StandUp,
            b if b <= weighted => Step::Weight(b - 1),
            b if b <= weighted + self.switches => Step::Switch(b - weighted - 1),
            _ => Step::ScaleDown,
        }
    }

    /// The state (and weight, when the deploy changes it) `host`'s two
    /// servers should be in, in the stage's main backend: the live one
    /// ready; the other drained while it is warm (an instant switch back),
    /// in maintenance when it is not running. During a weighted step both
    /// are ready, weighted by the share.
    pub fn intended(&self, host: &str) -> Vec<Intent> {
        let (from, to) = (self.server(host, self.from), self.server(host, self.to));
        let weight =
            |server: &str, percent: u32| self.weights.get(server).map(|w| scaled(*w, percent));
        let full = |server: &str| self.weights.get(server).copied();
        let both = if self.switched.iter().any(|h| h == host) {
            let old = if self.scaled_down || !self.from_serving {
                ServerState::Maint
            } else {
                ServerState::Drain
            };
            [
                Intent::new(self.to, to.clone(), ServerState::Ready, full(&to)),
                Intent::new(self.from, from.clone(), old, full(&from)),
            ]
        } else if self.share > 0 {
            let kept = weight(&from, 100 - self.share);
            [
                Intent::new(self.from, from.clone(), ServerState::Ready, kept),
                Intent::new(
                    self.to,
                    to.clone(),
                    ServerState::Ready,
                    weight(&to, self.share),
                ),
            ]
        } else {
            let live = if self.from_serving {
                ServerState::Ready
            } else {
                ServerState::Maint
            };
            [
                Intent::new(self.from, from.clone(), live, full(&from)),
                Intent::new(self.to, to.clone(), ServerState::Maint, full(&to)),
            ]
        };
        both.into_iter()
            .filter(|i| self.runs(host, i.color))
            .collect()
    }

    /// In the preview backend the new slot is the one that answers:
    /// `host`'s servers and their states.
    pub fn preview(&self, host: &str) -> Vec<(String, ServerState)> {
        [
            (self.to, ServerState::Ready),
            (self.from, ServerState::Maint),
        ]
        .into_iter()
        .filter(|(c, _)| self.runs(host, *c))
        .map(|(c, state)| (self.server(host, c), state))
        .collect()
    }

    /// Rolled back: every host's traffic is on `from` again, `to` stopped.
    pub fn rolled_back(&mut self) {
        self.switched.clear();
        self.scaled_down = false;
        self.share = 0;
    }

    /// The slot live once the stage passed.
    pub fn live_after(&self) -> Color {
        self.to
    }
}

/// What one of a host's servers should be: its slot's state, and its
/// weight when the deploy sets one (None: leave it as it is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    pub color: Color,
    pub server: String,
    pub state: ServerState,
    pub weight: Option<u32>,
}

impl Intent {
    fn new(color: Color, server: String, state: ServerState, weight: Option<u32>) -> Intent {
        Intent {
            color,
            server,
            state,
            weight,
        }
    }
}

/// `percent` of a server's `weight`, at least 1 so a share never starves
/// a ready server entirely (HAProxy weights are 0..=256).
pub fn scaled(weight: u32, percent: u32) -> u32 {
    let share = (u64::from(weight) * u64::from(percent)).div_ceil(100) as u32;
    share.clamp(1, crate::router::MAX_WEIGHT)
}

/// The plan of a blue-green stage over `hosts`: standing up on every host,
/// a step per weighted canary share (`shares`, on every host), one switch
/// per wave (`waves`: the hosts of each, in order; none: one switch of
/// all), scaling down on every host.
pub fn plan(hosts: &[String], shares: usize, waves: &[Vec<String>]) -> Vec<Vec<String>> {
    if hosts.is_empty() {
        return Vec::new();
    }
    let mut entries = vec![hosts.to_vec()];
    entries.extend((0..shares).map(|_| hosts.to_vec()));
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

/// The plan of a blue-green stage across host groups: standing up on the
/// idle group (the one not `live`), a step per weighted share and one
/// switch on every host, scaling down on the live group. Empty when the
/// idle group has no host.
pub fn plan_groups(groups: &Groups, live: Color, shares: usize) -> Vec<Vec<String>> {
    let (idle, old) = (groups.of(live.other()), groups.of(live));
    if idle.is_empty() {
        return Vec::new();
    }
    let all: Vec<String> = groups.blue.iter().chain(&groups.green).cloned().collect();
    let mut entries = vec![idle.to_vec()];
    entries.extend((0..shares).map(|_| all.clone()));
    entries.push(all);
    entries.push(old.to_vec());
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
        let one = plan(&all, 0, &[]);
        assert_eq!(one, vec![all.clone(), all.clone(), all.clone()]);
        let eu = vec!["web-0".to_string(), "web-1".to_string()];
        let waved = plan(&all, 0, &[eu.clone(), vec![]]);
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
        assert!(plan(&[], 0, &[]).is_empty());
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
        // A weighted canary: a step per share before the switch.
        assert_eq!(plan(&all, 3, &[]).len(), 6);
        let mut weighted = BlueGreenStage::new(Color::Blue, 1);
        weighted.shares = vec![1, 5, 25];
        let steps: Vec<Step> = (0..6).map(|b| weighted.step(b)).collect();
        assert_eq!(
            steps,
            [
                Step::StandUp,
                Step::Weight(0),
                Step::Weight(1),
                Step::Weight(2),
                Step::Switch(0),
                Step::ScaleDown
            ]
        );
    }

    /// (color, state, weight) of a host's two intents.
    fn of(i: Vec<Intent>) -> Vec<(Color, ServerState, Option<u32>)> {
        i.into_iter()
            .map(|i| (i.color, i.state, i.weight))
            .collect()
    }

    #[test]
    fn the_intended_traffic_follows_the_recorded_progress() {
        use ServerState::*;
        let mut bg = BlueGreenStage::new(Color::live(Slot::None), 1);
        assert_eq!((bg.from, bg.to), (Color::Blue, Color::Green));
        let before = [(Color::Blue, Ready, None), (Color::Green, Maint, None)];
        assert_eq!(of(bg.intended("web-0")), before);
        bg.switched.push("web-0".into());
        assert_eq!(
            of(bg.intended("web-0")),
            [(Color::Green, Ready, None), (Color::Blue, Drain, None)],
            "blue stays warm"
        );
        assert_eq!(of(bg.intended("web-1")), before, "a host not yet switched");
        bg.scaled_down = true;
        assert_eq!(of(bg.intended("web-0"))[1], (Color::Blue, Maint, None));
        bg.rolled_back();
        assert_eq!(of(bg.intended("web-0")), before);
        // A first deploy over slots: nothing behind blue's servers.
        let mut first = BlueGreenStage::new(Color::Blue, 1);
        first.from_serving = false;
        assert_eq!(
            of(first.intended("web-0")),
            [(Color::Blue, Maint, None), (Color::Green, Maint, None)]
        );
        first.switched.push("web-0".into());
        assert_eq!(
            of(first.intended("web-0")),
            [(Color::Green, Ready, None), (Color::Blue, Maint, None)]
        );
        // The next deploy starts from green.
        let next = BlueGreenStage::new(Color::live(Slot::Green), 1);
        assert_eq!((next.from, next.to), (Color::Green, Color::Blue));
        assert_eq!(server_name("web-0", Color::Green), "web-0-green");
    }

    #[test]
    fn across_host_groups_each_host_is_one_server_of_its_groups_color() {
        use ServerState::*;
        let groups = Groups {
            blue: vec!["b0".into(), "b1".into()],
            green: vec!["g0".into()],
        };
        // Blue live: green stands up, all switch, blue scales down.
        assert_eq!(
            plan_groups(&groups, Color::Blue, 1),
            vec![
                vec!["g0".to_string()],
                vec!["b0".to_string(), "b1".to_string(), "g0".to_string()],
                vec!["b0".to_string(), "b1".to_string(), "g0".to_string()],
                vec!["b0".to_string(), "b1".to_string()],
            ]
        );
        let mut bg = BlueGreenStage::new(Color::Blue, 1);
        bg.groups = Some(groups.clone());
        assert_eq!(
            (bg.server("g0", Color::Green), bg.slot(Color::Green)),
            ("g0".to_string(), Slot::None)
        );
        assert_eq!(of(bg.intended("b0")), [(Color::Blue, Ready, None)]);
        assert_eq!(of(bg.intended("g0")), [(Color::Green, Maint, None)]);
        assert_eq!(bg.preview("g0"), [("g0".to_string(), Ready)]);
        bg.switched = vec!["b0".into(), "b1".into(), "g0".into()];
        assert_eq!(of(bg.intended("b0")), [(Color::Blue, Drain, None)]);
        assert_eq!(of(bg.intended("g0")), [(Color::Green, Ready, None)]);
        assert_eq!(bg.servers_of(&["b0".into(), "g0".into()]), ["b0", "g0"]);
        assert_eq!(
            bg.running(&["b0".into(), "g0".into()], Color::Green),
            ["g0"]
        );
        // No idle host: nothing to deploy.
        let lonely = Groups {
            blue: vec!["b0".into()],
            green: Vec::new(),
        };
        assert!(plan_groups(&lonely, Color::Blue, 0).is_empty());
    }

    #[test]
    fn a_weighted_step_splits_by_the_share_and_a_switch_or_rollback_restores_the_weights() {
        use ServerState::*;
        let mut bg = BlueGreenStage::new(Color::Blue, 1);
        bg.shares = vec![1, 5, 25];
        bg.weights = [
            ("web-0-blue".to_string(), 100),
            ("web-0-green".to_string(), 100),
        ]
        .into();
        bg.share = 5;
        assert_eq!(
            of(bg.intended("web-0")),
            [
                (Color::Blue, Ready, Some(95)),
                (Color::Green, Ready, Some(5))
            ]
        );
        bg.share = 1;
        assert_eq!(of(bg.intended("web-0"))[1], (Color::Green, Ready, Some(1)));
        bg.switched.push("web-0".into());
        assert_eq!(
            of(bg.intended("web-0")),
            [
                (Color::Green, Ready, Some(100)),
                (Color::Blue, Drain, Some(100))
            ]
        );
        bg.rolled_back();
        assert_eq!(
            of(bg.intended("web-0")),
            [
                (Color::Blue, Ready, Some(100)),
                (Color::Green, Maint, Some(100))
            ],
            "0% at once, weights as they were"
        );
        assert_eq!(
            (scaled(100, 1), scaled(10, 1), scaled(256, 100)),
            (1, 1, 256)
        );
        assert_eq!(scaled(200, 25), 50);
    }
}
