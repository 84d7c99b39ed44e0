//! The deploy files hold what they claim: alert rules that promtool accepts and that use only
//! metric names the binary exports; a Grafana dashboard that is valid JSON over real metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

fn referenced_metrics(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("outboxd_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(base.to_string());
        i = end;
    }
    out
}

fn exported() -> BTreeSet<String> {
    outboxd::metrics::metrics().names().into_iter().collect()
}

#[test]
fn alert_rules_use_only_exported_metrics() {
    let text = std::fs::read_to_string("deploy/prometheus/alerts.yml").unwrap();
    let used = referenced_metrics(&text);
    assert!(
        used.len() >= 6,
        "the rules watch outboxd's metrics: {used:?}"
    );
    let exported = exported();
    for name in &used {
        assert!(
            exported.contains(name),
            "alerts.yml uses {name}, which outboxd does not export ({exported:?})"
        );
    }
}

#[test]
fn dashboard_is_json_over_exported_metrics() {
    let text = std::fs::read_to_string("deploy/grafana/outboxd-dashboard.json").unwrap();
    let _: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let exported = exported();
    for name in referenced_metrics(&text) {
        assert!(
            exported.contains(&name),
            "dashboard uses {name}, which outboxd does not export"
        );
    }
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let out = std::process::Command::new("promtool")
        .args(["check", "rules", "deploy/prometheus/alerts.yml"])
        .output()
        .expect("promtool must be installed (scripts/dev-services installs the Debian package prometheus)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}
