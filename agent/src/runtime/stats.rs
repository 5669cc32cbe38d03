//! ListProcesses and ContainerStats: what runs in a container's cgroup, and what it uses.
use shoji_agent_api::types::ContainerStatsResponse;

use super::{internal, Runtime, RuntimeError};
use crate::cgroup;

impl Runtime {
    pub fn pids(&self, id: &str) -> Result<Vec<u32>, RuntimeError> {
        cgroup::pids(&self.container(id)?.cgroup).map_err(internal("listing processes"))
    }

    pub fn stats(&self, id: &str) -> Result<ContainerStatsResponse, RuntimeError> {
        cgroup::stats(&self.container(id)?.cgroup).map_err(internal("reading cgroup stats"))
    }
}
