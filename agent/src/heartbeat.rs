//! The heartbeat producer and the queue between it and the streams.
//!
//! The queue is a `tokio::sync::broadcast` channel: one producer, one
//! receiver per coordinator stream. The producer never waits; a stream that
//! falls more than `capacity` heartbeats behind loses the oldest ones and
//! learns how many (`Lagged(n)`), which it adds to its dropped counter. So a
//! slow coordinator costs the agent at most `capacity` heartbeats of memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use drover_common::proto::{Heartbeat, HostMetrics, ServiceHealth, ServiceVersion};
use drover_common::time::now_unix_micros;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

/// What goes into a heartbeat besides its sequence and timestamp.
pub trait HealthSource: Send + 'static {
    fn sample(&mut self) -> Sample;
}

/// One heartbeat's worth of figures.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub host: HostMetrics,
    pub health: Vec<ServiceHealth>,
    pub versions: Vec<ServiceVersion>,
    /// The host's disk and journal problems (see `disk`).
    pub problems: Vec<String>,
    /// Artifacts held by chunks (see `chunk_cache`).
    pub held_artifacts: Vec<String>,
}

impl<F> HealthSource for F
where
    F: FnMut() -> Sample + Send + 'static,
{
    fn sample(&mut self) -> Sample {
        self()
    }
}

/// Where streams subscribe to heartbeats. It holds the channel weakly: only
/// the producer keeps it open, so when the producer stops every heartbeat
/// stream ends, and an idle subscriber handle never counts as a slow reader.
#[derive(Clone)]
pub struct HeartbeatFeed {
    sender: broadcast::WeakSender<Heartbeat>,
}

impl HeartbeatFeed {
    /// A receiver of the heartbeats produced from now on; `None` once the
    /// producer has stopped.
    pub fn subscribe(&self) -> Option<broadcast::Receiver<Heartbeat>> {
        self.sender.upgrade().map(|tx| tx.subscribe())
    }
}

/// Starts producing a heartbeat every `interval`, the first after
/// `first_delay`, until `shutdown`. When the producer stops, the channel
/// closes and every heartbeat stream ends.
pub fn spawn_producer(
    interval: Duration,
    first_delay: Duration,
    capacity: usize,
    mut source: impl HealthSource,
    shutdown: CancellationToken,
) -> HeartbeatFeed {
    let (tx, _) = broadcast::channel(capacity);
    let feed = HeartbeatFeed {
        sender: tx.downgrade(),
    };
    tokio::spawn(async move {
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + first_delay, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sequence = 0u64;
        let mut queue_full = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            sequence += 1;
            let sample = source.sample();
            let hb = Heartbeat {
                sequence,
                sent_at_unix_micros: now_unix_micros(),
                host: Some(sample.host),
                services: sample.health,
                dropped_heartbeats: 0,
                versions: sample.versions,
                problems: sample.problems,
                held_artifacts: sample.held_artifacts,
            };
            // No receiver (no stream up right now) is fine: the heartbeat is
            // simply not needed.
            let _ = tx.send(hb);
            // `len` counts what the slowest stream has not read yet. A full
            // queue means the next heartbeat pushes out its oldest one.
            let full = tx.len() >= capacity;
            if full != queue_full {
                queue_full = full;
                if full {
                    tracing::warn!(
                        capacity,
                        "a coordinator is not reading heartbeats; dropping the oldest"
                    );
                } else {
                    tracing::info!("every coordinator is reading heartbeats again");
                }
            }
        }
    });
    feed
}

/// The heartbeats one stream sends: each carries the stream's running count
/// of dropped heartbeats, which `dropped` accumulates across reconnects.
pub fn stream_for(
    rx: broadcast::Receiver<Heartbeat>,
    dropped: Arc<AtomicU64>,
) -> impl Stream<Item = Heartbeat> + Send + 'static {
    BroadcastStream::new(rx).filter_map(move |item| match item {
        Ok(mut hb) => {
            hb.dropped_heartbeats = dropped.load(Ordering::Relaxed);
            Some(hb)
        }
        Err(BroadcastStreamRecvError::Lagged(n)) => {
            dropped.fetch_add(n, Ordering::Relaxed);
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> impl HealthSource {
        Sample::default
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_keeps_the_newest_and_counts_the_dropped() {
        let stop = CancellationToken::new();
        let rx = spawn_producer(
            Duration::from_millis(10),
            Duration::ZERO,
            4,
            source(),
            stop.clone(),
        )
        .subscribe()
        .unwrap();
        let dropped = Arc::new(AtomicU64::new(0));
        let mut stream = Box::pin(stream_for(rx, dropped.clone()));
        // Nobody reads for 100 ticks.
        tokio::time::sleep(Duration::from_millis(995)).await;
        stop.cancel();
        let got: Vec<Heartbeat> = stream.as_mut().collect().await;
        let seqs: Vec<u64> = got.iter().map(|h| h.sequence).collect();
        assert_eq!(seqs, vec![97, 98, 99, 100], "only the newest 4 remain");
        assert_eq!(dropped.load(Ordering::Relaxed), 96);
        assert!(got.iter().all(|h| h.dropped_heartbeats == 96));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_reader_drops_nothing() {
        let stop = CancellationToken::new();
        let rx = spawn_producer(
            Duration::from_millis(10),
            Duration::ZERO,
            4,
            source(),
            stop.clone(),
        )
        .subscribe()
        .unwrap();
        let dropped = Arc::new(AtomicU64::new(0));
        let mut stream = Box::pin(stream_for(rx, dropped.clone()));
        for expected in 1..=50 {
            let hb = stream.next().await.unwrap();
            assert_eq!(hb.sequence, expected);
        }
        assert_eq!(dropped.load(Ordering::Relaxed), 0);
    }
}
