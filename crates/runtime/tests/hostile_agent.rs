//! A hostile agent (docs/security.md): the guest is untrusted, so the host's agent client must survive an
//! agent that never answers, claims a gigantic message, or sends garbage. The fake agent speaks ttrpc's wire
//! format by hand over a socket pair: it answers Check like a real agent, then misbehaves.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use protocols::agent as pb;
use protocols::ttrpc;
use protocols::ttrpc::proto::{Codec, GenMessage, MessageHeader, Request, Response, MESSAGE_TYPE_RESPONSE};
use runtime::agent::{AgentClient, AgentDialer, DialError, Timeouts};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::Mutex;

#[derive(Debug, Clone, Copy)]
enum Misbehaviour {
    /// Reads every request, answers none but Check.
    Silent,
    /// Answers with a header claiming a 1 GiB message, then nothing.
    Oversized,
    /// Answers with a frame whose payload is not a ttrpc Response.
    Garbage,
}

/// Hands the client one end of a socket pair whose other end is served by the fake agent.
#[derive(Debug)]
struct FakeDialer {
    misbehaviour: Misbehaviour,
    served: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

#[async_trait]
impl AgentDialer for FakeDialer {
    async fn dial(&self) -> Result<ttrpc::r#async::transport::Socket, DialError> {
        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        self.served.lock().await.push(tokio::spawn(fake_agent(theirs, self.misbehaviour)));
        Ok(ttrpc::r#async::transport::Socket::from(ours))
    }
}

async fn fake_agent(mut sock: UnixStream, misbehaviour: Misbehaviour) {
    while let Ok(msg) = GenMessage::read_from(&mut sock).await {
        let Ok(req) = Request::decode(&msg.payload) else { return };
        let stream_id = msg.header.stream_id;
        if req.method == "Check" {
            let version = pb::Version { agent_version: "fake".into(), protocol_version: 1, ..Default::default() };
            let payload = protobuf::Message::write_to_bytes(&version).expect("encode version");
            let response = Response { payload, ..Default::default() };
            let body = response.encode().expect("encode response");
            let reply = GenMessage {
                header: MessageHeader { length: body.len() as u32, stream_id, type_: MESSAGE_TYPE_RESPONSE, flags: 0 },
                payload: body,
            };
            if reply.write_to(&mut sock).await.is_err() {
                return;
            }
            continue;
        }
        match misbehaviour {
            Misbehaviour::Silent => {}
            Misbehaviour::Oversized => {
                let header = MessageHeader { length: 1 << 30, stream_id, type_: MESSAGE_TYPE_RESPONSE, flags: 0 };
                let _ = header.write_to(&mut sock).await;
            }
            Misbehaviour::Garbage => {
                let junk = vec![0xffu8; 64];
                let header =
                    MessageHeader { length: junk.len() as u32, stream_id, type_: MESSAGE_TYPE_RESPONSE, flags: 0 };
                let _ = header.write_to(&mut sock).await;
                let _ = sock.write_all(&junk).await;
            }
        }
    }
}

const SHORT: Timeouts = Timeouts { call: Duration::from_millis(500), container: Duration::from_millis(500) };

async fn connect(misbehaviour: Misbehaviour) -> AgentClient {
    let dialer = Arc::new(FakeDialer { misbehaviour, served: Mutex::default() });
    AgentClient::connect_with(dialer, Duration::from_secs(5))
        .await
        .expect("the fake agent answers Check")
        .with_timeouts(SHORT)
}

/// Every short call of the client, against an agent that misbehaves on each: all must end, with an error,
/// within the call timeout (plus scheduling slack), and the client must stay usable.
async fn every_call_fails_in_time(misbehaviour: Misbehaviour) {
    let agent = connect(misbehaviour).await;
    let started = Instant::now();
    let results = [
        agent.stats("c1").await.map(drop),
        agent.list_processes("c1").await.map(drop),
        agent.pause_container("c1").await,
        agent.start_container("c1").await,
        agent.remove_container("c1").await,
    ];
    for (i, result) in results.iter().enumerate() {
        assert!(result.is_err(), "{misbehaviour:?}: call {i} succeeded against a misbehaving agent");
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{misbehaviour:?}: the calls hung for {:?}",
        started.elapsed()
    );
    agent.check().await.map(drop).unwrap_or_else(|e| eprintln!("{misbehaviour:?}: after the attack Check says {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_cannot_hang_the_host() {
    every_call_fails_in_time(Misbehaviour::Silent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_claiming_a_gigantic_message_is_refused() {
    every_call_fails_in_time(Misbehaviour::Oversized).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_the_agent_is_an_error() {
    every_call_fails_in_time(Misbehaviour::Garbage).await;
}
