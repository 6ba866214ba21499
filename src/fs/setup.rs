//! Building the filesystem at mount time: what is fixed for the life of the
//! mount (`FsConfig`), the inode table's pinned nodes (the root and the
//! `--device` entries), the image registry and the control plane.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use super::inodes::{self, InodeTable, Kind};
use super::{DataPath, IoMode, MigsafeFs};
use crate::backing::Device;
use crate::cache::Identity;
use crate::cache::invalidator::AttrInvalidator;
use crate::ctl::ControlPlane;
use crate::image::{Image, Registry, Source};
use crate::settings::Settings;
use crate::sys;

/// Everything fixed at mount time.
#[derive(Debug)]
pub struct FsConfig {
    pub io: IoMode,
    pub ctl_name: String,
    pub xattr: bool,
    /// The user who mounted: besides root, the only one allowed to write
    /// control files.
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub max_write: u32,
    pub max_background: u16,
    /// Absolute path of the mountpoint.
    pub mountpoint: std::path::PathBuf,
    /// Data path of `--device` entries (cached or relay).
    pub device_io: DataPath,
}

impl MigsafeFs {
    /// The filesystem of one mount: the root and each `--device` entry
    /// pinned in the inode table (a device with its image, registered for the
    /// life of the mount), and the control plane holding the same registry,
    /// settings and root fd.
    pub fn new(
        config: FsConfig,
        settings: Arc<Settings>,
        root_fd: OwnedFd,
        devices: Vec<Device>,
    ) -> std::io::Result<MigsafeFs> {
        let root_fd = Arc::new(root_fd);
        let notifier = Arc::new(OnceLock::new());
        let root_st = sys::fstat_fd(std::os::fd::AsFd::as_fd(&*root_fd))?;
        let inodes = InodeTable::new();
        inodes.insert_pinned(
            Some(inodes::ROOT),
            Some(root_fd.clone()),
            Identity::of_stat(&root_st),
            Kind::Directory,
            None,
        );
        let registry = Arc::new(Registry::default());
        let mut device_ids = Vec::new();
        let mut device_images = Vec::new();
        for dev in devices {
            let dev = Arc::new(dev);
            let identity = Identity::of_stat(&dev.stat);
            // A device entry is one device for the life of the mount.
            let image = registry.get_or_insert(identity, &Default::default(), || {
                Image::new(identity, Source::Device(dev.clone()), dev.name.clone())
            });
            let inode = inodes.insert_pinned(
                None,
                None,
                identity,
                Kind::Image(image.clone()),
                Some(dev.clone()),
            );
            image.nodeid.store(inode.nodeid, Ordering::Relaxed);
            device_images.push((dev.name.clone(), image));
            device_ids.push((dev.name.clone(), inode.nodeid));
        }
        let ctl = Arc::new(ControlPlane {
            registry: registry.clone(),
            settings: settings.clone(),
            invalidator: Arc::new(AttrInvalidator::start(notifier.clone())),
            devices: device_images,
            root_fd: root_fd.clone(),
            ctl_name: config.ctl_name.clone(),
            mountpoint: config.mountpoint.clone(),
            owner_uid: config.owner_uid,
            io: config.io,
            device_io: config.device_io,
            passthrough_supported: AtomicBool::new(false),
            passthrough_active: AtomicBool::new(false),
            arrivals: Default::default(),
            arrival_order: Default::default(),
            writer_cache: Arc::new(crate::cache::WriterCache::new(config.mountpoint.clone())),
            workers: Default::default(),
        });
        Ok(MigsafeFs {
            config,
            ctl,
            settings,
            registry,
            root_fd,
            inodes,
            handles: Arc::default(),
            devices: device_ids,
            notifier,
            mounted_at: SystemTime::now(),
        })
    }
}
