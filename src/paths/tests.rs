//! The compiled table parses, and each row applies exactly where Immich says, as a table of
//! changes → verdicts.

use super::*;

const X86_64_V2: [&str; 6] = ["cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"];

fn x86(flags: &[&str]) -> Cpu {
    Cpu {
        arch: "x86_64".into(),
        flags: Some(flags.iter().map(|f| f.to_string()).collect()),
    }
}

fn change(from: Option<&str>, to: &str) -> Change {
    Change {
        from: from.map(str::to_string),
        to: to.into(),
        cpu: x86(&X86_64_V2),
        ..Change::default()
    }
}

fn rows_of(c: &Change) -> Vec<(String, Level)> {
    check(table(), c)
        .into_iter()
        .map(|v| (v.row, v.level))
        .collect()
}

fn ids(c: &Change) -> Vec<String> {
    rows_of(c).into_iter().map(|(id, _)| id).collect()
}

#[test]
fn the_compiled_table_parses_and_names_every_documented_constraint() {
    let ids: Vec<&str> = table().iter().map(|r| r.id.as_str()).collect();
    for want in [
        "downgrade",
        "typeorm-upgrade",
        "vectorchord-floor",
        "upload-mount-data-too-early",
        "upload-mount-legacy",
        "v3-pgvecto-rs-env",
        "v3-pgvecto-rs-image",
        "v3-ml-x86-64-v2",
        "v3-removed-ping-timeout",
        "v3-removed-preload",
        "v3-mobile-apps",
    ] {
        assert!(ids.contains(&want), "{want} missing from {ids:?}");
    }
    for row in table() {
        assert!(
            row.source.contains("immich"),
            "{}: a source names Immich's page: {}",
            row.id,
            row.source
        );
    }
}

#[test]
fn a_jump_past_1_137_without_1_132_to_1_136_is_held_with_the_way_through() {
    let c = change(Some("v1.120.0"), "v1.137.0");
    let v = check(table(), &c);
    let typeorm = v.iter().find(|v| v.row == "typeorm-upgrade").expect("held");
    assert_eq!(typeorm.level, Level::Hold);
    assert!(
        typeorm.reason.contains("Invalid upgrade path"),
        "{typeorm:?}"
    );
    assert!(typeorm.reason.contains("v1.120.0"), "{typeorm:?}");
    assert!(
        typeorm.way_through.contains("IMMICH_VERSION=v1.132.3")
            && typeorm
                .way_through
                .contains("then set IMMICH_VERSION=v1.137.0"),
        "{typeorm:?}"
    );
    assert_eq!(
        typeorm.source,
        "https://docs.immich.app/errors#typeorm-upgrade"
    );
}

#[test]
fn the_typeorm_step_is_known_from_the_baseline_or_the_kysely_migrations() {
    // Through v1.136.0: the baseline says it ran.
    assert!(ids(&change(Some("v1.136.0"), "v1.137.0")).is_empty());
    assert!(ids(&change(Some("v1.132.0"), "v2.1.0")).is_empty());
    // A baseline below 1.132, but the database records Kysely migrations (it ran one).
    let mut c = change(Some("v1.131.0"), "v1.137.0");
    c.database.kysely_migrations = Some(3);
    assert!(ids(&c).is_empty(), "{:?}", ids(&c));
    // A snapshot of the baseline recorded none: held.
    c.database.kysely_migrations = Some(0);
    assert_eq!(ids(&c), ["typeorm-upgrade"]);
    // Nothing known (no baseline, no snapshot): nothing said.
    assert!(!ids(&change(None, "v1.137.0")).contains(&"typeorm-upgrade".to_string()));
    // A tag that is no version is judged once its image's version is known.
    assert!(ids(&change(Some("v1.120.0"), "release")).is_empty());
}

#[test]
fn downgrades_are_held_unless_pinned_and_vectorchord_sets_a_floor() {
    let c = change(Some("v1.133.0"), "v1.132.0");
    assert_eq!(
        rows_of(&c),
        [
            ("downgrade".to_string(), Level::Hold),
            ("vectorchord-floor".to_string(), Level::Hold)
        ]
    );
    // A rollback `pin` allowed is no downgrade, but VectorChord still refuses it.
    let pinned = Change {
        rollback_pinned: true,
        ..c
    };
    assert_eq!(ids(&pinned), ["vectorchord-floor"]);
    // Below 1.133 on both sides: only the downgrade.
    assert_eq!(ids(&change(Some("v1.120.0"), "v1.119.0")), ["downgrade"]);
}

#[test]
fn v3_with_pgvecto_rs_is_held_by_env_or_database_image() {
    let mut c = change(Some("v2.7.5"), "v3.0.0");
    c.env
        .insert("DB_VECTOR_EXTENSION".into(), "pgvecto.rs".into());
    assert!(rows_of(&c).contains(&("v3-pgvecto-rs-env".into(), Level::Hold)));
    c.env
        .insert("DB_VECTOR_EXTENSION".into(), "vectorchord".into());
    assert!(!ids(&c).contains(&"v3-pgvecto-rs-env".to_string()));
    c.database.image = Some("tensorchord/pgvecto-rs:pg14-v0.2.0".into());
    assert!(rows_of(&c).contains(&("v3-pgvecto-rs-image".into(), Level::Hold)));
    c.database.image =
        Some("ghcr.io/immich-app/postgres:14-vectorchord0.4.3-pgvectors0.2.0".into());
    assert!(!ids(&c).contains(&"v3-pgvecto-rs-image".to_string()));
    // On v2 the same database is fine.
    let mut v2 = change(Some("v2.6.0"), "v2.7.5");
    v2.database.image = Some("tensorchord/pgvecto-rs:pg14-v0.2.0".into());
    assert!(ids(&v2).is_empty(), "{:?}", ids(&v2));
}

#[test]
fn v3_warnings_removed_variables_mobile_apps_and_the_cpu() {
    let mut c = change(Some("v2.7.5"), "v3.0.0");
    assert_eq!(rows_of(&c), [("v3-mobile-apps".into(), Level::Warn)]);
    c.env
        .insert("IMMICH_MACHINE_LEARNING_PING_TIMEOUT".into(), "2000".into());
    c.env
        .insert("MACHINE_LEARNING_PRELOAD__CLIP".into(), "ViT-B-32".into());
    c.cpu = x86(&["cx16", "popcnt", "ssse3"]);
    let v = check(table(), &c);
    let levels: Vec<(&str, Level)> = v.iter().map(|v| (v.row.as_str(), v.level)).collect();
    assert_eq!(
        levels,
        [
            ("v3-ml-x86-64-v2", Level::Warn),
            ("v3-removed-ping-timeout", Level::Warn),
            ("v3-removed-preload", Level::Warn),
            ("v3-mobile-apps", Level::Warn),
        ]
    );
    let cpu = &v[0];
    assert!(cpu.reason.contains("lahf_lm, sse4_1, sse4_2"), "{cpu:?}");
    // Another architecture, or flags not known: the CPU row says nothing.
    c.cpu = Cpu {
        arch: "aarch64".into(),
        flags: Some(Default::default()),
    };
    assert!(!ids(&c).contains(&"v3-ml-x86-64-v2".to_string()));
    c.cpu = Cpu {
        arch: "x86_64".into(),
        flags: None,
    };
    assert!(!ids(&c).contains(&"v3-ml-x86-64-v2".to_string()));
    // v3 → v3: the apps were updated with the first v3.
    assert!(!ids(&change(Some("v3.0.0"), "v3.1.0")).contains(&"v3-mobile-apps".to_string()));
}

#[test]
fn the_upload_mount_rows() {
    let mut c = change(Some("v1.119.0"), "v1.120.0");
    c.upload_mount = Some("/data".into());
    assert_eq!(ids(&c), ["upload-mount-data-too-early"]);
    c.env.insert("IMMICH_MEDIA_LOCATION".into(), "/data".into());
    assert!(ids(&c).is_empty());
    let mut v2 = change(Some("v1.140.0"), "v2.0.0");
    v2.upload_mount = Some("/usr/src/app/upload".into());
    assert_eq!(rows_of(&v2), [("upload-mount-legacy".into(), Level::Warn)]);
}

#[test]
fn only_the_variables_a_row_names_are_watched() {
    assert!(watched("DB_VECTOR_EXTENSION"));
    assert!(watched("MACHINE_LEARNING_PRELOAD__FACIAL_RECOGNITION"));
    assert!(watched("IMMICH_MEDIA_LOCATION"));
    assert!(!watched("DB_PASSWORD"));
    assert!(!watched("MACHINE_LEARNING_WORKERS"));
}

#[test]
fn a_bad_table_is_refused_naming_the_row_and_field() {
    let bad = r#"
[[row]]
id = "x"
from = "<=banana"
to = "*"
check = { kind = "always" }
verdict = "warn"
reason = "r"
source = "s"
way_through = "w"
"#;
    let e = parse(bad).unwrap_err().to_string();
    assert!(e.contains("row x: from \"<=banana\""), "{e}");
    let unknown = bad
        .replace("<=banana", "*")
        .replace("\"always\"", "\"sometimes\"");
    assert!(parse(&unknown).is_err());
}

#[test]
fn cpuinfo_flags_are_read_from_the_first_flags_line() {
    let text = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu cx16 sse4_2\n\nprocessor\t: 1\nflags\t\t: fpu\n";
    let flags = cpu::parse_flags(text).unwrap();
    assert!(flags.contains("cx16") && flags.contains("sse4_2") && flags.len() == 3);
    assert_eq!(cpu::parse_flags("processor : 0\n"), None);
}
