//! What runs on a host: a service's one process, or one of its two
//! blue-green slots.
//!
//! A rolling deploy restarts a service in place. Blue-green on the same
//! host runs two processes of the service side by side, each in a *slot*
//! with its own port (`--slot-ports web=8081,8082`: blue listens on 8081,
//! green on 8082), so the new release starts and gets ready while the old
//! one keeps serving, and the load balancer moves traffic between them.
//!
//! Everything the agent keeps per process (the runtime's supervision, the
//! health board, the journal's record) is keyed by [`Unit::key`]: the
//! service's name, or `service@slot`. `@` is not allowed in service names,
//! so a slot's key never collides with a service. Releases stay per
//! service: both slots run releases from the same `releases/` directory.

use std::collections::BTreeMap;
use std::fmt;

use drover_common::proto::Slot;

/// A service's process on this host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Unit {
    pub service: String,
    pub slot: Slot,
}

impl Unit {
    /// The service's one process (rolling deploys).
    pub fn plain(service: &str) -> Unit {
        Unit {
            service: service.to_string(),
            slot: Slot::None,
        }
    }

    pub fn new(service: &str, slot: Slot) -> Unit {
        Unit {
            service: service.to_string(),
            slot,
        }
    }

    /// The key of everything kept per process: `web` or `web@blue`.
    pub fn key(&self) -> String {
        match slot_name(self.slot) {
            None => self.service.clone(),
            Some(slot) => format!("{}@{slot}", self.service),
        }
    }

    /// The unit a [`Unit::key`] names (journal keys are written by `key`).
    pub fn from_key(key: &str) -> Unit {
        match key.split_once('@') {
            Some((service, "blue")) => Unit::new(service, Slot::Blue),
            Some((service, "green")) => Unit::new(service, Slot::Green),
            _ => Unit::plain(key),
        }
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// `blue` / `green`; `None` for the plain process.
pub fn slot_name(slot: Slot) -> Option<&'static str> {
    match slot {
        Slot::None => None,
        Slot::Blue => Some("blue"),
        Slot::Green => Some("green"),
    }
}

/// The ports of each service's two slots on this host (`--slot-ports`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotPorts(pub BTreeMap<String, (u16, u16)>);

impl SlotPorts {
    /// The port `unit` listens on (its `${PORT}`), if it is a slot.
    /// Errors name the flag to set.
    pub fn port(&self, unit: &Unit) -> Result<Option<u16>, String> {
        if unit.slot == Slot::None {
            return Ok(None);
        }
        let Some(&(blue, green)) = self.0.get(&unit.service) else {
            return Err(format!(
                "{} has no slot ports on this host; start the agent with --slot-ports {}=BLUE_PORT,GREEN_PORT",
                unit.service, unit.service
            ));
        };
        Ok(Some(if unit.slot == Slot::Blue { blue } else { green }))
    }
}

/// Parses one `--slot-ports` value: `SERVICE=BLUE_PORT,GREEN_PORT`.
pub fn parse_slot_ports(s: &str) -> Result<(String, (u16, u16)), String> {
    let usage = "expected SERVICE=BLUE_PORT,GREEN_PORT (web=8081,8082)";
    let (service, ports) = s.split_once('=').ok_or(usage)?;
    drover_common::ids::validate_service(service)?;
    let (blue, green) = ports.split_once(',').ok_or(usage)?;
    let port = |p: &str| -> Result<u16, String> {
        match p.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("{p:?} is not a port (1-65535); {usage}")),
            Ok(p) => Ok(p),
        }
    };
    let (blue, green) = (port(blue)?, port(green)?);
    if blue == green {
        return Err(format!(
            "blue and green of {service} need two different ports, both are {blue}"
        ));
    }
    Ok((service.to_string(), (blue, green)))
}

/// Whether something on this host already listens on `port` (any
/// address): a slot's process could not bind it.
pub fn port_in_use(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_err()
        || std::net::TcpListener::bind(("127.0.0.1", port)).is_err()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_never_collide_with_services() {
        for unit in [
            Unit::plain("web"),
            Unit::new("web", Slot::Blue),
            Unit::new("web", Slot::Green),
        ] {
            assert_eq!(Unit::from_key(&unit.key()), unit);
        }
        assert_eq!(Unit::new("web", Slot::Green).key(), "web@green");
        assert!(drover_common::ids::validate_service("web@green").is_err());
    }

    #[test]
    fn slot_ports_parse_and_name_the_flag_when_missing() {
        assert_eq!(
            parse_slot_ports("web=8081,8082").unwrap(),
            ("web".to_string(), (8081, 8082))
        );
        for bad in [
            "web",
            "web=8081",
            "web=0,1",
            "web=8081,8081",
            "Web=1,2",
            "web=a,2",
        ] {
            assert!(parse_slot_ports(bad).is_err(), "{bad}");
        }
        let ports = SlotPorts([("web".to_string(), (8081, 8082))].into());
        assert_eq!(ports.port(&Unit::new("web", Slot::Green)), Ok(Some(8082)));
        assert_eq!(ports.port(&Unit::plain("web")), Ok(None));
        let err = ports.port(&Unit::new("api", Slot::Blue)).unwrap_err();
        assert!(err.contains("--slot-ports api="), "{err}");
    }

    #[test]
    fn a_listening_port_is_in_use() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(port_in_use(l.local_addr().unwrap().port()));
    }
}
