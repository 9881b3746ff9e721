//! One proxied connection: the faults that act on connect, the upstream connect, and two
//! hand-written copy loops (client→upstream, upstream→client) that apply the current fault to
//! every chunk.
//!
//! Each direction is a reader and a writer joined by a small channel. The reader stamps every
//! chunk (and the end of stream) with the time it was read, so latency is added relative to
//! that stamp and reading continues while the writer waits.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};

use super::{ActiveGuard, Fault, Shared};

/// Bytes read per chunk.
const CHUNK: usize = 16 * 1024;

/// Chunks buffered between a direction's reader and writer.
const IN_FLIGHT: usize = 16;

/// A connection just accepted, with its subscriptions taken at accept time so a `reset_all`
/// issued right after accept is not missed.
#[derive(Debug)]
pub(super) struct Conn {
    active: ActiveGuard,
    faults: watch::Receiver<Fault>,
    resets: watch::Receiver<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Client → upstream.
    Up,
    /// Upstream → client.
    Down,
}

/// What a reader hands its writer.
#[derive(Debug)]
enum Segment {
    Data(Instant, Vec<u8>),
    Eof(Instant),
}

/// Why a connection ended before both directions closed cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// A fault or `reset_all` asked for a reset (counted).
    Reset,
    /// An IO error on either side; the other side is reset to pass it on (not counted).
    Broken,
}

/// How a black-holed, not-yet-connected client stopped being swallowed.
#[derive(Debug)]
enum Swallow {
    FaultChanged,
    ClientGone,
    ResetAll,
}

/// Spacing for [`Fault::Bandwidth`]: when the next slice may be written.
#[derive(Debug, Default)]
struct Pace {
    next: Option<Instant>,
}

impl Conn {
    pub(super) fn new(active: ActiveGuard) -> Conn {
        let faults = active.0.fault.subscribe();
        let resets = active.0.reset_generation.subscribe();
        Conn {
            active,
            faults,
            resets,
        }
    }

    pub(super) async fn serve(mut self, mut client: TcpStream) {
        let shared = Arc::clone(&self.active.0);
        loop {
            match current(&mut self.faults) {
                Fault::ResetOnConnect => {
                    shared.count_reset();
                    return reset(client);
                }
                Fault::Blackhole => match self.swallow(&mut client).await {
                    Swallow::FaultChanged => continue,
                    Swallow::ClientGone => return,
                    Swallow::ResetAll => {
                        shared.count_reset();
                        return reset(client);
                    }
                },
                _ => break,
            }
        }

        let mut upstream = tokio::select! {
            connected = TcpStream::connect(shared.upstream()) => match connected {
                Ok(upstream) => upstream,
                // Nothing to proxy to: close the client plainly, as a proxy would.
                Err(_) => return,
            },
            () = reset_requested(&mut self.resets) => {
                shared.count_reset();
                return reset(client);
            }
        };
        // The proxy must not add Nagle delays of its own on top of the injected ones.
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);

        let stop = {
            let (mut client_rx, mut client_tx) = client.split();
            let (mut upstream_rx, mut upstream_tx) = upstream.split();
            let both = async {
                tokio::try_join!(
                    pump(&mut client_rx, &mut upstream_tx, Dir::Up, &shared),
                    pump(&mut upstream_rx, &mut client_tx, Dir::Down, &shared),
                )
            };
            tokio::select! {
                ended = both => ended.err(),
                () = reset_requested(&mut self.resets) => Some(Stop::Reset),
            }
        };
        match stop {
            // Both directions saw a clean end of stream and passed it on.
            None => {}
            Some(stop) => {
                if stop == Stop::Reset {
                    shared.count_reset();
                }
                reset(client);
                reset(upstream);
            }
        }
    }

    /// Read and discard what a black-holed client sends until the fault changes, the client
    /// goes away or `reset_all` is called.
    async fn swallow(&mut self, client: &mut TcpStream) -> Swallow {
        let mut buf = vec![0; CHUNK];
        loop {
            tokio::select! {
                read = client.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return Swallow::ClientGone,
                    Ok(_) => {}
                },
                changed = self.faults.changed() => {
                    if changed.is_err() {
                        return Swallow::ClientGone;
                    }
                    return Swallow::FaultChanged;
                }
                () = reset_requested(&mut self.resets) => return Swallow::ResetAll,
            }
        }
    }
}

impl Pace {
    /// Wait until `bytes` more may be sent at `rate` bytes per second. Idle time earns no
    /// credit, so a burst after a pause is still paced.
    async fn wait(&mut self, bytes: usize, rate: u64) {
        let now = Instant::now();
        let start = self.next.map_or(now, |next| next.max(now));
        sleep_until(start).await;
        let nanos = (bytes as u128 * 1_000_000_000) / u128::from(rate.max(1));
        self.next = Some(start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)));
    }
}

/// Copy one direction until end of stream (passed on as a write shutdown) or a stop.
async fn pump(
    src: &mut ReadHalf<'_>,
    dst: &mut WriteHalf<'_>,
    dir: Dir,
    shared: &Shared,
) -> Result<(), Stop> {
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    tokio::try_join!(read_side(src, tx), write_side(rx, dst, dir, shared))?;
    Ok(())
}

async fn read_side(src: &mut ReadHalf<'_>, tx: mpsc::Sender<Segment>) -> Result<(), Stop> {
    let mut buf = vec![0; CHUNK];
    loop {
        let n = src.read(&mut buf).await.map_err(|_| Stop::Broken)?;
        let segment = match n {
            0 => Segment::Eof(Instant::now()),
            n => Segment::Data(Instant::now(), buf[..n].to_vec()),
        };
        // A closed channel means the writer stopped, and its result decides the outcome.
        if tx.send(segment).await.is_err() || n == 0 {
            return Ok(());
        }
    }
}

async fn write_side(
    mut rx: mpsc::Receiver<Segment>,
    dst: &mut WriteHalf<'_>,
    dir: Dir,
    shared: &Shared,
) -> Result<(), Stop> {
    let mut faults = shared.fault.subscribe();
    // Bytes forwarded in this direction on this connection, for `ResetAfterBytes`.
    let mut sent: u64 = 0;
    let mut pace = Pace::default();
    while let Some(segment) = rx.recv().await {
        let (read_at, data) = match segment {
            Segment::Data(read_at, data) => (read_at, data),
            Segment::Eof(read_at) => {
                close_delay(&mut faults, dir, read_at).await?;
                return dst.shutdown().await.map_err(|_| Stop::Broken);
            }
        };
        let mut rest = &data[..];
        while !rest.is_empty() {
            // The fault is re-read for every slice so a change applies to data in flight.
            let (take, forward) = match current(&mut faults) {
                Fault::Blackhole => (rest.len(), false),
                Fault::Latency(delay) => {
                    sleep_until(read_at + delay).await;
                    (rest.len(), true)
                }
                Fault::ResetAfterBytes(limit) if dir == Dir::Up => {
                    let allowed = limit.saturating_sub(sent).min(rest.len() as u64) as usize;
                    write(dst, &rest[..allowed], dir, shared).await?;
                    sent += allowed as u64;
                    if sent >= limit {
                        return Err(Stop::Reset);
                    }
                    rest = &rest[allowed..];
                    continue;
                }
                Fault::Bandwidth(0) => {
                    changed(&mut faults).await?;
                    (0, false)
                }
                Fault::Bandwidth(rate) => {
                    // About 50 ms worth per slice keeps bursts small at any rate.
                    let slice = usize::try_from(rate / 20).unwrap_or(usize::MAX).max(1);
                    let take = slice.min(rest.len());
                    pace.wait(take, rate).await;
                    (take, true)
                }
                _ => (rest.len(), true),
            };
            if forward {
                write(dst, &rest[..take], dir, shared).await?;
                sent += take as u64;
            }
            rest = &rest[take..];
        }
    }
    Ok(())
}

/// Hold an end of stream back as the fault asks before passing it on.
async fn close_delay(
    faults: &mut watch::Receiver<Fault>,
    dir: Dir,
    read_at: Instant,
) -> Result<(), Stop> {
    loop {
        match current(faults) {
            // A black hole never answers, not even with a FIN.
            Fault::Blackhole => changed(faults).await?,
            Fault::Latency(delay) => break sleep_until(read_at + delay).await,
            Fault::SlowClose(delay) if dir == Dir::Down => {
                break sleep_until(read_at + delay).await;
            }
            _ => break,
        }
    }
    Ok(())
}

async fn write(
    dst: &mut WriteHalf<'_>,
    bytes: &[u8],
    dir: Dir,
    shared: &Shared,
) -> Result<(), Stop> {
    if bytes.is_empty() {
        return Ok(());
    }
    // Counted first, so a peer that has seen the bytes always sees them counted.
    shared.count_forwarded(dir == Dir::Up, bytes.len());
    dst.write_all(bytes).await.map_err(|_| Stop::Broken)
}

/// The current fault, marked seen so `changed` waits for the next one.
fn current(faults: &mut watch::Receiver<Fault>) -> Fault {
    faults.borrow_and_update().clone()
}

async fn changed(faults: &mut watch::Receiver<Fault>) -> Result<(), Stop> {
    // The sender lives as long as `Shared`, which this task holds; an error cannot happen, but
    // if it did, closing beats spinning.
    faults.changed().await.map_err(|_| Stop::Broken)
}

/// Completes on the next `reset_all`; never if the proxy is gone (its tasks are being aborted).
async fn reset_requested(resets: &mut watch::Receiver<u64>) {
    if resets.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Close `stream` with an RST instead of a FIN.
fn reset(stream: TcpStream) {
    // A zero linger makes close(2) discard unsent data and send an RST, which is exactly the
    // fault we want. Tokio deprecates `set_linger` because a *non-zero* linger blocks the
    // thread in close; a zero one never blocks. (`set_zero_linger` would say the same without
    // the allow, but needs tokio 1.50 and the workspace only requires 1.44.) If it fails the
    // peer sees a plain close instead.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}
