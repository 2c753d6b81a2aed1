//! CPython's `random` module, as far as the paper's passage selection uses it: the Mersenne
//! Twister MT19937 seeded from an int as `random.seed(n)` seeds it (`init_by_array` over the
//! int's 32-bit words), `getrandbits`, `_randbelow` and `shuffle`. The same seed gives the
//! same permutation as `random.seed(seed); random.shuffle(x)` in Python 3.
//!
//! Checked against values recorded from CPython by `scripts/make_pyrandom_reference.py`.

const N: usize = 624;
const M: usize = 397;

/// CPython's `random.Random`, seeded from a non-negative integer.
pub struct PyRandom {
    mt: [u32; N],
    index: usize,
}

impl PyRandom {
    /// `random.seed(seed)` for an int seed (CPython hashes neither ints nor their sign away:
    /// it uses the absolute value's 32-bit words, least significant first).
    pub fn new(seed: u64) -> Self {
        let mut key: Vec<u32> = Vec::new();
        let mut s = seed;
        while s > 0 {
            key.push(s as u32);
            s >>= 32;
        }
        if key.is_empty() {
            key.push(0);
        }
        let mut r = Self { mt: [0; N], index: N };
        r.init_by_array(&key);
        r
    }

    fn init_genrand(&mut self, s: u32) {
        self.mt[0] = s;
        for i in 1..N {
            self.mt[i] = 1812433253u32.wrapping_mul(self.mt[i - 1] ^ (self.mt[i - 1] >> 30)).wrapping_add(i as u32);
        }
        self.index = N;
    }

    fn init_by_array(&mut self, key: &[u32]) {
        self.init_genrand(19650218);
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            self.mt[i] =
                (self.mt[i] ^ (self.mt[i - 1] ^ (self.mt[i - 1] >> 30)).wrapping_mul(1664525)).wrapping_add(key[j]).wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            self.mt[i] = (self.mt[i] ^ (self.mt[i - 1] ^ (self.mt[i - 1] >> 30)).wrapping_mul(1566083941)).wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
        }
        self.mt[0] = 0x8000_0000;
    }

    /// The next 32 random bits (`genrand_uint32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            for k in 0..N {
                let y = (self.mt[k] & 0x8000_0000) | (self.mt[(k + 1) % N] & 0x7fff_ffff);
                let mut v = self.mt[(k + M) % N] ^ (y >> 1);
                if y & 1 == 1 {
                    v ^= 0x9908_b0df;
                }
                self.mt[k] = v;
            }
            self.index = 0;
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// `random.getrandbits(k)` for `1 <= k <= 32`.
    pub fn getrandbits(&mut self, k: u32) -> u32 {
        assert!((1..=32).contains(&k), "getrandbits({k}): only 1..=32 bits are implemented");
        self.next_u32() >> (32 - k)
    }

    /// `random._randbelow(n)` for `1 <= n < 2^32`: rejection sampling on `n.bit_length()`
    /// bits.
    pub fn randbelow(&mut self, n: u64) -> u64 {
        assert!((1..(1u64 << 32)).contains(&n), "randbelow({n}) out of range");
        let k = 64 - n.leading_zeros();
        loop {
            let r = self.getrandbits(k) as u64;
            if r < n {
                return r;
            }
        }
    }

    /// `random.shuffle(items)`: Fisher-Yates from the end, as CPython does it.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.randbelow(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values recorded from CPython 3 by scripts/make_pyrandom_reference.py.
    #[test]
    fn matches_cpython() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/pyrandom_reference.json")).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cases = doc["cases"].as_array().unwrap();
        assert!(!cases.is_empty());
        for c in cases {
            let seed = c["seed"].as_u64().unwrap();
            let mut r = PyRandom::new(seed);
            let bits: Vec<u64> = (0..5).map(|_| r.getrandbits(32) as u64).collect();
            assert_eq!(serde_json::json!(bits), c["getrandbits32"], "seed {seed}");
            for (n, key) in [(10usize, "shuffle10"), (1000, "shuffle1000_head")] {
                let mut r = PyRandom::new(seed);
                let mut v: Vec<usize> = (0..n).collect();
                r.shuffle(&mut v);
                let want: Vec<usize> = serde_json::from_value(c[key].clone()).unwrap();
                assert_eq!(&v[..want.len()], want.as_slice(), "seed {seed}, {key}");
            }
        }
    }
}
