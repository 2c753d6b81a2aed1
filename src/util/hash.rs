//! Stable hashes: the content hashes that stamp stages and adapters, and the seeds derived
//! from the experiment's seed and an id.

use serde::Serialize;

/// A stable hash (FNV-1a 64) of a value's canonical JSON, as 16 hex digits.
pub fn content_hash<T: Serialize>(value: &T) -> String {
    let json = serde_json::to_string(value).expect("serializable");
    hash_bytes(json.as_bytes())
}

/// FNV-1a 64 of `bytes`, as 16 hex digits.
pub fn hash_bytes(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// A stable 63-bit seed from the experiment seed and a label (an id such as
/// `adapter/a000-t01-c0`), so every random draw is reproducible from the config.
pub fn derive_seed(seed: u64, label: &str) -> u64 {
    let h = hash_bytes(format!("{seed}/{label}").as_bytes());
    u64::from_str_radix(&h, 16).unwrap_or(0) >> 1
}
