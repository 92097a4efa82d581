//! The host side of the CRI web-pod tests (runc and kata): a page for busybox `httpd` to serve, a read-only
//! and a read-write volume with known contents, and the pod's log directory, all in one temporary directory.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use super::ContainerSpec;

/// An HTTP/1.0 GET of `path` from `ip:port` (the web pod's httpd), every step bounded; returns the whole
/// response.
pub fn http_get(ip: Ipv4Addr, port: u16, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&SocketAddr::from((ip, port)), Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// Removed, with everything in it, when dropped.
#[derive(Debug)]
pub struct WebVolumes {
    _dir: tempfile::TempDir,
    /// Served as `/www` (read-only); holds `index.html` = `page`.
    pub www: PathBuf,
    /// Mounted read-only at `/ro`; holds `file` = "read-only content\n".
    pub ro: PathBuf,
    /// Mounted read-write at `/rw`; holds `in` = "from-host\n".
    pub rw: PathBuf,
    /// The pod's CRI log directory.
    pub logs: PathBuf,
    /// A page unique to this run, so a response cannot come from another test.
    pub page: String,
}

impl WebVolumes {
    pub fn create(label: &str) -> std::io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let [www, ro, rw, logs] = ["www", "ro", "rw", "logs"].map(|d| dir.path().join(d));
        for d in [&www, &ro, &rw, &logs] {
            std::fs::create_dir(d)?;
        }
        let page = format!("kata-rs CRI {label} test {}\n", crate::unique_id("page"));
        std::fs::write(www.join("index.html"), &page)?;
        std::fs::write(ro.join("file"), "read-only content\n")?;
        std::fs::write(rw.join("in"), "from-host\n")?;
        Ok(WebVolumes { _dir: dir, www, ro, rw, logs, page })
    }

    /// busybox `httpd` on port 8080 serving `/www`, with the three volumes mounted; it prints
    /// `started-<hostname>` on stdout and `to-stderr` on stderr first.
    pub fn httpd(&self) -> ContainerSpec {
        ContainerSpec::new(
            "httpd",
            crate::BUSYBOX_IMAGE,
            &["sh", "-c", "echo started-$(hostname); echo to-stderr >&2; exec httpd -f -p 8080 -h /www"],
        )
        .mount(&self.www, "/www", true)
        .mount(&self.ro, "/ro", true)
        .mount(&self.rw, "/rw", false)
    }
}
