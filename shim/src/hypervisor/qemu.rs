//! QEMU driver (microvm, virtio-mmio, vhost-user back-ends).
