//! A minimal busybox root filesystem (busybox-static plus one symlink per applet), the
//! default rootfs of `shoji vm run` and the test fixture of the VM tests.
use std::{
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

/// Where Debian's busybox-static installs its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Builds a busybox rootfs in `dir` (created; must not exist or be empty). Errors name the
/// missing piece.
pub fn build_busybox_rootfs(dir: &Path) -> std::io::Result<()> {
    let busybox = Path::new(BUSYBOX);
    let out = Command::new(busybox).arg("--list").output().map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("{BUSYBOX} does not run ({e}); install busybox-static"),
        )
    })?;
    if has_interpreter(&std::fs::read(busybox)?) {
        return Err(std::io::Error::other(format!(
            "{BUSYBOX} is dynamically linked; install busybox-static"
        )));
    }
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run",
        "var",
    ] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy(busybox, dir.join("bin/busybox"))?;
    for applet in String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        let link = dir.join("bin").join(applet);
        if !link.exists() {
            symlink("busybox", link)?;
        }
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    std::fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    Ok(())
}

/// The cached default rootfs (`<cache>/rootfs/busybox`), built on first use. Built in a
/// temporary directory and renamed, so concurrent callers never see half of it.
pub fn default_rootfs() -> std::io::Result<PathBuf> {
    let dir = crate::config::cache_dir().join("rootfs/busybox");
    if dir.join("bin/sh").exists() {
        return Ok(dir);
    }
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    build_busybox_rootfs(&tmp)?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Someone else finished first.
        Err(_) if dir.join("bin/sh").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(e),
    }
}

/// True when a 64-bit ELF image asks for a dynamic loader (has a PT_INTERP program header).
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum).any(|i| {
        elf.get(phoff + i * phentsize..phoff + i * phentsize + 4) == Some(&3u32.to_le_bytes()[..])
    })
}
