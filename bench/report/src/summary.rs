//! Grouping runs and reducing them: each figure of a target is the median of its runs, and is
//! compared by ratio with the floor and with the best peer of the same group.

use std::collections::BTreeMap;

use crate::results::{Report, Run};

/// The target that is not a peer.
pub const CONFAB: &str = "confab";
/// The yardstick peer (unbatched).
pub const FLOOR: &str = "floor";
/// Display order of the known targets; others follow alphabetically.
const ORDER: [&str; 8] = [
    CONFAB,
    FLOOR,
    "floor-batched",
    "axum-broadcast",
    "axum-broadcast-tuned",
    "ws",
    "socketio",
    "gorilla",
];

/// Which way a figure improves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Smaller is better (latency, CPU, memory).
    Lower,
    /// Larger is better (throughput, handshakes/s).
    Higher,
}

/// Median of the values (mean of the middle two for an even count); `None` when empty.
/// NaNs are ignored.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

/// `value / reference`, or `None` when either is missing or the reference is not positive.
pub fn ratio(value: Option<f64>, reference: Option<f64>) -> Option<f64> {
    match (value, reference) {
        (Some(v), Some(r)) if r > 0.0 && r.is_finite() => Some(v / r),
        _ => None,
    }
}

/// The best of `(name, value)` candidates in the direction `better`; missing values never win.
pub fn best<'a>(
    candidates: impl IntoIterator<Item = (&'a str, Option<f64>)>,
    better: Better,
) -> Option<(&'a str, f64)> {
    candidates
        .into_iter()
        .filter_map(|(name, value)| value.map(|v| (name, v)))
        .reduce(|a, b| {
            let b_wins = match better {
                Better::Lower => b.1 < a.1,
                Better::Higher => b.1 > a.1,
            };
            if b_wins { b } else { a }
        })
}

/// The runs of one target in one group.
#[derive(Debug, Clone)]
pub struct TargetRuns {
    /// Target label.
    pub target: String,
    /// Its reports, one per run.
    pub runs: Vec<Report>,
}

impl TargetRuns {
    /// Median over the runs of a figure; runs where it is missing do not count.
    pub fn median(&self, figure: impl Fn(&Report) -> Option<f64>) -> Option<f64> {
        let values: Vec<f64> = self.runs.iter().filter_map(figure).collect();
        median(&values)
    }

    /// Largest value over the runs (for counts that must be zero: the worst run is shown).
    pub fn worst(&self, count: impl Fn(&Report) -> u64) -> u64 {
        self.runs.iter().map(count).max().unwrap_or(0)
    }

    /// Whether the generator was saturated in any run (the figures are then bounds).
    pub fn saturated(&self) -> bool {
        self.runs.iter().any(|r| r.generator.saturated)
    }

    /// Whether this target is one of the peers (everything but confab).
    pub fn is_peer(&self) -> bool {
        self.target != CONFAB
    }
}

/// Every target's runs for one workload and one parameter set (e.g. W1 at 500 msgs/s).
#[derive(Debug, Clone)]
pub struct Group {
    /// `w1` .. `w5`.
    pub workload: String,
    /// Parameter token (`r500`, `n19000`, ...).
    pub params: String,
    /// Publish rate asked for (median over every run of the group), messages/s.
    pub rate: f64,
    /// Targets in display order.
    pub targets: Vec<TargetRuns>,
}

impl Group {
    /// The runs of `target`, if it ran.
    pub fn target(&self, target: &str) -> Option<&TargetRuns> {
        self.targets.iter().find(|t| t.target == target)
    }

    /// The median of `figure` for the floor.
    pub fn floor(&self, figure: impl Fn(&Report) -> Option<f64>) -> Option<f64> {
        self.target(FLOOR).and_then(|t| t.median(figure))
    }

    /// The best peer's median of `figure`, and which peer it is.
    pub fn best_peer(
        &self,
        figure: impl Fn(&Report) -> Option<f64>,
        better: Better,
    ) -> Option<(&str, f64)> {
        best(
            self.targets
                .iter()
                .filter(|t| t.is_peer())
                .map(|t| (t.target.as_str(), t.median(&figure))),
            better,
        )
    }
}

/// Groups runs by (workload, params), ordered by workload then rate then params, each with its
/// targets in display order.
pub fn group(runs: &[Run]) -> Vec<Group> {
    let mut by_key: BTreeMap<(String, String), BTreeMap<String, Vec<Report>>> = BTreeMap::new();
    for run in runs {
        by_key
            .entry((run.workload.clone(), run.params.clone()))
            .or_default()
            .entry(run.target.clone())
            .or_default()
            .push(run.report.clone());
    }
    let mut groups: Vec<Group> = by_key
        .into_iter()
        .map(|((workload, params), targets)| {
            let rates: Vec<f64> = targets.values().flatten().map(|r| r.rate_target).collect();
            let mut targets: Vec<TargetRuns> = targets
                .into_iter()
                .map(|(target, runs)| TargetRuns { target, runs })
                .collect();
            targets.sort_by_key(|t| order_key(&t.target));
            Group {
                workload,
                params,
                rate: median(&rates).unwrap_or(0.0),
                targets,
            }
        })
        .collect();
    groups.sort_by(|a, b| {
        (a.workload.as_str(), a.rate, a.params.as_str())
            .partial_cmp(&(b.workload.as_str(), b.rate, b.params.as_str()))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    groups
}

/// Sort key putting known targets in [`ORDER`] and the rest after them, alphabetically.
pub fn order_key(target: &str) -> (usize, String) {
    let known = ORDER.iter().position(|&t| t == target);
    (known.unwrap_or(ORDER.len()), target.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 2.0, 4.0]), Some(3.0));
    }

    #[test]
    fn ratios_need_a_positive_reference() {
        assert_eq!(ratio(Some(4.2), Some(4.0)), Some(1.05));
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(2.0)), None);
        assert_eq!(ratio(Some(1.0), None), None);
    }

    #[test]
    fn best_follows_the_direction_and_skips_missing_values() {
        let candidates = [("a", Some(3.0)), ("b", None), ("c", Some(1.0))];
        assert_eq!(best(candidates, Better::Lower), Some(("c", 1.0)));
        assert_eq!(best(candidates, Better::Higher), Some(("a", 3.0)));
        assert_eq!(best([("x", None)], Better::Lower), None);
    }

    fn run(workload: &str, target: &str, params: &str, cpu: f64) -> Run {
        let report = Report {
            rate_target: 100.0,
            server: Some(crate::results::Server {
                cpu_us_per_delivery: Some(cpu),
                rss_kib_per_connection: None,
            }),
            ..Report::default()
        };
        Run {
            workload: workload.into(),
            target: target.into(),
            params: params.into(),
            report,
        }
    }

    #[test]
    fn groups_take_medians_and_compare_with_the_floor_and_best_peer() {
        let cpu = |r: &Report| r.server.as_ref().and_then(|s| s.cpu_us_per_delivery);
        let runs = vec![
            run("w1", "ws", "r100", 6.0),
            run("w1", "floor", "r100", 4.0),
            run("w1", "floor", "r100", 3.0),
            run("w1", "floor", "r100", 100.0),
            run("w1", "confab", "r100", 4.4),
            run("w1", "floor-batched", "r100", 3.9),
            run("w3", "confab", "n19000", 1.0),
        ];
        let groups = group(&runs);
        assert_eq!(groups.len(), 2);
        let w1 = &groups[0];
        let order: Vec<&str> = w1.targets.iter().map(|t| t.target.as_str()).collect();
        assert_eq!(order, ["confab", "floor", "floor-batched", "ws"]);
        assert_eq!(w1.floor(cpu), Some(4.0));
        // The best peer is the batched floor (3.9), not the floor's best single run (3.0).
        assert_eq!(
            w1.best_peer(cpu, Better::Lower),
            Some(("floor-batched", 3.9))
        );
        let confab = w1.target(CONFAB).unwrap().median(cpu);
        assert!((ratio(confab, w1.floor(cpu)).unwrap() - 1.1).abs() < 1e-9);
    }
}
