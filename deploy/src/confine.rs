//! Reading a file named by an untrusted manifest, confined to its folder: the name must be
//! relative and plain (no `..`, no `.`, no root or prefix), no folder on the way may be a
//! symlink, and the file itself is opened without following a symlink and without blocking (a
//! FIFO cannot hang the reader), then must be a regular file. On unix the walk opens each
//! component relative to the folder before it, so nothing can be swapped between check and read.

use std::io::Read;
use std::path::{Component, Path};

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

/// The plain components of `rel`, checked on the text (no root, prefix, `..` or `.`).
fn components(rel: &str) -> Result<Vec<&str>, ConfineError> {
    let p = Path::new(rel);
    if p.has_root() || rel.starts_with('/') || rel.starts_with('\\') {
        return Err(ConfineError::Absolute);
    }
    // Checked on the text: `Path::components` drops inner `.` segments.
    if rel.split(['/', '\\']).any(|s| s == ".." || s == ".") {
        return Err(ConfineError::Escapes);
    }
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n.to_str().ok_or_else(|| ConfineError::Io("a path component is not UTF-8".into()))?),
            Component::RootDir | Component::Prefix(_) => return Err(ConfineError::Absolute),
            Component::ParentDir | Component::CurDir => return Err(ConfineError::Escapes),
        }
    }
    if out.is_empty() {
        return Err(ConfineError::Empty);
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

/// Opens `parts` under `root` one component at a time, each relative to the folder opened
/// before it (`openat`, never following a symlink): what was checked is what is read, so a
/// folder swapped for a symlink between a check and the open cannot redirect the read.
#[cfg(unix)]
fn open(root: &Path, parts: &[&str]) -> Result<std::fs::File, ConfineError> {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let cstr = |b: &[u8]| CString::new(b).map_err(|_| ConfineError::Io("a NUL byte in the path".into()));
    let at = |dir: Option<&OwnedFd>, name: &CString, flags: i32, part: &str| -> Result<OwnedFd, ConfineError> {
        // SAFETY: `name` is NUL-terminated and `dir` (when given) an open folder descriptor.
        let fd = unsafe {
            match dir {
                Some(d) => libc::openat(d.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC),
                None => libc::open(name.as_ptr(), flags | libc::O_CLOEXEC),
            }
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENOENT) => ConfineError::Missing,
                // O_NOFOLLOW on a symlink fails with ELOOP.
                Some(libc::ELOOP) => ConfineError::Symlink(part.to_string()),
                Some(libc::ENOTDIR) => ConfineError::NotRegular("a path component is not a folder"),
                _ => ConfineError::Io(e.to_string()),
            });
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let mut dir = at(None, &cstr(root.as_os_str().as_bytes())?, libc::O_RDONLY | libc::O_DIRECTORY, &root.display().to_string())?;
    let (last, folders) = parts.split_last().ok_or(ConfineError::Empty)?;
    for part in folders {
        let name = cstr(part.as_bytes())?;
        dir = match at(Some(&dir), &name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, part) {
            // O_DIRECTORY | O_NOFOLLOW on a symlink fails with ENOTDIR: say which it was.
            Err(ConfineError::NotRegular(_)) if is_symlink_at(&dir, &name) => return Err(ConfineError::Symlink(part.to_string())),
            other => other?,
        };
    }
    // Without blocking: a FIFO cannot hang the reader.
    let file = at(Some(&dir), &cstr(last.as_bytes())?, libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK, last)?;
    Ok(std::fs::File::from(file))
}

/// Whether `name` in the folder `dir` is a symlink (for the error message only).
#[cfg(unix)]
fn is_symlink_at(dir: &std::os::fd::OwnedFd, name: &std::ffi::CStr) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: `st` is written by fstatat before it is read; `name` is NUL-terminated.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFLNK
    }
}

/// Elsewhere: every folder on the way is checked not to be a symlink, then the path opened.
#[cfg(not(unix))]
fn open(root: &Path, parts: &[&str]) -> Result<std::fs::File, ConfineError> {
    let mut path = root.to_path_buf();
    for (i, part) in parts.iter().enumerate() {
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => return Err(ConfineError::Symlink(part.to_string())),
            Ok(m) if i + 1 < parts.len() && !m.is_dir() => return Err(ConfineError::NotRegular("a path component is not a folder")),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ConfineError::Missing),
            Err(e) => return Err(ConfineError::Io(e.to_string())),
        }
    }
    std::fs::File::open(&path).map_err(|e| ConfineError::Io(e.to_string()))
}

/// Reads `rel` inside `root` under the rules above.
pub fn read(root: &Path, rel: &str) -> Result<Vec<u8>, ConfineError> {
    let mut f = open(root, &components(rel)?)?;
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
        assert_eq!(read(d.path(), "k/a/b"), Err(ConfineError::NotRegular("a path component is not a folder")));
    }
}
