//! The deployment examples in `examples/deploy` hold what the node serves and accepts: every
//! metric the Grafana dashboard queries is one `/metrics` exposes, the Prometheus config
//! scrapes that path, and the systemd unit starts the node with flags it takes.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use common::Node;
use serde_json::Value;

fn deploy(file: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/deploy")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The metric families `/metrics` declares, and the sample names each stands for.
fn served_names(node: &Node) -> BTreeSet<String> {
    let text = node.get("/metrics").text();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        names.insert(name.to_owned());
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[],
        };
        for s in suffixes {
            names.insert(format!("{name}{s}"));
        }
    }
    names
}

/// Every `verge_…` name in a PromQL expression.
fn queried_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("verge_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        out.push(expr[start..end].to_owned());
        i = end;
    }
    out
}

#[test]
fn every_metric_the_dashboard_queries_is_served() {
    // With a subscription, so that its series exist (each subscription has its own).
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef").expect("secret");
    let config = dir.path().join("verge.toml");
    std::fs::write(
        &config,
        format!(
            "[[subscriptions]]\nname = \"s\"\nurl = \"http://127.0.0.1:9/\"\nsecret_file = {:?}\n",
            secret.display().to_string()
        ),
    )
    .expect("config");
    let node = Node::start_with(
        "deploy-metrics",
        vec!["--config".into(), config.display().to_string()],
    );
    let served = served_names(&node);
    assert!(served.contains("verge_writes_total"), "{served:?}");
    let dashboard: Value = serde_json::from_str(&deploy("grafana-dashboard.json")).expect("JSON");
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queried.extend(queried_names(target["expr"].as_str().expect("expr")));
        }
    }
    assert!(queried.len() >= 20, "{queried:?}");
    let missing: Vec<&String> = queried.iter().filter(|n| !served.contains(*n)).collect();
    assert!(missing.is_empty(), "queried but not served: {missing:?}");
}

#[test]
fn the_scrape_config_and_the_unit_match_the_node() {
    let prometheus = deploy("prometheus.yml");
    assert!(prometheus.contains("metrics_path: /metrics"));
    assert!(prometheus.contains("type: Bearer"));
    let unit = deploy("verge.service");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let args: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(&args[1..2], &["node"], "{exec}");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_verge"))
        .args(["node", "--help"])
        .output()
        .expect("verge node --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(flag), "verge node takes no {flag}");
    }
    for key in [
        "KillSignal=SIGTERM",
        "TimeoutStopSec=",
        "StateDirectory=verge",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/verge",
        "CapabilityBoundingSet=",
    ] {
        assert!(unit.contains(key), "the unit lacks {key}");
    }
    // The data directory the unit writes is the one it may write.
    assert!(exec.contains("--data-dir /var/lib/verge"), "{exec}");
}
