#!/usr/bin/env python3
"""Markdown tables from compare.sh results (JSON lines)."""
import json
import sys
from collections import defaultdict

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = defaultdict(dict)
servers = []
for r in rows:
    if r.get("error"):
        continue
    key = (r["allocations"], r["size"], r["target_pps"])
    by[key][r["server"]] = r
    if r["server"] not in servers:
        servers.append(r["server"])

def cell(r):
    if r is None:
        return "—"
    cpu = r.get("server_cpu_us_per_packet")
    cpu = f"{cpu:.2f} µs" if cpu is not None else "?"
    return (f"{cpu}, {r['relayed_pps']/1000:.0f}k pps, loss {100*(1-(r['client_received']/max(r['sent'],1))):.1f} %, "
            f"RTT {r['rtt_p50_us']:.0f}/{r['rtt_p99_us']:.0f} µs")

print("| allocations | bytes | load | " + " | ".join(servers) + " |")
print("|---|---|---|" + "---|" * len(servers))
for (k, size, rate), cells in sorted(by.items()):
    load = "max" if rate == 0 else f"{rate/1000:.0f}k pps"
    print(f"| {k} | {size} | {load} | " + " | ".join(cell(cells.get(s)) for s in servers) + " |")
print()
print("Each cell: server CPU per relayed packet (both legs), relayed packets/s, "
      "round-trip loss, RTT p50/p99.")
