//! The bounded queue of bytes waiting to be written to one TCP or TLS
//! client, shared by the connection's tasks and the output executor.

use std::cell::{Cell, RefCell};

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
        }
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
