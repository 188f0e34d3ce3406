//! Keeping the idle daemon small: ≤ 8 MiB RSS, also after a snapshot and an incident
//! (`cargo bench --bench memory` measures it; README, benchmarks).
//!
//! glibc's malloc, left to its defaults, keeps what a snapshot freed. Its mmap threshold is
//! dynamic: freeing a large mmapped block (the dump's 1 MiB write buffer, zstd's context) raises
//! the threshold to that block's size and the trim threshold to twice it, so from then on
//! buffers of a few MiB come from the heap and stay there when freed (measured: +5 MiB anon
//! after the first snapshot, +8 MiB after the second). Every thread that allocates also gets an
//! arena of its own (up to 8 per core), each keeping its free memory. Fixing the threshold
//! keeps large buffers in mmap, returned on free; one arena is plenty for a daemon that mostly
//! waits (measured: a second one kept 0.1-0.3 MiB more after a snapshot or an incident, and
//! the freeze delay did not change); a trim when work is done hands back free heap pages.

/// Call first thing in `main`, before any thread exists (arenas are handed out as threads
/// first allocate).
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets malloc parameters; called before other threads exist.
    unsafe {
        // Setting it at all turns the dynamic threshold (and trim threshold) off; 128 KiB is
        // glibc's own starting value.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Returns free heap pages to the system. Cheap on a small heap; called when the daemon goes
/// back to waiting after a snapshot or an incident.
pub fn release() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe (it takes each arena's lock).
    unsafe {
        libc::malloc_trim(0);
    }
}
