//! MoE routing for the grouped expert kernels (vLLM's `moe_align_block_size`, on the host).
//! Takes the expert chosen for every (token, slot) pair and gives the pair indices grouped by
//! expert, each group padded to a multiple of the kernel's `BLOCK_M` rows, plus the expert of
//! every row block. A kernel block then reads one expert's weights for all of its rows.

/// Errors of [`align_block_size`]; each names the offending input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoutingError {
    #[error("block_m must be positive")]
    ZeroBlock,
    #[error("pair {pair} routes to expert {expert}, but there are {experts} experts")]
    ExpertOutOfRange { pair: usize, expert: i32, experts: usize },
    #[error("{pairs} routed pairs do not fit the i32 indices the kernels take")]
    TooManyPairs { pairs: usize },
}

/// Routed pairs grouped by expert and padded to whole row blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    /// Pair indices `p = token * topk + slot`, grouped by ascending expert and ascending `p`
    /// inside a group; each group is padded with [`Routing::sentinel`] to a multiple of `block_m`.
    pub sorted_ids: Vec<i32>,
    /// The expert of rows `b * block_m .. (b + 1) * block_m` of `sorted_ids`.
    pub block_expert: Vec<i32>,
    /// Padded length: `sorted_ids.len()`, a multiple of `block_m`.
    pub em: usize,
    pub block_m: usize,
    /// Number of routed pairs (`tokens * topk`), which is also the sentinel value.
    pub pairs: usize,
}

impl Routing {
    /// The padding value of `sorted_ids`: one past the last pair index.
    pub fn sentinel(&self) -> i32 {
        self.pairs as i32
    }
}

/// The largest padded length [`align_block_size`] can give: every non-empty expert adds at
/// most `block_m - 1` padding rows. Kernels size their grids with it.
pub fn max_padded_len(pairs: usize, experts: usize, block_m: usize) -> usize {
    (pairs + experts.min(pairs) * block_m.saturating_sub(1)).div_ceil(block_m.max(1)) * block_m
}

/// Groups the flattened `topk_ids` ([tokens, topk], expert per pair) by expert and pads each
/// group to a multiple of `block_m`; experts with no pair get no block.
pub fn align_block_size(topk_ids: &[i32], experts: usize, block_m: usize) -> Result<Routing, RoutingError> {
    if block_m == 0 {
        return Err(RoutingError::ZeroBlock);
    }
    let pairs = topk_ids.len();
    if i32::try_from(max_padded_len(pairs, experts, block_m)).is_err() {
        return Err(RoutingError::TooManyPairs { pairs });
    }
    let mut groups: Vec<Vec<i32>> = vec![Vec::new(); experts];
    for (p, &e) in topk_ids.iter().enumerate() {
        let group = usize::try_from(e).ok().and_then(|e| groups.get_mut(e));
        let group = group.ok_or(RoutingError::ExpertOutOfRange { pair: p, expert: e, experts })?;
        group.push(p as i32);
    }
    let sentinel = pairs as i32;
    let mut sorted_ids = Vec::with_capacity(max_padded_len(pairs, experts, block_m));
    let mut block_expert = Vec::new();
    for (e, group) in groups.iter().enumerate().filter(|(_, g)| !g.is_empty()) {
        let padded = group.len().next_multiple_of(block_m);
        sorted_ids.extend_from_slice(group);
        sorted_ids.resize(sorted_ids.len() + padded - group.len(), sentinel);
        block_expert.resize(block_expert.len() + padded / block_m, e as i32);
    }
    Ok(Routing { em: sorted_ids.len(), sorted_ids, block_expert, block_m, pairs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_pad_to_whole_blocks() {
        // 3 tokens, top-2, 4 experts: expert 1 gets 3 pairs, experts 0 and 3 one each, 2 none.
        let ids = [1, 3, 0, 1, 1, 0];
        let r = align_block_size(&ids, 4, 4).unwrap();
        let s = 6;
        assert_eq!(r.sorted_ids, vec![2, 5, s, s, 0, 3, 4, s, 1, s, s, s]);
        assert_eq!(r.block_expert, vec![0, 1, 3]);
        assert_eq!((r.em, r.sentinel()), (12, 6));
        assert!(r.em <= max_padded_len(6, 4, 4));
    }

    #[test]
    fn every_pair_appears_once_in_its_experts_block() {
        let (tokens, topk, experts, block_m) = (37, 3, 8, 16);
        let ids: Vec<i32> = (0..tokens * topk).map(|p| ((p * 5 + p / 7) % experts) as i32).collect();
        let r = align_block_size(&ids, experts, block_m).unwrap();
        assert_eq!(r.em % block_m, 0);
        assert_eq!(r.block_expert.len(), r.em / block_m);
        assert!(r.em <= max_padded_len(ids.len(), experts, block_m));
        let mut seen = vec![0; ids.len()];
        for (row, &p) in r.sorted_ids.iter().enumerate() {
            if p == r.sentinel() {
                continue;
            }
            seen[p as usize] += 1;
            assert_eq!(ids[p as usize], r.block_expert[row / block_m], "pair {p} in the wrong block");
        }
        assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
        assert_eq!(r.sorted_ids.iter().filter(|&&p| p == r.sentinel()).count(), r.em - ids.len());
    }

    #[test]
    fn bad_expert_is_named() {
        let err = align_block_size(&[0, 4], 4, 16).unwrap_err();
        assert_eq!(err, RoutingError::ExpertOutOfRange { pair: 1, expert: 4, experts: 4 });
        assert!(align_block_size(&[-1], 4, 16).is_err());
        assert_eq!(align_block_size(&[0], 4, 0).unwrap_err(), RoutingError::ZeroBlock);
    }

    #[test]
    fn moe_gateup_grid_covers_max_padded_len() {
        let t = crate::template::Catalog::embedded().get("moe_gateup").unwrap().clone();
        for (m, bm, tiles) in [(1, 8, 1), (16, 16, 2), (512, 32, 1), (3, 8, 4)] {
            let p = crate::template::parse_params(&[format!("M={m}"), format!("BLOCK_M={bm}"), format!("ROW_TILES={tiles}"), "WARPS=8".into(), "UNROLL=1".into()]);
            let k = t.render(&p.unwrap()).unwrap();
            let (pairs, tiles_n) = (m * 8, 1408 / (32 * tiles));
            assert_eq!(k.launch.grid[0] as usize, max_padded_len(pairs, 64, bm) / bm * tiles_n, "M={m} BLOCK_M={bm}");
        }
    }
}
