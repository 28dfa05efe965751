//! What the operator sees and does: gauges, the allocation list, kicks
//! and revocations.

use super::*;

/// Whether an operator's `name` picks out the allocation user `username`:
/// the whole name, or for a REST user "<expiry>:<name>" the name after the
/// expiry (operators know their users by that, not by the expiry).
pub(super) fn names_user(username: &str, name: &str) -> bool {
    username == name || crate::proto::auth::RestUsername::parse(username).and_then(|r| r.user) == Some(name)
}

impl Server {
    /// Counts for gauges: allocations by transport and family, live
    /// permissions and channels, RFC 6062 connections.
    pub fn gauges(&self, clock: Now) -> Gauges {
        let now = clock.instant;
        let mut g = Gauges {
            tcp_connections: self.tcp_connections.len() as u64,
            ..Gauges::default()
        };
        for (_, a) in &self.allocations {
            let t = usize::from(self.listeners.get(usize::from(a.key.listener.0)) == Some(&ListenerKind::Stream));
            for (f, r) in a.relays.iter().enumerate() {
                if r.is_some()
                    && let Some(n) = g.allocations.get_mut(t).and_then(|row| row.get_mut(f))
                {
                    *n += 1;
                }
            }
            g.permissions += a.permissions.iter().filter(|p| p.expires > now).count() as u64;
            g.channels += a.channels.iter().filter(|c| c.expires > now).count() as u64;
        }
        g
    }

    /// A description of every allocation, for the admin API.
    pub fn allocations_info(&self, clock: Now) -> Vec<AllocationInfo> {
        let now = clock.instant;
        self.allocations
            .iter()
            .map(|(_, a)| AllocationInfo {
                user: a.username.clone(),
                realm: self.realms.get(a.realm).name().to_owned(),
                client: a.key.client,
                transport: self.transport_name(&a.key),
                relays: a.relays.iter().flatten().map(|r| r.advertised).collect(),
                tcp_relay: a.tcp,
                age_secs: now.saturating_duration_since(a.created).as_secs(),
                expires_in_secs: a.expires.saturating_duration_since(now).as_secs(),
                permissions: a.permissions.iter().filter(|p| p.expires > now).count(),
                channels: a.channels.iter().filter(|c| c.expires > now).count(),
                traffic: a.traffic,
            })
            .collect()
    }

    /// Deletes the allocations of `user` (the whole user name, or a REST
    /// user's name after its expiry) and/or of client address `client`
    /// (admin API); returns how many.
    /// Ends every allocation whose credential no longer verifies against
    /// the current credentials (a user removed or given a new password, a
    /// REST secret taken out of the list); returns how many.
    pub(super) fn revoke_unverifiable(&mut self) -> usize {
        let realms = Arc::clone(&self.realms);
        let ids: Vec<usize> = self
            .allocations
            .iter()
            .filter(|(_, a)| {
                !realms
                    .get(a.realm)
                    .credentials
                    .still_verifies(&a.username, a.algorithm, &a.credential)
            })
            .map(|(id, _)| id)
            .collect();
        for &id in &ids {
            self.stats.allocations_deleted += 1;
            self.remove_allocation(id, EndReason::Revoked);
        }
        ids.len()
    }

    /// Before a reload replaces the realm table with `new`: the
    /// allocations of a realm it no longer holds end (the tenant is gone,
    /// and nothing could authenticate their requests). Returns how many.
    pub(super) fn end_removed_realms(&mut self, new: &Realms) -> usize {
        let gone: Vec<usize> = self
            .allocations
            .iter()
            .filter(|(_, a)| new.index_of(self.realms.get(a.realm).name()).is_none())
            .map(|(id, _)| id)
            .collect();
        for &id in &gone {
            if let Some(a) = self.allocations.get(id) {
                tracing::info!(
                    user = %a.username,
                    realm = self.realms.get(a.realm).name(),
                    "allocation ends: its realm was removed from the configuration"
                );
            }
            self.stats.allocations_deleted += 1;
            self.remove_allocation(id, EndReason::Revoked);
        }
        gone.len()
    }

    /// After a reload replaced the realm table (`old` the one before): each
    /// allocation and pending Allocate finds its realm again by name
    /// (indexes may have moved), and allocations take their realm's
    /// bandwidth.
    pub(super) fn rehome(&mut self, old: &Realms) {
        let realms = &self.realms;
        let find = |i: RealmIndex| realms.index_of(old.get(i).name()).unwrap_or(0);
        for (_, a) in &mut self.allocations {
            a.realm = find(a.realm);
            let bandwidth = realms.get(a.realm).allocation_bandwidth;
            if bandwidth != a.bandwidth {
                a.bandwidth = bandwidth;
                a.shaper = None;
            }
        }
        for (_, p) in &mut self.pending {
            p.realm = find(p.realm);
        }
    }

    /// After a reload changed the peer policy: permissions and channels to
    /// peers it now refuses end at once (reported as expired), so no path —
    /// this core's or a fast path mirroring it — relays to them any longer.
    pub(super) fn withdraw_refused_peers(&mut self) {
        for (_, a) in &mut self.allocations {
            let policy = &self.realms.get(a.realm).policy;
            let key = a.key;
            let relays = a.relays;
            let outputs = &mut self.outputs;
            a.permissions.retain(|p| {
                let keep = policy.check_permission(p.ip).is_ok();
                if !keep {
                    outputs.push_back(Output::PermissionExpired { key, peer: p.ip });
                }
                keep
            });
            a.channels.retain(|c| {
                let keep = policy.check(&c.peer).is_ok();
                let relay = relays.get(usize::from(c.peer.is_ipv6())).copied().flatten();
                if let (false, Some(relay)) = (keep, relay) {
                    outputs.push_back(Output::ChannelExpired {
                        key,
                        relay: relay.id,
                        channel: c.number,
                        peer: c.peer,
                    });
                }
                keep
            });
        }
    }

    /// Adds what a fast path relayed for an allocation to its totals.
    pub(super) fn count_offloaded(&mut self, key: ClientKey, t: allocation::Traffic) {
        if let Some(a) = self.by_client.get(&key).and_then(|&i| self.allocations.get_mut(i)) {
            a.traffic.to_peer_packets += t.to_peer_packets;
            a.traffic.to_peer_bytes += t.to_peer_bytes;
            a.traffic.to_client_packets += t.to_client_packets;
            a.traffic.to_client_bytes += t.to_client_bytes;
        }
        self.stats.client_to_peer_packets += t.to_peer_packets;
        self.stats.client_to_peer_bytes += t.to_peer_bytes;
        self.stats.peer_to_client_packets += t.to_client_packets;
        self.stats.peer_to_client_bytes += t.to_client_bytes;
    }

    pub fn kick(&mut self, user: Option<&str>, client: Option<SocketAddr>, realm: Option<&str>) -> usize {
        let ids: Vec<usize> = self
            .allocations
            .iter()
            .filter(|(_, a)| {
                user.is_none_or(|u| names_user(&a.username, u))
                    && client.is_none_or(|c| a.key.client == c)
                    && realm.is_none_or(|r| self.realms.get(a.realm).name() == r)
            })
            .map(|(id, _)| id)
            .collect();
        for &id in &ids {
            self.stats.allocations_deleted += 1;
            self.remove_allocation(id, EndReason::Operator);
        }
        ids.len()
    }
}
