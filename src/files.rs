//! Files on disk: every output is written to a temporary name in its own directory, flushed, and
//! renamed into place, so a crash never leaves a half-written file under the real name; leftover
//! temporary files of a killed process are removed on the next start ([`remove_stale_temps`]); an
//! exclusive lock keeps two processes out of one run directory ([`DirLock`]); and the sha256 that
//! run records pin files with.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What marks a temporary file: `.NAME.tmp-PID`.
const TMP_MARK: &str = ".tmp-";

/// The temporary sibling `path` is first written to: `.NAME.tmp-PID`, or, when that would pass the
/// file system's 255-byte limit on names, `.HASH.tmp-PID` (a hash of the name).
fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let pid = std::process::id();
    let tmp = format!(".{name}{TMP_MARK}{pid}");
    if tmp.len() <= 255 {
        path.with_file_name(tmp)
    } else {
        path.with_file_name(format!(".{}{TMP_MARK}{pid}", &sha256_hex(name.as_bytes())[..16]))
    }
}

/// Removes the temporary files (`.NAME.tmp-PID`) that a killed process left in `dir`, and in its
/// subdirectories down to `depth` levels. Call only while holding the directory's lock (or for a
/// directory no other process writes): any temporary file found is then stale.
pub fn remove_stale_temps(dir: &Path, depth: usize) -> Result<usize> {
    let mut removed = 0;
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(0) };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if depth > 0 {
                removed += remove_stale_temps(&path, depth - 1)?;
            }
        } else if name.starts_with('.')
            && name.rsplit_once(TMP_MARK).is_some_and(|(_, pid)| pid.parse::<u32>().is_ok())
        {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove the stale temporary file {}", path.display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(())
    })
}

/// Lets `write` produce the file at a temporary path, then renames it to `path`.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = tmp_path(path);
    let result = write(&tmp).and_then(|()| {
        std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", tmp.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// Serialises `value` as pretty JSON to `path`, atomically; a file that already holds exactly these
/// bytes is left alone (so reading a finished run needs no write access).
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    if std::fs::read(path).is_ok_and(|old| old == text.as_bytes()) {
        return Ok(());
    }
    write_atomic(path, text.as_bytes())
}

/// An exclusive lock on a directory (`flock` on its `.lock` file): one process at a time runs,
/// resumes or reports a run. The kernel releases it when the process ends, however it ends. The
/// lock file holds the holder's pid and command line, so the next process can say who has it.
pub struct DirLock {
    _file: Option<std::fs::File>,
}

/// The name of the lock file in a locked directory.
pub const LOCK_FILE: &str = ".lock";

impl DirLock {
    /// Takes the lock of `dir` (which must exist), or fails with a one-line error naming the
    /// process that holds it. On a read-only file system nothing can change the directory, so no
    /// lock is needed and none is taken.
    pub fn acquire(dir: &Path) -> Result<Self> {
        use std::os::unix::io::AsRawFd;
        let path = dir.join(LOCK_FILE);
        let file =
            match std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)
            {
                Ok(f) => f,
                Err(e) if e.raw_os_error() == Some(libc::EROFS) => return Ok(Self { _file: None }),
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot open the lock file {}", path.display()))
                }
            };
        // SAFETY: flock on a file descriptor we own; LOCK_NB makes it return at once.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            anyhow::bail!(
                "{} is in use by another process ({}); wait for it to finish",
                dir.display(),
                if holder.is_empty() { "unknown" } else { holder }
            );
        }
        let me = format!(
            "pid {}: {}",
            std::process::id(),
            std::env::args().collect::<Vec<_>>().join(" ").chars().take(300).collect::<String>()
        );
        let _ = file.set_len(0).and_then(|()| (&file).write_all(me.as_bytes()));
        Ok(Self { _file: Some(file) })
    }

    /// Takes an exclusive lock on the file `path` (created if needed), waiting for another holder
    /// to finish: for work that a second process should wait for rather than redo.
    pub fn wait_for(path: &Path) -> Result<Self> {
        use std::os::unix::io::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        // SAFETY: flock on a file descriptor we own; it blocks until the lock is ours.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            anyhow::bail!("cannot lock {}: {}", path.display(), std::io::Error::last_os_error());
        }
        Ok(Self { _file: Some(file) })
    }

    /// Whether the directory is on a read-only file system (no lock was needed).
    pub fn read_only(&self) -> bool {
        self._file.is_none()
    }
}

/// Creates `dir` (and parents), with an error that names it.
pub fn create_dir(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!("output path {} exists and is not a directory", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create directory {}", dir.display()))
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file's bytes, in hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(sha256_hex(&bytes))
}

/// sha256 of some bytes, in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Memory the system can give this process without swapping (`MemAvailable` of /proc/meminfo), or
/// None where that cannot be read.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuses a job that needs more memory than the system has available, before anything is
/// allocated: `what` says what needs it and which settings make it smaller.
pub fn check_memory(need: u64, what: &str) -> Result<()> {
    if let Some(available) = available_memory() {
        if need > available / 10 * 9 {
            return crate::config::usage(format!(
                "{what} needs about {:.1} GiB of memory, more than the {:.1} GiB available",
                need as f64 / (1u64 << 30) as f64,
                available as f64 / (1u64 << 30) as f64
            ));
        }
    }
    Ok(())
}

/// Free bytes on the file system holding `dir` (None if it cannot be told).
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain old data; zeroed is a valid value for it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and st a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let failed = write_atomic_with(&p, |_| anyhow::bail!("disk full"));
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"two", "a failed write keeps the old file");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file is left");
    }

    /// Regression (issue 15, defect 13): a 255-byte file name cannot take a prefix and a suffix.
    #[test]
    fn prepare_out_with_a_255_byte_name_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n".repeat(255));
        write_atomic(&p, b"ok").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"ok");
    }

    /// Regression (issue 15, defect 12): temporary files of a killed process are removed on start;
    /// other files, and names that merely contain the marker, are kept.
    #[test]
    fn stale_temporary_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("gen-00");
        std::fs::create_dir(&sub).unwrap();
        for f in [".run.json.tmp-123", ".model.json.tmp-99"] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        std::fs::write(sub.join(".corpus.jsonl.tmp-7"), b"x").unwrap();
        std::fs::write(dir.path().join("run.json"), b"{}").unwrap();
        std::fs::write(dir.path().join("notes.tmp-draft"), b"mine").unwrap();
        assert_eq!(remove_stale_temps(dir.path(), 1).unwrap(), 3);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["gen-00", "notes.tmp-draft", "run.json"]);
        assert_eq!(std::fs::read_dir(&sub).unwrap().count(), 0);
    }

    /// Regression (issue 15, defect 3): a second lock on a directory fails and names the holder;
    /// the lock is released with its holder.
    #[test]
    fn a_locked_run_directory_names_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        // flock locks belong to open file descriptions: a second open in this process conflicts too.
        let e = DirLock::acquire(dir.path()).err().expect("a second lock must fail").to_string();
        assert!(
            e.contains("in use by another process") && e.contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn unchanged_json_is_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_json(&p, &serde_json::json!({"a": 1})).unwrap();
        let before = std::fs::metadata(&p).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        write_json(&p, &serde_json::json!({"a": 1})).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().modified().unwrap(), before);
    }
}
