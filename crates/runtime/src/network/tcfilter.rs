//! Kata's "tcfilter" internetworking model over rtnetlink: an ingress qdisc on both the pod interface and its
//! tap, and on each a u32 match-all filter whose `mirred egress redirect` action hands every frame to the other.
//! The same as
//! `tc qdisc add dev eth0 ingress; tc filter add dev eth0 parent ffff: protocol all pref 49153 u32 match u8 0 0
//! action mirred egress redirect dev tap0_kata` (and the reverse), without shelling out to `tc`.

use futures::TryStreamExt;
use nix::libc;
use rtnetlink::packet_core::{NetlinkMessage, NLM_F_ACK, NLM_F_REQUEST};
use rtnetlink::packet_route::tc::{TcHandle, TcMessage};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::Handle;

/// The priority ("pref") of our redirect filters: teardown removes filters of this priority and nothing else.
/// Kernel-chosen priorities count down from 49152, so this one does not collide with filters added without one.
pub const REDIRECT_FILTER_PRIORITY: u16 = 49153;

const INGRESS_PARENT: u32 = 0xffff_0000;

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// Adds the ingress qdisc to `ifindex` unless it has one.
pub(crate) async fn ensure_ingress_qdisc(handle: &Handle, ifindex: u32) -> Result<(), rtnetlink::Error> {
    match handle.qdisc().add(ifindex as i32).ingress().execute().await {
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// Redirects every frame arriving on `from` to the egress of `to`.
pub(crate) async fn add_redirect(handle: &Handle, from: u32, to: u32) -> Result<(), rtnetlink::Error> {
    handle
        .traffic_filter(from as i32)
        .add()
        .parent(INGRESS_PARENT)
        .priority(REDIRECT_FILTER_PRIORITY)
        // tcm_info carries the protocol in network byte order.
        .protocol((libc::ETH_P_ALL as u16).to_be())
        .redirect(to)?
        .execute()
        .await
}

/// The ingress filters of `ifindex` (one message per filter element); empty when it has no ingress qdisc.
pub(crate) async fn ingress_filters(handle: &Handle, ifindex: u32) -> Result<Vec<TcMessage>, rtnetlink::Error> {
    let dump = handle.traffic_filter(ifindex as i32).get().ingress().execute().try_collect::<Vec<_>>().await;
    match dump {
        Err(e) if matches!(errno(&e), Some(libc::EINVAL | libc::ENOENT)) => Ok(Vec::new()),
        other => other,
    }
}

/// Deletes our redirect filter from the ingress of `ifindex`; `Ok(false)` when there was none.
pub(crate) async fn remove_redirect(handle: &Handle, ifindex: u32) -> Result<bool, rtnetlink::Error> {
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.parent = TcHandle::from(INGRESS_PARENT);
    msg.header.info = u32::from(REDIRECT_FILTER_PRIORITY) << 16 | u32::from((libc::ETH_P_ALL as u16).to_be());
    match request(handle, RouteNetlinkMessage::DelTrafficFilter(msg)).await {
        Ok(()) => Ok(true),
        Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Deletes the ingress qdisc of `ifindex` (and with it any filter left on it); fine when there is none.
pub(crate) async fn remove_ingress_qdisc(handle: &Handle, ifindex: u32) -> Result<(), rtnetlink::Error> {
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.parent = TcHandle::INGRESS;
    msg.header.handle = TcHandle::from(INGRESS_PARENT);
    match request(handle, RouteNetlinkMessage::DelQueueDiscipline(msg)).await {
        Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)) => Ok(()),
        other => other,
    }
}

async fn request(handle: &Handle, msg: RouteNetlinkMessage) -> Result<(), rtnetlink::Error> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut responses = handle.clone().request(req)?;
    while let Some(reply) = futures::StreamExt::next(&mut responses).await {
        if let rtnetlink::packet_core::NetlinkPayload::Error(e) = reply.payload {
            if e.code.is_some() {
                return Err(rtnetlink::Error::NetlinkError(e));
            }
        }
    }
    Ok(())
}
