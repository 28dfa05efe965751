//! Loading and attaching the XDP program (relay.bpf.c, built by build.rs)
//! with aya, and the kernel side of a [`BindingTable`]: its maps.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use aya::programs::{Xdp, XdpFlags};
use aya::{Ebpf, Pod};

use super::mirror::{Binding, BindingTable};
use crate::config::XdpMode;
use crate::proto::server::allocation::Traffic;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay.bpf.o"));

/// Counter slots (`MAX_BINDINGS` in relay.bpf.c).
pub const MAX_BINDINGS: u32 = 65536;
const MAX_LISTEN_PORTS: usize = 8;

/// Why packets went to userspace, in the order of `enum pass_reason`.
pub const PASS_REASONS: [&str; 6] = [
    "not_channel_data",
    "unbound",
    "malformed",
    "no_route",
    "not_learned",
    "too_big",
];

// The layouts of relay.bpf.c; addresses, ports and channel numbers in
// network byte order.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ClientKey {
    client_ip: u32,
    client_port: u16,
    server_port: u16,
    channel: u16,
    pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ClientValue {
    relay_ip: u32,
    peer_ip: u32,
    relay_port: u16,
    peer_port: u16,
    slot: u32,
    taught: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PeerKey {
    peer_ip: u32,
    peer_port: u16,
    relay_port: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PeerValue {
    client_ip: u32,
    server_ip: u32,
    client_port: u16,
    server_port: u16,
    channel: u16,
    pad: u16,
    slot: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Config {
    relay_low: u16,
    relay_high: u16,
    listen_ports: [u16; MAX_LISTEN_PORTS],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct TrafficValue {
    to_peer_packets: u64,
    to_peer_bytes: u64,
    to_client_packets: u64,
    to_client_bytes: u64,
}

// SAFETY: plain #[repr(C)] integers with no padding the kernel could see
// uninitialised (every field is written; `pad` fields are explicit).
unsafe impl Pod for ClientKey {}
unsafe impl Pod for ClientValue {}
unsafe impl Pod for PeerKey {}
unsafe impl Pod for PeerValue {}
unsafe impl Pod for Config {}
unsafe impl Pod for TrafficValue {}

fn ip(a: &Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

fn err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("xdp: {what}: {e}"))
}

/// The loaded program, attached to the configured interfaces until dropped.
pub struct Program {
    ebpf: Ebpf,
    attached: Vec<(String, aya::programs::xdp::XdpLinkId)>,
}

impl Program {
    /// Loads the program, tells it the server's UDP listener ports and relay
    /// port range, and attaches it to `interfaces`.
    pub fn load(
        interfaces: &[String],
        mode: XdpMode,
        listen_ports: &[u16],
        relay_ports: (u16, u16),
    ) -> io::Result<Program> {
        if listen_ports.len() > MAX_LISTEN_PORTS {
            return Err(err(
                "listeners",
                format!("at most {MAX_LISTEN_PORTS} UDP listener ports"),
            ));
        }
        let mut ebpf =
            Ebpf::load(OBJECT).map_err(|e| err("loading the program (needs CAP_BPF and CAP_NET_ADMIN, or root)", e))?;
        let mut config = Config {
            relay_low: relay_ports.0,
            relay_high: relay_ports.1,
            ..Config::default()
        };
        for (slot, port) in config.listen_ports.iter_mut().zip(listen_ports) {
            *slot = port.to_be();
        }
        let map = ebpf.map_mut("config").ok_or_else(|| err("config map", "missing"))?;
        let mut array: Array<&mut MapData, Config> = Array::try_from(map).map_err(|e| err("config map", e))?;
        array.set(0, config, 0).map_err(|e| err("config map", e))?;

        let program: &mut Xdp = ebpf
            .program_mut("turnstile_relay")
            .ok_or_else(|| err("program", "missing"))?
            .try_into()
            .map_err(|e| err("program", e))?;
        program.load().map_err(|e| err("verifier", e))?;
        let flags = match mode {
            XdpMode::Native => XdpFlags::DRV_MODE,
            XdpMode::Generic => XdpFlags::SKB_MODE,
        };
        let mut attached = Vec::new();
        for name in interfaces {
            let link = program
                .attach(name, flags)
                .map_err(|e| err(&format!("attaching to {name} ({mode:?} mode)"), e))?;
            attached.push((name.clone(), link));
        }
        for (name, _) in &attached {
            tracing::info!(interface = %name, mode = ?mode, "xdp fast path attached");
        }
        Ok(Program { ebpf, attached })
    }

    /// A handle on the binding maps for one worker (its own descriptors).
    pub fn table(&self) -> io::Result<KernelTable> {
        let dup = |name: &str| -> io::Result<MapData> {
            let map = self.ebpf.map(name).ok_or_else(|| err(name, "missing"))?;
            let data: &MapData = match map {
                Map::HashMap(d) | Map::PerCpuArray(d) | Map::Array(d) => d,
                _ => return Err(err(name, "unexpected map type")),
            };
            let fd = data.fd().as_fd().try_clone_to_owned()?;
            MapData::from_fd(fd).map_err(|e| err(name, e))
        };
        Ok(KernelTable {
            clients: HashMap::try_from(Map::HashMap(dup("client_bindings")?)).map_err(|e| err("client_bindings", e))?,
            peers: HashMap::try_from(Map::HashMap(dup("peer_bindings")?)).map_err(|e| err("peer_bindings", e))?,
            traffic: PerCpuArray::try_from(Map::PerCpuArray(dup("binding_traffic")?))
                .map_err(|e| err("binding_traffic", e))?,
        })
    }

    /// Packets passed to userspace, by reason (indexes of [`PASS_REASONS`]).
    pub fn passed(&self) -> [u64; PASS_REASONS.len()] {
        let mut out = [0u64; PASS_REASONS.len()];
        let Some(map) = self.ebpf.map("passed") else {
            return out;
        };
        let Ok(array) = PerCpuArray::<&MapData, u64>::try_from(map) else {
            return out;
        };
        for (i, n) in out.iter_mut().enumerate() {
            if let Ok(values) = array.get(&(i as u32), 0) {
                *n = values.iter().sum();
            }
        }
        out
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        if let Some(Ok(program)) = self.ebpf.program_mut("turnstile_relay").map(<&mut Xdp>::try_from) {
            for (name, link) in self.attached.drain(..) {
                match program.detach(link) {
                    Ok(()) => tracing::info!(interface = %name, "xdp fast path detached"),
                    Err(e) => tracing::warn!(interface = %name, "xdp detach: {e}"),
                }
            }
        }
    }
}

/// One worker's handle on the binding maps.
pub struct KernelTable {
    clients: HashMap<MapData, ClientKey, ClientValue>,
    peers: HashMap<MapData, PeerKey, PeerValue>,
    traffic: PerCpuArray<MapData, TrafficValue>,
}

impl KernelTable {
    fn keys(b: &Binding) -> (ClientKey, PeerKey) {
        (
            ClientKey {
                client_ip: ip(b.client.ip()),
                client_port: b.client.port().to_be(),
                server_port: b.server_port.to_be(),
                channel: b.channel.to_be(),
                pad: 0,
            },
            PeerKey {
                peer_ip: ip(b.peer.ip()),
                peer_port: b.peer.port().to_be(),
                relay_port: b.relay.port().to_be(),
            },
        )
    }
}

impl BindingTable for KernelTable {
    fn install(&mut self, b: &Binding) -> bool {
        let (ck, pk) = KernelTable::keys(b);
        let zero = match PerCpuValues::try_from(vec![TrafficValue::default(); aya::util::nr_cpus().unwrap_or(1)]) {
            Ok(z) => z,
            Err(_) => return false,
        };
        if self.traffic.set(b.slot, zero, 0).is_err() {
            return false;
        }
        let cv = ClientValue {
            relay_ip: ip(b.relay.ip()),
            peer_ip: ip(b.peer.ip()),
            relay_port: b.relay.port().to_be(),
            peer_port: b.peer.port().to_be(),
            slot: b.slot,
            taught: b.server_ip.as_ref().map(ip).unwrap_or(0),
        };
        let pv = PeerValue {
            client_ip: ip(b.client.ip()),
            server_ip: b.server_ip.as_ref().map(ip).unwrap_or(0),
            client_port: b.client.port().to_be(),
            server_port: b.server_port.to_be(),
            channel: b.channel.to_be(),
            pad: 0,
            slot: b.slot,
        };
        if self.peers.insert(pk, pv, 0).is_err() {
            return false;
        }
        if self.clients.insert(ck, cv, 0).is_err() {
            let _ = self.peers.remove(&pk);
            return false;
        }
        true
    }

    fn remove(&mut self, b: &Binding) {
        let (ck, pk) = KernelTable::keys(b);
        let _ = self.clients.remove(&ck);
        let _ = self.peers.remove(&pk);
    }

    fn traffic(&self, slot: u32) -> Traffic {
        let mut t = Traffic::default();
        if let Ok(values) = self.traffic.get(&slot, 0) {
            for v in values.iter() {
                t.to_peer_packets += v.to_peer_packets;
                t.to_peer_bytes += v.to_peer_bytes;
                t.to_client_packets += v.to_client_packets;
                t.to_client_bytes += v.to_client_bytes;
            }
        }
        t
    }
}
