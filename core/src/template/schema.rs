//! The on-disk parameter schema of one template (`kernel_templates/<name>.toml`): which
//! parameters it takes, which values each may hold, the constraints between them, and the
//! launch geometry as expressions over the parameters.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Whether a parameter describes the problem (shape) or the tunable configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamRole {
    /// Part of the problem (M, N, K, …): the tuner never varies it.
    Problem,
    /// A knob the tuner sweeps (tile, threads, split, …).
    Tunable,
}

/// One declared parameter: an integer with either a list of allowed values or an inclusive range.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    pub name: String,
    pub role: ParamRole,
    #[serde(default)]
    pub values: Option<Vec<i64>>,
    #[serde(default)]
    pub range: Option<[i64; 2]>,
    pub default: i64,
    #[serde(default)]
    pub doc: String,
}

impl ParamSpec {
    /// True when `v` is one of the allowed values / inside the range.
    pub fn allows(&self, v: i64) -> bool {
        match (&self.values, &self.range) {
            (Some(vals), _) => vals.contains(&v),
            (None, Some([lo, hi])) => (*lo..=*hi).contains(&v),
            (None, None) => true,
        }
    }

    /// Human-readable description of the allowed values, for error messages.
    pub fn allowed_text(&self) -> String {
        match (&self.values, &self.range) {
            (Some(vals), _) => format!("one of {vals:?}"),
            (None, Some([lo, hi])) => format!("in {lo}..={hi}"),
            (None, None) => "any integer".into(),
        }
    }
}

/// Launch geometry as integer expressions over the parameters.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchSpec {
    pub grid: [String; 3],
    pub block: [String; 3],
    pub shared_bytes: String,
    /// The kernel executes `griddepcontrol.wait` before it touches memory an earlier kernel
    /// writes, so it may be launched with programmatic dependent launch (Hopper+).
    #[serde(default)]
    pub pdl: bool,
}

/// The whole schema file.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    pub name: String,
    /// `extern "C"` symbol of the kernel in the rendered source.
    pub entry: String,
    pub description: String,
    pub params: Vec<ParamSpec>,
    /// Human-readable name → boolean expression that must hold.
    #[serde(default)]
    pub constraints: BTreeMap<String, String>,
    pub launch: LaunchSpec,
    /// Representative parameter overrides: the catalog CI and `mangrove warm` compile.
    #[serde(default)]
    pub samples: Vec<BTreeMap<String, i64>>,
}
