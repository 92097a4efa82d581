//! In debug mode the guest console is copied into the shim's log (containerd's log), line by line.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

const POLL: Duration = Duration::from_millis(200);

/// Follows `path` until it disappears (the VM's work dir is removed when the sandbox stops).
pub fn forward(path: PathBuf, sandbox_id: String) {
    tokio::spawn(async move {
        let mut offset = 0u64;
        let mut partial = String::new();
        let mut seen = false;
        loop {
            match read_from(&path, offset) {
                Ok(bytes) => {
                    seen = true;
                    offset += bytes.len() as u64;
                    partial.push_str(&String::from_utf8_lossy(&bytes));
                    while let Some(end) = partial.find('\n') {
                        let line: String = partial.drain(..=end).collect();
                        log::info!("vm {sandbox_id} console: {}", line.trim_end());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && seen => return,
                Err(_) => {}
            }
            tokio::time::sleep(POLL).await;
        }
    });
}

fn read_from(path: &PathBuf, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(buf)
}
