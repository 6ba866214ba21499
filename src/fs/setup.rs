//! Building the filesystem at mount time: the inode table's pinned nodes
//! (the root and the `--device` entries), the image registry and the
//! control plane, the mount's one record (`ctl::ControlPlane`, holding the
//! `FsConfig`).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use super::MigsafeFs;
use super::inodes::{self, InodeTable, Kind};
use crate::backing::Device;
use crate::cache::Identity;
use crate::cache::invalidator::AttrInvalidator;
use crate::ctl::{ControlPlane, FsConfig};
use crate::image::{Image, Registry, Source};
use crate::settings::Settings;
use crate::sys;

impl MigsafeFs {
    /// The filesystem of one mount: the root and each `--device` entry
    /// pinned in the inode table (a device with its image, registered for the
    /// life of the mount), and the control plane, which holds the
    /// configuration, the registry, the settings and the root fd.
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
        }
        let writer_cache = Arc::new(crate::cache::WriterCache::new(config.mountpoint.clone()));
        let ctl = Arc::new(ControlPlane {
            config,
            registry,
            settings,
            invalidator: Arc::new(AttrInvalidator::start(notifier.clone())),
            devices: device_images,
            root_fd,
            passthrough_supported: AtomicBool::new(false),
            passthrough_active: AtomicBool::new(false),
            writeback_active: AtomicBool::new(false),
            arrivals: Default::default(),
            arrival_order: Default::default(),
            writer_cache,
            workers: Default::default(),
        });
        Ok(MigsafeFs {
            ctl,
            inodes,
            handles: Arc::default(),
            notifier,
            mounted_at: SystemTime::now(),
        })
    }
}
