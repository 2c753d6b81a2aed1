//! Utilities below everything else: crash-safe writes, stable hashes, and CPython's random
//! shuffle (for the paper's passage selection).

pub mod atomic;
pub mod hash;
pub mod pyjson;
pub mod pyrandom;
