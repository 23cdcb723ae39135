//! The wall clock deploys read (record times, approval deadlines), behind a
//! trait so the driver's tests run on a clock they control. Waiting is done
//! with `tokio::time`, which those tests pause and advance.

/// Milliseconds since the Unix epoch.
pub trait Clock: Send + Sync {
    fn now_unix_ms(&self) -> u64;
}

/// The system's clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> u64 {
        drover_common::time::now_unix_ms()
    }
}

/// A clock that follows tokio's (paused) time from a fixed start: what the
/// driver's tests use, so wall time and sleeps advance together.
#[cfg(test)]
pub struct TokioClock {
    start_unix_ms: u64,
    start: tokio::time::Instant,
}

#[cfg(test)]
impl TokioClock {
    pub fn new(start_unix_ms: u64) -> TokioClock {
        TokioClock {
            start_unix_ms,
            start: tokio::time::Instant::now(),
        }
    }
}

#[cfg(test)]
impl Clock for TokioClock {
    fn now_unix_ms(&self) -> u64 {
        self.start_unix_ms + self.start.elapsed().as_millis() as u64
    }
}
