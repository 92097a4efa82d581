//! Restarting containerd after its config changed, and waiting for its CRI plugin to come up.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The two things the installer asks of containerd; a fake stands in for it in tests.
pub trait Containerd {
    fn restart(&self) -> Result<()>;
    /// `ctr plugins ls` output.
    fn plugins(&self) -> Result<String>;
}

#[derive(Debug)]
pub struct SystemContainerd {
    /// Run with `/bin/sh -c`.
    pub restart_command: String,
    pub ctr: String,
    pub socket: PathBuf,
}

impl Containerd for SystemContainerd {
    fn restart(&self) -> Result<()> {
        let status = Command::new("/bin/sh")
            .arg("-c")
            .arg(&self.restart_command)
            .status()
            .with_context(|| format!("run the restart command `{}`", self.restart_command))?;
        if !status.success() {
            bail!("the restart command `{}` failed ({status})", self.restart_command);
        }
        Ok(())
    }

    fn plugins(&self) -> Result<String> {
        let out = Command::new(&self.ctr)
            .arg("--address")
            .arg(&self.socket)
            .args(["plugins", "ls"])
            .output()
            .with_context(|| format!("run `{} --address {} plugins ls`", self.ctr, self.socket.display()))?;
        if !out.status.success() {
            bail!(
                "`{} --address {} plugins ls` failed ({}): {}",
                self.ctr,
                self.socket.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The CRI plugin's status in `ctr plugins ls` output (`ok`, `error`, `skip`), if it is listed.
pub fn cri_status(plugins_ls: &str) -> Option<&str> {
    plugins_ls.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["io.containerd.grpc.v1", "cri", .., status] => Some(*status),
            _ => None,
        }
    })
}

/// Waits up to `timeout` for the CRI plugin to be `ok`; the error says what was last seen.
pub fn wait_for_cri(containerd: &dyn Containerd, timeout: Duration, interval: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = match containerd.plugins() {
            Ok(out) => match cri_status(&out) {
                Some("ok") => return Ok(()),
                Some(status) => format!("the CRI plugin (io.containerd.grpc.v1 cri) is `{status}`"),
                None => "the CRI plugin (io.containerd.grpc.v1 cri) is not listed".to_string(),
            },
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "containerd's CRI plugin is not up after {}s: {seen}; `journalctl -u containerd` says why",
                timeout.as_secs()
            );
        }
        std::thread::sleep(interval);
    }
}

/// Restarts containerd (unless `restart` is false) and waits for its CRI plugin.
pub fn restart_and_check(containerd: &dyn Containerd, restart: bool, timeout: Duration) -> Result<()> {
    if restart {
        containerd.restart()?;
    }
    wait_for_cri(containerd, timeout, Duration::from_millis(500).min(timeout))
}

#[cfg(test)]
pub mod fake {
    use std::cell::RefCell;

    use super::*;

    /// Records restarts; answers `plugins ls` from a script (the last answer repeats).
    #[derive(Debug, Default)]
    pub struct FakeContainerd {
        pub restarts: RefCell<u32>,
        pub answers: RefCell<Vec<String>>,
    }

    pub const CRI_OK: &str = "TYPE                  ID   PLATFORMS   STATUS\n\
                              io.containerd.grpc.v1 cri  linux/amd64 ok\n";

    impl FakeContainerd {
        pub fn up() -> Self {
            FakeContainerd { answers: RefCell::new(vec![CRI_OK.into()]), ..Default::default() }
        }
    }

    impl Containerd for FakeContainerd {
        fn restart(&self) -> Result<()> {
            *self.restarts.borrow_mut() += 1;
            Ok(())
        }
        fn plugins(&self) -> Result<String> {
            let mut answers = self.answers.borrow_mut();
            let answer = if answers.len() > 1 { answers.remove(0) } else { answers[0].clone() };
            Ok(answer)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;

    #[test]
    fn the_cri_line_is_found_in_ctrs_table() {
        let out = "TYPE                                  ID                       PLATFORMS      STATUS\n\
                   io.containerd.grpc.v1                 introspection            -              ok\n\
                   io.containerd.grpc.v1                 cri                      linux/amd64    error\n";
        assert_eq!(cri_status(out), Some("error"));
        assert_eq!(cri_status(CRI_OK), Some("ok"));
        assert_eq!(cri_status("io.containerd.grpc.v1 introspection - ok\n"), None);
    }

    #[test]
    fn the_check_waits_for_cri_and_fails_with_what_it_saw() {
        let slow = FakeContainerd::up();
        *slow.answers.borrow_mut() =
            vec!["".into(), "io.containerd.grpc.v1 cri linux/amd64 skip\n".into(), CRI_OK.into()];
        restart_and_check(&slow, true, Duration::from_secs(5)).unwrap();
        assert_eq!(*slow.restarts.borrow(), 1);

        let broken = FakeContainerd::up();
        *broken.answers.borrow_mut() = vec!["io.containerd.grpc.v1 cri linux/amd64 error\n".into()];
        let err = restart_and_check(&broken, false, Duration::from_millis(50)).unwrap_err().to_string();
        assert!(err.contains("is `error`"), "{err}");
        assert_eq!(*broken.restarts.borrow(), 0);
    }

    #[test]
    fn a_failing_restart_command_is_an_error() {
        let c = SystemContainerd { restart_command: "exit 3".into(), ctr: "ctr".into(), socket: "/nonexistent".into() };
        let err = c.restart().unwrap_err().to_string();
        assert!(err.contains("`exit 3` failed"), "{err}");
    }
}
