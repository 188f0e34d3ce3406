//! Snapshots: database and storage of the Immich stack, taken together and sealed.
//! Built up in parts: `db` (dump and facts). The store, storage tree and retention follow.

pub mod db;
