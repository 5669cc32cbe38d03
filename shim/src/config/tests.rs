use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("test.toml"))
}

#[test]
fn empty_file_gives_defaults() {
    assert_eq!(parse("").unwrap(), Config::default());
    assert_eq!(Config::default().hypervisor, HypervisorChoice::Auto);
    assert_eq!(
        parse("hypervisor = \"qemu\"").unwrap().hypervisor,
        HypervisorChoice::Qemu
    );
}

#[test]
fn full_file_is_read() {
    let cfg = parse(
        r#"
        hypervisor = "clh"
        kernel = "/k"
        initrd = "/i"
        default_vcpus = 2
        default_memory_mib = 512
        kernel_args = ["loglevel=7"]
        log_level = "debug"
        run_dir = "/tmp/r"
        log_dir = "/tmp/l"
        log_retention = 3
        debug_console = true
        free_page_reporting = false
        [virtiofsd]
        path = "/v"
        cache = "never"
        [qemu]
        path = "/q"
        accel = "tcg"
        tcg_tb_size_mib = 64
        [clh]
        path = "/c"
        [vhost_device_vsock]
        path = "/h"
        [timeouts]
        vm_start_ms = 1000
        agent_ready_ms = 2000
        agent_call_ms = 3000
        shutdown_ms = 4000
        "#,
    )
    .unwrap();
    assert_eq!(cfg.hypervisor, HypervisorChoice::Clh);
    assert_eq!(cfg.kernel, PathBuf::from("/k"));
    assert_eq!(cfg.default_memory_mib, 512);
    assert_eq!(cfg.virtiofsd.cache, "never");
    assert_eq!(cfg.qemu.tcg_tb_size_mib, 64);
    assert_eq!(cfg.qemu.accel, AccelChoice::Tcg);
    assert_eq!(cfg.vhost_device_vsock.path, PathBuf::from("/h"));
    assert_eq!(cfg.timeouts.agent_ready, Duration::from_secs(2));
    assert_eq!(cfg.timeouts.shutdown, Duration::from_secs(4));
    assert_eq!(cfg.log_dir, PathBuf::from("/tmp/l"));
    assert_eq!(cfg.log_retention, 3);
    assert!(cfg.debug_console);
    assert!(!cfg.free_page_reporting);
    assert!(Config::default().free_page_reporting);
}

#[test]
fn unknown_keys_are_named() {
    let err = parse("kernal = \"/k\"").unwrap_err().to_string();
    assert!(err.contains("kernal"), "{err}");
    let err = parse("[timeouts]\nagent_ready = 5")
        .unwrap_err()
        .to_string();
    assert!(err.contains("agent_ready"), "{err}");
}

#[test]
fn bad_values_are_named() {
    let err = parse("hypervisor = \"firecracker\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("firecracker"), "{err}");
    let err = parse("[virtiofsd]\ncache = \"sometimes\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("virtiofsd.cache"), "{err}");
    let err = parse("default_vcpus = 0").unwrap_err().to_string();
    assert!(err.contains("default_vcpus"), "{err}");
    let err = parse("[timeouts]\nagent_call_ms = 0")
        .unwrap_err()
        .to_string();
    assert!(err.contains("agent_call_ms"), "{err}");
    let err = parse("[timeouts]\nshutdown_ms = 18446744073709551615")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shutdown_ms") && err.contains("3600000"),
        "{err}"
    );
    let err = parse("max_vcpus = 0").unwrap_err().to_string();
    assert!(err.contains("max_vcpus"), "{err}");
    let err = parse("max_vcpus = 2\ndefault_vcpus = 4")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("default_vcpus") && err.contains("max_vcpus"),
        "{err}"
    );
    let err = parse("max_memory_mib = 1024\ndefault_memory_mib = 2048")
        .unwrap_err()
        .to_string();
    assert!(err.contains("default_memory_mib"), "{err}");
    let err = parse("default_vcpus = -1").unwrap_err().to_string();
    assert!(err.contains("default_vcpus"), "{err}");
    let err = parse("log_retention = 100000").unwrap_err().to_string();
    assert!(err.contains("log_retention"), "{err}");
    let err = parse("log_dir = \"logs\"").unwrap_err().to_string();
    assert!(err.contains("log_dir"), "{err}");
}

#[test]
fn missing_file_is_an_error_naming_it() {
    let err = Config::from_file(Path::new("/nonexistent/shoji.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/shoji.toml"), "{err}");
}

#[test]
fn the_jail_range_is_checked() {
    let cfg = parse("[jail]\nfirst_uid = 3000000000\nuid_count = 1000").unwrap();
    assert_eq!(
        (cfg.jail.first_uid, cfg.jail.uid_count),
        (3_000_000_000, 1000)
    );
    assert!(cfg.jail.enabled);
    for bad in [
        "[jail]\nuid_count = 0",
        "[jail]\nfirst_uid = 0",
        "[jail]\nfirst_uid = 4294967000\nuid_count = 1000",
    ] {
        let err = parse(bad).unwrap_err().to_string();
        assert!(
            err.contains("jail") && err.contains("non-root"),
            "{bad}: {err}"
        );
    }
}
