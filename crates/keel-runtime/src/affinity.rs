//! The process's CPU affinity mask: read it (`sched_getaffinity`) and pin threads to a subset
//! (`sched_setaffinity`).
//!
//! The mask is the honest "CPUs available" number inside containers that use cpusets
//! (`docker --cpuset-cpus`, Kubernetes static CPU manager), where `/proc/cpuinfo` still lists
//! the whole host. The buffers are sized dynamically because `cpu_set_t` only covers 1024 CPUs
//! and larger hosts exist.

use std::io;

/// The CPUs this process may run on (`sched_getaffinity(0)`), ascending.
#[cfg(target_os = "linux")]
pub fn current_affinity() -> io::Result<Vec<usize>> {
    // Start at glibc's CPU_SETSIZE and double while the kernel says the buffer is too small
    // for its CPU count (EINVAL); 2^20 CPUs is far beyond any real machine.
    let mut words = words_for_bits(libc::CPU_SETSIZE as usize);
    loop {
        let mut mask = vec![0 as libc::c_ulong; words];
        let bytes = std::mem::size_of_val(mask.as_slice());
        // SAFETY: `mask` is a live, writable allocation of exactly `bytes` bytes, aligned for
        // `c_ulong` like `cpu_set_t`'s own words; the kernel writes at most `bytes` bytes into
        // it and no Rust reference to a `cpu_set_t` is ever formed.
        let rc = unsafe { libc::sched_getaffinity(0, bytes, mask.as_mut_ptr().cast()) };
        if rc == 0 {
            return Ok(bits(&mask));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) || words >= words_for_bits(1 << 20) {
            return Err(err);
        }
        words *= 2;
    }
}

/// Restricts the calling thread to `cpus` (`sched_setaffinity(0)`). Threads it spawns
/// afterwards inherit the mask.
#[cfg(target_os = "linux")]
pub fn pin_current_thread(cpus: &[usize]) -> io::Result<()> {
    let Some(&max) = cpus.iter().max() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cannot pin a thread to an empty CPU set",
        ));
    };
    // Never smaller than `cpu_set_t`: older glibc rejects masks shorter than the kernel's.
    let words = words_for_bits(max + 1).max(words_for_bits(libc::CPU_SETSIZE as usize));
    let mut mask = vec![0 as libc::c_ulong; words];
    for &cpu in cpus {
        mask[cpu / WORD_BITS] |= 1 << (cpu % WORD_BITS);
    }
    let bytes = std::mem::size_of_val(mask.as_slice());
    // SAFETY: `mask` is a live allocation of exactly `bytes` bytes that the kernel only reads;
    // pid 0 means the calling thread, so no other thread's state is touched.
    let rc = unsafe { libc::sched_setaffinity(0, bytes, mask.as_ptr().cast()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Without `sched_getaffinity`, assume every CPU the standard library reports.
#[cfg(not(target_os = "linux"))]
pub fn current_affinity() -> io::Result<Vec<usize>> {
    Ok((0..std::thread::available_parallelism()?.get()).collect())
}

/// Pinning is only implemented on Linux.
#[cfg(not(target_os = "linux"))]
pub fn pin_current_thread(_cpus: &[usize]) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "thread pinning is only supported on Linux",
    ))
}

#[cfg(target_os = "linux")]
const WORD_BITS: usize = libc::c_ulong::BITS as usize;

#[cfg(target_os = "linux")]
fn words_for_bits(bits: usize) -> usize {
    bits.div_ceil(WORD_BITS)
}

#[cfg(target_os = "linux")]
fn bits(mask: &[libc::c_ulong]) -> Vec<usize> {
    mask.iter()
        .enumerate()
        .flat_map(|(w, &word)| {
            (0..WORD_BITS)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| w * WORD_BITS + b)
        })
        .collect()
}

#[cfg(all(test, target_os = "linux"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn mask_round_trips_through_bits() {
        assert_eq!(bits(&[0b1011, 1]), [0, 1, 3, WORD_BITS]);
    }

    #[test]
    fn pinning_narrows_the_threads_mask() {
        let all = current_affinity().unwrap();
        assert!(!all.is_empty());
        let first = all[0];
        // A fresh thread so the test runner's own threads keep their mask.
        std::thread::spawn(move || {
            pin_current_thread(&[first]).unwrap();
            assert_eq!(current_affinity().unwrap(), [first]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn empty_pin_set_is_rejected() {
        let err = pin_current_thread(&[]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
