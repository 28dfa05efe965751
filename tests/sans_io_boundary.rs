//! The protocol core under `src/proto/` must stay sans-IO: no runtime, no
//! sockets, no clock. Time is a parameter. This test stands in for a crate
//! boundary.

use std::path::{Path, PathBuf};

/// Code (not comments) that would tie the core to IO or to the wall clock.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "mio::",
    "quinn_udp",
    "socket2",
    "UdpSocket",
    "TcpStream",
    "TcpListener",
    "std::net::Udp",
    "std::net::Tcp",
    "std::os::fd",
    "Instant::now",
    "SystemTime::now",
    "UNIX_EPOCH.elapsed",
    "std::thread::sleep",
    "std::fs",
    "std::process",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Returns "file:line: token" for each forbidden use in `source`.
fn violations(name: &str, source: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (n, line) in source.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        for token in FORBIDDEN {
            if code.contains(token) {
                found.push(format!("{name}:{}: {token}", n + 1));
            }
        }
    }
    found
}

#[test]
fn proto_uses_no_io_and_no_clock() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/proto");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() >= 10, "expected the protocol core under {}", root.display());
    let mut all = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        all.extend(violations(&f.display().to_string(), &text));
    }
    assert!(all.is_empty(), "src/proto must stay sans-IO:\n{}", all.join("\n"));
}

#[test]
fn the_scanner_catches_what_it_looks_for() {
    let bad = "use tokio::net::UdpSocket;\nlet t = std::time::Instant::now();\n// tokio in a comment is fine\n";
    let v = violations("x.rs", bad);
    assert_eq!(v.len(), 3, "{v:?}");
    assert!(v[0].starts_with("x.rs:1"));
    assert!(v[2].contains("Instant::now"));
}
