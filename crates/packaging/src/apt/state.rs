//! The private index state: an append-only JSON-lines log of added and
//! removed index entries, replayed incrementally (only the bytes appended
//! since the last read), and compacted when most of it is dead.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::AptError;

/// One package in one suite/component index.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    /// Insertion sequence number (orders the Packages files).
    pub seq: u64,
    /// Suite.
    pub suite: String,
    /// Component.
    pub component: String,
    /// Package name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Architecture.
    pub arch: String,
    /// Path relative to the repository root (`pool/...`).
    pub filename: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
    /// The full Packages stanza, ending in a newline (no blank line).
    pub stanza: String,
}

/// One line of the log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Record {
    /// An entry was added.
    Add(Entry),
    /// The entry with this sequence number was removed.
    Del {
        /// Sequence number.
        seq: u64,
    },
}

/// The replayed state plus where the replay stopped.
#[derive(Debug, Default)]
pub struct State {
    /// Live entries by sequence number.
    pub entries: BTreeMap<u64, Entry>,
    /// Next sequence number.
    pub next_seq: u64,
    /// Log records that no longer describe a live entry.
    dead: usize,
    /// Inode of the log last read.
    ino: u64,
    /// Bytes of the log replayed.
    len: u64,
}

impl State {
    /// Brings the state up to date with the log at `path` (call under the lock).
    pub fn refresh(&mut self, path: &Path) -> Result<(), AptError> {
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                *self = State::default();
                return Ok(());
            }
            Err(e) => return Err(AptError::io("opening", path)(e)),
        };
        let meta = file.metadata().map_err(AptError::io("reading", path))?;
        if meta.ino() != self.ino || meta.len() < self.len {
            *self = State {
                ino: meta.ino(),
                ..State::default()
            };
        }
        if meta.len() == self.len {
            return Ok(());
        }
        file.seek(SeekFrom::Start(self.len))
            .map_err(AptError::io("reading", path))?;
        let mut tail = String::new();
        file.read_to_string(&mut tail)
            .map_err(AptError::io("reading", path))?;
        // Only complete lines: a crashed writer may have left a partial one.
        let complete = tail.rfind('\n').map(|i| i + 1).unwrap_or(0);
        for (n, line) in tail[..complete].lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let record: Record = serde_json::from_str(line).map_err(|e| AptError::State {
                path: path.to_path_buf(),
                reason: format!("record {} after byte {}: {e}", n + 1, self.len),
            })?;
            self.apply(record);
        }
        self.len += complete as u64;
        Ok(())
    }

    fn apply(&mut self, record: Record) {
        match record {
            Record::Add(e) => {
                self.next_seq = self.next_seq.max(e.seq + 1);
                self.entries.insert(e.seq, e);
            }
            Record::Del { seq } => {
                if self.entries.remove(&seq).is_some() {
                    self.dead += 2;
                }
            }
        }
    }

    /// Appends additions and removals to the log and applies them.
    pub fn commit(
        &mut self,
        path: &Path,
        added: Vec<Entry>,
        removed: Vec<u64>,
    ) -> Result<(), AptError> {
        let mut buf = Vec::new();
        let records: Vec<Record> = added
            .into_iter()
            .map(Record::Add)
            .chain(removed.into_iter().map(|seq| Record::Del { seq }))
            .collect();
        for r in &records {
            serde_json::to_writer(&mut buf, r).map_err(|e| AptError::State {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            buf.push(b'\n');
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(AptError::io("opening", path))?;
        file.write_all(&buf)
            .map_err(AptError::io("appending to", path))?;
        let meta = file.metadata().map_err(AptError::io("reading", path))?;
        if meta.ino() != self.ino {
            self.ino = meta.ino();
        }
        // We hold the lock: nobody else appended since `refresh`.
        self.len = meta.len();
        for r in records {
            self.apply(r);
        }
        if self.dead > 1000 && self.dead > self.entries.len() * 2 {
            self.compact(path)?;
        }
        Ok(())
    }

    /// Rewrites the log with only the live entries.
    fn compact(&mut self, path: &Path) -> Result<(), AptError> {
        let mut buf = Vec::new();
        for e in self.entries.values() {
            serde_json::to_writer(&mut buf, &Record::Add(e.clone())).map_err(|e| {
                AptError::State {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                }
            })?;
            buf.push(b'\n');
        }
        let tmp = PathBuf::from(format!("{}.compact", path.display()));
        std::fs::write(&tmp, &buf).map_err(AptError::io("writing", &tmp))?;
        std::fs::rename(&tmp, path).map_err(AptError::io("renaming to", path))?;
        let meta = std::fs::metadata(path).map_err(AptError::io("reading", path))?;
        self.ino = meta.ino();
        self.len = meta.len();
        self.dead = 0;
        Ok(())
    }
}
