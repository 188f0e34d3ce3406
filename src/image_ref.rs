//! An image reference as Docker and compose write it, parsed once:
//! `[registry[:port]/]path[:tag][@digest]`, or a bare image ID (`sha256:…`).
//!
//! Immich's images are recognised by the last segment of the repository path
//! (`immich-server`, `immich-machine-learning`), so `ghcr.io/immich-app/…`, `altran1502/…`,
//! mirrors and self-built images are all found (README.md, "How it finds the stack").

/// Last path segment of the server's image repository.
pub const SERVER_IMAGE: &str = "immich-server";
/// Last path segment of the machine-learning image repository.
pub const ML_IMAGE: &str = "immich-machine-learning";

/// Hardware variants of the machine-learning image, appended to the release in its tag
/// (`v1.119.0-cuda`, `release-openvino`).
pub const ML_SUFFIXES: &[&str] = &["-cuda", "-openvino", "-armnn", "-rknn", "-rocm"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageRef<'a> {
    /// Registry and path, `""` for a bare image ID.
    repo: &'a str,
    tag: Option<&'a str>,
    /// `sha256:…`, without the `@`.
    digest: Option<&'a str>,
}

impl<'a> ImageRef<'a> {
    pub fn parse(reference: &'a str) -> ImageRef<'a> {
        if reference.starts_with("sha256:") {
            return ImageRef {
                repo: "",
                tag: None,
                digest: None,
            };
        }
        let (name_tag, digest) = match reference.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (reference, None),
        };
        // A colon after the last slash starts the tag; one before it is a registry's port.
        let slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (repo, tag) = match name_tag[slash..].rfind(':') {
            Some(i) => (&name_tag[..slash + i], Some(&name_tag[slash + i + 1..])),
            None => (name_tag, None),
        };
        ImageRef { repo, tag, digest }
    }

    /// Registry and path as written (`""` for a bare image ID).
    pub fn repo(&self) -> &'a str {
        self.repo
    }

    pub fn tag(&self) -> Option<&'a str> {
        self.tag
    }

    pub fn digest(&self) -> Option<&'a str> {
        self.digest
    }

    /// The last segment of the repository path: `immich-server` of
    /// `ghcr.io/immich-app/immich-server:v1.119.0`.
    pub fn name(&self) -> &'a str {
        self.repo.rsplit('/').next().unwrap_or(self.repo)
    }

    /// Whether this is an image of the repository `name` (its last path segment), whatever the
    /// registry: `immich-app/immich-server-fork` is not an `immich-server` image.
    pub fn is_of(&self, name: &str) -> bool {
        self.name().eq_ignore_ascii_case(name)
    }

    pub fn is_server(&self) -> bool {
        self.is_of(SERVER_IMAGE)
    }

    pub fn is_ml(&self) -> bool {
        self.is_of(ML_IMAGE)
    }

    /// Repository and tag without Docker Hub's implied prefixes, so `docker.io/library/x:1`
    /// and `x:1` compare equal; the digest is kept.
    pub fn normalized(&self) -> String {
        let repo = self
            .repo
            .trim_start_matches("docker.io/")
            .trim_start_matches("library/");
        let mut out = repo.to_string();
        if let Some(t) = self.tag {
            out.push(':');
            out.push_str(t);
        }
        if let Some(d) = self.digest {
            out.push('@');
            out.push_str(d);
        }
        out
    }

    /// The tag's hardware suffix (`-cuda` of `v1.119.0-cuda`), `""` for a plain tag.
    pub fn ml_suffix(&self) -> &'a str {
        let tag = self.tag.unwrap_or("");
        ML_SUFFIXES
            .iter()
            .find(|s| tag.ends_with(*s))
            .map_or("", |s| &tag[tag.len() - s.len()..])
    }

    /// The tag without a hardware suffix: `v1.120.0` of `v1.120.0-cuda`, `release` of
    /// `release-cuda`.
    pub fn release_tag(&self) -> Option<&'a str> {
        let tag = self.tag?;
        Some(tag.strip_suffix(self.ml_suffix()).unwrap_or(tag))
    }

    /// The Immich release the tag names, as `vX.Y.Z`; none for a tag without a version
    /// number (`release`, `latest`).
    pub fn release(&self) -> Option<String> {
        let tag = self.tag?;
        let version = tag.split('-').next()?;
        let digits = version.strip_prefix('v').unwrap_or(version);
        digits
            .starts_with(|c: char| c.is_ascii_digit())
            .then(|| format!("v{digits}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_into_repo_tag_and_digest() {
        let r = ImageRef::parse("ghcr.io/immich-app/immich-server:v1.119.0");
        assert_eq!(r.repo(), "ghcr.io/immich-app/immich-server");
        assert_eq!(r.tag(), Some("v1.119.0"));
        assert_eq!(r.digest(), None);
        let r = ImageRef::parse("localhost:5000/immich-server");
        assert_eq!((r.repo(), r.tag()), ("localhost:5000/immich-server", None));
        let r = ImageRef::parse("valkey/valkey:8@sha256:ff");
        assert_eq!((r.repo(), r.tag()), ("valkey/valkey", Some("8")));
        assert_eq!(r.digest(), Some("sha256:ff"));
        let r = ImageRef::parse("mirror.local:5000/immich-server@sha256:ab");
        assert_eq!(
            (r.repo(), r.tag()),
            ("mirror.local:5000/immich-server", None)
        );
        assert_eq!(ImageRef::parse("sha256:abcd").repo(), "");
        assert_eq!(ImageRef::parse("sha256:abcd").tag(), None);
    }

    #[test]
    fn immich_images_are_found_by_the_last_path_segment() {
        for r in [
            "ghcr.io/immich-app/immich-server:v1.2@sha256:00",
            "altran1502/immich-server",
            "mirror.local:5000/immich-server",
            "immich-guard-test/immich-server:v1.119.0",
            "GHCR.IO/IMMICH-APP/IMMICH-SERVER:release",
        ] {
            assert!(ImageRef::parse(r).is_server(), "{r}");
        }
        for r in [
            "mirror.local:5000/other",
            "immich-app/immich-server-fork:v1",
            "ghcr.io/immich-app/immich-machine-learning:v1",
            "sha256:abcd",
        ] {
            assert!(!ImageRef::parse(r).is_server(), "{r}");
        }
        assert!(ImageRef::parse("ghcr.io/immich-app/immich-machine-learning:v1-cuda").is_ml());
    }

    #[test]
    fn releases_ignore_hardware_suffixes_and_digests() {
        let r = |s| ImageRef::parse(s).release();
        assert_eq!(
            r("ghcr.io/immich-app/immich-server:v1.120.0").as_deref(),
            Some("v1.120.0")
        );
        assert_eq!(
            r("ghcr.io/immich-app/immich-machine-learning:v1.120.0-cuda@sha256:ab").as_deref(),
            Some("v1.120.0")
        );
        assert_eq!(r("immich-server:1.99.0").as_deref(), Some("v1.99.0"));
        assert_eq!(r("ghcr.io/immich-app/immich-server:release"), None);
        assert_eq!(r("localhost:5000/immich-server"), None);
        let ml = ImageRef::parse("x/immich-machine-learning:release-openvino");
        assert_eq!(ml.ml_suffix(), "-openvino");
        assert_eq!(ml.release_tag(), Some("release"));
        assert_eq!(ImageRef::parse("x/immich-server:v1.2.3").ml_suffix(), "");
    }

    #[test]
    fn normalized_references_drop_docker_hubs_implied_prefixes() {
        assert_eq!(
            ImageRef::parse("docker.io/library/redis:7").normalized(),
            ImageRef::parse("redis:7").normalized()
        );
        assert_eq!(
            ImageRef::parse("ghcr.io/immich-app/immich-server:v1@sha256:ab").normalized(),
            "ghcr.io/immich-app/immich-server:v1@sha256:ab"
        );
    }
}
