//! Loading the JSON reports that `bench/run.sh` writes (`confab bench --json` plus a `driver`
//! object saying what ran). Only the fields the tables and plots use are read; the rest of
//! the file is ignored, so the generator may add fields freely.

use std::path::Path;

use serde::Deserialize;

/// Percentiles of one histogram, in the unit its field name says.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct Percentiles {
    /// Median.
    #[serde(default)]
    pub p50: f64,
    /// 99th percentile.
    #[serde(default)]
    pub p99: f64,
    /// 99.9th percentile.
    #[serde(default)]
    pub p999: f64,
    /// Largest value.
    #[serde(default)]
    pub max: f64,
}

/// The server's cost, read from `/proc` by the generator.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Server {
    /// Server CPU time per delivered message during the window, µs.
    pub cpu_us_per_delivery: Option<f64>,
    /// Server RSS growth per connection, KiB.
    pub rss_kib_per_connection: Option<f64>,
}

/// The generator's own cost.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Generator {
    /// It used ≥ 90 % of its cores: throughput figures are lower bounds, latencies upper bounds.
    #[serde(default)]
    pub saturated: bool,
}

/// One second of a run's timeline.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Second {
    /// Whether it ended inside the measured window.
    #[serde(default)]
    pub in_window: bool,
    /// p99 latency of what arrived in it, ms (none when nothing did).
    pub p99_ms: Option<f64>,
    /// The same to the kernel's receive timestamp, without the generator's delay in reading
    /// (absent in older reports and runs without receive timestamps).
    #[serde(default)]
    pub arrival_p99_ms: Option<f64>,
    /// How late the generator's own runtime was at worst in it, ms (absent in older reports).
    pub generator_late_ms: Option<f64>,
}

/// Durable mode (W4).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Durable {
    /// Acks per second.
    pub acked_per_s: f64,
    /// Send → ack, µs.
    pub ack_latency_us: Percentiles,
}

/// Resume mode (W5).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Resume {
    /// Clients that caught up.
    pub caught_up: u64,
    /// Storm start → last client caught up, ms.
    pub all_caught_up_ms: f64,
    /// Per-client catch-up time, ms.
    pub catch_up_ms: Percentiles,
    /// Messages received by all clients together.
    pub messages: u64,
    /// Seqs missing.
    pub gaps: u64,
    /// Seqs received twice.
    pub duplicates: u64,
}

/// What `bench/run.sh` ran, added to the generator's report.
#[derive(Debug, Clone, Deserialize)]
pub struct Driver {
    /// `w1` .. `w5`.
    pub workload: String,
    /// Target label: `confab`, `floor`, `floor-batched`, ...
    pub target: String,
    /// Parameter token of the file name (`r100`, `n19000`, ...).
    pub params: String,
    /// Run number.
    pub run: u32,
}

/// The fields of one `confab bench` report that the report uses.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Report {
    /// Connections asked for.
    #[serde(default)]
    pub connections_requested: u64,
    /// Connections that connected and joined.
    #[serde(default)]
    pub connections: u64,
    /// Aggregate publish rate asked for, messages/s (0 = as fast as possible).
    #[serde(default)]
    pub rate_target: f64,
    /// Published per second in the window.
    #[serde(default)]
    pub published_per_s: f64,
    /// Delivered per second in the window.
    #[serde(default)]
    pub delivered_per_s: f64,
    /// End-to-end latency, µs.
    #[serde(default)]
    pub latency_us: Percentiles,
    /// The same to when each frame reached the generator's socket (kernel receive timestamp),
    /// µs; absent in older reports and runs without receive timestamps.
    #[serde(default)]
    pub arrival_latency_us: Option<Percentiles>,
    /// Connect time, ms.
    #[serde(default)]
    pub connect_ms: Percentiles,
    /// Connections set up per second.
    #[serde(default)]
    pub handshakes_per_s: f64,
    /// Failures of any kind.
    #[serde(default)]
    pub errors: u64,
    /// Deliveries owed but never received.
    #[serde(default)]
    pub lost: u64,
    /// Deliveries received twice.
    #[serde(default)]
    pub duplicated: u64,
    /// Server figures (with `--server-pid`).
    pub server: Option<Server>,
    /// Generator figures.
    #[serde(default)]
    pub generator: Generator,
    /// W4 figures.
    pub durable: Option<Durable>,
    /// W5 figures.
    pub resume: Option<Resume>,
    /// Second by second (absent in older reports).
    #[serde(default)]
    pub timeline: Vec<Second>,
    /// What ran (absent in reports not written by `bench/run.sh`).
    pub driver: Option<Driver>,
}

/// One run: which workload, target and parameters, and its report.
#[derive(Debug, Clone)]
pub struct Run {
    /// `w1` .. `w5`.
    pub workload: String,
    /// Target label.
    pub target: String,
    /// Parameter token (`r100`, `n19000`, ...).
    pub params: String,
    /// The figures.
    pub report: Report,
}

/// Splits a result file name `WORKLOAD-TARGET-PARAMS-runN` (without `.json`) into its parts;
/// the target may itself contain dashes (`axum-broadcast-tuned`).
pub fn parse_name(stem: &str) -> Option<(String, String, String, u32)> {
    let parts: Vec<&str> = stem.split('-').collect();
    if parts.len() < 4 {
        return None;
    }
    let run = parts[parts.len() - 1].strip_prefix("run")?.parse().ok()?;
    let workload = parts[0];
    if !(workload.len() == 2 && workload.starts_with('w')) {
        return None;
    }
    let params = parts[parts.len() - 2];
    let target = parts[1..parts.len() - 2].join("-");
    Some((workload.into(), target, params.into(), run))
}

/// Reads every `*.json` result in `dir` (not recursively). Files that are not results are
/// skipped with a warning in the second list.
pub fn load_dir(dir: &Path) -> std::io::Result<(Vec<Run>, Vec<String>)> {
    let mut runs = Vec::new();
    let mut warnings = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        let report: Report = match serde_json::from_str(&text) {
            Ok(report) => report,
            Err(error) => {
                warnings.push(format!(
                    "{}: not a confab bench report: {error}",
                    path.display()
                ));
                continue;
            }
        };
        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
        let named = match &report.driver {
            Some(d) => Some((
                d.workload.clone(),
                d.target.clone(),
                d.params.clone(),
                d.run,
            )),
            None => parse_name(&stem),
        };
        let Some((workload, target, params, _run)) = named else {
            warnings.push(format!(
                "{}: no driver object and not named WORKLOAD-TARGET-PARAMS-runN.json",
                path.display()
            ));
            continue;
        };
        runs.push(Run {
            workload,
            target,
            params,
            report,
        });
    }
    Ok((runs, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_dashed_targets_parse() {
        assert_eq!(
            parse_name("w1-axum-broadcast-tuned-r500-run2"),
            Some(("w1".into(), "axum-broadcast-tuned".into(), "r500".into(), 2))
        );
        assert_eq!(
            parse_name("w3-confab-n19000-run1"),
            Some(("w3".into(), "confab".into(), "n19000".into(), 1))
        );
        assert_eq!(parse_name("machine"), None);
        assert_eq!(parse_name("w1-confab-r100-last"), None);
    }
}
