//! migsafe: a FUSE filesystem that makes shared-storage live migration of
//! virtual machines safe while guests keep the host page cache.
//!
//! Linux only: it is built on FUSE, cachestat(2), posix_fadvise and /proc.

#[cfg(not(target_os = "linux"))]
compile_error!("migsafe runs on Linux only: it needs FUSE, cachestat(2), posix_fadvise and /proc");

pub mod backing;
pub mod cache;
pub mod client;
pub mod ctl;
pub mod datapath;
pub mod doctor;
pub mod error;
pub mod fs;
pub mod image;
pub mod logging;
pub mod manual;
pub mod mount;
pub mod mountinfo;
pub mod protocol;
pub mod residency;
pub mod settings;
pub mod sys;
