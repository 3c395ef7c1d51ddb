// A C library that is loaded on first use rather than at import: a backend that never serves an
// NBD or RBD disk must start (and run its tests) on a host without libnbd or librbd installed.
// When it cannot be loaded, the message names the Debian package that provides it.

export class LazyLibrary<T> {
  private loaded: T | null = null;

  /** `load` dlopens and returns what the bindings call; `what` names it and its package. */
  constructor(private readonly load: () => T, private readonly what: string) {}

  /** The library; throws "cannot load WHAT: why". */
  get(): T {
    if (this.loaded === null) {
      try {
        this.loaded = this.load();
      } catch (e) {
        throw new Error(`cannot load ${this.what}: ${(e as Error).message}`);
      }
    }
    return this.loaded;
  }

  /** Null when the library loads here, else why not. */
  unavailable(): string | null {
    try {
      this.get();
      return null;
    } catch (e) {
      return (e as Error).message;
    }
  }
}
