//! Publishing task events to containerd.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::ttrpc::context;

/// Events waiting to be published; beyond this many, new ones are dropped (and counted in the log).
const QUEUE: usize = 1024;
/// How long one publish may take before it is given up, so a stuck containerd cannot hold the queue.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// A topic and its event.
pub type Event = (&'static str, Box<dyn MessageDyn>);

#[derive(Clone)]
pub struct Events {
    queue: tokio::sync::mpsc::Sender<Event>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").field("dropped", &self.dropped).finish_non_exhaustive()
    }
}

impl Events {
    /// Starts the task that publishes queued events in order, each within [`PUBLISH_TIMEOUT`].
    pub fn new(publisher: RemotePublisher, namespace: String) -> Self {
        let (events, mut rx) = Self::channel();
        tokio::spawn(async move {
            while let Some((topic, event)) = rx.recv().await {
                let sent = publisher.publish(context::Context::default(), topic, &namespace, event);
                match tokio::time::timeout(PUBLISH_TIMEOUT, sent).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(topic, error = %e, "cannot publish an event"),
                    Err(_) => tracing::warn!(topic, "containerd did not take an event within {PUBLISH_TIMEOUT:?}"),
                }
            }
        });
        events
    }

    /// The queue and its receiving end, for whoever publishes (containerd's publisher, or a test).
    pub fn channel() -> (Self, tokio::sync::mpsc::Receiver<Event>) {
        let (queue, rx) = tokio::sync::mpsc::channel::<Event>(QUEUE);
        (Events { queue, dropped: Arc::default() }, rx)
    }

    /// Queues an event: it must never block or fail a task request, and the queue is bounded.
    pub fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        if self.queue.try_send((topic, event)).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(topic, dropped, "event queue full ({QUEUE}): event dropped");
            }
        }
    }
}

pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    ts.nanos = i32::try_from(d.subsec_nanos()).unwrap_or(0);
    ts
}
