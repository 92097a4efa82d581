//! In debug mode the guest console is copied into the log (the shim's goes to containerd's), line by line. The
//! host keeps only the console's last lines, each cut at 1 KiB (`hypervisor::GuestConsole`), and passes at most
//! `RateLimit::default()` of them (50 a second after a burst), saying how many it dropped: a guest cannot flood
//! the log or grow the host's memory through its console.

use hypervisor::{ConsoleEvent, GuestConsole, RateLimit};

/// Follows `console` into the log until the VM exits.
pub(crate) fn forward(console: &GuestConsole, sandbox: String) {
    let mut follower = console.follow(RateLimit::default());
    tokio::spawn(async move {
        while let Some(event) = follower.next().await {
            match event {
                ConsoleEvent::Line(line) => tracing::info!(%sandbox, "vm console: {line}"),
                ConsoleEvent::Dropped(n) => tracing::warn!(%sandbox, "vm console: {n} console lines dropped"),
            }
        }
    });
}
