//! Request heads on an agent connection, read and checked before hyper parses them.
//!
//! hyper answers a head it cannot parse (400, 414, 431) with a bare status line and gives
//! the service no say, so such requests had no JSON body and no audit line; its
//! `max_buf_size` let a head larger than `limits.max_header_bytes` through when it
//! arrived in one read; and its header-read timer restarts as soon as a keep-alive
//! connection goes idle, so an idle connection was closed after `request_header`,
//! racing the agent's next request. The guard fixes all three, between the TLS stream
//! and hyper:
//!
//! - It parses each head with httparse, as hyper does, and applies the checks hyper
//!   applies after it, so it refuses what hyper would refuse, and no more; plus the
//!   exact size cap (request line, headers and the blank line together).
//! - A refused head never reaches hyper. In its place hyper gets a small synthetic
//!   request, which it serves in order after the responses before it; the service
//!   knows it by its number ([`HeadControl::begin`]) and answers with the refusal and
//!   an audit line, and the connection closes.
//! - `timeouts.request_header` runs from a head's first byte (for the first request,
//!   from the handshake) to its end, and only while no response is in flight; between
//!   requests the connection may idle for `timeouts.idle`.
//!
//! To find where the next head starts, the guard follows each request body's framing
//! (Content-Length, or chunked, step for step as hyper's decoder). It never changes a
//! byte of a head it accepts or of a body. What it cannot follow (a CONNECT that became
//! a tunnel, a body it lost track of) is passed through as is, with hyper's own checks
//! (`max_header_size`) still in force.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// hyper's default cap on header fields; one more is 431, as hyper answers.
const MAX_HEADERS: usize = 100;
/// hyper's cap on the request target; longer is 414.
const MAX_URI_LEN: usize = (u16::MAX - 1) as usize;
/// hyper's largest Content-Length.
const MAX_CONTENT_LENGTH: u64 = u64::MAX - 2;
/// Bytes read from the connection at a time (hyper's own first read size).
const READ_CHUNK: usize = 8 * 1024;
/// After a refusal, how long and how much of what the agent still sends is read and
/// dropped before the close, so the close does not reset the connection (and lose the
/// refusal) while the agent is still writing an oversized head.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// Stands in for a refused head. Its content does not matter: the service recognizes it
/// by number. `Connection: close` makes hyper close after the refusal.
const SYNTHETIC_HEAD: &[u8] =
    b"GET / HTTP/1.1\r\nhost: refused.invalid\r\nconnection: close\r\n\r\n";

#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    /// `limits.max_header_bytes`.
    pub max_head_bytes: usize,
    /// `timeouts.request_header`.
    pub header_timeout: Duration,
    /// `timeouts.idle`: a keep-alive connection between requests.
    pub idle_timeout: Duration,
}

/// Why a head was refused; each maps to its own status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadProblem {
    /// 400.
    Malformed,
    /// 431: larger than the cap, or too many fields.
    TooLarge,
    /// 414.
    UriTooLong,
    /// 408: not complete within `timeouts.request_header`.
    TimedOut,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedHead {
    pub problem: HeadProblem,
    pub reason: String,
    /// The method and request target, when the request line could be read.
    pub method: Option<String>,
    pub target: Option<String>,
}

/// Wraps an agent connection. The reader goes to hyper; the control to its service.
pub fn guard<T>(inner: T, limits: HeadLimits) -> (GuardedIo<T>, HeadControl) {
    let shared = Arc::new(Shared::default());
    let io = GuardedIo {
        inner,
        shared: shared.clone(),
        limits,
        started: Instant::now(),
        buf: BytesMut::new(),
        cleared: 0,
        scanned: 0,
        head_started: None,
        first: true,
        mode: Mode::Head,
        timer: None,
        linger: None,
        write_shut: false,
    };
    (io, HeadControl(shared))
}

// === shared state between the reader and the service ===

#[derive(Default)]
struct Shared(Mutex<State>);

#[derive(Default)]
struct State {
    /// Heads given to hyper, synthetic ones included. hyper calls the service once per
    /// head, in order, so the n-th call is for the n-th head.
    released: u64,
    /// Service calls so far.
    calls: u64,
    /// Requests given to hyper whose response has not finished.
    outstanding: u64,
    /// When `outstanding` last fell to zero.
    quiet_since: Option<Instant>,
    /// The synthetic head's number and the refusal it stands for.
    rejected: Option<(u64, RejectedHead)>,
    /// Whether the request with this number became a tunnel.
    upgraded: Option<(u64, bool)>,
    /// The reader, waiting for one of the above to change.
    waker: Option<Waker>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere: plain counters.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn wake(state: &mut State) {
    if let Some(w) = state.waker.take() {
        w.wake();
    }
}

/// The service's side of the guard.
#[derive(Clone)]
pub struct HeadControl(Arc<Shared>);

impl HeadControl {
    /// Called once for every request hyper hands the service, in order.
    pub fn begin(&self) -> RequestTicket {
        let mut s = self.0.lock();
        s.calls += 1;
        let seq = s.calls;
        let rejected = match s.rejected.take() {
            Some((n, r)) if n == seq => Some(r),
            other => {
                s.rejected = other;
                None
            }
        };
        let done = rejected.is_none().then(|| InFlight(self.0.clone()));
        RequestTicket {
            seq,
            rejected,
            shared: self.0.clone(),
            done,
        }
    }
}

/// One request as the service sees it.
pub struct RequestTicket {
    seq: u64,
    rejected: Option<RejectedHead>,
    shared: Arc<Shared>,
    /// Keeps the request in flight (no header or idle timer) until its response ends.
    done: Option<InFlight>,
}

impl RequestTicket {
    /// The refusal this request stands for, when it is the stand-in for a refused head.
    pub fn take_rejection(&mut self) -> Option<RejectedHead> {
        self.rejected.take()
    }

    /// Records whether the response turns the connection into a tunnel (a 2xx to
    /// CONNECT, a 101), and keeps the request in flight until `body` ends or is dropped.
    pub fn finish<B>(mut self, upgraded: bool, body: B) -> InFlightBody<B> {
        let mut s = self.shared.lock();
        s.upgraded = Some((self.seq, upgraded));
        wake(&mut s);
        drop(s);
        InFlightBody {
            inner: body,
            _done: self.done.take(),
        }
    }
}

/// Ends a request's time in flight when dropped.
struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.outstanding = s.outstanding.saturating_sub(1);
        if s.outstanding == 0 {
            s.quiet_since = Some(Instant::now());
            wake(&mut s);
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request in flight until it ends.
    pub struct InFlightBody<B> {
        #[pin]
        inner: B,
        _done: Option<InFlight>,
    }
}

impl<B: Body> Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            this._done.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// === the reader ===

/// The connection as hyper reads it. Writes pass straight through.
pub struct GuardedIo<T> {
    inner: T,
    shared: Arc<Shared>,
    limits: HeadLimits,
    started: Instant,
    /// Read from the connection, not yet given to hyper.
    buf: BytesMut,
    /// Leading bytes of `buf` cleared for hyper.
    cleared: usize,
    /// Bytes of a partial head already searched for its end.
    scanned: usize,
    /// When the current head's first byte arrived.
    head_started: Option<Instant>,
    /// No head given to hyper yet.
    first: bool,
    mode: Mode,
    timer: Option<Pin<Box<Sleep>>>,
    /// Set once a refusal was sent: drain before closing.
    linger: Option<Linger>,
    write_shut: bool,
}

enum Mode {
    /// Reading the next head.
    Head,
    /// Passing a request body through, then the next mode.
    Body { framing: Framing, then: After },
    /// A CONNECT or upgrade request: nothing more until its response says whether the
    /// connection became a tunnel.
    AwaitUpgrade { seq: u64 },
    /// A head was refused; waits for the responses before it.
    Refuse(RejectedHead),
    /// Giving hyper the stand-in head (bytes of it given so far).
    Synthetic(usize),
    /// After the stand-in: nothing more, and no end either, which hyper would take for
    /// an agent gone mid-request; it closes after the refusal (`Connection: close`).
    Hold,
    /// Bytes pass as they come.
    Transparent,
    /// End of stream for hyper.
    Closed,
}

#[derive(Clone, Copy)]
enum After {
    Head,
    AwaitUpgrade(u64),
}

struct Linger {
    left: usize,
    sleep: Pin<Box<Sleep>>,
}

impl<T: AsyncRead + Unpin> GuardedIo<T> {
    /// Reads more of the connection into `buf`; `Ok(0)` at its end.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        // Into the buffer's spare capacity: zeroing 8 KiB before every read was a
        // measurable share of a small request's CPU.
        self.buf.reserve(READ_CHUNK);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.inner), cx, &mut self.buf)
    }

    /// Gives hyper the leading `n` bytes of `buf`.
    fn clear(&mut self, n: usize) {
        self.cleared = n;
    }

    /// The `Head` step: `None` to go round again, `Some` to return.
    fn read_head(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<()>>> {
        if !self.buf.is_empty() && self.head_started.is_none() {
            self.head_started = Some(Instant::now());
        }
        if !self.buf.is_empty() && (self.scanned == 0 || has_head_end(&self.buf, self.scanned)) {
            match parse_head(&self.buf, self.limits.max_head_bytes) {
                Parsed::Complete(head) => {
                    self.release(head);
                    return None;
                }
                Parsed::Rejected(r) => {
                    self.mode = Mode::Refuse(r);
                    return None;
                }
                Parsed::Partial => {}
            }
        }
        if self.buf.len() >= self.limits.max_head_bytes {
            self.mode = Mode::Refuse(too_large(&self.buf, self.limits.max_head_bytes));
            return None;
        }
        self.scanned = self.buf.len().max(1);
        match self.fill(cx) {
            Poll::Ready(Ok(0)) => {
                // The agent hung up, perhaps mid-head: nobody to answer.
                self.buf.clear();
                self.mode = Mode::Closed;
                return Some(Poll::Ready(Ok(())));
            }
            Poll::Ready(Ok(_)) => return None,
            Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(e))),
            Poll::Pending => {}
        }
        // Nothing to read now: is a timer running?
        let deadline = {
            let mut s = self.shared.lock();
            if s.outstanding > 0 {
                // A response is in flight: the agent is waiting, not idling.
                s.waker = Some(cx.waker().clone());
                self.timer = None;
                return Some(Poll::Pending);
            }
            let quiet = s.quiet_since.unwrap_or(self.started);
            if self.first {
                self.started + self.limits.header_timeout
            } else if self.buf.is_empty() {
                quiet + self.limits.idle_timeout
            } else {
                self.head_started.unwrap_or(quiet).max(quiet) + self.limits.header_timeout
            }
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        if timer.as_mut().poll(cx).is_pending() {
            return Some(Poll::Pending);
        }
        self.timer = None;
        if self.buf.is_empty() {
            // Idle (or never used) past its time: close, as any keep-alive server does.
            self.mode = Mode::Closed;
            return Some(Poll::Ready(Ok(())));
        }
        let timeout = self.limits.header_timeout;
        let (method, target) = request_line(&self.buf);
        self.mode = Mode::Refuse(RejectedHead {
            problem: HeadProblem::TimedOut,
            reason: format!(
                "the request head did not arrive within timeouts.request_header ({timeout:?})"
            ),
            method,
            target,
        });
        None
    }

    fn release(&mut self, head: Head) {
        let seq = {
            let mut s = self.shared.lock();
            s.released += 1;
            s.outstanding += 1;
            s.released
        };
        self.clear(head.len);
        self.head_started = None;
        self.scanned = 0;
        self.first = false;
        self.timer = None;
        let then = if head.upgrade {
            After::AwaitUpgrade(seq)
        } else {
            After::Head
        };
        self.mode = match (head.framing, then) {
            (Framing::Length(0), After::Head) => Mode::Head,
            (Framing::Length(0), After::AwaitUpgrade(seq)) => Mode::AwaitUpgrade { seq },
            // A tunnel request with a body: hyper's concern alone from here.
            (_, After::AwaitUpgrade(_)) => Mode::Transparent,
            (framing, then) => Mode::Body { framing, then },
        };
    }

    /// The `Body` step: passes body bytes until the framing says the body ended.
    fn read_body(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<()>>> {
        if self.buf.is_empty() {
            return match self.fill(cx) {
                // The agent hung up mid-body: hyper sees the end and errors.
                Poll::Ready(Ok(0)) => {
                    self.mode = Mode::Closed;
                    Some(Poll::Ready(Ok(())))
                }
                Poll::Ready(Ok(_)) => None,
                Poll::Ready(Err(e)) => Some(Poll::Ready(Err(e))),
                Poll::Pending => Some(Poll::Pending),
            };
        }
        let Mode::Body { framing, then } = &mut self.mode else {
            return None;
        };
        let then = *then;
        match framing.advance(&self.buf) {
            Ok(Some(end)) => {
                self.cleared = end;
                self.mode = match then {
                    After::Head => Mode::Head,
                    After::AwaitUpgrade(seq) => Mode::AwaitUpgrade { seq },
                };
            }
            Ok(None) => self.cleared = self.buf.len(),
            // Lost track (hyper refuses this body itself): pass everything.
            Err(()) => self.mode = Mode::Transparent,
        }
        None
    }

    fn step(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Option<Poll<io::Result<()>>> {
        match &mut self.mode {
            Mode::Closed => Some(Poll::Ready(Ok(()))),
            Mode::Hold => Some(Poll::Pending),
            Mode::Transparent => {
                if self.buf.is_empty() {
                    Some(Pin::new(&mut self.inner).poll_read(cx, out))
                } else {
                    self.clear(self.buf.len());
                    None
                }
            }
            Mode::Synthetic(given) => {
                let rest = &SYNTHETIC_HEAD[*given..];
                let n = rest.len().min(out.remaining());
                out.put_slice(&rest[..n]);
                *given += n;
                if *given == SYNTHETIC_HEAD.len() {
                    self.mode = Mode::Hold;
                }
                Some(Poll::Ready(Ok(())))
            }
            Mode::Body { .. } => self.read_body(cx),
            Mode::AwaitUpgrade { seq } => {
                let seq = *seq;
                let mut s = self.shared.lock();
                match s.upgraded {
                    Some((n, upgraded)) if n == seq => {
                        s.upgraded = None;
                        drop(s);
                        self.mode = if upgraded {
                            Mode::Transparent
                        } else {
                            Mode::Head
                        };
                        None
                    }
                    _ => {
                        s.waker = Some(cx.waker().clone());
                        Some(Poll::Pending)
                    }
                }
            }
            Mode::Refuse(rejected) => {
                let mut s = self.shared.lock();
                if s.outstanding > 0 {
                    // Answer in order: after the responses already in flight.
                    s.waker = Some(cx.waker().clone());
                    return Some(Poll::Pending);
                }
                s.released += 1;
                let seq = s.released;
                s.rejected = Some((seq, rejected.clone()));
                drop(s);
                self.buf.clear();
                self.linger = Some(Linger {
                    left: LINGER_BYTES,
                    sleep: Box::pin(tokio::time::sleep(LINGER)),
                });
                self.mode = Mode::Synthetic(0);
                None
            }
            Mode::Head => self.read_head(cx),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.cleared > 0 {
                let n = this.cleared.min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.buf.advance(n);
                this.cleared -= n;
                if this.buf.is_empty() && this.buf.capacity() > 4 * READ_CHUNK {
                    // A large head is gone: do not keep its buffer for the connection's life.
                    this.buf = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(done) = this.step(cx, out) {
                return done;
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_shut {
            std::task::ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.write_shut = true;
        }
        // After a refusal: read what the agent is still sending, so closing with unread
        // data does not reset the connection before the agent has read the refusal.
        while let Some(linger) = &mut this.linger {
            if linger.left == 0 || linger.sleep.as_mut().poll(cx).is_ready() {
                this.linger = None;
                break;
            }
            let mut scratch = [0u8; 4096];
            let mut rb = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                    let n = rb.filled().len();
                    if let Some(l) = &mut this.linger {
                        l.left = l.left.saturating_sub(n);
                    }
                }
                Poll::Ready(_) => this.linger = None,
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

// === heads ===

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Bytes left.
    Length(u64),
    Chunked(Chunked),
}

impl Framing {
    /// Follows `bytes` (what comes next on the wire). `Ok(Some(n))`: the body ends after
    /// `n` of them; `Ok(None)`: it goes on past them; `Err`: not a body hyper accepts.
    fn advance(&mut self, bytes: &[u8]) -> Result<Option<usize>, ()> {
        match self {
            Framing::Length(left) => {
                let n = bytes.len() as u64;
                if n >= *left {
                    let end = *left as usize;
                    *left = 0;
                    Ok(Some(end))
                } else {
                    *left -= n;
                    Ok(None)
                }
            }
            Framing::Chunked(c) => c.advance(bytes),
        }
    }
}

/// hyper's chunked decoder, state for state (`proto/h1/decode.rs`), without the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chunked {
    state: ChunkState,
    size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Body,
    BodyCr,
    BodyLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

impl Chunked {
    fn new() -> Self {
        Chunked {
            state: ChunkState::Start,
            size: 0,
        }
    }

    fn advance(&mut self, bytes: &[u8]) -> Result<Option<usize>, ()> {
        use ChunkState::*;
        let mut i = 0;
        while i < bytes.len() {
            if self.state == Body {
                let take = (bytes.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                i += take;
                self.size -= take as u64;
                if self.size == 0 {
                    self.state = BodyCr;
                }
                continue;
            }
            let b = bytes[i];
            i += 1;
            self.state = match (self.state, b) {
                (Start, _) => {
                    self.size = u64::from(hex(b).ok_or(())?);
                    Size
                }
                (Size, _) if hex(b).is_some() => {
                    let d = u64::from(hex(b).ok_or(())?);
                    self.size = self
                        .size
                        .checked_mul(16)
                        .ok_or(())?
                        .checked_add(d)
                        .ok_or(())?;
                    Size
                }
                (Size | SizeLws, b'\t' | b' ') => SizeLws,
                (Size | SizeLws, b';') => Extension,
                (Size | SizeLws | Extension, b'\r') => SizeLf,
                (Extension, b'\n') => return Err(()),
                (Extension, _) => Extension,
                (SizeLf, b'\n') if self.size == 0 => EndCr,
                (SizeLf, b'\n') => Body,
                (BodyCr, b'\r') => BodyLf,
                (BodyLf, b'\n') => Start,
                (EndCr, b'\r') => EndLf,
                (EndCr, _) | (Trailer, _) if b != b'\r' => Trailer,
                (Trailer, b'\r') => TrailerLf,
                (TrailerLf, b'\n') => EndCr,
                (EndLf, b'\n') => return Ok(Some(i)),
                _ => return Err(()),
            };
        }
        Ok(None)
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// A head accepted for hyper.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    len: usize,
    framing: Framing,
    /// CONNECT, or an HTTP/1.1 `Upgrade` request: the response may make it a tunnel.
    upgrade: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Complete(Head),
    Partial,
    Rejected(RejectedHead),
}

/// Whether a head may end in `buf` past what was already searched (hyper's
/// `is_complete_fast`): re-parsing a slowly arriving head on every byte would cost
/// quadratic time.
fn has_head_end(buf: &[u8], scanned: usize) -> bool {
    let from = &buf[scanned.saturating_sub(3)..];
    from.windows(2).any(|w| w == b"\n\n") || from.windows(3).any(|w| w == b"\n\r\n")
}

fn parse_head(buf: &[u8], max: usize) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let malformed = |req: &httparse::Request<'_, '_>, reason: &str| {
        Parsed::Rejected(RejectedHead {
            problem: HeadProblem::Malformed,
            reason: reason.to_string(),
            method: req.method.map(str::to_string),
            target: req.path.map(str::to_string),
        })
    };
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(e) => {
            return match e {
                httparse::Error::TooManyHeaders => {
                    let (method, target) = request_line(buf);
                    Parsed::Rejected(RejectedHead {
                        problem: HeadProblem::TooLarge,
                        reason: format!("the request has more than {MAX_HEADERS} header fields"),
                        method,
                        target,
                    })
                }
                httparse::Error::Token if req.method.is_none() => {
                    malformed(&req, "malformed request line: invalid method")
                }
                httparse::Error::Token if req.path.is_none() => {
                    malformed(&req, "malformed request line: invalid request target")
                }
                httparse::Error::Version => {
                    malformed(&req, "malformed request line: not HTTP/1.0 or HTTP/1.1")
                }
                httparse::Error::HeaderName => malformed(&req, "invalid header field name"),
                httparse::Error::HeaderValue => {
                    malformed(&req, "invalid byte in a header field value")
                }
                httparse::Error::NewLine => malformed(&req, "malformed line ending"),
                _ => malformed(&req, "malformed request head"),
            };
        }
    };
    if len > max {
        return Parsed::Rejected(too_large(buf, max));
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return malformed(&req, "malformed request line");
    };
    if http::Method::from_bytes(method.as_bytes()).is_err() {
        return malformed(&req, "malformed request line: invalid method");
    }
    if target.len() > MAX_URI_LEN {
        return Parsed::Rejected(RejectedHead {
            problem: HeadProblem::UriTooLong,
            reason: format!("the request target is longer than {MAX_URI_LEN} bytes"),
            method: Some(method.to_string()),
            target: None,
        });
    }
    if let Err(e) = http::Uri::try_from(target) {
        return malformed(&req, &format!("invalid request target: {e}"));
    }
    let http11 = version == 1;
    let mut wants_upgrade = method == "CONNECT";
    let (mut is_te, mut is_te_chunked, mut is_cl) = (false, false, false);
    let mut content_length: Option<u64> = None;
    for field in req.headers.iter() {
        if field.name.len() >= 1 << 16 {
            return Parsed::Rejected(RejectedHead {
                problem: HeadProblem::TooLarge,
                reason: "a header field name is longer than 64 KiB".into(),
                method: Some(method.to_string()),
                target: Some(target.to_string()),
            });
        }
        if http::HeaderName::from_bytes(field.name.as_bytes()).is_err() {
            return malformed(&req, "invalid header field name");
        }
        if field.name.eq_ignore_ascii_case("transfer-encoding") {
            if !http11 {
                return malformed(&req, "Transfer-Encoding in an HTTP/1.0 request");
            }
            is_te = true;
            if is_cl {
                content_length = None;
            }
            is_te_chunked = visible_ascii(field.value).is_some_and(|v| {
                v.rsplit(',')
                    .next()
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
            });
        } else if field.name.eq_ignore_ascii_case("content-length") {
            is_cl = true;
            if is_te {
                continue;
            }
            let Some(n) = digits(field.value) else {
                return malformed(&req, "invalid Content-Length");
            };
            match content_length {
                Some(prev) if prev != n => {
                    return malformed(&req, "conflicting Content-Length headers")
                }
                Some(_) => {}
                None if n > MAX_CONTENT_LENGTH => {
                    return Parsed::Rejected(RejectedHead {
                        problem: HeadProblem::TooLarge,
                        reason: "Content-Length too large".into(),
                        method: Some(method.to_string()),
                        target: Some(target.to_string()),
                    })
                }
                None => content_length = Some(n),
            }
        } else if field.name.eq_ignore_ascii_case("upgrade") {
            wants_upgrade = http11;
        }
    }
    if is_te && !is_te_chunked {
        return malformed(&req, "Transfer-Encoding must end with chunked");
    }
    let framing = if is_te {
        Framing::Chunked(Chunked::new())
    } else {
        Framing::Length(content_length.unwrap_or(0))
    };
    Parsed::Complete(Head {
        len,
        framing,
        upgrade: wants_upgrade,
    })
}

fn too_large(buf: &[u8], max: usize) -> RejectedHead {
    let (method, target) = request_line(buf);
    RejectedHead {
        problem: HeadProblem::TooLarge,
        reason: format!(
            "the request head (request line and header fields) is larger than \
             limits.max_header_bytes ({max} bytes)"
        ),
        method,
        target,
    }
}

/// The method and target of a request line, if it is there and readable, for the audit
/// line of a refused head.
fn request_line(buf: &[u8]) -> (Option<String>, Option<String>) {
    let start = buf
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(buf.len());
    let line = &buf[start..];
    let line = &line[..line.iter().position(|b| *b == b'\n').unwrap_or(line.len())];
    let Some(text) = visible_ascii(line.strip_suffix(b"\r").unwrap_or(line)) else {
        return (None, None);
    };
    let mut parts = text.split(' ');
    let method = parts
        .next()
        .filter(|m| !m.is_empty() && http::Method::from_bytes(m.as_bytes()).is_ok());
    let target = method.and(parts.next()).filter(|t| !t.is_empty());
    // Bounded: the target of an oversized head may be most of it.
    let target = target.map(|t| t.chars().take(2048).collect());
    (method.map(str::to_string), target)
}

/// `bytes` as text when they are what `HeaderValue::to_str` accepts.
fn visible_ascii(bytes: &[u8]) -> Option<&str> {
    if bytes
        .iter()
        .all(|b| *b == b'\t' || (0x20..0x7f).contains(b))
    {
        std::str::from_utf8(bytes).ok()
    } else {
        None
    }
}

/// A decimal without sign or spaces, as hyper reads Content-Length.
fn digits(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return None;
    }
    bytes.iter().try_fold(0u64, |n, b| match b {
        b'0'..=b'9' => n.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> Head {
        match parse_head(buf, 65536) {
            Parsed::Complete(h) => h,
            other => panic!("{other:?}"),
        }
    }

    fn rejected(buf: &[u8], max: usize) -> RejectedHead {
        match parse_head(buf, max) {
            Parsed::Rejected(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn heads_and_their_framing() {
        let h = complete(b"GET http://a:80/ HTTP/1.1\r\nHost: a\r\n\r\nnext");
        assert_eq!(
            (h.len, h.framing, h.upgrade),
            (38, Framing::Length(0), false)
        );
        let h = complete(b"POST http://a/ HTTP/1.1\r\ncontent-length: 5\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(5));
        let h = complete(
            b"POST http://a/ HTTP/1.1\r\ncontent-length: 5\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
        );
        assert_eq!(h.framing, Framing::Chunked(Chunked::new()));
        assert!(complete(b"CONNECT a:443 HTTP/1.1\r\n\r\n").upgrade);
        assert!(complete(b"GET http://a/ HTTP/1.1\r\nupgrade: websocket\r\n\r\n").upgrade);
        assert!(!complete(b"GET http://a/ HTTP/1.0\r\nupgrade: websocket\r\n\r\n").upgrade);
        assert_eq!(
            parse_head(b"GET http://a/ HTTP/1.1\r\nHost:", 65536),
            Parsed::Partial
        );
    }

    #[test]
    fn what_hyper_refuses_is_refused_with_its_status() {
        for (head, problem) in [
            (&b"G\x01T / HTTP/1.1\r\n\r\n"[..], HeadProblem::Malformed),
            (b"GET /\x7f HTTP/1.1\r\n\r\n", HeadProblem::Malformed),
            (b"GET / HTTP/2.0\r\n\r\n", HeadProblem::Malformed),
            (
                b"GET / HTTP/1.1\r\nbad name: x\r\n\r\n",
                HeadProblem::Malformed,
            ),
            (
                b"GET / HTTP/1.1\r\nx: a\x00b\r\n\r\n",
                HeadProblem::Malformed,
            ),
            (
                b"POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
                HeadProblem::Malformed,
            ),
            (
                b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                HeadProblem::Malformed,
            ),
            (
                b"POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n",
                HeadProblem::Malformed,
            ),
            (
                b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n",
                HeadProblem::Malformed,
            ),
            (b"GET http://[::1/ HTTP/1.1\r\n\r\n", HeadProblem::Malformed),
        ] {
            assert_eq!(
                rejected(head, 65536).problem,
                problem,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x{i}: y\r\n")).collect();
        let head = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(
            rejected(head.as_bytes(), 65536).problem,
            HeadProblem::TooLarge
        );
    }

    #[test]
    fn the_size_cap_is_exact() {
        let base = b"GET http://a/ HTTP/1.1\r\nx: \r\n\r\n".len();
        let head = |total: usize| {
            format!(
                "GET http://a/ HTTP/1.1\r\nx: {}\r\n\r\n",
                "v".repeat(total - base)
            )
        };
        assert!(matches!(
            parse_head(head(8192).as_bytes(), 8192),
            Parsed::Complete(Head { len: 8192, .. })
        ));
        let r = rejected(head(8193).as_bytes(), 8192);
        assert_eq!(r.problem, HeadProblem::TooLarge);
        assert_eq!(r.method.as_deref(), Some("GET"));
        assert_eq!(r.target.as_deref(), Some("http://a/"));
    }

    #[test]
    fn chunked_bodies_end_where_hyper_ends_them() {
        let body = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nx-trailer: t\r\n\r\nGET";
        let mut c = Chunked::new();
        assert_eq!(c.advance(body), Ok(Some(body.len() - 3)));
        // Byte by byte, the same end.
        let mut c = Chunked::new();
        let end = body
            .iter()
            .position(|b| c.advance(&[*b]).unwrap().is_some());
        assert_eq!(end, Some(body.len() - 4));
        let mut c = Chunked::new();
        assert_eq!(c.advance(b"0\r\n\r\n"), Ok(Some(5)));
        for bad in [&b"x\r\n"[..], b"5\nhello", b"5\r\nhelloX", b"1;a\nb"] {
            assert_eq!(Chunked::new().advance(bad), Err(()), "{bad:?}");
        }
        let mut l = Framing::Length(4);
        assert_eq!(l.advance(b"ab"), Ok(None));
        assert_eq!(l.advance(b"cdGET"), Ok(Some(2)));
    }

    #[test]
    fn head_end_scan_matches_hypers() {
        assert!(has_head_end(b"GET / HTTP/1.1\r\n\r\n", 10));
        assert!(has_head_end(b"GET / HTTP/1.1\n\n", 0));
        assert!(!has_head_end(b"GET / HTTP/1.1\r\nx: y\r\n", 0));
    }

    #[test]
    fn request_line_for_the_audit() {
        assert_eq!(
            request_line(b"\r\nPOST http://a/b HTTP/1.1\r\n"),
            (Some("POST".into()), Some("http://a/b".into()))
        );
        assert_eq!(request_line(b"\x16\x03\x01"), (None, None));
    }
}
