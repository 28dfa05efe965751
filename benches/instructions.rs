//! Instruction counts for the hot paths, under callgrind: numbers that hold
//! on a noisy 2-core machine, where wall-clock benches wander.
//!
//! `cargo bench --bench instructions` runs every scenario twice under
//! `valgrind --tool=callgrind` (setup only, then setup plus N iterations)
//! and reports (Ir(N) − Ir(0)) / N: instructions per packet, setup cancelled
//! out. Needs valgrind (Debian package `valgrind`). Under `cargo test` each
//! scenario runs a few iterations natively as a smoke test.

mod support;

use std::hint::black_box;
use std::net::SocketAddr;
use std::process::Command;

use turnstile::proto::channel_data;
use turnstile::proto::server::{ClientOutcome, PEER_HEADROOM, PEER_TAILROOM, PeerOutcome, RelayId};
use turnstile::proto::stun::Message;
use turnstile::proto::stun::Method;

use support::{Setup, request, setup};

const SCENARIOS: &[(&str, &str)] = &[
    (
        "client_channel_data",
        "ChannelData from the client → forward decision (160-byte payload)",
    ),
    (
        "peer_to_channel_data",
        "peer datagram → ChannelData header written in place",
    ),
    (
        "peer_to_data_indication",
        "peer datagram → Data indication written in place",
    ),
    (
        "parse_allocate",
        "parse a signed Allocate request and read its attributes",
    ),
    (
        "verify_integrity",
        "MESSAGE-INTEGRITY (HMAC-SHA1) check of that request",
    ),
];

const ITERATIONS: u64 = 20_000;

fn run_scenario(name: &str, iterations: u64) {
    let channel_peer: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let plain_peer: SocketAddr = "198.51.100.8:40000".parse().unwrap();
    let Setup {
        mut server,
        now,
        key,
        nonce,
    } = setup(channel_peer, plain_peer);
    let mut out = vec![0u8; 1500];
    let mut cd = channel_data::header(0x4001, 160).to_vec();
    cd.resize(164, 0x55);
    let mut buf = vec![0u8; PEER_HEADROOM + 1500 + PEER_TAILROOM];
    let lt = turnstile::proto::auth::LongTermKey::derive(
        turnstile::proto::auth::PasswordAlgorithm::Md5,
        "alice",
        "bench",
        "secret",
    );
    let allocate = request(Method::ALLOCATE, 9, &nonce, &lt, |w| {
        w.requested_transport(17).unwrap();
        w.lifetime(600).unwrap();
    });
    let mac = lt.hmac_sha1();
    match name {
        "client_channel_data" => {
            for _ in 0..iterations {
                let r = server.handle_client_packet(now, key, black_box(&cd), &mut out);
                assert!(matches!(r, ClientOutcome::Forward { .. }));
            }
        }
        "peer_to_channel_data" | "peer_to_data_indication" => {
            let peer = if name == "peer_to_channel_data" {
                channel_peer
            } else {
                plain_peer
            };
            for _ in 0..iterations {
                let r =
                    server.handle_peer_packet(now.instant, RelayId(0), black_box(peer), &mut buf, PEER_HEADROOM, 160);
                assert!(matches!(r, PeerOutcome::ToClient { .. }));
            }
        }
        "parse_allocate" => {
            for _ in 0..iterations {
                let m = Message::parse(black_box(&allocate)).unwrap();
                let fields = (
                    m.username().unwrap(),
                    m.realm().unwrap(),
                    m.nonce().unwrap(),
                    m.requested_transport().unwrap(),
                    m.lifetime().unwrap(),
                );
                black_box(fields);
            }
        }
        "verify_integrity" => {
            let m = Message::parse(&allocate).unwrap();
            for _ in 0..iterations {
                black_box(m.verify_integrity_with(mac.clone())).unwrap();
            }
        }
        other => panic!("unknown scenario {other}"),
    }
}

/// Total instructions callgrind counted for one child run.
fn callgrind_total(name: &str, iterations: u64) -> Result<u64, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = std::env::var("CARGO_TARGET_TMPDIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let file = dir.join(format!("callgrind.{name}.{iterations}.out"));
    let status = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", file.display()))
        .arg(&exe)
        .args(["--child", name, &iterations.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("cannot run valgrind ({e}); install the Debian package valgrind"))?;
    if !status.success() {
        return Err(format!("callgrind run of {name} failed: {status}"));
    }
    let text = std::fs::read_to_string(&file).map_err(|e| e.to_string())?;
    text.lines()
        .find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no totals in {}", file.display()))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let name = &args[i + 1];
        let n: u64 = args[i + 2].parse().unwrap();
        run_scenario(name, n);
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets`: make sure every scenario still runs.
        for (name, _) in SCENARIOS {
            run_scenario(name, 10);
        }
        return;
    }
    let filter = args.iter().skip(1).find(|a| !a.starts_with("--"));
    println!("| scenario | instructions per iteration |");
    println!("|---|---|");
    for (name, what) in SCENARIOS {
        if filter.is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let per = callgrind_total(name, 0)
            .and_then(|base| Ok((callgrind_total(name, ITERATIONS)? - base) as f64 / ITERATIONS as f64));
        match per {
            Ok(per) => println!("| {what} | {per:.0} |"),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
    }
}
