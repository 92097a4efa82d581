//! The stand-in's control socket: one JSON request per line, one JSON reply per line. Only root reaches it
//! (the socket is 0600 in a 0700 directory). A pod's containers are served by the stand-in of the pod's
//! sandbox container, which owns the VM: their requests go there and name the container.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::dir::ContainerDir;

/// A process's IO as the container's stand-in opens it: paths of another process's FIFOs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Io {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Start,
    State,
    Kill {
        signal: u32,
        all: bool,
    },
    Pause,
    Resume,
    Update {
        resources: serde_json::Value,
    },
    Ps,
    /// The container's cgroup stats in the guest, as runc's events `data`.
    Stats,
    /// Adds and starts an exec; the connection then waits for its exit (the reply's `exit`).
    Exec {
        exec_id: String,
        process: serde_json::Value,
        io: Io,
    },
    /// The window size of an exec's terminal changed.
    Resize {
        exec_id: String,
        rows: u32,
        cols: u32,
    },
    /// Ends a container that never started, or (forced) one that runs.
    Delete {
        force: bool,
    },
    /// A pod's container joins the pod's VM: created there from its bundle with the IO of its own stand-in
    /// (`pid`). The connection then waits for its init's exit (the reply's `exit`); when the joining stand-in
    /// goes away first, the container is killed.
    Join {
        bundle: PathBuf,
        io: Io,
        pid: u32,
    },
    /// A signal the container's stand-in received, for its init; ignored until the init started.
    Signal {
        signal: u32,
    },
    /// Takes a pod's stopped container out of the VM (`delete`, after its stand-in exited).
    Remove,
}

/// A request as it travels: for a pod's container, the container it is for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    #[serde(flatten)]
    pub request: Request,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<serde_json::Value>,
}

impl Reply {
    pub fn error(msg: impl Into<String>) -> Self {
        Reply { error: Some(msg.into()), ..Default::default() }
    }
}

/// A connection to a container's stand-in.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    container: Option<String>,
}

impl Client {
    /// Connects, or `None` when no stand-in answers (it exited).
    pub fn connect(dir: &ContainerDir) -> Option<Self> {
        let stream = UnixStream::connect(dir.socket()).ok()?;
        let writer = stream.try_clone().ok()?;
        Some(Client { reader: BufReader::new(stream), writer, container: None })
    }

    /// Connects to the stand-in that serves container `dir`: its own, or for a pod's container (whose record
    /// names the pod) the pod's. `None` when the container's own stand-in has exited.
    pub fn to_container(root: &Path, dir: &ContainerDir) -> Option<Self> {
        match dir.load().ok().and_then(|r| r.sandbox) {
            None => Self::connect(dir),
            Some(pod) if dir.standin_alive() => Self::to_pod(root, &pod, &dir.id),
            Some(_) => None,
        }
    }

    /// Connects to the stand-in of pod `pod`, for its container `id`.
    pub fn to_pod(root: &Path, pod: &str, id: &str) -> Option<Self> {
        let pod_dir = ContainerDir::open(root, pod).ok()?;
        let mut client = Self::connect(&pod_dir)?;
        client.container = Some(id.to_string());
        Some(client)
    }

    /// Sends a request and reads its reply; an error reply becomes an error.
    pub fn call(&mut self, req: &Request) -> Result<Reply> {
        let envelope = Envelope { container: self.container.clone(), request: req.clone() };
        let mut line = serde_json::to_vec(&envelope)?;
        line.push(b'\n');
        self.writer.write_all(&line).context("send to the container's stand-in")?;
        self.read()
    }

    /// Reads one more reply (the exit of an exec).
    pub fn read(&mut self) -> Result<Reply> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).context("read from the container's stand-in")? == 0 {
            bail!("the container's stand-in exited");
        }
        let reply: Reply = serde_json::from_str(&line).context("parse the stand-in's reply")?;
        if let Some(e) = reply.error {
            bail!(e);
        }
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_lines() {
        let req = Request::Kill { signal: 9, all: true };
        let s = serde_json::to_string(&req).unwrap();
        assert_eq!(s, r#"{"op":"kill","signal":9,"all":true}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), req);
        assert_eq!(serde_json::to_string(&Request::Start).unwrap(), r#"{"op":"start"}"#);
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
    }

    #[test]
    fn an_envelope_names_the_pods_container() {
        let env = Envelope { container: Some("c2".into()), request: Request::Kill { signal: 15, all: false } };
        let s = serde_json::to_string(&env).unwrap();
        assert_eq!(s, r#"{"container":"c2","op":"kill","signal":15,"all":false}"#);
        assert_eq!(serde_json::from_str::<Envelope>(&s).unwrap(), env);
        let own: Envelope = serde_json::from_str(r#"{"op":"start"}"#).unwrap();
        assert_eq!(own, Envelope { container: None, request: Request::Start });
        assert_eq!(serde_json::to_string(&own).unwrap(), r#"{"op":"start"}"#);
        let remove: Envelope = serde_json::from_str(r#"{"op":"remove","container":"c2"}"#).unwrap();
        assert_eq!(remove.request, Request::Remove);
        assert!(serde_json::from_str::<Envelope>(r#"{"container":"c2"}"#).is_err());
    }
}
