//! A real `mangrove serve` child process for integration tests: started on a free port, its
//! address read from its "serving … on http://ADDR" line, its stderr drained (kept for
//! diagnostics), killed when dropped if the test did not stop it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

/// A running server.
pub struct Served {
    pub child: Child,
    /// `host:port` it listens on.
    pub addr: String,
    /// Its stderr after the serving line.
    pub log: Arc<Mutex<String>>,
}

impl Served {
    /// Starts `mangrove serve --model MODEL --port 0 EXTRA...` and waits until it serves.
    pub fn start(model: &Path, extra: &[&str]) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mangrove"))
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut r = BufReader::new(child.stderr.take().unwrap());
        let mut before = String::new();
        let line = loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap() == 0 || line.contains("serving") {
                break line;
            }
            before.push_str(&line);
        };
        let addr = match line.split("http://").nth(1).and_then(|r| r.split_whitespace().next()) {
            Some(a) => a.to_string(),
            None => {
                let _ = child.kill();
                panic!("the server did not start: {before}{line}");
            }
        };
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for l in r.lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(l + "\n"));
            }
        });
        Served { child, addr, log }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Writes the `tiny` checkpoint into `out` with `mangrove gen-model`.
pub fn gen_tiny(out: &Path) {
    let st = Command::new(env!("CARGO_BIN_EXE_mangrove")).args(["gen-model", "--preset", "tiny", "--out", out.to_str().unwrap()]).status().unwrap();
    assert!(st.success(), "gen-model failed");
}
