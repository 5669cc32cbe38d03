//! The bad-input corpus: malformed input at every boundary the host reads (ids, the config
//! file, CRI annotations and the OCI spec, runtime options, the `shoji` CLI, and through a
//! real containerd) gets one clear error that names what is wrong and the limit, no panic,
//! and leaves the host as it was. What the guest sends is bounded by the shim's own unit
//! tests (OOM events checked and rate-limited, exit statuses, error texts, stream frames).
use std::{path::Path, time::Duration};

use oci_spec::runtime::Spec;
use shoji::{
    config::Config,
    containerd::options,
    oci,
    sandbox::{validate_id, Sandbox, SandboxConfig},
};
use shoji_tests::{
    bins,
    containerd::Version,
    image::BUSYBOX,
    scenario::{self, Env, ShojiRuntime, CTR_NAMESPACE},
    vm::TestEnv,
};

/// Runs `case` on each input and checks its error contains `want`; returns how many ran.
fn corpus<T: std::fmt::Debug>(
    what: &str,
    cases: &[(T, &str)],
    case: impl Fn(&T) -> Result<(), String>,
) -> usize {
    for (input, want) in cases {
        match case(input) {
            Ok(()) => panic!("{what} {input:?} was accepted"),
            Err(e) => assert!(
                e.contains(want),
                "{what} {input:?}: the error should name {want:?}: {e}"
            ),
        }
    }
    cases.len()
}

fn ids() -> usize {
    let long = "a".repeat(1 << 20);
    let cases: Vec<(&str, &str)> = vec![
        ("", "1 to 64 bytes"),
        ("..", "start with a letter or digit"),
        (".", "start with a letter or digit"),
        ("/", "start with a letter or digit"),
        ("a/b", "may contain only"),
        ("../escape", "start with a letter or digit"),
        ("-rf", "start with a letter or digit"),
        ("a b", "may contain only"),
        ("a\nb", "may contain only"),
        ("pod\u{e9}", "may contain only"),
        (&long[..65], "1 to 64 bytes"),
        (&long, "1 to 64 bytes"),
    ];
    corpus("sandbox id", &cases, |id| {
        validate_id("sandbox id", id).map_err(|e| e.to_string())
    })
}

fn config_values() -> usize {
    let cases = [
        ("kernal = \"/k\"", "kernal"),
        ("hypervisor = \"firecracker\"", "firecracker"),
        ("default_vcpus = 0", "default_vcpus"),
        ("default_vcpus = -1", "default_vcpus"),
        ("max_vcpus = 1000", "max_vcpus"),
        ("default_memory_mib = 1", "default_memory_mib"),
        ("max_memory_mib = 99999999999", "max_memory_mib"),
        ("[timeouts]\nagent_call_ms = 0", "agent_call_ms"),
        (
            "[timeouts]\nshutdown_ms = 18446744073709551615",
            "shutdown_ms",
        ),
        ("[virtiofsd]\ncache = \"sometimes\"", "virtiofsd.cache"),
        ("log_level = \"loud\"", "log_level"),
        ("kernel_args = [\"a b\"]", "kernel_args"),
        ("[qemu]\naccel = \"fast\"", "fast"),
    ];
    corpus("config", &cases, |text| {
        Config::parse(text, Path::new("bad.toml"))
            .map(drop)
            .map_err(|e| e.to_string())
    })
}

fn spec_with(annotations: &[(&str, &str)]) -> Spec {
    let mut s = Spec::default();
    s.set_annotations(Some(
        annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    ));
    s
}

fn annotations() -> usize {
    let config = Config {
        max_vcpus: 8,
        max_memory_mib: 16384,
        ..Config::default()
    };
    let (mem, quota, period) = (
        oci::ANNOTATION_MEMORY,
        oci::ANNOTATION_CPU_QUOTA,
        oci::ANNOTATION_CPU_PERIOD,
    );
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![(mem, "107374182400")], "max_memory_mib = 16384"),
        (vec![(mem, "1099511627776")], "max_memory_mib = 16384"),
        (vec![(mem, "1Gi")], "not an integer"),
        (vec![(mem, "1e9")], "not an integer"),
        (
            vec![(quota, "9223372036854775807"), (period, "100000")],
            "max_vcpus = 8",
        ),
        (
            vec![(quota, "100000"), (period, "10")],
            "outside 1000..=1000000",
        ),
        (vec![(quota, "lots"), (period, "100000")], "not an integer"),
    ];
    corpus("annotations", &cases, |a| {
        SandboxConfig::from_spec(&spec_with(a), "pod", config.clone())
            .map(drop)
            .map_err(|e| e.to_string())
    })
}

fn runtime_options() -> usize {
    let url = "type.googleapis.com/runtimeoptions.v1.Options";
    let cases: [(&[u8], &str); 2] = [
        (&[0xff, 0xff, 0xff], "runtime options"),
        (&[0x12, 0x40, b'x'], "runtime options"),
    ];
    corpus("runtime options", &cases, |bytes| {
        options::config_path(url, bytes).map(drop)
    })
}

/// Requests a boot refuses before any VM runs; the run dir must be left empty.
async fn sandbox_requests() -> usize {
    let env = TestEnv::new("badinput").await;
    let netns = |p: &str| {
        let mut s = SandboxConfig::new("bad", env.config.clone());
        s.netns = Some(p.into());
        s
    };
    let mut cases: Vec<(SandboxConfig, &str)> = Vec::new();
    for (hostname, want) in [
        ("a b", "hostname"),
        ("x init=/bin/sh", "hostname"),
        ("h\"q", "hostname"),
    ] {
        let mut s = SandboxConfig::new("bad", env.config.clone());
        s.hostname = Some(hostname.into());
        cases.push((s, want));
    }
    let mut s = SandboxConfig::new("bad", env.config.clone());
    s.hostname = Some("x".repeat(200));
    cases.push((s, "hostname"));
    let mut s = SandboxConfig::new("bad", env.config.clone());
    s.cgroup = Some("/shoji-bad/../../etc".into());
    cases.push((s, "cgroupsPath"));
    cases.push((netns("/proc/self/ns/net"), "the host's"));
    cases.push((netns("/run/netns/shoji-no-such-ns"), "shoji-no-such-ns"));
    let mut s = SandboxConfig::new("../bad", env.config.clone());
    s.vcpus = 1;
    cases.push((s, "invalid sandbox id"));
    let n = cases.len();
    for (cfg, want) in cases {
        let what = format!("{:?} / {:?} / {:?}", cfg.hostname, cfg.cgroup, cfg.netns);
        let err = Sandbox::start(cfg, env.log.clone())
            .await
            .err()
            .unwrap_or_else(|| panic!("{what} booted"))
            .to_string();
        assert!(err.contains(want), "{what}: want {want:?} in {err}");
    }
    env.assert_no_leak().await;
    n
}

/// `shoji cleanup` of an id that names another directory deletes nothing.
async fn cleanup_cli() -> usize {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(dir.path().join("sibling"), b"keep").unwrap();
    std::fs::write(run.join("inside"), b"keep").unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("run_dir = \"{}\"\n", run.display())).unwrap();
    let ids = ["..", "", "/", "../run", "."];
    for id in ids {
        let out = tokio::process::Command::new(bins::binary("shoji"))
            .arg("--config")
            .arg(&config)
            .args(["cleanup", id])
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "cleanup {id:?} succeeded");
        assert!(
            stderr.contains("invalid sandbox id"),
            "cleanup {id:?}: {stderr}"
        );
    }
    assert!(dir.path().join("sibling").exists() && run.join("inside").exists());
    ids.len()
}

/// Through containerd: pods asking for more than the host has are refused with the limit.
async fn through_containerd() -> usize {
    let run = async {
        let shoji = ShojiRuntime::new("max_memory_mib = 16384\nmax_vcpus = 2");
        let env = Env::start(Version::V2, &shoji.runtime, None).await?;
        let config = env.runtime.config_arg();
        let cases = [
            (
                format!("{}=107374182400", oci::ANNOTATION_MEMORY),
                "max_memory_mib = 16384",
            ),
            (
                format!("{}=9223372036854775807", oci::ANNOTATION_CPU_QUOTA),
                "max_vcpus = 2",
            ),
        ];
        let r = async {
            for (i, (annotation, want)) in cases.iter().enumerate() {
                let id = format!("big{i}");
                let mut args = vec![
                    "run",
                    "--rm",
                    "--runtime",
                    &env.runtime.runtime_type,
                    "--runtime-config-path",
                    &config,
                    "--annotation",
                    annotation,
                ];
                let period = format!("{}=100000", oci::ANNOTATION_CPU_PERIOD);
                args.extend(["--annotation", &period]);
                args.extend([BUSYBOX, &id, "true"]);
                let out = env
                    .ctrd
                    .ctr(CTR_NAMESPACE, &args, Duration::from_secs(60))
                    .await?;
                if out.status.success() || !out.stderr.contains(want) {
                    return Err(
                        format!("{annotation}: want a refusal naming {want:?}: {out:?}").into(),
                    );
                }
                let _ = env
                    .ctrd
                    .ctr(
                        CTR_NAMESPACE,
                        &["container", "rm", &id],
                        Duration::from_secs(30),
                    )
                    .await;
            }
            Ok(())
        }
        .await;
        env.conclude(r).await
    };
    scenario::within(Duration::from_secs(240), run).await;
    2
}

#[tokio::test]
async fn every_boundary_refuses_bad_input_clearly_and_leaves_the_host_intact() {
    let n = ids()
        + config_values()
        + annotations()
        + runtime_options()
        + sandbox_requests().await
        + cleanup_cli().await
        + through_containerd().await;
    eprintln!("{n} malformed inputs refused");
    assert!(n >= 40, "the corpus has only {n} inputs");
}
