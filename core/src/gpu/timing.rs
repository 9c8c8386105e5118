//! The one timing harness: CUDA events around batches of launches after a warm-up, giving
//! median / p95 / mean per launch; and the device's copy bandwidth, the physical limit that
//! memory-bound kernels are reported against. A batch is captured into a CUDA graph and replayed
//! (as the decode engine and Triton's `do_bench_cudagraph` run kernels), so the host's launch
//! cost is not timed; launches that cannot be captured are timed as plain stream launches.

use cudarc::driver::sys::CUevent_flags;

use super::{driver_err, Gpu, GpuError};

/// Per-launch latency statistics in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TimingStats {
    pub median_us: f64,
    pub p95_us: f64,
    pub mean_us: f64,
    pub min_us: f64,
    /// Number of timed batches.
    pub samples: usize,
    /// Launches per batch.
    pub batch: usize,
    /// Whether each batch was one CUDA-graph replay (else plain stream launches).
    #[serde(default)]
    pub graphed: bool,
}

impl TimingStats {
    /// Statistics of per-launch times (µs), one per batch.
    pub fn from_samples(mut us: Vec<f64>, batch: usize, graphed: bool) -> Self {
        if us.is_empty() {
            return Self::default();
        }
        us.sort_by(f64::total_cmp);
        let pick = |q: f64| crate::stats::nearest_rank(&us, q);
        Self {
            median_us: pick(0.5),
            p95_us: pick(0.95),
            mean_us: us.iter().sum::<f64>() / us.len() as f64,
            min_us: us[0],
            samples: us.len(),
            batch,
            graphed,
        }
    }
}

/// How much to measure.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TimingPlan {
    pub warmup: usize,
    pub samples: usize,
    pub batch: usize,
}

impl Default for TimingPlan {
    fn default() -> Self {
        Self { warmup: 5, samples: 30, batch: 16 }
    }
}

impl Gpu {
    /// Times `launch(i)` (i counts launches, for rotating inputs): `plan.batch` launches
    /// (i = 0..batch) are captured into one graph, replayed `plan.warmup` times untimed, then
    /// `plan.samples` times between two events. If the launches cannot be captured (a library
    /// call that refuses capture), batches of plain stream launches are timed instead.
    pub fn time_launches(
        &self,
        plan: TimingPlan,
        mut launch: impl FnMut(usize) -> Result<(), GpuError>,
    ) -> Result<TimingStats, GpuError> {
        let batch = plan.batch.max(1);
        let captured = self.capture(|| (0..batch).try_for_each(&mut launch));
        match captured {
            Ok(graph) => self.time_batches(plan, batch, true, || graph.launch()),
            Err(_) => {
                self.sync()?; // a failed capture leaves nothing queued; start from a quiet stream
                let mut i = 0usize;
                self.time_batches(plan, batch, false, || {
                    (0..batch).try_for_each(|_| {
                        i += 1;
                        launch(i - 1)
                    })
                })
            }
        }
    }

    /// Runs `batch_fn` `warmup` times, then `samples` times between two events; each sample
    /// is divided by `batch` launches.
    fn time_batches(
        &self,
        plan: TimingPlan,
        batch: usize,
        graphed: bool,
        mut batch_fn: impl FnMut() -> Result<(), GpuError>,
    ) -> Result<TimingStats, GpuError> {
        let ev = || self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver_err("event"));
        let (start, stop) = (ev()?, ev()?);
        for _ in 0..plan.warmup {
            batch_fn()?;
        }
        self.sync()?;
        let mut us = Vec::with_capacity(plan.samples);
        for _ in 0..plan.samples {
            start.record(&self.stream).map_err(driver_err("event record"))?;
            batch_fn()?;
            stop.record(&self.stream).map_err(driver_err("event record"))?;
            let ms = start.elapsed_ms(&stop).map_err(driver_err("event elapsed"))?;
            us.push(ms as f64 * 1e3 / batch as f64);
        }
        Ok(TimingStats::from_samples(us, batch, graphed))
    }

    /// Device-to-device copy bandwidth in GB/s (bytes read + bytes written), over `bytes` per copy.
    /// Plain stream copies, never a graph: a captured copy becomes a copy-engine node that runs
    /// slower than the stream's copy (H100: 2434 GB/s captured, 2961 for torch's stream copy in the
    /// same run), which would flatter every fraction of the limit.
    pub fn copy_bandwidth_gbs(&self, bytes: usize) -> Result<f64, GpuError> {
        let src = self.zeros::<u8>(bytes)?;
        let mut dst = self.zeros::<u8>(bytes)?;
        let plan = TimingPlan { warmup: 2, samples: 10, batch: 4 };
        let stats = self.time_batches(plan, plan.batch, false, || {
            (0..plan.batch).try_for_each(|_| self.stream.memcpy_dtod(&src, &mut dst).map_err(driver_err("copy")))
        })?;
        Ok(2.0 * bytes as f64 / (stats.median_us * 1e-6) / 1e9)
    }
}

/// GPU time per labelled launch: an event after each launch, read back after a sync. For
/// breakdowns of a launch sequence (e.g. one decode step); not for capture into graphs.
pub struct Spans {
    start: cudarc::driver::CudaEvent,
    marks: Vec<(&'static str, cudarc::driver::CudaEvent)>,
}

/// Total GPU time of one label over a [`Spans`] run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SpanTotal {
    pub label: &'static str,
    pub us: f64,
    pub launches: usize,
}

impl Gpu {
    /// Starts a span recording at the current point of the stream.
    pub fn spans(&self) -> Result<Spans, GpuError> {
        let start = self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver_err("event"))?;
        start.record(&self.stream).map_err(driver_err("event record"))?;
        Ok(Spans { start, marks: Vec::new() })
    }
}

impl Spans {
    /// Ends the span of `label`: the work queued since the previous mark.
    pub fn mark(&mut self, gpu: &Gpu, label: &'static str) -> Result<(), GpuError> {
        let ev = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver_err("event"))?;
        ev.record(&gpu.stream).map_err(driver_err("event record"))?;
        self.marks.push((label, ev));
        Ok(())
    }

    /// Totals per label, in first-seen order (waits for the last mark).
    pub fn totals(&self) -> Result<Vec<SpanTotal>, GpuError> {
        let mut out: Vec<SpanTotal> = Vec::new();
        let mut prev = &self.start;
        for (label, ev) in &self.marks {
            let us = prev.elapsed_ms(ev).map_err(driver_err("event elapsed"))? as f64 * 1e3;
            match out.iter_mut().find(|t| t.label == *label) {
                Some(t) => {
                    t.us += us;
                    t.launches += 1;
                }
                None => out.push(SpanTotal { label, us, launches: 1 }),
            }
            prev = ev;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_samples() {
        let s = TimingStats::from_samples((1..=100).map(|v| v as f64).collect(), 4, true);
        assert_eq!(s.median_us, 51.0); // index round(99*0.5)=50 → value 51
        assert_eq!(s.p95_us, 95.0);
        assert_eq!(s.min_us, 1.0);
        assert!((s.mean_us - 50.5).abs() < 1e-12);
        assert_eq!(TimingStats::from_samples(vec![], 1, false).samples, 0);
    }
}
