//! What coturn's turnutils_uclient reported, read from its output.

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
