//! The simulated KV cache: fixed-size blocks, reference counts, and an automatic prefix cache.
//!
//! As in vLLM, a full block of prompt tokens is identified by a chained hash (the hash of the
//! block's content seeded with the hash of the block before it), so a block hash names the whole
//! prefix up to and including that block. A block whose sequence ends keeps its hash and goes to
//! an LRU list of evictable blocks; a later prompt with the same prefix takes those blocks back
//! and skips their prefill. Allocation prefers never-cached free blocks, then evicts the least
//! recently freed cached block. Usage counts evictable blocks as free, as vLLM's
//! `kv_cache_usage_perc` does.

use std::collections::{BTreeMap, HashMap};

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Chained block hashes of `bytes` cut into blocks of `block_bytes`; only full blocks get a
/// hash, since only full blocks are cached. `seed` separates models and cache salts.
pub fn block_hashes(seed: u64, bytes: &[u8], block_bytes: usize) -> Vec<u64> {
    let mut prev = seed;
    bytes
        .chunks_exact(block_bytes.max(1))
        .map(|chunk| {
            prev = xxh3_64_with_seed(chunk, prev);
            prev
        })
        .collect()
}

/// The seed of a prompt's hash chain: requests for a different model or cache salt never share
/// blocks.
pub fn chain_seed(model: &str, salt: Option<&str>) -> u64 {
    let seed = xxh3_64_with_seed(model.as_bytes(), 0);
    match salt {
        Some(s) => xxh3_64_with_seed(s.as_bytes(), seed ^ 0x9e37_79b9_7f4a_7c15),
        None => seed,
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Block {
    ref_count: u32,
    /// Set once the block is full of prompt tokens; kept after release until evicted.
    hash: Option<u64>,
    /// Position in `evictable` while the block is free and cached.
    lru_stamp: u64,
}

/// Block ids are indices into the cache.
pub type BlockId = u32;

#[derive(Debug)]
pub struct KvCache {
    blocks: Vec<Block>,
    by_hash: HashMap<u64, BlockId>,
    /// Free blocks with no cached content, used first.
    free_plain: Vec<BlockId>,
    /// Free blocks with cached content, least recently released first.
    evictable: BTreeMap<u64, BlockId>,
    next_stamp: u64,
}

impl KvCache {
    pub fn new(num_blocks: u32) -> KvCache {
        KvCache {
            blocks: vec![Block::default(); num_blocks as usize],
            by_hash: HashMap::new(),
            // Reversed so that `pop` hands out block 0 first.
            free_plain: (0..num_blocks).rev().collect(),
            evictable: BTreeMap::new(),
            next_stamp: 0,
        }
    }

    pub fn num_blocks(&self) -> u32 {
        self.blocks.len() as u32
    }

    /// Blocks that an allocation could take now (never-used, freed, or cached but unreferenced).
    pub fn num_free(&self) -> u32 {
        (self.free_plain.len() + self.evictable.len()) as u32
    }

    /// Share of blocks held by running sequences, 0..1.
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        1.0 - f64::from(self.num_free()) / self.blocks.len() as f64
    }

    /// Blocks with cached content, referenced or not.
    pub fn num_cached(&self) -> usize {
        self.by_hash.len()
    }

    /// How many leading blocks of `hashes` are cached now, and how many of those are free (a
    /// free cached block leaves the free pool when it is taken back).
    pub fn match_prefix(&self, hashes: &[u64]) -> (usize, u32) {
        let mut matched = 0;
        let mut free = 0;
        for h in hashes {
            match self.by_hash.get(h) {
                Some(&id) => {
                    matched += 1;
                    if self.blocks[id as usize].ref_count == 0 {
                        free += 1;
                    }
                }
                None => break,
            }
        }
        (matched, free)
    }

    /// Takes a reference on the first `n` blocks of `hashes`, which [`match_prefix`] found cached.
    ///
    /// [`match_prefix`]: KvCache::match_prefix
    pub fn acquire_cached(&mut self, hashes: &[u64], n: usize, out: &mut Vec<BlockId>) {
        for h in &hashes[..n] {
            let Some(&id) = self.by_hash.get(h) else {
                break;
            };
            let block = &mut self.blocks[id as usize];
            if block.ref_count == 0 {
                self.evictable.remove(&block.lru_stamp);
            }
            block.ref_count += 1;
            out.push(id);
        }
    }

    /// Allocates one free block, evicting the least recently released cached block if no plain
    /// free block is left.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = match self.free_plain.pop() {
            Some(id) => id,
            None => {
                let (_, id) = self.evictable.pop_first()?;
                if let Some(h) = self.blocks[id as usize].hash.take() {
                    self.by_hash.remove(&h);
                }
                id
            }
        };
        self.blocks[id as usize].ref_count = 1;
        Some(id)
    }

    /// Records that `id` now holds the prefix named by `hash`. If another block already holds
    /// it (two identical prompts computed side by side), the first one stays the cached copy.
    pub fn set_hash(&mut self, id: BlockId, hash: u64) {
        let block = &mut self.blocks[id as usize];
        if block.hash.is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.by_hash.entry(hash) {
            e.insert(id);
            block.hash = Some(hash);
        }
    }

    /// Releases a sequence's blocks. Its last blocks are freed first, so they are evicted first:
    /// the shared head of a prefix outlives the private tail.
    pub fn release(&mut self, blocks: &[BlockId]) {
        for &id in blocks.iter().rev() {
            let block = &mut self.blocks[id as usize];
            block.ref_count = block.ref_count.saturating_sub(1);
            if block.ref_count > 0 {
                continue;
            }
            if block.hash.is_some() {
                block.lru_stamp = self.next_stamp;
                self.next_stamp += 1;
                self.evictable.insert(block.lru_stamp, id);
            } else {
                self.free_plain.push(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_chained_and_only_full_blocks_count() {
        let a = block_hashes(1, b"aaaabbbbcc", 4);
        assert_eq!(a.len(), 2);
        let b = block_hashes(1, b"xaaabbbb", 4);
        // A different first block changes every later hash, though block 2 is the same text.
        assert_ne!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        assert_eq!(block_hashes(1, b"aaaabbbb", 4), a);
        assert_ne!(block_hashes(2, b"aaaabbbb", 4), a);
    }

    #[test]
    fn released_blocks_stay_cached_until_evicted_lru() {
        let mut kv = KvCache::new(3);
        let hashes = [10, 11];
        let mut held = Vec::new();
        for &h in &hashes {
            let id = kv.allocate().unwrap();
            kv.set_hash(id, h);
            held.push(id);
        }
        assert!((kv.usage() - 2.0 / 3.0).abs() < 1e-9);
        kv.release(&held);
        assert_eq!(kv.usage(), 0.0);
        assert_eq!(kv.match_prefix(&hashes), (2, 2));
        // The plain free block goes first, then the cached tail block (11) before the head (10).
        let _plain = kv.allocate().unwrap();
        assert_eq!(kv.match_prefix(&hashes), (2, 2));
        let _evicted = kv.allocate().unwrap();
        assert_eq!(kv.match_prefix(&hashes), (1, 1));
        assert_eq!(kv.match_prefix(&[10]), (1, 1));
    }

    #[test]
    fn acquiring_a_cached_block_takes_it_out_of_the_free_pool() {
        let mut kv = KvCache::new(2);
        let id = kv.allocate().unwrap();
        kv.set_hash(id, 7);
        kv.release(&[id]);
        assert_eq!(kv.num_free(), 2);
        let mut got = Vec::new();
        kv.acquire_cached(&[7], 1, &mut got);
        assert_eq!(got, vec![id]);
        assert_eq!(kv.num_free(), 1);
        // A second holder shares the block; it is free only when both release it.
        kv.acquire_cached(&[7], 1, &mut got);
        kv.release(&[id]);
        assert_eq!(kv.num_free(), 1);
        kv.release(&[id]);
        assert_eq!(kv.num_free(), 2);
    }

    #[test]
    fn allocation_fails_when_full() {
        let mut kv = KvCache::new(1);
        assert!(kv.allocate().is_some());
        assert!(kv.allocate().is_none());
        assert_eq!(kv.usage(), 1.0);
    }
}
