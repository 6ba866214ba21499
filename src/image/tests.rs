//! The state machine on a real file in a temporary directory, without a
//! mount: fast and deterministic.
use super::*;
use crate::backing::Device;
use crate::cache::WriterScan;
use crate::settings::Key;
use std::io::Write;
use std::os::fd::AsFd;

fn image_in(dir: &tempfile::TempDir, name: &str) -> (Image, File) {
    let path = dir.path().join(name);
    let mut f = File::create(&path).unwrap();
    f.write_all(&[7u8; 8192]).unwrap();
    let root = sys::openat(
        sys::cwd(),
        &sys::cstring(dir.path().as_os_str()).unwrap(),
        libc::O_PATH | libc::O_DIRECTORY,
        0,
    )
    .unwrap();
    let st = sys::fstat_fd(f.as_fd()).unwrap();
    let image = Image::new(
        Identity::of_stat(&st),
        Source::File {
            root: Arc::new(root),
            live: Mutex::default(),
        },
        name.to_string(),
    );
    (image, f)
}

fn ctx(settings: &Settings) -> CommandContext<'_> {
    CommandContext {
        settings,
        invalidate_attrs: &|_| {},
        fuse: None,
        own_mounts: &[],
        writers: Box::leak(Box::new(WriterScan::new())),
    }
}

#[test]
fn inactivate_fences_and_activate_lifts_it() {
    let dir = tempfile::tempdir().unwrap();
    let (image, _f) = image_in(&dir, "vm.img");
    let settings = Settings::default();
    assert!(image.is_active());
    assert!(image.admit_write(&settings).is_ok());
    let o = image.inactivate(&ctx(&settings));
    assert_eq!(o.errno, None, "{}", o.detail);
    assert!(!image.is_active());
    assert_eq!(
        image.admit_write(&settings).err().map(|e| e.errno()),
        Some(libc::EROFS)
    );
    // Idempotent: inactivating an inactive image runs the flush again.
    assert_eq!(image.inactivate(&ctx(&settings)).errno, None);
    settings.set(Key::InactiveWrites, "allow").unwrap();
    assert!(image.admit_write(&settings).is_ok());
    settings.set(Key::InactiveWrites, "deny").unwrap();
    let o = image.activate(&ctx(&settings));
    assert_eq!(o.errno, None, "{}", o.detail);
    assert!(image.is_active());
    assert!(image.admit_write(&settings).is_ok());
}

#[test]
fn inactivate_waits_for_an_admitted_write() {
    let dir = tempfile::tempdir().unwrap();
    let (image, _f) = image_in(&dir, "vm.img");
    let image = Arc::new(image);
    let settings = Arc::new(Settings::default());
    let gate = image.admit_write(&settings).unwrap();
    let (img, st) = (image.clone(), settings.clone());
    let t = std::thread::spawn(move || img.inactivate(&ctx(&st)).errno);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(
        !t.is_finished(),
        "inactivate returned while a write was admitted"
    );
    assert!(!image.is_active(), "the mark comes before the wait");
    drop(gate);
    assert_eq!(t.join().unwrap(), None);
}

#[test]
fn invalidate_drops_this_hosts_clean_pages_and_check_reports() {
    let dir = tempfile::tempdir().unwrap();
    let (image, f) = image_in(&dir, "vm.img");
    f.sync_all().unwrap();
    let settings = Settings::default();
    let o = image.invalidate(&ctx(&settings));
    assert_eq!(o.errno, None, "{}", o.detail);
    assert_eq!(sys::cachestat(f.as_fd()).unwrap().cached, 0);
    assert_eq!(image.check(&ctx(&settings)).errno, None);
}

#[test]
fn invalidate_refuses_dirty_pages_and_drops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (image, f) = image_in(&dir, "vm.img");
    let before = sys::cachestat(f.as_fd()).unwrap();
    assert!(before.dirty > 0, "test needs dirty pages");
    let o = image.invalidate(&ctx(&Settings::default()));
    assert_eq!(o.errno, Some(libc::EBUSY), "{}", o.detail);
    assert!(sys::cachestat(f.as_fd()).unwrap().cached >= before.dirty);
}

#[test]
fn a_device_image_cannot_grow_past_its_device() {
    let stat = sys::fstat_fd(sys::cwd()).unwrap();
    let dev = Device::new("lun".into(), "/nonexistent".into(), stat, 4096);
    let image = Image::new(
        Identity { dev: 1, ino: 2 },
        Source::Device(Arc::new(dev)),
        "lun".into(),
    );
    assert_eq!(image.write_room(0, 8192).map_err(|e| e.errno()), Ok(4096));
    assert_eq!(
        image.write_room(4096, 1).map_err(|e| e.errno()),
        Err(libc::ENOSPC)
    );
    assert_eq!(
        image.grow_allowed(4097).map_err(|e| e.errno()),
        Err(libc::ENOSPC)
    );
}
