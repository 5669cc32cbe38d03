//! What `bench-ctr` measures besides start-up: exec latency, stdout throughput, file I/O in
//! the container's filesystem and in a volume, idle memory and the pod density it allows,
//! and the SVG plot of the ratios. Each function runs against one runtime in its own
//! containerd (`scenario::Env`), so runc and shoji are measured side by side in one run.
pub mod io;
pub mod memory;
pub mod plot;

use std::time::Duration;

/// One measured operation of one runtime.
pub struct Row {
    pub runtime: String,
    pub op: &'static str,
    /// min, median, max
    pub stats: (f64, f64, f64),
    pub unit: &'static str,
    /// For throughputs: more is better (the ratio reads the other way round).
    pub higher_is_better: bool,
}

impl Row {
    pub fn times(runtime: &str, op: &'static str, samples: Vec<Duration>) -> Row {
        Row {
            runtime: runtime.into(),
            op,
            stats: summary(samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect()),
            unit: "ms",
            higher_is_better: false,
        }
    }

    pub fn rates(runtime: &str, op: &'static str, samples: Vec<f64>) -> Row {
        Row {
            runtime: runtime.into(),
            op,
            stats: summary(samples),
            unit: "MB/s",
            higher_is_better: true,
        }
    }

    /// How much worse than `base` (≥ 1 is slower), whichever way the unit reads.
    pub fn ratio_to(&self, base: &Row) -> f64 {
        if self.higher_is_better {
            base.stats.1 / self.stats.1
        } else {
            self.stats.1 / base.stats.1
        }
    }
}

/// min, median, max.
pub fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// The table users compare: every row with its ratio to the first runtime's same row.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "| {:<8} | {:<34} | {:>5} | {:>8} | {:>8} | {:>8} | {:>6} |\n|---|---|---|---|---|---|---|\n",
        "runtime", "operation", "unit", "min", "median", "max", "ratio"
    );
    for r in rows {
        let base = rows.iter().find(|b| b.op == r.op).expect("r has its op");
        out += &format!(
            "| {:<8} | {:<34} | {:>5} | {:>8.1} | {:>8.1} | {:>8.1} | {:>5.2}× |\n",
            r.runtime,
            r.op,
            r.unit,
            r.stats.0,
            r.stats.1,
            r.stats.2,
            r.ratio_to(base)
        );
    }
    out
}
