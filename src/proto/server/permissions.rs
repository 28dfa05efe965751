//! CreatePermission and ChannelBind: peers checked against family and
//! policy, per-allocation limits, lifecycle events.

use super::*;

/// The peer policy's verdict, logged and counted when it refuses: the one
/// place every path (CreatePermission, ChannelBind, Send, Connect) reports
/// a refused peer.
pub(super) fn counted(
    stats: &mut Stats,
    peer: &SocketAddr,
    verdict: Result<(), PeerRefusal>,
) -> Result<(), PeerRefusal> {
    if let Err(r) = verdict {
        tracing::debug!(peer = %peer, reason = r.label(), "peer refused");
        stats.count_peer_refusal(r);
    }
    verdict
}

impl Server {
    /// Peer addresses of a request, each checked against family and policy.
    pub(super) fn checked_peers(&mut self, id: usize, msg: &Message<'_>) -> Result<Vec<SocketAddr>, Refusal> {
        let alloc = self.allocations.get(id).ok_or(BAD_REQUEST)?;
        let mut peers = Vec::new();
        for p in msg.xor_peer_addresses() {
            let peer = p.map_err(|_| BAD_REQUEST)?;
            if alloc.relay_for(&peer).is_none() {
                return Err(Refusal::FamilyMismatch);
            }
            counted(
                &mut self.stats,
                &peer,
                self.realms.get(alloc.realm).policy.check_permission(peer.ip()),
            )
            .map_err(|_| Refusal::Forbidden)?;
            peers.push(peer);
        }
        if peers.is_empty() {
            return Err(BAD_REQUEST);
        }
        Ok(peers)
    }

    pub(super) fn create_permission(
        &mut self,
        now: Instant,
        id: usize,
        msg: &Message<'_>,
        signing: Signing<'_>,
        out: &mut [u8],
    ) -> RequestResult {
        let ips: Vec<IpAddr> = self.checked_peers(id, msg)?.iter().map(SocketAddr::ip).collect();
        let max = self.config.max_permissions;
        let a = self.allocations.get_mut(id).ok_or(BAD_REQUEST)?;
        if !a.permit_all(&ips, now, max) {
            return Err(Refusal::TooManyPermissions);
        }
        let (key, expires) = (a.key, now + allocation::PERMISSION_LIFETIME);
        for peer in ips {
            self.outputs
                .push_back(Output::PermissionInstalled { key, peer, expires });
        }
        self.schedule_allocation(id, expires);
        let software = self.config.software.as_deref();
        Ok(write_or_drop(success_response(msg, signing, software, out, |_| Ok(()))))
    }

    pub(super) fn channel_bind(
        &mut self,
        now: Instant,
        id: usize,
        msg: &Message<'_>,
        signing: Signing<'_>,
        out: &mut [u8],
    ) -> RequestResult {
        // RFC 6062: a TCP allocation relays over connections, not channels.
        if self.allocations.get(id).is_some_and(|a| a.tcp) {
            return Err(BAD_REQUEST);
        }
        let number = match msg.channel_number() {
            Ok(Some(n)) if self.config.channel_range.contains(n) => n,
            _ => return Err(BAD_REQUEST),
        };
        let peers = self.checked_peers(id, msg)?;
        let [peer] = peers.as_slice() else {
            return Err(BAD_REQUEST);
        };
        // A channel to the server's own address must also name a relay port.
        let realm = self.allocations.get(id).map_or(0, |a| a.realm);
        counted(&mut self.stats, peer, self.realms.get(realm).policy.check(peer)).map_err(|_| Refusal::Forbidden)?;
        let (max_channels, max_permissions) = (self.config.max_channels, self.config.max_permissions);
        let a = self.allocations.get_mut(id).ok_or(BAD_REQUEST)?;
        match a.bind_channel(number, *peer, now, max_channels) {
            Ok(()) => {}
            Err(BindConflict::Full) => return Err(Refusal::TooManyChannels),
            Err(_) => return Err(Refusal::ChannelConflict),
        }
        // Binding installs or refreshes the permission (RFC 8656 §12.2).
        if !a.permit_all(&[peer.ip()], now, max_permissions) {
            return Err(Refusal::TooManyPermissions);
        }
        let key = a.key;
        if let Some(relay) = a.relay_for(peer).map(|r| r.id) {
            self.outputs.push_back(Output::PermissionInstalled {
                key,
                peer: peer.ip(),
                expires: now + allocation::PERMISSION_LIFETIME,
            });
            self.outputs.push_back(Output::ChannelBound {
                key,
                relay,
                channel: number,
                peer: *peer,
                expires: now + allocation::CHANNEL_LIFETIME,
            });
        }
        self.schedule_allocation(id, now + allocation::PERMISSION_LIFETIME);
        let software = self.config.software.as_deref();
        Ok(write_or_drop(success_response(msg, signing, software, out, |_| Ok(()))))
    }
}
