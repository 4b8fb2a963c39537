//! Reading the files a config names (the config itself, certificates, keys, the admin
//! token) with a size bound. Below everything that reads them.

use std::path::Path;

/// Largest config file read: far above any real one, small enough that a path such as
/// `/dev/zero` fails at once instead of eating memory.
pub const MAX_CONFIG_FILE: u64 = 16 * 1024 * 1024;
/// Largest certificate, key or token file read.
pub const MAX_SECRET_FILE: u64 = 4 * 1024 * 1024;

/// Reads a whole file of at most `limit` bytes; a larger (or endless) one is an error,
/// not an allocation of whatever it holds.
pub fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::other(format!(
            "larger than the {} KiB allowed",
            limit / 1024
        )));
    }
    Ok(bytes)
}
