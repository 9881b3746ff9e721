//! An in-process TCP fault proxy: tests put a [`FaultProxy`] between a client and a real server
//! on loopback and inject latency, resets, black holes, refused connects, bandwidth limits and
//! slow closes with [`FaultProxy::set`] (there is no `tc netem` or Docker on our machines).
//!
//! This file owns the public API, the listener (including closing and re-binding it for
//! [`Fault::Refuse`]) and the accept loop; `fault/conn.rs` owns what happens on one proxied
//! connection.
//!
//! Every background task runs on the runtime that called [`FaultProxy::start`]. IO errors in
//! those tasks close the affected connection; nothing in them panics.

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{Notify, watch};
use tokio::task::{JoinHandle, JoinSet};

mod conn;

#[cfg(test)]
mod tests;

/// How often the accept loop retries re-binding the port after [`Fault::Refuse`] is lifted and
/// the immediate re-bind in [`FaultProxy::set`] failed.
const REBIND_RETRY: Duration = Duration::from_millis(50);

/// Back-off after a failed `accept` (EMFILE and friends), so the loop never spins.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// A TCP proxy on `127.0.0.1` that forwards to an upstream and applies a [`Fault`].
///
/// Dropping it closes the listener at once (connects fail with `ConnectionRefused` as soon as
/// `drop` returns) and cancels every connection task, which closes the proxied connections
/// moments later.
pub struct FaultProxy {
    shared: Arc<Shared>,
    acceptor: JoinHandle<()>,
}

/// What the proxy does to traffic. Changes apply to new connections and, where noted, to
/// connections already open (on their next chunk).
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Pass traffic unchanged.
    None,
    /// Delay each chunk in each direction by this much. Chunks are time-stamped when read, so
    /// the delay is pipelined (throughput is not divided by the latency), and a close is
    /// delayed like data. Applies to open connections.
    Latency(Duration),
    /// Accept, then immediately reset the client connection (RST) without contacting upstream.
    /// Only acts on connect; open connections are unaffected. The client usually sees its
    /// first read fail with `ConnectionReset`, but the RST can beat a tokio client's connect
    /// future, which then fails with `ConnectionReset` itself.
    ResetOnConnect,
    /// Forward the first `n` bytes client→upstream, then reset both sides. Bytes are counted
    /// per connection from its start, so on an open connection that already sent `n` bytes
    /// the next chunk triggers the reset. A connection that sends exactly `n` bytes is reset
    /// right after the `n`th byte is forwarded.
    ResetAfterBytes(u64),
    /// Accept and read but never forward or answer: the client waits forever. New connections
    /// do not contact upstream until the fault changes; on open connections data in both
    /// directions is read and discarded and closes are held back.
    Blackhole,
    /// Refuse new connections: the listener is closed, so connects fail with
    /// `ConnectionRefused`. Setting any other fault re-binds the same port (the listener has
    /// `SO_REUSEADDR`, so connections still open on that port do not block it). If that
    /// re-bind fails (another socket took the port meanwhile), the accept loop retries every
    /// 50 ms. Open connections are unaffected.
    Refuse,
    /// Limit throughput per direction to this many bytes per second, paced in slices of about
    /// 50 ms worth of bytes. `Bandwidth(0)` stalls both directions until the fault changes.
    /// Applies to open connections.
    Bandwidth(u64),
    /// When the upstream closes (FIN), hold the client side open this long before closing it.
    /// Applies to open connections; an upstream *reset* is still passed on at once.
    SlowClose(Duration),
}

/// Counters since [`FaultProxy::start`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections accepted and not yet closed.
    pub active: u64,
    /// Bytes handed to upstream sockets (a chunk counts before its write, so a client that has
    /// seen an answer always sees its request counted).
    pub bytes_up: u64,
    /// Bytes handed to client sockets, counted before the write for the same reason.
    pub bytes_down: u64,
    /// Connections the proxy reset on purpose: by a fault or by [`FaultProxy::reset_all`].
    /// Resets passed on from a peer (one side resets, so we reset the other) are not counted.
    pub resets: u64,
}

/// State shared by the handle, the accept loop and every connection task.
#[derive(Debug)]
struct Shared {
    addr: SocketAddr,
    runtime: Handle,
    upstream: Mutex<SocketAddr>,
    fault: watch::Sender<Fault>,
    /// Bumped by [`FaultProxy::reset_all`]; each connection watches it.
    reset_generation: watch::Sender<u64>,
    listener: Mutex<ListenerSlot>,
    /// Wakes the accept loop when the listener is closed or replaced.
    listener_changed: Notify,
    stats: Counters,
}

/// The listener lives here, not inside the accept task, so that `set` and `Drop` can close it
/// synchronously.
#[derive(Debug)]
struct ListenerSlot {
    listener: Option<TcpListener>,
    /// Set on drop: never re-bind again.
    closed: bool,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    active: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    resets: AtomicU64,
}

impl FaultProxy {
    /// Listen on 127.0.0.1:0 and forward every accepted connection to `upstream`. Runs on the
    /// current tokio runtime; stops (closing the listener and every proxied connection) when
    /// dropped.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let runtime = Handle::try_current().map_err(io::Error::other)?;
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)), &runtime)?;
        let shared = Arc::new(Shared {
            addr: listener.local_addr()?,
            runtime: runtime.clone(),
            upstream: Mutex::new(upstream),
            fault: watch::Sender::new(Fault::None),
            reset_generation: watch::Sender::new(0),
            listener: Mutex::new(ListenerSlot {
                listener: Some(listener),
                closed: false,
            }),
            listener_changed: Notify::new(),
            stats: Counters::default(),
        });
        let acceptor = runtime.spawn(accept_loop(Arc::clone(&shared)));
        Ok(FaultProxy { shared, acceptor })
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Change the fault for new and open connections (see each [`Fault`] for which parts apply
    /// to open connections).
    pub fn set(&self, fault: Fault) {
        let refuse = fault == Fault::Refuse;
        let mut slot = lock(&self.shared.listener);
        self.shared.fault.send_replace(fault);
        if refuse {
            // Dropping the only handle closes the socket now: connects are refused as soon as
            // `set` returns.
            slot.listener = None;
        } else {
            self.shared.rebind(&mut slot);
        }
        drop(slot);
        self.shared.listener_changed.notify_one();
    }

    /// The current fault.
    pub fn fault(&self) -> Fault {
        self.shared.fault.borrow().clone()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.stats;
        let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
        ProxyStats {
            accepted: get(&c.accepted),
            active: get(&c.active),
            bytes_up: get(&c.bytes_up),
            bytes_down: get(&c.bytes_down),
            resets: get(&c.resets),
        }
    }

    /// Reset (RST, via `SO_LINGER` 0 then close) every open proxied connection, both the client
    /// and the upstream side. Each connection's task does it as soon as it is next polled, so
    /// the client sees the reset moments after this returns; `resets` is counted before the
    /// RST is sent.
    pub fn reset_all(&self) {
        self.shared.reset_generation.send_modify(|g| *g += 1);
    }

    /// Point new connections at a different upstream; open connections keep theirs.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *lock(&self.shared.upstream) = upstream;
    }
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.shared.addr)
            .field("upstream", &*lock(&self.shared.upstream))
            .field("fault", &self.fault())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let mut slot = lock(&self.shared.listener);
        slot.closed = true;
        slot.listener = None;
        drop(slot);
        // The accept task owns the `JoinSet` of connection tasks; dropping it aborts them all.
        self.acceptor.abort();
    }
}

impl Shared {
    fn upstream(&self) -> SocketAddr {
        *lock(&self.upstream)
    }

    /// Accept from the current listener; pending while there is none (the accept loop is woken
    /// by `listener_changed` or its re-bind timer instead).
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<TcpStream>> {
        match &lock(&self.listener).listener {
            Some(l) => l.poll_accept(cx).map_ok(|(stream, _)| stream),
            None => Poll::Pending,
        }
    }

    /// True when the port should be listening but is not (a re-bind failed).
    fn needs_rebind(&self) -> bool {
        let slot = lock(&self.listener);
        slot.listener.is_none() && !slot.closed && *self.fault.borrow() != Fault::Refuse
    }

    /// Listen on our port again unless already listening or dropped. A failure leaves the slot
    /// empty for the accept loop to retry.
    fn rebind(&self, slot: &mut ListenerSlot) {
        if slot.listener.is_none() && !slot.closed {
            slot.listener = bind(self.addr, &self.runtime).ok();
        }
    }

    fn count_reset(&self) {
        self.stats.resets.fetch_add(1, Ordering::SeqCst);
    }

    fn count_forwarded(&self, up: bool, bytes: usize) {
        let counter = if up {
            &self.stats.bytes_up
        } else {
            &self.stats.bytes_down
        };
        counter.fetch_add(bytes as u64, Ordering::SeqCst);
    }
}

/// Keeps `active` honest however a connection task ends (including being aborted before its
/// first poll), because it is created at accept and moved into the task.
#[derive(Debug)]
struct ActiveGuard(Arc<Shared>);

impl ActiveGuard {
    fn new(shared: &Arc<Shared>) -> ActiveGuard {
        shared.stats.accepted.fetch_add(1, Ordering::SeqCst);
        shared.stats.active.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(Arc::clone(shared))
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Accept connections and hand each to its own task until the proxy is dropped.
async fn accept_loop(shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = poll_fn(|cx| shared.poll_accept(cx)) => match accepted {
                Ok(client) => {
                    let conn = conn::Conn::new(ActiveGuard::new(&shared));
                    conns.spawn(conn.serve(client));
                }
                Err(_) => tokio::time::sleep(ACCEPT_BACKOFF).await,
            },
            () = shared.listener_changed.notified() => {}
            () = tokio::time::sleep(REBIND_RETRY), if shared.needs_rebind() => {
                shared.rebind(&mut lock(&shared.listener));
            }
            // Reap finished connection tasks so the set does not grow for the proxy's life.
            Some(_) = conns.join_next() => {}
        }
    }
}

/// A non-blocking listener on `addr`. `std` sets `SO_REUSEADDR` on Unix listeners, which is
/// what lets [`Fault::Refuse`] re-bind the port while accepted connections still use it.
fn bind(addr: SocketAddr, runtime: &Handle) -> io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let _runtime = runtime.enter();
    TcpListener::from_std(listener)
}

/// Lock ignoring poison: the guarded values stay consistent even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
