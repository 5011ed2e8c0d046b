//! A growable array in fixed-size chunks, for the tracker's record slab and IPv6 address table.
//!
//! Why not a `Vec`: a `Vec` doubles its capacity when it fills, so a table of a million records
//! can hold room for up to two million (at exactly one million, 5% more: 2^20 slots), and
//! growing copies every record. Memory per tracked flow is a budget, so the slab grows one chunk
//! at a time instead: never more than one partly used chunk of slack, and nothing is ever moved
//! (an index stays valid, and so does a reference between two pushes). Indexing costs one more
//! load, from a chunk table small enough to stay in the L1 cache.

use std::ops::{Index, IndexMut};

/// Elements per chunk, a power of two.
const CHUNK_BITS: u32 = 10;
const CHUNK: usize = 1 << CHUNK_BITS;

/// A growable array stored in chunks of [`CHUNK`] elements (see the module docs).
pub(crate) struct Chunked<T> {
    /// Every chunk but the last is full; the last holds defaults beyond `len`. Fixed-size chunks
    /// let indexing within a chunk go without a bounds check.
    chunks: Vec<Box<[T; CHUNK]>>,
    len: usize,
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Chunked { chunks: Vec::new(), len: 0 }
    }
}

impl<T: Default> Chunked<T> {
    /// Appends `value`; returns its index.
    pub(crate) fn push(&mut self, value: T) -> usize {
        if self.len == self.chunks.len() * CHUNK {
            let chunk: Box<[T]> = (0..CHUNK).map(|_| T::default()).collect();
            self.chunks.push(chunk.try_into().unwrap_or_else(|_| unreachable!("a chunk has CHUNK elements")));
        }
        let index = self.len;
        self[index] = value;
        self.len += 1;
        index
    }
}

impl<T> Chunked<T> {
    /// The element at `index`, if there is one.
    pub(crate) fn get(&self, index: usize) -> Option<&T> {
        (index < self.len).then(|| &self[index])
    }

    /// Every element, in index order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flat_map(|chunk| chunk.iter()).take(self.len)
    }
}

impl<T> Index<usize> for Chunked<T> {
    type Output = T;

    fn index(&self, index: usize) -> &T {
        &self.chunks[index >> CHUNK_BITS][index & (CHUNK - 1)]
    }
}

impl<T> IndexMut<usize> for Chunked<T> {
    fn index_mut(&mut self, index: usize) -> &mut T {
        &mut self.chunks[index >> CHUNK_BITS][index & (CHUNK - 1)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_stay_put_across_chunks() {
        let mut c = Chunked::default();
        let n = 3 * CHUNK + 7;
        for i in 0..n {
            assert_eq!(c.push(i * 3), i);
        }
        assert_eq!(c.len, n);
        c[CHUNK] = 1;
        assert_eq!((c[0], c[CHUNK], c[n - 1]), (0, 1, (n - 1) * 3));
        assert_eq!(c.get(n), None);
        assert_eq!(c.iter().count(), n);
        assert!(c.iter().enumerate().all(|(i, &v)| v == if i == CHUNK { 1 } else { i * 3 }));
        // Growing allocates one chunk at a time, never more.
        assert_eq!(c.chunks.len(), 4);
        assert!(c.chunks.iter().all(|chunk| chunk.len() == CHUNK));
    }
}
