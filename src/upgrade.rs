//! Binary upgrade without downtime (SIGUSR2) and the pid file that names the serving
//! process.
//!
//! The pid file always names the process that serves: it is replaced whole (written
//! beside it, then renamed over it) so a reader never sees half a number, and a process
//! removes it at exit only while it still holds its own PID, since after an upgrade it
//! belongs to the new process.

use std::io;
use std::path::{Path, PathBuf};

/// The pid file of this process, while it holds it.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

// === impl PidFile ===

impl PidFile {
    /// Writes this process's PID to `path`, replacing what it held (the previous
    /// process's PID on an upgrade, or a stale one after a crash).
    pub fn write(path: &Path) -> io::Result<Self> {
        let pid = std::process::id();
        let mut staging = path.as_os_str().to_owned();
        staging.push(format!(".{pid}.tmp"));
        let staging = PathBuf::from(staging);
        std::fs::write(&staging, format!("{pid}\n"))?;
        if let Err(e) = std::fs::rename(&staging, path) {
            let _ = std::fs::remove_file(&staging);
            return Err(e);
        }
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file still names this process.
    pub fn is_ours(&self) -> bool {
        std::fs::read_to_string(&self.path)
            .is_ok_and(|text| text.trim() == std::process::id().to_string())
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if self.is_ours() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_file_names_this_process_and_is_removed_only_while_ours() {
        let dir = std::env::temp_dir().join(format!("switchyard-pid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("switchyard.pid");
        std::fs::write(&path, "999999999\n").unwrap();

        let pid_file = PidFile::write(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        drop(pid_file);
        assert!(!path.exists(), "removed at exit");

        // A new process took the file over: leaving must not remove its PID.
        let pid_file = PidFile::write(&path).unwrap();
        std::fs::write(&path, "1\n").unwrap();
        assert!(!pid_file.is_ours());
        drop(pid_file);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_pid_file_in_a_missing_folder_is_an_error_and_leaves_nothing() {
        let path = std::env::temp_dir().join("switchyard-no-such-folder/x/switchyard.pid");
        assert!(PidFile::write(&path).is_err());
        assert!(!path.exists());
    }
}
