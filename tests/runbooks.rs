//! The runbooks (docs/runbooks.md) as a drill: the situations they describe are built against
//! real PostgreSQL and Redis, every `outboxd` command of their shell blocks is run as written
//! (placeholders filled in, with databases named as the runbooks name them), and its output
//! is checked against what the runbooks say it means. A command added to the runbooks without
//! a place in this drill fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;

const FSC: &str = "fulfillment.status_changed";

/// The `outboxd ...` commands of the runbooks' shell blocks, without the `outboxd` and
/// without trailing comments.
fn documented_commands() -> BTreeSet<String> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/runbooks.md")).unwrap();
    let mut in_sh = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("```") {
            in_sh = trimmed == "```sh";
            continue;
        }
        if let Some(command) = trimmed.strip_prefix("outboxd ").filter(|_| in_sh) {
            let command = command.split(" #").next().unwrap().trim();
            out.insert(command.to_string());
        }
    }
    out
}

struct Drill {
    cfg: std::path::PathBuf,
    /// The runbook commands run so far, as the runbooks write them.
    ran: BTreeSet<String>,
}

impl Drill {
    /// Runs the runbook command `documented` as `actual` (the same with its placeholders
    /// filled in); exit 0 required; returns stdout.
    fn run(&mut self, documented: &str, actual: &[&str]) -> String {
        self.ran.insert(documented.to_string());
        outboxd(&self.cfg, actual)
    }

    fn status_json(&mut self) -> Value {
        serde_json::from_str(self.run("status --json", &["status", "--json"]).trim()).unwrap()
    }
}

fn line_with<'a>(out: &'a str, start: &str) -> &'a str {
    out.lines()
        .find(|l| l.trim_start().starts_with(start))
        .unwrap_or_else(|| panic!("no line starting with {start:?} in:\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_runbook_command_does_what_the_runbook_says() {
    let fulfillment = TestDb::new("rb_fulfillment").await;
    let orders = TestDb::new("rb_orders").await;
    let streams = TestStreams::new("runbooks");
    let text = format!(
        r#"
[redis]
url = "{redis}"
stream_prefix = "{prefix}"
[databases.fulfillment]
url = "{f}"
[databases.orders]
url = "{o}"
[[relays]]
database = "fulfillment"
archive_retention_hours = 48
max_attempts = 1
[[consumers]]
name = "order-status"
database = "orders"
streams = ["{FSC}", "delivery.confirmed"]
handler = "order_status"
max_deliveries = 2
claim_idle_ms = 100
[http]
listen = ""
"#,
        redis = redis_url(),
        prefix = streams.prefix,
        f = fulfillment.url,
        o = orders.url
    );
    let mut drill = Drill {
        cfg: write_config("runbooks", &text),
        ran: BTreeSet::new(),
    };
    outboxd(&drill.cfg, &["migrate"]);
    let f = fulfillment.client().await;
    let o = orders.client().await;
    o.batch_execute(
        "INSERT INTO orders (id, status) VALUES ('o1', 'confirmed'), ('o2', 'confirmed')",
    )
    .await
    .unwrap();
    let produce = |order: &'static str, status: &'static str| {
        format!(
            "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ('{FSC}', '{order}', \
             '{{\"event_type\": \"{FSC}\", \"fulfillment_id\": \"f-{order}\", \"order_id\": \"{order}\", \"new_status\": \"{status}\"}}')"
        )
    };

    // --- stuck-outbox: a producer transaction left open holds back its aggregate --------
    let holder = fulfillment.client().await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .batch_execute(&produce("o1", "picking"))
        .await
        .unwrap();
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    f.batch_execute(&produce("o1", "packed")).await.unwrap();
    f.batch_execute(&produce("o2", "picking")).await.unwrap();

    let out = drill.run("status", &["status"]);
    let outbox_line = line_with(&out, "fulfillment.outbox");
    let cells: Vec<&str> = outbox_line.split_whitespace().collect();
    // database.table, backlog, oldest (s), quarantined, held back, blockers...
    assert_eq!(
        cells[1], "2",
        "backlog: the two committed rows: {outbox_line}"
    );
    assert_eq!(cells[3], "0", "quarantined: {outbox_line}");
    assert_eq!(
        cells[4], "1",
        "held back: o1's committed row: {outbox_line}"
    );
    assert!(
        outbox_line.contains(&format!("pid {holder_pid} (")),
        "blockers name the open transaction: {outbox_line}"
    );
    // no consumer has run yet: its groups do not exist
    let lag_line = line_with(&out, "order-status");
    assert_eq!(lag_line.split_whitespace().nth(3), Some("-"), "{lag_line}");
    let status = drill.status_json();
    assert_eq!(status["outboxes"][0]["blockers"][0]["pid"], holder_pid);
    assert_eq!(status["outboxes"][0]["held_back_rows"], 1);

    // the runbook's query, with the pids from status
    let row = f
        .query_one(
            &format!(
                "SELECT pid, now() - xact_start AS open_for, state, query \
                 FROM pg_stat_activity WHERE pid IN ({holder_pid})"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>("state"), "idle in transaction");

    let out = drill.run("relay --once", &["relay", "--once"]);
    let summary = line_with(&out, "relay fulfillment.outbox:");
    assert!(summary.contains(": 1 rows in"), "o2's row only: {summary}");
    assert!(
        summary.contains(&format!(
            "0 failed, 0 quarantined; 1 held back by open transactions (blocking pids: {holder_pid} open"
        )),
        "{summary}"
    );
    // the transaction ends while relay --once --wait-held waits for it
    let commit_soon = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        holder.batch_execute("COMMIT").await.unwrap();
        holder
    });
    let cfg = drill.cfg.clone();
    let out = tokio::task::spawn_blocking(move || {
        outboxd(&cfg, &["relay", "--once", "--wait-held", "60s"])
    })
    .await
    .unwrap();
    drill.ran.insert("relay --once --wait-held 60s".into());
    let summary = line_with(&out, "relay fulfillment.outbox:");
    assert!(summary.contains(": 2 rows in"), "{summary}");
    assert!(summary.contains("0 held back"), "{summary}");
    drop(commit_soon.await.unwrap());
    assert_eq!(count(&f, "SELECT count(*) FROM outbox").await, 0);

    // --- poison-events: a quarantined row and dead letters ----------------------------------
    let mut conn = streams.conn().await;
    let blocked_key = streams.key("blocked");
    let () = redis::cmd("SET")
        .arg(&blocked_key)
        .arg("not a stream")
        .query_async(&mut conn)
        .await
        .unwrap();
    f.batch_execute(
        "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ('blocked', 'b1', '{}')",
    )
    .await
    .unwrap();
    f.batch_execute(&produce("o-9", "picking")).await.unwrap();
    let out = drill.run("relay --once", &["relay", "--once"]);
    assert!(
        line_with(&out, "relay fulfillment.outbox:").contains("1 failed, 1 quarantined"),
        "{out}"
    );
    let out = outboxd(&drill.cfg, &["consume", "--once"]);
    assert!(out.contains("1 dead-lettered"), "o-9 does not exist: {out}");
    xadd(&streams, FSC, "not json").await;
    let out = outboxd(&drill.cfg, &["consume", "--once"]);
    assert!(out.contains("1 dead-lettered"), "{out}");

    let out = drill.run("dlq list", &["dlq", "list"]);
    assert!(out.contains("DEAD LETTERS (2)"), "{out}");
    assert!(out.contains("QUARANTINED OUTBOX ROWS (1)"), "{out}");
    let row_id: i64 = f
        .query_one("SELECT id FROM outbox WHERE topic = 'blocked'", &[])
        .await
        .unwrap()
        .get(0);
    let quarantined = line_with(&out, "fulfillment.outbox id");
    assert!(
        quarantined.contains(&format!(
            "fulfillment.outbox id {row_id}  topic blocked aggregate b1 attempts 1  error: WRONGTYPE"
        )),
        "{quarantined}"
    );
    // the filters and paging the runbook lists
    let page: Value = serde_json::from_str(&outboxd(
        &drill.cfg,
        &[
            "dlq",
            "list",
            "--stream",
            FSC,
            "--reason",
            "does not exist",
            "--json",
            "--limit",
            "1",
        ],
    ))
    .unwrap();
    let letters = page["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{page}");
    let missing_order = letters[0]["id"].as_str().unwrap().to_string();
    let page: Value = serde_json::from_str(&outboxd(
        &drill.cfg,
        &[
            "dlq",
            "list",
            "--stream",
            FSC,
            "--json",
            "--limit",
            "1",
            "--after",
            &missing_order,
        ],
    ))
    .unwrap();
    let next = page["dead_letters"].as_array().unwrap();
    assert_eq!(next.len(), 1, "the second page: {page}");
    let not_json = next[0]["id"].as_str().unwrap().to_string();
    assert_ne!(not_json, missing_order);

    // fix the cause of the quarantine, release the row: the relay publishes it
    let _: i64 = redis::cmd("DEL")
        .arg(&blocked_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let id = row_id.to_string();
    let out = drill.run("dlq retry --id 81234", &["dlq", "retry", "--id", &id]);
    assert!(
        out.contains("dlq: retrying 0 dead letter(s) and 1 quarantined row(s)"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "dlq: retried quarantined row fulfillment.outbox id {row_id} (topic blocked, aggregate b1)"
        )),
        "{out}"
    );
    assert!(
        out.contains("dlq: 0 dead letter(s) and 1 quarantined row(s) retried"),
        "{out}"
    );
    let out = outboxd(
        &drill.cfg,
        &["dlq", "retry", "--all", "--stream", "blocked"],
    );
    assert!(
        out.contains("dlq: 0 dead letter(s) and 0 quarantined row(s) retried"),
        "{out}"
    );
    let out = drill.run("relay --once", &["relay", "--once"]);
    assert!(
        line_with(&out, "relay fulfillment.outbox:").contains(": 1 rows in"),
        "{out}"
    );
    let blocked: Vec<(String, Value)> = streams.entries("blocked").await;
    assert_eq!(blocked.len(), 1, "the released row is on its stream");

    // the order appears; the dead letter goes back on its stream and is applied once
    o.batch_execute("INSERT INTO orders (id, status) VALUES ('o-9', 'confirmed')")
        .await
        .unwrap();
    let out = drill.run(
        "dlq retry --all --reason 'does not exist'",
        &["dlq", "retry", "--all", "--reason", "does not exist"],
    );
    assert!(
        out.contains("dlq: retrying 1 dead letter(s) and 0 quarantined row(s)"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "dlq: retried dead letter {}{FSC}:dlq {missing_order} -> {}{FSC} ",
            streams.prefix, streams.prefix
        )),
        "{out}"
    );
    let out = outboxd(&drill.cfg, &["consume", "--once"]);
    assert!(out.contains("1 applied"), "{out}");
    let status_of = |id: &'static str| {
        let o = &o;
        async move {
            o.query_one("SELECT status FROM orders WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    assert_eq!(status_of("o-9").await, "processing");

    // the unparseable entry can never be applied: discard it, after listing it
    let out = outboxd(&drill.cfg, &["dlq", "discard", "--id", &not_json]);
    assert!(
        out.contains("dlq: discarding 1 dead letter(s) and 0 quarantined row(s)"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "dlq: discarded dead letter {}{FSC}:dlq {not_json} (reason: ",
            streams.prefix
        )),
        "each item printed: {out}"
    );
    let out = drill.run("dlq list", &["dlq", "list"]);
    assert!(out.contains("DEAD LETTERS (0)"), "{out}");
    assert!(out.contains("QUARANTINED OUTBOX ROWS (0)"), "{out}");

    // --- consumer-lag: everything delivered and acknowledged ---------------------------------
    let out = drill.run("status", &["status"]);
    let fsc_line = out
        .lines()
        .find(|l| l.starts_with("order-status") && l.contains(&format!("{FSC} ")))
        .unwrap_or_else(|| panic!("{out}"));
    let cells: Vec<&str> = fsc_line.split_whitespace().collect();
    // name, stream, length, lag, pending, oldest idle(s), dlq
    assert_eq!(&cells[3..7], ["0", "0", "-", "0"], "{fsc_line}");

    // --- redis-data-loss: the stream is gone; replay from the archive restores it once -----
    let history_before = count(&o, "SELECT count(*) FROM order_status_history").await;
    assert!(history_before >= 3, "o1, o2, o-9 moved");
    let _: i64 = redis::cmd("DEL")
        .arg(streams.key(FSC))
        .query_async(&mut conn)
        .await
        .unwrap();
    let out = drill.run(
        "replay --topic fulfillment.status_changed --since 2026-11-22T06:00:00Z",
        &["replay", "--topic", FSC, "--since", "2026-11-22T06:00:00Z"],
    );
    assert!(
        out.contains(&format!(
            "replay: 4 events of topic {FSC} from the archive of fulfillment.outbox republished to {}{FSC}",
            streams.prefix
        )),
        "o1 twice, o2, o-9: {out}"
    );
    let out = outboxd(&drill.cfg, &["consume", "--once"]);
    assert!(
        out.contains("0 applied, 4 duplicate"),
        "consumers recreate their group and count the replay as duplicates: {out}"
    );
    let out = outboxd(
        &drill.cfg,
        &[
            "replay",
            "--topic",
            FSC,
            "--since",
            "3h",
            "--relay",
            "fulfillment.outbox",
        ],
    );
    assert!(out.contains("replay: 4 events"), "{out}");
    let out = outboxd(&drill.cfg, &["consume", "--once"]);
    assert!(out.contains("0 applied, 4 duplicate"), "{out}");
    assert_eq!(
        count(&o, "SELECT count(*) FROM order_status_history").await,
        history_before,
        "replays change nothing"
    );
    let out = outboxd(
        &drill.cfg,
        &[
            "replay",
            "--topic",
            "fulfillment.status_chagned",
            "--since",
            "3h",
        ],
    );
    assert!(
        out.contains("replay: no archived event"),
        "a misspelled topic is named: {out}"
    );

    // --- inbox-growth ----------------------------------------------------------------------
    let out = drill.run(
        "inbox prune --older-than 14d",
        &["inbox", "prune", "--older-than", "14d"],
    );
    assert!(
        out.contains("inbox prune: consumer order-status: 0 rows older than 1209600s deleted from orders.inbox"),
        "{out}"
    );
    o.batch_execute("UPDATE inbox SET received_at = now() - interval '15 days' WHERE event_id IN (SELECT event_id FROM inbox LIMIT 2)")
        .await
        .unwrap();
    let out = outboxd(
        &drill.cfg,
        &["inbox", "prune", "--older-than", "14d", "--batch", "1"],
    );
    assert!(out.contains(": 2 rows older than"), "{out}");

    let documented = documented_commands();
    assert!(
        documented.len() >= 8,
        "the runbooks' commands were found: {documented:?}"
    );
    let missing: Vec<String> = documented
        .into_iter()
        .filter(|c| !drill.ran.contains(c))
        .collect();
    assert!(
        missing.is_empty(),
        "runbook commands this drill does not run: {missing:?}"
    );
}
