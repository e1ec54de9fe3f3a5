//! A TCP forwarder that can make a link slow: each chunk is delivered `delay` after it was read (order kept), at
//! most `bytes_per_sec` per direction and connection. It also carries traffic from a network namespace's link to
//! a server that listens on loopback only (the API server, `git daemon`).
//!
//! ```text
//! client ──► listen addr ──► reader task ──(chunk, due time)──► writer task: sleep until due, pace, write ──► upstream
//!           (and the same from upstream back to the client)
//! ```
//!
//! The settings are read for every chunk, so a change applies at once to open connections too.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How the link behaves now.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkShape {
    /// One-way delay of every chunk.
    pub delay: Duration,
    /// Bandwidth per direction and connection; `None`: unlimited.
    pub bytes_per_sec: Option<u64>,
}

/// A running forwarder; stops accepting (open connections end with their peers) on drop.
pub struct FaultProxy {
    pub addr: std::net::SocketAddr,
    shape: Arc<Mutex<LinkShape>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `listen` (`ip:0` for any port) and forwards every connection to `upstream`.
    pub async fn start(listen: &str, upstream: std::net::SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind(listen)
            .await
            .unwrap_or_else(|e| panic!("fault proxy binds {listen}: {e}"));
        let addr = listener.local_addr().unwrap();
        let shape = Arc::new(Mutex::new(LinkShape::default()));
        let accept_shape = shape.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let shape = accept_shape.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::spawn(pipe(client_read, server_write, shape.clone()));
                    tokio::spawn(pipe(server_read, client_write, shape));
                });
            }
        });
        FaultProxy { addr, shape, task }
    }

    /// Changes how the link behaves, for new and open connections.
    pub fn shape(&self, shape: LinkShape) {
        *self.shape.lock().unwrap() = shape;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One direction: chunks are stamped when read and written when due, paced to the bandwidth.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shape: Arc<Mutex<LinkShape>>,
) {
    // Bounded: a reader far ahead of a slow link waits, like a full socket buffer.
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(256);
    let reader_shape = shape.clone();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let due = Instant::now() + shape_now(&reader_shape).delay;
                    if tx.send((due, buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
            if let Some(rate) = shape_now(&shape).bytes_per_sec.filter(|r| *r > 0) {
                let secs = chunk.len() as f64 / rate as f64;
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

fn shape_now(shape: &Mutex<LinkShape>) -> LinkShape {
    *shape.lock().unwrap()
}
