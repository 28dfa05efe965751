//! Starts the real `turnstile` binary on loopback with ephemeral ports and
//! tears it down when dropped.
#![allow(dead_code)]

pub mod raw;
pub mod uclient;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct TestServer {
    child: Child,
    pub udp: Vec<SocketAddr>,
    pub tcp: Vec<SocketAddr>,
    pub tls: Vec<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    _dir: tempfile::TempDir,
    log: mpsc::Receiver<String>,
}

pub struct Cert {
    pub pem: String,
    pub key: String,
    pub der: Vec<u8>,
}

/// A self-signed certificate for localhost and 127.0.0.1 (PEM, key, DER).
pub fn cert() -> Cert {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    Cert {
        pem: c.cert.pem(),
        key: c.signing_key.serialize_pem(),
        der: c.cert.der().to_vec(),
    }
}

/// Writes `cert.pem` and `key.pem` into `dir`.
pub fn write_cert(dir: &std::path::Path, c: &Cert) {
    std::fs::write(dir.join("cert.pem"), &c.pem).unwrap();
    std::fs::write(dir.join("key.pem"), &c.key).unwrap();
}

/// A configuration for tests: loopback, ephemeral ports, metrics on.
pub fn loopback_config(extra: &str) -> String {
    loopback_config_on("127.0.0.1:0", extra)
}

/// The same with the UDP listener on `udp`.
pub fn loopback_config_on(udp: &str, extra: &str) -> String {
    format!(
        r#"realm = "test.local"
workers = 2

[[listen]]
transport = "udp"
address = "{udp}"

[metrics]
listen = "127.0.0.1:0"

{extra}
"#
    )
}

impl TestServer {
    pub fn start(config: &str) -> TestServer {
        TestServer::start_with_env(config, &[])
    }

    /// Starts with extra environment variables (e.g. NOTIFY_SOCKET).
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> TestServer {
        TestServer::start_limited(config, env, None)
    }

    /// Starts with at most `fd_limit` open files (soft and hard limit).
    pub fn start_with_fd_limit(config: &str, fd_limit: u64) -> TestServer {
        TestServer::start_limited(config, &[], Some(fd_limit))
    }

    fn start_limited(config: &str, env: &[(&str, &str)], fd_limit: Option<u64>) -> TestServer {
        TestServer::start_program(None, config, env, fd_limit)
    }

    /// Starts a copy of the binary placed in the server's own directory
    /// (`program()`), as a package installs it: a live upgrade starts
    /// whatever is at that path then. `{dir}` in the configuration is that
    /// directory.
    pub fn start_copy(config: &str) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("turnstile");
        std::fs::copy(env!("CARGO_BIN_EXE_turnstile"), &program).unwrap();
        TestServer::start_in(dir, Some(program), config, &[], None)
    }

    fn start_program(
        program: Option<std::path::PathBuf>,
        config: &str,
        env: &[(&str, &str)],
        fd_limit: Option<u64>,
    ) -> TestServer {
        TestServer::start_in(tempfile::tempdir().unwrap(), program, config, env, fd_limit)
    }

    fn start_in(
        dir: tempfile::TempDir,
        program: Option<std::path::PathBuf>,
        config: &str,
        env: &[(&str, &str)],
        fd_limit: Option<u64>,
    ) -> TestServer {
        let config = config.replace("{dir}", &dir.path().display().to_string());
        let config = config.as_str();
        let path = dir.path().join("turnstile.toml");
        std::fs::write(&path, config).unwrap();
        let program = program.unwrap_or_else(|| env!("CARGO_BIN_EXE_turnstile").into());
        let mut command = Command::new(program);
        command
            .arg("--config")
            .arg(&path)
            .envs(env.iter().copied())
            .env("TURNSTILE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(limit) = fd_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; it only touches the child.
            unsafe {
                command.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[turnstile] {line}");
                if tx.send(line).is_err() {
                    // Keep draining so the server never blocks on a full pipe.
                }
            }
        });
        let mut server = TestServer {
            child,
            udp: Vec::new(),
            tcp: Vec::new(),
            tls: Vec::new(),
            metrics: None,
            admin: None,
            _dir: dir,
            log,
        };
        let wants_metrics = config.contains("[metrics]");
        let count = |t: &str| config.matches(&format!("transport = \"{t}\"")).count();
        let (udp, tcp, tls) = (count("udp"), count("tcp"), count("tls"));
        let deadline = Instant::now() + Duration::from_secs(20);
        let wants_admin = config.contains("[admin]");
        while server.udp.len() < udp
            || (wants_admin && server.admin.is_none())
            || server.tcp.len() < tcp
            || server.tls.len() < tls
            || (wants_metrics && server.metrics.is_none())
        {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = server
                .log
                .recv_timeout(left)
                .expect("turnstile did not report its listeners in time");
            // An address runs to the first character no address has (the
            // line may be JSON).
            let addr = |rest: &str| -> SocketAddr {
                let end = rest
                    .find(|c: char| !(c.is_ascii_hexdigit() || ".:[]".contains(c)))
                    .unwrap_or(rest.len());
                rest[..end].parse().unwrap()
            };
            if let Some(a) = line.split("listening udp ").nth(1) {
                server.udp.push(addr(a));
            }
            if let Some(a) = line.split("listening tcp ").nth(1) {
                server.tcp.push(addr(a));
            }
            if let Some(a) = line.split("listening tls ").nth(1) {
                server.tls.push(addr(a));
            }
            if let Some(a) = line.split("admin listening on http://").nth(1) {
                server.admin = Some(addr(a));
            }
            if let Some(a) = line.split("metrics listening on http://").nth(1) {
                server.metrics = Some(addr(a));
            }
        }
        server
    }

    /// Sends an HTTP request to the admin listener; returns (status, body).
    pub fn admin_request(&self, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
        let addr = self.admin.expect("admin listener configured");
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let auth = token
            .map(|t| format!("authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let status = resp.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        (status, body)
    }

    /// Fetches the Prometheus text.
    pub fn scrape(&self) -> String {
        let addr = self.metrics.expect("metrics listener configured");
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        body
    }

    /// The value of a counter line that starts with `series` (name and labels).
    pub fn counter(&self, series: &str) -> f64 {
        self.scrape()
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

impl TestServer {
    /// The configuration file the server was started with (rewrite it, then
    /// send HUP, to test reloads).
    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.path().join("turnstile.toml")
    }

    /// GET on the metrics listener; returns (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let addr = self.metrics.expect("metrics listener configured");
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let status = resp.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (status, resp.split("\r\n\r\n").nth(1).unwrap_or("").to_owned())
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the server process (e.g. "HUP").
    pub fn signal(&self, name: &str) {
        let st = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Waits for a log line containing `needle` and returns what follows it.
    pub fn wait_log_after(&self, needle: &str) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok(line) = self
            .log
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if let Some(rest) = line.split(needle).nth(1) {
                return Some(rest.trim().to_owned());
            }
        }
        None
    }

    /// Waits for a log line containing `needle` and returns all of it.
    pub fn wait_line(&self, needle: &str) -> Option<String> {
        self.wait_line_for(needle, Duration::from_secs(10))
    }

    /// Like `wait_line`, waiting at most `limit`.
    pub fn wait_line_for(&self, needle: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        while let Ok(line) = self
            .log
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if line.contains(needle) {
                return Some(line);
            }
        }
        None
    }

    /// Waits until a log line containing `needle` appears (up to 10 s).
    pub fn wait_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok(line) = self
            .log
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if line.contains(needle) {
                return true;
            }
        }
        false
    }

    /// Waits (up to 5 s) for a counter to reach `min`: workers export their
    /// counters once a second.
    pub fn wait_counter(&self, series: &str, min: f64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if self.counter(series) >= min {
                return true;
            }
            if Instant::now() > deadline {
                eprintln!("{series} stayed below {min}:\n{}", self.scrape());
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl TestServer {
    /// The directory the server runs from (its configuration, a copied binary, its PID file).
    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// The PID a live upgrade's successor wrote into `{dir}/turnstile.pid`.
    pub fn pid_file(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir().join("turnstile.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Whether the first process (the one this started) is still running.
    pub fn first_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A successor started by a live upgrade is not our child: its PID is in the PID file.
        if let Some(pid) = self.pid_file()
            && pid != self.child.id()
        {
            // SAFETY: signalling a PID.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// A UDP client socket on loopback with a receive timeout.
pub fn udp_client() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// A port P with P and P + 1 free on 127.0.0.1 and 127.0.0.2: RFC 5780's
/// four sockets (A:P, B:P, A:P+1, B:P+1).
pub fn free_port_pair() -> u16 {
    for _ in 0..50 {
        let p = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if p == u16::MAX {
            continue;
        }
        let free = ["127.0.0.1", "127.0.0.2"]
            .iter()
            .all(|ip| [p, p + 1].iter().all(|port| UdpSocket::bind((*ip, *port)).is_ok()));
        if free {
            return p;
        }
    }
    panic!("no free port pair");
}

/// A configuration with a UDP listener on 127.0.0.1:`port`, metrics, and
/// `[stun] rfc5780` (alternate address 127.0.0.2) on or off.
pub fn rfc5780_config(port: u16, on: bool) -> String {
    loopback_config_on(
        &format!("127.0.0.1:{port}"),
        &format!(
            r#"[relay]
address = "127.0.0.1"
ports = "62000-62199"

[auth]
users = {{ alice = "secret" }}

[stun]
rfc5780 = {on}
alternate_address = "127.0.0.2"
"#
        ),
    )
}

/// A rustls client configuration that trusts the test certificate `der`.
pub fn tls_client_config(der: &[u8]) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(der.to_vec()))
        .unwrap();
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    std::sync::Arc::new(config)
}
