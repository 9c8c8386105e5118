//! Stage 1 — templates. Takes a template name plus parameter overrides, validates them
//! against the template's declared schema (allowed values, constraints), and gives a
//! [`RenderedKernel`]: CUDA source, entry symbol, the full sorted parameter set and the launch
//! geometry. Nothing is compiled here.

mod schema;

use std::collections::BTreeMap;
use std::path::Path;

use evalexpr::{ContextWithMutableVariables, DefaultNumericTypes, HashMapContext, Value};
pub use schema::{LaunchSpec, ParamRole, ParamSpec, Schema};

/// A full, validated parameter assignment in sorted order (the order keys hash in).
pub type Params = BTreeMap<String, i64>;

/// Errors of the template stage; each names the template and the offending parameter.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown template '{name}' (known: {known})")]
    UnknownTemplate { name: String, known: String },
    #[error("template '{template}' has no parameter '{param}' (it takes: {known})")]
    UnknownParam { template: String, param: String, known: String },
    #[error("template '{template}': {param}={value} is out of range (allowed: {allowed})")]
    OutOfRange { template: String, param: String, value: i64, allowed: String },
    #[error("template '{template}': constraint violated: {name} ({expr}) with {params}")]
    ConstraintViolated { template: String, name: String, expr: String, params: String },
    #[error("template '{template}': cannot evaluate '{expr}': {reason}")]
    BadExpression { template: String, expr: String, reason: String },
    #[error("bad parameter '{0}': expected NAME=INTEGER")]
    BadParamSyntax(String),
    #[error("template '{template}': schema error: {reason}")]
    Schema { template: String, reason: String },
    #[error("template '{template}': render failed: {reason}")]
    Render { template: String, reason: String },
    #[error("reading templates from {path}")]
    Io { path: String, source: std::io::Error },
}

/// Which config stands in for "untuned" on a problem ([`Template::baseline`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Baseline {
    /// The template's declared defaults.
    Default,
    /// The defaults violate a constraint here; the first valid config is used instead.
    FirstValid { default_invalid: String },
}

impl Baseline {
    /// Why the baseline is not the template default (None when it is).
    pub fn reason(&self) -> Option<String> {
        match self {
            Baseline::Default => None,
            Baseline::FirstValid { default_invalid } => Some(format!("template default invalid ({default_invalid}); baseline is the first valid config")),
        }
    }
}

/// One template: its schema, its Tera source and a content hash of both.
#[derive(Debug, Clone)]
pub struct Template {
    pub schema: Schema,
    pub source: String,
    /// blake3 of schema text and template text (hex); part of every kernel key.
    pub content_hash: String,
    /// The source parsed once, so a render (every cache hit) does not re-parse it.
    engine: tera::Tera,
}

/// Launch geometry of one rendered kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LaunchDims {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
    /// Launchable with programmatic dependent launch (see `LaunchSpec::pdl`).
    pub pdl: bool,
}

/// A template rendered for one full parameter set.
#[derive(Debug, Clone)]
pub struct RenderedKernel {
    pub template: String,
    pub template_hash: String,
    pub entry: String,
    pub params: Params,
    pub source: String,
    pub launch: LaunchDims,
}

impl RenderedKernel {
    /// The rendered template text without the prelude; compiler line numbers count from its
    /// first line.
    pub fn body(&self) -> &str {
        self.source.strip_prefix(PRELUDE).and_then(|s| s.strip_prefix(BODY_START)).unwrap_or(&self.source)
    }
}

impl Template {
    /// Parses a template from its schema TOML and Tera source.
    pub fn parse(schema_text: &str, source: &str) -> Result<Self, TemplateError> {
        let schema: Schema = toml::from_str(schema_text).map_err(|e| TemplateError::Schema {
            template: "<unparsed>".into(),
            reason: e.to_string(),
        })?;
        for p in &schema.params {
            if !p.allows(p.default) {
                return Err(TemplateError::Schema {
                    template: schema.name.clone(),
                    reason: format!("default {}={} is not {}", p.name, p.default, p.allowed_text()),
                });
            }
        }
        let mut engine = tera::Tera::default();
        engine.add_raw_template(&schema.name, source).map_err(|e| TemplateError::Render {
            template: schema.name.clone(),
            reason: error_chain(&e),
        })?;
        let t = Self { schema, source: source.to_owned(), content_hash: String::new(), engine };
        for sample in &t.schema.samples {
            t.resolve(sample).map_err(|e| TemplateError::Schema { template: t.name().into(), reason: format!("sample {sample:?}: {e}") })?;
        }
        let mut h = blake3::Hasher::new();
        for part in [schema_text, source, PRELUDE, BODY_START] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        Ok(Self { content_hash: h.finalize().to_hex().to_string(), ..t })
    }

    pub fn name(&self) -> &str {
        &self.schema.name
    }

    /// The parameter spec called `name`, if declared.
    pub fn param(&self, name: &str) -> Option<&ParamSpec> {
        self.schema.params.iter().find(|p| p.name == name)
    }

    /// Defaults for every parameter.
    pub fn defaults(&self) -> Params {
        self.schema.params.iter().map(|p| (p.name.clone(), p.default)).collect()
    }

    /// Defaults overridden by `overrides`, checked for unknown names, range and constraints.
    pub fn resolve(&self, overrides: &Params) -> Result<Params, TemplateError> {
        let mut params = self.defaults();
        for (k, v) in overrides {
            let spec = self.param(k).ok_or_else(|| TemplateError::UnknownParam {
                template: self.name().into(),
                param: k.clone(),
                known: self.schema.params.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", "),
            })?;
            if !spec.allows(*v) {
                return Err(TemplateError::OutOfRange {
                    template: self.name().into(),
                    param: k.clone(),
                    value: *v,
                    allowed: spec.allowed_text(),
                });
            }
            params.insert(k.clone(), *v);
        }
        self.check_constraints(&params)?;
        Ok(params)
    }

    /// Every combination of the tunables' values (each filtered by `values`, declared order,
    /// the last tunable varying fastest) over `problem`, unchecked.
    pub fn tunable_combos(&self, problem: &Params, values: impl Fn(&ParamSpec) -> Vec<i64>) -> Vec<Params> {
        let mut combos: Vec<Params> = vec![problem.clone()];
        for spec in self.schema.params.iter().filter(|p| p.role == ParamRole::Tunable) {
            let vs = values(spec);
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    vs.iter().map(move |&v| {
                        let mut c = c.clone();
                        c.insert(spec.name.clone(), v);
                        c
                    })
                })
                .collect();
        }
        combos
    }

    /// The config a sweep's baseline and an untuned plan use for `problem`: the template
    /// defaults when they are valid there, else the first valid config in
    /// [`Template::tunable_combos`] order, with why the defaults were not taken.
    pub fn baseline(&self, problem: &Params) -> Result<(Params, Baseline), TemplateError> {
        let default_err = match self.resolve(problem) {
            Ok(p) => return Ok((p, Baseline::Default)),
            Err(e) => e,
        };
        let all = |s: &ParamSpec| s.values.clone().unwrap_or_else(|| vec![s.default]);
        self.tunable_combos(problem, all)
            .iter()
            .find_map(|c| self.resolve(c).ok())
            .map(|p| (p, Baseline::FirstValid { default_invalid: default_err.to_string() }))
            .ok_or(default_err)
    }

    /// Checks every declared constraint; the first violated one is the error.
    pub fn check_constraints(&self, params: &Params) -> Result<(), TemplateError> {
        let ctx = self.context(params)?;
        for (name, expr) in &self.schema.constraints {
            let ok = evalexpr::eval_boolean_with_context(expr, &ctx).map_err(|e| self.bad_expr(expr, e))?;
            if !ok {
                return Err(TemplateError::ConstraintViolated {
                    template: self.name().into(),
                    name: name.clone(),
                    expr: expr.clone(),
                    params: format_params(params),
                });
            }
        }
        Ok(())
    }

    /// Evaluates an integer expression of the schema (launch geometry) for `params`.
    pub fn eval_int(&self, expr: &str, params: &Params) -> Result<i64, TemplateError> {
        let ctx = self.context(params)?;
        evalexpr::eval_int_with_context(expr, &ctx).map_err(|e| self.bad_expr(expr, e))
    }

    /// Renders the source for a resolved parameter set.
    pub fn render(&self, overrides: &Params) -> Result<RenderedKernel, TemplateError> {
        let params = self.resolve(overrides)?;
        let mut ctx = tera::Context::new();
        for (k, v) in &params {
            ctx.insert(k.as_str(), v);
        }
        let body = self.engine.render(self.name(), &ctx).map_err(|e| TemplateError::Render {
            template: self.name().into(),
            reason: error_chain(&e),
        })?;
        let source = format!("{PRELUDE}{BODY_START}{body}");
        let dim = |e: &str| -> Result<u32, TemplateError> {
            let v = self.eval_int(e, &params)?;
            u32::try_from(v).map_err(|_| TemplateError::BadExpression {
                template: self.name().into(),
                expr: e.into(),
                reason: format!("value {v} does not fit a launch dimension"),
            })
        };
        let l = &self.schema.launch;
        let launch = LaunchDims {
            grid: [dim(&l.grid[0])?, dim(&l.grid[1])?, dim(&l.grid[2])?],
            block: [dim(&l.block[0])?, dim(&l.block[1])?, dim(&l.block[2])?],
            shared_bytes: dim(&l.shared_bytes)?,
            pdl: l.pdl,
        };
        Ok(RenderedKernel {
            template: self.name().into(),
            template_hash: self.content_hash.clone(),
            entry: self.schema.entry.clone(),
            params,
            source,
            launch,
        })
    }

    fn context(&self, params: &Params) -> Result<HashMapContext<DefaultNumericTypes>, TemplateError> {
        let mut ctx = HashMapContext::<DefaultNumericTypes>::new();
        for (k, v) in params {
            ctx.set_value(k.clone(), Value::Int(*v)).map_err(|e| self.bad_expr(k, e))?;
        }
        Ok(ctx)
    }

    fn bad_expr(&self, expr: &str, e: impl std::fmt::Display) -> TemplateError {
        TemplateError::BadExpression { template: self.name().into(), expr: expr.into(), reason: e.to_string() }
    }
}

/// The set of templates a process knows: the embedded catalog, or a directory of them.
#[derive(Debug, Clone)]
pub struct Catalog {
    templates: BTreeMap<String, Template>,
}

/// CUDA text prepended to every rendered source (shared macros such as `GRID_DEP_WAIT`).
pub const PRELUDE: &str = include_str!("../../../kernel_templates/prelude.cuh");

/// Between the prelude and the template's text: compiler messages count lines from the
/// template's first line again.
const BODY_START: &str = "#line 1\n";

/// Templates compiled into the binary: (schema TOML, Tera source).
const EMBEDDED: &[(&str, &str)] = &[
    (
        include_str!("../../../kernel_templates/ternary_gemv.toml"),
        include_str!("../../../kernel_templates/ternary_gemv.cu.tera"),
    ),
    (
        include_str!("../../../kernel_templates/ternary_gemv_w2a8.toml"),
        include_str!("../../../kernel_templates/ternary_gemv_w2a8.cu.tera"),
    ),
    (
        include_str!("../../../kernel_templates/ternary_gemm_w2a8.toml"),
        include_str!("../../../kernel_templates/ternary_gemm_w2a8.cu.tera"),
    ),
    (
        include_str!("../../../kernel_templates/moe_gateup.toml"),
        include_str!("../../../kernel_templates/moe_gateup.cu.tera"),
    ),
    (
        include_str!("../../../kernel_templates/moe_down.toml"),
        include_str!("../../../kernel_templates/moe_down.cu.tera"),
    ),
    (
        include_str!("../../../kernel_templates/moe_route.toml"),
        include_str!("../../../kernel_templates/moe_route.cu.tera"),
    ),
    (
        include_str!("../../../kernel_templates/rmsnorm_quant.toml"),
        include_str!("../../../kernel_templates/rmsnorm_quant.cu.tera"),
    ),
    (
        include_str!("../../../kernel_templates/sample_tokens.toml"),
        include_str!("../../../kernel_templates/sample_tokens.cu.tera"),
    ),
    (
        include_str!("../../../kernel_templates/rope_kv.toml"),
        include_str!("../../../kernel_templates/rope_kv.cu.tera"),
    ),
    (
        include_str!("../../../kernel_templates/attention_decode.toml"),
        include_str!("../../../kernel_templates/attention_decode.cu.tera"),
    ),
    (
        include_str!("../../../kernel_templates/lm_head.toml"),
        include_str!("../../../kernel_templates/lm_head.cu.tera"),
    ),
    (
        include_str!("../../../kernel_templates/moe_combine.toml"),
        include_str!("../../../kernel_templates/moe_combine.cu.tera"),
    ),
    (
        include_str!("../../../kernel_templates/decode_layer.toml"),
        include_str!("../../../kernel_templates/decode_layer.cu.tera"),
    ),
];

impl Catalog {
    /// The templates shipped inside the binary (`kernel_templates/` at build time).
    pub fn embedded() -> Self {
        let templates = EMBEDDED
            .iter()
            .map(|(schema, src)| {
                let t = Template::parse(schema, src).expect("embedded template schema is valid (tested)");
                (t.name().to_owned(), t)
            })
            .collect();
        Self { templates }
    }

    /// Loads every `<name>.toml` + `<name>.cu.tera` pair from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, TemplateError> {
        let io = |source: std::io::Error| TemplateError::Io { path: dir.display().to_string(), source };
        let mut templates = BTreeMap::new();
        let mut entries: Vec<_> = std::fs::read_dir(dir).map_err(io)?.collect::<Result<_, _>>().map_err(io)?;
        entries.sort_by_key(|e| e.path());
        for entry in entries {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let src_path = path.with_extension("cu.tera");
            let schema = std::fs::read_to_string(&path).map_err(io)?;
            let src = std::fs::read_to_string(&src_path).map_err(|source| TemplateError::Io { path: src_path.display().to_string(), source })?;
            let t = Template::parse(&schema, &src)?;
            templates.insert(t.name().to_owned(), t);
        }
        Ok(Self { templates })
    }

    /// The template called `name`, or an error listing the known ones.
    pub fn get(&self, name: &str) -> Result<&Template, TemplateError> {
        self.templates.get(name).ok_or_else(|| TemplateError::UnknownTemplate {
            name: name.into(),
            known: self.templates.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Template> {
        self.templates.values()
    }

    /// Every template rendered at each of its representative samples.
    pub fn samples(&self) -> Result<Vec<RenderedKernel>, TemplateError> {
        self.iter().flat_map(|t| t.schema.samples.iter().map(move |s| t.render(s))).collect()
    }
}

/// Parses `NAME=INTEGER` command-line parameters.
pub fn parse_params<S: AsRef<str>>(items: &[S]) -> Result<Params, TemplateError> {
    items
        .iter()
        .map(|s| {
            let s = s.as_ref();
            let (k, v) = s.split_once('=').ok_or_else(|| TemplateError::BadParamSyntax(s.into()))?;
            let v: i64 = v.trim().parse().map_err(|_| TemplateError::BadParamSyntax(s.into()))?;
            Ok((k.trim().to_owned(), v))
        })
        .collect()
}

/// `A=1 B=2` in sorted order, for messages and tables.
pub fn format_params(params: &Params) -> String {
    params.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gemv() -> Template {
        Catalog::embedded().get("ternary_gemv").unwrap().clone()
    }

    #[test]
    fn defaults_render_and_satisfy_constraints() {
        let k = gemv().render(&Params::new()).unwrap();
        assert!(k.source.contains("#define THREADS 256"));
        assert_eq!(k.launch.block, [256, 1, 1]);
        assert_eq!(k.launch.grid, [(2560 / 4u32).div_ceil(8), 1, 1]);
    }

    #[test]
    fn unknown_param_is_named() {
        let err = gemv().render(&parse_params(&["TILE=3"]).unwrap()).unwrap_err();
        assert!(matches!(err, TemplateError::UnknownParam { ref param, .. } if param == "TILE"), "{err}");
    }

    #[test]
    fn out_of_range_is_named() {
        let err = gemv().render(&parse_params(&["THREADS=96"]).unwrap()).unwrap_err();
        assert!(err.to_string().contains("THREADS=96"), "{err}");
        let err = gemv().render(&parse_params(&["M=9"]).unwrap()).unwrap_err();
        assert!(err.to_string().contains("M=9"), "{err}");
    }

    #[test]
    fn violated_constraint_is_named() {
        let err = gemv().render(&parse_params(&["K=1000", "VEC=16"]).unwrap()).unwrap_err();
        assert!(err.to_string().contains("K % VEC == 0"), "{err}");
        let err = gemv().render(&parse_params(&["N=2562"]).unwrap()).unwrap_err();
        assert!(err.to_string().contains("N % 4 == 0"), "{err}");
    }

    #[test]
    fn bad_param_syntax() {
        assert!(matches!(parse_params(&["K"]), Err(TemplateError::BadParamSyntax(_))));
        assert!(matches!(parse_params(&["K=abc"]), Err(TemplateError::BadParamSyntax(_))));
    }

    #[test]
    fn unknown_template_lists_known() {
        let err = Catalog::embedded().get("nope").unwrap_err();
        assert!(err.to_string().contains("ternary_gemv"), "{err}");
    }

    #[test]
    fn directory_catalog_matches_embedded() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernel_templates");
        let from_dir = Catalog::from_dir(&dir).unwrap();
        for t in Catalog::embedded().iter() {
            assert_eq!(from_dir.get(t.name()).unwrap().content_hash, t.content_hash);
        }
    }
}
