// The in-memory caches of metadata clusters (L2 tables, refcount blocks): a Map kept in use order,
// least recently used first, so making room drops the entry used longest ago. Both caches are
// write-through, so any entry may be dropped at any time.

export class LruCache<K, V> {
  private readonly entries = new Map<K, V>();

  constructor(readonly capacity: number) {}

  get size(): number {
    return this.entries.size;
  }

  /** The entry for `key`, now the most recently used; undefined if it is not cached. */
  get(key: K): V | undefined {
    const v = this.entries.get(key);
    if (v !== undefined) {
      this.entries.delete(key);
      this.entries.set(key, v);
    }
    return v;
  }

  /** Whether `key` is cached (its place in the use order does not change). */
  has(key: K): boolean {
    return this.entries.has(key);
  }

  /** Caches an entry as the most recently used, dropping the least recently used one first if the cache is full. */
  admit(key: K, value: V): void {
    if (this.entries.size >= this.capacity) this.entries.delete(this.entries.keys().next().value!);
    this.entries.set(key, value);
  }

  /**
   * Caches an entry as the most recently used without making room (refcount blocks just created):
   * the size may pass the capacity, and each later admit() drops only one entry.
   */
  set(key: K, value: V): void {
    this.entries.set(key, value);
  }
}
