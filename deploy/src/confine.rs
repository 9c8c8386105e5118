//! Reading a file named by an untrusted manifest, confined to its folder: the name must be
//! relative and plain (no `..`, no `.`, no root or prefix), no folder on the way may be a
//! symlink, and the file itself is opened without following a symlink and without blocking (a
//! FIFO cannot hang the reader), then must be a regular file.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Why a name was refused or its file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfineError {
    #[error("absolute path refused (files must lie inside the bundle)")]
    Absolute,
    #[error("'..' or '.' in the path refused (files must lie inside the bundle)")]
    Escapes,
    #[error("empty path")]
    Empty,
    #[error("{0} is a symlink (refused: it could point outside the bundle)")]
    Symlink(String),
    #[error("not a regular file ({0})")]
    NotRegular(&'static str),
    #[error("missing")]
    Missing,
    #[error("{0}")]
    Io(String),
}

/// The checked path of `rel` inside `root`.
pub fn resolve(root: &Path, rel: &str) -> Result<PathBuf, ConfineError> {
    let p = Path::new(rel);
    if p.has_root() || rel.starts_with('/') || rel.starts_with('\\') {
        return Err(ConfineError::Absolute);
    }
    // Checked on the text: `Path::components` drops inner `.` segments.
    if rel.split(['/', '\\']).any(|s| s == ".." || s == ".") {
        return Err(ConfineError::Escapes);
    }
    let mut out = root.to_path_buf();
    let mut parts = 0;
    for c in p.components() {
        match c {
            Component::Normal(n) => {
                out.push(n);
                parts += 1;
            }
            Component::RootDir | Component::Prefix(_) => return Err(ConfineError::Absolute),
            Component::ParentDir | Component::CurDir => return Err(ConfineError::Escapes),
        }
    }
    if parts == 0 {
        return Err(ConfineError::Empty);
    }
    // Every folder between the root and the file must be a real folder.
    let mut dir = root.to_path_buf();
    let comps: Vec<_> = p.components().collect();
    for c in &comps[..comps.len() - 1] {
        dir.push(c);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => return Err(ConfineError::Symlink(c.as_os_str().to_string_lossy().into_owned())),
            Ok(m) if !m.is_dir() => return Err(ConfineError::NotRegular("a path component is not a folder")),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ConfineError::Missing),
            Err(e) => return Err(ConfineError::Io(e.to_string())),
        }
    }
    Ok(out)
}

/// What a file is, for the error message.
fn kind(t: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_block_device() || t.is_char_device() {
            return "a device";
        }
    }
    if t.is_dir() {
        "a folder"
    } else {
        "not a plain file"
    }
}

/// Reads `rel` inside `root` under the rules above.
pub fn read(root: &Path, rel: &str) -> Result<Vec<u8>, ConfineError> {
    let path = resolve(root, rel)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut opts, libc::O_NOFOLLOW | libc::O_NONBLOCK);
    let mut f = match opts.open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ConfineError::Missing),
        // O_NOFOLLOW on a symlink fails with ELOOP.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(ConfineError::Symlink(rel.to_string())),
        Err(e) => return Err(ConfineError::Io(e.to_string())),
    };
    let meta = f.metadata().map_err(|e| ConfineError::Io(e.to_string()))?;
    if !meta.is_file() {
        return Err(ConfineError::NotRegular(kind(meta.file_type())));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.read_to_end(&mut bytes).map_err(|e| ConfineError::Io(e.to_string()))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_outside_or_odd_are_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("k")).unwrap();
        std::fs::write(d.path().join("k/a"), b"x").unwrap();
        assert_eq!(read(d.path(), "k/a").unwrap(), b"x");
        assert_eq!(read(d.path(), "/etc/passwd"), Err(ConfineError::Absolute));
        assert_eq!(read(d.path(), "../x"), Err(ConfineError::Escapes));
        assert_eq!(read(d.path(), "k/./a"), Err(ConfineError::Escapes));
        assert_eq!(read(d.path(), ""), Err(ConfineError::Empty));
        assert_eq!(read(d.path(), "k/b"), Err(ConfineError::Missing));
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("k/l")).unwrap();
        assert!(matches!(read(d.path(), "k/l"), Err(ConfineError::Symlink(_))));
        std::os::unix::fs::symlink("/etc", d.path().join("e")).unwrap();
        assert!(matches!(read(d.path(), "e/passwd"), Err(ConfineError::Symlink(_))));
        assert_eq!(read(d.path(), "k"), Err(ConfineError::NotRegular("a folder")));
    }
}
