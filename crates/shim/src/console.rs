//! In debug mode the guest console is copied into the shim's log (containerd's log), line by line. The host
//! keeps only the console's last lines, each cut at 1 KiB (`hypervisor::GuestConsole`), and passes at most
//! `RateLimit::default()` of them (50 a second after a burst), saying how many it dropped: a guest cannot flood
//! containerd's log or grow the shim's memory through its console.

use hypervisor::{ConsoleEvent, GuestConsole, RateLimit};

/// Follows `console` until the VM exits.
pub fn forward(console: &GuestConsole, sandbox_id: String) {
    let mut follower = console.follow(RateLimit::default());
    tokio::spawn(async move {
        while let Some(event) = follower.next().await {
            match event {
                ConsoleEvent::Line(line) => log::info!("vm {sandbox_id} console: {line}"),
                ConsoleEvent::Dropped(n) => log::warn!("vm {sandbox_id} console: {n} console lines dropped"),
            }
        }
    });
}
