//! Process limits a relay outgrows: every allocation holds a socket, so the
//! soft limit on open files (often 1024) is raised to the hard limit.

/// Raises RLIMIT_NOFILE's soft limit to its hard limit; returns the limit now in force.
pub fn raise_open_files() -> Option<u64> {
    // SAFETY: getrlimit/setrlimit read and write a live struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return Some(raised.rlim_cur);
            }
        }
        Some(lim.rlim_cur)
    }
}
