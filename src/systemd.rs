//! systemd integration through sd-notify: READY, STATUS, WATCHDOG and STOPPING. Outside
//! systemd (no NOTIFY_SOCKET) every call is a no-op, so the daemon runs the same by hand.

use std::time::Duration;

use sd_notify::NotifyState;

pub struct Notifier {
    watchdog: Option<Duration>,
}

impl Notifier {
    pub fn from_env() -> Self {
        let mut usec = 0u64;
        // Keep the env: a re-exec or a child may need it, and it is harmless.
        let watchdog = sd_notify::watchdog_enabled(false, &mut usec)
            .then(|| Duration::from_micros(usec))
            .filter(|d| !d.is_zero());
        Notifier { watchdog }
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
