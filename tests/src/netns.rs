//! A network of hosts on one machine (`scripts/bench distribute`): a
//! network namespace per host, each joined to one bridge by a veth pair,
//! its egress optionally capped by tc's token bucket filter, so what
//! crosses the "network" is limited and counted like a real link's (the
//! kernel's own interface counters). Needs root; everything it made is
//! removed when dropped.
//!
//! ```ignore
//! let mut lab = Lab::new("drvb");
//! let origin = lab.host("origin", Some(400)); // 400 Mbit/s out
//! // run processes with `lab.exec(&origin)` + the program and its args
//! ```

use std::net::Ipv4Addr;
use std::process::Command;

/// One host of the lab.
#[derive(Debug, Clone)]
pub struct Host {
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The host's end of its veth pair, inside its namespace.
    pub dev: String,
}

pub struct Lab {
    prefix: String,
    bridge: String,
    hosts: Vec<Host>,
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed (network namespaces need root and iproute2): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lab {
    /// A bridge `<prefix>-br` (10.213.255.254/16, reachable from this
    /// namespace) and no hosts yet.
    pub fn new(prefix: &str) -> Lab {
        let bridge = format!("{prefix}-br");
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        run(&["ip", "link", "add", &bridge, "type", "bridge"]);
        run(&["ip", "addr", "add", "10.213.255.254/16", "dev", &bridge]);
        run(&["ip", "link", "set", &bridge, "up"]);
        Lab {
            prefix: prefix.to_string(),
            bridge,
            hosts: Vec::new(),
        }
    }

    /// A new host at 10.213.<n / 250>.<n % 250 + 1>, its egress capped at
    /// `mbit` Mbit/s when given.
    pub fn host(&mut self, name: &str, mbit: Option<u32>) -> Host {
        let n = self.hosts.len();
        let ip = Ipv4Addr::new(10, 213, (n / 250) as u8, (n % 250 + 1) as u8);
        let netns = format!("{}-{name}", self.prefix);
        let outside = format!("{}o{n}", self.prefix);
        let dev = format!("{}i{n}", self.prefix);
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        run(&["ip", "netns", "add", &netns]);
        run(&[
            "ip", "link", "add", &outside, "type", "veth", "peer", "name", &dev,
        ]);
        run(&["ip", "link", "set", &outside, "master", &self.bridge]);
        run(&["ip", "link", "set", &outside, "up"]);
        run(&["ip", "link", "set", &dev, "netns", &netns]);
        let cidr = format!("{ip}/16");
        run(&["ip", "-n", &netns, "addr", "add", &cidr, "dev", &dev]);
        run(&["ip", "-n", &netns, "link", "set", &dev, "up"]);
        run(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        if let Some(mbit) = mbit {
            let rate = format!("{mbit}mbit");
            run(&[
                "ip", "netns", "exec", &netns, "tc", "qdisc", "add", "dev", &dev, "root", "tbf",
                "rate", &rate, "burst", "256kb", "latency", "100ms",
            ]);
        }
        let host = Host { netns, ip, dev };
        self.hosts.push(host.clone());
        host
    }

    /// A command that runs `program` inside `host`'s namespace.
    pub fn command(host: &Host, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &host.netns]).arg(program);
        cmd
    }

    /// Bytes `host` has sent (`tx`) or received, by its interface's counter.
    pub fn bytes(host: &Host, tx: bool) -> u64 {
        let which = if tx { "tx_bytes" } else { "rx_bytes" };
        let out = Command::new("ip")
            .args(["netns", "exec", &host.netns, "cat"])
            .arg(format!("/sys/class/net/{}/statistics/{which}", host.dev))
            .output()
            .expect("reading an interface counter");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.netns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}
