//! The relay paths, hot: ChannelData and Send indications from clients,
//! datagrams from peers (framed in place for the client), the bandwidth
//! checks on both, and ICMP errors from relay sockets.

use super::*;

/// Bandwidth bucket index: client → peer.
pub(super) const TO_PEER: usize = 0;

/// Bandwidth bucket index: peer → client.
pub(super) const TO_CLIENT: usize = 1;

/// What the bandwidth checks need besides the allocation: whether any
/// limit is set (most servers have none, and skip the buckets), and this
/// worker's share of `bps_capacity`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shaping {
    pub on: bool,
    pub worker: Rate,
}

impl Shaping {
    pub(super) fn of(realms: &Realms, worker: Rate) -> Shaping {
        Shaping {
            on: realms.limits_bandwidth() || !worker.is_off(),
            worker,
        }
    }
}

/// Takes `bytes` from the allocation's and the worker's buckets for one
/// direction; false when either is spent (the packet is dropped, and counted).
#[inline]
pub(super) fn within_bandwidth(
    alloc: &mut Allocation,
    worker: &mut Option<[TokenBucket; 2]>,
    stats: &mut Stats,
    shaping: Shaping,
    direction: usize,
    bytes: usize,
    now: Instant,
) -> bool {
    if !shaping.on {
        return true;
    }
    let passed = take_bandwidth(alloc, worker, shaping.worker, direction, bytes, now);
    if !passed {
        stats.bandwidth_dropped_packets += 1;
        stats.bandwidth_dropped_bytes += bytes as u64;
    }
    passed
}

pub(super) fn take_bandwidth(
    alloc: &mut Allocation,
    worker: &mut Option<[TokenBucket; 2]>,
    total: Rate,
    direction: usize,
    bytes: usize,
    now: Instant,
) -> bool {
    let per_allocation = alloc.bandwidth;
    if !per_allocation.is_off() {
        let buckets = alloc
            .shaper
            .get_or_insert_with(|| Box::new([TokenBucket::full(per_allocation, now); 2]));
        if buckets
            .get_mut(direction)
            .is_some_and(|b| !b.take(per_allocation, bytes, now))
        {
            return false;
        }
    }
    if !total.is_off() {
        let buckets = worker.get_or_insert([TokenBucket::full(total, now); 2]);
        if buckets.get_mut(direction).is_some_and(|b| !b.take(total, bytes, now)) {
            return false;
        }
    }
    true
}

impl Server {
    /// The hot path from clients: ChannelData to a bound peer.
    #[inline]
    pub(super) fn handle_channel_data(&mut self, now: Instant, key: &ClientKey, packet: &[u8]) -> ClientOutcome {
        let cd = match ChannelData::parse_in(packet, self.config.channel_range) {
            Ok(cd) => cd,
            Err(e) => return ClientOutcome::Drop(DropReason::BadChannelData(e)),
        };
        let Some(alloc) = self
            .by_client
            .get(key)
            .copied()
            .and_then(|i| self.allocations.get_mut(i))
        else {
            return ClientOutcome::Drop(DropReason::NoAllocation);
        };
        let Some(channel) = alloc.channel(cd.channel, now) else {
            return ClientOutcome::Drop(DropReason::UnboundChannel);
        };
        let peer = channel.peer;
        if !alloc.permits(peer.ip(), now) {
            return ClientOutcome::Drop(DropReason::NoPermission);
        }
        let Some(relay) = alloc.relay_for(&peer).map(|r| r.id) else {
            return ClientOutcome::Drop(DropReason::FamilyMismatch);
        };
        let len = cd.data.len();
        if !within_bandwidth(
            alloc,
            &mut self.worker_bandwidth,
            &mut self.stats,
            self.shaping,
            TO_PEER,
            len,
            now,
        ) {
            return ClientOutcome::Drop(DropReason::BandwidthLimit);
        }
        alloc.traffic.to_peer_packets += 1;
        alloc.traffic.to_peer_bytes += len as u64;
        let stream = self.is_stream(key);
        self.stats.count_to_peer(len, stream);
        ClientOutcome::Forward {
            relay,
            peer: self.route(peer),
            start: channel_data::HEADER_LEN,
            end: channel_data::HEADER_LEN + len,
        }
    }

    /// A peer that is this server's own external address is reached at the
    /// bound address instead, so relaying between two allocations of this
    /// server never depends on NAT hairpinning.
    #[inline]
    pub(super) fn route(&self, peer: SocketAddr) -> SocketAddr {
        for r in [&self.config.relay_v4, &self.config.relay_v6].into_iter().flatten() {
            if r.external == Some(peer.ip()) {
                return SocketAddr::new(r.bind, peer.port());
            }
        }
        peer
    }

    /// Send indication (RFC 8656 §11): DATA to XOR-PEER-ADDRESS, given a permission.
    pub(super) fn send_indication(&mut self, now: Instant, key: &ClientKey, msg: &Message<'_>) -> ClientOutcome {
        let Some(alloc) = self.by_client.get(key).and_then(|&i| self.allocations.get(i)) else {
            return ClientOutcome::Drop(DropReason::NoAllocation);
        };
        if alloc.tcp {
            return ClientOutcome::Drop(DropReason::BadIndication);
        }
        let Some(Ok(peer)) = msg.xor_peer_addresses().next() else {
            return ClientOutcome::Drop(DropReason::BadIndication);
        };
        let Some(data) = msg.raw_attributes().find(|a| a.kind == kind::DATA) else {
            return ClientOutcome::Drop(DropReason::BadIndication);
        };
        let Some(relay) = alloc.relay_for(&peer) else {
            return ClientOutcome::Drop(DropReason::FamilyMismatch);
        };
        if !alloc.permits(peer.ip(), now) {
            return ClientOutcome::Drop(DropReason::NoPermission);
        }
        if let Err(r) = permissions::counted(&mut self.stats, &peer, self.realms.get(alloc.realm).policy.check(&peer)) {
            return ClientOutcome::Drop(DropReason::PeerRefused(r));
        }
        let start = data.offset + 4;
        let (relay_id, alloc_idx) = (relay.id, self.by_client.get(key).copied());
        if let Some(a) = alloc_idx.and_then(|i| self.allocations.get_mut(i)) {
            let len = data.value.len();
            if !within_bandwidth(
                a,
                &mut self.worker_bandwidth,
                &mut self.stats,
                self.shaping,
                TO_PEER,
                len,
                now,
            ) {
                return ClientOutcome::Drop(DropReason::BandwidthLimit);
            }
            a.traffic.to_peer_packets += 1;
            a.traffic.to_peer_bytes += len as u64;
        }
        let stream = self.is_stream(key);
        self.stats.count_to_peer(data.value.len(), stream);
        ClientOutcome::Forward {
            relay: relay_id,
            peer: self.route(peer),
            start,
            end: start + data.value.len(),
        }
    }

    /// Handles a datagram from `peer` on relay socket `relay`. The datagram
    /// is `buf[start..start + len]`; at least [`PEER_HEADROOM`] bytes before
    /// it and [`PEER_TAILROOM`] after it are the core's to write.
    pub fn handle_peer_packet(
        &mut self,
        now: Instant,
        relay: RelayId,
        peer: SocketAddr,
        buf: &mut [u8],
        start: usize,
        len: usize,
    ) -> PeerOutcome {
        // One lookup of the allocation's index serves the whole packet.
        let Some(alloc_idx) = self.relays.get(relay.0 as usize).copied().flatten() else {
            return PeerOutcome::Drop(DropReason::UnknownRelay);
        };
        let Some(alloc) = self.allocations.get(alloc_idx) else {
            return PeerOutcome::Drop(DropReason::UnknownRelay);
        };
        if !alloc.permits(peer.ip(), now) {
            return PeerOutcome::Drop(DropReason::NoPermission);
        }
        if self.shaping.on {
            let Some(a) = self.allocations.get_mut(alloc_idx) else {
                return PeerOutcome::Drop(DropReason::UnknownRelay);
            };
            if !within_bandwidth(
                a,
                &mut self.worker_bandwidth,
                &mut self.stats,
                self.shaping,
                TO_CLIENT,
                len,
                now,
            ) {
                return PeerOutcome::Drop(DropReason::BandwidthLimit);
            }
        }
        let Some(alloc) = self.allocations.get(alloc_idx) else {
            return PeerOutcome::Drop(DropReason::UnknownRelay);
        };
        let key = alloc.key;
        let stream = self.listeners.get(usize::from(key.listener.0)) == Some(&ListenerKind::Stream);
        let end = start + len;
        let outcome = if let Some(ch) = alloc.channel_for_peer(&peer, now) {
            let Ok(len16) = u16::try_from(len) else {
                return PeerOutcome::Drop(DropReason::OutputTooSmall);
            };
            let Some(head_at) = start.checked_sub(channel_data::HEADER_LEN) else {
                return PeerOutcome::Drop(DropReason::OutputTooSmall);
            };
            let Some(h) = buf.get_mut(head_at..start) else {
                return PeerOutcome::Drop(DropReason::OutputTooSmall);
            };
            h.copy_from_slice(&channel_data::header(ch.number, len16));
            let mut end = end;
            if stream {
                let padded = head_at + 4 + ((len + 3) & !3);
                let Some(pad) = buf.get_mut(end..padded) else {
                    return PeerOutcome::Drop(DropReason::OutputTooSmall);
                };
                pad.fill(0);
                end = padded;
            }
            PeerOutcome::ToClient {
                key,
                start: head_at,
                end,
            }
        } else {
            // Data indication, written in place around the data.
            let addr_len = if peer.is_ipv4() { 8 } else { 20 };
            let head = 20 + 4 + addr_len + 4;
            let Some(head_at) = start.checked_sub(head) else {
                return PeerOutcome::Drop(DropReason::OutputTooSmall);
            };
            let padded_end = start + ((len + 3) & !3);
            let Some(region) = buf.get_mut(head_at..padded_end) else {
                return PeerOutcome::Drop(DropReason::OutputTooSmall);
            };
            let tid = TransactionId(indication_tid(&mut self.stats));
            let written = (|| {
                let mut w = MessageWriter::new(region, Class::Indication, Method::DATA, tid).ok()?;
                w.xor_peer_address(&peer).ok()?;
                // The value is already in place: only the header and padding are written.
                w.attribute_with(kind::DATA, len, |_| Some(())).ok()?;
                Some(w.finish())
            })();
            match written {
                Some(n) => PeerOutcome::ToClient {
                    key,
                    start: head_at,
                    end: head_at + n,
                },
                None => PeerOutcome::Drop(DropReason::OutputTooSmall),
            }
        };
        if let Some(a) = self.allocations.get_mut(alloc_idx) {
            a.traffic.to_client_packets += 1;
            a.traffic.to_client_bytes += len as u64;
        }
        self.stats.peer_to_client_packets += 1;
        self.stats.peer_to_client_bytes += len as u64;
        if stream {
            self.stats.stream_peer_to_client_packets += 1;
            self.stats.stream_peer_to_client_bytes += len as u64;
        }
        outcome
    }

    /// An ICMP error the relay socket received for `peer` (IP_RECVERR): tell
    /// the client with a Data indication carrying ICMP (RFC 8656 §11.5),
    /// written into `out`, if the peer has a permission.
    pub(super) fn handle_relay_icmp(
        &mut self,
        now: Instant,
        relay: RelayId,
        peer: SocketAddr,
        (icmp_type, icmp_code, error_data): (u8, u8, u32),
        out: &mut [u8],
    ) -> Option<(ClientKey, usize)> {
        let alloc = self
            .relays
            .get(relay.0 as usize)
            .copied()
            .flatten()
            .and_then(|i| self.allocations.get(i))?;
        if !alloc.permits(peer.ip(), now) {
            return None;
        }
        let key = alloc.key;
        let tid = TransactionId(indication_tid(&mut self.stats));
        let mut w = MessageWriter::new(out, Class::Indication, Method::DATA, tid).ok()?;
        w.xor_peer_address(&peer).ok()?;
        w.icmp(icmp_type, icmp_code, error_data).ok()?;
        self.stats.icmp_relayed += 1;
        Some((key, w.finish()))
    }
}
