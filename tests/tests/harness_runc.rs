//! Proves the containerd/CRI harness with runc on containerd 1.7 and 2.x.
use shoji_tests::containerd::{Containerd, Options, Version};
use std::time::Duration;

async fn ctr_run(version: Version) {
    let ctrd = Containerd::start(version, Options::default())
        .await
        .expect("start");
    shoji_tests::image::import(&ctrd, "shoji")
        .await
        .expect("import");
    let out = ctrd
        .ctr(
            "shoji",
            &[
                "run",
                "--rm",
                shoji_tests::image::BUSYBOX,
                "t1",
                "sh",
                "-c",
                "echo hi; exit 3",
            ],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    println!("{out:?}");
    assert_eq!(out.stdout, "hi\n");
    assert_eq!(out.code(), 3);
    ctrd.assert_no_leftovers().await.unwrap();
    ctrd.stop().await.unwrap();
}

#[tokio::test]
async fn ctr_run_1_7() {
    ctr_run(Version::V1_7).await
}
#[tokio::test]
async fn ctr_run_2() {
    ctr_run(Version::V2).await
}
