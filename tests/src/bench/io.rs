//! Throughput inside a running container: its stdout through the runtime (what `kubectl logs`
//! and `ctr` read), and `dd` in its root filesystem and in a bind-mounted volume.
use std::{path::Path, process::Stdio, time::Instant};

use tokio::io::AsyncReadExt;

use crate::scenario::{self, Env, CTR_NAMESPACE};

/// Bytes a throughput sample moves.
const SAMPLE_BYTES: u64 = 64 << 20;

fn ctr(env: &Env) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env.ctrd.version().bin_dir().join("ctr"));
    c.arg("--address")
        .arg(env.ctrd.address())
        .args(["--namespace", CTR_NAMESPACE])
        .stdin(Stdio::null());
    c
}

/// `ctr task exec` of `args` in container `id`; returns its stdout.
async fn exec(env: &Env, id: &str, exec_id: &str, args: &[&str]) -> scenario::Result<Vec<u8>> {
    let out = ctr(env)
        .args(["task", "exec", "--exec-id", exec_id, id])
        .args(args)
        .output()
        .await?;
    if !out.status.success() {
        return Err(format!("exec {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(out.stdout)
}

/// The size of a container's writes to its stdout.
#[derive(Debug, Clone, Copy)]
pub enum Piece {
    Small,
    Large,
}

/// MB/s of a container writing [`SAMPLE_BYTES`] to its stdout, read through `ctr`.
/// `piece` is the size of the container's writes: busybox `head -c` writes 4 KiB at a time,
/// `dd bs=64k` 64 KiB (under emulation the guest's cost per write dominates small ones).
pub async fn stdout_rate(env: &Env, id: &str, run: usize, piece: Piece) -> scenario::Result<f64> {
    let count = format!("count={}", SAMPLE_BYTES >> 16);
    let bytes = SAMPLE_BYTES.to_string();
    let args: Vec<&str> = match piece {
        Piece::Small => vec!["head", "-c", &bytes, "/dev/zero"],
        Piece::Large => vec!["dd", "if=/dev/zero", "bs=65536", &count],
    };
    let mut child = ctr(env)
        .args([
            "task",
            "exec",
            "--exec-id",
            &format!("out{run}{piece:?}"),
            id,
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdout = child.stdout.take().expect("piped");
    let t = Instant::now();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let r = stdout.read(&mut buf).await?;
        if r == 0 {
            break;
        }
        n += r as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    child.wait().await?;
    if n != SAMPLE_BYTES {
        return Err(format!("stdout carried {n} of {SAMPLE_BYTES} bytes").into());
    }
    Ok(n as f64 / 1e6 / secs)
}

/// A `dd` write (synced) then read of `file`, timed by the clock of where it runs:
/// busybox dd prints no transfer time, so the script prints three /proc/uptime readings.
fn dd_script(file: &str) -> String {
    let mb = SAMPLE_BYTES >> 20;
    format!(
        "t() {{ cut -d' ' -f1 /proc/uptime; }}; a=$(t); \
         dd if=/dev/zero of={file} bs=1M count={mb} conv=fsync 2>/dev/null; b=$(t); \
         dd if={file} of=/dev/null bs=1M 2>/dev/null; c=$(t); rm -f {file}; echo \"$a $b $c\""
    )
}

/// (write, read) MB/s of `dd` on `file` inside container `id` (write: synced to its
/// storage; read: right after, through whatever cache the runtime has).
pub async fn dd_rates(env: &Env, id: &str, file: &str, run: usize) -> scenario::Result<(f64, f64)> {
    let out = exec(
        env,
        id,
        &format!("dd{run}"),
        &["sh", "-c", &dd_script(file)],
    )
    .await?;
    rates_of(&String::from_utf8_lossy(&out))
}

/// The same `dd` pair on the host, in `dir` (the baseline both runtimes are compared to).
pub async fn host_dd_rates(dir: &Path) -> scenario::Result<(f64, f64)> {
    let file = dir.join("bench.dat");
    let out = tokio::process::Command::new(shoji::cli::rootfs::BUSYBOX)
        .args(["sh", "-c", &dd_script(&file.display().to_string())])
        .output()
        .await?;
    rates_of(&String::from_utf8_lossy(&out.stdout))
}

/// MB/s from the three clock readings; /proc/uptime counts in 10 ms steps, so a step is
/// the shortest time a transfer is taken to last.
fn rates_of(text: &str) -> scenario::Result<(f64, f64)> {
    let t: Vec<f64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    match t[..] {
        [a, b, c] if b >= a && c >= b => {
            let mb = SAMPLE_BYTES as f64 / 1e6;
            Ok((mb / (b - a).max(0.01), mb / (c - b).max(0.01)))
        }
        _ => Err(format!("cannot read the dd timings: {text:?}").into()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dd_output_is_read() {
        let (w, r) = super::rates_of("100.00 100.50 100.75\n").unwrap();
        assert!(
            (w - 134.2).abs() < 0.1 && (r - 268.4).abs() < 0.1,
            "{w} {r}"
        );
    }
}
