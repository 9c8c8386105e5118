//! The storage trait the cache sits on, and its sled implementation (the real one, used by
//! tests too). Values are bincode; every read re-hashes the blob and evicts what fails.
//!
//! A damaged sled folder is repaired, not fatal: opening reads every record once (sled checks
//! each one's CRC), and when sled cannot open or read the folder (or panics on it) the folder is
//! renamed aside (`<dir>.corrupt-<unix time>-<pid>`, named in a warning with the reason) and an
//! empty cache starts in its place; kernels then recompile on demand. sled can also recover a
//! damaged log by dropping its tail silently: the entry count is kept beside it
//! (`mangrove.entries`), so entries that vanished are reported ([`LostEntries`]).

use std::path::{Path, PathBuf};

use super::entry::{now_unix, CacheEntry};
use super::CacheError;
use crate::key::KernelKey;

/// Why a lookup missed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum MissReason {
    /// No entry under the key.
    Absent,
    /// An entry existed but failed its integrity check and was evicted.
    Corrupt(String),
}

impl std::fmt::Display for MissReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MissReason::Absent => f.write_str("absent"),
            MissReason::Corrupt(d) => write!(f, "corrupt entry evicted ({d})"),
        }
    }
}

/// Result of a lookup.
#[derive(Debug)]
pub enum Lookup {
    Hit(Box<CacheEntry>),
    Miss(MissReason),
}

/// Persistent counters of a cache.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Counters {
    pub hits: u64,
    pub misses: u64,
    pub corrupt_evicted: u64,
    pub inserts: u64,
}

/// Summary of one stored entry, for `cache ls` and gc.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EntrySummary {
    pub key: String,
    pub template: String,
    pub arch: String,
    pub bytes: u64,
    pub last_used_unix: u64,
}

/// Key-value storage for cache entries.
pub trait Storage: Send + Sync {
    fn get(&self, key: &KernelKey) -> Result<Lookup, CacheError>;
    fn put(&self, key: &KernelKey, entry: &CacheEntry) -> Result<(), CacheError>;
    fn remove(&self, key: &KernelKey) -> Result<bool, CacheError>;
    fn list(&self) -> Result<Vec<EntrySummary>, CacheError>;
    fn counters(&self) -> Result<Counters, CacheError>;
    /// The damaged storage this open moved aside, if any.
    fn quarantined(&self) -> Option<&Quarantined> {
        None
    }
    /// Entries the storage held when last written but no longer has, if any vanished.
    fn lost(&self) -> Option<LostEntries> {
        None
    }
}

const KERNELS: &str = "kernels";
const ATIME: &str = "atime";
const STATS: &str = "stats";
const PID_FILE: &str = "mangrove.pid";
/// The entry count after the last write, beside sled's files.
const COUNT_FILE: &str = "mangrove.entries";

fn bincode_cfg() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// sled-backed storage. sled holds an exclusive lock on its folder: one process owns it.
pub struct SledStorage {
    db: sled::Db,
    kernels: sled::Tree,
    atime: sled::Tree,
    stats: sled::Tree,
    dir: PathBuf,
    /// Where a damaged folder found at open was moved (`None`: it opened cleanly).
    quarantined: Option<Quarantined>,
    /// Entries missing at open compared with the count the last writer left.
    lost: Option<LostEntries>,
}

/// Entries that vanished between the last write and this open (sled dropped a damaged tail).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LostEntries {
    /// Entries after the last write.
    pub expected: u64,
    /// Entries found at open.
    pub found: u64,
}

/// A damaged cache folder moved aside at open.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Quarantined {
    /// Where the damaged files now are.
    pub moved_to: PathBuf,
    /// What sled said about them.
    pub reason: String,
}

/// Why one attempt to open a sled folder failed.
enum OpenFailure {
    /// Another process holds it: never repaired, always reported.
    Locked,
    /// The files are damaged (sled found corrupt or truncated data, or panicked on them).
    Damaged(String),
    /// Anything else (permissions, no file descriptors left, …): reported, the files untouched.
    Other(String),
}

impl OpenFailure {
    fn of(e: &sled::Error) -> Self {
        let text = e.to_string();
        match e {
            sled::Error::Io(io) if text.contains("lock") || io.kind() == std::io::ErrorKind::WouldBlock => OpenFailure::Locked,
            sled::Error::Io(io) if matches!(io.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData) => OpenFailure::Damaged(text),
            sled::Error::Io(_) | sled::Error::CollectionNotFound(_) => OpenFailure::Other(text),
            sled::Error::Corruption { .. } | sled::Error::ReportableBug(_) | sled::Error::Unsupported(_) => OpenFailure::Damaged(text),
        }
    }
}

impl SledStorage {
    /// Opens (or creates) the store in `dir`; a folder held by another process is a clear error,
    /// a damaged one is moved aside with a warning and replaced by an empty cache.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        let path = || dir.display().to_string();
        std::fs::create_dir_all(dir).map_err(|source| CacheError::Io { path: path(), source })?;
        let reason = match Self::open_checked(dir) {
            Ok(s) => return Ok(s),
            Err(OpenFailure::Locked) => return Err(Self::locked(dir)),
            Err(OpenFailure::Other(reason)) => return Err(CacheError::Open { path: path(), reason }),
            Err(OpenFailure::Damaged(reason)) => reason,
        };
        let moved_to = quarantine(dir).map_err(|source| CacheError::Io { path: path(), source })?;
        eprintln!(
            "warning: cache {} is damaged ({reason}); moved it to {} and started an empty cache (kernels recompile on demand)",
            dir.display(),
            moved_to.display()
        );
        match Self::open_checked(dir) {
            Ok(s) => Ok(Self { quarantined: Some(Quarantined { moved_to, reason }), ..s }),
            Err(OpenFailure::Locked) => Err(Self::locked(dir)),
            Err(OpenFailure::Damaged(reason) | OpenFailure::Other(reason)) => Err(CacheError::Open { path: path(), reason }),
        }
    }

    fn locked(dir: &Path) -> CacheError {
        let pid = std::fs::read_to_string(dir.join(PID_FILE)).ok().map(|s| s.trim().to_owned());
        // The pid file is written by whoever opened last; a pid no longer running is not the holder.
        let pid = match pid {
            Some(p) if cfg!(target_os = "linux") && !Path::new("/proc").join(&p).exists() => format!("unknown (the pid file names {p}, which is not running)"),
            Some(p) => p,
            None => "unknown".into(),
        };
        CacheError::Locked { path: dir.display().to_string(), pid }
    }

    /// One attempt: open the folder and its trees and read every record back (sled checks each
    /// record's CRC as it reads), so damage shows here rather than in the middle of a request.
    fn open_checked(dir: &Path) -> Result<Self, OpenFailure> {
        let attempt = || -> Result<Self, sled::Error> {
            let db = sled::Config::new().path(dir).open()?;
            let (kernels, atime, stats) = (db.open_tree(KERNELS)?, db.open_tree(ATIME)?, db.open_tree(STATS)?);
            for tree in [&*db, &kernels, &atime, &stats] {
                for record in tree.iter() {
                    record?;
                }
            }
            Ok(Self { db, kernels, atime, stats, dir: dir.to_path_buf(), quarantined: None, lost: None })
        };
        // sled 0.34 panics on some damaged files instead of returning an error; the attempt's
        // state is dropped during the unwind and nothing of it is used afterwards.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(attempt));
        let s = match opened {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(OpenFailure::of(&e)),
            Err(panic) => {
                let what = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                return Err(OpenFailure::Damaged(format!("sled panicked: {}", what.unwrap_or_else(|| "no message".into()))));
            }
        };
        let _ = std::fs::write(dir.join(PID_FILE), std::process::id().to_string());
        let expected = std::fs::read_to_string(dir.join(COUNT_FILE)).ok().and_then(|t| t.trim().parse::<u64>().ok());
        let found = s.kernels.len() as u64;
        let lost = expected.filter(|&e| e > found).map(|expected| LostEntries { expected, found });
        if let Some(l) = lost {
            eprintln!(
                "warning: cache {} lost {} of the {} entries it held (its sled files were damaged); they recompile on demand",
                dir.display(),
                l.expected - l.found,
                l.expected
            );
            s.record_count();
        }
        Ok(Self { lost, ..s })
    }

    /// Writes the entry count beside sled's files (temp file + rename). Best effort: a failure
    /// only loses the ability to report vanished entries.
    fn record_count(&self) {
        let tmp = self.dir.join(format!("{COUNT_FILE}.tmp-{}", std::process::id()));
        if std::fs::write(&tmp, self.kernels.len().to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, self.dir.join(COUNT_FILE));
        }
    }

    fn err(&self, source: sled::Error) -> CacheError {
        CacheError::Sled { path: self.dir.display().to_string(), source: Box::new(source) }
    }

    fn bump(&self, counter: &str) -> Result<(), CacheError> {
        self.stats
            .update_and_fetch(counter, |old| {
                let n = old.map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).unwrap_or(0);
                Some((n + 1).to_le_bytes().to_vec())
            })
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn read_counter(&self, counter: &str) -> Result<u64, CacheError> {
        Ok(self
            .stats
            .get(counter)
            .map_err(|e| self.err(e))?
            .map(|b| u64::from_le_bytes(b.as_ref().try_into().unwrap_or([0; 8])))
            .unwrap_or(0))
    }

    fn touch(&self, key: &KernelKey) -> Result<(), CacheError> {
        self.atime.insert(key.0, &now_unix().to_le_bytes()).map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Writes raw bytes under a key, bypassing encoding: for tests that simulate corruption.
    #[doc(hidden)]
    pub fn put_raw(&self, key: &KernelKey, bytes: &[u8]) -> Result<(), CacheError> {
        self.kernels.insert(key.0, bytes).map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Raw stored bytes under a key.
    #[doc(hidden)]
    pub fn get_raw(&self, key: &KernelKey) -> Result<Option<Vec<u8>>, CacheError> {
        Ok(self.kernels.get(key.0).map_err(|e| self.err(e))?.map(|v| v.to_vec()))
    }

    /// Flushes to disk.
    pub fn flush(&self) -> Result<(), CacheError> {
        self.db.flush().map_err(|e| self.err(e))?;
        Ok(())
    }
}

/// Renames the damaged folder `dir` to a free sibling `<dir>.corrupt-<unix time>-<pid>[-n]` and
/// creates an empty `dir`; returns where the damaged files went.
fn quarantine(dir: &Path) -> std::io::Result<PathBuf> {
    let name = dir.file_name().map_or_else(|| "cache".into(), |n| n.to_string_lossy().into_owned());
    let stem = format!("{name}.corrupt-{}-{}", now_unix(), std::process::id());
    let free = (0..)
        .map(|n| dir.with_file_name(if n == 0 { stem.clone() } else { format!("{stem}-{n}") }))
        .find(|p| !p.exists())
        .expect("some sibling name is free");
    std::fs::rename(dir, &free)?;
    std::fs::create_dir_all(dir)?;
    Ok(free)
}

impl Storage for SledStorage {
    fn get(&self, key: &KernelKey) -> Result<Lookup, CacheError> {
        let Some(raw) = self.kernels.get(key.0).map_err(|e| self.err(e))? else {
            self.bump("misses")?;
            return Ok(Lookup::Miss(MissReason::Absent));
        };
        let corrupt = match bincode::serde::decode_from_slice::<CacheEntry, _>(&raw, bincode_cfg()) {
            Ok((entry, _)) if !entry.blob_intact() => Some("cubin does not match its blake3".to_string()),
            Ok((entry, _)) if entry.inputs.key() != *key => Some("entry belongs to another key".to_string()),
            Ok((entry, _)) => {
                self.bump("hits")?;
                self.touch(key)?;
                return Ok(Lookup::Hit(Box::new(entry)));
            }
            Err(e) => Some(format!("undecodable: {e}")),
        };
        let detail = corrupt.unwrap_or_default();
        self.remove(key)?;
        self.bump("corrupt_evicted")?;
        self.bump("misses")?;
        Ok(Lookup::Miss(MissReason::Corrupt(detail)))
    }

    fn put(&self, key: &KernelKey, entry: &CacheEntry) -> Result<(), CacheError> {
        let bytes = bincode::serde::encode_to_vec(entry, bincode_cfg())
            .map_err(|source| CacheError::Encode { path: self.dir.display().to_string(), source })?;
        self.kernels.insert(key.0, bytes).map_err(|e| self.err(e))?;
        self.touch(key)?;
        self.bump("inserts")?;
        self.kernels.flush().map_err(|e| self.err(e))?;
        self.record_count();
        Ok(())
    }

    fn remove(&self, key: &KernelKey) -> Result<bool, CacheError> {
        let had = self.kernels.remove(key.0).map_err(|e| self.err(e))?.is_some();
        self.atime.remove(key.0).map_err(|e| self.err(e))?;
        if had {
            self.record_count();
        }
        Ok(had)
    }

    fn list(&self) -> Result<Vec<EntrySummary>, CacheError> {
        let mut out = Vec::new();
        for item in self.kernels.iter() {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let key = KernelKey(k.as_ref().try_into().unwrap_or([0; 32]));
            let last_used_unix = self
                .atime
                .get(key.0)
                .map_err(|e| self.err(e))?
                .map(|b| u64::from_le_bytes(b.as_ref().try_into().unwrap_or([0; 8])))
                .unwrap_or(0);
            let (template, arch) = match bincode::serde::decode_from_slice::<CacheEntry, _>(&v, bincode_cfg()) {
                Ok((e, _)) => (e.inputs.template.clone(), e.inputs.arch.to_string()),
                Err(_) => ("<undecodable>".into(), "?".into()),
            };
            out.push(EntrySummary { key: key.to_hex(), template, arch, bytes: v.len() as u64, last_used_unix });
        }
        Ok(out)
    }

    fn quarantined(&self) -> Option<&Quarantined> {
        self.quarantined.as_ref()
    }

    fn lost(&self) -> Option<LostEntries> {
        self.lost
    }

    fn counters(&self) -> Result<Counters, CacheError> {
        Ok(Counters {
            hits: self.read_counter("hits")?,
            misses: self.read_counter("misses")?,
            corrupt_evicted: self.read_counter("corrupt_evicted")?,
            inserts: self.read_counter("inserts")?,
        })
    }
}
