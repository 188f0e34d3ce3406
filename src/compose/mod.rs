//! The compose project on disk: the model (what `.env` and the compose files name) and the
//! watcher that reports when that changes.

pub mod model;
pub mod watch;

pub use model::{ComposeError, ComposeView, PathFacts, read_view};
pub use watch::{ComposeEvent, ComposeWatcher, DEFAULT_DEBOUNCE};
