//! One process at a time per piece of work: an exclusive advisory lock (`flock`) on a file,
//! held while the value lives. The kernel releases it when the process ends, however it
//! ends, so a killed run never leaves a stale lock behind.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// A held lock; dropping it releases the lock.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    path: PathBuf,
}

impl RunLock {
    /// Takes the lock at `path` (the file is created if missing) for `what` (a description
    /// of the work, written into the file with this process's id for whoever finds it held).
    ///
    /// Errors: the lock is held by another process (the message names it and says what to
    /// do), or the file cannot be created.
    pub fn acquire(path: &Path, what: &str) -> anyhow::Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening the lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0)?;
                file.rewind()?;
                writeln!(file, "pid {}: {what}", std::process::id())?;
                Ok(Self { _file: file, path: path.to_path_buf() })
            }
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() { "another process" } else { holder };
                anyhow::bail!(
                    "{holder} is already doing this work ({}); wait for it to finish or stop it, then run `make` again",
                    path.display()
                )
            }
            Err(TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_name_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks/x.lock");
        let first = RunLock::acquire(&path, "train-adapters --iter 0").unwrap();
        let e = RunLock::acquire(&path, "train-adapters --iter 0").unwrap_err().to_string();
        assert!(e.contains(&format!("pid {}: train-adapters --iter 0", std::process::id())), "{e}");
        assert!(e.contains("x.lock") && e.contains("wait for it"), "{e}");
        drop(first);
        let again = RunLock::acquire(&path, "evaluate").unwrap();
        assert_eq!(again.path(), path);
    }
}
