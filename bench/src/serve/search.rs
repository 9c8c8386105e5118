//! The TTFT-target search: takes the levels measured so far and a way to measure another
//! concurrency, gives the largest concurrency whose TTFT p95 meets the target with no failure
//! (doubling past the last passing level, then bisecting; latency is assumed to grow with load).

use std::collections::BTreeMap;

use super::report::Level;

/// Whether `level` meets a TTFT p95 target of `target_ms` with every request answered.
pub fn meets(level: &Level, target_ms: f64) -> bool {
    level.failed == 0 && level.succeeded > 0 && level.ttft_ms.p95 <= target_ms
}

/// The largest concurrency in 1..=`max` meeting `target_ms`, measuring levels not yet in
/// `measured` with `measure` (each measured level is added to it). None when even 1 misses.
pub fn max_concurrency<E>(
    target_ms: f64,
    max: usize,
    measured: &mut BTreeMap<usize, Level>,
    mut measure: impl FnMut(usize) -> Result<Level, E>,
) -> Result<Option<usize>, E> {
    let mut pass = |c: usize, measured: &mut BTreeMap<usize, Level>| -> Result<bool, E> {
        let level = match measured.entry(c) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(measure(c)?),
        };
        Ok(meets(level, target_ms))
    };
    let max = max.max(1);
    let mut hi = measured.iter().find(|(&c, l)| c <= max && !meets(l, target_ms)).map(|(&c, _)| c);
    let mut lo = measured.iter().filter(|(&c, l)| c <= max && hi.is_none_or(|h| c < h) && meets(l, target_ms)).map(|(&c, _)| c).next_back().unwrap_or(0);
    if hi.is_none() {
        let mut c = (lo * 2).clamp(1, max);
        while lo < max {
            if pass(c, measured)? {
                lo = c;
                c = (c * 2).min(max);
            } else {
                hi = Some(c);
                break;
            }
        }
    }
    if let Some(mut hi) = hi {
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if pass(mid, measured)? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    Ok((lo > 0).then_some(lo))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Percentiles;

    /// A level whose TTFT p95 is `ttft` ms.
    fn level(c: usize, ttft: f64) -> Level {
        Level { concurrency: c, succeeded: 4, ttft_ms: Percentiles { p95: ttft, ..Percentiles::default() }, ..Level::default() }
    }

    fn search(target: f64, max: usize, known: &[usize]) -> (Option<usize>, Vec<usize>) {
        // TTFT grows 100 ms per concurrent request.
        let f = |c: usize| level(c, 100.0 * c as f64);
        let mut measured: BTreeMap<usize, Level> = known.iter().map(|&c| (c, f(c))).collect();
        let mut asked = Vec::new();
        let r = max_concurrency(target, max, &mut measured, |c| {
            asked.push(c);
            Ok::<_, ()>(f(c))
        });
        (r.unwrap(), asked)
    }

    #[test]
    fn doubles_then_bisects_to_the_largest_passing_level() {
        assert_eq!(search(1000.0, 64, &[]), (Some(10), vec![1, 2, 4, 8, 16, 12, 10, 11]));
        // The sweep's levels are reused: 4 passes and 16 misses, so only 5..15 is bisected.
        assert_eq!(search(1000.0, 64, &[1, 2, 4, 16]), (Some(10), vec![10, 13, 11]));
    }

    #[test]
    fn stops_at_the_cap_and_reports_none_when_one_misses() {
        assert_eq!(search(1e9, 6, &[]), (Some(6), vec![1, 2, 4, 6]));
        assert_eq!(search(50.0, 64, &[]), (None, vec![1]));
        let mut failing = level(1, 1.0);
        failing.failed = 1;
        assert!(!meets(&failing, 1000.0));
    }
}
