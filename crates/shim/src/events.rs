//! Publishing task events to containerd.

use std::sync::Arc;
use std::time::SystemTime;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::ttrpc::context;

#[derive(Clone)]
pub struct Events {
    publisher: Arc<RemotePublisher>,
    namespace: String,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").field("namespace", &self.namespace).finish_non_exhaustive()
    }
}

impl Events {
    pub fn new(publisher: RemotePublisher, namespace: String) -> Self {
        Events { publisher: Arc::new(publisher), namespace }
    }

    /// Publishes in the background: an event must never block or fail a task request.
    pub fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.publisher.publish(context::Context::default(), topic, &this.namespace, event).await {
                log::warn!("publish {topic}: {e}");
            }
        });
    }
}

pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    ts.nanos = i32::try_from(d.subsec_nanos()).unwrap_or(0);
    ts
}
