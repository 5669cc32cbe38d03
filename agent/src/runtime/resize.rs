//! ResizeTty: a tty process's window size (clamped to what a winsize holds).
use super::{Runtime, RuntimeError};

impl Runtime {
    pub fn resize_tty(
        &self,
        id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), RuntimeError> {
        let p = self.process(id, exec_id)?;
        let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
        p.io.resize(clamp(width), clamp(height))
            .map_err(RuntimeError::FailedPrecondition)
    }
}
