//! Blue-green fleets for tests: sample-service agents with two slots per
//! host (`--slot-ports`) behind a real haproxy whose backend "web"
//! (frontend 0) and "web-preview" (frontend 1) hold a `<host>-blue` and a
//! `<host>-green` server per host.
//!
//! ```ignore
//! let bg = BlueGreenFleet::start(2).await;
//! bg.apply("scale_down_delay_ms = 500", 20_000);
//! let (out, seen) = bg.under_load(async { /* deploy */ }).await;
//! ```

use std::time::Duration;

use drover_common::proto::{AuditEvent, AuditKind, ListEnvironmentsRequest, Slot};

use crate::Coordinator;
use crate::free_service_port;
use crate::haproxy::{HaproxyLb, LoadSeen, steady_load};
use crate::sample_fleet::SampleFleet;

/// The slot the first stage of `pipeline` serves from (its environment).
pub async fn live_slot(coord: &Coordinator, pipeline: &str) -> Slot {
    let envs = coord
        .deployer()
        .await
        .list_environments(ListEnvironmentsRequest {
            pipeline: pipeline.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .environments;
    envs[0].live_slot()
}

/// Every traffic switch the audit holds for `service`, oldest first.
pub async fn traffic_switches(coord: &Coordinator, service: &str) -> Vec<AuditEvent> {
    let events = coord.audit(service).await;
    events
        .into_iter()
        .filter(|e| e.event() == AuditKind::TrafficSwitched)
        .collect()
}

/// Hosts whose two slots sit behind one haproxy.
pub struct BlueGreenFleet {
    pub f: SampleFleet,
    pub lb: HaproxyLb,
    /// Per host, its (blue, green) ports.
    pub slots: Vec<(u16, u16)>,
}

impl BlueGreenFleet {
    /// `n` agents (`web-0`..) with slot ports for the sample service, and
    /// haproxy with backends "web" (frontend 0) and "web-preview"
    /// (frontend 1) of every slot.
    pub async fn start(n: usize) -> BlueGreenFleet {
        Self::start_configured(n, &[]).await
    }

    /// [`BlueGreenFleet::start`], the pipeline applied with `settings`,
    /// and v1 deployed through it (a first deploy: into green).
    pub async fn on_v1(n: usize, settings: &str, stuck_ms: u32) -> BlueGreenFleet {
        let bg = Self::start(n).await;
        bg.apply(settings, stuck_ms);
        let v1 = bg.f.push("v1", &[]);
        let (code, out, err) = tokio::task::block_in_place(|| bg.f.deploy_through("hello-bg", &v1));
        assert_eq!(code, 0, "v1: {out}\n{err}");
        bg
    }

    /// Like [`BlueGreenFleet::start`], the coordinator started with
    /// `coordinator` flags too (a `--config` declaring routers).
    pub async fn start_configured(n: usize, coordinator: &[&str]) -> BlueGreenFleet {
        let slots: Vec<(u16, u16)> = (0..n)
            .map(|_| (free_service_port(), free_service_port()))
            .collect();
        let flags = slots.clone();
        let extra = move |i: usize| {
            let (blue, green) = flags[i];
            vec!["--slot-ports".into(), format!("hello={blue},{green}")]
        };
        let f = SampleFleet::start_configured(n, 0, extra, coordinator).await;
        let names: Vec<(String, u16)> = f
            .ports
            .iter()
            .zip(&slots)
            .flat_map(|((h, _), (blue, green))| {
                [(format!("{h}-blue"), *blue), (format!("{h}-green"), *green)]
            })
            .collect();
        let servers: Vec<(&str, u16, u32)> =
            names.iter().map(|(n, p)| (n.as_str(), *p, 100)).collect();
        let lb = HaproxyLb::start_backends(&f.dir, &[("web", &servers), ("web-preview", &servers)])
            .await;
        BlueGreenFleet { f, lb, slots }
    }

    /// Applies the blue-green pipeline with `settings` in its blue_green
    /// table, through this fleet's haproxy (preview backend "web-preview").
    pub fn apply(&self, settings: &str, stuck_ms: u32) {
        let router = format!(
            "{{ haproxy = \"unix:{}\", backend = \"web\" }}",
            self.lb.socket.display()
        );
        let settings = format!("preview_backend = \"web-preview\", {settings}");
        self.apply_through(&router, &settings, stuck_ms);
    }

    /// Applies the blue-green pipeline through `router` (a TOML table).
    pub fn apply_through(&self, router: &str, settings: &str, stuck_ms: u32) {
        self.f.apply(&format!(
            "name = \"hello-bg\"\nservice = \"hello\"\n\n[[stages]]\nname = \"prod\"\n\
             selector = \"env=prod\"\nbatch_size = 1\nstuck_timeout_ms = {stuck_ms}\n\
             strategy = \"STRATEGY_BLUE_GREEN\"\n\
             gate = {{ samples = 2, bad_samples = 1, inconclusive = \"INCONCLUSIVE_POLICY_PASS\" }}\n\
             router = {router}\n\
             blue_green = {{ {settings} }}\n"
        ));
    }

    /// Who answers `n` requests through frontend `fe` (0 main, 1 preview).
    pub async fn answers(&self, fe: usize, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..n {
            let r = crate::http_get_status(self.lb.frontends[fe], "/version").await;
            out.push(match r {
                Ok((200, body)) => body.trim().to_string(),
                other => format!("{other:?}"),
            });
        }
        out.sort();
        out.dedup();
        out
    }

    /// How many times host `i`'s `slot` started `version`.
    pub fn slot_starts(&self, i: usize, slot: &str, version: &str) -> usize {
        let log = self.f.dir.path().join(format!(
            "agent-web-{i}/services/hello/slots/{slot}/logs/service.log"
        ));
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches(&format!("drover-sample {version} listening"))
            .count()
    }

    /// Whether anything answers on host `i`'s `blue` (or green) port.
    pub async fn slot_answers(&self, i: usize, blue: bool) -> bool {
        let port = if blue {
            self.slots[i].0
        } else {
            self.slots[i].1
        };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        crate::http_get_status(addr, "/healthz").await.is_ok()
    }

    /// The slot the pipeline's environment serves from.
    pub async fn live_slot(&self) -> Slot {
        live_slot(&self.f.coord, "hello-bg").await
    }

    /// Runs `during` under steady load through the main frontend.
    pub async fn under_load<F: std::future::Future<Output = T>, T>(
        &self,
        during: F,
    ) -> (T, LoadSeen) {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let load = tokio::spawn(steady_load(self.lb.frontend, "/version", stop_rx));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let out = during.await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = stop_tx.send(true);
        (out, load.await.unwrap())
    }
}
