//! The VM's size against what its containers ask. Every guest container's CPU and memory
//! limits are kept; an update whose pod total no longer fits the VM grows the VM first
//! where the hypervisor can (Cloud Hypervisor's `vm.resize`; memory in whole hot-plug
//! blocks), within the configured maxima, and is refused with the sizes named before
//! anything changed where it cannot (QEMU hot-plugs neither). A VM never shrinks: memory
//! unplug is not offered.
use std::{collections::HashMap, sync::Mutex};

use oci_spec::runtime::LinuxResources;

use super::{Result, Sandbox, SandboxError};
use crate::hypervisor::{Capabilities, HypervisorKind};

/// A VM's size: vCPUs and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// What a container asks of the VM; 0: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Limits {
    cpu_millis: u64,
    memory_mib: u64,
}

impl Limits {
    fn of(r: Option<&LinuxResources>) -> Limits {
        let cpu = r.and_then(|r| r.cpu().as_ref());
        let cpu_millis = match (cpu.and_then(|c| c.quota()), cpu.and_then(|c| c.period())) {
            (Some(q), Some(p)) if q > 0 && p > 0 => (q as u64 * 1000).div_ceil(p),
            _ => 0,
        };
        let memory_mib = r
            .and_then(|r| r.memory().as_ref()?.limit())
            .filter(|l| *l > 0)
            .map_or(0, |l| (l as u64).div_ceil(1 << 20));
        Limits {
            cpu_millis,
            memory_mib,
        }
    }
}

/// The VM's size and its containers' limits.
pub struct Sizing {
    size: Mutex<VmSize>,
    max: VmSize,
    /// Memory the guest itself needs beyond its containers' limits.
    overhead_mib: u64,
    limits: Mutex<HashMap<String, Limits>>,
}

impl Sizing {
    pub fn new(size: VmSize, max: VmSize, overhead_mib: u64) -> Sizing {
        Sizing {
            size: Mutex::new(size),
            max,
            overhead_mib,
            limits: Mutex::new(HashMap::new()),
        }
    }

    pub fn size(&self) -> VmSize {
        *self.size.lock().unwrap()
    }

    pub fn track(&self, container_id: &str, r: Option<&LinuxResources>) {
        let l = Limits::of(r);
        self.limits.lock().unwrap().insert(container_id.into(), l);
    }

    pub fn forget(&self, container_id: &str) {
        self.limits.lock().unwrap().remove(container_id);
    }

    /// The size the VM must have once `container_id` has `r`: None when the VM already
    /// fits; an error when the configured maxima do not allow it.
    fn needed(&self, container_id: &str, r: &LinuxResources) -> Result<Option<VmSize>> {
        let limits = self.limits.lock().unwrap();
        let total = limits
            .iter()
            .filter(|(id, _)| *id != container_id)
            .map(|(_, l)| *l)
            .chain([Limits::of(Some(r))])
            .fold(Limits::default(), |a, l| Limits {
                cpu_millis: a.cpu_millis + l.cpu_millis,
                memory_mib: a.memory_mib + l.memory_mib,
            });
        let size = self.size();
        let want = VmSize {
            vcpus: (total.cpu_millis.div_ceil(1000) as u32).max(size.vcpus),
            memory_mib: (total.memory_mib + self.overhead_mib).max(size.memory_mib),
        };
        if want == size {
            return Ok(None);
        }
        if want.vcpus > self.max.vcpus || want.memory_mib > self.max.memory_mib {
            return Err(SandboxError::Invalid(format!(
                "the pod's containers would need a VM of {} vCPUs and {} MiB, above max_vcpus = {} \
                 / max_memory_mib = {} (shoji configuration)",
                want.vcpus, want.memory_mib, self.max.vcpus, self.max.memory_mib
            )));
        }
        Ok(Some(want))
    }
}

/// A resize to ask the driver for: the vCPU count and memory size that change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resize {
    vcpus: Option<u32>,
    memory_mib: Option<u64>,
}

impl Resize {
    fn apply(self, have: VmSize) -> VmSize {
        VmSize {
            vcpus: self.vcpus.unwrap_or(have.vcpus),
            memory_mib: self.memory_mib.unwrap_or(have.memory_mib),
        }
    }
}

/// The resize that takes a VM of `have` to at least `want` on a `kind` backend that can do
/// `caps` (memory grows in whole hot-plug blocks, so it is rounded up), without passing
/// `max`; or why there is none.
fn plan_resize(
    have: VmSize,
    want: VmSize,
    max: VmSize,
    kind: HypervisorKind,
    caps: Capabilities,
) -> Result<Resize> {
    let more_memory = want.memory_mib > have.memory_mib;
    let cannot = (want.vcpus > have.vcpus && !caps.cpu_hotplug)
        || (more_memory && caps.memory_hotplug_block_mib.is_none());
    if cannot {
        return Err(SandboxError::Invalid(format!(
            "the pod's containers would need a VM of {} vCPUs and {} MiB; it has {} and {} MiB, \
             and the {kind} backend cannot resize a running VM (Cloud Hypervisor can)",
            want.vcpus, want.memory_mib, have.vcpus, have.memory_mib,
        )));
    }
    let memory_mib = match caps.memory_hotplug_block_mib {
        Some(block) if more_memory => {
            let grown =
                have.memory_mib + (want.memory_mib - have.memory_mib).next_multiple_of(block);
            if grown > max.memory_mib {
                return Err(SandboxError::Invalid(format!(
                    "the pod's containers would need a VM of {} MiB; the {kind} backend adds memory \
                     in {block} MiB blocks, so it would get {grown} MiB, above max_memory_mib = {} \
                     (shoji configuration)",
                    want.memory_mib, max.memory_mib
                )));
            }
            Some(grown)
        }
        _ => None,
    };
    Ok(Resize {
        vcpus: (want.vcpus > have.vcpus).then_some(want.vcpus),
        memory_mib,
    })
}

impl Sandbox {
    /// New cgroup limits for a container in the guest, the VM grown first if the pod's
    /// containers no longer fit it.
    pub async fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<()> {
        let r: LinuxResources = serde_json::from_slice(&resources_json)
            .map_err(|e| SandboxError::Invalid(format!("resources: {e}")))?;
        if let Some(want) = self.sizing.needed(container_id, &r)? {
            self.grow(want).await?;
        }
        self.agent
            .update_container(container_id, resources_json)
            .await?;
        self.sizing.track(container_id, Some(&r));
        Ok(())
    }

    async fn grow(&self, want: VmSize) -> Result<()> {
        let mut vm = self.vm.lock().await;
        let driver = vm
            .as_mut()
            .ok_or_else(|| SandboxError::Invalid("the VM is stopped".into()))?;
        let have = self.sizing.size();
        let resize = plan_resize(
            have,
            want,
            self.sizing.max,
            driver.kind(),
            driver.capabilities(),
        )?;
        driver.resize(resize.vcpus, resize.memory_mib).await?;
        let grown = resize.apply(have);
        *self.sizing.size.lock().unwrap() = grown;
        // What `shoji ps` and the metrics show.
        self.ledger.note(|s| {
            if let Some(info) = s.info.as_mut() {
                (info.vcpus, info.memory_mib) = (grown.vcpus, grown.memory_mib);
            }
        });
        slog::info!(self.log, "VM grown for the pod's containers";
            "vcpus" => grown.vcpus, "memory_mib" => grown.memory_mib);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use oci_spec::runtime::{LinuxCpuBuilder, LinuxMemoryBuilder, LinuxResourcesBuilder};

    use super::*;

    fn res(cpu_millis: i64, memory_mib: i64) -> LinuxResources {
        LinuxResourcesBuilder::default()
            .cpu(
                LinuxCpuBuilder::default()
                    .quota(cpu_millis * 100)
                    .period(100_000u64)
                    .build()
                    .unwrap(),
            )
            .memory(
                LinuxMemoryBuilder::default()
                    .limit(memory_mib << 20)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap()
    }

    fn size(vcpus: u32, memory_mib: u64) -> VmSize {
        VmSize { vcpus, memory_mib }
    }

    const CLH: Capabilities = Capabilities {
        accel: crate::hypervisor::Accel::Kvm,
        cpu_hotplug: true,
        memory_hotplug_block_mib: Some(128),
    };
    const QEMU: Capabilities = Capabilities {
        accel: crate::hypervisor::Accel::Tcg,
        cpu_hotplug: false,
        memory_hotplug_block_mib: None,
    };

    fn plan(have: VmSize, want: VmSize, caps: Capabilities) -> Result<Resize> {
        let kind = match caps.cpu_hotplug {
            true => HypervisorKind::Clh,
            false => HypervisorKind::Qemu,
        };
        plan_resize(have, want, size(4, 2048), kind, caps)
    }

    #[test]
    fn a_resize_asks_only_for_what_grows_and_memory_in_whole_blocks() {
        let have = size(1, 320);
        let resize = |vcpus, memory_mib| Resize { vcpus, memory_mib };
        assert_eq!(
            plan(have, size(2, 320), CLH).unwrap(),
            resize(Some(2), None)
        );
        // 320 → 448 is one 128 MiB block; 321 MiB needs a whole one as well.
        assert_eq!(
            plan(have, size(1, 448), CLH).unwrap(),
            resize(None, Some(448))
        );
        assert_eq!(
            plan(have, size(1, 321), CLH).unwrap(),
            resize(None, Some(448))
        );
        let both = plan(have, size(3, 600), CLH).unwrap();
        assert_eq!(both, resize(Some(3), Some(704)));
        assert_eq!(both.apply(have), size(3, 704));
        // Rounding up must not pass max_memory_mib.
        let e = plan(size(1, 1984), size(1, 2000), CLH)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("in 128 MiB blocks, so it would get 2112 MiB, above max_memory_mib = 2048"),
            "{e}"
        );
    }

    #[test]
    fn a_backend_that_cannot_hot_plug_is_named_with_the_sizes() {
        let have = size(1, 320);
        for want in [size(2, 320), size(1, 448)] {
            let e = plan(have, want, QEMU).unwrap_err().to_string();
            assert!(
                e.contains("it has 1 and 320 MiB, and the qemu backend cannot resize a running VM"),
                "{e}"
            );
        }
        // Memory hot-plug off (memory_hotplug_mib = 0): CPUs still grow, memory cannot.
        let cpus_only = Capabilities {
            memory_hotplug_block_mib: None,
            ..CLH
        };
        assert!(plan(have, size(2, 320), cpus_only).is_ok());
        assert!(plan(have, size(1, 448), cpus_only).is_err());
    }

    #[test]
    fn an_update_that_fits_changes_nothing_and_one_that_does_not_names_the_size() {
        let s = Sizing::new(
            VmSize {
                vcpus: 1,
                memory_mib: 320,
            },
            VmSize {
                vcpus: 4,
                memory_mib: 1024,
            },
            64,
        );
        s.track("a", Some(&res(500, 128)));
        s.track("b", Some(&res(500, 128)));
        assert_eq!(s.needed("a", &res(500, 64)).unwrap(), None);
        assert_eq!(
            s.needed("a", &res(1500, 256)).unwrap(),
            Some(VmSize {
                vcpus: 2,
                memory_mib: 448
            })
        );
        let e = s.needed("a", &res(8000, 128)).unwrap_err().to_string();
        assert!(e.contains("9 vCPUs") && e.contains("max_vcpus = 4"), "{e}");
        // Without limits a container asks nothing; a forgotten one no longer counts.
        s.track("c", None);
        s.forget("b");
        assert_eq!(
            s.needed("a", &res(1000, 512)).unwrap(),
            Some(VmSize {
                vcpus: 1,
                memory_mib: 576
            })
        );
    }
}
