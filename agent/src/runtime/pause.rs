//! PauseContainer and ResumeContainer: the container's cgroup frozen or thawed.
use super::{internal, Runtime, RuntimeError};
use crate::cgroup;

impl Runtime {
    pub async fn pause(&self, id: &str, frozen: bool) -> Result<(), RuntimeError> {
        let c = self.container(id)?;
        cgroup::freeze(&c.cgroup, frozen)
            .await
            .map_err(internal("freezer"))
    }
}
