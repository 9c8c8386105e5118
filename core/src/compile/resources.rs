//! The ptxas resource report (registers, spills, stack, shared memory), parsed from the
//! NVRTC log of a `--ptxas-options=--verbose` compile.

/// Per-kernel resources as ptxas reported them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResourceReport {
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_frame: u32,
    pub shared_bytes: u32,
    pub barriers: u32,
}

impl ResourceReport {
    /// Parses the ptxas lines of an NVRTC log; `None` when the log has no report.
    pub fn parse(log: &str) -> Option<Self> {
        let mut r = ResourceReport::default();
        let mut seen = false;
        for line in log.lines() {
            if line.contains("bytes stack frame") {
                seen = true;
                r.stack_frame = number_before(line, "bytes stack frame").unwrap_or(0);
                r.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                r.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            }
            if line.contains("Used") && line.contains("registers") {
                seen = true;
                r.registers = number_before(line, "registers").unwrap_or(0);
                r.barriers = number_before(line, "barriers").unwrap_or(0);
                r.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
        seen.then_some(r)
    }

    /// True when ptxas spilled to local memory.
    pub fn spills(&self) -> bool {
        self.spill_stores > 0 || self.spill_loads > 0
    }
}

/// The integer right before `marker` in `line` ("Used 40 registers" → 40 for "registers").
fn number_before(line: &str, marker: &str) -> Option<u32> {
    let idx = line.find(marker)?;
    line[..idx].split(|c: char| !c.is_ascii_digit()).rev().find(|s| !s.is_empty())?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_report() {
        let log = "ptxas info    : Compiling entry function 'k' for 'sm_90'\n\
                   ptxas info    : Function properties for k\n    \
                   16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
                   ptxas info    : Used 40 registers, used 1 barriers, 4 bytes smem, 400 bytes cmem[0]\n";
        let r = ResourceReport::parse(log).unwrap();
        assert_eq!(
            r,
            ResourceReport { registers: 40, spill_stores: 8, spill_loads: 4, stack_frame: 16, shared_bytes: 4, barriers: 1 }
        );
        assert!(r.spills());
        assert_eq!(ResourceReport::parse("no report here"), None);
    }
}
