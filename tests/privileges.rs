//! The documented least-privilege setup (`sql/least_privilege.sql`) is enough: the relay and
//! the `order_status` consumer run end to end as those roles, and the roles cannot touch what
//! they were not granted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

const FSC: &str = "fulfillment.status_changed";

/// The roles get a password, so that the test holds whatever the server's authentication
/// (trust or password) for local TCP connections.
const PASSWORD: &str = "least-privilege-test";

fn as_role(url: &str, role: &str) -> String {
    url.replacen("://root@", &format!("://{role}:{PASSWORD}@"), 1)
}

#[tokio::test]
async fn relay_and_consumer_run_with_only_the_documented_grants() {
    let fdb = TestDb::new("priv_f").await;
    let odb = TestDb::new("priv_o").await;
    let streams = TestStreams::new("priv");
    // roles are cluster-wide: this test's own names
    let relay_role = unique("relay");
    let consumer_role = unique("consumer");
    let grants = include_str!("../sql/least_privilege.sql")
        .replace("outboxd_relay", &relay_role)
        .replace("outboxd_consumer", &consumer_role);

    // migrate as the owner, then grant
    let owner_cfg = write_config(
        "priv_owner",
        &format!(
            "[redis]\nurl = \"{}\"\n[databases.fulfillment]\nurl = \"{}\"\n[databases.orders]\nurl = \"{}\"\n[[relays]]\ndatabase = \"fulfillment\"\narchive_retention_hours = 24\n[[relays]]\ndatabase = \"orders\"\n[[consumers]]\nname = \"order-status\"\ndatabase = \"orders\"\nstreams = [\"{FSC}\"]\nhandler = \"order_status\"\n",
            redis_url(),
            fdb.url,
            odb.url
        ),
    );
    outboxd(&owner_cfg, &["migrate"]);
    let fulfil = fdb.client().await;
    let orders = odb.client().await;
    fulfil.batch_execute(&grants).await.unwrap();
    orders.batch_execute(&grants).await.unwrap();
    for role in [&relay_role, &consumer_role] {
        fulfil
            .batch_execute(&format!("ALTER ROLE \"{role}\" PASSWORD '{PASSWORD}'"))
            .await
            .unwrap();
    }

    let text = format!(
        r#"
[redis]
url = "{redis}"
stream_prefix = "{prefix}"
[databases.fulfillment]
url = "{f_relay}"
[databases.orders_relay]
url = "{o_relay}"
[databases.orders]
url = "{o_consumer}"
[[relays]]
database = "fulfillment"
archive_retention_hours = 24
[[relays]]
database = "orders_relay"
[[consumers]]
name = "order-status"
database = "orders"
streams = ["{FSC}"]
handler = "order_status"
"#,
        redis = redis_url(),
        prefix = streams.prefix,
        f_relay = as_role(&fdb.url, &relay_role),
        o_relay = as_role(&odb.url, &relay_role),
        o_consumer = as_role(&odb.url, &consumer_role),
    );
    let cfg = write_config("priv", &text);
    for i in 0..5 {
        orders
            .execute(
                "INSERT INTO orders (id, status) VALUES ($1, 'confirmed')",
                &[&format!("o{i}")],
            )
            .await
            .unwrap();
        for status in ["picking", "shipped"] {
            fulfil
                .execute(
                    "INSERT INTO outbox (topic, aggregate_id, payload) VALUES ($1, $2,
                       jsonb_build_object('event_type', $1::text, 'fulfillment_id', 'f-' || $2,
                         'order_id', $2::text, 'new_status', $3::text))",
                    &[&FSC, &format!("o{i}"), &status],
                )
                .await
                .unwrap();
        }
    }
    outboxd(&cfg, &["relay", "--once"]);
    assert_eq!(count(&fulfil, "SELECT count(*) FROM outbox").await, 0);
    assert_eq!(
        count(&fulfil, "SELECT count(*) FROM outbox_archive").await,
        10
    );
    outboxd(&cfg, &["consume", "--once"]);
    assert_eq!(
        count(
            &orders,
            "SELECT count(*) FROM orders WHERE status = 'shipped'"
        )
        .await,
        5
    );
    assert_eq!(count(&orders, "SELECT count(*) FROM inbox").await, 10);
    // the consumer's order.status_changed events, relayed by the relay role
    assert_eq!(count(&orders, "SELECT count(*) FROM outbox").await, 10);
    outboxd(&cfg, &["relay", "--once"]);
    assert_eq!(count(&orders, "SELECT count(*) FROM outbox").await, 0);
    assert_eq!(streams.entries("order.status_changed").await.len(), 10);

    // and nothing more: the relay cannot move orders, the consumer cannot delete outbox rows
    let relay = pg_connect(&as_role(&odb.url, &relay_role)).await;
    let e = relay
        .execute("UPDATE orders SET status = 'cancelled'", &[])
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{e:?}"
    );
    let consumer = pg_connect(&as_role(&odb.url, &consumer_role)).await;
    let e = consumer
        .execute("DELETE FROM outbox", &[])
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{e:?}"
    );

    drop((relay, consumer, fulfil, orders));
    drop((fdb, odb));
    let admin = pg_connect(&pg_admin_url()).await;
    for role in [&relay_role, &consumer_role] {
        admin
            .batch_execute(&format!("DROP ROLE IF EXISTS \"{role}\""))
            .await
            .unwrap();
    }
}
