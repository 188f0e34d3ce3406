//! Snapshots: database and storage of the Immich stack, taken together and sealed.
//! `db` dumps and reads the database, `storage` makes the tree and manifest of the upload
//! location, `store` owns the on-disk layout (partial → sealed).

pub mod db;
pub mod storage;
