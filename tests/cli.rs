//! The command line an operator uses: import-coturn on Debian's own
//! turnserver.conf (from the coturn package) gives a file check-config accepts.

use std::process::Command;

#[test]
fn import_coturn_on_debians_turnserver_conf() {
    let debian = std::path::Path::new("/etc/turnserver.conf");
    assert!(
        debian.exists(),
        "Debian's coturn package (installed by .ci/run) ships /etc/turnserver.conf"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .arg("import-coturn")
        .arg(debian)
        .output()
        .unwrap();
    assert!(out.status.success());
    let notes = String::from_utf8_lossy(&out.stderr);
    assert!(notes.contains("realm"), "the missing realm is pointed out:\n{notes}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("imported.toml");
    std::fs::write(&file, &out.stdout).unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&check.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn help_names_every_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["--config", "check-config", "import-coturn"] {
        assert!(text.contains(word), "{word} missing from --help:\n{text}");
    }
}

#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/turnstile.service")).unwrap();
    for directive in [
        "Type=notify",
        "ExecReload=",
        "WatchdogSec=",
        "User=turnstile",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(directive), "{directive} missing");
    }
    // Verify it as installed, with the binary path pointing at the one just built.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("turnstile.service");
    std::fs::write(
        &file,
        unit.replace("/usr/bin/turnstile", env!("CARGO_BIN_EXE_turnstile")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&file)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .expect("systemd-analyze (Debian package systemd) must be installed");
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("turnstile.service:"), "{text}");
}

/// The `--help` of the command and of every subcommand, as shipped in
/// docs/COMMANDS.txt (the package's /usr/share/doc/turnstile/COMMANDS.txt).
fn commands_text() -> String {
    let mut out = String::from("turnstile: every command's --help\n\n");
    for sub in [
        None,
        Some("check-config"),
        Some("sessions"),
        Some("kick"),
        Some("revoke"),
        Some("upgrade"),
        Some("import-coturn"),
    ] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_turnstile"));
        if let Some(s) = sub {
            c.arg(s);
        }
        let text = c.arg("--help").output().unwrap().stdout;
        out.push_str(&format!(
            "$ turnstile {}--help\n",
            sub.map(|s| format!("{s} ")).unwrap_or_default()
        ));
        out.push_str(&String::from_utf8_lossy(&text));
        out.push('\n');
    }
    out
}

#[test]
fn the_shipped_command_reference_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/COMMANDS.txt");
    let now = commands_text();
    if std::env::var_os("TURNSTILE_BLESS").is_some() {
        std::fs::write(path, &now).unwrap();
    }
    let shipped = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        shipped == now,
        "docs/COMMANDS.txt is out of date: rerun with TURNSTILE_BLESS=1 cargo test --test cli"
    );
}
