//! Room kept for deletes on a full disk.
//!
//! When the disk that holds the data directory fills up, every write fails
//! (507, saying what to do), and so would the deletes that free space: a
//! SQLite delete appends to its write-ahead log. The node therefore keeps a
//! reserve file of [`RESERVE_BYTES`] in the data directory, and removes it
//! when a delete arrives while the disk is nearly full; the retention pass
//! writes it again once there is room.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Bytes kept in reserve.
pub(crate) const RESERVE_BYTES: u64 = 8 << 20;

fn path(dir: &Path) -> PathBuf {
    dir.join("reserve")
}

/// Bytes free for this process on the file system of `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Writes the reserve if it is missing and the disk has room for it with
/// some to spare; best effort (a failure leaves no partial file).
pub(crate) fn ensure(dir: &Path) {
    let path = path(dir);
    if path.exists() || free_bytes(dir).is_none_or(|free| free < 4 * RESERVE_BYTES) {
        return;
    }
    let tmp = dir.join("reserve.tmp");
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..RESERVE_BYTES / chunk.len() as u64 {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        tracing::debug!(error = %e, "could not write the disk reserve");
    }
}

/// Frees the reserve when the disk has less than it left, so that a delete
/// can run.
pub(crate) fn make_room(dir: &Path) {
    if free_bytes(dir).is_some_and(|free| free < RESERVE_BYTES) && path(dir).exists() {
        match std::fs::remove_file(path(dir)) {
            Ok(()) => tracing::warn!(
                dir = %dir.display(),
                "the disk is full: released the reserve so that deletes can free space"
            ),
            Err(e) => tracing::warn!(error = %e, "could not release the disk reserve"),
        }
    }
}
