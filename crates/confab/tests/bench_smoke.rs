//! CI smoke runs of `confab bench` against the real server binary: a few hundred connections
//! for a few seconds, checking that nothing is lost or duplicated and that the run stops by
//! itself. These are not benchmarks; the numbers are not asserted.

mod common;

use std::process::{Command, Stdio};

use common::*;

/// Runs `confab bench` against `server` with `args` and returns its JSON report.
fn bench(server: &Process, args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_confab"))
        .arg("bench")
        .args(["--addr", &server.base, "--jwt-secret", SECRET, "--quiet"])
        .args(["--server-pid", &server.child.id().to_string()])
        .arg("--json")
        .arg(&json)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("confab bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "confab bench failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("report written"))
            .expect("report is JSON");
    assert_eq!(report["errors"], 0, "{stdout}");
    assert!(stdout.contains("confab bench:"), "{stdout}");
    report
}

fn server(dir: &std::path::Path, env: &[(&str, &str)]) -> Process {
    spawn_binary(dir, env)
}

#[test]
fn fan_out_over_a_few_rooms_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path(), &[]);
    let report = bench(
        &server,
        &[
            "--connections",
            "300",
            "--rooms",
            "3",
            "--rate",
            "30",
            "--duration",
            "2.5",
            "--warmup",
            "0.5",
            "--source-addrs",
            "2",
        ],
    );
    assert_eq!(report["connections"], 300);
    assert_eq!(report["publishers"], 3);
    assert_eq!(report["lost"], 0, "{report:#}");
    assert_eq!(report["duplicated"], 0, "{report:#}");
    assert_eq!(report["bad_payloads"], 0, "{report:#}");
    assert!(report["delivered"].as_u64().unwrap() > 0, "{report:#}");
    assert_eq!(report["deliveries_total"], report["expected_deliveries"]);
    assert!(report["latency_us"]["p99"].as_f64().unwrap() > 0.0);
    // Every delivery also has its latency to the kernel's receive timestamp, which is never
    // later than the read (so no percentile above the read latency's, bar histogram rounding).
    let arrival = &report["arrival_latency_us"];
    assert_eq!(
        arrival["count"], report["latency_us"]["count"],
        "{report:#}"
    );
    for quantile in ["p50", "p99", "max"] {
        let at_arrival = arrival[quantile].as_f64().unwrap();
        let at_read = report["latency_us"][quantile].as_f64().unwrap();
        assert!(
            at_arrival > 0.0 && at_arrival <= at_read * 1.001 + 1.0,
            "{report:#}"
        );
    }
    assert!(report["server"]["cpu_us_per_delivery"].as_f64().is_some());
    assert!(
        report["server"]["rss_kib_per_connection"]
            .as_f64()
            .is_some()
    );
    assert!(report["generator"]["cores_allowed"].as_u64().unwrap() >= 1);
    // Seconds inside the 2.5 s window, with what arrived in each.
    let timeline = report["timeline"].as_array().expect("a timeline");
    let in_window: Vec<_> = timeline.iter().filter(|s| s["in_window"] == true).collect();
    assert!(in_window.len() >= 2, "{timeline:#?}");
    assert!(in_window.iter().all(|s| s["delivered"].as_u64() > Some(0)
        && s["p99_ms"].as_f64() > Some(0.0)
        && s["arrival_p99_ms"].as_f64() > Some(0.0)
        && s["connected"] == 300
        && s["generator_late_ms"].as_f64() >= Some(0.0)
        && s["steal_ms"].as_f64() >= Some(0.0)));
    // One share of stolen time per CPU of the machine.
    let steal = report["host"]["steal_by_cpu"]
        .as_array()
        .expect("steal per CPU");
    assert!(
        !steal.is_empty()
            && steal
                .iter()
                .all(|s| (0.0..=1.0).contains(&s.as_f64().unwrap()))
    );
    assert!(report["generator"]["max_late_ms"].as_f64().is_some());
}

#[test]
fn durable_publishers_pipeline_and_get_every_ack() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(
        dir.path(),
        &[
            ("CONFAB_MESSAGE_RATE", "1000"),
            ("CONFAB_MESSAGE_BURST", "1000"),
        ],
    );
    let report = bench(
        &server,
        &[
            "--durable",
            "--connections",
            "20",
            "--rooms",
            "20",
            "--rate",
            "0",
            "--max-conn-rate",
            "100",
            "--pipeline",
            "8",
            // Random UUIDs: every one is a new key, none is taken for a retry.
            "--client-ids",
            "random",
            "--duration",
            "2",
            "--warmup",
            "0.5",
        ],
    );
    let durable = &report["durable"];
    assert!(durable["acked"].as_u64().unwrap() > 0, "{report:#}");
    assert_eq!(report["client_ids"], "random");
    assert!(durable["ack_latency_us"]["p99"].as_f64().unwrap() > 0.0);
    assert_eq!(report["lost"], 0, "{report:#}");
    assert_eq!(report["duplicated"], 0, "{report:#}");
}

#[test]
fn resume_storm_pages_through_history_without_gaps() {
    let dir = tempfile::tempdir().unwrap();
    // Small pages so catching up 50 messages takes several `history` round trips.
    let server = server(dir.path(), &[("CONFAB_MAX_HISTORY_PAGE", "20")]);
    let report = bench(
        &server,
        &[
            "--resume",
            "--connections",
            "100",
            "--rooms",
            "2",
            "--prefill",
            "60",
            "--behind",
            "50",
        ],
    );
    let resume = &report["resume"];
    assert_eq!(resume["caught_up"], 100, "{report:#}");
    assert_eq!(resume["messages"], 100 * 50, "{report:#}");
    assert_eq!(resume["gaps"], 0, "{report:#}");
    assert_eq!(resume["duplicates"], 0, "{report:#}");
}

#[test]
fn impossible_rates_are_refused_with_a_clear_message() {
    let output = Command::new(env!("CARGO_BIN_EXE_confab"))
        .args(["bench", "--addr", "127.0.0.1:9", "--jwt-secret", "x"])
        .args(["--connections", "5", "--rate", "100"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--max-conn-rate"), "{stderr}");
}

#[test]
fn idle_connections_are_held_and_measured() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path(), &[]);
    let report = bench(
        &server,
        &[
            "--idle",
            "--connections",
            "200",
            "--rooms",
            "4",
            "--duration",
            "1",
        ],
    );
    assert_eq!(report["mode"], "idle");
    assert_eq!(report["connections"], 200);
    assert!(report["handshakes_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(report["connect_ms"]["count"], 200);
    assert!(
        report["server"]["rss_kib_per_connection"]
            .as_f64()
            .is_some()
    );
}
