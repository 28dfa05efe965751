//! Every deadline of the core in one heap: allocation lifetimes with their
//! permissions and channels, RFC 6062 peer connections, and the idle and
//! slow-message rules of TCP/TLS client connections. Drivers sleep until
//! [`Server::poll_timeout`] and call [`Server::handle_timeout`].
//!
//! Entries are validated when they come due instead of being removed when
//! their object changes: each object records the one instant it is
//! scheduled for, and a due entry that does not match it is stale. An
//! entry is pushed only when an object's next deadline moves earlier than
//! the one scheduled, so the heap holds about one entry per object however
//! often clients refresh.

use super::*;

/// What a deadline belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timer {
    /// An allocation (by slab index): its expiry, or a permission or
    /// channel of it expiring first.
    Allocation(usize),
    /// An RFC 6062 peer connection waiting for its Connect or ConnectionBind.
    Connection(u32),
    /// A TCP or TLS client connection's idle or slow-message deadline.
    Stream(ClientKey),
}

/// How long a TCP or TLS client connection may take, and what it is doing.
#[derive(Debug, Clone, Copy)]
pub(super) struct StreamClock {
    /// When it last completed a message (or opened).
    last_message: Instant,
    /// Since when bytes of an unfinished message wait in the driver's buffer.
    partial_since: Option<Instant>,
    /// The instant its heap entry is for, if it has one.
    scheduled: Option<Instant>,
}

/// Why the core closes a client's TCP or TLS connection; a metric label each
/// (`turnstile_connections_closed_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Its allocation expired or was ended by the operator.
    AllocationEnded,
    /// No allocation and no complete message within `idle_timeout`.
    Idle,
    /// A message started and not finished within `idle_timeout` (slowloris).
    SlowMessage,
}

impl CloseReason {
    pub const fn label(self) -> &'static str {
        match self {
            CloseReason::AllocationEnded => "allocation_ended",
            CloseReason::Idle => "idle",
            CloseReason::SlowMessage => "slow_message",
        }
    }
}

impl Server {
    /// When [`Server::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let heap = self.timers.peek().map(|Reverse((t, _))| *t);
        [heap, self.ports[0].next_deadline(), self.ports[1].next_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Entries in the deadline heap (about one per allocation, peer
    /// connection and client connection, however often they refresh).
    pub fn pending_timers(&self) -> usize {
        self.timers.len()
    }

    /// Acts on every deadline that has come: ends expired allocations,
    /// reports expired permissions and channels, answers late Connects,
    /// drops unbound peer connections, closes idle client connections and
    /// frees held relay ports.
    pub fn handle_timeout(&mut self, clock: Now) {
        let now = clock.instant;
        while let Some(&Reverse((t, timer))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            match timer {
                Timer::Allocation(id) => self.allocation_due(id, t, now),
                Timer::Connection(id) => self.connection_due(id, t, clock),
                Timer::Stream(key) => self.stream_due(key, t, now),
            }
        }
        for p in &mut self.ports {
            p.expire(now);
        }
    }

    /// Makes sure allocation `id` is woken by `at` (its expiry, or a
    /// permission or channel expiring sooner).
    pub(super) fn schedule_allocation(&mut self, id: usize, at: Instant) {
        let Some(a) = self.allocations.get_mut(id) else {
            return;
        };
        if a.scheduled.is_none_or(|s| at < s) {
            a.scheduled = Some(at);
            self.timers.push(Reverse((at, Timer::Allocation(id))));
        }
    }

    fn allocation_due(&mut self, id: usize, t: Instant, now: Instant) {
        let Some(a) = self.allocations.get_mut(id) else {
            return;
        };
        if a.scheduled != Some(t) {
            return; // stale: rescheduled, or the slab slot was reused
        }
        a.scheduled = None;
        if a.expires <= now {
            self.stats.allocations_expired += 1;
            self.remove_allocation(id, EndReason::Expired);
            return;
        }
        let key = a.key;
        let mut next = a.expires;
        let mut expired_permissions = Vec::new();
        a.permissions.retain(|p| {
            if p.expires <= now {
                expired_permissions.push(p.ip);
                return false;
            }
            next = next.min(p.expires);
            true
        });
        let mut expired_channels = Vec::new();
        // An expired channel stays for its quarantine (RFC 8656 §12); it is
        // reported once, when its binding runs out.
        let last = a.swept;
        a.channels.retain(|c| c.expires + allocation::CHANNEL_QUARANTINE > now);
        for c in &a.channels {
            if c.expires > now {
                next = next.min(c.expires);
            } else if last.is_none_or(|l| c.expires > l) {
                expired_channels.push(*c);
            }
        }
        a.swept = Some(now);
        let relays = a.relays;
        for peer in expired_permissions {
            self.outputs.push_back(Output::PermissionExpired { key, peer });
        }
        for c in expired_channels {
            let relay = relays
                .get(usize::from(c.peer.is_ipv6()))
                .copied()
                .flatten()
                .map(|r| r.id);
            if let Some(relay) = relay {
                self.outputs.push_back(Output::ChannelExpired {
                    key,
                    relay,
                    channel: c.number,
                    peer: c.peer,
                });
            }
        }
        self.schedule_allocation(id, next);
    }

    /// Sets the deadline of an RFC 6062 peer connection.
    pub(super) fn schedule_connection(&mut self, connection: u32, at: Instant) {
        self.timers.push(Reverse((at, Timer::Connection(connection))));
    }

    /// A peer connection's deadline: a Connect still pending is answered
    /// 447 and its connection dropped if it comes later; one never bound by
    /// ConnectionBind is closed.
    fn connection_due(&mut self, id: u32, t: Instant, clock: Now) {
        let connecting = match self.tcp_connections.get(&id).map(|c| &c.state) {
            Some(TcpConnectionState::Connecting { deadline, .. }) if *deadline == t => true,
            Some(TcpConnectionState::AwaitingBind { deadline }) if *deadline == t => false,
            _ => return,
        };
        if connecting {
            let mut out = [0u8; 512];
            if let Some((key, len)) = self.handle_tcp_connected(clock, id, false, &mut out) {
                self.transmit(key, out.get(..len).unwrap_or_default());
            }
        } else {
            self.forget_connection(id);
        }
        self.outputs.push_back(Output::CloseConnection(id));
    }

    /// A TCP or TLS client connection opened: without an allocation it must
    /// complete a message every `idle_timeout`.
    pub(super) fn stream_opened(&mut self, key: ClientKey, now: Instant) {
        self.streams.insert(
            key,
            StreamClock {
                last_message: now,
                partial_since: None,
                scheduled: None,
            },
        );
        self.schedule_stream(key);
    }

    /// What a read did on a client connection: whether it completed a
    /// message, and whether an unfinished one waits in the buffer.
    pub(super) fn stream_progress(&mut self, key: ClientKey, completed: bool, partial: bool, now: Instant) {
        let Some(s) = self.streams.get_mut(&key) else {
            return;
        };
        if completed {
            s.last_message = now;
            s.partial_since = None;
        }
        s.partial_since = match (partial, s.partial_since) {
            (false, _) => None,
            (true, since) => Some(since.unwrap_or(now)),
        };
        self.schedule_stream(key);
    }

    /// The connection's current deadline and what missing it means:
    /// without an allocation, a complete message every `idle_timeout`; with
    /// one, only a started message has to finish within it.
    fn stream_deadline(&self, key: &ClientKey) -> Option<(Instant, CloseReason)> {
        let s = self.streams.get(key)?;
        let idle = self.config.idle_timeout;
        if self.by_client.contains_key(key) {
            s.partial_since.map(|since| (since + idle, CloseReason::SlowMessage))
        } else {
            Some((s.last_message + idle, CloseReason::Idle))
        }
    }

    /// Makes sure the connection is woken by its deadline.
    pub(super) fn schedule_stream(&mut self, key: ClientKey) {
        let Some((at, _)) = self.stream_deadline(&key) else {
            return;
        };
        if let Some(s) = self.streams.get_mut(&key)
            && s.scheduled.is_none_or(|t| at < t)
        {
            s.scheduled = Some(at);
            self.timers.push(Reverse((at, Timer::Stream(key))));
        }
    }

    fn stream_due(&mut self, key: ClientKey, t: Instant, now: Instant) {
        match self.streams.get_mut(&key) {
            Some(s) if s.scheduled == Some(t) => s.scheduled = None,
            _ => return,
        }
        match self.stream_deadline(&key) {
            Some((at, reason)) if at <= now => {
                // The driver closes it and reports Input::ClientClosed.
                self.streams.remove(&key);
                self.outputs.push_back(Output::CloseClient { key, reason });
            }
            _ => self.schedule_stream(key),
        }
    }
}
