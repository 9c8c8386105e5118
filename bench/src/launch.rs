//! A crash-safe launcher for a local server: takes a command line, starts it in its own process
//! group with its stderr copied to a log file, gives its address once it prints
//! "serving … on http://ADDR", and on stop (or drop) ends the whole group, so no process is left
//! behind; a server that dies early is reported with its exit status and the log's tail.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Errors starting or stopping a server.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("starting {program}")]
    Spawn { program: String, source: std::io::Error },
    #[error("writing the server log {}", path.display())]
    Log { path: PathBuf, source: std::io::Error },
    #[error("the server exited ({status}) before serving; last log lines:\n{tail}")]
    Died { status: String, tail: String },
    #[error("the server printed no \"serving … http://ADDR\" line within {0:?}")]
    NoAddress(Duration),
}

/// A running server in its own process group.
pub struct Server {
    child: Child,
    /// `host:port` it serves on.
    pub addr: String,
    log: PathBuf,
}

/// How a stopped server ended.
#[derive(Debug)]
pub struct Stopped {
    pub status: ExitStatus,
    /// What it printed on stdout (mangrove serve: its counters as JSON).
    pub stdout: String,
    /// Whether it had to be killed (it did not end within the grace period).
    pub killed: bool,
}

impl Server {
    /// Starts `program args…`, copying its stderr to `log`, and waits up to `ready` for its
    /// serving line.
    pub fn start(program: &Path, args: &[String], log: &Path, ready: Duration) -> Result<Server, LaunchError> {
        let mut file = std::fs::File::create(log).map_err(|source| LaunchError::Log { path: log.into(), source })?;
        let mut child = Command::new(program)
            .args(args)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| LaunchError::Spawn { program: program.display().to_string(), source })?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(file, "{line}");
                if let Some(addr) = line.contains("serving").then(|| line.split("http://").nth(1).and_then(|r| r.split_whitespace().next())).flatten() {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let mut server = Server { child, addr: String::new(), log: log.into() };
        match rx.recv_timeout(ready) {
            Ok(addr) => {
                server.addr = addr;
                Ok(server)
            }
            Err(_) => match server.child.try_wait() {
                Ok(Some(status)) => Err(LaunchError::Died { status: status.to_string(), tail: server.log_tail(20) }),
                _ => Err(LaunchError::NoAddress(ready)),
            },
        }
    }

    /// The process id (for RSS sampling).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last `n` lines of the server's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Sends SIGINT to the group, waits up to `grace`, then kills the group.
    pub fn stop(mut self, grace: Duration) -> std::io::Result<Stopped> {
        self.signal(libc::SIGINT);
        let deadline = std::time::Instant::now() + grace;
        let mut killed = false;
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break s;
            }
            if std::time::Instant::now() >= deadline {
                self.signal(libc::SIGKILL);
                killed = true;
                break self.child.wait()?;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stdout = String::new();
        if let Some(mut out) = self.child.stdout.take() {
            out.read_to_string(&mut stdout)?;
        }
        Ok(Stopped { status, stdout, killed })
    }

    fn signal(&self, sig: i32) {
        let group = self.child.id() as i32;
        // SAFETY: kill(2) with a negative pid signals that process group; the group is the
        // child's own (process_group(0)), so nothing else is touched. No memory is shared.
        unsafe {
            libc::kill(-group, sig);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}
