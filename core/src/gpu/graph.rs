//! CUDA graphs: the launches of a closure captured once from the [`Gpu`]'s stream and replayed
//! with one driver call, so a decode step costs one launch of CPU time instead of hundreds.
//! Captured launches keep the argument values they had: buffers must not move between replays.

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};

use super::{driver_err, Gpu, GpuError};

/// A captured, instantiated graph.
pub struct Graph(cudarc::driver::CudaGraph);

// SAFETY: a CudaGraph is a pair of driver handles plus an Arc of its stream; the driver lets
// any thread use them as long as calls are not concurrent. Graph is deliberately not Sync, so
// a shared one must sit behind a lock (the CUDA backend keeps its graphs inside its Mutex).
unsafe impl Send for Graph {}

impl Graph {
    /// Replays the captured launches on the stream they were captured from.
    pub fn launch(&self) -> Result<(), GpuError> {
        self.0.launch().map_err(driver_err("launching a CUDA graph"))
    }
}

impl Gpu {
    /// Captures every launch `body` queues on this GPU's stream into a [`Graph`] (nothing runs
    /// during capture). Capture ends even when `body` fails; its error is returned.
    pub fn capture<E: From<GpuError>>(&self, body: impl FnOnce() -> Result<(), E>) -> Result<Graph, E> {
        self.stream()
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver_err("beginning graph capture"))?;
        let ran = body();
        let ended = self.stream().end_capture(CUgraphInstantiate_flags(0)).map_err(driver_err("ending graph capture"));
        ran?;
        match ended? {
            Some(g) => Ok(Graph(g)),
            None => Err(GpuError::Cuda { context: "ending graph capture".into(), reason: "nothing was captured".into() }.into()),
        }
    }
}
