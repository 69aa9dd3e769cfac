//! What the machine can still give: every buffer sized by a user's number (beams, slots, batch,
//! context) is checked here before it is allocated, so that an absurd value is a clear error and
//! not the kernel's OOM killer or an allocator abort.

use crate::error::{Error, Result};

/// Memory the system can still give (Linux's `MemAvailable`); None where unknown.
pub(crate) fn available() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Bytes as GiB with two decimals, for messages.
pub(crate) fn gib(bytes: usize) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Refuses `units` of `per_unit` bytes each when they overflow or exceed the available memory.
/// `what` names the whole ("beam search over 100000 beams"), `unit` one of them
/// ("beams"); the message says how much is needed, how much there is and how many units fit.
pub(crate) fn check(what: &str, unit: &str, units: usize, per_unit: usize) -> Result<()> {
    let need = per_unit.checked_mul(units);
    let available = available();
    if need.is_none_or(|n| available.is_some_and(|a| n > a)) {
        return Err(Error::Resource(format!(
            "{what} needs {}; {} is available, which fits {} {unit}",
            need.map_or("more than this machine can address".into(), gib),
            available.map_or("an unknown amount".into(), gib),
            available.map_or(0, |a| a / per_unit.max(1)),
        )));
    }
    Ok(())
}
