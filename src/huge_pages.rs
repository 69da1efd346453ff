//! Transparent huge pages off for this process, as Redis does for its own.
//!
//! mimalloc reserves its arena with `madvise(MADV_HUGEPAGE)`, so where the
//! kernel's THP mode is `madvise` (the common default) or `always`, the
//! first touch of each 2 MiB of new heap faults in a whole huge page and
//! zeroes it while the request that allocated waits. On the development
//! machine one such fault took about 5 ms, and as the memory store grew
//! under a flood of new keys they came in bursts: in open loop at 30,000
//! req/s the memory store's p99.9 was 4–13 ms (the no-op server's about 2),
//! and `perf` put those stalls in `clear_page_erms` under
//! `do_huge_pmd_anonymous_page`. A rate limiter is asked on every request
//! and its tail latency is the gateway's, so the process trades the fewer
//! TLB misses of huge pages for pages faulted 4 KiB at a time.
//! `prctl(PR_SET_THP_DISABLE)` covers every mapping of the process, those
//! already made included, and `/proc/<pid>/status` shows it as
//! `THP_enabled: 0`.

/// Turns transparent huge pages off for the whole process (a no-op off
/// Linux).
pub fn disable() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    rustix::thread::disable_transparent_huge_pages(true)?;
    Ok(())
}
