//! Progress of a long operation (a snapshot, a restore), typed: a numbered step of a known
//! count begins, or a note within a step. Only steps move a progress bar; a note is said
//! above it. On the control socket each is one `progress` line ([`Progress::line`]), read
//! back by the CLI with [`Progress::parse`].

/// A numbered step begins (`n` of `of`, from 1), or a note within the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Step { n: usize, of: usize, msg: String },
    Note(String),
}

impl Progress {
    /// The line the CLI prints, and the daemon sends as a `progress` line.
    pub fn line(&self) -> String {
        match self {
            Progress::Step { n, of, msg } => format!("[{n}/{of}] {msg}"),
            Progress::Note(line) => format!("{NOTE_INDENT}{line}"),
        }
    }

    /// A line made by [`Progress::line`]; `None` for any other line (a restore plan's, or a
    /// daemon older than typed progress).
    pub fn parse(line: &str) -> Option<Progress> {
        if let Some(note) = line.strip_prefix(NOTE_INDENT) {
            return Some(Progress::Note(note.to_string()));
        }
        let (head, msg) = line.strip_prefix('[')?.split_once("] ")?;
        let (n, of) = head.split_once('/')?;
        Some(Progress::Step {
            n: n.parse().ok()?,
            of: of.parse().ok()?,
            msg: msg.to_string(),
        })
    }

    /// What it says, without the step number or the indent (for logs and `status`).
    pub fn text(&self) -> &str {
        match self {
            Progress::Step { msg, .. } => msg,
            Progress::Note(note) => note,
        }
    }

    /// How many steps are done when this arrives: where a bar stands. `None` for a note,
    /// which never moves it.
    pub fn done(&self) -> Option<u64> {
        match self {
            Progress::Step { n, .. } => Some(n.saturating_sub(1) as u64),
            Progress::Note(_) => None,
        }
    }
}

const NOTE_INDENT: &str = "      ";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_read_back_as_the_same_progress() {
        for p in [
            Progress::Step {
                n: 3,
                of: 7,
                msg: "database: replaying".into(),
            },
            Progress::Note("set aside /x".into()),
        ] {
            assert_eq!(Progress::parse(&p.line()), Some(p));
        }
        // The plan's lines (and the pin's indented ones) are no progress.
        assert_eq!(Progress::parse("restore immich to s1"), None);
        assert_eq!(Progress::parse("   IMMICH_VERSION=v1"), None);
        assert_eq!(Progress::parse("[x] y"), None);
    }

    #[test]
    fn only_a_step_moves_the_bar() {
        let note = Progress::Note("joined the snapshot in progress".into());
        assert_eq!(note.done(), None);
        assert_eq!(note.text(), "joined the snapshot in progress");
        // A note that looks like a step is still a note on the wire.
        let tricky = Progress::Note("[2/5] not a step".into());
        assert_eq!(Progress::parse(&tricky.line()), Some(tricky.clone()));
        assert_eq!(tricky.done(), None);
        let first = Progress::Step {
            n: 1,
            of: 5,
            msg: "facts".into(),
        };
        assert_eq!(first.done(), Some(0));
        assert_eq!(first.text(), "facts");
    }
}
