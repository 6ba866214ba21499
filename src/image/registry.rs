//! The registry: every image the mount has seen, by backing identity, and
//! the state a previous daemon recorded, brought back at start.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use super::state_file::{Record, StateFile};
use super::{INACTIVE, Image, LastCommand, Source};
use crate::cache::{Identity, Incarnation};
use crate::sys;

/// All images this mount has seen, by backing identity.
#[derive(Debug, Default)]
pub struct Registry {
    images: Mutex<HashMap<Identity, Arc<Image>>>,
    /// The state file every image records its fence and sticky error in.
    journal: std::sync::OnceLock<Arc<StateFile>>,
}

/// What `Registry::restore` brought back.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    pub inactive: usize,
    pub sticky: usize,
    pub dropped: usize,
}

impl Registry {
    /// The state file's path, if the mount keeps one.
    pub fn state_file(&self) -> Option<std::path::PathBuf> {
        self.journal.get().map(|j| j.path().to_path_buf())
    }

    /// Brings back the state a previous daemon recorded (`records`, loaded
    /// from `journal`), then records every image's changes there. Run
    /// before the mount serves any request. A record is applied only to
    /// the very file it was made for: found at its path beneath `root`
    /// (openat2 RESOLVE_BENEATH, no symlink followed) with the same (dev,
    /// ino) and incarnation, or the `--device` entry of its name with the
    /// same identity. Anything else (deleted, replaced, renamed away while
    /// no daemon ran) drops the record with a warning naming it: another
    /// file must never inherit a fence.
    pub fn restore(
        &self,
        journal: Arc<StateFile>,
        records: Vec<Record>,
        root: &Arc<OwnedFd>,
        devices: &[(String, Arc<Image>)],
    ) -> Restored {
        let mut done = Restored::default();
        let mut kept = Vec::new();
        for rec in &records {
            let found = if rec.device {
                devices
                    .iter()
                    .find(|(name, _)| *name == rec.path)
                    .ok_or_else(|| "no --device entry of that name".to_string())
                    .and_then(|(_, img)| {
                        (img.identity == rec.identity)
                            .then(|| img.clone())
                            .ok_or_else(|| "the entry is another device now".to_string())
                    })
            } else {
                self.find_recorded(rec, root)
            };
            let img = match found {
                Ok(img) => img,
                Err(why) => {
                    log::warn!(
                        "state file {}: image {} ({}{}) not restored: {why}; its record is dropped",
                        journal.path().display(),
                        rec.path,
                        if rec.inactive { "inactive" } else { "active" },
                        rec.sticky_error
                            .map(|e| format!(", sticky {}", sys::errno_name(e)))
                            .unwrap_or_default()
                    );
                    done.dropped += 1;
                    continue;
                }
            };
            if rec.inactive {
                img.set_phase(INACTIVE);
                done.inactive += 1;
            }
            if let Some(e) = rec.sticky_error {
                img.state.lock().expect("state lock").sticky_error = Some(e);
                done.sticky += 1;
            }
            img.restored.store(true, Ordering::Relaxed);
            img.state.lock().expect("state lock").last = Some(LastCommand {
                command: rec.set_by.clone(),
                at: UNIX_EPOCH + std::time::Duration::from_secs(rec.at),
                ms: 0,
                result: "restored at start".into(),
            });
            log::info!(
                "image {}: restored {}{} (set by {} at {})",
                rec.path,
                if rec.inactive { "inactive" } else { "active" },
                rec.sticky_error
                    .map(|e| format!(" with sticky error {}", sys::errno_name(e)))
                    .unwrap_or_default(),
                rec.set_by,
                rec.at
            );
            kept.push(rec.clone());
        }
        if let Err(e) = journal.replace(&records, kept) {
            log::warn!(
                "state file {}: cannot drop the records not restored ({e}); the next start drops them again",
                journal.path().display()
            );
        }
        for img in self.images.lock().expect("registry lock").values() {
            let _ = img.journal.set(journal.clone());
        }
        let _ = self.journal.set(journal);
        done
    }

    /// The image of the file a record names, if that file is still the
    /// one recorded.
    fn find_recorded(&self, rec: &Record, root: &Arc<OwnedFd>) -> Result<Arc<Image>, String> {
        let path = sys::cstring(std::ffi::OsStr::new(&rec.path)).map_err(|e| e.to_string())?;
        let fd = sys::openat2_beneath(root.as_fd(), &path, libc::O_PATH | libc::O_NOFOLLOW)
            .map_err(|e| format!("cannot be found at its path ({e})"))?;
        let st = sys::fstat_fd(fd.as_fd()).map_err(|e| e.to_string())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err("its path is no regular file now".into());
        }
        if Identity::of_stat(&st) != rec.identity {
            return Err(format!(
                "another file is at its path now (inode {} on device {}, recorded {} on {}): replaced or renamed",
                st.st_ino, st.st_dev, rec.identity.ino, rec.identity.dev
            ));
        }
        let incarnation = Incarnation::of_fd(fd.as_fd(), st.st_dev);
        if !incarnation.same_file(&rec.incarnation) {
            return Err(
                "a new file got its inode number (another incarnation): the image was deleted"
                    .into(),
            );
        }
        Ok(self.get_or_insert(rec.identity, &incarnation, || {
            Image::new(
                rec.identity,
                Source::File {
                    root: root.clone(),
                    live: Default::default(),
                },
                rec.path.clone(),
            )
            .with_incarnation(incarnation.clone())
        }))
    }

    /// Returns the image for `identity`, creating it with `make` the first
    /// time. `incarnation` is that of the file found now: an image of
    /// another file that had the same (dev, ino) (deleted, on this host or
    /// another, without this mount seeing it) is replaced by a new image,
    /// so a new file never inherits its state (an `inactive` mark, a sticky
    /// error). `make` must build the image with that incarnation.
    pub fn get_or_insert(
        &self,
        identity: Identity,
        incarnation: &Incarnation,
        make: impl FnOnce() -> Image,
    ) -> Arc<Image> {
        let mut images = self.images.lock().expect("registry lock");
        if let Some(img) = images.get(&identity) {
            if img.incarnation.same_file(incarnation) {
                return img.clone();
            }
            log::info!(
                "image {}: its inode number now belongs to another file (the image was deleted); \
                 forgetting its state ({}) and starting the new file as a new image",
                img.path(),
                if img.is_active() {
                    "active"
                } else {
                    "inactive"
                }
            );
        }
        let img = Arc::new(make());
        if let Some(j) = self.journal.get() {
            let _ = img.journal.set(j.clone());
        }
        images.insert(identity, img.clone());
        img
    }

    pub fn get(&self, identity: &Identity) -> Option<Arc<Image>> {
        self.images
            .lock()
            .expect("registry lock")
            .get(identity)
            .cloned()
    }

    pub fn remove(&self, identity: &Identity) {
        self.images.lock().expect("registry lock").remove(identity);
    }

    /// Forgets `image` if it is deleted (no name left on the backing and
    /// no handle open here); returns whether it did.
    pub fn forget_if_deleted(&self, image: &Image) -> bool {
        if image.is_deleted() {
            // Only this image: a new one may have its key already.
            let mut images = self.images.lock().expect("registry lock");
            if images
                .get(&image.identity)
                .is_some_and(|i| std::ptr::eq(Arc::as_ptr(i), image))
            {
                images.remove(&image.identity);
            }
            return true;
        }
        false
    }

    pub fn all(&self) -> Vec<Arc<Image>> {
        let mut v: Vec<Arc<Image>> = self
            .images
            .lock()
            .expect("registry lock")
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|i| i.path());
        v
    }
}
