//! The simulated KV cache: fixed-size blocks, reference counts, and an automatic prefix cache.
//!
//! As in vLLM, a full block of `block_size` prompt tokens is identified by a chained hash: the
//! hash of the parent block's hash and the block's token ids, so a block hash names the whole
//! prefix up to and including that block, and a different earlier block changes every later
//! hash. The first block's parent is a seed made of the model (a LoRA adapter is a model of its
//! own) and the request's `cache_salt` (vLLM puts the salt in the first block's extra keys and
//! the adapter in every block's; through the chain, a seed has the same effect). A partial last
//! block has no hash: only full blocks are cached.
//!
//! A block whose sequence ends keeps its hash and goes to an LRU list of evictable blocks; a
//! later prompt with the same prefix takes those blocks back and skips their prefill.
//! Allocation prefers never-cached free blocks, then evicts the least recently freed cached
//! block. Usage counts evictable blocks as free, as vLLM's `kv_cache_usage_perc` does.

use std::collections::{BTreeMap, HashMap};

use xxhash_rust::xxh3::xxh3_64;

/// The parent hash of a prompt's first block: prompts for another model (or adapter) or with
/// another cache salt share no block. A salt and no salt differ, and the model's length is
/// hashed before it, so no two (model, salt) pairs run together into the same bytes.
pub fn chain_seed(model: &str, salt: Option<&str>) -> u64 {
    let mut key = Vec::with_capacity(model.len() + salt.map_or(0, str::len) + 9);
    key.extend_from_slice(&(model.len() as u64).to_le_bytes());
    key.extend_from_slice(model.as_bytes());
    if let Some(salt) = salt {
        key.push(1);
        key.extend_from_slice(salt.as_bytes());
    }
    xxh3_64(&key)
}

/// The chained hashes of the full blocks of `tokens`, `block_size` tokens a block, the first
/// block's parent being `seed` (see [`chain_seed`]).
pub fn block_hashes(seed: u64, tokens: &[u32], block_size: u32) -> Vec<u64> {
    let block_size = (block_size as usize).max(1);
    let mut hashes = Vec::with_capacity(tokens.len() / block_size);
    // One buffer for every block: the parent's hash, then the block's ids, little-endian.
    let mut key = Vec::with_capacity(8 + 4 * block_size);
    let mut parent = seed;
    for block in tokens.chunks_exact(block_size) {
        key.clear();
        key.extend_from_slice(&parent.to_le_bytes());
        for id in block {
            key.extend_from_slice(&id.to_le_bytes());
        }
        parent = xxh3_64(&key);
        hashes.push(parent);
    }
    hashes
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
    fn a_shared_prefix_shares_its_full_blocks() {
        let seed = chain_seed("m", None);
        let a: Vec<u32> = (0..40).collect();
        let mut b = a.clone();
        b[35] = 99; // in the third block, which is partial
        b.push(7);
        let (ha, hb) = (block_hashes(seed, &a, 16), block_hashes(seed, &b, 16));
        // 40 tokens are two full blocks; the 8 left over are not hashed.
        assert_eq!(ha.len(), 2);
        assert_eq!(ha, hb);
        assert_eq!(block_hashes(seed, &a[..31], 16).len(), 1);
        assert_eq!(block_hashes(seed, &a[..32], 16), ha);
        assert!(block_hashes(seed, &a[..15], 16).is_empty());
    }

    #[test]
    fn a_different_earlier_block_changes_every_later_hash() {
        let seed = chain_seed("m", None);
        let a: Vec<u32> = (0..64).collect();
        let mut b = a.clone();
        b[3] = 1000;
        let (ha, hb) = (block_hashes(seed, &a, 16), block_hashes(seed, &b, 16));
        assert_eq!(ha.len(), 4);
        // Blocks 1..3 hold the same ids, but their parents differ.
        assert!(ha.iter().zip(&hb).all(|(x, y)| x != y), "{ha:?} {hb:?}");
        // The same ids in another order are another block.
        let mut c = a.clone();
        c.swap(20, 21);
        let hc = block_hashes(seed, &c, 16);
        assert_eq!(hc[0], ha[0]);
        assert_ne!(hc[1], ha[1]);
    }

    #[test]
    fn model_adapter_and_salt_separate_the_chains() {
        let tokens: Vec<u32> = (0..32).collect();
        let base = block_hashes(chain_seed("m", None), &tokens, 16);
        let seeds = [
            chain_seed("m", Some("tenant-a")),
            chain_seed("m", Some("tenant-b")),
            chain_seed("m", Some("")),
            chain_seed("sql-lora", None),
            chain_seed("sql-lora", Some("tenant-a")),
            // Model and salt cannot run together into another pair.
            chain_seed("mtenant-a", None),
            chain_seed("m\u{1}tenant-a", None),
        ];
        for (i, seed) in seeds.iter().enumerate() {
            let other = block_hashes(*seed, &tokens, 16);
            assert!(
                base.iter().zip(&other).all(|(x, y)| x != y),
                "seed {i} shares a block"
            );
            for (j, s) in seeds.iter().enumerate() {
                assert_eq!(i == j, seed == s, "seeds {i} and {j}");
            }
        }
        assert_eq!(chain_seed("m", None), chain_seed("m", None));
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
