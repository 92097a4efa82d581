//! `containerd-shim-kata-v2`: the containerd runtime v2 shim of kata-rs. One shim per pod; each pod is a VM.

mod events;
mod metrics;
mod serve;
mod service;
#[cfg(test)]
mod service_tests;
mod shim;
mod shim_cgroup;

use containerd_shim::Config;
use shim_options as options;

#[tokio::main]
async fn main() {
    // Everything the shim creates (sandbox directories, state, sockets) is root's alone; QEMU and its
    // helpers get the usual 022 back, so files the guest creates keep the modes it asked for.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Ok(flags) = containerd_shim::parse(&args[1..]) {
        if flags.action.is_empty() && !flags.version && !flags.info {
            if let Err(e) = serve::serve(flags).await {
                eprintln!("containerd-shim-kata-v2: {e:#}");
                std::process::exit(1);
            }
            return;
        }
        if flags.action == "start" {
            match shim::start_for_containerd_1_6(&flags).await {
                Ok(address) => {
                    print!("{address}");
                    return;
                }
                Err(e) => {
                    eprintln!("containerd-shim-kata-v2: start: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    let config = Config {
        // QEMU and its helpers are tokio children: tokio must reap them, not the shim's global reaper.
        no_reaper: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<shim::KataShim>("io.containerd.kata.v2", Some(config)).await;
}
