//! The server's memory while a level runs: takes a local process id, gives samples of its RSS
//! (from `/proc/PID/status`) and their start, end and peak, and its GPU memory at the start and
//! end (from `nvidia-smi`, where there is one).

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
    /// GPU memory the process holds at the level's start and end (None: no nvidia-smi, or the
    /// process holds none).
    pub gpu_start_bytes: Option<u64>,
    pub gpu_end_bytes: Option<u64>,
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

/// GPU memory process `pid` holds, summed over GPUs, from
/// `nvidia-smi --query-compute-apps=pid,used_memory`.
pub fn gpu_bytes(pid: u32) -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi").args(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]).output().ok()?;
    out.status.success().then(|| parse_compute_apps(&String::from_utf8_lossy(&out.stdout), pid)).flatten()
}

fn parse_compute_apps(csv: &str, pid: u32) -> Option<u64> {
    let mib: Vec<u64> = csv
        .lines()
        .filter_map(|l| l.split_once(','))
        .filter(|(p, _)| p.trim().parse() == Ok(pid))
        .filter_map(|(_, m)| m.trim().parse().ok())
        .collect();
    (!mib.is_empty()).then(|| mib.iter().sum::<u64>() << 20)
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
    let gpu_start_bytes = tokio::task::spawn_blocking(move || gpu_bytes(pid)).await.ok().flatten();
    let mut series = MemorySeries { pid, start_bytes: first, end_bytes: first, peak_bytes: first, samples: vec![(0.0, first)], gpu_start_bytes, gpu_end_bytes: None };
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tokio::pin!(done);
    loop {
        tokio::select! {
            _ = &mut done => break,
            _ = tick.tick() => series.push(t0, rss_bytes(pid)?),
        }
    }
    series.push(t0, rss_bytes(pid)?);
    series.gpu_end_bytes = tokio::task::spawn_blocking(move || gpu_bytes(pid)).await.ok().flatten();
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

    #[test]
    fn reads_a_processes_gpu_memory() {
        let csv = "4242, 1024\n77, 5\n4242, 512\n";
        assert_eq!(parse_compute_apps(csv, 4242), Some(1536 << 20));
        assert_eq!(parse_compute_apps(csv, 1), None);
        assert_eq!(parse_compute_apps("No running processes found\n", 1), None);
    }
}
