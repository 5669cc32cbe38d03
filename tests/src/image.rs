//! A busybox-static OCI image built locally (no registry here) and imported with `ctr images import`.
//!
//! One tar layer: `/bin/busybox` and a symlink per applet, `/etc/passwd` (root and `user`, uid 1000),
//! `/etc/group`, `/tmp`, `/root`, `/home/user`, `/www`. Its default command sleeps, so the same image serves as
//! the CRI sandbox ("pause") image; tests give containers their own command. busybox has `httpd`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::containerd::Containerd;
use crate::oci::{Blob, Image, Layer, RunConfig};

/// The image's reference, fully qualified so CRI does not rewrite it.
pub const BUSYBOX: &str = "localhost/shoji/busybox:test";
const BUSYBOX_BIN: &str = "/bin/busybox";
/// uid/gid of the unprivileged user in the image.
pub const USER_UID: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("image: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("image: {BUSYBOX_BIN} is not statically linked busybox (install busybox-static)")]
    NoBusybox,
    #[error("image: import into namespace {namespace}: {source}")]
    Import {
        namespace: String,
        #[source]
        source: crate::containerd::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// The host's busybox-static binary and the applets it has.
pub struct Busybox {
    bytes: Vec<u8>,
    applets: Vec<String>,
}

impl Busybox {
    pub fn from_host() -> Result<Busybox, Error> {
        let bytes = fs::read(BUSYBOX_BIN).map_err(|_| Error::NoBusybox)?;
        let out = std::process::Command::new(BUSYBOX_BIN)
            .arg("--list")
            .output()
            .map_err(io_err(format!("{BUSYBOX_BIN} --list")))?;
        if !out.status.success() {
            return Err(Error::NoBusybox);
        }
        let applets = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect();
        Ok(Busybox { bytes, applets })
    }

    /// A short hash of the binary, naming what is built from it.
    pub fn key(&self) -> String {
        format!("{:x}", Sha256::digest(&self.bytes))[..16].to_string()
    }

    /// The root filesystem, unfinished (the caller may add files): the directories, `/bin/busybox`, a symlink
    /// per applet except those in `skip`, `/etc/passwd` and `/etc/group` as given, `/www/index.html`.
    pub fn rootfs(&self, passwd: &str, group: &str, skip: &[&str]) -> std::io::Result<Layer> {
        let mut t = Layer::default();
        for d in [
            "bin", "etc", "root", "home", "proc", "sys", "dev", "www", "var", "usr", "usr/bin",
        ] {
            t.dir(d, 0o755, 0)?;
        }
        t.dir("tmp", 0o1777, 0)?;
        t.dir("home/user", 0o755, USER_UID)?;
        t.file("bin/busybox", 0o755, &self.bytes)?;
        for applet in &self.applets {
            if applet != "busybox" && !skip.contains(&applet.as_str()) {
                t.symlink(&format!("bin/{applet}"), "busybox")?;
            }
        }
        t.file("etc/passwd", 0o644, passwd.as_bytes())?;
        t.file("etc/group", 0o644, group.as_bytes())?;
        t.file("www/index.html", 0o644, b"shoji busybox httpd\n")?;
        Ok(t)
    }
}

/// The OCI layout (`oci-layout`, `index.json`, blobs) as the tar archive `ctr images import` reads.
fn oci_archive(layer: Blob) -> std::io::Result<Vec<u8>> {
    let image = Image::new(
        vec![layer],
        &RunConfig {
            cmd: vec!["sleep".into(), "2147483647".into()],
            ..Default::default()
        },
    );
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [image.index_entry(serde_json::json!({
            "io.containerd.image.name": BUSYBOX,
            "org.opencontainers.image.ref.name": "test",
        }))],
    });
    let mut t = Layer::default();
    t.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    t.file(
        "index.json",
        0o644,
        &serde_json::to_vec(&index).expect("json"),
    )?;
    for blob in image.blobs() {
        let hex = blob.digest.trim_start_matches("sha256:");
        t.file(&format!("blobs/sha256/{hex}"), 0o644, &blob.bytes)?;
    }
    t.finish().map(|b| b.bytes)
}

/// Path of the image archive, built once per busybox binary and cached in the temp dir (atomic rename, so
/// parallel test processes never read a half-written archive).
pub fn busybox_archive() -> Result<PathBuf, Error> {
    let busybox = Busybox::from_host()?;
    let dir = std::env::temp_dir().join("shoji-tests-images");
    let path = dir.join(format!("busybox-{}.oci.tar", busybox.key()));
    if path.exists() {
        return Ok(path);
    }
    fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
    let passwd = format!(
        "root:x:0:0:root:/root:/bin/sh\nuser:x:{USER_UID}:{USER_UID}:user:/home/user:/bin/sh\n"
    );
    let group = format!("root:x:0:\nuser:x:{USER_UID}:\n");
    let archive = busybox
        .rootfs(&passwd, &group, &[])
        .and_then(Layer::finish)
        .and_then(oci_archive)
        .map_err(io_err("build busybox OCI archive"))?;
    let tmp = tempfile::NamedTempFile::new_in(&dir).map_err(io_err("temp archive"))?;
    fs::write(tmp.path(), archive).map_err(io_err("write archive"))?;
    tmp.persist(&path).map_err(|e| Error::Io {
        what: "persist archive".into(),
        source: e.error,
    })?;
    Ok(path)
}

/// Imports the busybox image into `namespace` (`k8s.io` for CRI) of `ctrd`, unpacked for the default snapshotter.
pub async fn import(ctrd: &Containerd, namespace: &str) -> Result<(), Error> {
    let archive = tokio::task::spawn_blocking(busybox_archive)
        .await
        .expect("image build thread")?;
    import_archive(ctrd, namespace, &archive).await
}

async fn import_archive(ctrd: &Containerd, namespace: &str, archive: &Path) -> Result<(), Error> {
    let archive = archive.to_str().expect("temp paths are UTF-8");
    ctrd.ctr_ok(
        namespace,
        &["images", "import", archive],
        Duration::from_secs(60),
    )
    .await
    .map_err(|source| Error::Import {
        namespace: namespace.into(),
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_has_layout_and_applets() {
        let path = busybox_archive().expect("archive");
        let mut names = Vec::new();
        let mut ar = tar::Archive::new(fs::File::open(&path).unwrap());
        let mut layer = None;
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().display().to_string();
            if e.size() > 1_000_000 {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut v).unwrap();
                layer = Some(v);
            }
            names.push(name);
        }
        assert!(
            names.contains(&"oci-layout".to_string()) && names.contains(&"index.json".to_string())
        );
        assert_eq!(
            names
                .iter()
                .filter(|n| n.starts_with("blobs/sha256/"))
                .count(),
            3
        );
        let layer = layer.expect("layer blob");
        let mut inner = tar::Archive::new(&layer[..]);
        let entries: Vec<String> = inner
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        for want in ["bin/busybox", "bin/sh", "bin/httpd", "etc/passwd", "tmp"] {
            assert!(
                entries.iter().any(|e| e.trim_end_matches('/') == want),
                "{want} missing from layer"
            );
        }
    }
}
