//! systemd integration through sd-notify: READY, STATUS, WATCHDOG and STOPPING. Outside
//! systemd (no NOTIFY_SOCKET) every call is a no-op, so the daemon runs the same by hand.

use std::time::Duration;

use sd_notify::NotifyState;

/// The service manager (systemd) as sd-notify reaches it; admin notifications are
/// `notification::Notifier`.
pub struct ServiceManager {
    watchdog: Option<Duration>,
}

impl ServiceManager {
    pub fn from_env() -> Self {
        ServiceManager {
            watchdog: watchdog_timeout(
                std::env::var("WATCHDOG_USEC").ok().as_deref(),
                std::env::var("WATCHDOG_PID").ok().as_deref(),
                std::process::id(),
            ),
        }
    }

    /// How often to ping: half the watchdog timeout, as sd_watchdog_enabled(3) advises.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    fn send(&self, states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }
}

/// sd_watchdog_enabled(3): WATCHDOG_USEC enables the watchdog, and WATCHDOG_PID, when set,
/// must be our pid (it is not when the variable was inherited from a parent). sd-notify's
/// own helper also requires WATCHDOG_PID to be present, which the man page does not.
fn watchdog_timeout(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    match pid {
        Some(p) if p.trim().parse::<u32>().ok() != Some(own_pid) => None,
        _ => Some(Duration::from_micros(usec)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_follows_sd_watchdog_enabled_rules() {
        let on = Some(Duration::from_secs(30));
        assert_eq!(watchdog_timeout(Some("30000000"), None, 7), on);
        assert_eq!(watchdog_timeout(Some("30000000"), Some("7"), 7), on);
        assert_eq!(watchdog_timeout(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_timeout(Some("0"), None, 7), None);
        assert_eq!(watchdog_timeout(Some("soon"), None, 7), None);
        assert_eq!(watchdog_timeout(None, Some("7"), 7), None);
    }
}
