//! What the kernel fast path may relay, kept from the core's lifecycle
//! outputs: an entry exists exactly while its allocation, its channel
//! binding and the permission for the channel's peer all do. One mirror
//! per worker, writing through a [`BindingTable`] (the kernel maps, or a
//! table in memory for tests).
//!
//! Offloaded: UDP clients with IPv4 client, peer and relay addresses,
//! relaying over a channel, and no bandwidth limit configured. Everything
//! else stays with userspace, which the program passes it to.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use rustc_hash::FxHashMap;

use crate::proto::server::allocation::Traffic;
use crate::proto::server::{ClientKey, Output, RelayId};

/// One offloaded channel binding, as the kernel maps hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    pub client: SocketAddrV4,
    /// The listener the client sends to: its port, and its address when
    /// the listener is bound to one (else the program learns it).
    pub server_port: u16,
    pub server_ip: Option<Ipv4Addr>,
    pub channel: u16,
    /// Where the relay socket is bound (unspecified: relay from the
    /// address the client reached).
    pub relay: SocketAddrV4,
    pub peer: SocketAddrV4,
    /// Index of its packet counters.
    pub slot: u32,
}

/// Where bindings are written.
pub trait BindingTable {
    /// Installs a binding with its counters at zero; false when the table
    /// refused it (full).
    fn install(&mut self, b: &Binding) -> bool;
    fn remove(&mut self, b: &Binding);
    /// What the program relayed for a slot since it was installed.
    fn traffic(&self, slot: u32) -> Traffic;
}

#[derive(Debug)]
struct Channel {
    peer: SocketAddr,
    relay: RelayId,
    /// The installed binding, with the totals already reported.
    installed: Option<(Binding, Traffic)>,
}

#[derive(Debug, Default)]
struct Allocation {
    relays: [Option<(RelayId, SocketAddr)>; 2],
    permissions: Vec<IpAddr>,
    channels: FxHashMap<u16, Channel>,
}

/// A worker's view of what may be offloaded.
pub struct Mirror {
    table: Box<dyn BindingTable>,
    enabled: bool,
    /// By listener id: the local address of UDP listeners (`None`: a
    /// stream listener, never offloaded).
    listeners: Vec<Option<SocketAddr>>,
    /// Relay addresses of this server (bound and advertised): a channel to
    /// one of them stays with userspace, which routes it locally.
    own: Vec<IpAddr>,
    allocations: FxHashMap<ClientKey, Allocation>,
    free_slots: Vec<u32>,
    installed: usize,
    refused: u64,
}

impl Mirror {
    /// A mirror writing to `table`, handing out counter slots `slots`.
    pub fn new(table: Box<dyn BindingTable>, slots: std::ops::Range<u32>, own: Vec<IpAddr>) -> Mirror {
        Mirror {
            table,
            enabled: true,
            listeners: Vec::new(),
            own,
            allocations: FxHashMap::default(),
            free_slots: slots.rev().collect(),
            installed: 0,
            refused: 0,
        }
    }

    /// Registers listener `id` (in the core's order): a UDP listener's
    /// local address, or `None` for TCP/TLS.
    pub fn add_listener(&mut self, id: usize, udp: Option<SocketAddr>) {
        if self.listeners.len() <= id {
            self.listeners.resize(id + 1, None);
        }
        if let Some(l) = self.listeners.get_mut(id) {
            *l = udp;
        }
    }

    /// Bindings in the kernel now.
    pub fn installed(&self) -> usize {
        self.installed
    }

    /// Bindings the table refused (it was full): relayed by userspace.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Offload on or off (off while bandwidth limits apply, or after a
    /// reload removed `[xdp]`). Off removes every binding; on installs what
    /// is live. Traffic of removed bindings is added to `fold`.
    pub fn set_enabled(&mut self, enabled: bool, fold: &mut Vec<(ClientKey, Traffic)>) {
        if enabled == self.enabled {
            return;
        }
        self.enabled = enabled;
        let keys: Vec<ClientKey> = self.allocations.keys().copied().collect();
        for key in keys {
            for n in self.channels_of(&key, |_| true) {
                if enabled {
                    self.install(key, n);
                } else {
                    self.uninstall(key, n, fold);
                }
            }
        }
    }

    /// Follows one output of the core. Traffic of bindings it removes is
    /// added to `fold`, for the core's totals.
    pub fn observe(&mut self, output: &Output, fold: &mut Vec<(ClientKey, Traffic)>) {
        match *output {
            Output::AllocationCreated { key, relays, .. } if self.offloadable_client(&key) => {
                self.allocations.insert(
                    key,
                    Allocation {
                        relays,
                        ..Allocation::default()
                    },
                );
            }
            Output::AllocationEnded { key, .. } => {
                for n in self.channels_of(&key, |_| true) {
                    self.uninstall(key, n, fold);
                }
                self.allocations.remove(&key);
            }
            Output::PermissionInstalled { key, peer, .. } => {
                let Some(a) = self.allocations.get_mut(&key) else {
                    return;
                };
                if !a.permissions.contains(&peer) {
                    a.permissions.push(peer);
                }
                for n in self.channels_of(&key, |c| c.peer.ip() == peer) {
                    self.install(key, n);
                }
            }
            Output::PermissionExpired { key, peer } => {
                let Some(a) = self.allocations.get_mut(&key) else {
                    return;
                };
                a.permissions.retain(|p| *p != peer);
                for n in self.channels_of(&key, |c| c.peer.ip() == peer) {
                    self.uninstall(key, n, fold);
                }
            }
            Output::ChannelBound {
                key,
                relay,
                channel,
                peer,
                ..
            } => {
                let Some(a) = self.allocations.get_mut(&key) else {
                    return;
                };
                let same = a.channels.get(&channel).is_some_and(|c| c.peer == peer);
                if !same {
                    a.channels.insert(
                        channel,
                        Channel {
                            peer,
                            relay,
                            installed: None,
                        },
                    );
                }
                self.install(key, channel);
            }
            Output::ChannelExpired { key, channel, .. } => {
                self.uninstall(key, channel, fold);
                if let Some(a) = self.allocations.get_mut(&key) {
                    a.channels.remove(&channel);
                }
            }
            _ => {}
        }
    }

    /// What the program relayed since the last call, for every binding.
    pub fn collect(&mut self, fold: &mut Vec<(ClientKey, Traffic)>) {
        for (key, a) in &mut self.allocations {
            for c in a.channels.values_mut() {
                if let Some((b, reported)) = &mut c.installed {
                    let now = self.table.traffic(b.slot);
                    let delta = minus(now, *reported);
                    if delta != Traffic::default() {
                        *reported = now;
                        fold.push((*key, delta));
                    }
                }
            }
        }
    }

    /// The numbers of an allocation's channels that `which` picks.
    fn channels_of(&self, key: &ClientKey, which: impl Fn(&Channel) -> bool) -> Vec<u16> {
        self.allocations
            .get(key)
            .map(|a| a.channels.iter().filter(|(_, c)| which(c)).map(|(n, _)| *n).collect())
            .unwrap_or_default()
    }

    fn offloadable_client(&self, key: &ClientKey) -> bool {
        key.client.is_ipv4() && matches!(self.listeners.get(usize::from(key.listener.0)), Some(Some(l)) if l.is_ipv4())
    }

    fn install(&mut self, key: ClientKey, number: u16) {
        if !self.enabled {
            return;
        }
        let Some(listener) = self.listeners.get(usize::from(key.listener.0)).copied().flatten() else {
            return;
        };
        let Some(a) = self.allocations.get_mut(&key) else {
            return;
        };
        let Some(c) = a.channels.get_mut(&number) else {
            return;
        };
        if c.installed.is_some() || !a.permissions.contains(&c.peer.ip()) || self.own.contains(&c.peer.ip()) {
            return;
        }
        let relay = a
            .relays
            .iter()
            .flatten()
            .find(|(id, _)| *id == c.relay)
            .map(|(_, addr)| *addr);
        let (SocketAddr::V4(client), Some(SocketAddr::V4(relay)), SocketAddr::V4(peer), SocketAddr::V4(server)) =
            (key.client, relay, c.peer, listener)
        else {
            return;
        };
        let Some(slot) = self.free_slots.pop() else {
            self.refused += 1;
            return;
        };
        let b = Binding {
            client,
            server_port: server.port(),
            server_ip: (!server.ip().is_unspecified()).then(|| *server.ip()),
            channel: number,
            relay,
            peer,
            slot,
        };
        if self.table.install(&b) {
            c.installed = Some((b, Traffic::default()));
            self.installed += 1;
        } else {
            self.free_slots.push(slot);
            self.refused += 1;
        }
    }

    fn uninstall(&mut self, key: ClientKey, number: u16, fold: &mut Vec<(ClientKey, Traffic)>) {
        let Some(c) = self.allocations.get_mut(&key).and_then(|a| a.channels.get_mut(&number)) else {
            return;
        };
        let Some((b, reported)) = c.installed.take() else {
            return;
        };
        self.table.remove(&b);
        let delta = minus(self.table.traffic(b.slot), reported);
        if delta != Traffic::default() {
            fold.push((key, delta));
        }
        self.free_slots.push(b.slot);
        self.installed -= 1;
    }
}

fn minus(a: Traffic, b: Traffic) -> Traffic {
    Traffic {
        to_peer_packets: a.to_peer_packets.saturating_sub(b.to_peer_packets),
        to_peer_bytes: a.to_peer_bytes.saturating_sub(b.to_peer_bytes),
        to_client_packets: a.to_client_packets.saturating_sub(b.to_client_packets),
        to_client_bytes: a.to_client_bytes.saturating_sub(b.to_client_bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::server::{EndReason, ListenerId};
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::time::Instant;

    /// A table in memory, shared with the test.
    #[derive(Default)]
    struct Memory {
        bindings: Vec<Binding>,
        traffic: FxHashMap<u32, Traffic>,
        capacity: Option<usize>,
    }

    struct Shared(Rc<RefCell<Memory>>);

    impl BindingTable for Shared {
        fn install(&mut self, b: &Binding) -> bool {
            let mut m = self.0.borrow_mut();
            if m.capacity.is_some_and(|c| m.bindings.len() >= c) {
                return false;
            }
            m.bindings.push(*b);
            m.traffic.insert(b.slot, Traffic::default());
            true
        }
        fn remove(&mut self, b: &Binding) {
            self.0.borrow_mut().bindings.retain(|x| x != b);
        }
        fn traffic(&self, slot: u32) -> Traffic {
            self.0.borrow().traffic.get(&slot).copied().unwrap_or_default()
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn setup() -> (Mirror, Rc<RefCell<Memory>>, ClientKey) {
        let memory = Rc::new(RefCell::new(Memory::default()));
        let mut m = Mirror::new(
            Box::new(Shared(memory.clone())),
            0..4,
            vec!["198.18.1.1".parse().unwrap()],
        );
        m.add_listener(0, Some(sa("198.18.0.1:3478")));
        m.add_listener(1, None);
        let key = ClientKey {
            listener: ListenerId(0),
            client: sa("198.18.0.2:40000"),
        };
        let mut fold = Vec::new();
        m.observe(
            &Output::AllocationCreated {
                key,
                user: "alice".into(),
                realm: "r".into(),
                relays: [Some((RelayId(7), sa("198.18.1.1:50000"))), None],
                expires: Instant::now(),
            },
            &mut fold,
        );
        (m, memory, key)
    }

    fn bound(key: ClientKey, channel: u16, peer: &str) -> Output {
        Output::ChannelBound {
            key,
            relay: RelayId(7),
            channel,
            peer: sa(peer),
            expires: Instant::now(),
        }
    }

    fn permitted(key: ClientKey, peer: &str) -> Output {
        Output::PermissionInstalled {
            key,
            peer: peer.parse().unwrap(),
            expires: Instant::now(),
        }
    }

    #[test]
    fn a_binding_lives_exactly_while_channel_permission_and_allocation_do() {
        let (mut m, memory, key) = setup();
        let mut fold = Vec::new();
        m.observe(&bound(key, 0x4000, "198.18.2.2:6000"), &mut fold);
        assert_eq!(m.installed(), 0, "no permission yet");
        m.observe(&permitted(key, "198.18.2.2"), &mut fold);
        assert_eq!(m.installed(), 1);
        let b = memory.borrow().bindings[0];
        assert_eq!(
            (b.client, b.server_port, b.server_ip, b.channel, b.relay, b.peer),
            (
                "198.18.0.2:40000".parse().unwrap(),
                3478,
                Some("198.18.0.1".parse().unwrap()),
                0x4000,
                "198.18.1.1:50000".parse().unwrap(),
                "198.18.2.2:6000".parse().unwrap()
            )
        );
        // A refresh changes nothing.
        m.observe(&bound(key, 0x4000, "198.18.2.2:6000"), &mut fold);
        m.observe(&permitted(key, "198.18.2.2"), &mut fold);
        assert_eq!(memory.borrow().bindings.len(), 1);

        // The permission runs out: gone, and its traffic reported.
        memory.borrow_mut().traffic.insert(
            b.slot,
            Traffic {
                to_peer_packets: 3,
                to_peer_bytes: 300,
                ..Traffic::default()
            },
        );
        m.observe(
            &Output::PermissionExpired {
                key,
                peer: "198.18.2.2".parse().unwrap(),
            },
            &mut fold,
        );
        assert!(memory.borrow().bindings.is_empty());
        assert_eq!(fold.len(), 1);
        assert_eq!(fold[0].1.to_peer_bytes, 300);
        // Renewed: back.
        m.observe(&permitted(key, "198.18.2.2"), &mut fold);
        assert_eq!(m.installed(), 1);
        // The channel runs out: gone.
        m.observe(
            &Output::ChannelExpired {
                key,
                relay: RelayId(7),
                channel: 0x4000,
                peer: sa("198.18.2.2:6000"),
            },
            &mut fold,
        );
        assert_eq!(m.installed(), 0);
        m.observe(&permitted(key, "198.18.2.2"), &mut fold);
        assert_eq!(m.installed(), 0, "no channel, nothing to install");
        // The allocation ends with a channel bound: gone.
        m.observe(&bound(key, 0x4001, "198.18.2.2:6000"), &mut fold);
        assert_eq!(m.installed(), 1);
        m.observe(
            &Output::AllocationEnded {
                key,
                reason: EndReason::Operator,
                traffic: Traffic::default(),
            },
            &mut fold,
        );
        assert_eq!((m.installed(), memory.borrow().bindings.len()), (0, 0));
    }

    #[test]
    fn streams_ipv6_own_addresses_and_a_full_table_stay_with_userspace() {
        let (mut m, memory, key) = setup();
        let mut fold = Vec::new();
        // A peer that is this server's own relay address.
        m.observe(&bound(key, 0x4000, "198.18.1.1:50002"), &mut fold);
        m.observe(&permitted(key, "198.18.1.1"), &mut fold);
        assert_eq!(m.installed(), 0);
        // A stream client.
        let stream = ClientKey {
            listener: ListenerId(1),
            client: sa("198.18.0.2:40001"),
        };
        m.observe(
            &Output::AllocationCreated {
                key: stream,
                user: "alice".into(),
                realm: "r".into(),
                relays: [Some((RelayId(8), sa("198.18.1.1:50001"))), None],
                expires: Instant::now(),
            },
            &mut fold,
        );
        m.observe(&bound(stream, 0x4000, "198.18.2.2:6000"), &mut fold);
        m.observe(&permitted(stream, "198.18.2.2"), &mut fold);
        assert_eq!(m.installed(), 0);
        // Four slots: the fifth binding is refused and counted.
        for (n, port) in (0x4001..0x4006).zip(6001..) {
            m.observe(&bound(key, n, &format!("198.18.2.3:{port}")), &mut fold);
        }
        m.observe(&permitted(key, "198.18.2.3"), &mut fold);
        assert_eq!((m.installed(), m.refused()), (4, 1));
        assert_eq!(memory.borrow().bindings.len(), 4);
        // Off removes everything; on puts back what is live.
        m.set_enabled(false, &mut fold);
        assert_eq!(memory.borrow().bindings.len(), 0);
        m.set_enabled(true, &mut fold);
        assert_eq!(memory.borrow().bindings.len(), 4);
    }

    #[test]
    fn collect_reports_each_packet_once() {
        let (mut m, memory, key) = setup();
        let mut fold = Vec::new();
        m.observe(&bound(key, 0x4000, "198.18.2.2:6000"), &mut fold);
        m.observe(&permitted(key, "198.18.2.2"), &mut fold);
        let slot = memory.borrow().bindings[0].slot;
        let t = |n| Traffic {
            to_client_packets: n,
            to_client_bytes: n * 100,
            ..Traffic::default()
        };
        memory.borrow_mut().traffic.insert(slot, t(5));
        m.collect(&mut fold);
        memory.borrow_mut().traffic.insert(slot, t(7));
        m.collect(&mut fold);
        m.collect(&mut fold);
        let total: u64 = fold.iter().map(|(_, t)| t.to_client_packets).sum();
        assert_eq!((fold.len(), total), (2, 7));
    }
}
