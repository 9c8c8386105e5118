//! The server's resident memory while a level runs: takes a local process id, gives samples of
//! its RSS (from `/proc/PID/status`) and their start, end and peak.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How often RSS is sampled during a level.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// RSS of one process over a level.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemorySeries {
    pub pid: u32,
    pub start_bytes: u64,
    pub end_bytes: u64,
    pub peak_bytes: u64,
    /// (seconds since the level started, RSS bytes).
    pub samples: Vec<(f64, u64)>,
}

impl MemorySeries {
    /// End minus start.
    pub fn growth_bytes(&self) -> i64 {
        self.end_bytes as i64 - self.start_bytes as i64
    }

    fn push(&mut self, t0: Instant, bytes: u64) {
        self.samples.push((t0.elapsed().as_secs_f64(), bytes));
        self.end_bytes = bytes;
        self.peak_bytes = self.peak_bytes.max(bytes);
    }
}

/// Resident set size of process `pid` in bytes.
pub fn rss_bytes(pid: u32) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_vm_rss(&status).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("no VmRSS line in /proc/{pid}/status")))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kb: u64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// Samples `pid` every [`SAMPLE_EVERY`] until `done` resolves, then once more.
pub async fn sample_until(pid: u32, done: impl std::future::Future<Output = ()>) -> std::io::Result<MemorySeries> {
    let t0 = Instant::now();
    let first = rss_bytes(pid)?;
    let mut series = MemorySeries { pid, start_bytes: first, end_bytes: first, peak_bytes: first, samples: vec![(0.0, first)] };
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tokio::pin!(done);
    loop {
        tokio::select! {
            _ = &mut done => break,
            _ = tick.tick() => series.push(t0, rss_bytes(pid)?),
        }
    }
    series.push(t0, rss_bytes(pid)?);
    Ok(series)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss() {
        assert_eq!(parse_vm_rss("Name:\tx\nVmRSS:\t  2048 kB\nVmSwap: 0 kB\n"), Some(2 << 20));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }
}
