//! What the host makes of a hostile agent's answers: protobuf decoding of every response and stream message of
//! `kata.agent.v1.Agent`, then `runtime::agent::convert` to host types.
//!
//! The first byte picks the message type (its low 4 bits) and the framing (bit 4):
//! - unframed: the rest is one payload, merged into a default message as ttrpc's unary client does;
//! - framed: the rest is a byte stream of ttrpc frames, read with ttrpc's own frame reader; RESPONSE frames are
//!   unwrapped from `ttrpc.Response` (status or payload), DATA frames are stream messages.
//!
//! Run it with a low `-malloc_limit_mb` (see README.md): an input of a few KiB must never make the host allocate
//! much more than the 4 MiB ttrpc allows for one frame.

#![no_main]

use libfuzzer_sys::fuzz_target;
use protobuf::Message;
use protocols::agent as pb;
use protocols::ttrpc;
use runtime::agent::convert;
use ttrpc::proto::{GenMessage, GenMessageError, MESSAGE_TYPE_DATA, MESSAGE_TYPE_RESPONSE};

/// Frames read from one input at most; each is at most 4 MiB (ttrpc's limit), so this bounds the work.
const MAX_FRAMES: usize = 64;

fn decode<M: Message>(payload: &[u8]) -> Option<M> {
    let mut m = M::new();
    m.merge_from_bytes(payload).ok()?;
    Some(m)
}

/// Decodes `payload` as the response type `kind` names and converts it as the client does.
fn response(kind: u8, payload: &[u8]) {
    match kind % 10 {
        0 => {
            if let Some(v) = decode::<pb::Version>(payload) {
                let _ = convert::version(v);
            }
        }
        1 => {
            if let Some(d) = decode::<pb::GuestDetails>(payload) {
                let _ = convert::guest_details(d);
            }
        }
        2 => {
            if let Some(list) = decode::<pb::ProcessList>(payload) {
                let _ = list.pids;
            }
        }
        3 => {
            if let Some(s) = decode::<pb::ContainerStats>(payload) {
                let (mem_limit, pids_limit) = (s.memory.limit, s.pids.limit);
                let stats = convert::stats(s);
                assert_eq!(stats.memory.limit.unwrap_or(0), mem_limit);
                assert_eq!(stats.pids.limit.unwrap_or(0), pids_limit);
            }
        }
        4 => {
            if let Some(e) = decode::<pb::ProcessExit>(payload) {
                let _ = convert::process_exit(e);
            }
        }
        5 => {
            if let Some(chunk) = decode::<pb::OutputChunk>(payload) {
                let _ = chunk.data;
            }
        }
        6 => {
            if let Some(i) = decode::<pb::Interface>(payload) {
                let count = i.addresses.len();
                match convert::interface(i) {
                    Ok(iface) => assert_eq!(iface.addresses.len(), count),
                    Err(e) => {
                        let _ = e.to_string();
                    }
                }
            }
        }
        7 => {
            if let Some(oom) = decode::<pb::OomEvent>(payload) {
                let _ = oom.container_id;
            }
        }
        8 => {
            let _ = decode::<pb::Empty>(payload);
        }
        _ => {
            // The client decodes the status of every answer, whatever the call.
            if let Some(r) = decode::<ttrpc::Response>(payload) {
                let _ = r.status.message.len();
            }
        }
    }
}

/// Reads ttrpc frames from `stream` as the client's connection does, and decodes what they carry.
fn frames(kind: u8, mut stream: &[u8]) {
    futures::executor::block_on(async {
        for _ in 0..MAX_FRAMES {
            let msg = match GenMessage::read_from(&mut stream).await {
                Ok(msg) => msg,
                // Oversized: ttrpc skipped its body and answers the peer; the stream goes on.
                Err(GenMessageError::ReturnError(_, e)) => {
                    let _ = e.to_string();
                    continue;
                }
                Err(GenMessageError::InternalError(_)) => return,
            };
            assert!(msg.payload.len() <= ttrpc::proto::MESSAGE_LENGTH_MAX);
            match msg.header.type_ {
                MESSAGE_TYPE_RESPONSE => {
                    if let Some(r) = decode::<ttrpc::Response>(&msg.payload) {
                        if r.status.is_some() && r.status.code.value() != 0 {
                            let _ = r.status.message.len();
                        } else {
                            response(kind, &r.payload);
                        }
                    }
                }
                // The server streams: ReadStdout/ReadStderr and OomEvents.
                MESSAGE_TYPE_DATA => response(if msg.header.stream_id % 2 == 0 { 5 } else { 7 }, &msg.payload),
                _ => {}
            }
        }
    });
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let kind = selector & 0x0f;
    if selector & 0x10 == 0 {
        response(kind, rest);
    } else {
        frames(kind, rest);
    }
});
