//! The small HTTP endpoint: `/metrics` (see `metrics`), `/healthz` (no loop stuck, see
//! `watchdog`) and `/readyz` (no loop backing off, and every configured database and Redis
//! answer).

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// What `/readyz` checks: every database answers `SELECT 1` and Redis answers `PING`.
#[derive(Clone, Debug)]
pub struct Readiness {
    pub databases: Vec<(String, deadpool_postgres::Pool)>,
    pub redis: Option<crate::redis_io::Redis>,
}

impl Readiness {
    pub async fn check(&self) -> Result<(), String> {
        for (name, pool) in &self.databases {
            let probe = async {
                let client = pool.get().await.map_err(|e| e.to_string())?;
                client
                    .simple_query("SELECT 1")
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<(), String>(())
            };
            match tokio::time::timeout(Duration::from_secs(2), probe).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("database {name}: {e}")),
                Err(_) => return Err(format!("database {name}: no answer within 2s")),
            }
        }
        if let Some(redis) = &self.redis {
            let mut conn = redis.commands();
            let ping_cmd = redis::cmd("PING");
            let ping = ping_cmd.query_async::<String>(&mut conn);
            match tokio::time::timeout(Duration::from_secs(2), ping).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("redis: {e}")),
                Err(_) => return Err("redis: no answer within 2s".into()),
            }
        }
        Ok(())
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`; nothing else (every other
/// path is 404, every other method 405).
pub async fn serve(
    listener: tokio::net::TcpListener,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, &readiness)).await;
        });
    }
}

async fn answer(mut stream: tokio::net::TcpStream, readiness: &Readiness) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    // Read the request head only; these endpoints take no body.
    while len < buf.len() {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", {
            crate::watchdog::export();
            crate::metrics::render()
        }),
        ("GET", "/healthz") => match crate::watchdog::health() {
            Ok(()) => ("200 OK", "text/plain", "ok\n".to_string()),
            Err(e) => (
                "503 Service Unavailable",
                "text/plain",
                format!("stuck: {e}\n"),
            ),
        },
        ("GET", "/readyz") => match crate::watchdog::readiness().and(readiness.check().await) {
            Ok(()) => ("200 OK", "text/plain", "ready\n".to_string()),
            Err(e) => (
                "503 Service Unavailable",
                "text/plain",
                format!("not ready: {e}\n"),
            ),
        },
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
