//! The embedding cache: one model's recent embeddings, keyed by a hash of
//! the preprocessed input, so an identical input is answered without a
//! forward pass (and without entering the queue).
//!
//! Owns [`CacheKey`] (SHA-256 over the model fingerprint, the role and
//! instruction, and what the prepared data writes into it) and
//! [`EmbeddingCache`], a least-recently-used map bounded in bytes with its
//! hit/miss/eviction metrics. It stores the model's unnormalised vectors:
//! normalisation is applied after the cache, so one entry serves both
//! `normalize` settings. It never runs a model and knows nothing of HTTP.
//!
//! Why SHA-256: the cache is shared by every client of the model, so a key
//! collision would hand one client's vector to another; a collision-resistant
//! hash makes crafting one infeasible, where a fast non-cryptographic hash
//! (xxh3) would not. Its cost (1.9 ms for a 3x224x224 CLIP image on a shared
//! 2-core VM, see the README) is small beside a forward pass, and it runs on
//! the preprocessing pool, not on the request's task.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use prometheus::{IntCounter, IntGauge};
use sha2::{Digest, Sha256};

use crate::input::Role;
use crate::metrics::Metrics;
use crate::preprocess::{Key, KeySink, Prepared};

/// Bytes counted per entry on top of its vector: the key, the map and
/// recency-index nodes and the vector's header (an estimate that errs high).
pub const ENTRY_OVERHEAD: usize = 128;

/// The key of one input's embedding: SHA-256 over everything that decides
/// the unnormalised vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

/// SHA-256 as the sink prepared data writes its key into.
struct Hasher(Sha256);

impl KeySink for Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl CacheKey {
    /// The key of `prepared` (the input after preprocessing: token ids after
    /// truncation, pixel values after resizing; what goes in is the
    /// family's choice, [`crate::preprocess::PreparedData::write_key`]) for
    /// a model with `fingerprint`, asked with `role` and `instruction`.
    /// Role and instruction are hashed even where the model folds them into
    /// the token ids (MLLM prompts) or ignores them (CLIP): a key never
    /// depends on how a family uses them.
    pub fn new(
        fingerprint: &str,
        prepared: &Prepared,
        role: Role,
        instruction: Option<&str>,
    ) -> Self {
        let mut h = Hasher(Sha256::new());
        h.0.update(b"vlembed-cache-v2");
        let mut key = Key::new(&mut h);
        key.opt_str(Some(fingerprint));
        key.tag(prepared.modality.as_str());
        key.tag(match role {
            Role::Query => "query",
            Role::Candidate => "candidate",
        });
        key.opt_str(instruction);
        prepared.data.write_key(&mut key);
        CacheKey(h.0.finalize().into())
    }
}

struct Entry {
    vector: Vec<f32>,
    /// Its position in [`Lru::order`].
    tick: u64,
}

/// The map and its recency order (oldest tick first).
#[derive(Default)]
struct Lru {
    entries: HashMap<CacheKey, Entry>,
    order: BTreeMap<u64, CacheKey>,
    next_tick: u64,
    bytes: usize,
}

/// The bytes an entry of `dims` floats is counted as.
pub fn entry_bytes(dims: usize) -> usize {
    dims.saturating_mul(4).saturating_add(ENTRY_OVERHEAD)
}

/// One model's embedding cache, bounded in bytes, least recently used
/// entries evicted first. Cheap to share (`Arc`); every call takes a short
/// lock (no I/O, no allocation beyond the vector copied).
pub struct EmbeddingCache {
    capacity: usize,
    fingerprint: String,
    lru: Mutex<Lru>,
    hits: IntCounter,
    misses: IntCounter,
    evictions: IntCounter,
    bytes: IntGauge,
}

impl std::fmt::Debug for EmbeddingCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddingCache")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// What `/info` reports about a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub capacity_bytes: usize,
    pub bytes: usize,
    pub entries: usize,
}

impl EmbeddingCache {
    /// A cache of at most `capacity` bytes for model `model` (its metrics
    /// label) whose fingerprint is `fingerprint` (part of every key).
    pub fn new(model: &str, fingerprint: &str, capacity: usize, metrics: &Metrics) -> Self {
        let bytes = metrics.embedding_cache_bytes.with_label_values(&[model]);
        bytes.set(0);
        EmbeddingCache {
            capacity,
            fingerprint: fingerprint.to_string(),
            lru: Mutex::new(Lru::default()),
            hits: metrics.embedding_cache_hits.with_label_values(&[model]),
            misses: metrics.embedding_cache_misses.with_label_values(&[model]),
            evictions: metrics
                .embedding_cache_evictions
                .with_label_values(&[model]),
            bytes,
        }
    }

    /// The key of one prepared input for this cache's model.
    pub fn key(&self, prepared: &Prepared, role: Role, instruction: Option<&str>) -> CacheKey {
        CacheKey::new(&self.fingerprint, prepared, role, instruction)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.lru.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached vector of `key` (it becomes the most recently used), and
    /// counts a hit or a miss.
    pub fn get(&self, key: &CacheKey) -> Option<Vec<f32>> {
        let mut lru = self.lock();
        let tick = lru.next_tick;
        let found = match lru.entries.get_mut(key) {
            Some(e) => {
                let old = std::mem::replace(&mut e.tick, tick);
                Some((old, e.vector.clone()))
            }
            None => None,
        };
        match found {
            Some((old, v)) => {
                lru.next_tick += 1;
                lru.order.remove(&old);
                lru.order.insert(tick, *key);
                drop(lru);
                self.hits.inc();
                Some(v)
            }
            None => {
                drop(lru);
                self.misses.inc();
                None
            }
        }
    }

    /// Stores `vector` under `key`, evicting the least recently used entries
    /// until it fits. A vector larger than the whole cache is not stored.
    pub fn insert(&self, key: CacheKey, vector: Vec<f32>) {
        let size = entry_bytes(vector.len());
        if size > self.capacity {
            return;
        }
        let mut lru = self.lock();
        let tick = lru.next_tick;
        lru.next_tick += 1;
        if let Some(old) = lru.entries.remove(&key) {
            lru.order.remove(&old.tick);
            lru.bytes -= entry_bytes(old.vector.len());
        }
        let mut evicted = 0u64;
        while lru.bytes + size > self.capacity {
            let Some((_, oldest)) = lru.order.pop_first() else {
                break;
            };
            if let Some(e) = lru.entries.remove(&oldest) {
                lru.bytes -= entry_bytes(e.vector.len());
                evicted += 1;
            }
        }
        lru.entries.insert(key, Entry { vector, tick });
        lru.order.insert(tick, key);
        lru.bytes += size;
        let bytes = lru.bytes;
        drop(lru);
        self.evictions.inc_by(evicted);
        self.bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    pub fn stats(&self) -> CacheStats {
        let lru = self.lock();
        CacheStats {
            capacity_bytes: self.capacity,
            bytes: lru.bytes,
            entries: lru.entries.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batching::test_support::TestData;
    use crate::input::Modality;

    fn text(ids: &[u32]) -> Prepared {
        let data = TestData {
            ids: ids.to_vec(),
            pixels: Vec::new(),
        };
        Prepared::new(Modality::Text, ids.len(), ids.len(), data).erase()
    }

    fn image(v: f32) -> Prepared {
        let data = TestData {
            ids: Vec::new(),
            pixels: vec![v; 3 * 4 * 4],
        };
        Prepared::new(Modality::Image, 0, 4, data).erase()
    }

    fn metric(m: &Metrics, name: &str) -> f64 {
        let text = m.render();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{name}{{model=\"m\"}}"))?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(-1.0)
    }

    #[test]
    fn the_key_changes_with_every_component() {
        let base = CacheKey::new("fp", &text(&[1, 2, 3]), Role::Query, Some("i"));
        assert_eq!(
            base,
            CacheKey::new("fp", &text(&[1, 2, 3]), Role::Query, Some("i"))
        );
        let others = [
            CacheKey::new("fp2", &text(&[1, 2, 3]), Role::Query, Some("i")),
            CacheKey::new("fp", &text(&[1, 2, 4]), Role::Query, Some("i")),
            CacheKey::new("fp", &text(&[1, 2]), Role::Query, Some("i")),
            CacheKey::new("fp", &text(&[1, 2, 3]), Role::Candidate, Some("i")),
            CacheKey::new("fp", &text(&[1, 2, 3]), Role::Query, Some("j")),
            CacheKey::new("fp", &text(&[1, 2, 3]), Role::Query, Some("")),
            CacheKey::new("fp", &text(&[1, 2, 3]), Role::Query, None),
        ];
        for (i, k) in others.iter().enumerate() {
            assert_ne!(*k, base, "variant {i}");
        }
        let img = CacheKey::new("fp", &image(0.5), Role::Candidate, None);
        assert_eq!(img, CacheKey::new("fp", &image(0.5), Role::Candidate, None));
        assert_ne!(
            img,
            CacheKey::new("fp", &image(0.25), Role::Candidate, None)
        );
        let mut pixels = vec![0.5; 3 * 4 * 4];
        pixels[17] = 0.5000001;
        let one_pixel = Prepared::new(
            Modality::Image,
            0,
            4,
            TestData {
                ids: vec![],
                pixels,
            },
        );
        assert_ne!(
            img,
            CacheKey::new("fp", &one_pixel.erase(), Role::Candidate, None),
            "one pixel"
        );
        let mut composed = image(0.5);
        composed.modality = Modality::Composed;
        assert_ne!(img, CacheKey::new("fp", &composed, Role::Candidate, None));
    }

    fn key(i: u32) -> CacheKey {
        CacheKey::new("fp", &text(&[i]), Role::Candidate, None)
    }

    #[test]
    fn bounded_in_bytes_least_recently_used_first() {
        let m = Metrics::new();
        // Room for exactly three 4-float entries.
        let cache = EmbeddingCache::new("m", "fp", 3 * entry_bytes(4), &m);
        for i in 0..3 {
            cache.insert(key(i), vec![i as f32; 4]);
        }
        assert_eq!(cache.stats().entries, 3);
        assert_eq!(cache.stats().bytes, 3 * entry_bytes(4));
        // Touch 0: 1 becomes the oldest.
        assert_eq!(cache.get(&key(0)), Some(vec![0.0; 4]));
        cache.insert(key(3), vec![3.0; 4]);
        assert_eq!(cache.get(&key(1)), None, "1 was the least recently used");
        assert!(cache.get(&key(0)).is_some());
        assert!(cache.get(&key(2)).is_some());
        assert!(cache.get(&key(3)).is_some());
        assert!(cache.stats().bytes <= cache.stats().capacity_bytes);
        // A bigger entry evicts as many as it needs, oldest first (0, then 2).
        cache.insert(key(4), vec![4.0; 4 + 2 * entry_bytes(4) / 4 - 64]);
        assert_eq!(cache.stats().entries, 2, "{:?}", cache.stats());
        assert!(cache.get(&key(3)).is_some() && cache.get(&key(4)).is_some());
        assert!(cache.stats().bytes <= cache.stats().capacity_bytes);
        assert_eq!(metric(&m, "vlembed_embedding_cache_evictions_total"), 3.0);
        assert_eq!(metric(&m, "vlembed_embedding_cache_misses_total"), 1.0);
        assert_eq!(metric(&m, "vlembed_embedding_cache_hits_total"), 6.0);
        assert_eq!(
            metric(&m, "vlembed_embedding_cache_bytes"),
            cache.stats().bytes as f64
        );
    }

    #[test]
    fn oversized_entries_and_replacements() {
        let m = Metrics::new();
        let cache = EmbeddingCache::new("m", "fp", entry_bytes(8), &m);
        cache.insert(key(0), vec![0.0; 9]);
        assert_eq!(
            cache.stats().entries,
            0,
            "larger than the cache: not stored"
        );
        cache.insert(key(1), vec![1.0; 8]);
        cache.insert(key(1), vec![2.0; 8]);
        assert_eq!(cache.stats().entries, 1);
        assert_eq!(cache.stats().bytes, entry_bytes(8));
        assert_eq!(cache.get(&key(1)), Some(vec![2.0; 8]));
        assert_eq!(metric(&m, "vlembed_embedding_cache_evictions_total"), 0.0);
        let off = EmbeddingCache::new("m", "fp", 0, &m);
        off.insert(key(2), vec![1.0]);
        assert_eq!(off.get(&key(2)), None);
    }
}
