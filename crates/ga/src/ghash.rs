//! Just enough of GLib's `GHashTable` (2.74) to know its iteration order.
//!
//! qemu-ga reports the *first* unexpected argument in the order of the
//! GHashTable its QAPI input visitor keeps of not-yet-visited keys. To name
//! the same member when several are unexpected we replay that table: the
//! same string hash (`g_str_hash`, signed chars), prime moduli, quadratic
//! probing, tombstones and in-place resize.

const MIN_SHIFT: u32 = 3;
const UNUSED: u32 = 0;
const TOMBSTONE: u32 = 1;
const PRIME_MOD: [u32; 32] = [
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
    262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213, 33554393, 67108859, 134217689,
    268435399, 536870909, 1073741789, 2147483647,
];

/// `g_str_hash` over bytes treated as signed chars.
fn str_hash(key: &[u8]) -> u32 {
    let mut h: u32 = 5381;
    for &b in key {
        h = (h << 5).wrapping_add(h).wrapping_add(b as i8 as i32 as u32);
    }
    if h < 2 { 2 } else { h }
}

/// A GHashTable of string keys (a set), tracking slot positions only.
pub struct StrSet {
    shift: u32,
    hashes: Vec<u32>,
    keys: Vec<Option<Vec<u8>>>,
    nnodes: usize,
    noccupied: usize,
}

impl Default for StrSet {
    fn default() -> Self {
        Self::new()
    }
}

impl StrSet {
    /// An empty table (8 slots).
    pub fn new() -> Self {
        let size = 1usize << MIN_SHIFT;
        StrSet {
            shift: MIN_SHIFT,
            hashes: vec![UNUSED; size],
            keys: vec![None; size],
            nnodes: 0,
            noccupied: 0,
        }
    }

    fn size(&self) -> usize {
        1 << self.shift
    }

    fn mask(&self) -> usize {
        self.size() - 1
    }

    fn index(&self, hash: u32) -> usize {
        (hash.wrapping_mul(11) % PRIME_MOD[self.shift as usize]) as usize
    }

    fn lookup(&self, key: &[u8], hash: u32) -> usize {
        let mut idx = self.index(hash);
        let mut step = 0;
        let mut tombstone = None;
        while self.hashes[idx] != UNUSED {
            let h = self.hashes[idx];
            if h == hash && self.keys[idx].as_deref() == Some(key) {
                return idx;
            }
            if h == TOMBSTONE && tombstone.is_none() {
                tombstone = Some(idx);
            }
            step += 1;
            idx = (idx + step) & self.mask();
        }
        tombstone.unwrap_or(idx)
    }

    /// `g_hash_table_insert` of a new or existing key.
    pub fn insert(&mut self, key: &[u8]) {
        let hash = str_hash(key);
        let idx = self.lookup(key, hash);
        let old = self.hashes[idx];
        if old >= 2 {
            return;
        }
        self.hashes[idx] = hash;
        self.keys[idx] = Some(key.to_vec());
        self.nnodes += 1;
        if old == UNUSED {
            self.noccupied += 1;
            self.maybe_resize();
        }
    }

    /// `g_hash_table_remove`.
    pub fn remove(&mut self, key: &[u8]) {
        let hash = str_hash(key);
        let idx = self.lookup(key, hash);
        if self.hashes[idx] < 2 {
            return;
        }
        self.hashes[idx] = TOMBSTONE;
        self.keys[idx] = None;
        self.nnodes -= 1;
        self.maybe_resize();
    }

    fn maybe_resize(&mut self) {
        let size = self.size();
        let occ = self.noccupied;
        if (size > self.nnodes * 4 && size > 1 << MIN_SHIFT) || size <= occ + occ / 16 {
            self.resize();
        }
    }

    fn resize(&mut self) {
        let old_size = self.size();
        let want = (self.nnodes as f64 * 1.333) as usize;
        let mut shift = 0;
        let mut n = want;
        while n != 0 {
            n >>= 1;
            shift += 1;
        }
        self.shift = shift.max(MIN_SHIFT);
        let new_size = self.size();
        if new_size > old_size {
            self.hashes.resize(new_size, UNUSED);
            self.keys.resize(new_size, None);
        }
        let mut moved = vec![false; new_size.max(old_size)];
        for i in 0..old_size {
            let node_hash = self.hashes[i];
            if node_hash < 2 {
                self.hashes[i] = UNUSED;
                continue;
            }
            if moved[i] {
                continue;
            }
            self.hashes[i] = UNUSED;
            let mut hash = node_hash;
            let mut key = self.keys[i].take();
            loop {
                let mut slot = self.index(hash);
                let mut step = 0;
                while moved[slot] {
                    step += 1;
                    slot = (slot + step) & self.mask();
                }
                moved[slot] = true;
                let replaced = self.hashes[slot];
                self.hashes[slot] = hash;
                let evicted = std::mem::replace(&mut self.keys[slot], key);
                if replaced < 2 {
                    break;
                }
                hash = replaced;
                key = evicted;
            }
        }
        if new_size < old_size {
            self.hashes.truncate(new_size);
            self.keys.truncate(new_size);
        }
        self.noccupied = self.nnodes;
    }

    /// The first key in iteration order.
    pub fn first(&self) -> Option<&[u8]> {
        (0..self.size())
            .find(|&i| self.hashes[i] >= 2)
            .and_then(|i| self.keys[i].as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_first_of_abc_is_b_as_in_qemu_ga() {
        let mut set = StrSet::new();
        for k in ["a", "b", "c"] {
            set.insert(k.as_bytes());
        }
        assert_eq!(set.first(), Some(&b"b"[..]));
    }

    #[test]
    fn test_many_inserts_and_removes_keep_members() {
        let mut set = StrSet::new();
        for i in 0..100 {
            set.insert(format!("k{i}").as_bytes());
        }
        for i in 0..99 {
            set.remove(format!("k{i}").as_bytes());
        }
        assert_eq!(set.first(), Some(&b"k99"[..]));
    }
}
