//! A TCP fault proxy of the tests' own, between outboxd and a real server: it forwards bytes
//! both ways and, on command, freezes every live connection (bytes stop flowing, the sockets
//! stay open, new connections still work), delays, resets, or holds a client's next large
//! write and lets it through one Redis command at a time. It runs on a thread and runtime of
//! its own, so a test that blocks on a child process does not stall it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One direction of one connection: bytes read and not yet written, and how many more may
/// be written (`None`: no limit).
#[derive(Default)]
struct Pipe {
    queue: Vec<u8>,
    allowance: Option<usize>,
    written: u64,
}

#[derive(Default)]
struct Connection {
    to_server: Pipe,
    to_client: Pipe,
    reset: bool,
    /// The local port of the proxy's connection to the server: the client address the
    /// server sees (`pg_stat_activity.client_port`, Redis `CLIENT LIST` addr).
    upstream_port: u16,
}

#[derive(Default)]
struct Control {
    next_id: u64,
    live: HashMap<u64, Connection>,
    /// Arm: the next client write of at least this many bytes is held whole.
    hold_at: Option<usize>,
    /// The connection whose write is held.
    held: Option<u64>,
    delay: Duration,
    /// Connections ever accepted.
    accepted: u64,
}

/// A running proxy; stops with the value.
pub struct FaultProxy {
    pub port: u16,
    control: Arc<Mutex<Control>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:target`.
    pub fn start(target: u16) -> FaultProxy {
        let control = Arc::new(Mutex::new(Control::default()));
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = control.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).unwrap();
                let accept = async {
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            continue;
                        };
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                            continue;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let upstream_port = server.local_addr().map(|a| a.port()).unwrap_or(0);
                        let id = {
                            let mut c = shared.lock().unwrap();
                            c.next_id += 1;
                            c.accepted += 1;
                            let id = c.next_id;
                            c.live.insert(
                                id,
                                Connection {
                                    upstream_port,
                                    ..Connection::default()
                                },
                            );
                            id
                        };
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        tokio::spawn(forward(shared.clone(), id, true, cr, sw));
                        tokio::spawn(forward(shared.clone(), id, false, sr, cw));
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
        });
        FaultProxy {
            port,
            control,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Control) -> T) -> T {
        f(&mut self.control.lock().unwrap())
    }

    /// Stops forwarding on every live connection, both ways; the sockets stay open.
    /// Connections made afterwards are not affected.
    pub fn freeze(&self) {
        self.with(|c| {
            for conn in c.live.values_mut() {
                conn.to_server.allowance = Some(0);
                conn.to_client.allowance = Some(0);
            }
        })
    }

    /// Freezes the one live connection whose server-side address has port `port` (what the
    /// server reports as the client's port). Returns whether there was one.
    pub fn freeze_upstream_port(&self, port: u16) -> bool {
        self.with(|c| {
            let mut found = false;
            for conn in c.live.values_mut() {
                if conn.upstream_port == port {
                    conn.to_server.allowance = Some(0);
                    conn.to_client.allowance = Some(0);
                    found = true;
                }
            }
            found
        })
    }

    /// Live connections (frozen ones included).
    pub fn live(&self) -> usize {
        self.with(|c| c.live.len())
    }

    /// Forwards again everything frozen or held.
    pub fn thaw(&self) {
        self.with(|c| {
            c.held = None;
            c.hold_at = None;
            for conn in c.live.values_mut() {
                conn.to_server.allowance = None;
                conn.to_client.allowance = None;
            }
        })
    }

    /// Closes every live connection.
    pub fn reset(&self) {
        self.with(|c| {
            for conn in c.live.values_mut() {
                conn.reset = true;
            }
        })
    }

    /// Delays every forwarded chunk by `by`.
    pub fn delay(&self, by: Duration) {
        self.with(|c| c.delay = by)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.with(|c| c.accepted)
    }

    /// Holds the next client write of at least `min_bytes` (on any connection), whole.
    pub fn hold_next_write(&self, min_bytes: usize) {
        self.with(|c| {
            c.hold_at = Some(min_bytes);
            c.held = None;
        })
    }

    /// Waits until a write is held; panics after `timeout`.
    pub fn wait_held(&self, timeout: Duration) {
        let started = Instant::now();
        while self.with(|c| c.held.is_none()) {
            assert!(
                started.elapsed() < timeout,
                "no write to hold came within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Lets the first whole Redis command of the held write through, then waits until the
    /// server has answered something on that connection. Returns the number of commands
    /// still held.
    pub fn pass_one_command(&self, timeout: Duration) -> usize {
        let (id, before) = self.with(|c| {
            let id = c.held.expect("a held write");
            let conn = c.live.get_mut(&id).expect("the held connection is live");
            let end = resp_command_end(&conn.to_server.queue).expect("a whole command held");
            conn.to_server.allowance = Some(end);
            (id, conn.to_client.written)
        });
        let started = Instant::now();
        loop {
            let answered = self.with(|c| {
                c.live
                    .get(&id)
                    .is_some_and(|conn| conn.to_client.written > before)
            });
            if answered {
                break;
            }
            assert!(started.elapsed() < timeout, "the server did not answer");
            std::thread::sleep(Duration::from_millis(5));
        }
        self.with(|c| {
            let conn = &c.live[&id];
            count_commands(&conn.to_server.queue)
        })
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.reset();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies one direction of connection `id`, as the control allows.
async fn forward(
    control: Arc<Mutex<Control>>,
    id: u64,
    to_server: bool,
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut eof = false;
    loop {
        let (chunk, delay, reset) = {
            let mut c = control.lock().unwrap();
            let delay = c.delay;
            let Some(conn) = c.live.get_mut(&id) else {
                return;
            };
            let pipe = if to_server {
                &mut conn.to_server
            } else {
                &mut conn.to_client
            };
            let n = pipe.queue.len().min(pipe.allowance.unwrap_or(usize::MAX));
            if let Some(a) = pipe.allowance.as_mut() {
                *a -= n;
            }
            pipe.written += n as u64;
            (
                pipe.queue.drain(..n).collect::<Vec<u8>>(),
                delay,
                conn.reset,
            )
        };
        if reset {
            control.lock().unwrap().live.remove(&id);
            return;
        }
        if !chunk.is_empty() {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if to.write_all(&chunk).await.is_err() {
                control.lock().unwrap().live.remove(&id);
                return;
            }
            continue;
        }
        if eof {
            let _ = to.shutdown().await;
            return;
        }
        tokio::select! {
            read = from.read(&mut buf), if !eof => match read {
                Ok(0) | Err(_) => eof = true,
                Ok(n) => {
                    let mut c = control.lock().unwrap();
                    let hold_at = c.hold_at;
                    let mut held = None;
                    if let Some(conn) = c.live.get_mut(&id) {
                        let pipe = if to_server { &mut conn.to_server } else { &mut conn.to_client };
                        pipe.queue.extend_from_slice(&buf[..n]);
                        if to_server && hold_at.is_some_and(|min| pipe.queue.len() >= min) {
                            pipe.allowance = Some(0);
                            held = Some(id);
                        }
                    }
                    if held.is_some() {
                        c.held = held;
                        c.hold_at = None;
                    }
                }
            },
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
}

/// The end of the first whole RESP command (an array of bulk strings) in `buf`.
fn resp_command_end(buf: &[u8]) -> Option<usize> {
    fn line(buf: &[u8], at: usize) -> Option<(i64, usize)> {
        let rest = buf.get(at..)?;
        let end = rest.windows(2).position(|w| w == b"\r\n")?;
        let n = std::str::from_utf8(rest.get(1..end)?).ok()?.parse().ok()?;
        Some((n, at + end + 2))
    }
    let (items, mut at) = line(buf, 0)?;
    for _ in 0..items {
        let (len, start) = line(buf, at)?;
        at = start + len as usize + 2;
        if at > buf.len() {
            return None;
        }
    }
    Some(at)
}

fn count_commands(mut buf: &[u8]) -> usize {
    let mut n = 0;
    while let Some(end) = resp_command_end(buf) {
        n += 1;
        buf = &buf[end..];
    }
    n
}
