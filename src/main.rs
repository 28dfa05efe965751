//! The `turnstile` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use turnstile::config::Config;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A high-performance TURN/STUN relay server.
///
/// Without --config, runs an embedded demo configuration: UDP and TCP on
/// 127.0.0.1:3478, a demo user, loopback only.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Configuration file (TOML), e.g. /etc/turnstile/turnstile.toml; may
    /// come before or after a subcommand.
    #[arg(short, long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file and exit (status 0 if valid).
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// List the running server's allocations (through its admin listener;
    /// uses the [admin] section of --config, default /etc/turnstile/turnstile.toml).
    Sessions {
        /// Print the admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete every allocation of a user on the running server.
    Kick {
        /// The username; a REST user is also matched by the name after its
        /// expiry (`phone-42` ends `1796528208:phone-42`).
        user: String,
        /// Only the user of this realm (with `[[realm]]` tables, the same
        /// name in another realm is another user); default: every realm.
        #[arg(long)]
        realm: Option<String>,
    },
    /// Refuse a user on every node of the fleet for a while and end its
    /// allocations (a REST user is matched by the name after its expiry).
    Revoke {
        user: String,
        /// How long, in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Only the user of this realm; default: every realm.
        #[arg(long)]
        realm: Option<String>,
    },
    /// Upgrade the running server to the binary now installed, keeping its
    /// allocations: signals it (SIGUSR2) through [server] pid_file or the
    /// admin API and waits until the new process serves. Exits non-zero if
    /// the old process kept serving instead.
    Upgrade,
    /// Print a turnstile.toml equivalent to a coturn turnserver.conf, with a
    /// note for each option that cannot be carried over.
    ImportCoturn {
        /// The coturn configuration, e.g. /etc/turnserver.conf.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(cmd @ (Command::Sessions { .. } | Command::Kick { .. } | Command::Revoke { .. })) = &cli.command {
        let path = cli
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from("/etc/turnstile/turnstile.toml"));
        let (method, target, body) = match cmd {
            Command::Kick { user, realm } => {
                let mut query = form_urlencoded::Serializer::new(String::new());
                query.append_pair("user", user);
                if let Some(r) = realm {
                    query.append_pair("realm", r);
                }
                ("DELETE", format!("/v1/allocations?{}", query.finish()), String::new())
            }
            Command::Revoke { user, ttl, realm } => (
                "POST",
                "/v1/revocations".to_owned(),
                serde_json::json!({ "user": user, "ttl": ttl, "realm": realm }).to_string(),
            ),
            _ => ("GET", "/v1/allocations".to_owned(), String::new()),
        };
        let table = matches!(cmd, Command::Sessions { json: false });
        return match Config::load(&path)
            .map_err(|e| e.to_string())
            .and_then(|c| admin_call(&c, method, &target, &body))
        {
            Ok(body) if table => match sessions_table(&body) {
                Some(t) => {
                    print!("{t}");
                    ExitCode::SUCCESS
                }
                None => {
                    println!("{body}");
                    ExitCode::SUCCESS
                }
            },
            Ok(body) => {
                println!("{body}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Upgrade) = &cli.command {
        let path = cli
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from("/etc/turnstile/turnstile.toml"));
        return match Config::load(&path)
            .map_err(|e| e.to_string())
            .and_then(|c| upgrade_command(&c))
        {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::ImportCoturn { file }) = &cli.command {
        return match std::fs::read_to_string(file) {
            Ok(text) => {
                let imported = turnstile::coturn_import::import(&text);
                print!("{}", imported.toml);
                for n in &imported.notes {
                    eprintln!("note: {n}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cannot read {}: {e}", file.display());
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::CheckConfig { file }) = &cli.command {
        return match Config::load(file).and_then(|c| match &c.tls {
            Some(t) => turnstile::io::tls::load_pair(&t.certificate, &t.private_key)
                .map(|_| c)
                .map_err(turnstile::config::ConfigError),
            None => Ok(c),
        }) {
            Ok(c) => {
                for w in c.warnings() {
                    eprintln!("warning: {w}");
                }
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    let (config, demo) = match &cli.config {
        Some(path) => match Config::load(path) {
            Ok(c) => (c, false),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        },
        None => (Config::demo(), true),
    };
    let log = turnstile::logging::init(&config.log.level, config.log.format);
    match run(config, demo, cli.config.clone(), log) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGHUP: re-read and validate the whole configuration, then apply it;
/// an invalid file is refused and the running configuration stays.
fn reload(path: Option<&std::path::Path>, started: &turnstile::io::Started, log: &LogHandle) {
    let Some(path) = path else {
        tracing::info!("SIGHUP: running the embedded configuration; reloading the TLS certificate only");
        if let Some(c) = &started.certificates {
            log_reload(c.reload());
        }
        return;
    };
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("configuration not reloaded, keeping the running one: {e}");
            return;
        }
    };
    if let Some(t) = &config.tls
        && let Err(e) = turnstile::io::tls::load_pair(&t.certificate, &t.private_key)
    {
        tracing::error!("configuration not reloaded, keeping the running one: {e}");
        return;
    }
    match started.reload(&config) {
        Ok(()) => {
            if let Ok(filter) = tracing_subscriber::EnvFilter::try_new(&config.log.level) {
                let _ = log.reload(filter);
            }
            tracing::info!("configuration reloaded from {}", path.display());
        }
        Err(e) => tracing::error!("configuration reloaded partly: {e}"),
    }
}

fn log_reload(result: Result<(), String>) {
    match result {
        Ok(()) => tracing::info!("TLS certificate reloaded; new handshakes use it"),
        Err(e) => tracing::error!("TLS certificate not reloaded, keeping the current one: {e}"),
    }
}

/// The admin API's allocation list as a table a person reads.
fn sessions_table(json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let list = v.get("allocations")?.as_array()?;
    let mut rows = vec![[
        "USER".to_owned(),
        "REALM".to_owned(),
        "CLIENT".to_owned(),
        "TRANSPORT".to_owned(),
        "RELAY".to_owned(),
        "AGE".to_owned(),
        "EXPIRES".to_owned(),
        "PERMS".to_owned(),
        "CHANNELS".to_owned(),
        "TO PEER".to_owned(),
        "TO CLIENT".to_owned(),
        "NODE".to_owned(),
    ]];
    // User names are whatever a client or a REST backend chose: escaped
    // before they reach a terminal.
    let text = |a: &serde_json::Value, k: &str| {
        let mut out = String::new();
        turnstile::logging::escape_into(a.get(k).and_then(|x| x.as_str()).unwrap_or(""), &mut out);
        out
    };
    let num = |a: &serde_json::Value, k: &str| a.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let bytes = |a: &serde_json::Value, k: &str| {
        let b = a
            .get(k)
            .and_then(|d| d.get("bytes"))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        match b {
            0..1_000 => format!("{b} B"),
            1_000..1_000_000 => format!("{:.1} kB", b as f64 / 1e3),
            1_000_000..1_000_000_000 => format!("{:.1} MB", b as f64 / 1e6),
            _ => format!("{:.1} GB", b as f64 / 1e9),
        }
    };
    for a in list {
        let relays: Vec<String> = a
            .get("relay")
            .and_then(|r| r.as_array())
            .map(|r| r.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        let transport = text(a, "transport")
            + if a.get("tcp_relay").and_then(serde_json::Value::as_bool) == Some(true) {
                " (tcp relay)"
            } else {
                ""
            };
        rows.push([
            text(a, "user"),
            text(a, "realm"),
            text(a, "client"),
            transport,
            relays.join(" "),
            format!("{}s", num(a, "age_seconds")),
            format!("{}s", num(a, "expires_in_seconds")),
            num(a, "permissions").to_string(),
            num(a, "channels").to_string(),
            bytes(a, "to_peer"),
            bytes(a, "to_client"),
            text(a, "node"),
        ]);
    }
    let widths: Vec<usize> = (0..11)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&format!("{} allocation(s)\n", list.len()));
    Some(out)
}

/// One request to the admin listener named by the configuration.
fn admin_call(config: &Config, method: &str, target: &str, body: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let admin = config
        .admin
        .as_ref()
        .ok_or("the configuration has no [admin] section")?;
    let mut s = std::net::TcpStream::connect(admin.listen).map_err(|e| format!("{}: {e}", admin.listen))?;
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let req = format!(
        "{method} {target} HTTP/1.1\r\nhost: turnstile\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        admin.token,
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    if head.starts_with("HTTP/1.1 200") {
        Ok(body.to_owned())
    } else {
        Err(format!("{head}\n{body}"))
    }
}

/// The running server's PID and failed upgrades so far, from the PID file
/// or the admin API.
fn running_server(config: &Config) -> Result<(u32, u64), String> {
    if let Some(path) = &config.server.pid_file {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let pid = text
            .trim()
            .parse()
            .map_err(|_| format!("{}: not a PID", path.display()))?;
        let failures = std::fs::read_to_string(upgrade_failures_file(path))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        return Ok((pid, failures));
    }
    if config.admin.is_some() {
        let body = admin_call(config, "GET", "/v1/status", "")?;
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        let pid = v
            .get("pid")
            .and_then(serde_json::Value::as_u64)
            .ok_or("status without pid")?;
        let failures = v
            .get("upgrade_failures")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        return Ok((pid as u32, failures));
    }
    Err("the configuration has neither [server] pid_file nor [admin]: cannot find the running server".into())
}

/// Beside the PID file: how many upgrades failed, so `turnstile upgrade`
/// learns of a failure without waiting out the timeout.
fn upgrade_failures_file(pid_file: &std::path::Path) -> PathBuf {
    let mut p = pid_file.as_os_str().to_owned();
    p.push(".upgrade-failures");
    PathBuf::from(p)
}

/// The PID file while this process is the server; removed at exit unless
/// a successor has written its own PID there.
struct PidFile(PathBuf);

impl PidFile {
    fn write(path: &std::path::Path) -> Option<PidFile> {
        match std::fs::write(path, format!("{}\n", std::process::id())) {
            Ok(()) => Some(PidFile(path.to_owned())),
            Err(e) => {
                tracing::warn!("pid_file {}: {e}", path.display());
                None
            }
        }
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if std::fs::read_to_string(&self.0).is_ok_and(|t| t.trim() == std::process::id().to_string()) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// `turnstile upgrade`: SIGUSR2 to the running server, then waits for a
/// new PID (success) or a failure count that grew (the old one serves on).
fn upgrade_command(config: &Config) -> Result<String, String> {
    let (old, failures) = running_server(config)?;
    if !alive(old) {
        return Err(format!("no process {old}: is turnstile running?"));
    }
    // SAFETY: sending a signal to a PID.
    if unsafe { libc::kill(old as libc::pid_t, libc::SIGUSR2) } != 0 {
        return Err(format!("cannot signal {old}: {}", std::io::Error::last_os_error()));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(config.server.upgrade_timeout + 10);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        match running_server(config) {
            Ok((pid, _)) if pid != old && alive(pid) => {
                return Ok(format!("upgraded: PID {old} handed over to PID {pid}"));
            }
            Ok((_, f)) if f > failures => {
                return Err(format!("upgrade failed: PID {old} serves on (its log says why)"));
            }
            _ => {}
        }
    }
    Err(format!(
        "upgrade did not finish in time: PID {old} serves on (its log says why)"
    ))
}

use turnstile::logging::LogHandle;

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    // Outside systemd NOTIFY_SOCKET is unset and this does nothing.
    let _ = sd_notify::notify(false, state);
}

fn run(config: Config, demo: bool, path: Option<PathBuf>, log: LogHandle) -> std::io::Result<()> {
    for w in config.warnings() {
        tracing::warn!("configuration: {w}");
    }
    if let Some(limit) = turnstile::ops::process_limits::raise_open_files() {
        // Each allocation holds a socket; near the limit Allocate is answered 508.
        tracing::info!(open_files = limit, "open file limit");
    }
    // Started by a live upgrade: the running process's sockets and state.
    let (channel, inheritance, mut inherited_http) = match turnstile::ops::upgrade::inherit()? {
        Some((c, i, h)) => {
            tracing::info!(from = h.from_pid, "upgrade: taking over from PID {}", h.from_pid);
            (Some(c), Some(i), Some(h))
        }
        None => (None, None, None),
    };
    let mut take_http = |pick: fn(
        &mut turnstile::ops::upgrade::InheritedHttp,
    ) -> &mut Option<(std::net::SocketAddr, std::net::TcpListener)>,
                         addr: std::net::SocketAddr|
     -> std::io::Result<std::net::TcpListener> {
        match inherited_http.as_mut().and_then(|h| pick(h).take()) {
            Some((was, l)) if was == addr => Ok(l),
            _ => turnstile::ops::http::bind(addr),
        }
    };
    let metrics = match &config.metrics {
        Some(m) => {
            let handle = turnstile::ops::metrics_http::install_recorder()?;
            let listener = take_http(|h| &mut h.metrics, m.listen)?;
            tracing::info!("metrics listening on http://{}/metrics", listener.local_addr()?);
            Some((listener, handle))
        }
        None => None,
    };
    let admin = match &config.admin {
        Some(a) => {
            let listener = take_http(|h| &mut h.admin, a.listen)?;
            tracing::info!("admin listening on http://{}", listener.local_addr()?);
            Some((listener, a.clone()))
        }
        None => None,
    };
    let mut services = Vec::new();
    if let Some((listener, _)) = &metrics {
        services.push(listener.local_addr()?);
    }
    if let Some((listener, _)) = &admin {
        services.push(listener.local_addr()?);
    }
    let from_pid = inherited_http.as_ref().map(|h| h.from_pid);
    let started = std::rc::Rc::new(turnstile::io::start_with(&config, &services, inheritance)?);
    // A successor of a live upgrade runs as its predecessor did (already
    // switched, if it was told to).
    if let (Some(user), None) = (&config.user, &channel) {
        turnstile::ops::privileges::drop_to(user, config.group.as_deref())?;
    }
    // Duplicates of the HTTP listeners, for the next live upgrade.
    let http_listeners = turnstile::ops::upgrade::HttpListeners {
        metrics: match (&config.metrics, &metrics) {
            (Some(m), Some((l, _))) => Some((m.listen, l.try_clone()?.into())),
            _ => None,
        },
        admin: match (&config.admin, &admin) {
            (Some(a), Some((l, _))) => Some((a.listen, l.try_clone()?.into())),
            _ => None,
        },
    };
    let invocation = turnstile::ops::upgrade::Invocation::current();
    let upgrade_failures = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    if demo {
        tracing::warn!(
            "running the embedded demo configuration: loopback only, demo user alice/secret, \
             loopback peers allowed; pass --config FILE for anything else"
        );
        let mut urls: Vec<String> = Vec::new();
        if let Some(a) = started.udp.first() {
            urls.push(format!("stun:{a}"));
            urls.push(format!("turn:{a}?transport=udp"));
        }
        if let Some(a) = started.tcp.first() {
            urls.push(format!("turn:{a}?transport=tcp"));
        }
        let urls: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
        println!(
            "{{\"iceServers\":[{{\"urls\":[{}],\"username\":\"alice\",\"credential\":\"secret\"}}]}}",
            urls.join(",")
        );
    }
    // Readiness for /readyz: listeners are up; false once draining.
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    // This node's name in a fleet's store and admin view: where it listens,
    // and its process.
    let node = format!(
        "{}/{}",
        started.udp.first().map(|a| a.to_string()).unwrap_or_default(),
        std::process::id()
    );
    // Where clients reach this node, for the other nodes' 300 Try Alternate.
    let address = started.udp.first().map(|a| {
        if a.ip().is_unspecified() {
            std::net::SocketAddr::new(config.relay.external_address.unwrap_or(config.relay.address), a.port())
        } else {
            *a
        }
    });
    let fleet = std::rc::Rc::new(turnstile::ops::fleet::Fleet::new(node, address, started.clone()));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        // The HTTP listeners and the store, stopped once a live upgrade
        // handed them over.
        let mut side_tasks: Vec<tokio::task::AbortHandle> = Vec::new();
        if let Some((listener, handle)) = metrics {
            let ready = ready.clone();
            let quotas = started.quotas.clone();
            // Ready: listeners up, not draining, room for another allocation.
            let handler = move |req: turnstile::ops::http::Request| {
                let ready = ready.load(std::sync::atomic::Ordering::Relaxed) && quotas.has_capacity();
                if req.path == "/metrics" {
                    turnstile::ops::metrics_http::export_realms(&quotas);
                }
                turnstile::ops::metrics_http::handle(&handle, &req, ready)
            };
            side_tasks.push(tokio::task::spawn_local(turnstile::ops::http::serve(listener, handler)).abort_handle());
        }
        if let Some((listener, a)) = admin {
            let fallback = config.relay.external_address.unwrap_or(config.relay.address);
            // Each realm's credentials come with the listeners serving it;
            // a realm only an ORIGIN selects is reached on the default's.
            let tables = config.realm_tables();
            let default = started.listeners_of(&config.realm, true);
            let mut api = turnstile::ops::admin::CredentialApi::new(
                a.token.clone(),
                tables.first().and_then(|t| t.secrets.first().cloned()),
                (&default.0, &default.1, &default.2),
                a.public_host.as_deref(),
                fallback,
            )
            .default_realm(&config.realm);
            for t in tables.iter().skip(1) {
                let own = started.listeners_of(&t.name, false);
                let l = if own.0.is_empty() && own.1.is_empty() && own.2.is_empty() {
                    &default
                } else {
                    &own
                };
                api = api.with_realm(
                    &t.name,
                    t.secrets.first().cloned(),
                    (&l.0, &l.1, &l.2),
                    a.public_host.as_deref(),
                    fallback,
                );
            }
            let admin = turnstile::ops::admin::AdminApi {
                credentials: api,
                started: started.clone(),
                fleet: fleet.clone(),
                upgrade_failures: upgrade_failures.clone(),
            };
            let handler = move |req: turnstile::ops::http::Request| admin.handle(&req);
            side_tasks.push(tokio::task::spawn_local(turnstile::ops::http::serve(listener, handler)).abort_handle());
        }
        if let Some(store) = &config.store {
            side_tasks.push(
                tokio::task::spawn_local(turnstile::ops::store::follow(
                    store.clone(),
                    config.realm.clone(),
                    fleet.clone(),
                    started.clone(),
                ))
                .abort_handle(),
            );
        }
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        // Certificate files are also watched, for renewals that do not signal.
        let mut poll = tokio::time::interval(std::time::Duration::from_secs(5));
        let mut watchdog_usec = 0u64;
        let mut watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec);
        // A live upgrade's new process: WATCHDOG_PID named the old one (and
        // was left out of this environment); it is watched once it is the
        // main process.
        if let (false, Some(_), Some(usec)) = (
            watchdog,
            &channel,
            std::env::var("WATCHDOG_USEC").ok().and_then(|u| u.parse::<u64>().ok()),
        ) {
            watchdog_usec = usec;
            watchdog = true;
        }
        let mut watchdog_tick = tokio::time::interval(std::time::Duration::from_micros((watchdog_usec / 2).max(1_000_000)));
        let certs = started.certificates.clone();
        let mut usr2 = signal(SignalKind::user_defined2())?;
        if let Some(channel) = &channel {
            // Restored and waiting: the running process lets go, then this
            // one serves (and systemd follows it as the main process).
            channel.ready()?;
            channel.set_timeout(std::time::Duration::from_secs(config.server.upgrade_timeout + 5))?;
            channel.wait_commit()?;
            started.serve();
            metrics::counter!("turnstile_upgrades_total", "result" => "taken_over").increment(1);
            notify(&[sd_notify::NotifyState::MainPid(std::process::id())]);
            tracing::info!(from = from_pid.unwrap_or(0), "upgrade: serving in place of the old process");
        }
        let _pid_file = config.server.pid_file.as_deref().and_then(PidFile::write);
        notify(&[sd_notify::NotifyState::Ready]);
        tracing::info!("ready");
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        // After a live upgrade: this process serves only the TCP and TLS
        // connections it kept, until they close or drain_timeout.
        let mut handed_over = false;
        loop {
            tokio::select! {
                _ = usr2.recv() => {
                    if handed_over || drain_deadline.is_some() {
                        tracing::warn!("SIGUSR2: already handed over or draining; no upgrade");
                        continue;
                    }
                    tracing::info!(program = %invocation.program.display(), allocations = started.quotas.total(), "SIGUSR2: live upgrade");
                    let timeout = std::time::Duration::from_secs(config.server.upgrade_timeout);
                    match turnstile::ops::upgrade::upgrade(&started, &invocation, &http_listeners, timeout) {
                        Ok(h) => {
                            // The main process is the new one now; this one
                            // stays only for the connections it kept.
                            notify(&[sd_notify::NotifyState::MainPid(h.pid)]);
                            for t in side_tasks.drain(..) {
                                t.abort();
                            }
                            ready.store(false, std::sync::atomic::Ordering::Relaxed);
                            handed_over = true;
                            tracing::info!(
                                pid = h.pid,
                                allocations = h.allocations,
                                frozen_ms = h.frozen.as_millis() as u64,
                                export_ms = h.phases.export.as_millis() as u64,
                                send_ms = h.phases.send.as_millis() as u64,
                                restore_ms = h.phases.restore.as_millis() as u64,
                                kept_allocations = started.quotas.total(),
                                kept_connections = started.open_connections(),
                                timeout = config.drain_timeout,
                                "upgrade: handed over; serving what could not move (TLS connections) until it closes"
                            );
                            drain_deadline = Some(tokio::time::Instant::now() + std::time::Duration::from_secs(config.drain_timeout));
                        }
                        Err(e) => {
                            metrics::counter!("turnstile_upgrades_total", "result" => "failed").increment(1);
                            let failures = upgrade_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                            if let Some(p) = &config.server.pid_file {
                                let _ = std::fs::write(upgrade_failures_file(p), format!("{failures}\n"));
                            }
                            tracing::error!("upgrade failed, serving on: {e}");
                        }
                    }
                }
                _ = term.recv() => {
                    if drain_deadline.is_some() {
                        tracing::info!("second SIGTERM: exiting now");
                        return Ok(());
                    }
                    // Drain: no new allocations, existing ones relay until they end or the timeout.
                    notify(&[sd_notify::NotifyState::Stopping]);
                    ready.store(false, std::sync::atomic::Ordering::Relaxed);
                    started.drain(config.alternate_server);
                    tracing::info!(
                        allocations = started.quotas.total(),
                        timeout = config.drain_timeout,
                        "SIGTERM: draining; a second SIGTERM exits at once"
                    );
                    drain_deadline = Some(tokio::time::Instant::now() + std::time::Duration::from_secs(config.drain_timeout));
                }
                _ = tokio::signal::ctrl_c() => {
                    tracing::info!("SIGINT: exiting");
                    return Ok(());
                }
                _ = hup.recv() => {
                    if handed_over {
                        tracing::info!("SIGHUP: handed over to the new process, which reloads on its own SIGHUP");
                        continue;
                    }
                    notify(&[sd_notify::NotifyState::Reloading]);
                    reload(path.as_deref(), &started, &log);
                    notify(&[sd_notify::NotifyState::Ready]);
                }
                _ = poll.tick() => {
                    fleet.tick();
                    if let Some(result) = certs.as_ref().and_then(|c| c.reload_if_changed()) {
                        log_reload(result);
                    }
                }
                // Once handed over, the new process answers the watchdog.
                _ = watchdog_tick.tick(), if watchdog && !handed_over => notify(&[sd_notify::NotifyState::Watchdog]),
                _ = tokio::time::sleep(std::time::Duration::from_millis(250)), if drain_deadline.is_some() => {
                    let remaining = started.quotas.total();
                    if handed_over && remaining == 0 && started.open_connections() == 0 {
                        tracing::info!("handed over: no connections left; exiting");
                        return Ok(());
                    }
                    if remaining == 0 && !handed_over {
                        tracing::info!("drained: no allocations left; exiting");
                        return Ok(());
                    }
                    if drain_deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                        // What the exit cuts off, by client transport.
                        let open = started.allocations();
                        let count = |t: &str| open.iter().filter(|a| a.transport == t).count();
                        tracing::warn!(
                            allocations = remaining,
                            udp = count("udp"),
                            tcp = count("tcp"),
                            tls = count("tls"),
                            users = open.iter().map(|a| a.user.as_str()).collect::<std::collections::BTreeSet<_>>().len(),
                            "drain timeout: exiting with allocations still open"
                        );
                        return Ok(());
                    }
                }
            }
        }
    })
}
