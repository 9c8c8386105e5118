//! Stage 4 — cache. Takes kernel keys and compiled kernels and gives them back across
//! processes: a sled database (default `cache/`, `--cache-dir`, `MANGROVE_CACHE_DIR`) of
//! bincode entries whose cubin hash is re-checked on every read. Also verify and gc.

mod entry;
mod storage;

use std::path::{Path, PathBuf};

pub use entry::{CacheEntry, Toolchain};
pub use storage::{Counters, EntrySummary, Lookup, LostEntries, MissReason, Quarantined, SledStorage, Storage};

use crate::key::KernelKey;

/// Default cache folder, relative to the working directory.
pub const DEFAULT_DIR: &str = "cache";

/// Errors of the cache stage, naming the folder involved.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache {path} is in use by pid {pid} (sled allows one process per cache; ask that process's service or use another --cache-dir)")]
    Locked { path: String, pid: String },
    #[error("cache {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("cache {path}")]
    Sled { path: String, source: Box<sled::Error> },
    #[error("cache {path}: encoding an entry")]
    Encode { path: String, source: bincode::error::EncodeError },
    #[error("cache {path}")]
    Io { path: String, source: std::io::Error },
}

/// The cache folder to use: the flag, else `MANGROVE_CACHE_DIR` (clap reads it), else `cache/`.
pub fn resolve_dir(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// Result of `cache verify`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    /// Entries read back.
    pub checked: usize,
    pub intact: usize,
    /// Keys found corrupt and evicted, with the reason.
    pub evicted: Vec<(String, String)>,
    /// The damaged sled folder moved aside when the cache was opened (its entries are gone and
    /// recompile on demand).
    pub quarantined: Option<Quarantined>,
    /// Entries that vanished from the sled files since the last write (they recompile on demand).
    pub lost: Option<LostEntries>,
}

impl VerifyReport {
    /// Whether verification found any damage (an evicted entry, a quarantined folder or vanished
    /// entries).
    pub fn found_damage(&self) -> bool {
        !self.evicted.is_empty() || self.quarantined.is_some() || self.lost.is_some()
    }
}

/// Result of `cache gc`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    pub before_bytes: u64,
    pub after_bytes: u64,
    pub removed: usize,
}

/// Result of `cache stats`: entries, bytes and the hit/miss counters of one cache folder.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheStats {
    pub dir: PathBuf,
    pub entries: usize,
    pub bytes: u64,
    pub counters: Counters,
}

impl std::fmt::Display for CacheStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.counters;
        writeln!(f, "cache {}: {} entries, {} bytes", self.dir.display(), self.entries, self.bytes)?;
        writeln!(f, "hits {}  misses {}  inserts {}  corrupt evicted {}", c.hits, c.misses, c.inserts, c.corrupt_evicted)
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(q) = &self.quarantined {
            writeln!(f, "the sled files were damaged ({}); moved to {}, the cache started empty", q.reason, q.moved_to.display())?;
        }
        if let Some(l) = &self.lost {
            writeln!(f, "the sled files were damaged: {} of the {} entries of the last write are gone", l.expected - l.found, l.expected)?;
        }
        writeln!(f, "checked {}  intact {}  evicted {}", self.checked, self.intact, self.evicted.len())?;
        for (k, why) in &self.evicted {
            writeln!(f, "  evicted {k}: {why}")?;
        }
        Ok(())
    }
}

impl std::fmt::Display for GcReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "removed {} entries: {} → {} bytes", self.removed, self.before_bytes, self.after_bytes)
    }
}

impl std::fmt::Display for EntrySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}  {:<16} {:<6} {:>8} B  last used {}", self.key, self.template, self.arch, self.bytes, self.last_used_unix)
    }
}

/// A kernel cache over some storage (sled in every real use).
pub struct Cache<S: Storage = SledStorage> {
    store: S,
}

impl Cache<SledStorage> {
    /// Opens the sled cache in `dir`.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        Ok(Self { store: SledStorage::open(dir)? })
    }
}

impl<S: Storage> Cache<S> {
    pub fn from_storage(store: S) -> Self {
        Self { store }
    }

    pub fn storage(&self) -> &S {
        &self.store
    }

    /// Looks `key` up; corrupt entries come back as a miss with the reason.
    pub fn get(&self, key: &KernelKey) -> Result<Lookup, CacheError> {
        self.store.get(key)
    }

    pub fn put(&self, key: &KernelKey, entry: &CacheEntry) -> Result<(), CacheError> {
        self.store.put(key, entry)
    }

    /// Removes the entry under `key`; says whether there was one.
    pub fn evict(&self, key: &KernelKey) -> Result<bool, CacheError> {
        self.store.remove(key)
    }

    pub fn list(&self) -> Result<Vec<EntrySummary>, CacheError> {
        self.store.list()
    }

    pub fn counters(&self) -> Result<Counters, CacheError> {
        self.store.counters()
    }

    /// Entries, bytes and counters; `dir` is the folder reported.
    pub fn stats(&self, dir: &Path) -> Result<CacheStats, CacheError> {
        let list = self.store.list()?;
        Ok(CacheStats { dir: dir.to_path_buf(), entries: list.len(), bytes: list.iter().map(|e| e.bytes).sum(), counters: self.store.counters()? })
    }

    /// Reads every entry back through the integrity check; corrupt ones are evicted.
    pub fn verify(&self) -> Result<VerifyReport, CacheError> {
        let mut r = VerifyReport { quarantined: self.store.quarantined().cloned(), lost: self.store.lost(), ..VerifyReport::default() };
        for s in self.store.list()? {
            r.checked += 1;
            let key = KernelKey::from_hex(&s.key).expect("listed keys are hex");
            match self.store.get(&key)? {
                Lookup::Hit(_) => r.intact += 1,
                Lookup::Miss(reason) => r.evicted.push((s.key, reason.to_string())),
            }
        }
        Ok(r)
    }

    /// Evicts least-recently-used entries until the stored bytes are at most `max_bytes`.
    pub fn gc(&self, max_bytes: u64) -> Result<GcReport, CacheError> {
        let mut entries = self.store.list()?;
        let before: u64 = entries.iter().map(|e| e.bytes).sum();
        entries.sort_by(|a, b| a.last_used_unix.cmp(&b.last_used_unix).then(a.key.cmp(&b.key)));
        let mut total = before;
        let mut removed = 0;
        for e in entries {
            if total <= max_bytes {
                break;
            }
            if self.store.remove(&KernelKey::from_hex(&e.key).expect("listed keys are hex"))? {
                total -= e.bytes;
                removed += 1;
            }
        }
        Ok(GcReport { before_bytes: before, after_bytes: total, removed })
    }
}
