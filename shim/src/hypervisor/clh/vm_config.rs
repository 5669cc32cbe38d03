//! [`VmSpec`] → Cloud Hypervisor `VmConfig` (the body of `vm.create`), a pure function.
//!
//! Everything the VM is made of goes into `vm.create` except the NICs: their tap file
//! descriptors can only be handed over with `vm.add-net` (SCM_RIGHTS), see [`net_config`].
use cloud_hypervisor_client::models::{
    BalloonConfig, ConsoleConfig, ConsoleMode, CpusConfig, FsConfig, MemoryConfig, NetConfig,
    PayloadConfig, RngConfig, SerialConfig, VmConfig, VsockConfig,
};

use crate::{hypervisor::VmSpec, network::NetDevice};

/// The driver's own kernel arguments, before the sandbox's. `reboot=t` turns a panic
/// reboot into a triple fault, which Cloud Hypervisor handles as a shutdown: a crashed
/// guest ends the VMM instead of booting again.
pub const KERNEL_ARGS: &[&str] = &["console=ttyS0", "panic=-1", "reboot=t"];

const MIB: i64 = 1 << 20;
/// Cloud Hypervisor hot-plugs memory in 128 MiB blocks.
pub const HOTPLUG_ALIGN_MIB: u64 = 128;
/// virtio-fs request queue: one queue of 1024 descriptors (as Kata and CH's docs use).
const FS_QUEUE_SIZE: i32 = 1024;
/// One tap fd is one RX/TX queue pair.
const NET_QUEUES_PER_FD: i32 = 2;
const NET_QUEUE_SIZE: i32 = 256;

/// The `vm.create` body for `spec`. `memory_hotplug_mib` reserves room for memory
/// hot-plug (rounded up to 128 MiB; 0 disables it).
pub fn vm_config(spec: &VmSpec, memory_hotplug_mib: u64) -> VmConfig {
    let cmdline = KERNEL_ARGS
        .iter()
        .map(|a| a.to_string())
        .chain(spec.kernel_args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    let payload = PayloadConfig {
        kernel: Some(path(&spec.kernel)),
        initramfs: Some(path(&spec.initrd)),
        cmdline: Some(cmdline),
        ..PayloadConfig::new()
    };
    let hotplug = memory_hotplug_mib.div_ceil(HOTPLUG_ALIGN_MIB) * HOTPLUG_ALIGN_MIB;
    let memory = MemoryConfig {
        // vhost-user back-ends (virtiofsd) map guest RAM: it must be shared memory.
        shared: Some(spec.share.is_some()),
        hotplug_size: (hotplug > 0).then_some(hotplug as i64 * MIB),
        hotplug_method: (hotplug > 0).then(|| "Acpi".to_string()),
        ..MemoryConfig::new(spec.memory_mib as i64 * MIB)
    };
    VmConfig {
        cpus: Some(CpusConfig::new(spec.vcpus as i32, spec.max_vcpus as i32)),
        memory: Some(memory),
        fs: spec.share.as_ref().map(|s| {
            vec![FsConfig {
                id: Some("fs0".into()),
                ..FsConfig::new(s.tag.clone(), path(&s.socket), 1, FS_QUEUE_SIZE)
            }]
        }),
        vsock: Some(VsockConfig::new(
            spec.vsock.cid as i64,
            path(&spec.vsock.socket),
        )),
        // CH's defaults are serial Null and console Tty (which would grab the shim's
        // terminal): both are set explicitly.
        serial: Some(SerialConfig {
            file: Some(path(&spec.console_log)),
            ..SerialConfig::new(ConsoleMode::File)
        }),
        console: Some(ConsoleConfig::new(ConsoleMode::Off)),
        rng: Some(RngConfig::new("/dev/urandom".into())),
        // A balloon that never inflates: only its free page reporting queue is used.
        balloon: spec.free_page_reporting.then(|| BalloonConfig {
            free_page_reporting: Some(true),
            ..BalloonConfig::new(0)
        }),
        ..VmConfig::new(payload)
    }
}

/// The `vm.add-net` body for the `index`-th NIC, whose tap arrives as one fd (SCM_RIGHTS).
/// No tap name: with fds Cloud Hypervisor uses those and opens nothing itself.
pub fn net_config(net: &NetDevice, index: usize) -> NetConfig {
    NetConfig {
        id: Some(format!("net{index}")),
        mac: Some(net.mac.clone()),
        mtu: Some(net.mtu as i32),
        num_queues: Some(NET_QUEUES_PER_FD),
        queue_size: Some(NET_QUEUE_SIZE),
        ..NetConfig::new()
    }
}

fn path(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::hypervisor::{ShareDevice, VsockDevice};

    fn spec() -> VmSpec {
        VmSpec {
            id: "sb1".into(),
            dir: "/run/shoji/sb1".into(),
            kernel: "/k/vmlinux".into(),
            initrd: "/k/initramfs.img".into(),
            kernel_args: vec!["shoji.share=shoji".into(), "shoji.log=debug".into()],
            vcpus: 2,
            max_vcpus: 4,
            memory_mib: 256,
            free_page_reporting: true,
            share: Some(ShareDevice {
                tag: "shoji".into(),
                socket: "/run/shoji/sb1/virtiofsd.sock".into(),
                backend: tokio::sync::watch::channel(None).1,
            }),
            vsock: VsockDevice {
                cid: 7,
                socket: "/run/shoji/sb1/vsock.sock".into(),
            },
            nets: vec![NetDevice {
                tap: "tap0".into(),
                mac: "02:00:00:00:00:01".into(),
                mtu: 1450,
                netns: Some(PathBuf::from("/run/netns/pod")),
            }],
            console_log: "/run/shoji/sb1/console.log".into(),
            jail: None,
        }
    }

    #[test]
    fn payload_has_kernel_initramfs_and_cmdline() {
        let c = vm_config(&spec(), 0);
        assert_eq!(c.payload.kernel.as_deref(), Some("/k/vmlinux"));
        assert_eq!(c.payload.initramfs.as_deref(), Some("/k/initramfs.img"));
        assert_eq!(
            c.payload.cmdline.as_deref(),
            Some("console=ttyS0 panic=-1 reboot=t shoji.share=shoji shoji.log=debug")
        );
        assert_eq!(c.payload.firmware, None);
    }

    #[test]
    fn cpus_and_memory() {
        let c = vm_config(&spec(), 0);
        let cpus = c.cpus.unwrap();
        assert_eq!((cpus.boot_vcpus, cpus.max_vcpus), (2, 4));
        let mem = c.memory.unwrap();
        assert_eq!(mem.size, 256 << 20);
        assert_eq!(mem.shared, Some(true));
        assert_eq!(mem.hotplug_size, None);
        assert_eq!(mem.hotplug_method, None);
    }

    #[test]
    fn memory_hotplug_is_rounded_to_128_mib() {
        let mem = vm_config(&spec(), 1000).memory.unwrap();
        assert_eq!(mem.hotplug_size, Some(1024 << 20));
        assert_eq!(mem.hotplug_method.as_deref(), Some("Acpi"));
    }

    #[test]
    fn memory_is_private_without_a_share() {
        let mut s = spec();
        s.share = None;
        let c = vm_config(&s, 0);
        assert_eq!(c.memory.unwrap().shared, Some(false));
        assert_eq!(c.fs, None);
    }

    #[test]
    fn devices_fs_vsock_serial_console_rng() {
        let c = vm_config(&spec(), 0);
        let fs = c.fs.unwrap();
        assert_eq!(fs.len(), 1);
        assert_eq!(
            (fs[0].tag.as_str(), fs[0].socket.as_str()),
            ("shoji", "/run/shoji/sb1/virtiofsd.sock")
        );
        assert_eq!((fs[0].num_queues, fs[0].queue_size), (1, 1024));
        let vsock = c.vsock.unwrap();
        assert_eq!(
            (vsock.cid, vsock.socket.as_str()),
            (7, "/run/shoji/sb1/vsock.sock")
        );
        let serial = c.serial.unwrap();
        assert_eq!(serial.mode, ConsoleMode::File);
        assert_eq!(serial.file.as_deref(), Some("/run/shoji/sb1/console.log"));
        assert_eq!(c.console.unwrap().mode, ConsoleMode::Off);
        assert_eq!(c.rng.unwrap().src, "/dev/urandom");
        // NICs go through vm.add-net with their fds, never through vm.create.
        assert_eq!(c.net, None);
    }

    #[test]
    fn a_balloon_only_for_free_page_reporting() {
        let v = serde_json::to_value(vm_config(&spec(), 0)).unwrap();
        assert_eq!(
            v["balloon"],
            serde_json::json!({"size": 0, "free_page_reporting": true})
        );
        let mut s = spec();
        s.free_page_reporting = false;
        assert_eq!(vm_config(&s, 0).balloon, None);
    }

    #[test]
    fn serialized_body_uses_ch_field_names() {
        let v = serde_json::to_value(vm_config(&spec(), 0)).unwrap();
        assert_eq!(v["memory"]["shared"], true);
        assert_eq!(v["console"]["mode"], "Off");
        assert_eq!(v["serial"]["mode"], "File");
        assert_eq!(v["cpus"]["boot_vcpus"], 2);
        assert_eq!(v["fs"][0]["tag"], "shoji");
        // Unset options are left out, so CH fills in its own defaults.
        assert!(v.get("disks").is_none() && v.get("net").is_none(), "{v}");
    }

    #[test]
    fn net_config_carries_mac_mtu_and_one_queue_pair() {
        let n = net_config(&spec().nets[0], 0);
        assert_eq!(n.id.as_deref(), Some("net0"));
        assert_eq!(n.mac.as_deref(), Some("02:00:00:00:00:01"));
        assert_eq!(n.mtu, Some(1450));
        assert_eq!(n.num_queues, Some(2));
        assert_eq!(n.tap, None);
    }
}
