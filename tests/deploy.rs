//! The deploy files hold what they claim: alert rules that promtool accepts and that use only
//! metric names the binary exports; a Grafana dashboard that is valid JSON over real metrics;
//! a Dockerfile, Kubernetes manifests and systemd units that their linters accept (below).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

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

// ---- Real linters over deploy/ --------------------------------------------------------------
//
// hadolint (deploy/Dockerfile), kubernetes-validate (deploy/kubernetes/*.yaml) and
// systemd-analyze (deploy/systemd/*.service). Each is found through its variable, as
// `eval "$(scripts/lint-tools)"` sets it (scripts/dev-services --tests does), else on PATH.
// A missing linter does not pass in silence: the test says SKIPPED on stderr, and fails
// instead when OUTBOXD_REQUIRE_OPTIONAL_TOOLS=1. Each test also runs its linter over a file broken
// on purpose, so that a linter that accepts anything (a hadolint whose configuration does not
// parse exits 0, for one) cannot pass for a clean result. Nothing is written into the
// repository: the linters run in a temporary directory of their own.

const REQUIRE: &str = "OUTBOXD_REQUIRE_OPTIONAL_TOOLS";

/// The linter `name`: `$var` when set, else the first `name` on PATH. None (after saying
/// so, loudly) when it is not installed, unless OUTBOXD_REQUIRE_OPTIONAL_TOOLS=1, which panics.
fn linter(test: &str, var: &str, name: &str) -> Option<PathBuf> {
    let found = match std::env::var_os(var).filter(|v| !v.is_empty()) {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "{var}={} does not exist (run scripts/lint-tools again)",
                path.display()
            );
            Some(path)
        }
        None => std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        }),
    };
    if found.is_none() {
        let why = format!(
            "{name} not installed (scripts/lint-tools installs it: eval \"$(scripts/lint-tools)\" sets {var})"
        );
        if std::env::var(REQUIRE).as_deref() == Ok("1") {
            panic!("{test}: {why}, and {REQUIRE}=1");
        }
        // Straight to the process's stderr: libtest captures eprintln! and would show it
        // only for a failing test, so a skipped one would look like any passing one.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED {test}: {why}; set {REQUIRE}=1 to fail instead ***\n"
        );
    }
    found
}

/// A fresh directory under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "outboxd-deploy-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs the command in `dir`; returns whether it succeeded and its stdout and stderr.
fn run(mut cmd: Command, dir: &Path) -> (bool, String) {
    let out = cmd
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Files of `dir` (in the repository) whose names end with `suffix`, sorted.
fn files(dir: &str, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(repo(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_str().is_some_and(|s| s.ends_with(suffix)))
        .collect();
    out.sort();
    out
}

fn hadolint(exe: &Path, tmp: &Path, dockerfile: &Path) -> (bool, String) {
    let mut cmd = Command::new(exe);
    // Its own empty configuration, so a .hadolint.yaml in $HOME or $XDG_CONFIG_HOME cannot
    // mute a rule, nor can HADOLINT_IGNORE and the other HADOLINT_* variables.
    cmd.arg("--no-color")
        .arg("--config")
        .arg(tmp.join("hadolint.yaml"))
        .arg(dockerfile);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HADOLINT_") {
            cmd.env_remove(key);
        }
    }
    run(cmd, tmp)
}

#[test]
fn hadolint_accepts_the_dockerfile() {
    let Some(exe) = linter(
        "hadolint_accepts_the_dockerfile",
        "OUTBOXD_TEST_HADOLINT",
        "hadolint",
    ) else {
        return;
    };
    let tmp = TempDir::new("hadolint");
    std::fs::write(tmp.0.join("hadolint.yaml"), "ignored: []\n").unwrap();
    let dockerfile = repo("deploy/Dockerfile");
    let (ok, text) = hadolint(&exe, &tmp.0, &dockerfile);
    // No finding at all, not only none at the default failure threshold.
    assert!(
        ok && text.trim().is_empty(),
        "hadolint deploy/Dockerfile:\n{text}"
    );

    // The same Dockerfile installing an unpinned apt package must be refused (DL3008).
    let text = std::fs::read_to_string(&dockerfile).unwrap();
    let unpinned = text.replacen(
        "RUN groupadd",
        "RUN apt-get update && apt-get install -y --no-install-recommends curl \\\n    && rm -rf /var/lib/apt/lists/* && groupadd",
        1,
    );
    assert_ne!(unpinned, text, "the runtime stage has its RUN groupadd");
    let broken = tmp.0.join("Dockerfile.unpinned");
    std::fs::write(&broken, unpinned).unwrap();
    let (ok, text) = hadolint(&exe, &tmp.0, &broken);
    assert!(
        !ok && text.contains("DL3008"),
        "hadolint let unpinned apt packages through:\n{text}"
    );
}

#[test]
fn kubernetes_manifests_validate() {
    let Some(exe) = linter(
        "kubernetes_manifests_validate",
        "OUTBOXD_TEST_KUBERNETES_VALIDATE",
        "kubernetes-validate",
    ) else {
        return;
    };
    let tmp = TempDir::new("kubernetes");
    let manifests = files("deploy/kubernetes", ".yaml");
    assert!(
        manifests.len() >= 5 && manifests.iter().any(|p| p.ends_with("secret.example.yaml")),
        "every manifest, the secret example too: {manifests:?}"
    );
    // --strict: without it a misspelt field (an unknown property) passes.
    let mut cmd = Command::new(&exe);
    cmd.arg("--strict").args(&manifests);
    let (ok, text) = run(cmd, &tmp.0);
    assert!(
        ok,
        "kubernetes-validate --strict deploy/kubernetes:\n{text}"
    );
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            line.starts_with("INFO ") && line.contains(" passed "),
            "kubernetes-validate said more than that a resource passed: {line}\n{text}"
        );
    }
    for manifest in &manifests {
        assert!(
            text.contains(&format!("{} passed", manifest.display())),
            "no resource of {} was validated:\n{text}",
            manifest.display()
        );
    }

    // A misspelt field must be refused.
    let deployment = std::fs::read_to_string(repo("deploy/kubernetes/deployment.yaml")).unwrap();
    assert!(deployment.contains("  revisionHistoryLimit: "));
    let broken = tmp.0.join("deployment.broken.yaml");
    std::fs::write(
        &broken,
        deployment.replace("  revisionHistoryLimit: ", "  revisionHistoryLimt: "),
    )
    .unwrap();
    let mut cmd = Command::new(&exe);
    cmd.arg("--strict").arg(&broken);
    let (ok, text) = run(cmd, &tmp.0);
    assert!(
        !ok && text.contains("revisionHistoryLimt"),
        "kubernetes-validate let a misspelt field through:\n{text}"
    );
}

/// systemd-analyze verify over unit files; Ok when it is silent and exits 0 (it only warns,
/// exiting 0, about an unknown directive).
fn verify(exe: &Path, tmp: &Path, units: &[PathBuf]) -> (bool, String) {
    let mut cmd = Command::new(exe);
    cmd.args(["verify", "--man=no"]).args(units);
    let (ok, text) = run(cmd, tmp);
    (ok && text.trim().is_empty(), text)
}

#[test]
fn systemd_units_verify() {
    let Some(exe) = linter(
        "systemd_units_verify",
        "OUTBOXD_TEST_SYSTEMD_ANALYZE",
        "systemd-analyze",
    ) else {
        return;
    };
    let tmp = TempDir::new("systemd");
    let units = files("deploy/systemd", ".service");
    let names: Vec<String> = units
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["outboxd.service", "outboxd@.service"]);
    // verify refuses an ExecStart whose binary does not exist: the copies run the outboxd
    // this test was built with instead of /usr/local/bin/outboxd.
    let binary = env!("CARGO_BIN_EXE_outboxd");
    assert!(!binary.contains(char::is_whitespace), "{binary}");
    let mut targets = Vec::new();
    for (unit, name) in units.iter().zip(&names) {
        let text = std::fs::read_to_string(unit).unwrap();
        assert!(
            text.contains("\nExecStart=/usr/local/bin/outboxd --config /etc/outboxd/"),
            "{name}: ExecStart runs /usr/local/bin/outboxd"
        );
        std::fs::write(
            tmp.0.join(name),
            text.replace("/usr/local/bin/outboxd", binary),
        )
        .unwrap();
        // A template is verified as an instance of it.
        targets.push(tmp.0.join(name.replace("@.", "@orders.")));
    }
    let (ok, text) = verify(&exe, &tmp.0, &targets);
    assert!(ok, "systemd-analyze verify {targets:?}:\n{text}");

    // A misspelt directive must be refused (verify warns, so any output fails).
    let broken = tmp.0.join("outboxd-broken@.service");
    let template = std::fs::read_to_string(tmp.0.join("outboxd@.service")).unwrap();
    assert!(template.contains("\nNoNewPrivileges=yes\n"));
    std::fs::write(
        &broken,
        template.replace("\nNoNewPrivileges=yes\n", "\nNoNewPrivilege=yes\n"),
    )
    .unwrap();
    let (ok, text) = verify(&exe, &tmp.0, &[tmp.0.join("outboxd-broken@orders.service")]);
    assert!(
        !ok && text.contains("NoNewPrivilege"),
        "systemd-analyze verify let a misspelt directive through:\n{text}"
    );
}

/// The template runs one configuration per instance, with that instance's env file, and is
/// hardened exactly as outboxd.service is.
#[test]
fn template_unit_is_per_config_and_as_hardened_as_the_unit() {
    let unit = std::fs::read_to_string(repo("deploy/systemd/outboxd.service")).unwrap();
    let template = std::fs::read_to_string(repo("deploy/systemd/outboxd@.service")).unwrap();
    let directives = |text: &str| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect()
    };
    let hardening = |text: &str| -> Vec<String> {
        let start = text.find("\nDynamicUser=").expect("a hardening block");
        let end = text[start..].find("\n[Install]").unwrap() + start;
        directives(&text[start..end])
    };
    assert!(hardening(&unit).len() >= 20);
    assert_eq!(hardening(&template), hardening(&unit));
    let lines = directives(&template);
    for line in [
        "EnvironmentFile=-/etc/outboxd/%i.env",
        "ExecStartPre=/usr/local/bin/outboxd --config /etc/outboxd/%i.toml migrate",
        "ExecStart=/usr/local/bin/outboxd --config /etc/outboxd/%i.toml $OUTBOXD_UNIT_COMMAND",
        "Environment=OUTBOXD_UNIT_COMMAND=run",
    ] {
        assert!(
            lines.iter().any(|l| l == line),
            "outboxd@.service lacks {line}"
        );
    }
}
