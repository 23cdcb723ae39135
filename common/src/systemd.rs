//! The systemd notify protocol (`Type=notify`, `WatchdogSec`, reloads),
//! spoken over `NOTIFY_SOCKET` with a plain datagram: no libsystemd.
//! Without `NOTIFY_SOCKET` (not under systemd) every call is a no-op.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Sends `state` (`READY=1`, `RELOADING=1`, `STOPPING=1`, `WATCHDOG=1`,
/// several separated by newlines) to systemd.
pub fn notify(state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name)?,
        None => SocketAddr::from_pathname(std::path::Path::new(&path))?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`, meant for this
/// process when `WATCHDOG_PID` is absent or ours).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog at half its interval until `stop`. The pings come
/// from the runtime's timer: a wedged runtime stops them and systemd
/// restarts the daemon.
pub fn spawn_watchdog(stop: CancellationToken) {
    let Some(interval) = watchdog_interval() else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval / 2);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    let _ = notify("WATCHDOG=1");
                }
            }
        }
    });
}

/// Runs `reload` on every SIGHUP until `stop`, telling systemd RELOADING
/// before and READY after (`ExecReload=kill -HUP $MAINPID`).
pub async fn on_sighup(stop: CancellationToken, reload: impl Fn()) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reloads need a restart");
        return;
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        let _ = notify("RELOADING=1");
        reload();
        let _ = notify("READY=1");
    }
}
