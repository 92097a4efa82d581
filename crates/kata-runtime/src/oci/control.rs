//! The stand-in's control socket: one JSON request per line, one JSON reply per line. Only root reaches it
//! (the socket is 0600 in a 0700 directory).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

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
}

impl Client {
    /// Connects, or `None` when no stand-in answers (it exited).
    pub fn connect(dir: &ContainerDir) -> Option<Self> {
        let stream = UnixStream::connect(dir.socket()).ok()?;
        let writer = stream.try_clone().ok()?;
        Some(Client { reader: BufReader::new(stream), writer })
    }

    /// Sends a request and reads its reply; an error reply becomes an error.
    pub fn call(&mut self, req: &Request) -> Result<Reply> {
        let mut line = serde_json::to_vec(req)?;
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
}
