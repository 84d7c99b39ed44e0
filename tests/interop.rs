//! Interoperability as the other systems really behave: entries as Dapr's `pubsub.redis`
//! writes them for each way a Dapr publisher calls it, CloudEvents that an independent
//! implementation (the CloudEvents Python SDK) accepts for any outbox row, the trace carried
//! from a fulfillment event to the `order.status_changed` event it causes, and metrics that
//! are there from the first scrape, per database.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const FSC: &str = "fulfillment.status_changed";
const OSC: &str = "order.status_changed";
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";

/// An orders database with an `order_status` consumer of `fulfillment.status_changed`.
struct Orders {
    db: TestDb,
    streams: TestStreams,
    cfg: std::path::PathBuf,
}

impl Orders {
    async fn new(tag: &str) -> Orders {
        let db = TestDb::new(tag).await;
        let streams = TestStreams::new(tag);
        let cfg = TestConfig::new(&streams.prefix)
            .database("orders", &db.url)
            .relay("orders", "table = \"outbox\"")
            .consumer(
                "order-status",
                "orders",
                &[FSC],
                "order_status",
                "max_deliveries = 1\nclaim_idle_ms = 200\nblock_ms = 200",
            )
            .migrated(tag);
        Orders { db, streams, cfg }
    }

    async fn order(&self, id: &str) {
        self.db
            .client()
            .await
            .execute(
                "INSERT INTO orders (id, status) VALUES ($1, 'confirmed')",
                &[&id],
            )
            .await
            .unwrap();
    }

    async fn status(&self, id: &str) -> String {
        self.db
            .client()
            .await
            .query_one("SELECT status FROM orders WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0)
    }

    /// XADD with these fields, in this order.
    async fn xadd_fields(&self, fields: &[(&str, String)]) {
        let mut conn = self.streams.conn().await;
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.streams.key(FSC)).arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(v);
        }
        let _: String = cmd.query_async(&mut conn).await.unwrap();
    }

    fn consume_once(&self) -> String {
        outboxd(&self.cfg, &["consume", "--once"])
    }

    async fn dead_letter_reasons(&self) -> Vec<String> {
        let dlq = format!("{}:dlq", self.streams.key(FSC));
        self.streams.field_of_each(&dlq, "reason").await
    }
}

/// The payload of a fulfillment event for `order`, compact with sorted keys as Dapr
/// re-serializes JSON bodies.
fn picking(order: &str) -> Value {
    json!({"event_type": FSC, "fulfillment_id": format!("f-{order}"),
           "new_status": "picking", "order_id": order})
}

/// Dapr's CloudEvent for a publish with these attributes (components-contrib
/// `pubsub/envelope.go` `NewCloudEventsEnvelope`: always id, specversion, datacontenttype,
/// source = the app ID, type `com.dapr.event.sent`, topic, pubsubname, traceid =
/// traceparent, tracestate, time in whole seconds).
fn dapr_envelope(id: &str, content_type: &str) -> serde_json::Map<String, Value> {
    let Value::Object(map) = json!({
        "datacontenttype": content_type, "id": id, "pubsubname": "orderpubsub",
        "source": "fulfillment", "specversion": "1.0", "time": "2026-11-22T08:00:00Z",
        "topic": FSC, "traceid": TRACEPARENT, "traceparent": TRACEPARENT, "tracestate": "",
        "type": "com.dapr.event.sent",
    }) else {
        unreachable!()
    };
    map
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test]
async fn dapr_publish_shapes_are_applied_as_a_dapr_subscriber_would() {
    let o = Orders::new("dapr_shapes").await;
    for order in [
        "http", "grpc", "text", "b64", "bin", "expired", "fresh", "nottl", "ce",
    ] {
        o.order(order).await;
    }
    // 1. HTTP publish (dapr pkg/api/http/http.go onPublish), Content-Type application/json:
    // `data` an object, and always a second field `metadata` (the request's metadata.*
    // query parameters; `{}` without any). Go writes the two fields in random order.
    let mut e = dapr_envelope("dapr-http", "application/json");
    e.insert("data".into(), picking("http"));
    o.xadd_fields(&[
        ("metadata", "{}".into()),
        ("data", Value::Object(e).to_string()),
    ])
    .await;
    // 2. gRPC PublishEvent (dapr pkg/api/grpc/grpc.go): the same envelope, no `metadata`
    // field when the request has no metadata.
    let mut e = dapr_envelope("dapr-grpc", "application/json");
    e.insert("data".into(), picking("grpc"));
    o.xadd_fields(&[("data", Value::Object(e).to_string())])
        .await;
    // 3. No content type: Dapr's default text/plain, `data` a JSON string holding the body
    // verbatim (envelope.go: DefaultCloudEventDataContentType, `ceData = string(data)`).
    let mut e = dapr_envelope("dapr-text", "text/plain");
    e.insert(
        "data".into(),
        Value::String(r#"{"order_id": "text", "fulfillment_id": "f-text", "new_status": "picking", "event_type": "fulfillment.status_changed"}"#.into()),
    );
    o.xadd_fields(&[
        ("data", Value::Object(e).to_string()),
        ("metadata", "{}".into()),
    ])
    .await;
    // 4. application/octet-stream: `data_base64` (base64.StdEncoding of the body), no `data`
    // (envelope.go: IsBinaryContentType). Once of JSON bytes, once of bytes that are not.
    let mut e = dapr_envelope("dapr-b64", "application/octet-stream");
    e.insert(
        "data_base64".into(),
        Value::String(base64(picking("b64").to_string().as_bytes())),
    );
    o.xadd_fields(&[
        ("metadata", "{}".into()),
        ("data", Value::Object(e).to_string()),
    ])
    .await;
    let mut e = dapr_envelope("dapr-bin", "application/octet-stream");
    e.insert(
        "data_base64".into(),
        Value::String(base64(&[
            0x08, 0x2a, 0x12, 0x06, 0x77, 0x69, 0x64, 0x67, 0x65, 0x74,
        ])),
    );
    o.xadd_fields(&[("data", Value::Object(e).to_string())])
        .await;
    // 5. metadata.ttlInSeconds: `expiration` = publish time + TTL, RFC 3339 UTC in whole
    // seconds (envelope.go ApplyMetadata); a Dapr subscriber drops it once that has passed
    // (HasExpired), and takes an unparsable one as no expiration.
    for (id, order, expiration) in [
        ("dapr-expired", "expired", "2026-01-01T00:00:00Z"),
        ("dapr-fresh", "fresh", "2999-01-01T00:00:00Z"),
        ("dapr-nottl", "nottl", "soon"),
    ] {
        let mut e = dapr_envelope(id, "application/json");
        e.insert("data".into(), picking(order));
        e.insert("expiration".into(), Value::String(expiration.into()));
        o.xadd_fields(&[
            ("data", Value::Object(e).to_string()),
            ("metadata", r#"{"ttlInSeconds":"60"}"#.into()),
        ])
        .await;
    }
    // 6. Content-Type application/cloudevents+json: the publisher's own CloudEvent, passed
    // through with topic and pubsubname overwritten and traceid/traceparent/tracestate
    // filled in (envelope.go FromCloudEvent).
    let ce = json!({
        "data": picking("ce"), "datacontenttype": "application/json", "id": "A234-1234-1234",
        "pubsubname": "orderpubsub", "source": "https://shop.example.com/fulfillment",
        "specversion": "1.0", "time": "2026-11-22T08:00:00Z", "topic": FSC,
        "traceid": TRACEPARENT, "traceparent": TRACEPARENT, "tracestate": "", "type": FSC,
    });
    o.xadd_fields(&[("data", ce.to_string()), ("metadata", "{}".into())])
        .await;

    let out = o.consume_once();
    assert!(out.contains("7 applied"), "{out}");
    assert!(out.contains("1 skipped"), "{out}");
    assert!(out.contains("1 dead-lettered"), "{out}");
    for order in ["http", "grpc", "text", "b64", "fresh", "nottl", "ce"] {
        assert_eq!(o.status(order).await, "processing", "order {order}");
    }
    assert_eq!(
        o.status("expired").await,
        "confirmed",
        "an expired event is never applied"
    );
    let client = o.db.client().await;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM inbox WHERE event_id = 'dapr-expired'"
        )
        .await,
        1,
        "the expired event is recorded in the inbox"
    );
    let reasons = o.dead_letter_reasons().await;
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(
        reasons[0].contains("data_base64") && reasons[0].contains("not JSON"),
        "the reason says what the data is: {reasons:?}"
    );
    // nothing left pending: the skipped and applied ones were acknowledged
    let out = o.consume_once();
    assert!(out.contains("0 applied"), "{out}");
}

#[tokio::test]
async fn the_sql_handler_sees_the_json_that_string_and_base64_data_hold() {
    let db = TestDb::new("dapr_sql").await;
    let streams = TestStreams::new("dapr_sql");
    let cfg = TestConfig::new(&streams.prefix)
        .database("ledger", &db.url)
        .consumer(
            "ledger",
            "ledger",
            &["payments"],
            "sql",
            "function = \"apply_event\"\nclaim_idle_ms = 200",
        )
        .migrated("dapr_sql");
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE seen (event_id text PRIMARY KEY, order_id text, has_base64 bool);
             CREATE FUNCTION apply_event(e jsonb) RETURNS void LANGUAGE sql AS $$
               INSERT INTO seen VALUES (e->>'id', e->'data'->>'order_id', e ? 'data_base64')
             $$;",
        )
        .await
        .unwrap();
    let mut text = dapr_envelope("sql-text", "text/plain");
    text.insert(
        "data".into(),
        Value::String(r#"{"order_id": "o-text"}"#.into()),
    );
    let mut b64 = dapr_envelope("sql-b64", "application/octet-stream");
    b64.insert(
        "data_base64".into(),
        Value::String(base64(br#"{"order_id":"o-b64"}"#)),
    );
    for e in [text, b64] {
        xadd(&streams, "payments", &Value::Object(e).to_string()).await;
    }
    let out = outboxd(&cfg, &["consume", "--once"]);
    assert!(out.contains("2 applied"), "{out}");
    let rows = db
        .client()
        .await
        .query(
            "SELECT event_id, order_id, has_base64 FROM seen ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let seen: Vec<(String, Option<String>, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("sql-b64".to_string(), Some("o-b64".to_string()), false),
            ("sql-text".to_string(), Some("o-text".to_string()), false),
        ]
    );
}

#[tokio::test]
async fn the_status_change_continues_the_trace_of_the_event_that_caused_it() {
    let o = Orders::new("trace").await;
    o.order("traced").await;
    o.order("untraced").await;
    for (order, traceparent) in [("traced", Some(TRACEPARENT)), ("untraced", None)] {
        let mut e = json!({
            "specversion": "1.0", "id": format!("ev-{order}"), "source": "fulfillment",
            "type": FSC, "subject": order, "time": "2026-11-22T08:00:00Z",
            "datacontenttype": "application/json", "data": picking(order),
        });
        if let Some(tp) = traceparent {
            e["traceparent"] = json!(tp);
        }
        o.xadd_fields(&[("data", e.to_string())]).await;
    }
    // and one that fails (its order does not exist): its log lines carry its trace ID
    let mut e = dapr_envelope("ev-missing", "application/json");
    e.insert("data".into(), picking("missing"));
    o.xadd_fields(&[("data", Value::Object(e).to_string())])
        .await;
    let (code, out, err) = run_bin(
        &[
            "--config",
            o.cfg.to_str().unwrap(),
            "--log-format",
            "json",
            "consume",
            "--once",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 applied"), "{out}");
    let failed: Vec<Value> = err
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["fields"]["event_id"] == "ev-missing")
        .collect();
    assert!(!failed.is_empty(), "lines about the failed event: {err}");
    for line in &failed {
        assert_eq!(line["fields"]["trace_id"], TRACE_ID, "{line}");
    }
    let client = o.db.client().await;
    let headers = |order: &'static str| {
        let client = &client;
        async move {
            let row = client
                .query_one(
                    "SELECT headers FROM outbox WHERE topic = $1 AND aggregate_id = $2",
                    &[&OSC, &order],
                )
                .await
                .unwrap();
            row.get::<_, Value>(0)
        }
    };
    let traced = headers("traced").await;
    let child = traced["traceparent"]
        .as_str()
        .expect("a traceparent")
        .to_string();
    let parts: Vec<&str> = child.split('-').collect();
    assert_eq!(parts.len(), 4, "{child}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1], TRACE_ID, "same trace");
    assert_ne!(parts[2], "b7ad6b7169203331", "a new span");
    assert_eq!(parts[2].len(), 16);
    assert_eq!(parts[3], "01", "flags kept");
    assert_eq!(
        headers("untraced").await,
        json!({}),
        "no trace, no traceparent"
    );
    // relayed, the echo carries it on the stream
    outboxd(&o.cfg, &["relay", "--once"]);
    let echoes = o.streams.entries(OSC).await;
    assert_eq!(echoes.len(), 2);
    let by_order = |order: &str| {
        echoes
            .iter()
            .find(|(_, e)| e["subject"] == order)
            .map(|(_, e)| e.clone())
            .unwrap()
    };
    assert_eq!(by_order("traced")["traceparent"], json!(child));
    assert!(by_order("untraced").get("traceparent").is_none());
    if let Some(problems) = cloudevents_problems(
        &echoes
            .iter()
            .map(|(_, e)| e.to_string())
            .collect::<Vec<_>>(),
    ) {
        assert!(problems.is_empty(), "{problems:?}");
    }
}

#[tokio::test]
async fn the_relay_writes_valid_cloudevents_for_odd_rows() {
    let db = TestDb::new("ce_rows").await;
    let streams = TestStreams::new("ce_rows");
    let cfg = TestConfig::new(&streams.prefix)
        .database("main", &db.url)
        .relay("main", "table = \"outbox\"")
        .migrated("ce_rows");
    let client = db.client().await;
    let rows: Vec<(&str, Value, Value)> = vec![
        ("", json!({"n": 1}), json!({})),
        (
            "order \"quoted\" \\ back",
            json!({"n": 2}),
            json!({"traceparent": ""}),
        ),
        (
            "ünïcödé ✓ 注文",
            json!({"text": "ü ✓ \u{2028}"}),
            json!({"traceparent": "12"}),
        ),
        (
            "big",
            json!({"n": 123456789012345678901234567890_f64, "tiny": 1e-300}),
            json!({"traceparent": TRACEPARENT.to_uppercase()}),
        ),
        (
            "traced",
            json!({"n": 5}),
            json!({"traceparent": TRACEPARENT}),
        ),
        (
            "zeros",
            json!({"n": 6}),
            json!({"traceparent": format!("00-{}-b7ad6b7169203331-01", "0".repeat(32))}),
        ),
        (
            "header-not-text",
            json!({"n": 7}),
            json!({"traceparent": 42}),
        ),
    ];
    for (aggregate, payload, headers) in &rows {
        client
            .execute(
                "INSERT INTO outbox (topic, aggregate_id, payload, headers) VALUES ('odd', $1, $2, $3)",
                &[aggregate, payload, headers],
            )
            .await
            .unwrap();
    }
    // a number PostgreSQL's numeric keeps exactly and JSON carries as it is
    client
        .execute(
            "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ('odd', 'exact', '{\"n\": 123456789012345678901234567890}')",
            &[],
        )
        .await
        .unwrap();
    outboxd(&cfg, &["relay", "--once"]);
    let entries = streams.entries("odd").await;
    assert_eq!(entries.len(), rows.len() + 1);
    let subject_of = |n: usize| entries[n].1.get("subject").cloned();
    assert_eq!(
        subject_of(0),
        None,
        "an empty aggregate ID gives no subject"
    );
    assert_eq!(subject_of(1), Some(json!("order \"quoted\" \\ back")));
    assert_eq!(subject_of(2), Some(json!("ünïcödé ✓ 注文")));
    let traceparents: Vec<Option<Value>> = entries
        .iter()
        .map(|(_, e)| e.get("traceparent").cloned())
        .collect();
    assert_eq!(
        traceparents,
        vec![
            None,
            None,
            None,
            None,
            Some(json!(TRACEPARENT)),
            None,
            None,
            None
        ],
        "only a W3C trace context is copied"
    );
    let raw = streams.field_of_each(&streams.key("odd"), "data").await;
    assert!(
        raw[7].contains("123456789012345678901234567890"),
        "the number as PostgreSQL holds it: {}",
        raw[7]
    );
    if let Some(problems) = cloudevents_problems(&raw) {
        assert!(problems.is_empty(), "{problems:?}");
    }
}

mod any_outbox_row {
    use super::common::cloudevents_problems;
    use outboxd::envelope::{encode_into, Outgoing};
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRunner};

    /// Arbitrary outbox rows (any aggregate ID, the empty one too; any header text; any JSON
    /// payload, unicode and large numbers included), each encoded as the relay does: every
    /// envelope must be valid CloudEvents 1.0 for the CloudEvents Python SDK. The cases are
    /// generated first and checked in one run of the SDK.
    #[test]
    fn encodes_to_an_envelope_an_independent_implementation_accepts() {
        let payload = prop_oneof![
            any::<i64>().prop_map(|n| serde_json::json!({ "n": n })),
            any::<f64>()
                .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
                .prop_map(|f| serde_json::json!({ "f": f })),
            any::<String>().prop_map(|s| serde_json::json!({ "s": s, "nested": [s, {"k": 1}] })),
            Just(serde_json::json!({"big": 1e308, "small": -1e-308, "list": []})),
        ];
        let traceparent = prop_oneof![
            Just(None),
            any::<String>().prop_map(Some),
            "[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}".prop_map(Some),
        ];
        let row = (
            "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
            prop_oneof![Just(String::new()), any::<String>(), "\\PC{0,40}"],
            "[a-z][a-z0-9._-]{0,30}",
            payload,
            traceparent,
        );
        let mut runner = TestRunner::new(Config {
            cases: 512,
            ..Config::default()
        });
        let mut envelopes = Vec::new();
        let mut buf = Vec::new();
        for _ in 0..512 {
            let (event_id, aggregate, topic, payload, tp) =
                row.new_tree(&mut runner).unwrap().current();
            let payload_json = payload.to_string();
            encode_into(
                &Outgoing {
                    event_id: &event_id,
                    source: "outboxd/orders",
                    topic: &topic,
                    aggregate_id: &aggregate,
                    time: "2026-11-22T08:00:00.123456Z",
                    payload_json: &payload_json,
                    traceparent: tp.as_deref(),
                },
                &mut buf,
            );
            let text = String::from_utf8(buf.clone()).expect("UTF-8");
            let back: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
            assert!(
                text.contains(&format!("\"data\":{payload_json}")),
                "the payload as it came: {text}"
            );
            assert_eq!(
                back.get("subject").is_none(),
                aggregate.is_empty(),
                "{text}"
            );
            envelopes.push(text);
        }
        if let Some(problems) = cloudevents_problems(&envelopes) {
            let shown: Vec<String> = problems
                .iter()
                .take(5)
                .map(|p| {
                    let n: usize = p.split(':').next().unwrap().parse().unwrap();
                    format!("{p}\n  {}", envelopes[n - 1])
                })
                .collect();
            assert!(problems.is_empty(), "{}", shown.join("\n"));
        }
    }
}

/// The names the alert rules use, read from the rules file.
fn alert_metric_names() -> Vec<String> {
    let text = std::fs::read_to_string("deploy/prometheus/alerts.yml").unwrap();
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("outboxd_"))
        .map(|w| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| w.strip_suffix(s))
                .unwrap_or(w)
                .to_string()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test]
async fn metrics_are_there_from_the_first_scrape_and_per_database() {
    let first = TestDb::new("metrics_a").await;
    let second = TestDb::new("metrics_b").await;
    let streams = TestStreams::new("metrics");
    let port = free_port();
    let cfg = TestConfig::new(&streams.prefix)
        .database("first", &first.url)
        .database("second", &second.url)
        .relay("first", "table = \"outbox\"")
        .relay("second", "table = \"outbox\"")
        .consumer(
            "order-status",
            "first",
            &[FSC],
            "order_status",
            "claim_idle_ms = 500",
        )
        .section(&format!("[http]\nlisten = \"127.0.0.1:{port}\""))
        .migrated("metrics");
    let mut daemon = spawn_bin(
        &["--config", cfg.to_str().unwrap(), "run"],
        &cfg.parent().unwrap().join("run.log"),
    );
    wait_until("the endpoint answers", Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    let body = http_get(port, "/metrics").await;
    let body = body
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    for name in alert_metric_names() {
        assert!(
            body.contains(&format!("\n{name}")) || body.starts_with(&name),
            "{name}, which an alert rule uses, is not in the first scrape:\n{body}"
        );
    }
    for series in [
        "outboxd_dead_letters_total{consumer=\"order-status\"",
        "outboxd_relay_quarantined_total{database=\"first\",table=\"outbox\"} 0",
        "outboxd_relay_quarantined_total{database=\"second\",table=\"outbox\"} 0",
        "outboxd_relay_errors_total{database=\"first\",kind=\"transient\",table=\"outbox\"} 0",
        "outboxd_consumer_errors_total{consumer=\"order-status\",kind=\"handler\"} 0",
        "outboxd_consumer_events_total{consumer=\"order-status\",result=\"dead_lettered\"} 0",
        "outboxd_order_status_skipped_total{reason=\"backwards\"} 0",
        "outboxd_order_status_transitions_total{from=\"confirmed\",to=\"processing\"} 0",
    ] {
        assert!(body.contains(series), "no {series} at start:\n{body}");
    }
    if let Some(promtool) = optional_tool_on_path("promtool") {
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // two outboxes named `outbox` in two databases: two series
    for db in [&first, &second] {
        db.client()
            .await
            .execute(
                "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ('ping', 'a', '{}')",
                &[],
            )
            .await
            .unwrap();
    }
    wait_until("both published", Duration::from_secs(30), || async {
        streams.len("ping").await == 2
    })
    .await;
    let body = http_get(port, "/metrics").await;
    for db in ["first", "second"] {
        let series = format!(
            "outboxd_relay_events_published_total{{database=\"{db}\",table=\"outbox\",topic=\"ping\"}} 1"
        );
        assert!(body.contains(&series), "no {series}:\n{body}");
    }
    sigterm(&daemon);
    assert!(daemon.wait().unwrap().success());
}

/// A tool found on PATH (promtool, installed by `scripts/dev-services --tests`).
fn optional_tool_on_path(tool: &str) -> Option<String> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.exists())
    });
    match found {
        Some(p) => Some(p.to_string_lossy().into_owned()),
        None => {
            assert!(
                std::env::var("OUTBOXD_REQUIRE_OPTIONAL_TOOLS").as_deref() != Ok("1"),
                "{tool} is not on PATH"
            );
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPED: {tool} is not on PATH ***\n"
            );
            None
        }
    }
}

#[tokio::test]
async fn several_processes_on_one_host_each_with_its_own_endpoint() {
    let db = TestDb::new("hosts").await;
    let streams = TestStreams::new("hosts");
    let cfg = TestConfig::new(&streams.prefix)
        .database("orders", &db.url)
        .relay("orders", "table = \"outbox\"")
        .consumer("order-status", "orders", &[FSC], "order_status", "")
        .section("[http]\nlisten = \"127.0.0.1:9\"")
        .migrated("hosts");
    let (relay_port, consume_port) = (free_port(), free_port());
    let dir = cfg.parent().unwrap().to_path_buf();
    let c = cfg.to_str().unwrap();
    let mut children = vec![
        spawn_bin(
            &[
                "--config",
                c,
                "--http-listen",
                &format!("127.0.0.1:{relay_port}"),
                "relay",
            ],
            &dir.join("relay.log"),
        ),
        spawn_bin(
            &[
                "--config",
                c,
                "--http-listen",
                &format!("127.0.0.1:{consume_port}"),
                "consume",
            ],
            &dir.join("consume.log"),
        ),
        // and one without an endpoint at all
        spawn_bin(
            &["--config", c, "--http-listen", "", "relay"],
            &dir.join("quiet.log"),
        ),
    ];
    for port in [relay_port, consume_port] {
        wait_until("its endpoint", Duration::from_secs(30), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        assert!(http_get(port, "/healthz").await.contains("ok"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for child in &mut children {
        assert!(
            child.try_wait().unwrap().is_none(),
            "every process is still running (no address in use)"
        );
    }
    for child in &children {
        sigterm(child);
    }
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
}
