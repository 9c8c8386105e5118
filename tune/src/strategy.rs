//! Search strategies over a list of valid configs with a cost function (lower is better;
//! `None` = rejected): `exhaustive`, and `budgeted` — random sampling then local search over
//! neighbouring values, within a fixed number of cost evaluations.

use std::collections::{BTreeMap, HashSet};

use rand::seq::SliceRandom;
use rand::SeedableRng;

use mangrove_core::template::{format_params, Params};

/// How to search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Strategy {
    Exhaustive,
    /// At most `budget` evaluations: half random, the rest hill-climbing from the best.
    Budgeted { budget: usize, seed: u64 },
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Strategy::Exhaustive => f.write_str("exhaustive"),
            Strategy::Budgeted { budget, seed } => write!(f, "budgeted(budget={budget},seed={seed})"),
        }
    }
}

/// Every evaluated config with its cost, in evaluation order.
#[derive(Debug, Clone, Default)]
pub struct SearchResult {
    pub evaluated: Vec<(Params, Option<f64>)>,
}

impl SearchResult {
    /// Accepted configs, fastest first.
    pub fn ranked(&self) -> Vec<(Params, f64)> {
        let mut v: Vec<(Params, f64)> =
            self.evaluated.iter().filter_map(|(p, c)| c.map(|c| (p.clone(), c))).collect();
        v.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        v
    }
}

/// What a search evaluates: a cost per config, and a hint of the configs it will ask for
/// next (so their compiles can run in parallel ahead of the serial timing).
pub trait Evaluator {
    /// The configs about to be evaluated.
    fn prefetch(&mut self, _batch: &[Params]) {}
    /// Lower is better; `None` rejects the config.
    fn cost(&mut self, p: &Params) -> Option<f64>;
}

impl<F: FnMut(&Params) -> Option<f64>> Evaluator for F {
    fn cost(&mut self, p: &Params) -> Option<f64> {
        self(p)
    }
}

/// Runs `strategy` over `candidates`; `tunables` maps each tunable name to its ordered values
/// (neighbours differ in one tunable by one step). `seeds` (e.g. the template's default config)
/// are evaluated first and count against the budget, so a search never ends slower than them.
pub fn search(
    strategy: Strategy,
    candidates: &[Params],
    tunables: &BTreeMap<String, Vec<i64>>,
    seeds: &[Params],
    eval: &mut dyn Evaluator,
) -> SearchResult {
    let mut out = SearchResult::default();
    let seeds: Vec<Params> = seeds.iter().filter(|s| candidates.contains(s)).cloned().collect();
    match strategy {
        Strategy::Exhaustive => {
            eval.prefetch(candidates);
            for c in seeds.iter().chain(candidates.iter().filter(|c| !seeds.contains(c))) {
                out.evaluated.push((c.clone(), eval.cost(c)));
            }
        }
        Strategy::Budgeted { budget, seed } => {
            let valid: HashSet<String> = candidates.iter().map(format_params).collect();
            let mut seen: HashSet<String> = HashSet::new();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut order: Vec<&Params> = candidates.iter().collect();
            order.shuffle(&mut rng);
            let budget = budget.min(candidates.len());
            let random_phase = budget.div_ceil(2);
            let first: Vec<Params> = seeds
                .iter()
                .cloned()
                .chain(order.iter().filter(|p| !seeds.contains(p)).map(|p| (*p).clone()))
                .take(random_phase.max(seeds.len()))
                .collect();
            eval.prefetch(&first);
            for p in &first {
                seen.insert(format_params(p));
                out.evaluated.push((p.clone(), eval.cost(p)));
            }
            // Hill-climb: from the best accepted config, try its unseen neighbours; move on
            // improvement; when a point is a local optimum, restart from the next best.
            while out.evaluated.len() < budget {
                let ranked = out.ranked();
                let fresh = |n: &Params| {
                    let key = format_params(n);
                    valid.contains(&key) && !seen.contains(&key)
                };
                let next = ranked.iter().find_map(|(p, _)| {
                    let around: Vec<Params> = neighbours(p, tunables).into_iter().filter(fresh).collect();
                    (!around.is_empty()).then_some(around)
                });
                let p = match next {
                    Some(around) => {
                        eval.prefetch(&around);
                        around[0].clone()
                    }
                    // Every neighbour of every accepted point is seen: fall back to random.
                    None => match order.iter().find(|p| !seen.contains(&format_params(p))) {
                        Some(p) => (*p).clone(),
                        None => break,
                    },
                };
                seen.insert(format_params(&p));
                out.evaluated.push((p.clone(), eval.cost(&p)));
            }
        }
    }
    out
}

/// Configs that differ from `p` in one tunable by one step of its value list.
fn neighbours(p: &Params, tunables: &BTreeMap<String, Vec<i64>>) -> Vec<Params> {
    let mut out = Vec::new();
    for (name, values) in tunables {
        let Some(i) = p.get(name).and_then(|v| values.iter().position(|x| x == v)) else { continue };
        for j in [i.wrapping_sub(1), i + 1] {
            if let Some(&v) = values.get(j) {
                let mut n = p.clone();
                n.insert(name.clone(), v);
                out.push(n);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic landscape: a bowl with its minimum at (A=8, B=3), plus rejected corners.
    fn setup() -> (Vec<Params>, BTreeMap<String, Vec<i64>>) {
        let a = vec![1, 2, 4, 8, 16, 32];
        let b = vec![0, 1, 2, 3, 4, 5, 6];
        let mut c = Vec::new();
        for &x in &a {
            for &y in &b {
                c.push([("A".to_string(), x), ("B".to_string(), y)].into());
            }
        }
        (c, [("A".to_string(), a), ("B".to_string(), b)].into())
    }

    fn cost(p: &Params) -> Option<f64> {
        let (a, b) = (p["A"] as f64, p["B"] as f64);
        if a == 32.0 && b == 6.0 {
            return None;
        }
        Some((a.log2() - 3.0).powi(2) + (b - 3.0).powi(2) + 1.0)
    }

    #[test]
    fn exhaustive_finds_the_minimum() {
        let (c, t) = setup();
        let r = search(Strategy::Exhaustive, &c, &t, &[], &mut cost);
        assert_eq!(r.evaluated.len(), c.len());
        let best = &r.ranked()[0].0;
        assert_eq!((best["A"], best["B"]), (8, 3));
        assert_eq!(r.ranked().len(), c.len() - 1, "the rejected config is not ranked");
    }

    #[test]
    fn budgeted_finds_the_minimum_with_fewer_evaluations() {
        let (c, t) = setup();
        for seed in 0..20 {
            let r = search(Strategy::Budgeted { budget: 16, seed }, &c, &t, &[], &mut cost);
            assert!(r.evaluated.len() <= 16);
            let best = &r.ranked()[0].0;
            assert_eq!((best["A"], best["B"]), (8, 3), "seed {seed}");
            let distinct: HashSet<String> = r.evaluated.iter().map(|(p, _)| format_params(p)).collect();
            assert_eq!(distinct.len(), r.evaluated.len(), "no config evaluated twice");
        }
    }

    #[test]
    fn seeds_come_first_and_bound_the_result() {
        let (c, t) = setup();
        let seed: Params = [("A".to_string(), 8), ("B".to_string(), 3)].into();
        for strategy in [Strategy::Exhaustive, Strategy::Budgeted { budget: 2, seed: 5 }] {
            let r = search(strategy, &c, &t, std::slice::from_ref(&seed), &mut cost);
            assert_eq!(r.evaluated[0].0, seed, "{strategy}");
            assert_eq!(r.ranked()[0].0, seed, "{strategy}: nothing beats the optimum seed");
            assert_eq!(r.evaluated.iter().filter(|(p, _)| *p == seed).count(), 1);
        }
    }

    #[test]
    fn budget_larger_than_space_is_exhaustive() {
        let (c, t) = setup();
        let r = search(Strategy::Budgeted { budget: 1000, seed: 1 }, &c, &t, &[], &mut cost);
        assert_eq!(r.evaluated.len(), c.len());
    }
}
