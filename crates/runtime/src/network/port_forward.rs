//! CRI port-forward into a pod VM, host side.
//!
//! containerd 1.6 forwards a port of a pod that is not host-network by entering the pod's network namespace
//! on the host and dialling `localhost:<port>` there; the workload listens inside the VM instead. So, in that
//! namespace, the shim listens on 127.0.0.1 (an ephemeral port) and one iptables rule redirects every TCP
//! connection to 127.0.0.1 to that listener. For each connection the original port comes back from the
//! connection tracking entry (`SO_ORIGINAL_DST`), and [`relay`] carries the stream to the agent, which connects
//! to that port on the guest's loopback (`protocols::forward`).
//!
//! The listener's socket pins the namespace, so it closes with the sandbox ([`PortForward::stop`]); the rule
//! goes with it, and crash cleanup removes it again from the port persisted in `state.json` ([`remove_rule`]).
//! Forwarding is best effort: when it cannot be set up the pod runs without it, and containerd's dial fails as it
//! would without kata-rs.

mod relay;

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hypervisor::AgentEndpoint;

use super::netns;
use super::NetworkError;

pub use relay::original_port;

/// Why port-forward could not be set up or removed.
#[derive(Debug, thiserror::Error)]
pub enum PortForwardError {
    #[error("port-forward needs the hybrid vsock agent transport; this VM's agent is reached over virtio-serial (a VM template clone), which carries ttrpc only")]
    SerialTransport,
    #[error(transparent)]
    Netns(#[from] NetworkError),
    #[error("network namespace {}: cannot listen on 127.0.0.1", netns.display())]
    Listen {
        netns: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace {}: `{IPTABLES} {}` failed: {detail}", netns.display(), args.join(" "))]
    Iptables { netns: PathBuf, args: Vec<String>, detail: String },
}

/// By absolute path, so nothing in the environment chooses what runs as root.
pub const IPTABLES: &str = "/usr/sbin/iptables";

/// The shim's half of port-forward for one sandbox: the listener in the pod's namespace (served by a task that
/// relays its connections to the guest) and the redirect rule. Dropping it closes the listener; [`Self::stop`]
/// also waits until every forwarded connection is closed and removes the rule.
#[derive(Debug)]
pub struct PortForward {
    netns: PathBuf,
    port: u16,
    relay: Option<tokio::task::JoinHandle<()>>,
}

impl PortForward {
    /// Listens in the namespace `netns`, adds the redirect rule there and relays to the agent at `endpoint`.
    pub async fn start(sandbox: &str, netns: &Path, endpoint: &AgentEndpoint) -> Result<Self, PortForwardError> {
        let AgentEndpoint::HybridVsock(uds) = endpoint else {
            return Err(PortForwardError::SerialTransport);
        };
        let file = netns::open_netns(netns)?.ok_or_else(|| NetworkError::Netns {
            path: netns.to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        let path = netns.to_owned();
        let (listener, port) = netns::run_blocking_in_netns(netns, file, move || listen_and_redirect(&path)).await??;
        let relay = relay::Relay {
            sandbox: sandbox.to_string(),
            uds: uds.clone(),
            original_port,
            handshake_timeout: relay::HANDSHAKE_TIMEOUT,
            guest_idle: relay::GUEST_IDLE,
        };
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|source| PortForwardError::Listen { netns: netns.to_owned(), source });
        let listener = match listener {
            Ok(listener) => listener,
            Err(e) => {
                let _ = remove_rule(netns, port).await;
                return Err(e);
            }
        };
        tracing::info!(sandbox, netns = %netns.display(), port, "port-forward listening");
        Ok(PortForward { netns: netns.to_owned(), port, relay: Some(tokio::spawn(relay.serve(listener))) })
    }

    /// Starts port-forward for a sandbox, or logs why it cannot: a pod runs without it.
    pub async fn start_or_log(sandbox: &str, netns: &Path, endpoint: Option<AgentEndpoint>) -> Option<Self> {
        let started = match endpoint {
            Some(endpoint) => Self::start(sandbox, netns, &endpoint).await,
            None => return None,
        };
        started
            .inspect_err(
                |e| tracing::warn!(sandbox, error = %crate::error_chain(e), "port-forward is unavailable for this pod"),
            )
            .ok()
    }

    /// The listener's port in the pod's namespace (the rule redirects to it).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes the listener and every forwarded connection (waiting until they are closed, since each socket
    /// pins the namespace) and removes the rule.
    pub async fn stop(mut self) -> Result<(), PortForwardError> {
        if let Some(relay) = self.relay.take() {
            relay.abort();
            let _ = relay.await;
        }
        remove_rule(&self.netns, self.port).await
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        if let Some(relay) = &self.relay {
            relay.abort();
        }
    }
}

/// On the namespace's thread: the listener, then the rule that sends it every TCP connection to 127.0.0.1.
fn listen_and_redirect(netns: &Path) -> Result<(TcpListener, u16), PortForwardError> {
    let listen_error = |source| PortForwardError::Listen { netns: netns.to_owned(), source };
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(listen_error)?;
    listener.set_nonblocking(true).map_err(listen_error)?;
    let port = listener.local_addr().map_err(listen_error)?.port();
    iptables(netns, &rule("-A", port))?;
    Ok((listener, port))
}

/// Removes the redirect to `port` from the namespace `netns`, if it is there. Fine when the namespace is gone.
pub async fn remove_rule(netns: &Path, port: u16) -> Result<(), PortForwardError> {
    let Some(file) = netns::open_netns(netns)? else {
        return Ok(());
    };
    let path = netns.to_owned();
    netns::run_blocking_in_netns(netns, file, move || {
        // `-C` fails when the rule is not there (or the nat table is not): nothing to remove.
        if iptables(&path, &rule("-C", port)).is_err() {
            return Ok(());
        }
        iptables(&path, &rule("-D", port))
    })
    .await?
}

/// The arguments of the redirect rule for `action` (`-A`, `-C` or `-D`): fixed but for the listener's port.
fn rule(action: &str, port: u16) -> Vec<String> {
    let fixed = ["-w", "10", "-t", "nat", action, "OUTPUT", "-p", "tcp", "-d", "127.0.0.1/32", "-j", "REDIRECT"];
    let mut args: Vec<String> = fixed.iter().map(|a| a.to_string()).collect();
    args.extend(["--to-ports".to_string(), port.to_string()]);
    args
}

/// Runs iptables on the calling thread's namespace (a child starts in the namespace of the thread that forks
/// it), with an empty environment.
fn iptables(netns: &Path, args: &[String]) -> Result<(), PortForwardError> {
    let failed = |detail: String| PortForwardError::Iptables { netns: netns.to_owned(), args: args.to_vec(), detail };
    let out = Command::new(IPTABLES)
        .args(args)
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .map_err(|e| failed(e.to_string()))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(failed(format!("{}: {}", out.status, stderr.trim())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_is_fixed_but_for_the_port() {
        assert_eq!(
            rule("-A", 40123).join(" "),
            "-w 10 -t nat -A OUTPUT -p tcp -d 127.0.0.1/32 -j REDIRECT --to-ports 40123"
        );
    }

    #[tokio::test]
    async fn a_serial_agent_is_refused_with_a_reason() {
        let endpoint = AgentEndpoint::Serial("/run/x.sock".into());
        let err = PortForward::start("sb", Path::new("/var/run/netns/none"), &endpoint).await.expect_err("refused");
        assert!(matches!(err, PortForwardError::SerialTransport), "{err:?}");
        assert!(err.to_string().contains("virtio-serial"), "{err}");
    }

    #[tokio::test]
    async fn removing_the_rule_of_a_gone_namespace_is_fine() {
        remove_rule(Path::new("/var/run/netns/kata-rs-no-such-namespace"), 1).await.expect("nothing to do");
    }
}
