//! coturn's test tools as the tests drive them: what turnutils_uclient
//! reported, read from its output, and turnutils_peer as an echo peer.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// coturn's echo peer (turnutils_peer) on a free port, stopped when dropped.
pub struct EchoPeer {
    child: Child,
    pub port: u16,
}

impl EchoPeer {
    pub fn start() -> EchoPeer {
        EchoPeer::start_on("127.0.0.1")
    }

    pub fn start_on(ip: &str) -> EchoPeer {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let child = Command::new("turnutils_peer")
            .args(["-p", &port.to_string(), "-L", ip])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("turnutils_peer (Debian package coturn) must be installed");
        std::thread::sleep(Duration::from_millis(300));
        EchoPeer { child, port }
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The totals of one uclient run.
#[derive(Debug)]
pub struct Report {
    pub sent: u64,
    pub received: u64,
    pub lost: Option<u64>,
    pub output: String,
}

/// Reads the last totals uclient printed.
pub fn parse_report(output: String) -> Report {
    let number_after = |needle: &str| -> Option<u64> {
        let line = output.lines().rev().find(|l| l.contains(needle))?;
        let rest = line.split(needle).nth(1)?;
        rest.trim_start_matches(['=', ' '])
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    Report {
        sent: number_after("tot_send_msgs=").unwrap_or(0),
        received: number_after("tot_recv_msgs=").unwrap_or(0),
        lost: number_after("Total lost packets "),
        output,
    }
}

/// Runs turnutils_uclient with these arguments (for at most 60 s) and
/// reads its report.
pub fn run(args: &[&str]) -> Report {
    let out = Command::new("timeout")
        .arg("60")
        .arg("turnutils_uclient")
        .args(args)
        .output()
        .expect("turnutils_uclient (Debian package coturn) must be installed");
    parse_report(String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
}

/// Like [`run`], in a thread of its own, to act on the server meanwhile.
pub fn spawn(args: &[&str]) -> std::thread::JoinHandle<Report> {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    std::thread::spawn(move || run(&args.iter().map(String::as_str).collect::<Vec<_>>()))
}

/// coturn's client as alice (password "secret") through the server's
/// `port` on 127.0.0.1 to the echo peer on 127.0.0.1:`peer_port`, with
/// these further flags.
pub fn as_alice(port: u16, peer_port: u16, flags: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["-u", "alice", "-w", "secret", "-e", "127.0.0.1", "-r"]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
    args.extend([peer_port.to_string(), "-p".into(), port.to_string()]);
    args.extend(flags.iter().map(|f| (*f).to_owned()));
    args.push("127.0.0.1".into());
    args
}

/// [`run`] with owned arguments (as [`as_alice`] makes them).
pub fn run_args(args: &[String]) -> Report {
    run(&args.iter().map(String::as_str).collect::<Vec<_>>())
}
