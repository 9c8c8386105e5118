//! A real `mangrove serve` child process for integration tests, through the crash-safe
//! launcher the tools use ([`mangrove::bench::launch::Server`]): started on a free port in its
//! own process group, its stderr in a log file, ended with its group when dropped.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mangrove::bench::launch::Server;

/// Starts `mangrove serve --model MODEL --port 0 EXTRA...` (log in `log_dir/server.log`) and
/// waits until it serves.
pub fn serve(model: &Path, extra: &[&str], log_dir: &Path) -> Server {
    let mut args: Vec<String> = ["serve", "--model", model.to_str().unwrap(), "--port", "0"].map(String::from).to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    Server::start(Path::new(env!("CARGO_BIN_EXE_mangrove")), &args, &log_dir.join("server.log"), Duration::from_secs(120)).unwrap_or_else(|e| panic!("{e}"))
}

/// Writes the `tiny` checkpoint into `out` with `mangrove gen-model`.
pub fn gen_tiny(out: &Path) {
    let st = Command::new(env!("CARGO_BIN_EXE_mangrove")).args(["gen-model", "--preset", "tiny", "--out", out.to_str().unwrap()]).status().unwrap();
    assert!(st.success(), "gen-model failed");
}
