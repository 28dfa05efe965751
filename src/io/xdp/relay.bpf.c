// SPDX-License-Identifier: MIT OR Apache-2.0
//
// turnstile's kernel fast path: relays UDP ChannelData of bound channels
// in XDP, both ways, and passes everything else to userspace unchanged.
//
//   client -> server: ChannelData to a listener port whose (client, port,
//   channel) is bound  ->  the peer-bound datagram from the relayed address
//   peer -> relay: a datagram to a relay port from a bound peer  ->
//   ChannelData to the client from the listener's address
//
// The maps mirror the userspace core (src/io/xdp/mirror.rs): an entry
// exists only while its allocation, channel binding and permission do.
// The route is looked up before anything is rewritten, so a packet this
// program gives up on reaches userspace as it arrived. IPv4 only; IP
// options, fragments and lengths that disagree are passed.
//
// Built by build.rs with clang -target bpf (feature `xdp`).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif

#define MAX_BINDINGS 65536
#define MAX_LISTEN_PORTS 8

// Keys and values: network byte order for addresses, ports and channel
// numbers, as they are on the wire. Layouts are mirrored in
// src/io/xdp/maps.rs.
struct client_key {
	__u32 client_ip;
	__u16 client_port;
	__u16 server_port;
	__u16 channel;
	__u16 pad;
};

struct client_value {
	__u32 relay_ip; // 0: relay from the address the client reached
	__u32 peer_ip;
	__u16 relay_port;
	__u16 peer_port;
	__u32 slot;
	__u32 taught; // the server address the way back was last taught
};

struct peer_key {
	__u32 peer_ip;
	__u16 peer_port;
	__u16 relay_port;
};

struct peer_value {
	__u32 client_ip;
	__u32 server_ip; // 0 until learned from the client's traffic
	__u16 client_port;
	__u16 server_port;
	__u16 channel;
	__u16 pad;
	__u32 slot;
};

struct config {
	__u16 relay_low; // host order
	__u16 relay_high;
	__u16 listen_ports[MAX_LISTEN_PORTS]; // network order, 0 = unused
};

struct traffic {
	__u64 to_peer_packets;
	__u64 to_peer_bytes;
	__u64 to_client_packets;
	__u64 to_client_bytes;
};

// Why a packet for the server went to userspace (metric labels in
// src/io/xdp/maps.rs, same order).
enum pass_reason {
	PASS_NOT_CHANNEL_DATA, // STUN, or not ChannelData
	PASS_UNBOUND,          // no binding for it (channel, peer, or fallback)
	PASS_MALFORMED,        // lengths disagree, IP options, fragment
	PASS_NO_ROUTE,         // bpf_fib_lookup could not route it
	PASS_NOT_LEARNED,      // the listener address of the client is not known yet
	PASS_TOO_BIG,          // the rewritten frame would not fit
	PASS_REASONS,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BINDINGS);
	__type(key, struct client_key);
	__type(value, struct client_value);
} client_bindings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BINDINGS);
	__type(key, struct peer_key);
	__type(value, struct peer_value);
} peer_bindings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_BINDINGS);
	__type(key, __u32);
	__type(value, struct traffic);
} binding_traffic SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PASS_REASONS);
	__type(key, __u32);
	__type(value, __u64);
} passed SEC(".maps");

static __always_inline int pass(__u32 reason)
{
	__u64 *n = bpf_map_lookup_elem(&passed, &reason);
	if (n)
		*n += 1;
	return XDP_PASS;
}

static __always_inline __u16 fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

// RFC 1624 incremental update: the one's-complement sum of what leaves is
// taken out (added as its complement), the sum of what comes in is added.
static __always_inline __u16 csum_replace(__u16 check, __u64 out_sum, __u64 in_sum)
{
	__u64 sum = (__u16)~check;
	sum += (__u16)~fold(out_sum);
	sum += fold(in_sum);
	__u16 r = ~fold(sum);
	return r ? r : 0xffff; // 0 means "no checksum" in UDP over IPv4
}

static __always_inline __u64 words32(__u32 v)
{
	return (v & 0xffff) + (v >> 16);
}

static __always_inline void ip_checksum(struct iphdr *ip)
{
	__u16 *w = (__u16 *)ip;
	__u64 sum = 0;
	ip->check = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += w[i];
	ip->check = ~fold(sum);
}

static __always_inline int listening_on(struct config *cfg, __u16 port)
{
#pragma unroll
	for (int i = 0; i < MAX_LISTEN_PORTS; i++)
		if (cfg->listen_ports[i] && cfg->listen_ports[i] == port)
			return 1;
	return 0;
}

static __always_inline void count(__u32 slot, int to_peer, __u64 bytes)
{
	struct traffic *t = bpf_map_lookup_elem(&binding_traffic, &slot);
	if (!t)
		return;
	if (to_peer) {
		t->to_peer_packets += 1;
		t->to_peer_bytes += bytes;
	} else {
		t->to_client_packets += 1;
		t->to_client_bytes += bytes;
	}
}

// Looks the route up for the rewritten packet; fills the MAC addresses.
static __always_inline int route(struct xdp_md *ctx, __u32 src, __u32 dst, __u16 tot_len,
				 struct bpf_fib_lookup *fib)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET;
	fib->l4_protocol = IPPROTO_UDP;
	fib->tot_len = tot_len;
	fib->ipv4_src = src;
	fib->ipv4_dst = dst;
	fib->ifindex = ctx->ingress_ifindex;
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
}

static __always_inline int send_out(struct xdp_md *ctx, struct bpf_fib_lookup *fib)
{
	if (fib->ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(fib->ifindex, 0);
}

// Client -> peer: strip the 4-byte ChannelData header.
static __always_inline int to_peer(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *ip,
				   struct udphdr *udp, void *data_end)
{
	__u8 *cd = (__u8 *)(udp + 1);
	if ((void *)(cd + 4) > data_end)
		return pass(PASS_MALFORMED);
	if ((cd[0] & 0xc0) != 0x40)
		return pass(PASS_NOT_CHANNEL_DATA);
	__u16 udp_len = bpf_ntohs(udp->len);
	__u16 data_len = ((__u16)cd[2] << 8) | cd[3];
	// Over UDP the datagram holds the ChannelData message and nothing else
	// (a padded one goes to userspace, which accepts it).
	if (udp_len != 8 + 4 + data_len || (void *)cd + 4 + data_len > data_end)
		return pass(PASS_MALFORMED);

	struct client_key key = {
		.client_ip = ip->saddr,
		.client_port = udp->source,
		.server_port = udp->dest,
		.channel = *(__u16 *)cd,
	};
	struct client_value *b = bpf_map_lookup_elem(&client_bindings, &key);
	if (!b)
		return pass(PASS_UNBOUND);
	__u32 relay_ip = b->relay_ip ? b->relay_ip : ip->daddr;

	// Teach the way back the address this client reaches the server on
	// (once: the binding remembers what it taught).
	if (b->taught != ip->daddr) {
		struct peer_key back = { .peer_ip = b->peer_ip, .peer_port = b->peer_port, .relay_port = b->relay_port };
		struct peer_value *r = bpf_map_lookup_elem(&peer_bindings, &back);
		if (r) {
			r->server_ip = ip->daddr;
			b->taught = ip->daddr;
		}
	}

	struct bpf_fib_lookup fib;
	__u16 new_tot = bpf_ntohs(ip->tot_len) - 4;
	if (route(ctx, relay_ip, b->peer_ip, new_tot, &fib) != BPF_FIB_LKUP_RET_SUCCESS)
		return pass(PASS_NO_ROUTE);

	// Checksum: the pseudo-header addresses, the ports, both length fields
	// and the two ChannelData words leave; the new ones come in. The data
	// keeps its 16-bit alignment (it moves by 4 bytes).
	__u16 new_udp_len = udp_len - 4;
	__u16 check = udp->check;
	if (check) {
		__u64 out = words32(ip->saddr) + words32(ip->daddr) + udp->source + udp->dest +
			    2 * (__u64)udp->len + *(__u16 *)cd + *(__u16 *)(cd + 2);
		__u64 in = words32(relay_ip) + words32(b->peer_ip) + b->relay_port + b->peer_port +
			   2 * (__u64)bpf_htons(new_udp_len);
		check = csum_replace(check, out, in);
	}

	struct ethhdr e = *eth;
	struct iphdr i = *ip;
	__builtin_memcpy(e.h_source, fib.smac, ETH_ALEN);
	__builtin_memcpy(e.h_dest, fib.dmac, ETH_ALEN);
	i.saddr = relay_ip;
	i.daddr = b->peer_ip;
	i.tot_len = bpf_htons(new_tot);
	i.ttl = 64; // a packet the relay originates, as userspace sends it
	struct udphdr u = {
		.source = b->relay_port,
		.dest = b->peer_port,
		.len = bpf_htons(new_udp_len),
		.check = check,
	};
	__u32 slot = b->slot;

	if (bpf_xdp_adjust_head(ctx, 4))
		return pass(PASS_TOO_BIG);
	void *data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + sizeof(e) + sizeof(i) + sizeof(u) > data_end)
		return XDP_ABORTED;
	struct ethhdr *ne = data;
	struct iphdr *ni = (struct iphdr *)(ne + 1);
	struct udphdr *nu = (struct udphdr *)(ni + 1);
	*ne = e;
	*ni = i;
	ip_checksum(ni);
	*nu = u;
	count(slot, 1, data_len);
	return send_out(ctx, &fib);
}

// Peer -> client: prepend the 4-byte ChannelData header.
static __always_inline int to_client(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *ip,
				     struct udphdr *udp, void *data_end)
{
	struct peer_key key = { .peer_ip = ip->saddr, .peer_port = udp->source, .relay_port = udp->dest };
	struct peer_value *b = bpf_map_lookup_elem(&peer_bindings, &key);
	if (!b)
		return pass(PASS_UNBOUND);
	if (!b->server_ip)
		return pass(PASS_NOT_LEARNED);
	__u16 udp_len = bpf_ntohs(udp->len);
	if (udp_len < 8 || (void *)udp + udp_len > data_end)
		return pass(PASS_MALFORMED);
	__u16 data_len = udp_len - 8;
	if (data_len > 0xffff - 4 - 8 - 20)
		return pass(PASS_TOO_BIG);

	struct bpf_fib_lookup fib;
	__u16 new_tot = bpf_ntohs(ip->tot_len) + 4;
	if (route(ctx, b->server_ip, b->client_ip, new_tot, &fib) != BPF_FIB_LKUP_RET_SUCCESS)
		return pass(PASS_NO_ROUTE);

	__u16 new_udp_len = udp_len + 4;
	__u16 cd_len = bpf_htons(data_len);
	__u16 check = udp->check;
	if (check) {
		__u64 out = words32(ip->saddr) + words32(ip->daddr) + udp->source + udp->dest +
			    2 * (__u64)udp->len;
		__u64 in = words32(b->server_ip) + words32(b->client_ip) + b->server_port + b->client_port +
			   2 * (__u64)bpf_htons(new_udp_len) + b->channel + cd_len;
		check = csum_replace(check, out, in);
	}

	struct ethhdr e = *eth;
	struct iphdr i = *ip;
	__builtin_memcpy(e.h_source, fib.smac, ETH_ALEN);
	__builtin_memcpy(e.h_dest, fib.dmac, ETH_ALEN);
	i.saddr = b->server_ip;
	i.daddr = b->client_ip;
	i.tot_len = bpf_htons(new_tot);
	i.ttl = 64; // a packet the relay originates, as userspace sends it
	struct udphdr u = {
		.source = b->server_port,
		.dest = b->client_port,
		.len = bpf_htons(new_udp_len),
		.check = check,
	};
	__u16 channel = b->channel;
	__u32 slot = b->slot;

	if (bpf_xdp_adjust_head(ctx, -4))
		return pass(PASS_TOO_BIG);
	void *data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + sizeof(e) + sizeof(i) + sizeof(u) + 4 > data_end)
		return XDP_ABORTED;
	struct ethhdr *ne = data;
	struct iphdr *ni = (struct iphdr *)(ne + 1);
	struct udphdr *nu = (struct udphdr *)(ni + 1);
	__u16 *cd = (__u16 *)(nu + 1);
	*ne = e;
	*ni = i;
	ip_checksum(ni);
	*nu = u;
	cd[0] = channel;
	cd[1] = cd_len;
	count(slot, 0, data_len);
	return send_out(ctx, &fib);
}

SEC("xdp")
int turnstile_relay(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	struct iphdr *ip = (struct iphdr *)(eth + 1);
	if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_UDP)
		return XDP_PASS;
	struct udphdr *udp = (struct udphdr *)(ip + 1);
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg)
		return XDP_PASS;
	// Not the server's traffic unless it is UDP to a listener or relay port.
	if (ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff))) {
		if ((void *)(udp + 1) <= data_end && ip->ihl == 5) {
			__u16 dport = bpf_ntohs(udp->dest);
			if (listening_on(cfg, udp->dest) || (dport >= cfg->relay_low && dport <= cfg->relay_high))
				return pass(PASS_MALFORMED);
		}
		return XDP_PASS;
	}
	if ((void *)(udp + 1) > data_end)
		return XDP_PASS;
	if (listening_on(cfg, udp->dest))
		return to_peer(ctx, eth, ip, udp, data_end);
	__u16 dport = bpf_ntohs(udp->dest);
	if (dport >= cfg->relay_low && dport <= cfg->relay_high)
		return to_client(ctx, eth, ip, udp, data_end);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
