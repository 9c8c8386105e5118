//! The one progress-bar style of the tools (warm, the tuner's sweeps): a bar on stderr with
//! position, total, rate and ETA. Library code only counts on an `indicatif::ProgressBar`
//! (hidden where nothing should be drawn); the tools choose to draw it.

use indicatif::{ProgressBar, ProgressStyle};

/// A visible bar counting `unit` ("configs", "kernels"); set its length as the total is known.
pub fn bar(unit: &str) -> ProgressBar {
    let pb = ProgressBar::new(0);
    let template = format!("{{spinner}} [{{bar:30}}] {{pos}}/{{len}} {unit} · {{msg}} [{{elapsed}} elapsed, ETA {{eta}}]");
    pb.set_style(ProgressStyle::with_template(&template).expect("a valid template").progress_chars("=> "));
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    pb
}
