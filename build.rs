//! With the `xdp` feature, compiles the kernel fast path (C, clang
//! `-target bpf`); the stable Rust toolchain cannot build eBPF. Without it,
//! nothing: a plain `cargo build` needs no clang.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const SOURCE: &str = "src/io/xdp/relay.bpf.c";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-env-changed=CLANG");
    if env::var_os("CARGO_FEATURE_XDP").is_none() {
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("relay.bpf.o");
    // Debian keeps asm/types.h under the multiarch include directory.
    let multiarch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64-linux-gnu",
        _ => "x86_64-linux-gnu",
    };
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .args(["-c", SOURCE, "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed to build {SOURCE} ({s})"),
        Err(e) => panic!(
            "the xdp feature needs clang and libbpf-dev to build {SOURCE} \
             (apt-get install clang libbpf-dev): {clang}: {e}"
        ),
    }
}
