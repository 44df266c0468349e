//! The one place in Tandem's libraries that calls C directly.
//!
//! Every system call Tandem needs goes through `rustix` (safe wrappers;
//! see `tandem-volume`, `tandem-nbd`, `tandem-http`,
//! `tandem-coordinator`), so those crates forbid `unsafe`. What is left is
//! not a system call but a C library function: the local time of day,
//! which needs the site's time zone (`TZ`, `/etc/localtime`, the zone
//! database) as the C library reads it. Neither std nor rustix offers it,
//! and a time zone database of our own would be far more code to trust
//! than one call. It lives here because bandwidth schedule windows are in
//! the site's local time and this crate defines them
//! ([`crate::ScheduleWindow`]).
//!
//! Every `unsafe` block carries a `SAFETY:` comment; the rest of the crate
//! denies `unsafe`.

use std::time::{SystemTime, UNIX_EPOCH};

/// The current weekday (0 = Sunday, as C counts), hour and minute in the
/// site's local time; `None` if the C library cannot tell.
pub(crate) fn local_day_hour_minute() -> Option<(i32, i32, i32)> {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    let now = libc::time_t::try_from(secs).ok()?;
    // SAFETY: `libc::tm` holds only integers and one pointer (`tm_zone`),
    // for all of which zero is a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals for the whole call, and
    // `localtime_r` writes only into `tm` (the reentrant variant, no
    // static buffer). It reads the environment (`TZ`); no Tandem thread
    // changes the environment.
    let result = unsafe { libc::localtime_r(&now, &mut tm) };
    if result.is_null() {
        return None;
    }
    Some((tm.tm_wday, tm.tm_hour, tm.tm_min))
}
