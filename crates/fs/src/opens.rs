//! The record of how each open inode of a tree mount is open, kept in a file beside the
//! mount so that a server taking the connection over ([`crate::takeover`]) opens those
//! inodes again the same way: the kernel refuses an open by passthrough with another
//! backing file, or through the page cache, while an inode has passthrough opens.
//!
//! One line per change, appended (`P ino backing count`, `C ino count`, `R ino`); the
//! last line of an inode wins. A server killed between a change and its line leaves a
//! count too high, never too low: it writes the line before it answers an open, and a
//! release it never recorded is sent again ([`crate::takeover::notify_resend`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, Write};
use std::path::Path;

/// Open inodes: ino -> how, and how many opens.
pub(crate) type Opens = HashMap<u64, (Mode, usize)>;

/// How an inode is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// By passthrough on this backing id of the connection.
    Passthrough(u32),
    /// Through the page cache.
    Cached,
}

/// The record file, appended to.
pub(crate) struct Journal {
    file: File,
}

impl Journal {
    /// Starts a record at `path`; with `replay`, first reads the one a previous server
    /// left there and returns its open inodes (ino -> mode, open count), rewritten
    /// compactly.
    pub(crate) fn open(path: &Path, replay: bool) -> io::Result<(Journal, Opens)> {
        let mut state = HashMap::new();
        if replay {
            match File::open(path) {
                Ok(f) => {
                    for line in io::BufReader::new(f).lines() {
                        apply(&mut state, &line?);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let tmp = path.with_extension("new");
        let mut file = File::create(&tmp)?;
        let mut out = String::new();
        for (ino, (mode, count)) in &state {
            out.push_str(&line(*ino, Some((*mode, *count))));
        }
        file.write_all(out.as_bytes())?;
        std::fs::rename(&tmp, path)?;
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        Ok((Journal { file }, state))
    }

    /// Records that `ino` is now open `state` (mode, count), or not at all.
    pub(crate) fn record(&mut self, ino: u64, state: Option<(Mode, usize)>) {
        if let Err(e) = self.file.write_all(line(ino, state).as_bytes()) {
            tracing::warn!("recording the opens of inode {ino}: {e}");
        }
    }
}

fn line(ino: u64, state: Option<(Mode, usize)>) -> String {
    match state {
        Some((Mode::Passthrough(id), count)) => format!("P {ino} {id} {count}\n"),
        Some((Mode::Cached, count)) => format!("C {ino} {count}\n"),
        None => format!("R {ino}\n"),
    }
}

/// Applies one line; a malformed one (a line cut short by a crash) is skipped.
fn apply(state: &mut HashMap<u64, (Mode, usize)>, line: &str) {
    let f: Vec<&str> = line.split(' ').collect();
    let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
    match (f.first().copied(), num(1)) {
        (Some("P"), Some(ino)) => {
            if let (Some(id), Some(count)) = (num(2).and_then(|i| u32::try_from(i).ok()), num(3)) {
                state.insert(ino, (Mode::Passthrough(id), count as usize));
            }
        }
        (Some("C"), Some(ino)) => {
            if let Some(count) = num(2) {
                state.insert(ino, (Mode::Cached, count as usize));
            }
        }
        (Some("R"), Some(ino)) => {
            state.remove(&ino);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_line_of_an_inode_wins_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opens");
        {
            let (mut j, state) = Journal::open(&path, true).unwrap();
            assert!(state.is_empty());
            j.record(5, Some((Mode::Passthrough(3), 1)));
            j.record(5, Some((Mode::Passthrough(3), 2)));
            j.record(7, Some((Mode::Cached, 1)));
            j.record(9, Some((Mode::Cached, 1)));
            j.record(9, None);
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"P 11 4")
            .unwrap();
        let (_, state) = Journal::open(&path, true).unwrap();
        let want: HashMap<u64, (Mode, usize)> =
            [(5, (Mode::Passthrough(3), 2)), (7, (Mode::Cached, 1))].into();
        assert_eq!(state, want);
        // Compacted, and a fresh start forgets it.
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
        let (_, state) = Journal::open(&path, false).unwrap();
        assert!(state.is_empty());
    }
}
