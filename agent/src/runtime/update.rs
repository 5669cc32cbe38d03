//! UpdateContainer: new OCI resources written to the container's cgroup.
use libcontainer::oci_spec::runtime::LinuxResources;

use super::{Runtime, RuntimeError};
use crate::cgroup;

impl Runtime {
    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), RuntimeError> {
        let c = self.container(id)?;
        let r: LinuxResources = serde_json::from_slice(resources_json).map_err(|e| {
            RuntimeError::InvalidArgument(format!("invalid OCI LinuxResources JSON: {e}"))
        })?;
        cgroup::update(&c.cgroup, &r).map_err(|e| RuntimeError::InvalidArgument(e.to_string()))
    }
}
