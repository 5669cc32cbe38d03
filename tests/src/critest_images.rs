//! The images cri-tools' critest pulls, built from local files: Debian's busybox-static, a few static C programs
//! (`tests/images/*.c`, compiled with `gcc -static`) and shell stand-ins for the applets Debian's busybox lacks.
//! `hack/critest.sh` serves them with `critest-registry` (see `registry`).
//!
//! What each image must do comes from critest's specs (cri-tools `pkg/validate`):
//! - busybox: a shell and the usual applets, `pgrep`, `ipcs -m`, accounts `nobody` and `www-data`; `/bin/ls` a
//!   hard link, not a symlink, so that masking it (MaskedPaths) masks only `ls`. MaskedPaths also needs a shell
//!   that runs `ls` by exec: busybox-static's runs its own applets in-process (FEATURE_SH_STANDALONE), so with
//!   `shell` given (Debian's dynamically linked busybox, built without it) that is `/bin/sh`, with the host
//!   libraries it links.
//! - nginx: HTTP 200 on :80 from a forked worker; `nginx: master process ...` in its command line; its pid in
//!   `/var/run/nginx.pid` (`tests/images/nginx.c`). hostnet-nginx: the same on :12003.
//! - httpd: HTTP 200 on :80 and a log line containing `httpd`.
//! - nonewprivs: a set-uid-root entrypoint printing `Effective uid: N`.
//! - test-image-*: config `User` variants, a user in a group defined in `/etc/group`, distinct images per name,
//!   one image under three tags. The digest-pinned `test-image-digest@sha256:9700f9...` cannot be rebuilt.
//! - the pod sandbox image, `registry.k8s.io/pause:3.10` (`tests/images/pause.c`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::image::Busybox;
use crate::oci::{Image, Layer, RunConfig};

/// The sandbox ("pause") image containerd is configured with.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";
const E2E: &str = "registry.k8s.io/e2e-test-images";
const CRI_TOOLS: &str = "gcr.io/k8s-staging-cri-tools";

/// The accounts of the e2e busybox image (`nobody` for RunAsUserName, `www-data` for the image `User` specs).
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
";
const GROUP: &str = "root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
wheel:x:10:root
mail:x:12:
www-data:x:33:
users:x:100:
nogroup:x:65534:
";
/// images/image-predefined-group of cri-tools: `default-user` (1000) also in group 50000.
const PREDEFINED_GROUP_PASSWD: &str = "default-user:x:1000:1000::/home/default-user:/bin/sh\n";
const PREDEFINED_GROUP_GROUP: &str =
    "default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n";
/// httpd's command: a log line naming it, then busybox's httpd in the foreground.
const HTTPD_FOREGROUND: &str = "#!/bin/sh
echo \"httpd: serving /usr/local/apache2/htdocs on :80 (busybox httpd)\"
exec httpd -f -p 80 -h /usr/local/apache2/htdocs
";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Busybox(#[from] crate::image::Error),
    #[error("critest images: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("critest images: gcc -static {src}: {stderr}")]
    Compile { src: PathBuf, stderr: String },
    #[error("critest images: ldd {shell}: {stderr}")]
    Ldd { shell: PathBuf, stderr: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// One image under a full reference (`host/repository:tag`); images listed under several tags share the `Arc`.
pub struct Tagged {
    pub reference: String,
    pub image: Arc<Image>,
}

/// Source directory of the static programs and stand-in scripts.
fn sources() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("images")
}

fn read_source(name: &str) -> Result<Vec<u8>, Error> {
    let path = sources().join(name);
    std::fs::read(&path).map_err(io_err(format!("read {}", path.display())))
}

/// Compiles `tests/images/<name>.c` into a static binary `out/<name>` and returns its bytes.
pub fn static_program(name: &str, out: &Path) -> Result<Vec<u8>, Error> {
    let src = sources().join(format!("{name}.c"));
    let bin = out.join(name);
    let res = std::process::Command::new("gcc")
        .args(["-static", "-Os", "-Wall", "-Werror", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .map_err(io_err("run gcc"))?;
    if !res.status.success() {
        return Err(Error::Compile {
            src,
            stderr: String::from_utf8_lossy(&res.stderr).into_owned(),
        });
    }
    std::fs::read(&bin).map_err(io_err(format!("read {}", bin.display())))
}

/// A layer from `build`, which adds entries to an empty one.
fn layer(build: impl FnOnce(&mut Layer) -> std::io::Result<()>) -> Result<crate::oci::Blob, Error> {
    let mut l = Layer::default();
    build(&mut l)
        .and_then(|()| l.finish())
        .map_err(io_err("build layer"))
}

/// The shared libraries `binary` loads (`ldd`), the loader included: absolute paths as the binary names them.
fn libraries(binary: &Path) -> Result<Vec<String>, Error> {
    let out = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(io_err("run ldd"))?;
    if !out.status.success() {
        return Err(Error::Ldd {
            shell: binary.into(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    // "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "\t/lib64/ld-linux-x86-64.so.2 (0x...)".
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let path = l.split_once("=> ").map_or(l, |(_, p)| p).trim();
            let path = path.split(" (").next()?;
            path.starts_with('/').then(|| path.to_string())
        })
        .collect())
}

/// Adds `shell` as `/bin/sh` and the libraries it links at their paths, with their directories.
fn add_shell(base: &mut Layer, shell: &Path) -> Result<(), Error> {
    let read = |p: &Path| std::fs::read(p).map_err(io_err(format!("read {}", p.display())));
    base.file("bin/sh", 0o755, &read(shell)?)
        .map_err(io_err("busybox layer"))?;
    let mut dirs = std::collections::BTreeSet::new();
    for lib in libraries(shell)? {
        let rel = lib.trim_start_matches('/');
        for dir in Path::new(rel).ancestors().skip(1) {
            let dir = dir.to_string_lossy().into_owned();
            if !dir.is_empty() && dirs.insert(dir.clone()) {
                base.dir(&dir, 0o755, 0).map_err(io_err("busybox layer"))?;
            }
        }
        base.file(rel, 0o755, &read(Path::new(&lib))?)
            .map_err(io_err("busybox layer"))?;
    }
    Ok(())
}

fn cmd(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// Every image critest pulls (but the digest-pinned one), plus the sandbox image; `shell`: see the module doc.
pub fn build(shell: Option<&Path>) -> Result<Vec<Tagged>, Error> {
    let busybox = Busybox::from_host()?;
    let work = tempfile::tempdir().map_err(io_err("temp dir"))?;
    let nginx_bin = static_program("nginx", work.path())?;
    let nonewprivs_bin = static_program("nonewprivs", work.path())?;
    let pause_bin = static_program("pause", work.path())?;
    let (pgrep, ipcs) = (read_source("pgrep")?, read_source("ipcs")?);

    let own = if shell.is_some() {
        &["ls", "sh"][..]
    } else {
        &["ls"]
    };
    let mut base = busybox
        .rootfs(PASSWD, GROUP, own)
        .map_err(io_err("busybox layer"))?;
    if let Some(shell) = shell {
        add_shell(&mut base, shell)?;
    }
    base.hardlink("bin/ls", "bin/busybox")
        .and_then(|()| base.file("bin/pgrep", 0o755, &pgrep))
        .and_then(|()| base.file("bin/ipcs", 0o755, &ipcs))
        .map_err(io_err("busybox layer"))?;
    let base = base.finish().map_err(io_err("busybox layer"))?;
    let on_base = |top: Vec<crate::oci::Blob>, run: RunConfig| {
        let mut layers = vec![base.clone()];
        layers.extend(top);
        Arc::new(Image::new(layers, &run))
    };
    let shell = || RunConfig {
        cmd: cmd(&["sh"]),
        ..Default::default()
    };
    let nginx_layer = layer(|l| {
        l.dir("usr/sbin", 0o755, 0)?;
        l.file("usr/sbin/nginx", 0o755, &nginx_bin)?;
        l.dir("var/run", 0o755, 0)
    })?;
    let nginx = |port: Option<&str>| {
        on_base(
            vec![nginx_layer.clone()],
            RunConfig {
                cmd: cmd(&["nginx", "-g", "daemon off;"]),
                env: port
                    .map(|p| format!("NGINX_PORT={p}"))
                    .into_iter()
                    .collect(),
                ..Default::default()
            },
        )
    };
    let user = |user: &str| {
        on_base(
            Vec::new(),
            RunConfig {
                user: user.into(),
                ..shell()
            },
        )
    };
    // images/image-test of cri-tools: busybox plus a file named after the image.
    let marked = |name: &str| -> Result<Arc<Image>, Error> {
        let top = layer(|l| l.file(name, 0o644, name.as_bytes()))?;
        Ok(on_base(vec![top], shell()))
    };

    let mut out = vec![
        (
            PAUSE_IMAGE.to_string(),
            Arc::new(Image::new(
                vec![layer(|l| l.file("pause", 0o755, &pause_bin))?],
                &RunConfig {
                    entrypoint: cmd(&["/pause"]),
                    ..Default::default()
                },
            )),
        ),
        (
            format!("{E2E}/busybox:1.29-2"),
            on_base(Vec::new(), shell()),
        ),
        (format!("{E2E}/nginx:1.14-2"), nginx(None)),
        (
            format!("{CRI_TOOLS}/hostnet-nginx-amd64:latest"),
            nginx(Some("12003")),
        ),
        (
            format!("{E2E}/httpd:2.4.39-4"),
            on_base(
                vec![layer(|l| {
                    for d in ["usr/local", "usr/local/bin", "usr/local/apache2"] {
                        l.dir(d, 0o755, 0)?;
                    }
                    l.dir("usr/local/apache2/htdocs", 0o755, 0)?;
                    l.file(
                        "usr/local/apache2/htdocs/index.html",
                        0o644,
                        b"<html><body><h1>It works!</h1></body></html>\n",
                    )?;
                    l.file(
                        "usr/local/bin/httpd-foreground",
                        0o755,
                        HTTPD_FOREGROUND.as_bytes(),
                    )
                })?],
                RunConfig {
                    cmd: cmd(&["httpd-foreground"]),
                    ..Default::default()
                },
            ),
        ),
        (
            format!("{E2E}/nonewprivs:1.3"),
            on_base(
                vec![layer(|l| {
                    l.dir("usr/local", 0o755, 0)?;
                    l.dir("usr/local/bin", 0o755, 0)?;
                    // Set-uid root: the point of the image.
                    l.file("usr/local/bin/nnp", 0o4755, &nonewprivs_bin)
                })?],
                RunConfig {
                    entrypoint: cmd(&["/usr/local/bin/nnp"]),
                    ..Default::default()
                },
            ),
        ),
        (
            format!("{CRI_TOOLS}/test-image-user-uid:latest"),
            user("1002"),
        ),
        (
            format!("{CRI_TOOLS}/test-image-user-username:latest"),
            user("www-data"),
        ),
        (
            format!("{CRI_TOOLS}/test-image-user-uid-group:latest"),
            user("1003:1004"),
        ),
        (
            format!("{CRI_TOOLS}/test-image-user-username-group:latest"),
            user("www-data:1004"),
        ),
        (
            format!("{CRI_TOOLS}/test-image-predefined-group:latest"),
            on_base(
                vec![layer(|l| {
                    l.file(
                        "etc/passwd",
                        0o644,
                        format!("{PASSWD}{PREDEFINED_GROUP_PASSWD}").as_bytes(),
                    )?;
                    l.file(
                        "etc/group",
                        0o644,
                        format!("{GROUP}{PREDEFINED_GROUP_GROUP}").as_bytes(),
                    )?;
                    l.dir("home/default-user", 0o755, 1000)
                })?],
                RunConfig {
                    user: "1000".into(),
                    ..shell()
                },
            ),
        ),
    ];
    for name in [
        "test-image-latest:latest",
        "test-image-tag:test",
        "test-image-tag:all",
        "test-image-1:latest",
        "test-image-2:latest",
        "test-image-3:latest",
    ] {
        out.push((format!("{CRI_TOOLS}/{name}"), marked(name)?));
    }
    let tags = marked("test-image-tags")?;
    for tag in 1..=3 {
        out.push((format!("{CRI_TOOLS}/test-image-tags:{tag}"), tags.clone()));
    }
    Ok(out
        .into_iter()
        .map(|(reference, image)| Tagged { reference, image })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (path, type, mode, uid) of each entry of a layer.
    fn entries(layer: &crate::oci::Blob) -> Vec<(String, tar::EntryType, u32, u64)> {
        let mut ar = tar::Archive::new(&layer.bytes[..]);
        ar.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                let path = e.path().unwrap().display().to_string();
                (path, h.entry_type(), h.mode().unwrap(), h.uid().unwrap())
            })
            .collect()
    }

    #[test]
    fn images_carry_what_critest_checks() {
        let images = build(None).expect("images");
        let get = |r: &str| {
            images
                .iter()
                .find(|t| t.reference == r)
                .unwrap_or_else(|| panic!("{r} missing"))
                .image
                .clone()
        };
        let nnp = get("registry.k8s.io/e2e-test-images/nonewprivs:1.3");
        assert!(entries(nnp.layers.last().unwrap())
            .iter()
            .any(|(p, t, mode, uid)| {
                p == "usr/local/bin/nnp"
                    && *t == tar::EntryType::Regular
                    && mode & 0o7777 == 0o4755
                    && *uid == 0
            }));
        let busybox = get("registry.k8s.io/e2e-test-images/busybox:1.29-2");
        let base = entries(&busybox.layers[0]);
        for (path, kind) in [
            ("bin/ls", tar::EntryType::Link),
            ("bin/pgrep", tar::EntryType::Regular),
            ("bin/ipcs", tar::EntryType::Regular),
            ("bin/sh", tar::EntryType::Symlink),
        ] {
            assert!(
                base.iter().any(|(p, t, ..)| p == path && *t == kind),
                "{path}"
            );
        }
        let tags: Vec<_> = (1..=3)
            .map(|t| {
                get(&format!("{CRI_TOOLS}/test-image-tags:{t}"))
                    .manifest
                    .digest
                    .clone()
            })
            .collect();
        assert!(tags.iter().all(|d| *d == tags[0]));
        let distinct: std::collections::HashSet<_> = [
            "test-image-1:latest",
            "test-image-2:latest",
            "test-image-tag:test",
            "test-image-tag:all",
        ]
        .iter()
        .map(|n| get(&format!("{CRI_TOOLS}/{n}")).manifest.digest.clone())
        .collect();
        assert_eq!(distinct.len(), 4);
        let config: serde_json::Value = serde_json::from_slice(
            &get(&format!("{CRI_TOOLS}/test-image-user-uid-group:latest"))
                .config
                .bytes,
        )
        .unwrap();
        assert_eq!(config["config"]["User"], "1003:1004");
    }

    #[test]
    fn ldd_names_the_loader_and_libc() {
        let libs = libraries(Path::new("/bin/sh")).expect("ldd /bin/sh");
        assert!(libs.iter().any(|l| l.ends_with("/libc.so.6")), "{libs:?}");
        assert!(libs.iter().any(|l| l.contains("ld-linux")), "{libs:?}");
    }
}
