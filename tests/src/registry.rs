//! A read-only image registry speaking the pull side of the OCI distribution API over plain HTTP on 127.0.0.1:
//! `GET /v2/`, `GET|HEAD /v2/<name>/manifests/<tag or digest>`, `GET|HEAD /v2/<name>/blobs/<digest>`. containerd
//! uses it as the mirror of the registries critest's images name (`<host>/<name>:<tag>` is served as
//! `<name>:<tag>`). One thread per connection, one request per connection (`Connection: close`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::oci::{Blob, Image, MANIFEST_MEDIA_TYPE};

/// What the registry serves: manifests by repository and tag or digest, blobs by digest.
#[derive(Default)]
pub struct Registry {
    manifests: HashMap<(String, String), Arc<Image>>,
    blobs: HashMap<String, Blob>,
}

/// A response: status, content type, the digest header for content, body (left out for HEAD).
#[derive(Debug, PartialEq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub digest: Option<String>,
    pub body: Vec<u8>,
}

impl Response {
    fn error(status: u16, code: &str) -> Response {
        Response {
            status,
            content_type: "application/json",
            digest: None,
            body: format!(r#"{{"errors":[{{"code":"{code}","message":"{code}"}}]}}"#).into_bytes(),
        }
    }

    fn content(content_type: &'static str, blob: &Blob) -> Response {
        Response {
            status: 200,
            content_type,
            digest: Some(blob.digest.clone()),
            body: blob.bytes.clone(),
        }
    }
}

/// Splits `host/name:tag` into (`name`, `tag`), the host dropped as the mirror sees it.
fn repository_and_tag(reference: &str) -> Option<(String, String)> {
    let (_host, rest) = reference.split_once('/')?;
    let (name, tag) = rest.rsplit_once(':')?;
    Some((name.to_string(), tag.to_string()))
}

impl Registry {
    /// Adds `image` under its full reference `host/name:tag`, by tag and by digest.
    pub fn add(&mut self, reference: &str, image: Arc<Image>) {
        let (name, tag) = repository_and_tag(reference)
            .unwrap_or_else(|| panic!("{reference}: not host/name:tag"));
        for blob in image.blobs() {
            self.blobs.insert(blob.digest.clone(), blob.clone());
        }
        self.manifests
            .insert((name.clone(), image.manifest.digest.clone()), image.clone());
        self.manifests.insert((name, tag), image);
    }

    /// The answer to `method` on `path` (a query string, such as containerd's `?ns=<host>`, is ignored).
    pub fn handle(&self, method: &str, path: &str) -> Response {
        if method != "GET" && method != "HEAD" {
            return Response::error(405, "UNSUPPORTED");
        }
        let path = path.split('?').next().unwrap_or_default();
        if path == "/v2/" || path == "/v2" {
            return Response {
                status: 200,
                content_type: "application/json",
                digest: None,
                body: b"{}".to_vec(),
            };
        }
        let Some(rest) = path.strip_prefix("/v2/") else {
            return Response::error(404, "NOT_FOUND");
        };
        if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
            return match self.manifests.get(&(name.into(), reference.into())) {
                Some(image) => Response::content(MANIFEST_MEDIA_TYPE, &image.manifest),
                None => Response::error(404, "MANIFEST_UNKNOWN"),
            };
        }
        if let Some((_name, digest)) = rest.rsplit_once("/blobs/") {
            return match self.blobs.get(digest) {
                Some(blob) => Response::content("application/octet-stream", blob),
                None => Response::error(404, "BLOB_UNKNOWN"),
            };
        }
        Response::error(404, "NOT_FOUND")
    }

    /// Serves connections from `listener` until the process ends.
    pub fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        for conn in listener.incoming() {
            let conn = conn?;
            let registry = self.clone();
            std::thread::spawn(move || {
                if let Err(e) = registry.answer(conn) {
                    eprintln!("registry: connection: {e}");
                }
            });
        }
        Ok(())
    }

    fn answer(&self, conn: TcpStream) -> std::io::Result<()> {
        // A client that stalls must not pin a thread forever.
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut request_line = String::new();
        reader.read_line(&mut request_line)?;
        // Headers are read and ignored: there is no body to a GET or HEAD and content negotiation has one answer.
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
                break;
            }
        }
        let mut words = request_line.split_whitespace();
        let (method, path) = (
            words.next().unwrap_or_default(),
            words.next().unwrap_or_default(),
        );
        let res = self.handle(method, path);
        eprintln!("registry: {method} {path} {}", res.status);
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Docker-Distribution-API-Version: registry/2.0\r\nConnection: close\r\n",
            res.status,
            if res.status == 200 { "OK" } else { "Error" },
            res.content_type,
            res.body.len()
        );
        if let Some(digest) = &res.digest {
            head += &format!("Docker-Content-Digest: {digest}\r\n");
        }
        head += "\r\n";
        let mut conn = conn;
        conn.write_all(head.as_bytes())?;
        if method != "HEAD" {
            conn.write_all(&res.body)?;
        }
        conn.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{Layer, RunConfig};
    use std::io::Read;

    fn registry() -> (Registry, Arc<Image>) {
        let mut l = Layer::default();
        l.file("hello", 0o644, b"hi").unwrap();
        let image = Arc::new(Image::new(vec![l.finish().unwrap()], &RunConfig::default()));
        let mut r = Registry::default();
        r.add(
            "gcr.io/k8s-staging-cri-tools/test-image-tags:1",
            image.clone(),
        );
        (r, image)
    }

    #[test]
    fn manifests_by_tag_and_digest_blobs_by_digest() {
        let (r, image) = registry();
        assert_eq!(r.handle("GET", "/v2/").status, 200);
        let by_tag = r.handle(
            "HEAD",
            "/v2/k8s-staging-cri-tools/test-image-tags/manifests/1?ns=gcr.io",
        );
        assert_eq!(by_tag.status, 200);
        assert_eq!(by_tag.content_type, MANIFEST_MEDIA_TYPE);
        assert_eq!(
            by_tag.digest.as_deref(),
            Some(image.manifest.digest.as_str())
        );
        let by_digest = r.handle(
            "GET",
            &format!(
                "/v2/k8s-staging-cri-tools/test-image-tags/manifests/{}",
                image.manifest.digest
            ),
        );
        assert_eq!(by_digest, by_tag);
        let layer = r.handle(
            "GET",
            &format!(
                "/v2/k8s-staging-cri-tools/test-image-tags/blobs/{}",
                image.layers[0].digest
            ),
        );
        assert_eq!(layer.body, image.layers[0].bytes);
        assert_eq!(
            r.handle(
                "GET",
                "/v2/k8s-staging-cri-tools/test-image-tags/manifests/2"
            )
            .status,
            404
        );
        assert_eq!(r.handle("PUT", "/v2/").status, 405);
    }

    #[test]
    fn head_over_http_has_headers_and_no_body() {
        let (r, image) = registry();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || Arc::new(r).serve(listener));
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.write_all(
            b"HEAD /v2/k8s-staging-cri-tools/test-image-tags/manifests/1 HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains(&format!(
            "Docker-Content-Digest: {}\r\n",
            image.manifest.digest
        )));
        assert!(text.contains(&format!(
            "Content-Length: {}\r\n",
            image.manifest.bytes.len()
        )));
        assert!(text.ends_with("\r\n\r\n"), "{text}");
    }
}
