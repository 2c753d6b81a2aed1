//! Utilities below everything else: crash-safe writes, run locks, stable hashes, and CPython's random
//! shuffle (for the paper's passage selection).

pub mod atomic;
pub mod hash;
pub mod lock;
pub mod pyjson;
pub mod pyrandom;
