//! Diagnosis of a failed start: the logs of the stack's services read together (the cause in
//! one container outranks the symptom in another), the exit codes and `OOMKilled` Docker
//! recorded, the database's counts against the last snapshot and the migrations applied since
//! it. [`diagnose`] is pure: it reads a plain [`Evidence`] (incident.rs gathers it from
//! Docker; `immich-guard diagnose` from log files) and names the cause and the way out.
//!
//! The phrases are the ones Immich, Node, PostgreSQL, Redis and Docker really print
//! (docs/incident-runbook.md, "The cases"); tests/corpus/ holds real failures they are
//! scored against.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    /// A migration failed, or the database is newer than the server.
    Migration,
    /// The media folders: EACCES / permission denied.
    Permissions,
    /// `.immich` marker files missing: the upload location is not mounted where it was.
    FolderIntegrity,
    /// `relation/column/constraint "…" does not exist`: schema and code disagree.
    MissingRelation,
    /// `password authentication failed`: DB_PASSWORD changed after the database was created.
    DatabasePassword,
    /// `ECONNREFUSED` / `ENOTFOUND database`: usually a symptom of the database's own failure.
    DatabaseUnreachable,
    /// The PostgreSQL data files are from another major version.
    DatabaseVersion,
    /// pgvecto.rs / VectorChord extension errors and version mismatches.
    VectorExtension,
    /// On-disk damage: invalid pages, unreadable blocks, WAL/checkpoint/control file errors.
    DatabaseCorruption,
    /// Killed for memory (`OOMKilled`, `signal 9`, `out of memory`).
    OutOfMemory,
    /// `No space left on device`, `could not extend file`, ENOSPC.
    DiskFull,
    /// An old compose file's `command:`/`entrypoint:` (`start.sh`) on a new image.
    StaleCommand,
    /// A broken or wrong local image: re-pull it.
    CorruptImage,
    /// Docker / compose older than the compose file.
    DockerTooOld,
    /// The upload mount moved (`/usr/src/app/upload` → `/data`).
    UploadMountChange,
    /// A fresh, empty database where a populated one was expected.
    EmptyDatabase,
    /// A required intermediate version was skipped.
    InvalidUpgradePath,
    /// Redis/valkey cannot load its persisted data.
    RedisPersistence,
    /// Machine learning cannot bind `[::]` (IPv6 disabled).
    MlBindAddress,
    /// SIGILL / exit 132: the CPU lacks an instruction the image needs.
    CpuUnsupported,
    /// A service Immich removed (typesense, …) still configured.
    RemovedService,
    /// The PostgreSQL data directory's ownership or mode is wrong.
    DatabaseOwnership,
    /// Nothing recognised: never a finding, only a diagnosis' cause.
    Unknown,
}

impl Category {
    /// The slug (`database-corruption`), as in incident.json and tests/corpus/.
    pub fn slug(self) -> &'static str {
        match self {
            Category::Migration => "migration",
            Category::Permissions => "permissions",
            Category::FolderIntegrity => "folder-integrity",
            Category::MissingRelation => "missing-relation",
            Category::DatabasePassword => "database-password",
            Category::DatabaseUnreachable => "database-unreachable",
            Category::DatabaseVersion => "database-version",
            Category::VectorExtension => "vector-extension",
            Category::DatabaseCorruption => "database-corruption",
            Category::OutOfMemory => "out-of-memory",
            Category::DiskFull => "disk-full",
            Category::StaleCommand => "stale-command",
            Category::CorruptImage => "corrupt-image",
            Category::DockerTooOld => "docker-too-old",
            Category::UploadMountChange => "upload-mount-change",
            Category::EmptyDatabase => "empty-database",
            Category::InvalidUpgradePath => "invalid-upgrade-path",
            Category::RedisPersistence => "redis-persistence",
            Category::MlBindAddress => "ml-bind-address",
            Category::CpuUnsupported => "cpu-unsupported",
            Category::RemovedService => "removed-service",
            Category::DatabaseOwnership => "database-ownership",
            Category::Unknown => "unknown",
        }
    }

    /// How much a finding of this category explains the others: the highest present is the
    /// cause. Causes in the infrastructure (CPU, image, disk, memory, the database's own
    /// files) come before what they make the server print (a failed migration, a missing
    /// relation, an unreachable database).
    fn weight(self) -> u8 {
        match self {
            Category::CpuUnsupported => 100,
            Category::CorruptImage => 95,
            Category::DockerTooOld => 94,
            Category::StaleCommand => 93,
            Category::DatabaseCorruption => 90,
            Category::DiskFull => 88,
            Category::OutOfMemory => 86,
            Category::DatabaseOwnership => 84,
            Category::DatabaseVersion => 82,
            Category::DatabasePassword => 80,
            Category::VectorExtension => 78,
            Category::InvalidUpgradePath => 76,
            Category::RedisPersistence => 74,
            Category::MlBindAddress => 72,
            Category::RemovedService => 70,
            // Immich follows a marker it cannot read for permissions with a generic "Failed
            // to read" line (which names `/data` from v1.137 on): the permission error is the
            // cause.
            Category::Permissions => 64,
            Category::UploadMountChange => 63,
            Category::FolderIntegrity => 62,
            Category::EmptyDatabase => 50,
            Category::Migration => 40,
            Category::MissingRelation => 30,
            Category::DatabaseUnreachable => 10,
            Category::Unknown => 0,
        }
    }

    /// What to do about it.
    pub fn hint(self) -> &'static str {
        match self {
            Category::Migration => {
                "a migration failed: read the quoted error; the decision below says whether the database was changed"
            }
            Category::Permissions => {
                "the server cannot write its media folders: fix ownership/permissions of UPLOAD_LOCATION for the user the server runs as (e.g. `chown -R <uid>:<gid> <upload location>`)"
            }
            Category::FolderIntegrity => {
                "the .immich marker files are missing: the upload location is not mounted where it was (check UPLOAD_LOCATION in .env and the volume in the compose file); do not create the markers by hand before the right folder is mounted"
            }
            Category::MissingRelation => {
                "the schema does not match this version: a migration did not run or was rolled back"
            }
            Category::DatabasePassword => {
                "DB_PASSWORD in .env is not the password the database was created with: put the old one back (PostgreSQL keeps the password it was initialised with)"
            }
            Category::DatabaseUnreachable => {
                "the server cannot reach the database: check that the database container runs (its own log first) and that DB_HOSTNAME/DB_PORT point at it"
            }
            Category::DatabaseVersion => {
                "the database files were made by another PostgreSQL major version: use the database image the files were made with, or dump and restore into the new version"
            }
            Category::VectorExtension => {
                "the vector extension failed: use the database image Immich's release notes name for this version (pgvecto.rs → VectorChord), with the extension version the database expects"
            }
            Category::DatabaseCorruption => {
                "PostgreSQL found damaged data files: do not run more migrations on them; keep the data directory as it is, check the disk (dmesg, SMART), then restore the last good snapshot"
            }
            Category::OutOfMemory => {
                "a container was killed for memory: raise the memory limit (or add RAM/swap), stop what else uses it, then start again; an interrupted migration's transaction was rolled back by PostgreSQL"
            }
            Category::DiskFull => {
                "the disk is full: free space where the database and the upload location live (`df -h`, `docker system df`, old images), then start again"
            }
            Category::StaleCommand => {
                "the compose file still names an old command/entrypoint (`start.sh`, `start-server.sh`): take docker-compose.yml of this release, remove `command:`/`entrypoint:` from the service, then `docker compose up -d`"
            }
            Category::CorruptImage => {
                "the local image is broken or for another platform: remove it and pull it again (`docker compose down`, `docker image rm <image>`, `docker compose pull`, `docker compose up -d`)"
            }
            Category::DockerTooOld => {
                "Docker / compose is older than this compose file: update Docker Engine and the compose plugin (`docker compose version`), not the compose file"
            }
            Category::UploadMountChange => {
                "the upload location is mounted at the old path: this release expects `${UPLOAD_LOCATION}:/data` (was `/usr/src/app/upload`); take the volume lines of this release's docker-compose.yml"
            }
            Category::EmptyDatabase => {
                "the database is a fresh, empty cluster: its data location changed (DB_DATA_LOCATION, a volume name, a mount); point it back at the old data directory and start again; do not let Immich write into the empty one"
            }
            Category::InvalidUpgradePath => {
                "a required intermediate version was skipped and nothing was migrated: pin the version that ran before, then upgrade to the intermediate release the error or the release notes name (https://immich.app/errors), let it start once, then upgrade"
            }
            Category::RedisPersistence => {
                "redis/valkey cannot load its saved data (a dump from a newer redis, or a damaged file): Immich keeps only queues there; move the redis data (dump.rdb / appendonly) aside and start again"
            }
            Category::MlBindAddress => {
                "machine learning cannot listen on [::] (IPv6 disabled): set IMMICH_HOST=0.0.0.0 for the machine-learning service"
            }
            Category::CpuUnsupported => {
                "the CPU lacks an instruction the image needs (SIGILL, exit 132; e.g. AVX for machine learning): use a machine or VM CPU type with it (Proxmox: cpu=host), or disable that service"
            }
            Category::RemovedService => {
                "a service this release removed is still configured (e.g. typesense, TYPESENSE_* in .env, an old immich-web/microservices container): take this release's docker-compose.yml and .env and remove it"
            }
            Category::DatabaseOwnership => {
                "the PostgreSQL data directory has the wrong owner or mode (or a filesystem that cannot chown, e.g. a network share): give it to the postgres user (uid 999, mode 0700) on a local filesystem"
            }
            Category::Unknown => "nothing known was recognised: read the incident's logs",
        }
    }

    /// Fixed in place, whatever the migrations: configuration or infrastructure.
    fn fixable(self) -> bool {
        !matches!(
            self,
            Category::Migration
                | Category::MissingRelation
                | Category::DatabaseCorruption
                | Category::InvalidUpgradePath
                | Category::Unknown
        )
    }
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.slug())
    }
}

/// A line matches when every group has one of its needles in it (lowercase) and no `unless`
/// needle is.
struct Rule {
    category: Category,
    all: &'static [&'static [&'static str]],
    unless: &'static [&'static str],
}

const fn rule(category: Category, all: &'static [&'static [&'static str]]) -> Rule {
    Rule {
        category,
        all,
        unless: &[],
    }
}

const fn rule_unless(
    category: Category,
    all: &'static [&'static [&'static str]],
    unless: &'static [&'static str],
) -> Rule {
    Rule {
        category,
        all,
        unless,
    }
}

/// PostgreSQL's data directory and files, as its errors name them.
const PG_FILES: &[&str] = &[
    "/var/lib/postgresql",
    "postmaster.pid",
    "pg_filenode.map",
    "global/pg_control",
    "\"global/",
    "\"base/",
    "pg_wal",
    // Every other file PostgreSQL names relative to its data directory: "pg_logical/…",
    // "pg_xact/…", "PG_VERSION".
    "\"pg_",
    "data directory",
];

/// Words of a line reporting a failure, for needles that also occur in ordinary lines.
const ERROR_WORDS: &[&str] = &[
    "error",
    "fatal",
    "panic",
    "could not",
    "failed",
    "not found",
    "no such",
    "mismatch",
    "cannot",
    "unable",
    " but ",
    " instead of ",
    "only supports",
    "outdated",
    "not available",
    "not installed",
];

/// Immich's migrator tables (Kysely, from v1.133): present in every migrated database.
const MIGRATOR_TABLES: &[&str] = &["relation \"kysely_migrations"];

/// The absolute `/data` media location of v1.137 and later, as a path in a log line starts.
const DATA_MOUNT: &[&str] = &["(/data/", "'/data/", "\"/data/", " /data/"];

const RULES: &[Rule] = &[
    // Migrations (Kysely, TypeORM) and the schema.
    // A migrator that cannot find its own bookkeeping table ran no migration: it is looking
    // in another schema or database (search_path, DB_DATABASE_NAME), a missing relation.
    rule_unless(
        Category::Migration,
        &[&[
            "corrupted migrations",
            "migration failed",
            "migrations failed",
            "error running migration",
            "migrationerror",
            "failed to run migrations",
        ]],
        MIGRATOR_TABLES,
    ),
    rule_unless(
        Category::Migration,
        &[&["migration \""], &["\" failed"]],
        MIGRATOR_TABLES,
    ),
    // PostgreSQL's "relation/column … does not exist" and, for ALTER TABLE on a constraint,
    // `constraint "…" for table "…" does not exist` / `constraint "…" of relation "…" does
    // not exist`: the schema is not the one the code expects.
    rule(
        Category::MissingRelation,
        &[
            &["relation \"", "column \"", "constraint \""],
            &["does not exist"],
        ],
    ),
    rule(Category::InvalidUpgradePath, &[&["invalid upgrade path"]]),
    // The media folders.
    rule_unless(
        Category::Permissions,
        &[&["eacces", "permission denied", "operation not permitted"]],
        PG_FILES,
    ),
    // Absolute `/usr/src/app/upload` paths are written from v1.136 on; a file not found
    // there is the old mount (a permission error is not).
    rule_unless(
        Category::UploadMountChange,
        &[
            &["/usr/src/app/upload"],
            &["enoent", "no such file", "failed to read"],
        ],
        &["eacces", "permission denied", "operation not permitted"],
    ),
    // Only releases from v1.137 on keep media at an absolute `/data` (older ones read
    // `upload/…` or `/usr/src/app/upload/…`); their markers were written in the folder that
    // was mounted at `/usr/src/app/upload`. A marker missing under `/data` is that folder not
    // being the one now mounted at `/data`: the mount change done wrong (it outranks the
    // folder-integrity finding the same line makes).
    rule_unless(
        Category::UploadMountChange,
        &[
            &[".immich"],
            DATA_MOUNT,
            &["enoent", "failed to read", "no such file"],
        ],
        &["eacces", "permission denied", "operation not permitted"],
    ),
    // A marker that cannot be read for permissions is a permission problem.
    rule_unless(
        Category::FolderIntegrity,
        &[
            &[".immich"],
            &["enoent", "failed to read", "no such file", "eio:"],
        ],
        &["eacces", "permission denied", "operation not permitted"],
    ),
    rule(Category::FolderIntegrity, &[&["folder integrity"]]),
    // The database.
    rule(
        Category::DatabasePassword,
        &[&[
            "password authentication failed",
            "client password must be a string",
        ]],
    ),
    rule_unless(
        Category::DatabaseUnreachable,
        &[&[
            "econnrefused",
            "connection refused",
            "unable to connect to the database",
            "getaddrinfo enotfound",
            "getaddrinfo eai_again",
            "connection terminated unexpectedly",
        ]],
        &["typesense", "machine-learning", "machine learning", ":3003"],
    ),
    rule(
        Category::DatabaseVersion,
        &[&[
            "database files are incompatible with server",
            "was initialized by postgresql version",
            "invalid postgresql version",
            "unsupported postgresql version",
        ]],
    ),
    rule(
        Category::VectorExtension,
        &[
            &[
                "$libdir/vectors",
                "$libdir/vchord",
                "pgvecto",
                "vectorchord",
                "vchord",
                "extension \"vector",
                "no vector extension",
                "vectors.so",
                "vector extension",
                "db_vector_extension",
            ],
            ERROR_WORDS,
        ],
    ),
    rule(
        Category::DatabaseOwnership,
        &[&["has wrong ownership", "has invalid permissions"]],
    ),
    // PostgreSQL denied its own files (a PANIC on "pg_logical/…" during a checkpoint, the
    // server's connection failing on "global/pg_filenode.map"): their owner or mode changed.
    rule(
        Category::DatabaseOwnership,
        &[PG_FILES, &["operation not permitted", "permission denied"]],
    ),
    rule(
        Category::DatabaseCorruption,
        &[&[
            "invalid page in block",
            "could not read block",
            "unexpected data beyond eof in block",
            "could not locate a valid checkpoint record",
            "invalid primary checkpoint record",
            "invalid checkpoint record",
            "incorrect checksum in control file",
            "page verification failed",
            "could not access status of transaction",
            "missing chunk number",
            "uncommitted xmin",
            "from before relfrozenxid",
            "contains unexpected zero page",
            "invalid memory alloc request size",
            "xlogflush: request",
            "could not read from file \"pg_xact",
            "invalid resource manager id in primary checkpoint",
        ]],
    ),
    rule(
        Category::DatabaseCorruption,
        &[&["could not open file \"base/"], &["no such file"]],
    ),
    // The machine.
    rule(
        Category::DiskFull,
        &[&[
            "no space left on device",
            "could not extend file",
            "enospc",
            "disk quota exceeded",
        ]],
    ),
    rule(
        Category::OutOfMemory,
        &[&[
            "terminated by signal 9",
            "out of memory",
            "cannot allocate memory",
            "oomkilled",
            "oom-kill",
            "oom_kill",
            "oom killer",
            "was sent sigkill",
        ]],
    ),
    rule(
        Category::CpuUnsupported,
        &[&[
            "illegal instruction",
            "sigill",
            "exited with code 132",
            "was sent code 132",
            "does not support avx",
        ]],
    ),
    // Docker, images and compose files.
    rule(
        Category::StaleCommand,
        &[
            &["start.sh", "start-server.sh", "start-microservices.sh"],
            &[
                "no such file",
                "not found",
                "cannot open",
                "cannot find module",
            ],
        ],
    ),
    rule(
        Category::CorruptImage,
        &[&[
            "failed to register layer",
            "layer verification failed",
            "exec format error",
            "could not load the \"sharp\" module",
            // The "Possible solutions" sharp prints whenever its native part does not load,
            // and Node's code for a native module that cannot be loaded.
            "sharp.pixelplumbing.com/install",
            "err_dlopen_failed",
        ]],
    ),
    rule(
        Category::CorruptImage,
        &[&["unexpected eof"], &["layer", "blob", "sha256:", "pull"]],
    ),
    rule(
        Category::DockerTooOld,
        &[&[
            "additional property name is not allowed",
            "additional property start_interval is not allowed",
            "'start_interval' was unexpected",
            "'name' does not match any of the regexes",
            "must be a mapping not a string",
            "is not a docker command",
            "is unsupported. you might be seeing this error",
        ]],
    ),
    rule(
        Category::DockerTooOld,
        &[&["client version"], &["is too old", "is too new"]],
    ),
    rule(
        Category::RemovedService,
        &[
            &["typesense", "immich-web", "immich_web", "immich-proxy"],
            &[
                "enotfound",
                "eai_again",
                "econnrefused",
                "failed due to",
                "no such service",
            ],
        ],
    ),
    rule(
        Category::RedisPersistence,
        &[&[
            "can't handle rdb format version",
            "bad file format reading the append only file",
            "wrong signature trying to load db",
            "short read or oom loading db",
            "fatal error loading the db",
            "unrecoverable error: corrupted",
            "rdb file was saved with checksum",
        ]],
    ),
    rule(
        Category::MlBindAddress,
        &[&[
            "address family not supported by protocol",
            "can't connect to ('::'",
            "is not a valid port number",
        ]],
    ),
];

/// Lines quoted per category: enough to see the error, not the whole log.
const QUOTED: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub category: Category,
    /// `service: line`, first occurrences; facts read as `service: docker inspect: …`.
    pub lines: Vec<String>,
    pub count: usize,
}

/// One container's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceLog {
    pub service: String,
    pub text: String,
}

/// How a container last ended, from `docker inspect` (or compose's `exited with code N`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    pub service: String,
    pub exit_code: Option<i64>,
    #[serde(default)]
    pub oom_killed: bool,
}

/// Asset and user counts now and in the snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub assets_now: Option<i64>,
    pub users_now: Option<i64>,
    pub assets_then: Option<i64>,
    pub users_then: Option<i64>,
}

impl Counts {
    /// A database that had assets or users and has none.
    pub fn emptied(&self) -> Option<bool> {
        let now = self.assets_now.unwrap_or(0) + self.users_now.unwrap_or(0);
        let then = self.assets_then.unwrap_or(0) + self.users_then.unwrap_or(0);
        match (
            self.assets_now.or(self.users_now),
            self.assets_then.or(self.users_then),
        ) {
            (Some(_), Some(_)) => Some(now == 0 && then > 0),
            _ => None,
        }
    }

    /// What a restore would discard, when known.
    fn added_since(&self) -> Option<String> {
        let diff = |now: Option<i64>, then: Option<i64>| Some(now? - then?);
        match (
            diff(self.assets_now, self.assets_then),
            diff(self.users_now, self.users_then),
        ) {
            (None, None) => None,
            (assets, users) => Some(format!(
                "{} asset(s) and {} user(s) added since it",
                assets.map(|n| n.max(0).to_string()).unwrap_or("?".into()),
                users.map(|n| n.max(0).to_string()).unwrap_or("?".into())
            )),
        }
    }
}

/// The snapshot the way back would use: the newest sealed one of the version that ran before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRef {
    pub id: String,
    pub version: String,
}

/// Everything the diagnosis reads; no Docker, no database.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub logs: Vec<ServiceLog>,
    pub exits: Vec<Exit>,
    /// The service that crash-looped, when one did.
    pub looping: Option<String>,
    /// Migrations in the database now that the snapshot did not have: `Some(false)` none,
    /// `None` not known (no snapshot, or the database could not be asked).
    pub migrations_applied: Option<bool>,
    /// Their names, when known.
    pub new_migrations: Vec<String>,
    pub counts: Option<Counts>,
    /// Set when known without counts (tests/corpus/); otherwise from `counts`.
    pub database_empty: Option<bool>,
    /// Server and machine learning of the same release (from their image tags).
    pub images_same_release: Option<bool>,
    pub snapshot: Option<SnapshotRef>,
}

impl Evidence {
    fn database_empty(&self) -> Option<bool> {
        self.database_empty
            .or_else(|| self.counts.as_ref().and_then(Counts::emptied))
    }
}

/// One way out, with what it costs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choice {
    pub action: String,
    pub command: String,
    pub cost: String,
}

/// The way out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Decision {
    /// The database or storage is damaged or half-migrated and neither version can run it:
    /// bring back database and storage from before.
    Restore {
        snapshot: String,
        version: String,
        why: String,
        #[serde(default)]
        command: String,
        /// What a restore discards.
        #[serde(default)]
        cost: String,
    },
    /// Nothing was migrated and the new release is the cause: pin the old version.
    Rollback {
        version: String,
        why: String,
        #[serde(default)]
        command: String,
    },
    /// The cause is configuration or infrastructure: fix it and start the same version.
    FixForward {
        hint: String,
        why: String,
        #[serde(default)]
        command: String,
    },
    /// Not enough is known to choose: the state is kept, the options are laid out.
    Unknown { why: String, options: Vec<Choice> },
}

impl Decision {
    /// `restore`, `rollback`, `fix-forward`, `unknown`.
    pub fn action(&self) -> &'static str {
        match self {
            Decision::Restore { .. } => "restore",
            Decision::Rollback { .. } => "rollback",
            Decision::FixForward { .. } => "fix-forward",
            Decision::Unknown { .. } => "unknown",
        }
    }

    /// One line for a notification.
    pub fn summary(&self) -> String {
        match self {
            Decision::Restore { command, .. } => {
                format!("restore database and storage: `{command}`.")
            }
            Decision::Rollback {
                version, command, ..
            } => {
                format!("roll back to {version}, no migration was applied: `{command}`.")
            }
            Decision::FixForward { hint, command, .. } => {
                format!("fix forward: {hint}; then `{command}`.")
            }
            Decision::Unknown { .. } => {
                "unknown cause: nothing changed, state kept; see the options in the incident."
                    .into()
            }
        }
    }
}

/// The cause, every finding (the cause first), notes on other facts, and the decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnosis {
    pub cause: Category,
    pub findings: Vec<Finding>,
    #[serde(default)]
    pub notes: Vec<String>,
    pub decision: Decision,
}

/// Scans each service's log; findings ordered by category.
pub fn scan<'a>(logs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<Finding> {
    let mut found: std::collections::BTreeMap<Category, Finding> = Default::default();
    for (service, log) in logs {
        for line in log.lines() {
            for category in line_categories(line) {
                add(&mut found, category, format!("{service}: {}", line.trim()));
            }
        }
    }
    found.into_values().collect()
}

fn add(
    found: &mut std::collections::BTreeMap<Category, Finding>,
    category: Category,
    line: String,
) {
    let f = found.entry(category).or_insert_with(|| Finding {
        category,
        lines: Vec::new(),
        count: 0,
    });
    f.count += 1;
    if f.lines.len() < QUOTED {
        f.lines.push(line);
    }
}

/// The categories one line matches, each once.
fn line_categories(line: &str) -> Vec<Category> {
    let lower = line.to_lowercase();
    let mut seen = Vec::new();
    for r in RULES {
        if seen.contains(&r.category)
            || !r.all.iter().all(|g| g.iter().any(|n| lower.contains(n)))
            || r.unless.iter().any(|n| lower.contains(n))
        {
            continue;
        }
        seen.push(r.category);
    }
    // The shell's report of a SIGKILL is a line that says only that.
    if without_timestamp(&lower).trim() == "killed" && !seen.contains(&Category::OutOfMemory) {
        seen.push(Category::OutOfMemory);
    }
    seen
}

/// Docker's `--timestamps` prefix (`2026-11-25T02:23:01.123Z `) off.
fn without_timestamp(line: &str) -> &str {
    match line.split_once(' ') {
        Some((first, rest))
            if first.len() >= 20
                && first.starts_with(|c: char| c.is_ascii_digit())
                && first.contains('t') =>
        {
            rest
        }
        _ => line,
    }
}

/// Findings from the facts (exit codes, OOMKilled, counts) added to those of the logs.
fn fact_findings(evidence: &Evidence, found: &mut std::collections::BTreeMap<Category, Finding>) {
    for exit in &evidence.exits {
        if exit.oom_killed {
            add(
                found,
                Category::OutOfMemory,
                format!(
                    "{}: docker inspect: OOMKilled=true, exit code {}",
                    exit.service,
                    exit.exit_code.map(|c| c.to_string()).unwrap_or("?".into())
                ),
            );
        }
        if exit.exit_code == Some(132) {
            add(
                found,
                Category::CpuUnsupported,
                format!("{}: exit code 132 (SIGILL)", exit.service),
            );
        }
    }
    if evidence.database_empty() == Some(true) {
        let line = match &evidence.counts {
            Some(c) => format!(
                "database: {} asset(s), {} user(s) now; the snapshot had {} and {}",
                c.assets_now.unwrap_or(0),
                c.users_now.unwrap_or(0),
                c.assets_then.map(|n| n.to_string()).unwrap_or("?".into()),
                c.users_then.map(|n| n.to_string()).unwrap_or("?".into()),
            ),
            None => "database: empty where the snapshot had assets and users".into(),
        };
        add(found, Category::EmptyDatabase, line);
    }
}

/// PostgreSQL's lines when one of its processes died and the postmaster reset the others: the
/// crash, not what caused it.
const BACKEND_CRASH: &[&str] = &[
    "terminating connection because of crash of another server process",
    "the database system is in recovery mode",
    "terminating any other active server processes",
    "all server processes terminated; reinitializing",
];

/// A PostgreSQL process dying of something other than SIGKILL: a PANIC aborts (signal 6), a
/// crash in PostgreSQL or an extension is signal 11, a backend can exit with an error code.
const OTHER_DEATHS: &[&str] = &[
    "segmentation fault",
    "terminated by signal 6",
    "terminated by signal 11",
    "terminated by signal 7",
    "terminated by exception",
    "exited with exit code",
    "panic:",
    // An immediate shutdown (PostgreSQL 13 and older) resets the same way.
    "received immediate shutdown request",
];

/// A PostgreSQL reset whose log does not name the signal: in a container with a memory limit
/// the OOM killer's SIGKILL is what kills a backend (docs/incident-runbook.md, "Out of
/// memory, disk full"), unless another kind of death is in the logs.
fn crash_findings(evidence: &Evidence, found: &mut std::collections::BTreeMap<Category, Finding>) {
    if found.contains_key(&Category::OutOfMemory) {
        return;
    }
    let lines = || {
        evidence
            .logs
            .iter()
            .flat_map(|l| l.text.lines().map(move |line| (l.service.as_str(), line)))
    };
    let other_death = lines().any(|(_, line)| {
        let lower = line.to_lowercase();
        OTHER_DEATHS.iter().any(|n| lower.contains(n))
    });
    if other_death {
        return;
    }
    for (service, line) in lines() {
        let lower = line.to_lowercase();
        if BACKEND_CRASH.iter().any(|n| lower.contains(n)) {
            add(
                found,
                Category::OutOfMemory,
                format!("{service}: {}", line.trim()),
            );
        }
    }
}

/// An out-of-memory finding resting only on PostgreSQL's reset lines.
fn inferred_oom(findings: &[Finding]) -> bool {
    findings
        .iter()
        .find(|f| f.category == Category::OutOfMemory)
        .is_some_and(|f| {
            f.lines.iter().all(|l| {
                let lower = l.to_lowercase();
                BACKEND_CRASH.iter().any(|n| lower.contains(n))
            })
        })
}

/// The diagnosis of `evidence`.
pub fn diagnose(evidence: &Evidence) -> Diagnosis {
    let mut found: std::collections::BTreeMap<Category, Finding> = scan(
        evidence
            .logs
            .iter()
            .map(|l| (l.service.as_str(), l.text.as_str())),
    )
    .into_iter()
    .map(|f| (f.category, f))
    .collect();
    fact_findings(evidence, &mut found);
    crash_findings(evidence, &mut found);
    let mut findings: Vec<Finding> = found.into_values().collect();
    // The cause first; among equals the looping service's own.
    let own = |f: &Finding| {
        evidence
            .looping
            .as_ref()
            .is_some_and(|s| f.lines.iter().any(|l| l.starts_with(&format!("{s}: "))))
    };
    findings.sort_by_key(|f| (std::cmp::Reverse(f.category.weight()), !own(f)));
    let cause = findings
        .first()
        .map(|f| f.category)
        .unwrap_or(Category::Unknown);
    let notes = notes(evidence, cause, &findings);
    let decision = decide(evidence, cause, &findings);
    Diagnosis {
        cause,
        findings,
        notes,
        decision,
    }
}

fn notes(evidence: &Evidence, cause: Category, findings: &[Finding]) -> Vec<String> {
    let mut notes = Vec::new();
    if cause != Category::DatabaseUnreachable
        && let Some(f) = findings
            .iter()
            .find(|f| f.category == Category::DatabaseUnreachable)
    {
        notes.push(format!(
            "\"{}\" is a symptom: the {} explains it",
            f.lines[0], cause
        ));
    }
    if cause == Category::OutOfMemory && inferred_oom(findings) {
        notes.push(
            "PostgreSQL reset after one of its processes died, and no log read here names the signal: in a container that is almost always the OOM killer; confirm with `docker inspect` (OOMKilled) or `dmesg` (\"Out of memory: Killed process\")".into(),
        );
    }
    for exit in &evidence.exits {
        if exit.exit_code == Some(137) && !exit.oom_killed && cause != Category::OutOfMemory {
            notes.push(format!(
                "{} ended with exit code 137 (SIGKILL) but Docker did not record OOMKilled: killed from outside (a stop timeout, a kill), not for memory",
                exit.service
            ));
        }
    }
    if evidence.images_same_release == Some(false) {
        notes.push(
            "the server and machine-learning images are of different releases: pin both to the same one".into(),
        );
    }
    notes
}

/// "a" or "an" before a category's slug.
fn article(category: Category) -> &'static str {
    if category.slug().starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// The line that says so.
fn quote(findings: &[Finding], category: Category) -> String {
    findings
        .iter()
        .find(|f| f.category == category)
        .and_then(|f| f.lines.first())
        .map(|l| format!("\"{l}\""))
        .unwrap_or_default()
}

fn restore_choice(snapshot: &SnapshotRef, evidence: &Evidence) -> Choice {
    Choice {
        action: "restore".into(),
        command: format!("immich-guard restore {}", snapshot.id),
        cost: restore_cost(snapshot, evidence),
    }
}

fn restore_cost(snapshot: &SnapshotRef, evidence: &Evidence) -> String {
    let added = evidence
        .counts
        .as_ref()
        .and_then(Counts::added_since)
        .unwrap_or_else(|| "everything written since it (how much is not known)".into());
    format!(
        "discards {added}: database and storage go back to {} ({})",
        snapshot.id, snapshot.version
    )
}

fn migrations_text(evidence: &Evidence) -> String {
    if evidence.new_migrations.is_empty() {
        "migrations were applied".into()
    } else {
        format!(
            "{} migration(s) were applied ({})",
            evidence.new_migrations.len(),
            evidence.new_migrations.join(", ")
        )
    }
}

fn decide(evidence: &Evidence, cause: Category, findings: &[Finding]) -> Decision {
    // Without a looping service (logs diagnosed by hand) nothing was halted to release.
    let then = match &evidence.looping {
        Some(service) => format!(
            "immich-guard release {service} (after the fix; `docker compose up -d` if you changed .env or the compose file)"
        ),
        None => "docker compose up -d (after the fix)".to_string(),
    };
    let said = quote(findings, cause);
    let since = evidence
        .snapshot
        .as_ref()
        .map(|s| format!(" since {}", s.id))
        .unwrap_or_default();
    let lines_of = |category: Category| {
        findings
            .iter()
            .filter(move |f| f.category == category)
            .flat_map(|f| &f.lines)
            .map(|l| l.to_lowercase())
    };
    // Kysely's "corrupted migrations: previously executed migration … is missing": the
    // database ran a newer version. (Its other "corrupted migrations" error, an executed
    // migration found at another index, says nothing of which version is right.)
    let downgrade = cause == Category::Migration
        && lines_of(Category::Migration)
            .any(|l| l.contains("previously executed migration") && l.contains("is missing"));
    // The migrator cannot see its own table: it looks in another schema or database.
    let elsewhere = cause == Category::MissingRelation
        && lines_of(Category::MissingRelation)
            .any(|l| MIGRATOR_TABLES.iter().any(|t| l.contains(t)));
    if cause.fixable() || downgrade || elsewhere {
        let hint = if downgrade {
            "the database was migrated by a newer version than this server: run the version it ran with (`immich-guard pin <that version>`), or restore a snapshot of this one"
        } else if elsewhere {
            "the server does not see Immich's tables, not even its migrator's own: the database's search_path (it must include public: `SHOW search_path;`, `ALTER DATABASE <name> RESET search_path;`) or DB_DATABASE_NAME points elsewhere"
        } else {
            cause.hint()
        };
        let migrated = match evidence.migrations_applied {
            Some(true) => format!(
                "; {}{since}, which a fix in place keeps (a restore is not needed for this cause)",
                migrations_text(evidence)
            ),
            Some(false) => format!("; no migration was applied{since}"),
            None => String::new(),
        };
        let why = match cause {
            // A lone symptom: what it rules out is known, its cause is not in these logs.
            Category::DatabaseUnreachable => format!(
                "{said}: the database could not be reached and no log read here says why (its container not running, renamed, or on another network; read the database container's log); nothing points at the database's contents or at the release{migrated}"
            ),
            _ => format!(
                "{said}: the cause is {} ({}), outside the database's contents{migrated}",
                cause,
                match cause {
                    Category::EmptyDatabase => "the data location",
                    _ if elsewhere => "the database's configuration",
                    _ => "configuration or infrastructure",
                }
            ),
        };
        return Decision::FixForward {
            hint: hint.into(),
            why,
            command: then,
        };
    }
    let pin = |s: &SnapshotRef| Choice {
        action: "rollback".into(),
        command: format!("immich-guard pin {}", s.version),
        cost: "nothing, if no migration was applied; refused by pin if one was".into(),
    };
    let state_kept =
        "immich-guard changes nothing: what is halted stays halted, the database stays as it is";
    match (cause, evidence.migrations_applied, &evidence.snapshot) {
        (Category::DatabaseCorruption, _, Some(s)) => Decision::Restore {
            snapshot: s.id.clone(),
            version: s.version.clone(),
            why: format!(
                "{said}: PostgreSQL's data files are damaged{}; neither version can run on them (the old one only never reads those blocks, rolling back hides it); restore {} (database and storage) and pin {}",
                match evidence.migrations_applied {
                    Some(true) => format!(", and {}", migrations_text(evidence)),
                    _ => String::new(),
                },
                s.id,
                s.version
            ),
            command: format!("immich-guard restore {}", s.id),
            cost: restore_cost(s, evidence),
        },
        (Category::Migration | Category::MissingRelation, Some(true), Some(s)) => {
            Decision::Restore {
                snapshot: s.id.clone(),
                version: s.version.clone(),
                why: format!(
                    "{said}: {}{since} and the new version does not start: the database is half-migrated, {} cannot run on it and the new version fails on it; restore {} (database and storage) and pin {}",
                    migrations_text(evidence),
                    s.version,
                    s.id,
                    s.version
                ),
                command: format!("immich-guard restore {}", s.id),
                cost: restore_cost(s, evidence),
            }
        }
        // Immich refuses the skipped version in its first migration, before changing anything.
        (Category::InvalidUpgradePath, Some(false) | None, Some(s)) => Decision::Rollback {
            version: s.version.clone(),
            why: format!(
                "{said}: this release refuses a database that skipped a required intermediate release, before migrating anything{}: pin {} again, then upgrade to the intermediate release the error's link names, start it once, and upgrade from there",
                match evidence.migrations_applied {
                    Some(false) => format!(" (no migration was applied since {})", s.id),
                    _ => String::new(),
                },
                s.version
            ),
            command: format!("immich-guard pin {}", s.version),
        },
        (Category::Migration | Category::MissingRelation, Some(false), Some(s)) => {
            Decision::Rollback {
                version: s.version.clone(),
                why: format!(
                    "{said}: the new release fails, and no migration was applied since {}: pinning {} again is safe",
                    s.id, s.version
                ),
                command: format!("immich-guard pin {}", s.version),
            }
        }
        (_, _, Some(s)) => Decision::Unknown {
            why: format!(
                "{}; {}; {state_kept}",
                if cause == Category::Unknown {
                    "no known failure in the logs or the facts".to_string()
                } else {
                    format!("{said}: {} {cause} failure", article(cause))
                },
                match evidence.migrations_applied {
                    Some(true) => format!("{}{since}", migrations_text(evidence)),
                    Some(false) => format!("no migration was applied{since}"),
                    None => "whether migrations were applied is not known".into(),
                }
            ),
            options: vec![pin(s), restore_choice(s, evidence)],
        },
        (_, _, None) => Decision::Unknown {
            why: format!(
                "{}; there is no immich-guard snapshot from before this version to go back to; {state_kept}",
                match cause {
                    Category::Unknown => "no known failure in the logs or the facts".to_string(),
                    Category::DatabaseCorruption => format!(
                        "{said}: PostgreSQL's data files are damaged, a restore is needed (rolling back only hides it)"
                    ),
                    Category::InvalidUpgradePath => format!(
                        "{said}: this release refuses a database that skipped a required intermediate release, before migrating anything: pin the version that ran before, then upgrade through the intermediate release the error's link names"
                    ),
                    _ => format!("{said}: {} {cause} failure", article(cause)),
                }
            ),
            options: {
                let mut options = Vec::new();
                // Refused before anything changed: nothing to restore.
                if cause != Category::InvalidUpgradePath {
                    options.push(Choice {
                    action: "restore".into(),
                    command:
                        "Immich's own database backup (UPLOAD_LOCATION/backups), docs/recovery.md §4"
                            .into(),
                    cost: "discards everything written since that backup".into(),
                    });
                }
                // Going back to the old version on damaged files only hides the damage.
                if cause != Category::DatabaseCorruption {
                    options.insert(0, Choice {
                        action: "rollback".into(),
                        command: "immich-guard pin <the version that ran before>".into(),
                        cost: "nothing if no migration was applied (docs/recovery.md §3 shows how to check); pin refuses otherwise".into(),
                    });
                }
                options
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logs(v: &[(&str, &str)]) -> Vec<ServiceLog> {
        v.iter()
            .map(|(s, t)| ServiceLog {
                service: s.to_string(),
                text: t.to_string(),
            })
            .collect()
    }

    fn snapshot() -> Option<SnapshotRef> {
        Some(SnapshotRef {
            id: "S1".into(),
            version: "v1.119.0".into(),
        })
    }

    fn evidence(v: &[(&str, &str)], applied: Option<bool>) -> Evidence {
        Evidence {
            logs: logs(v),
            looping: v.first().map(|(s, _)| s.to_string()),
            migrations_applied: applied,
            snapshot: snapshot(),
            ..Default::default()
        }
    }

    fn categories(log: &str) -> Vec<Category> {
        scan([("s", log)]).iter().map(|f| f.category).collect()
    }

    #[test]
    fn slugs_are_the_serde_names() {
        for c in [
            Category::Migration,
            Category::DatabaseOwnership,
            Category::MlBindAddress,
            Category::Unknown,
            Category::OutOfMemory,
        ] {
            assert_eq!(
                serde_json::to_string(&c).unwrap(),
                format!("\"{}\"", c.slug())
            );
        }
    }

    #[test]
    fn each_category_has_its_real_phrases() {
        let cases: &[(&str, Category)] = &[
            (
                "[Nest] 7  - ERROR [Microservices:DatabaseRepository] Kysely migrations failed: error: boom",
                Category::Migration,
            ),
            (
                "Error: Invalid upgrade path. For more information, see https://immich.app/errors#invalid-upgrade-path",
                Category::InvalidUpgradePath,
            ),
            (
                "error: relation \"memories\" does not exist",
                Category::MissingRelation,
            ),
            (
                "Error: EACCES: permission denied, mkdir '/data/thumbs/u1'",
                Category::Permissions,
            ),
            (
                "ERROR [Microservices:StorageService] Failed to read (/data/library/.immich): Error: ENOENT: no such file or directory",
                Category::FolderIntegrity,
            ),
            (
                "error: password authentication failed for user \"postgres\"",
                Category::DatabasePassword,
            ),
            (
                "Error: getaddrinfo ENOTFOUND database",
                Category::DatabaseUnreachable,
            ),
            (
                "FATAL:  database files are incompatible with server",
                Category::DatabaseVersion,
            ),
            (
                "ERROR:  could not access file \"$libdir/vectors\": No such file or directory",
                Category::VectorExtension,
            ),
            (
                "QueryFailedError: invalid page in block 191 of relation base/16384/17020",
                Category::DatabaseCorruption,
            ),
            (
                "PANIC:  could not locate a valid checkpoint record",
                Category::DatabaseCorruption,
            ),
            (
                "LOG:  server process (PID 74) was terminated by signal 9: Killed",
                Category::OutOfMemory,
            ),
            (
                "FATAL:  could not write lock file \"postmaster.pid\": No space left on device",
                Category::DiskFull,
            ),
            (
                "/bin/bash: line 1: start.sh: command not found",
                Category::StaleCommand,
            ),
            (
                "failed to register layer: failed to Lchown \"/root/.npm\" for UID 0, GID 0: lchown /root/.npm: no data available",
                Category::CorruptImage,
            ),
            (
                "services.database.healthcheck value Additional properties are not allowed ('start_interval' was unexpected)",
                Category::DockerTooOld,
            ),
            (
                "Error: ENOENT: no such file or directory, open '/usr/src/app/upload/encoded-video/.immich'",
                Category::UploadMountChange,
            ),
            (
                "        The pgvecto.rs extension version is 0.1.11, but Immich only supports 0.2.0 and later minor releases.",
                Category::VectorExtension,
            ),
            (
                "        The pgvecto.rs extension version is 0.1.13 instead of 0.1.11.",
                Category::VectorExtension,
            ),
            (
                "1:M 30 Jul 2024 15:33:49.896 # Can't handle RDB format version 12",
                Category::RedisPersistence,
            ),
            (
                "ERROR    connection to ('::', 3003) failed: [Errno 97] Address family not supported by protocol",
                Category::MlBindAddress,
            ),
            (
                "Illegal instruction (core dumped)",
                Category::CpuUnsupported,
            ),
            (
                "Request to Node 0 failed due to \"ENOTFOUND getaddrinfo ENOTFOUND typesense\"",
                Category::RemovedService,
            ),
            (
                "2025-01-15 13:16:49.637 UTC [83] FATAL:  data directory \"/var/lib/postgresql/data\" has wrong ownership",
                Category::DatabaseOwnership,
            ),
            (
                "chown: changing ownership of '/var/lib/postgresql/data': Operation not permitted",
                Category::DatabaseOwnership,
            ),
        ];
        for (line, category) in cases {
            let found = categories(line);
            assert!(found.contains(category), "{line}: {found:?}");
        }
    }

    #[test]
    fn loose_words_alone_match_nothing() {
        for line in [
            "LOG [Api:Bootstrap] Immich Server is listening on http://[::1]:2283",
            "reading /data/upload/.immich ok",
            "WARN  column statistics do not exist yet",
            "LOG  the vectors index is ready",
            "pg_dump: incompatible options were ignored",
            "LOG  failed to read the config file, using defaults",
            "LOG:  database system is ready to accept connections",
            // Every first boot of a database container logs it: an emptied database is
            // known from the counts, not from this.
            "PostgreSQL init process complete; ready for start up.",
            "[Nest] 7 LOG [Microservices:DatabaseRepository] Running migrations, this may take a while",
        ] {
            assert!(
                categories(line).is_empty(),
                "{line}: {:?}",
                categories(line)
            );
        }
    }

    #[test]
    fn an_unreadable_marker_for_permissions_is_a_permission_problem() {
        let line = "ERROR [Microservices:StorageService] Failed to read (/data/encoded-video/.immich): Error: EACCES: permission denied, open '/data/encoded-video/.immich'";
        assert_eq!(categories(line), [Category::Permissions]);
        let d = diagnose(&evidence(
            &[(
                "immich_server",
                &format!(
                    "{line}\nmicroservices worker error: Error: Failed to read: \"<UPLOAD_LOCATION>/encoded-video/.immich (/data/encoded-video/.immich) - Please see https://immich.app/docs/administration/system-integrity#folder-checks for more information.\"\n"
                ),
            )],
            None,
        ));
        assert_eq!(d.cause, Category::Permissions);
    }

    #[test]
    fn the_database_log_explains_the_servers_enotfound() {
        let d = diagnose(&evidence(
            &[
                (
                    "immich_server",
                    "Error: getaddrinfo ENOTFOUND database\n    at GetAddrInfoReqWrap.onlookupall\n",
                ),
                (
                    "immich_postgres",
                    "chown: changing ownership of '/var/lib/postgresql/data': Operation not permitted\n",
                ),
            ],
            None,
        ));
        assert_eq!(d.cause, Category::DatabaseOwnership);
        assert!(
            d.findings
                .iter()
                .any(|f| f.category == Category::DatabaseUnreachable)
        );
        assert!(
            !d.findings
                .iter()
                .any(|f| f.category == Category::Permissions)
        );
        assert!(d.notes[0].contains("is a symptom"), "{:?}", d.notes);
        match &d.decision {
            Decision::FixForward { why, command, .. } => {
                assert!(why.contains("immich_postgres: chown"), "{why}");
                assert_eq!(
                    command.split(' ').take(3).collect::<Vec<_>>(),
                    ["immich-guard", "release", "immich_server"]
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn typesense_is_a_removed_service_not_the_database() {
        let d = diagnose(&evidence(
            &[(
                "immich_server",
                "Request #1702150844124: Request to Node 0 failed due to \"ENOTFOUND getaddrinfo ENOTFOUND typesense\"\n",
            )],
            Some(false),
        ));
        assert_eq!(d.cause, Category::RemovedService);
        assert_eq!(d.findings.len(), 1, "{:?}", d.findings);
        assert_eq!(d.decision.action(), "fix-forward");
    }

    #[test]
    fn oom_during_a_migration_is_fixed_forward_even_with_migrations_applied() {
        let mut e = evidence(
            &[
                (
                    "immich_server",
                    "[Nest] 7  - ERROR [Microservices:DatabaseRepository] Kysely migrations failed: error: terminating connection because of crash of another server process\n",
                ),
                (
                    "immich_postgres",
                    "LOG:  server process (PID 74) was terminated by signal 9: Killed\n",
                ),
            ],
            Some(true),
        );
        e.new_migrations = vec!["1740586617223-AddUpdateIdColumns".into()];
        let d = diagnose(&e);
        assert_eq!(d.cause, Category::OutOfMemory);
        match &d.decision {
            Decision::FixForward { why, .. } => {
                assert!(why.contains("signal 9"), "{why}");
                assert!(why.contains("1740586617223-AddUpdateIdColumns"), "{why}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exit_137_is_oom_only_with_oomkilled_or_a_kill_line() {
        let mut e = evidence(&[("immich_server", "Starting api worker\n")], Some(false));
        e.exits = vec![Exit {
            service: "immich_server".into(),
            exit_code: Some(137),
            oom_killed: false,
        }];
        let d = diagnose(&e);
        assert_eq!(d.cause, Category::Unknown);
        assert!(
            d.notes.iter().any(|n| n.contains("exit code 137")),
            "{:?}",
            d.notes
        );
        e.exits[0].oom_killed = true;
        assert_eq!(diagnose(&e).cause, Category::OutOfMemory);
        e.exits[0].oom_killed = false;
        e.logs[0]
            .text
            .push_str("2026-11-25T02:23:01.123456789Z Killed\n");
        assert_eq!(diagnose(&e).cause, Category::OutOfMemory);
    }

    #[test]
    fn exit_132_is_an_unsupported_cpu() {
        let mut e = evidence(&[("immich_machine_learning", "")], None);
        e.exits = vec![Exit {
            service: "immich_machine_learning".into(),
            exit_code: Some(132),
            oom_killed: false,
        }];
        let d = diagnose(&e);
        assert_eq!(d.cause, Category::CpuUnsupported);
        assert_eq!(d.decision.action(), "fix-forward");
    }

    #[test]
    fn corruption_during_a_migration_means_restore_not_rollback() {
        let log = "microservices worker error: QueryFailedError: invalid page in block 191 of relation base/16384/17020\n\
                   at async AddUpdateIdColumns1740586617223.up (/usr/src/app/dist/migrations/1740586617223-AddUpdateIdColumns.js:53:9)\n\
                   Migration \"AddUpdateIdColumns1740586617223\" failed, error: invalid page in block 191\n";
        for applied in [Some(true), Some(false), None] {
            let d = diagnose(&evidence(&[("immich_server", log)], applied));
            assert_eq!(d.cause, Category::DatabaseCorruption);
            match &d.decision {
                Decision::Restore {
                    snapshot,
                    command,
                    why,
                    cost,
                    ..
                } => {
                    assert_eq!(snapshot, "S1");
                    assert_eq!(command, "immich-guard restore S1");
                    assert!(why.contains("invalid page in block"), "{why}");
                    assert!(cost.contains("not known"), "{cost}");
                }
                other => panic!("{applied:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn corruption_without_a_snapshot_offers_no_rollback() {
        let mut e = evidence(
            &[(
                "immich_postgres",
                "PANIC:  could not locate a valid checkpoint record\n",
            )],
            None,
        );
        e.snapshot = None;
        match diagnose(&e).decision {
            Decision::Unknown { why, options } => {
                assert!(why.contains("a restore is needed"), "{why}");
                let actions: Vec<&str> = options.iter().map(|o| o.action.as_str()).collect();
                assert_eq!(actions, ["restore"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn migrations_applied_and_a_migration_error_means_restore_with_its_cost() {
        let mut e = evidence(&[("immich-server", "Migration failed: boom\n")], Some(true));
        e.new_migrations = vec!["c".into()];
        e.counts = Some(Counts {
            assets_now: Some(105),
            users_now: Some(2),
            assets_then: Some(100),
            users_then: Some(2),
        });
        match diagnose(&e).decision {
            Decision::Restore {
                snapshot,
                version,
                cost,
                why,
                ..
            } => {
                assert_eq!((snapshot.as_str(), version.as_str()), ("S1", "v1.119.0"));
                assert!(cost.contains("5 asset(s) and 0 user(s)"), "{cost}");
                assert!(
                    why.contains("Migration failed: boom") && why.contains("(c)"),
                    "{why}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nothing_applied_means_rollback_by_pin() {
        let d = diagnose(&evidence(
            &[("immich-server", "Migration failed: boom\n")],
            Some(false),
        ));
        match d.decision {
            Decision::Rollback { command, .. } => assert_eq!(command, "immich-guard pin v1.119.0"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nothing_recognised_is_unknown_never_restore() {
        for applied in [Some(true), Some(false), None] {
            let d = diagnose(&evidence(
                &[("immich-server", "Something odd happened\n")],
                applied,
            ));
            assert_eq!(d.cause, Category::Unknown);
            match &d.decision {
                Decision::Unknown { options, why } => {
                    assert!(why.contains("changes nothing"), "{why}");
                    let actions: Vec<&str> = options.iter().map(|o| o.action.as_str()).collect();
                    assert_eq!(actions, ["rollback", "restore"]);
                    assert!(options[1].cost.contains("discards"), "{options:?}");
                }
                other => panic!("{applied:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_failed_migration_with_unknown_state_is_not_restored_on_a_guess() {
        let d = diagnose(&evidence(
            &[("immich-server", "Migration failed: boom\n")],
            None,
        ));
        assert_eq!(d.cause, Category::Migration);
        assert_eq!(d.decision.action(), "unknown");
    }

    #[test]
    fn an_emptied_database_is_a_finding_of_its_own() {
        let mut e = evidence(&[("immich-server", "Starting api worker\n")], Some(true));
        e.counts = Some(Counts {
            assets_now: Some(0),
            users_now: Some(0),
            assets_then: Some(40_000),
            users_then: Some(3),
        });
        let d = diagnose(&e);
        assert_eq!(d.cause, Category::EmptyDatabase);
        assert!(d.findings[0].lines[0].contains("40000"), "{:?}", d.findings);
        assert_eq!(d.decision.action(), "fix-forward");
    }

    #[test]
    fn a_downgrade_is_fixed_by_running_the_newer_version() {
        let d = diagnose(&evidence(
            &[(
                "immich-server",
                "Error: corrupted migrations: previously executed migration 1758705774125-CreateAssetOCRTable is missing\n",
            )],
            Some(false),
        ));
        assert_eq!(d.cause, Category::Migration);
        assert!(
            matches!(&d.decision, Decision::FixForward { hint, .. } if hint.contains("newer version"))
        );
    }

    #[test]
    fn a_postgres_reset_without_a_signal_is_out_of_memory() {
        // 57P02 as the server prints it, and what clients get during the crash recovery.
        let mut e = evidence(
            &[
                (
                    "immich_server",
                    "[Nest] 7  - ERROR [Microservices:DatabaseRepository] Kysely migrations failed: boom\n  message: 'terminating connection because of crash of another server process',\n",
                ),
                (
                    "immich_postgres",
                    "2025-05-22 00:35:36.048 UTC [96] FATAL:  the database system is in recovery mode\n",
                ),
            ],
            Some(true),
        );
        let d = diagnose(&e);
        assert_eq!(d.cause, Category::OutOfMemory);
        assert_eq!(d.decision.action(), "fix-forward");
        assert!(
            d.notes.iter().any(|n| n.contains("OOM killer")),
            "{:?}",
            d.notes
        );
        // Another death in the logs: the reset is not memory's.
        for other in [
            "LOG:  server process (PID 74) was terminated by signal 11: Segmentation fault",
            "PANIC:  could not write to file \"pg_wal/xlogtemp.31\": Input/output error",
        ] {
            e.logs[1].text.push_str(other);
            e.logs[1].text.push('\n');
            let d = diagnose(&e);
            assert_ne!(d.cause, Category::OutOfMemory, "{other}");
            assert!(
                !d.findings
                    .iter()
                    .any(|f| f.category == Category::OutOfMemory),
                "{other}: {:?}",
                d.findings
            );
            e.logs[1].text = "FATAL:  the database system is in recovery mode\n".into();
        }
        // A named SIGKILL is not an inference: no note.
        e.logs[1]
            .text
            .push_str("LOG:  server process (PID 74) was terminated by signal 9: Killed\n");
        let d = diagnose(&e);
        assert_eq!(d.cause, Category::OutOfMemory);
        assert!(
            !d.notes.iter().any(|n| n.contains("OOM killer")),
            "{:?}",
            d.notes
        );
    }

    #[test]
    fn a_panic_on_postgres_own_files_is_ownership_not_permissions() {
        let d = diagnose(&evidence(
            &[(
                "immich_postgres",
                "2024-01-30 07:21:52.364 CET [64] PANIC:  could not open file \"pg_logical/replorigin_checkpoint\": Permission denied\n\
                 2024-01-30 07:21:52.371 CET [1] LOG:  checkpointer process (PID 64) was terminated by signal 6: Aborted\n\
                 2024-01-30 07:21:54.697 CET [4297] FATAL:  the database system is in recovery mode\n",
            )],
            None,
        ));
        assert_eq!(d.cause, Category::DatabaseOwnership);
        let categories: Vec<Category> = d.findings.iter().map(|f| f.category).collect();
        assert_eq!(categories, [Category::DatabaseOwnership]);
        assert_eq!(d.decision.action(), "fix-forward");
    }

    #[test]
    fn a_missing_constraint_is_a_missing_relation_rolled_back_when_nothing_was_applied() {
        for line in [
            "error: PostgresError: constraint \"FK_0f6fc2fb195f24d19b0fb0d57c1\" for table \"library\" does not exist",
            "ERROR:  constraint \"PK_x\" of relation \"exif\" does not exist",
            "microservices worker error: PostgresError: column \"ownerId\" does not exist",
        ] {
            assert_eq!(categories(line), [Category::MissingRelation], "{line}");
            let d = diagnose(&evidence(&[("immich_server", line)], Some(false)));
            assert_eq!(d.decision.action(), "rollback", "{line}");
        }
        assert!(
            categories("ERROR:  constraint \"CHK_b0f8\" for relation \"person\" already exists")
                .is_empty()
        );
    }

    #[test]
    fn the_migrators_own_table_missing_is_a_search_path_fix_not_a_migration() {
        let line = "[Nest] 16  - ERROR [Api:DatabaseRepository] Kysely migrations failed: PostgresError: relation \"kysely_migrations_lock\" does not exist";
        assert_eq!(categories(line), [Category::MissingRelation]);
        // An ordinary relation in a failed migration stays a migration failure too.
        assert_eq!(
            categories(
                "Kysely migrations failed: error: relation \"memory_assets\" does not exist"
            ),
            [Category::Migration, Category::MissingRelation]
        );
        for applied in [Some(true), Some(false), None] {
            let d = diagnose(&evidence(&[("immich_server", line)], applied));
            assert_eq!(d.cause, Category::MissingRelation);
            match &d.decision {
                Decision::FixForward { hint, why, .. } => {
                    assert!(hint.contains("search_path"), "{hint}");
                    assert!(why.contains("the database's configuration"), "{why}");
                }
                other => panic!("{applied:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_invalid_upgrade_path_rolls_back_then_steps_through_the_intermediate_release() {
        let log = "ERROR [Microservices:DatabaseRepository] Migrations failed: Error: Invalid upgrade path. For more information, see https://immich.app/errors#typeorm-upgrade\n";
        for applied in [Some(false), None] {
            let d = diagnose(&evidence(&[("immich_server", log)], applied));
            assert_eq!(d.cause, Category::InvalidUpgradePath);
            match &d.decision {
                Decision::Rollback { command, why, .. } => {
                    assert_eq!(command, "immich-guard pin v1.119.0");
                    assert!(why.contains("intermediate release"), "{why}");
                    assert!(why.contains("Invalid upgrade path"), "{why}");
                }
                other => panic!("{applied:?}: {other:?}"),
            }
        }
        // Migrations applied contradicts the error: not a guess either way.
        let d = diagnose(&evidence(&[("immich_server", log)], Some(true)));
        assert_eq!(d.decision.action(), "unknown");
        // Without a snapshot (logs diagnosed by hand) only the way back is offered.
        let mut e = evidence(&[("immich_server", log)], None);
        e.snapshot = None;
        match diagnose(&e).decision {
            Decision::Unknown { why, options } => {
                assert!(why.contains("before migrating anything"), "{why}");
                let actions: Vec<&str> = options.iter().map(|o| o.action.as_str()).collect();
                assert_eq!(actions, ["rollback"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_marker_missing_under_data_is_the_mount_change() {
        for line in [
            "ERROR [Microservices:StorageService] Failed to read (/data/library/.immich): Error: ENOENT: no such file or directory, open '/data/library/.immich'",
            "Error: Failed to read: \"<UPLOAD_LOCATION>/encoded-video/.immich (/data/encoded-video/.immich) - Please see https://docs.immich.app/administration/system-integrity#folder-checks for more information.\"",
        ] {
            let d = diagnose(&evidence(&[("immich_server", line)], None));
            assert_eq!(d.cause, Category::UploadMountChange, "{line}");
            assert_eq!(d.decision.action(), "fix-forward");
        }
        // Before v1.137 the marker is read relative to the old mount: folder integrity.
        let d = diagnose(&evidence(
            &[(
                "immich_server",
                "ERROR [Microservices:StorageService] Failed to read upload/encoded-video/.immich: Error: ENOENT: no such file or directory, open 'upload/encoded-video/.immich'",
            )],
            None,
        ));
        assert_eq!(d.cause, Category::FolderIntegrity);
    }

    #[test]
    fn sharps_install_hint_and_a_failed_dlopen_are_a_broken_image() {
        for line in [
            "2025-05-04 23:00:31.851 |     See https://sharp.pixelplumbing.com/install",
            "ERR_DLOPEN_FAILED: /usr/local/lib/libvips-cpp.so.42: file too short",
        ] {
            assert_eq!(categories(line), [Category::CorruptImage], "{line}");
        }
    }

    #[test]
    fn migrations_out_of_order_are_not_a_downgrade() {
        let log = "Migrations failed: Error: corrupted migrations: expected previously executed migration 1777415973792-AddVideoStreamTables to be at index 73 but 1776848612954-MigrateAlbumOwnerIdToAlbumUser was found in its place.\n";
        let d = diagnose(&evidence(&[("immich_server", log)], None));
        assert_eq!(d.cause, Category::Migration);
        assert_eq!(d.decision.action(), "unknown");
        let d = diagnose(&evidence(&[("immich_server", log)], Some(false)));
        assert_eq!(d.decision.action(), "rollback");
    }

    #[test]
    fn a_lone_unreachable_database_is_fixed_forward_saying_its_cause_is_not_in_the_logs() {
        let d = diagnose(&evidence(
            &[(
                "immich-server",
                "Error: getaddrinfo ENOTFOUND database\n    at GetAddrInfoReqWrap.onlookupall [as oncomplete] (node:dns:122:26) {\n",
            )],
            None,
        ));
        assert_eq!(d.cause, Category::DatabaseUnreachable);
        match &d.decision {
            Decision::FixForward { why, hint, .. } => {
                assert!(why.contains("no log read here says why"), "{why}");
                assert!(hint.contains("its own log first"), "{hint}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn different_releases_of_server_and_ml_are_noted() {
        let mut e = evidence(&[("immich-server", "")], None);
        e.images_same_release = Some(false);
        assert!(diagnose(&e).notes[0].contains("different releases"));
    }
}
