//! migsafe: a FUSE filesystem that makes shared-storage live migration of
//! virtual machines safe while guests keep the host page cache.
//!
//! Linux only: it is built on FUSE, cachestat(2), posix_fadvise and /proc.
//!
//! Modules are `pub` only where the binary (src/main.rs) or the tests use
//! them; the rest is `pub(crate)`, so the dead-code lint sees what nothing
//! uses.

#[cfg(not(target_os = "linux"))]
compile_error!("migsafe runs on Linux only: it needs FUSE, cachestat(2), posix_fadvise and /proc");

pub(crate) mod backing;
pub(crate) mod cache;
pub mod client;
pub(crate) mod ctl;
pub(crate) mod datapath;
pub mod doctor;
pub(crate) mod error;
pub mod fs;
pub(crate) mod image;
pub mod logging;
pub mod manual;
pub mod mount;
pub(crate) mod mountinfo;
pub mod protocol;
pub mod residency;
pub(crate) mod session;
pub mod settings;
pub(crate) mod sys;
