//! Dropping root after the listeners are bound: switch to the configured
//! user and group, so a compromise of the relay is not a compromise of the
//! host. Under systemd the unit's `User=` does this before start.

use std::ffi::CString;
use std::io;

/// Switches to `user` (and `group`, else the user's primary group) when
/// running as root. Not root: nothing to do.
pub fn drop_to(user: &str, group: Option<&str>) -> io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        tracing::warn!("user = {user:?} is set but turnstile is not running as root; not switching");
        return Ok(());
    }
    let name = CString::new(user).map_err(io::Error::other)?;
    // SAFETY: name is a valid C string; getpwnam returns null or a pointer to static storage.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(io::Error::other(format!("no such user: {user}")));
    }
    // SAFETY: pw is non-null and points at a passwd record.
    let (uid, mut gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    if let Some(g) = group {
        let gname = CString::new(g).map_err(io::Error::other)?;
        // SAFETY: gname is a valid C string; getgrnam returns null or static storage.
        let gr = unsafe { libc::getgrnam(gname.as_ptr()) };
        if gr.is_null() {
            return Err(io::Error::other(format!("no such group: {g}")));
        }
        // SAFETY: gr is non-null.
        gid = unsafe { (*gr).gr_gid };
    }
    // Order matters: supplementary groups and the group while still root, the user last.
    // SAFETY: plain system calls with valid arguments; glibc applies set*id to every thread.
    unsafe {
        if libc::setgroups(1, &gid) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    tracing::info!(uid, gid, "dropped privileges to {user}");
    Ok(())
}
