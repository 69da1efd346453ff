//! A TCP proxy between ratekeeper and `redis-server` that fails the way real
//! networks do: a one-way delay on every byte, connections that go silent
//! for good (the host vanished without a FIN, a NAT or load-balancer entry
//! expired) while new ones work, and new connections sent to another target
//! (a managed Redis's endpoint, or a Kubernetes Service, moving to the new
//! primary). It accepts on a thread and runtime of its own and copies each
//! connection's bytes on plain threads, so a busy test runtime cannot add
//! delay of its own.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpStream};
use std::time::Instant;

use tokio::net::TcpListener;

/// A running proxy; stops (dropping every connection) on drop.
pub struct FaultProxy {
    pub port: u16,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    target: Mutex<SocketAddr>,
    /// Added to every chunk in each direction.
    delay: Mutex<Duration>,
    /// Every connection accepted so far: its silence flag and the bytes
    /// it has carried.
    connections: Mutex<Vec<(Arc<AtomicBool>, Arc<AtomicUsize>)>>,
    accepted: AtomicUsize,
}

impl FaultProxy {
    /// A proxy on a free loopback port forwarding to `target`.
    pub fn start(target: SocketAddr) -> Self {
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            delay: Mutex::new(Duration::ZERO),
            connections: Mutex::default(),
            accepted: AtomicUsize::new(0),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let for_thread = shared.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                tokio::select! {
                    _ = stopped => {}
                    () = accept_loop(listener, for_thread) => {}
                }
            });
        });
        FaultProxy {
            port,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// From now on every chunk waits `one_way` in each direction.
    pub fn set_delay(&self, one_way: Duration) {
        *self.shared.delay.lock().unwrap() = one_way;
    }

    /// Every connection open at this moment goes silent for good: bytes
    /// either way are swallowed, nothing is closed. New ones work.
    pub fn silence_open_connections(&self) {
        for (silent, _) in self.shared.connections.lock().unwrap().iter() {
            silent.store(true, Ordering::SeqCst);
        }
    }

    /// The open connection that has carried the most bytes (the one the
    /// traffic uses) goes silent for good; the others keep working.
    pub fn silence_busiest_connection(&self) {
        let connections = self.shared.connections.lock().unwrap();
        let busiest = connections
            .iter()
            .filter(|(silent, _)| !silent.load(Ordering::SeqCst))
            .max_by_key(|(_, bytes)| bytes.load(Ordering::SeqCst))
            .expect("an open connection");
        busiest.0.store(true, Ordering::SeqCst);
    }

    /// New connections go to `target`; open ones keep theirs.
    pub fn redirect(&self, target: SocketAddr) {
        *self.shared.target.lock().unwrap() = target;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let target = *shared.target.lock().unwrap();
        let silent = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicUsize::new(0));
        shared
            .connections
            .lock()
            .unwrap()
            .push((silent.clone(), bytes.clone()));
        let Ok(client) = client.into_std() else {
            continue;
        };
        let shared = shared.clone();
        std::thread::spawn(move || {
            let _ = client.set_nonblocking(false);
            let Ok(server) = TcpStream::connect(target) else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (Ok(client_out), Ok(server_out)) = (client.try_clone(), server.try_clone()) else {
                return;
            };
            let up = {
                let (shared, silent, bytes) = (shared.clone(), silent.clone(), bytes.clone());
                std::thread::spawn(move || pump(client, server_out, &shared, &silent, &bytes))
            };
            pump(server, client_out, &shared, &silent, &bytes);
            let _ = up.join();
        });
    }
}

/// Copies one direction, each chunk delivered `delay` after it arrived, in
/// order and counted in `bytes`; a silenced connection swallows
/// everything from then on. Plain
/// threads sleeping to the microsecond: tokio's timers round up to whole
/// milliseconds, which would add up to a millisecond per direction.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    shared: &Shared,
    silent: &Arc<AtomicBool>,
    bytes: &AtomicUsize,
) {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = {
        let silent = silent.clone();
        std::thread::spawn(move || {
            while let Ok((due, chunk)) = rx.recv() {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if silent.load(Ordering::SeqCst) {
                    continue;
                }
                if to.write_all(&chunk).is_err() {
                    return;
                }
            }
            // A silenced connection does not even say goodbye.
            if !silent.load(Ordering::SeqCst) {
                let _ = to.shutdown(Shutdown::Write);
            }
        })
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if silent.load(Ordering::SeqCst) {
                    continue;
                }
                bytes.fetch_add(n, Ordering::SeqCst);
                let due = Instant::now() + *shared.delay.lock().unwrap();
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
}
