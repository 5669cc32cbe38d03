//! OCI image building blocks: content-addressed blobs, uncompressed tar layers with fixed owners and times (so
//! the same files give the same digest), and an image's config and manifest.

use sha2::{Digest, Sha256};

/// Media type of an image manifest (what a registry's `Content-Type` says for it).
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
/// The `PATH` images set in their config.
pub const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Bytes and their `sha256:<hex>` digest.
#[derive(Debug, Clone)]
pub struct Blob {
    pub digest: String,
    pub bytes: Vec<u8>,
}

impl Blob {
    pub fn new(bytes: Vec<u8>) -> Blob {
        let digest = format!("sha256:{:x}", Sha256::digest(&bytes));
        Blob { digest, bytes }
    }

    fn json(value: &serde_json::Value) -> Blob {
        Blob::new(serde_json::to_vec(value).expect("JSON values serialize"))
    }

    /// An OCI descriptor of this blob with `media_type`.
    fn descriptor(&self, media_type: &str) -> serde_json::Value {
        serde_json::json!({"mediaType": media_type, "digest": self.digest, "size": self.bytes.len()})
    }
}

/// A layer being written: a tar archive whose entries belong to root unless said otherwise, dated 0.
pub struct Layer(tar::Builder<Vec<u8>>);

impl Default for Layer {
    fn default() -> Self {
        Layer(tar::Builder::new(Vec::new()))
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64, uid: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(uid.into());
    h.set_gid(uid.into());
    h.set_mtime(0);
    h
}

impl Layer {
    /// A regular file owned by root (`mode` may carry set-uid bits: tar keeps them).
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> std::io::Result<()> {
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64, 0);
        self.0.append_data(&mut h, path, data)
    }

    /// A directory owned by `uid`:`uid`.
    pub fn dir(&mut self, path: &str, mode: u32, uid: u32) -> std::io::Result<()> {
        let mut h = header(tar::EntryType::Directory, mode, 0, uid);
        self.0.append_data(&mut h, path, std::io::empty())
    }

    /// A symbolic link `path` -> `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> std::io::Result<()> {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0);
        self.0.append_link(&mut h, path, target)
    }

    /// A hard link `path` to `target`, an earlier entry of this layer (one inode: a mount over one name
    /// leaves the other alone, unlike a symlink, which a mount follows).
    pub fn hardlink(&mut self, path: &str, target: &str) -> std::io::Result<()> {
        let mut h = header(tar::EntryType::Link, 0o755, 0, 0);
        self.0.append_link(&mut h, path, target)
    }

    pub fn finish(self) -> std::io::Result<Blob> {
        self.0.into_inner().map(Blob::new)
    }
}

/// What an image's config says about running it (the `config` object of the OCI image config).
#[derive(Debug, Clone, Default)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// Variables besides [`PATH_ENV`].
    pub env: Vec<String>,
    /// `User`: `uid`, `name`, `uid:gid` or `name:gid`; empty for root.
    pub user: String,
}

/// An image: its layers (lowest first), config and manifest.
#[derive(Debug, Clone)]
pub struct Image {
    pub layers: Vec<Blob>,
    pub config: Blob,
    pub manifest: Blob,
}

impl Image {
    pub fn new(layers: Vec<Blob>, run: &RunConfig) -> Image {
        let mut env = vec![PATH_ENV.to_string()];
        env.extend(run.env.iter().cloned());
        let mut config = serde_json::json!({"Env": env, "WorkingDir": "/"});
        if !run.entrypoint.is_empty() {
            config["Entrypoint"] = serde_json::json!(run.entrypoint);
        }
        if !run.cmd.is_empty() {
            config["Cmd"] = serde_json::json!(run.cmd);
        }
        if !run.user.is_empty() {
            config["User"] = serde_json::json!(run.user);
        }
        // diff_ids equal the layer digests: the layers are not compressed.
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
        let config = Blob::json(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }));
        let layer_descriptors: Vec<_> = layers
            .iter()
            .map(|l| l.descriptor(LAYER_MEDIA_TYPE))
            .collect();
        let manifest = Blob::json(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": config.descriptor(CONFIG_MEDIA_TYPE),
            "layers": layer_descriptors,
        }));
        Image {
            layers,
            config,
            manifest,
        }
    }

    /// Every blob of the image: layers, config, manifest.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        self.layers.iter().chain([&self.config, &self.manifest])
    }

    /// The manifest's descriptor with `annotations`, as an image index lists it.
    pub fn index_entry(&self, annotations: serde_json::Value) -> serde_json::Value {
        let mut d = self.manifest.descriptor(MANIFEST_MEDIA_TYPE);
        d["platform"] = serde_json::json!({"architecture": "amd64", "os": "linux"});
        d["annotations"] = annotations;
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_files_same_digest_and_manifest_names_its_blobs() {
        let build = || {
            let mut l = Layer::default();
            l.dir("bin", 0o755, 0).unwrap();
            l.file("bin/x", 0o4755, b"x").unwrap();
            l.finish().unwrap()
        };
        assert_eq!(build().digest, build().digest);
        let img = Image::new(
            vec![build()],
            &RunConfig {
                user: "1000".into(),
                ..Default::default()
            },
        );
        let m: serde_json::Value = serde_json::from_slice(&img.manifest.bytes).unwrap();
        assert_eq!(m["config"]["digest"], img.config.digest.as_str());
        assert_eq!(m["layers"][0]["digest"], img.layers[0].digest.as_str());
        let c: serde_json::Value = serde_json::from_slice(&img.config.bytes).unwrap();
        assert_eq!(c["config"]["User"], "1000");
        assert_eq!(c["rootfs"]["diff_ids"][0], img.layers[0].digest.as_str());
        assert_eq!(img.blobs().count(), 3);
    }
}
