//! The storage trait the cache sits on, and its sled implementation (the real one, used by
//! tests too). Values are bincode; every read re-hashes the blob and evicts what fails.

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
}

const KERNELS: &str = "kernels";
const ATIME: &str = "atime";
const STATS: &str = "stats";
const PID_FILE: &str = "mangrove.pid";

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
}

impl SledStorage {
    /// Opens (or creates) the store in `dir`; a folder held by another process is a clear error.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        std::fs::create_dir_all(dir).map_err(|source| CacheError::Io { path: dir.display().to_string(), source })?;
        let db = sled::Config::new().path(dir).open().map_err(|e| {
            let text = e.to_string();
            if text.contains("lock") || text.contains("Resource temporarily unavailable") {
                let pid = std::fs::read_to_string(dir.join(PID_FILE)).ok().map(|s| s.trim().to_owned());
                CacheError::Locked { path: dir.display().to_string(), pid: pid.unwrap_or_else(|| "unknown".into()) }
            } else {
                CacheError::Open { path: dir.display().to_string(), reason: text }
            }
        })?;
        let _ = std::fs::write(dir.join(PID_FILE), std::process::id().to_string());
        let sled_err = |source| CacheError::Sled { path: dir.display().to_string(), source: Box::new(source) };
        Ok(Self {
            kernels: db.open_tree(KERNELS).map_err(sled_err)?,
            atime: db.open_tree(ATIME).map_err(sled_err)?,
            stats: db.open_tree(STATS).map_err(sled_err)?,
            db,
            dir: dir.to_path_buf(),
        })
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
        Ok(())
    }

    fn remove(&self, key: &KernelKey) -> Result<bool, CacheError> {
        let had = self.kernels.remove(key.0).map_err(|e| self.err(e))?.is_some();
        self.atime.remove(key.0).map_err(|e| self.err(e))?;
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

    fn counters(&self) -> Result<Counters, CacheError> {
        Ok(Counters {
            hits: self.read_counter("hits")?,
            misses: self.read_counter("misses")?,
            corrupt_evicted: self.read_counter("corrupt_evicted")?,
            inserts: self.read_counter("inserts")?,
        })
    }
}
