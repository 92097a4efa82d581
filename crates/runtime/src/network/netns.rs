//! Runs work inside a network namespace on a dedicated OS thread: netlink work, or plain blocking work.
//!
//! `setns` changes the namespace of the calling thread only, and a tokio worker (or a `spawn_blocking` thread)
//! returns to a pool afterwards, so the work runs on a fresh thread that enters the namespace, opens its
//! netlink socket there (sockets and `/dev/net/tun` bind to the namespace of the thread that opens them),
//! drives a current-thread runtime to completion and exits.

use std::fs::File;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};

use futures::channel::oneshot;
use nix::sched::{setns, CloneFlags};

use super::NetworkError;

/// Opens the namespace file; `Ok(None)` when it does not exist (any more).
pub(crate) fn open_netns(path: &Path) -> Result<Option<File>, NetworkError> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(NetworkError::Netns { path: path.to_owned(), source }),
    }
}

/// Runs `work` with a netlink handle connected inside the namespace `netns` (an open namespace file).
pub(crate) async fn run_in_netns<T, F, Fut>(path: &Path, netns: File, work: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    let thread_path = path.to_owned();
    run_blocking_in_netns(path, netns, move || with_netlink(thread_path, work)).await?
}

/// Runs `work` on a fresh thread that has entered the namespace `netns` (an open namespace file): the sockets it
/// opens and the processes it starts belong to that namespace. The thread exits afterwards.
pub(crate) async fn run_blocking_in_netns<T, F>(path: &Path, netns: File, work: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let thread_path = path.to_owned();
    std::thread::Builder::new()
        .name("kata-netns".into())
        .spawn(move || {
            let entered = setns(&netns, CloneFlags::CLONE_NEWNET)
                .map_err(|errno| NetworkError::EnterNetns { path: thread_path, errno });
            drop(netns);
            // The receiver only goes away when the caller was cancelled; nobody is left to tell.
            let _ = tx.send(entered.map(|()| work()));
        })
        .map_err(|source| NetworkError::Thread { path: path.to_owned(), source })?;
    rx.await.map_err(|_| NetworkError::ThreadDied { path: path.to_owned() })?
}

fn with_netlink<T, F, Fut>(path: PathBuf, work: F) -> Result<T, NetworkError>
where
    F: FnOnce(rtnetlink::Handle) -> Fut,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| NetworkError::Thread { path: path.clone(), source })?;
    rt.block_on(async move {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| NetworkError::Netns { path: path.clone(), source })?;
        let connection = tokio::spawn(connection);
        let result = work(handle).await;
        connection.abort();
        result
    })
}
