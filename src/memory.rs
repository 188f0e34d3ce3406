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
//!
//! Most of the idle RSS is code: the kernel maps in the binary's and shared libraries' pages
//! around every page a path touches, so after a snapshot or an incident nearly all of the text
//! is resident. libm.so was mapped for one function (`pow`, below) and cost ~0.6 MiB of it.

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

/// `pow` is the one symbol the binary took from libm.so (tokio's scheduler statistics and
/// indicatif's rate estimate call `f64::powf`). Defined here with musl's algorithm (the `libm`
/// crate), the linker (`--as-needed`) no longer records libm.so as needed, so the daemon does
/// not map it: 0.6 MiB less resident memory (`cargo bench --bench memory`, README).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

#[cfg(test)]
mod tests {
    #[test]
    fn powf_answers_like_libm_did() {
        // f64::powf lowers to the C symbol `pow`, which is now the one above.
        let x: f64 = std::hint::black_box(2.0);
        assert_eq!(x.powf(10.0), 1024.0);
        assert_eq!(x.powf(0.5), std::f64::consts::SQRT_2);
        assert!(x.powf(f64::NAN).is_nan());
        assert_eq!(std::hint::black_box(0.9_f64).powf(0.0), 1.0);
    }
}
