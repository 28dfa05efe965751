//! The bounded queue of bytes waiting to be written to one TCP or TLS
//! client, shared by the connection's tasks and the output executor.

use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;

use bytes::BytesMut;
use tokio::sync::Notify;

use crate::proto::server::CloseReason;

/// What waits to be written to one client, and whether the core ended it.
pub struct StreamOut {
    buf: RefCell<BytesMut>,
    cap: usize,
    notify: Notify,
    closed: Cell<bool>,
    /// Wakes the reader when the core closes the connection.
    ended: Notify,
    end_reason: Cell<Option<CloseReason>>,
    /// A plain TCP connection's socket, which a live upgrade can hand over
    /// (`None` for TLS, whose session state cannot move).
    handover_fd: Option<RawFd>,
    parking: Parking,
    /// The writer is in the middle of writing (a park would cut a message).
    writing: Cell<bool>,
}

/// Where a connection stands in a live upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Park {
    #[default]
    None,
    /// The worker asked the connection to stop reading and writing.
    Requested,
    /// Decided: handed over (`true`) or kept (`false`).
    Decided(bool),
}

/// A connection's part in a live upgrade: asked to park, then told whether
/// it was handed over. Its tasks wait on it between messages; an RFC 6062
/// pipe's two directions count themselves paused.
#[derive(Debug, Default)]
pub struct Parking {
    state: Cell<Park>,
    wake: Notify,
    paused: Cell<u8>,
}

impl Parking {
    pub fn request(&self) {
        self.state.set(Park::Requested);
        self.paused.set(0);
        self.wake.notify_waiters();
    }

    pub async fn requested(&self) {
        loop {
            if self.state.get() == Park::Requested {
                return;
            }
            self.wake.notified().await;
        }
    }

    pub fn is_requested(&self) -> bool {
        self.state.get() == Park::Requested
    }

    /// The verdict, for whoever waits on it (nothing if no park was asked).
    pub fn decide(&self, handed_over: bool) {
        if self.state.get() != Park::None {
            self.state.set(Park::Decided(handed_over));
            self.wake.notify_waiters();
        }
    }

    pub async fn verdict(&self) -> bool {
        loop {
            if let Park::Decided(v) = self.state.get() {
                return v;
            }
            self.wake.notified().await;
        }
    }

    /// One more of a pipe's directions holds still.
    pub fn pause(&self) {
        self.paused.set(self.paused.get().saturating_add(1));
    }

    pub fn paused(&self) -> u8 {
        self.paused.get()
    }
}

impl StreamOut {
    pub fn new(cap: usize) -> StreamOut {
        StreamOut {
            buf: RefCell::new(BytesMut::new()),
            cap,
            notify: Notify::new(),
            closed: Cell::new(false),
            ended: Notify::new(),
            end_reason: Cell::new(None),
            handover_fd: None,
            parking: Parking::default(),
            writing: Cell::new(false),
        }
    }

    /// A queue for a plain TCP connection on socket `fd`.
    pub fn with_handover(mut self, fd: Option<RawFd>) -> StreamOut {
        self.handover_fd = fd;
        self
    }

    pub fn handover_fd(&self) -> Option<RawFd> {
        self.handover_fd
    }

    /// A live upgrade asks the connection to park: its reader stops after
    /// the messages it holds, its writer before the next write.
    pub fn request_park(&self) {
        self.parking.request();
        self.notify.notify_one();
    }

    /// Waits until a park is asked for.
    pub async fn park_requested(&self) {
        self.parking.requested().await
    }

    pub fn is_parking(&self) -> bool {
        self.parking.is_requested()
    }

    /// The upgrade's verdict for a parked (or parking) connection.
    pub fn decide(&self, handed_over: bool) {
        self.parking.decide(handed_over)
    }

    /// Waits for the verdict; `true` when the connection was handed over.
    pub async fn verdict(&self) -> bool {
        self.parking.verdict().await
    }

    pub fn set_writing(&self, writing: bool) {
        self.writing.set(writing);
    }

    pub fn is_writing(&self) -> bool {
        self.writing.get()
    }

    /// A copy of what is queued (it goes to the new process with the
    /// connection; kept here in case the upgrade is abandoned).
    pub fn queued_copy(&self) -> Vec<u8> {
        self.buf.borrow().to_vec()
    }

    /// Queues a whole message, or refuses it when the queue is full or closed.
    pub fn push(&self, data: &[u8]) -> bool {
        if self.closed.get() {
            return false;
        }
        let Ok(mut b) = self.buf.try_borrow_mut() else {
            return false;
        };
        if b.len() + data.len() > self.cap {
            return false;
        }
        b.extend_from_slice(data);
        self.notify.notify_one();
        true
    }

    /// The core closes the connection: the reader stops (a stored permit if
    /// it is busy right now).
    pub fn end(&self, reason: CloseReason) {
        self.end_reason.set(Some(reason));
        self.ended.notify_one();
    }

    /// Waits until the core closes the connection; says why.
    pub async fn ended(&self) -> CloseReason {
        self.ended.notified().await;
        self.end_reason.get().unwrap_or(CloseReason::AllocationEnded)
    }

    /// No more bytes will be queued; the writer finishes what is queued.
    pub fn close(&self) {
        self.closed.set(true);
        self.notify.notify_one();
    }

    /// The writer could not write: nothing queued later can go out.
    pub fn fail(&self) {
        self.closed.set(true);
    }

    /// Takes what is queued; `None` when nothing is.
    pub fn take(&self) -> Option<BytesMut> {
        let mut b = self.buf.borrow_mut();
        if b.is_empty() { None } else { Some(b.split()) }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    /// Waits until bytes are queued or the queue is closed.
    pub async fn queued(&self) {
        self.notify.notified().await;
    }
}
