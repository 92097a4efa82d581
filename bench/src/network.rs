//! Host -> pod TCP throughput through CRI and the CNI bridge: a busybox `nc -l` sink in the pod, the host
//! writes N MiB over a `TcpStream` with deadlines. The only traffic goes to the pod's address on the
//! bench's own bridge.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use e2e::checks::error_chain;
use e2e::cri::{ContainerSpec, CriClient, PodCleanup, PodSpec};
use e2e::BUSYBOX_IMAGE;
use serde::{Deserialize, Serialize};

use crate::stage::{CriStage, Runtime};
use crate::Interrupt;

const PORT: u16 = 5001;

/// Throughput of one runtime, or why it could not be measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NetResult {
    pub runtime: String,
    /// MB/s (10^6 bytes) per transfer.
    pub mb_per_s: Vec<f64>,
    pub not_available: Option<String>,
}

/// Sends `mib` MiB to `ip:PORT` and waits for the sink to close; MB/s. Everything has a deadline.
fn transfer(ip: Ipv4Addr, mib: usize, deadline: Duration) -> Result<f64> {
    let addr = SocketAddr::from((ip, PORT));
    let until = Instant::now() + Duration::from_secs(20);
    // The sink restarts `nc -l` after every transfer: retry the connect until it listens again.
    let mut stream = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < until => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e).with_context(|| format!("connect {addr}")),
        }
    };
    stream.set_write_timeout(Some(deadline))?;
    stream.set_read_timeout(Some(deadline))?;
    let chunk = vec![0x5au8; 1 << 20];
    let t0 = Instant::now();
    for _ in 0..mib {
        stream.write_all(&chunk).with_context(|| format!("write to {addr}"))?;
    }
    stream.shutdown(Shutdown::Write)?;
    // The sink closes when it has read everything: only then did all bytes arrive.
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).with_context(|| format!("wait for {addr} to close"))?;
    let secs = t0.elapsed().as_secs_f64();
    Ok((mib << 20) as f64 / secs / 1e6)
}

fn one_runtime(
    cri: &CriClient,
    runtime: Runtime,
    mib: usize,
    runs: usize,
    interrupt: &Interrupt,
) -> Result<Vec<f64>, String> {
    let logs = tempfile::tempdir().map_err(|e| e.to_string())?;
    let pod = PodSpec::new(&format!("net-{}", runtime.label()), logs.path()).build();
    let pod_id =
        cri.run_pod_sandbox(&pod, runtime.cri_handler()).map_err(|e| format!("RunPodSandbox: {}", error_chain(&e)))?;
    let result = (|| {
        let ip = cri.pod_ip(&pod_id).map_err(|e| format!("no pod IP: {}", error_chain(&e)))?;
        let spec = ContainerSpec::new(
            "sink",
            BUSYBOX_IMAGE,
            &["sh", "-c", &format!("while :; do nc -l -p {PORT} >/dev/null; done")],
        );
        let id = cri
            .create_container(&pod_id, &spec.build(), &pod)
            .map_err(|e| format!("CreateContainer: {}", error_chain(&e)))?;
        cri.start_container(&id).map_err(|e| format!("StartContainer: {}", error_chain(&e)))?;
        let mut out = Vec::new();
        for _ in 0..runs {
            interrupt.check().map_err(|e| e.to_string())?;
            out.push(transfer(ip, mib, Duration::from_secs(60)).map_err(|e| format!("transfer to {ip}: {e:#}"))?);
        }
        Ok(out)
    })();
    let _ = cri.stop_pod_sandbox(&pod_id);
    let _ = cri.remove_pod_sandbox(&pod_id);
    result
}

/// runc first (proves the network), then kata; a kata failure is recorded, not raised.
pub fn tcp_throughput(stage: &CriStage, mib: usize, runs: usize, interrupt: &Interrupt) -> Result<Vec<NetResult>> {
    let cri = CriClient::connect(stage.containerd.address()).context("CRI client")?;
    let _cleanup = PodCleanup(&cri);
    let mut results = Vec::new();
    for runtime in [Runtime::Runc, Runtime::Kata] {
        interrupt.check()?;
        let r = match one_runtime(&cri, runtime, mib, runs, interrupt) {
            Ok(v) => NetResult { runtime: runtime.label().to_owned(), mb_per_s: v, not_available: None },
            Err(reason) => {
                NetResult { runtime: runtime.label().to_owned(), mb_per_s: vec![], not_available: Some(reason) }
            }
        };
        eprintln!("  {}: {:?} MB/s {}", r.runtime, r.mb_per_s, r.not_available.as_deref().unwrap_or(""));
        results.push(r);
    }
    Ok(results)
}
