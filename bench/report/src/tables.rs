//! Markdown tables, one section per workload. Every figure is the median of a target's runs;
//! lost, duplicated and errors are the worst run's (they must be zero in every run).

use std::fmt::Write as _;

use crate::results::Report;
use crate::summary::{Better, Group, TargetRuns, best, ratio};

/// p99 latency above which a W1 rate does not count as sustained, µs.
pub const SUSTAINED_P99_US: f64 = 50_000.0;

fn cpu(r: &Report) -> Option<f64> {
    r.server.as_ref().and_then(|s| s.cpu_us_per_delivery)
}

fn rss(r: &Report) -> Option<f64> {
    r.server.as_ref().and_then(|s| s.rss_kib_per_connection)
}

/// A number with a precision that suits its size, `-` when missing.
fn num(value: Option<f64>) -> String {
    match value {
        None => "-".into(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

/// A count (a median may fall between two runs' counts), `-` when missing.
fn int(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{v:.0}"))
}

/// A latency given in µs, shown in ms.
fn ms(us: Option<f64>) -> String {
    num(us.map(|v| v / 1000.0))
}

fn times(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}x"))
}

/// Notes for a target's row: bounds and missing connections.
fn notes(t: &TargetRuns) -> String {
    let mut notes = Vec::new();
    if t.saturated() {
        notes.push("generator saturated: bounds".to_string());
    }
    let short = t
        .runs
        .iter()
        .filter(|r| r.connections < r.connections_requested)
        .count();
    if short > 0 {
        notes.push(format!("{short} run(s) short of connections"));
    }
    notes.join("; ")
}

fn row(out: &mut String, cells: &[String]) {
    let _ = writeln!(out, "| {} |", cells.join(" | "));
}

fn header(out: &mut String, names: &[&str]) {
    row(
        out,
        &names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    );
    row(
        out,
        &names.iter().map(|_| "---".to_string()).collect::<Vec<_>>(),
    );
}

fn best_note(out: &mut String, what: &str, best: Option<(&str, f64)>) {
    if let Some((name, value)) = best {
        let _ = writeln!(
            out,
            "\nBest peer for {what}: {name} ({}).",
            num(Some(value))
        );
    }
}

/// A fan-out table (W1 at one rate, or W2): throughput, latency, server CPU per delivery
/// with its ratios to the floor and to the best peer, and loss.
fn fanout_table(out: &mut String, group: &Group) {
    let floor = group.floor(cpu);
    let best_peer = group.best_peer(cpu, Better::Lower);
    header(
        out,
        &[
            "target",
            "runs",
            "conns",
            "published/s",
            "delivered/s",
            "p50 ms",
            "p99 ms",
            "p99 at arrival ms",
            "p99.9 ms",
            "max ms",
            "CPU µs/delivery",
            "× floor",
            "× best peer",
            "lost",
            "dup",
            "errors",
            "notes",
        ],
    );
    for t in &group.targets {
        let cpu_median = t.median(cpu);
        row(
            out,
            &[
                t.target.clone(),
                t.runs.len().to_string(),
                int(t.median(|r| Some(r.connections as f64))),
                num(t.median(|r| Some(r.published_per_s))),
                num(t.median(|r| Some(r.delivered_per_s))),
                ms(t.median(|r| Some(r.latency_us.p50))),
                ms(t.median(|r| Some(r.latency_us.p99))),
                ms(t.median(|r| r.arrival_latency_us.as_ref().map(|a| a.p99))),
                ms(t.median(|r| Some(r.latency_us.p999))),
                ms(t.median(|r| Some(r.latency_us.max))),
                num(cpu_median),
                times(ratio(cpu_median, floor)),
                times(ratio(cpu_median, best_peer.map(|b| b.1))),
                t.worst(|r| r.lost).to_string(),
                t.worst(|r| r.duplicated).to_string(),
                t.worst(|r| r.errors).to_string(),
                notes(t),
            ],
        );
    }
    best_note(out, "CPU per delivery", best_peer);
}

/// Whether a target sustained its group's rate: median p99 under [`SUSTAINED_P99_US`] and no
/// loss, duplicate or error in any run.
pub fn sustained(t: &TargetRuns) -> bool {
    t.median(|r| Some(r.latency_us.p99))
        .is_some_and(|p99| p99 > 0.0 && p99 < SUSTAINED_P99_US)
        && t.worst(|r| r.lost + r.duplicated + r.errors) == 0
}

/// W1: one table per rate, then each target's highest sustained rate.
fn w1(out: &mut String, groups: &[&Group]) {
    let _ = writeln!(
        out,
        "## W1 fan-out: 1 room, one publisher, rising rates\n\n\
         Latencies are end to end (publisher → every subscriber). `× floor` and `× best peer` \
         divide the server CPU per delivery by the floor's and by the best peer's at the same \
         rate (lower is better)."
    );
    for group in groups {
        let _ = writeln!(
            out,
            "\n### {} messages/s ({})\n",
            num(Some(group.rate)),
            group.params
        );
        fanout_table(out, group);
    }
    // Highest sustained rate of each target over the rates tried.
    let mut targets: Vec<&str> = groups
        .iter()
        .flat_map(|g| g.targets.iter().map(|t| t.target.as_str()))
        .collect();
    targets.sort_by_key(|t| crate::summary::order_key(t));
    targets.dedup();
    let max_rate = |target: &str| -> Option<f64> {
        groups
            .iter()
            .filter(|g| g.target(target).is_some_and(sustained))
            .map(|g| g.rate)
            .reduce(f64::max)
    };
    let best_peer = best(
        targets
            .iter()
            .filter(|&&t| t != crate::summary::CONFAB)
            .map(|&t| (t, max_rate(t))),
        Better::Higher,
    );
    let _ = writeln!(
        out,
        "\n### Highest sustained rate\n\nThe highest rate tried at which the median p99 stayed \
         under {} ms with no loss, duplicate or error in any run (higher is better).\n",
        SUSTAINED_P99_US / 1000.0
    );
    header(out, &["target", "messages/s", "× best peer"]);
    for target in targets {
        let rate = max_rate(target);
        row(
            out,
            &[
                target.to_string(),
                num(rate),
                times(ratio(rate, best_peer.map(|b| b.1))),
            ],
        );
    }
}

/// W3: memory per idle connection and handshakes per second.
fn w3(out: &mut String, group: &Group) {
    let floor = group.floor(rss);
    let best_rss = group.best_peer(rss, Better::Lower);
    let hs = |r: &Report| Some(r.handshakes_per_s);
    let best_hs = group.best_peer(hs, Better::Higher);
    header(
        out,
        &[
            "target",
            "runs",
            "conns",
            "RSS KiB/conn",
            "× floor",
            "× best peer",
            "handshakes/s",
            "× best peer",
            "connect p99 ms",
            "errors",
            "notes",
        ],
    );
    for t in &group.targets {
        let rss_median = t.median(rss);
        let hs_median = t.median(hs);
        row(
            out,
            &[
                t.target.clone(),
                t.runs.len().to_string(),
                int(t.median(|r| Some(r.connections as f64))),
                num(rss_median),
                times(ratio(rss_median, floor)),
                times(ratio(rss_median, best_rss.map(|b| b.1))),
                num(hs_median),
                times(ratio(hs_median, best_hs.map(|b| b.1))),
                num(t.median(|r| Some(r.connect_ms.p99))),
                t.worst(|r| r.errors).to_string(),
                notes(t),
            ],
        );
    }
    best_note(out, "RSS per connection (lower is better)", best_rss);
    best_note(out, "handshakes/s (higher is better)", best_hs);
}

/// W4: acked messages per second and ack latency.
fn w4(out: &mut String, group: &Group) {
    header(
        out,
        &[
            "target",
            "runs",
            "senders",
            "acked/s",
            "ack p50 ms",
            "ack p99 ms",
            "ack p99.9 ms",
            "CPU µs/delivery",
            "lost",
            "dup",
            "errors",
            "notes",
        ],
    );
    let ack = |pick: fn(&crate::results::Percentiles) -> f64| {
        move |r: &Report| r.durable.as_ref().map(|d| pick(&d.ack_latency_us))
    };
    for t in &group.targets {
        row(
            out,
            &[
                t.target.clone(),
                t.runs.len().to_string(),
                int(t.median(|r| Some(r.connections as f64))),
                num(t.median(|r| r.durable.as_ref().map(|d| d.acked_per_s))),
                ms(t.median(ack(|p| p.p50))),
                ms(t.median(ack(|p| p.p99))),
                ms(t.median(ack(|p| p.p999))),
                num(t.median(cpu)),
                t.worst(|r| r.lost).to_string(),
                t.worst(|r| r.duplicated).to_string(),
                t.worst(|r| r.errors).to_string(),
                notes(t),
            ],
        );
    }
}

/// W5: time for a resume storm to catch up, gaps and duplicates.
fn w5(out: &mut String, group: &Group) {
    header(
        out,
        &[
            "target",
            "runs",
            "clients caught up",
            "all caught up ms",
            "per client p50 ms",
            "per client p99 ms",
            "messages",
            "gaps",
            "duplicates",
            "errors",
        ],
    );
    let resume =
        |pick: fn(&crate::results::Resume) -> f64| move |r: &Report| r.resume.as_ref().map(pick);
    for t in &group.targets {
        row(
            out,
            &[
                t.target.clone(),
                t.runs.len().to_string(),
                int(t.median(resume(|r| r.caught_up as f64))),
                num(t.median(resume(|r| r.all_caught_up_ms))),
                num(t.median(resume(|r| r.catch_up_ms.p50))),
                num(t.median(resume(|r| r.catch_up_ms.p99))),
                int(t.median(resume(|r| r.messages as f64))),
                t.worst(|r| r.resume.as_ref().map_or(0, |s| s.gaps))
                    .to_string(),
                t.worst(|r| r.resume.as_ref().map_or(0, |s| s.duplicates))
                    .to_string(),
                t.worst(|r| r.errors).to_string(),
            ],
        );
    }
}

/// The whole Markdown report for `groups` (from [`crate::summary::group`]).
pub fn markdown(groups: &[Group]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Each figure is the median of a target's runs; lost, dup and errors are the worst \
         run's. Ratios divide a target's median by the reference's median in the same group."
    );
    let of = |workload: &str| -> Vec<&Group> {
        groups.iter().filter(|g| g.workload == workload).collect()
    };
    let w1_groups = of("w1");
    if !w1_groups.is_empty() {
        out.push('\n');
        w1(&mut out, &w1_groups);
    }
    type Table = fn(&mut String, &Group);
    let sections: [(&str, &str, Table); 4] = [
        (
            "w2",
            "W2 many rooms: rooms of 10, every connection publishes 1 message/s",
            fanout_table,
        ),
        ("w3", "W3 idle capacity: joined connections held open", w3),
        ("w4", "W4 durable throughput: acked after commit", w4),
        ("w5", "W5 resume storm: every client rejoins with since", w5),
    ];
    for (workload, title, table) in sections {
        for group in of(workload) {
            let _ = writeln!(out, "\n## {title} ({})\n", group.params);
            table(&mut out, group);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::group;

    /// The tiny runs committed under `bench/results/example` (50-200 connections, 2 s).
    #[test]
    fn the_example_results_make_every_section() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../results/example");
        let (runs, warnings) = crate::results::load_dir(&dir).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let markdown = markdown(&group(&runs));
        for heading in [
            "### 100 messages/s (n50_r100)",
            "### 200 messages/s (n50_r200)",
            "### Highest sustained rate",
            "## W2 many rooms",
            "## W3 idle capacity",
            "## W4 durable throughput",
            "## W5 resume storm",
        ] {
            assert!(markdown.contains(heading), "no {heading:?} in\n{markdown}");
        }
        // The floor is its own reference.
        let floor_row = markdown
            .lines()
            .find(|l| l.starts_with("| floor | 1 | 50 | 100 |"))
            .unwrap_or_else(|| panic!("no floor row in\n{markdown}"));
        assert!(floor_row.contains("| 1.00x |"), "{floor_row}");
    }

    #[test]
    fn a_rate_counts_as_sustained_only_without_loss_and_under_the_p99_bound() {
        let report = |p99: f64, lost: u64| Report {
            latency_us: crate::results::Percentiles {
                p99,
                ..Default::default()
            },
            lost,
            ..Report::default()
        };
        let runs = |reports: Vec<Report>| TargetRuns {
            target: "ws".into(),
            runs: reports,
        };
        assert!(sustained(&runs(vec![
            report(900.0, 0),
            report(60_000.0, 0),
            report(1_000.0, 0)
        ])));
        assert!(!sustained(&runs(vec![report(900.0, 0), report(900.0, 1)])));
        assert!(!sustained(&runs(vec![report(60_000.0, 0)])));
    }
}
