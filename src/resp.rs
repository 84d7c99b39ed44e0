//! The relay's own Redis connection for publishing: a batch's `MULTI`/`XADD`/`EXEC`
//! transactions written into one buffer and sent in one write, and their replies read
//! straight off the socket (`+QUEUED` and each new entry's ID are checked, not built into
//! values). Through the redis crate the same batch cost outboxd about half of its CPU: every
//! reply parsed into an allocated value (two an entry: `QUEUED`, then the ID), every command
//! packed into a pipeline buffer again, and a hop through the connection's driver task.
//!
//! Only for a single server over plain TCP or a Unix socket; over TLS (`rediss://`) and on a
//! Cluster the relay publishes through the redis crate (`publish.rs`). One connection per
//! relay, made on first use: `AUTH` (user and password from the URL) and `SELECT` (its
//! database) are sent before the first batch. Anything unexpected (an I/O error, the response
//! timeout, a reply that is not what the protocol says comes next) drops the connection, and
//! the next batch makes a new one; an error reply from the server is handed back as the
//! redis crate would have made it (so the errors are told apart exactly as before).

use redis::{ConnectionAddr, ConnectionInfo, RedisError};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Target {
    addr: Addr,
    username: Option<String>,
    password: Option<String>,
    db: i64,
    /// The socket options of every Redis socket (`redis_io::tcp_settings`).
    tcp: redis::io::tcp::TcpSettings,
    connect_timeout: Duration,
    response_timeout: Duration,
}

#[derive(Debug, Clone)]
enum Addr {
    Tcp(String, u16),
    Unix(std::path::PathBuf),
}

impl Target {
    /// The server of `info`, unless it is reached over TLS (then `None`: the redis crate's
    /// connection is used).
    pub fn of(
        info: &ConnectionInfo,
        tcp: redis::io::tcp::TcpSettings,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Option<Target> {
        let addr = match info.addr() {
            ConnectionAddr::Tcp(host, port) => Addr::Tcp(host.clone(), *port),
            ConnectionAddr::Unix(path) => Addr::Unix(path.clone()),
            _ => return None,
        };
        let settings = info.redis_settings();
        Some(Target {
            addr,
            username: settings.username().map(str::to_string),
            password: settings.password().map(str::to_string),
            db: settings.db(),
            tcp,
            connect_timeout,
            response_timeout,
        })
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Past this, a buffer is given back after use instead of kept (a batch of large events
/// would otherwise leave its size behind for the connection's life).
const KEEP_BUFFER_BYTES: usize = 4 << 20;

/// One connection and its buffers.
struct Connection {
    stream: Box<dyn Stream>,
    /// Bytes read and not yet consumed: `read[pos..]`.
    read: Vec<u8>,
    pos: usize,
}

/// What `EXEC` answered for one transaction of `count` entries.
#[derive(Debug)]
pub enum Executed {
    /// Every entry was added.
    All,
    /// The first entry the server refused, and why (Redis runs the rest anyway; a key that
    /// holds another type refuses them all).
    Refused(RedisError),
}

/// The relay's publishing connection (see the module doc). Not shared: each relay has its
/// own, and its batches publish one after another.
pub struct Publisher {
    target: Target,
    conn: tokio::sync::Mutex<Option<Connection>>,
    /// The pipeline being written, kept between batches.
    out: std::sync::Mutex<Vec<u8>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("target", &self.target.addr)
            .finish_non_exhaustive()
    }
}

fn io_error(kind: io::ErrorKind, message: impl Into<String>) -> RedisError {
    RedisError::from(io::Error::new(kind, message.into()))
}

fn protocol_error(message: impl Into<String>) -> RedisError {
    io_error(io::ErrorKind::InvalidData, message)
}

/// A RESP bulk string.
fn put_bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    put_len(out, b'$', bytes.len());
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

fn put_len(out: &mut Vec<u8>, tag: u8, len: usize) {
    out.push(tag);
    let mut digits = [0u8; 20];
    let mut n = len;
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// A command of bulk-string arguments.
fn put_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    put_len(out, b'*', args.len());
    for arg in args {
        put_bulk(out, arg);
    }
}

/// One transaction: `MULTI`, an `XADD <key> * data <envelope>` per envelope, `EXEC`.
pub fn put_transaction<'a>(
    out: &mut Vec<u8>,
    key: &str,
    envelopes: impl Iterator<Item = &'a [u8]>,
) {
    put_command(out, &[b"MULTI"]);
    for envelope in envelopes {
        put_command(out, &[b"XADD", key.as_bytes(), b"*", b"data", envelope]);
    }
    put_command(out, &[b"EXEC"]);
}

/// The decimal after a reply line's type byte (`*3`, `$15`).
fn length_of(line: &[u8]) -> Option<usize> {
    std::str::from_utf8(line.get(1..)?).ok()?.parse().ok()
}

/// A reply line's text, for messages.
fn shown(line: &[u8]) -> String {
    String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned()
}

/// An error reply (`-CODE message`) as the redis crate makes it.
fn server_error(line: &[u8]) -> RedisError {
    let mut raw = Vec::with_capacity(line.len() + 2);
    raw.extend_from_slice(line);
    raw.extend_from_slice(b"\r\n");
    match redis::parse_redis_value(&raw) {
        Ok(redis::Value::ServerError(e)) => e.into(),
        Ok(other) => protocol_error(format!("unexpected reply {other:?}")),
        Err(e) => e,
    }
}

impl Connection {
    async fn open(target: &Target) -> Result<Connection, RedisError> {
        let stream: Box<dyn Stream> = match &target.addr {
            Addr::Tcp(host, port) => {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                let settings = &target.tcp;
                tcp.set_nodelay(settings.nodelay())?;
                let socket = redis::io::tcp::socket2::SockRef::from(&tcp);
                if let Some(keepalive) = settings.keepalive() {
                    socket.set_tcp_keepalive(keepalive)?;
                }
                #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
                socket.set_tcp_user_timeout(settings.user_timeout())?;
                Box::new(tcp)
            }
            Addr::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
        };
        let mut conn = Connection {
            stream,
            read: Vec::with_capacity(64 * 1024),
            pos: 0,
        };
        let mut hello = Vec::new();
        let mut expected = 0;
        if let Some(password) = &target.password {
            match &target.username {
                Some(user) => {
                    put_command(&mut hello, &[b"AUTH", user.as_bytes(), password.as_bytes()])
                }
                None => put_command(&mut hello, &[b"AUTH", password.as_bytes()]),
            }
            expected += 1;
        }
        if target.db != 0 {
            put_command(&mut hello, &[b"SELECT", target.db.to_string().as_bytes()]);
            expected += 1;
        }
        if expected > 0 {
            conn.stream.write_all(&hello).await?;
            for _ in 0..expected {
                let line = conn.line().await?;
                match line.first() {
                    Some(b'+') => {}
                    Some(b'-') => return Err(server_error(&line)),
                    _ => return Err(protocol_error(format!("unexpected reply {}", shown(&line)))),
                }
            }
        }
        Ok(conn)
    }

    /// The next reply line, without its CRLF.
    async fn line(&mut self) -> Result<Vec<u8>, RedisError> {
        let end = self.line_end().await?;
        let line = self.read[self.pos..end].to_vec();
        self.pos = end + 2;
        Ok(line)
    }

    /// Where the next line's CR is, reading until a whole line is buffered.
    async fn line_end(&mut self) -> Result<usize, RedisError> {
        // bytes after `pos` already searched (a CR at the end may be followed by its LF)
        let mut searched = 0;
        loop {
            let from = self.pos + searched;
            if let Some(at) = self.read[from..].windows(2).position(|w| w == b"\r\n") {
                return Ok(from + at);
            }
            searched = (self.read.len() - self.pos).saturating_sub(1);
            // `fill` moves the unread bytes to the front: `pos` becomes 0
            self.fill().await?;
        }
    }

    /// Reads more from the socket, first moving what is left to the front.
    async fn fill(&mut self) -> Result<(), RedisError> {
        if self.pos > 0 {
            self.read.drain(..self.pos);
            self.pos = 0;
        }
        if self.read.capacity() - self.read.len() < 16 * 1024 {
            self.read.reserve(64 * 1024);
        }
        let n = self.stream.read_buf(&mut self.read).await?;
        if n == 0 {
            return Err(io_error(
                io::ErrorKind::ConnectionAborted,
                "Redis closed the connection",
            ));
        }
        Ok(())
    }

    /// Skips a bulk string of `len` bytes and its CRLF.
    async fn skip(&mut self, len: usize) -> Result<(), RedisError> {
        while self.read.len() - self.pos < len + 2 {
            self.fill().await?;
        }
        if &self.read[self.pos + len..self.pos + len + 2] != b"\r\n" {
            return Err(protocol_error("a bulk string not ended by CRLF"));
        }
        self.pos += len + 2;
        Ok(())
    }

    /// The replies to one [`put_transaction`] of `count` entries.
    async fn executed(&mut self, count: usize) -> Result<Executed, RedisError> {
        // MULTI's +OK, then +QUEUED for each XADD: an error here is the server's state
        // (LOADING, OOM, ...), and EXEC then answers EXECABORT: nothing ran
        let mut refused_early = None;
        for i in 0..=count {
            let end = self.line_end().await?;
            let line = &self.read[self.pos..end];
            let expected: &[u8] = if i == 0 { b"+OK" } else { b"+QUEUED" };
            if line != expected {
                if line.first() != Some(&b'-') {
                    return Err(protocol_error(format!("unexpected reply {}", shown(line))));
                }
                if refused_early.is_none() {
                    refused_early = Some(server_error(line));
                }
            }
            self.pos = end + 2;
        }
        let line = self.line().await?;
        if let Some(e) = refused_early {
            // EXEC's own answer (EXECABORT) adds nothing to the first refusal
            return Err(e);
        }
        match line.first() {
            Some(b'*') => {}
            Some(b'-') => return Err(server_error(&line)),
            _ => return Err(protocol_error(format!("EXEC answered {}", shown(&line)))),
        }
        let n = length_of(&line)
            .ok_or_else(|| protocol_error(format!("EXEC answered {}", shown(&line))))?;
        if n != count {
            return Err(protocol_error(format!(
                "EXEC answered {n} results for {count} commands"
            )));
        }
        let mut refused = None;
        for _ in 0..n {
            let end = self.line_end().await?;
            let line = &self.read[self.pos..end];
            match line.first() {
                Some(b'$') => {
                    let len = length_of(line).ok_or_else(|| {
                        protocol_error(format!("unexpected reply {}", shown(line)))
                    })?;
                    self.pos = end + 2;
                    self.skip(len).await?;
                }
                Some(b'-') => {
                    if refused.is_none() {
                        refused = Some(server_error(line));
                    }
                    self.pos = end + 2;
                }
                _ => {
                    return Err(protocol_error(format!(
                        "unexpected reply to XADD {}",
                        shown(line)
                    )))
                }
            }
        }
        Ok(refused.map_or(Executed::All, Executed::Refused))
    }
}

impl Publisher {
    pub fn new(target: Target) -> Publisher {
        Publisher {
            target,
            conn: tokio::sync::Mutex::new(None),
            out: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Runs the transactions `write` puts (with [`put_transaction`]) into the pipeline, in
    /// one round trip; `counts[i]` is the number of entries of transaction i. The answers
    /// come back in that order. Any failure but an error reply of the server's drops the
    /// connection.
    pub async fn transactions(
        &self,
        counts: &[usize],
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Result<Vec<Executed>, RedisError> {
        let mut out = match self.out.lock() {
            Ok(mut kept) => std::mem::take(&mut *kept),
            Err(_) => Vec::new(),
        };
        out.clear();
        write(&mut out);
        let mut slot = self.conn.lock().await;
        let had_connection = slot.is_some();
        let result = tokio::time::timeout(self.target.response_timeout, async {
            let conn = match slot.as_mut() {
                Some(conn) => conn,
                None => {
                    let opened = tokio::time::timeout(
                        self.target.connect_timeout,
                        Connection::open(&self.target),
                    )
                    .await
                    .map_err(|_| {
                        io_error(io::ErrorKind::TimedOut, "connecting to Redis timed out")
                    })??;
                    slot.insert(opened)
                }
            };
            conn.stream.write_all(&out).await?;
            let mut answers = Vec::with_capacity(counts.len());
            let mut first_error = None;
            for &count in counts {
                // every transaction's replies are read, so that the connection stays in step
                match conn.executed(count).await {
                    Ok(answer) => answers.push(answer),
                    Err(e) if e.code().is_some() => {
                        first_error.get_or_insert(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            match first_error {
                Some(e) => Err(e),
                None => Ok(answers),
            }
        })
        .await
        .unwrap_or_else(|_| {
            Err(io_error(
                io::ErrorKind::TimedOut,
                "Redis did not answer within the response timeout",
            ))
        });
        match &result {
            // a server's error reply leaves the connection in step
            Err(e) if e.code().is_none() => {
                *slot = None;
                // counted as the shared connection's are: given up because it went silent
                if had_connection && e.is_timeout() {
                    crate::metrics::metrics()
                        .connections_replaced
                        .with_label_values(&["redis"])
                        .inc();
                }
            }
            _ => {
                if let Some(conn) = slot.as_mut() {
                    if conn.read.capacity() > KEEP_BUFFER_BYTES {
                        conn.read = Vec::with_capacity(64 * 1024);
                        conn.pos = 0;
                    }
                }
            }
        }
        drop(slot);
        if out.capacity() <= KEEP_BUFFER_BYTES {
            if let Ok(mut kept) = self.out.lock() {
                *kept = out;
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_written_in_decimal_without_leading_zeros() {
        for (n, text) in [
            (0, "$0\r\n"),
            (7, "$7\r\n"),
            (10, "$10\r\n"),
            (1234567, "$1234567\r\n"),
        ] {
            let mut out = Vec::new();
            put_len(&mut out, b'$', n);
            assert_eq!(out, text.as_bytes());
        }
    }

    #[test]
    fn a_transaction_is_multi_its_xadds_and_exec() {
        let mut out = Vec::new();
        put_transaction(&mut out, "s", [&b"{}"[..], b"ab"].into_iter());
        assert_eq!(
            String::from_utf8(out).unwrap_or_default(),
            "*1\r\n$5\r\nMULTI\r\n\
             *5\r\n$4\r\nXADD\r\n$1\r\ns\r\n$1\r\n*\r\n$4\r\ndata\r\n$2\r\n{}\r\n\
             *5\r\n$4\r\nXADD\r\n$1\r\ns\r\n$1\r\n*\r\n$4\r\ndata\r\n$2\r\nab\r\n\
             *1\r\n$4\r\nEXEC\r\n"
        );
    }

    /// A connection that reads `replies`, handed over a few bytes at a time.
    fn replaying(replies: &'static [u8], chunk: usize) -> Connection {
        let (client, mut server) = tokio::io::duplex(64);
        tokio::spawn(async move {
            for piece in replies.chunks(chunk) {
                if server.write_all(piece).await.is_err() {
                    return;
                }
            }
        });
        Connection {
            stream: Box::new(client),
            read: Vec::new(),
            pos: 0,
        }
    }

    #[tokio::test]
    async fn every_entry_added_reads_as_all_whatever_the_reads_split() {
        let replies: &[u8] =
            b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n$15\r\n1700000000000-0\r\n$15\r\n1700000000000-1\r\n";
        for chunk in [1, 2, 3, 7, 100] {
            let mut conn = replaying(replies, chunk);
            let answer = conn.executed(2).await.expect("read");
            assert!(matches!(answer, Executed::All), "chunk {chunk}: {answer:?}");
            assert_eq!(conn.pos, conn.read.len(), "every byte consumed");
        }
    }

    #[tokio::test]
    async fn a_refused_entry_comes_back_as_the_redis_crate_would_make_it() {
        let replies: &[u8] = b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n-WRONGTYPE Operation against a key holding the wrong kind of value\r\n-WRONGTYPE Operation against a key holding the wrong kind of value\r\n";
        let mut conn = replaying(replies, 5);
        match conn.executed(2).await.expect("read") {
            Executed::Refused(e) => assert!(crate::redis_io::is_row_fault(&e), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_refusal_while_queueing_fails_the_transaction_with_the_servers_error() {
        let replies: &[u8] = b"+OK\r\n-LOADING Redis is loading the dataset in memory\r\n+QUEUED\r\n-EXECABORT Transaction discarded because of previous errors.\r\n";
        let mut conn = replaying(replies, 4);
        let e = conn.executed(2).await.expect_err("refused");
        assert_eq!(e.code(), Some("LOADING"));
        assert!(crate::error::redis_is_transient(&e));
    }

    #[tokio::test]
    async fn a_reply_out_of_step_is_a_protocol_error_not_a_server_error() {
        let replies: &[u8] = b"+OK\r\n+QUEUED\r\n:1\r\n";
        let mut conn = replaying(replies, 100);
        let e = conn.executed(1).await.expect_err("out of step");
        assert!(e.code().is_none(), "{e}");
        assert!(
            crate::error::redis_is_transient(&e),
            "a new connection may do"
        );
    }

    #[tokio::test]
    async fn a_closed_connection_fails_the_read() {
        let replies: &[u8] = b"+OK\r\n+QUE";
        let mut conn = replaying(replies, 100);
        let e = conn.executed(1).await.expect_err("closed");
        assert!(e.is_io_error(), "{e}");
    }
}
