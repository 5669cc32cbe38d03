//! QEMU keeps the guest kernel and initramfs files mapped once it has copied them into guest
//! RAM (to copy them again at a reset, which `-no-reboot` rules out). Once the guest is up,
//! the driver has the host kernel drop those pages from QEMU (`process_madvise` with
//! `MADV_PAGEOUT`): ~17 MiB of resident memory per VM that nothing reads again. Pages another
//! VMM still maps stay; a read after all would only fault them back in.
use std::{
    io,
    os::fd::{FromRawFd, OwnedFd},
    path::PathBuf,
};

/// Pages out `pid`'s mappings of `files` (resolved paths, as `/proc/<pid>/maps` shows them);
/// returns how many bytes were advised.
pub fn page_out(pid: u32, files: &[PathBuf]) -> io::Result<usize> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let ranges: Vec<libc::iovec> = mapped_ranges(&maps, files)
        .into_iter()
        .map(|(start, len)| libc::iovec {
            iov_base: start as *mut libc::c_void,
            iov_len: len,
        })
        .collect();
    if ranges.is_empty() {
        return Ok(0);
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the iovecs name ranges in the other process; the kernel only reads the array.
    let advised = unsafe {
        libc::syscall(
            libc::SYS_process_madvise,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            ranges.as_ptr(),
            ranges.len(),
            libc::MADV_PAGEOUT,
            0,
        )
    };
    if advised < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(advised as usize)
}

/// `(start, length)` of each mapping of one of `files` in a `/proc/<pid>/maps` text.
fn mapped_ranges(maps: &str, files: &[PathBuf]) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            // address perms offset dev inode path (the path may hold spaces)
            let fields: Vec<&str> = line.splitn(6, char::is_whitespace).collect();
            let path = fields.get(5)?.trim_start();
            files.iter().any(|f| f.as_os_str() == path).then_some(())?;
            let (start, end) = fields[0].split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            Some((start, end.checked_sub(start)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_named_files_mappings() {
        let maps = "\
5581c000-5581d000 r--p 00000000 fe:01 1234                       /usr/bin/qemu-system-x86_64
7f0000000000-7f0000d00000 r--p 00000000 fe:01 99                 /cache/kernel/vmlinux
7f0001000000-7f0001300000 r--p 00000000 fe:01 98                 /cache/init ramfs.img
7f0002000000-7f0002001000 rw-p 00000000 00:00 0 
7f0003000000-7f0013000000 rw-s 00000000 00:01 5                  /memfd:mem (deleted)
";
        let files = [
            PathBuf::from("/cache/kernel/vmlinux"),
            PathBuf::from("/cache/init ramfs.img"),
        ];
        assert_eq!(
            mapped_ranges(maps, &files),
            vec![(0x7f0000000000, 0xd00000), (0x7f0001000000, 0x300000)]
        );
        assert!(mapped_ranges(maps, &[PathBuf::from("/cache/kernel")]).is_empty());
    }

    /// Resident KiB of this process's mappings of `file`.
    fn resident_kib(file: &std::path::Path) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let (mut inside, mut kib) = (false, 0);
        for line in smaps.lines() {
            match line.split_once(':') {
                Some(("Rss", v)) if inside => {
                    kib += v.trim().trim_end_matches(" kB").parse::<u64>().unwrap()
                }
                Some((k, _)) if k.contains(' ') || k.contains('-') => {
                    inside = line.ends_with(&*file.to_string_lossy())
                }
                _ => {}
            }
        }
        kib
    }

    #[test]
    fn the_files_pages_leave_the_process() {
        use std::{io::Write, os::fd::AsRawFd};
        // A file of this test's own, on disk and synced (clean pages), mapped by no other
        // process: pages another process maps are left alone.
        const LEN: usize = 4 << 20;
        let exe = std::env::current_exe().unwrap();
        let path = exe.with_file_name(format!("boot-images-test-{}", std::process::id()));
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&vec![7u8; LEN]).unwrap();
        file.sync_all().unwrap();
        let path = std::fs::canonicalize(&path).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: a private read-only mapping of that file, unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        // SAFETY: every offset read lies inside the mapping.
        let touched: usize = (0..LEN)
            .step_by(4096)
            .map(|i| unsafe { *(addr as *const u8).add(i) } as usize)
            .sum();
        let before = resident_kib(&path);
        let advised = page_out(std::process::id(), std::slice::from_ref(&path));
        let after = resident_kib(&path);
        // SAFETY: the mapping made above, used no more.
        unsafe { libc::munmap(addr, LEN) };
        std::fs::remove_file(&path).unwrap();
        assert_eq!(touched, 7 * LEN / 4096);
        assert_eq!(advised.unwrap(), LEN);
        assert!(
            before >= 4000 && after < before / 4,
            "{before} KiB resident before, {after} after"
        );
    }

    #[test]
    fn a_process_without_those_mappings_is_left_alone() {
        let me = std::process::id();
        assert_eq!(
            page_out(me, &[PathBuf::from("/no/such/vmlinux")]).unwrap(),
            0
        );
    }
}
