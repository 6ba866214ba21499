//! Running control commands on images and formatting their results.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde_json::json;

use super::ControlPlane;
use super::arrivals::{Arrival, RESOLVE_BOUND};
use super::request::{self, Target};
use super::scope::CommandScope;
use super::workers::CommandLane;
use crate::cache::{Identity, Incarnation};
use crate::image::turns::Ticket;
use crate::image::{CommandContext, Image, Outcome, Source};
use crate::protocol::{self, key};
use crate::sys;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Activate,
    Inactivate,
    Invalidate,
    Flush,
    Check,
}

impl Command {
    pub fn name(self) -> &'static str {
        match self {
            Command::Activate => protocol::ACTIVATE,
            Command::Inactivate => protocol::INACTIVATE,
            Command::Invalidate => protocol::INVALIDATE,
            Command::Flush => protocol::FLUSH,
            Command::Check => protocol::CHECK,
        }
    }
}

/// A command request detached from the request handler, holding the
/// mount's record so it can run on a worker thread.
pub struct Job {
    command: Command,
    data: Vec<u8>,
    plane: Arc<ControlPlane>,
    lane: CommandLane,
}

impl Job {
    pub fn new(plane: &Arc<ControlPlane>, command: Command, data: &[u8]) -> Job {
        Job {
            command,
            data: data.to_vec(),
            plane: plane.clone(),
            lane: plane.workers.command_lane(),
        }
    }

    /// Runs the command on every target, then hands `done` the errno of the
    /// first failure (what write() fails with) and the read-back text.
    /// `arrival` is the request's place in arrival order: once its targets
    /// are resolved and every earlier request has queued on its images (or
    /// has been resolving for longer than [`RESOLVE_BOUND`]), it queues on
    /// its own, so commands on one image run one at a time, in arrival
    /// order. Every request queues on all its images at once, no two at the
    /// same time, and holds one image's turn at a time, so two requests
    /// naming the same images in different orders (or `*`) cannot
    /// deadlock. While it waits for an image's turn it holds no thread: it
    /// parks on the image's ticket and the command lane resumes it.
    pub fn run(self, arrival: Arrival, done: impl FnOnce(Option<i32>, String) + Send + 'static) {
        let start = Instant::now();
        let targets = match request::parse(&self.data, &self.plane.config.ctl_name) {
            Ok(t) => t,
            Err(bad) => {
                drop(arrival);
                log::warn!("{}: rejected request: {}", self.command.name(), bad.message);
                return done(
                    Some(bad.errno),
                    protocol::format_line(&[
                        (key::RESULT, protocol::RESULT_ERROR.as_bytes()),
                        (key::ERRNO, sys::errno_name(bad.errno).as_bytes()),
                        (key::DETAIL, bad.message.as_bytes()),
                    ]),
                );
            }
        };
        // One /proc pass at most for all images of this command, none for
        // an image whose last answer still holds.
        let scope = CommandScope::of_worker(&self.plane);
        arrival.resolving();
        let resolved: Vec<_> = targets.iter().flat_map(|t| self.resolve(t)).collect();
        let number = arrival.number();
        let (queued, passed) = arrival.queue(RESOLVE_BOUND, || {
            resolved
                .into_iter()
                .map(|r| r.map(|image| (image.commands.take(), image)))
                .collect()
        });
        if !passed.is_empty() {
            let passed: Vec<String> = passed.iter().map(|n| format!("#{}", n + 1)).collect();
            log::warn!(
                "{} request #{} passes request {} still resolving its paths after {} ms \
                 (slow or hung backing?): those queue behind it",
                self.command.name(),
                number + 1,
                passed.join(", "),
                RESOLVE_BOUND.as_millis()
            );
        }
        Progress {
            job: self,
            targets: targets.len(),
            start,
            queued,
            scope,
            results: Vec::new(),
            done: Box::new(done),
        }
        .next();
    }

    fn apply(&self, image: &Image, ctx: &CommandContext<'_>) -> Outcome {
        match self.command {
            Command::Activate => image.activate(ctx),
            Command::Inactivate => image.inactivate(ctx),
            Command::Invalidate => image.invalidate(ctx),
            Command::Flush => image.flush(ctx),
            Command::Check => image.check(ctx),
        }
    }

    fn resolve(&self, target: &Target) -> Vec<Result<Arc<Image>, (String, Outcome)>> {
        match target {
            // Every image this mount has seen is reported, also one that can
            // no longer be found by its last path (renamed or deleted on
            // another host), with its error: `*` never skips an image
            // silently. Images known to be deleted are forgotten.
            Target::All => self
                .plane
                .registry
                .all()
                .into_iter()
                .filter(|img| !self.plane.registry.forget_if_deleted(img))
                .map(|img| match img.locate() {
                    Ok(()) => Ok(img),
                    Err(outcome) => Err((img.path(), outcome)),
                })
                .collect(),
            Target::Path(path) => vec![self.resolve_path(path).map_err(|o| (path.clone(), o))],
        }
    }

    /// Resolves a path beneath the backing root with `openat2(RESOLVE_BENEATH)`:
    /// `..`, absolute symlinks and symlinks leading outside fail in the kernel.
    fn resolve_path(&self, path: &str) -> Result<Arc<Image>, Outcome> {
        if let Some((_, img)) = self.plane.devices.iter().find(|(n, _)| n == path) {
            return Ok(img.clone());
        }
        let fail = |errno: i32, detail: String| Outcome {
            errno: Some(errno),
            detail,
            ..Outcome::default()
        };
        let cpath = sys::cstring(std::ffi::OsStr::new(path))
            .map_err(|_| fail(libc::EINVAL, "bad path".into()))?;
        let fd = sys::openat2_beneath(self.plane.root_fd.as_fd(), &cpath, libc::O_PATH).map_err(
            |e| match sys::errno_of(&e) {
                libc::EXDEV | libc::ELOOP => {
                    fail(libc::EINVAL, "path leads outside the mount".into())
                }
                libc::ENOENT => fail(
                    libc::ENOENT,
                    "no such image; paths are relative to the mount root".into(),
                ),
                errno => fail(errno, format!("cannot resolve: {e}")),
            },
        )?;
        let st = sys::fstat_fd(fd.as_fd()).map_err(|e| fail(sys::errno_of(&e), e.to_string()))?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => {}
            libc::S_IFDIR => return Err(fail(libc::EINVAL, "is a directory, not an image".into())),
            _ => return Err(fail(libc::EINVAL, "not a regular file".into())),
        }
        let identity = Identity::of_stat(&st);
        let incarnation = Incarnation::of_fd(fd.as_fd(), st.st_dev);
        // The request's name is the image's current name: it refreshes a path
        // that went stale (a directory renamed on the backing), unless it
        // reached the image through a symlink, which must not rename it.
        let through_symlink = sys::openat2_beneath(
            self.plane.root_fd.as_fd(),
            &cpath,
            libc::O_PATH | libc::O_NOFOLLOW,
        )
        .and_then(|f| sys::fstat_fd(f.as_fd()))
        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
        .unwrap_or(true);
        // An image first named through a symlink is named by its own path
        // (the link's target beneath the root): the alias leads to it only
        // while it stays a symlink, and later steps open the image by its
        // name without following one.
        let name = if through_symlink && self.plane.registry.get(&identity).is_none() {
            self.own_path(fd.as_fd(), identity).ok_or_else(|| {
                fail(
                    libc::EINVAL,
                    "reached through a symlink whose target has no name beneath the mount \
                     that leads to it; name the image by its own path"
                        .into(),
                )
            })?
        } else {
            path.to_string()
        };
        let image = self
            .plane
            .registry
            .get_or_insert(identity, &incarnation, || {
                Image::new(
                    identity,
                    Source::File {
                        root: self.plane.root_fd.clone(),
                        live: Default::default(),
                    },
                    name,
                )
                .with_incarnation(incarnation.clone())
            });
        if !through_symlink {
            image.set_path(path.to_string());
        }
        Ok(image)
    }

    /// The path beneath the backing root of the file open as `fd`, if it
    /// leads to that very file without following a symlink.
    fn own_path(&self, fd: std::os::fd::BorrowedFd<'_>, identity: Identity) -> Option<String> {
        let path = sys::path_beneath(self.plane.root_fd.as_fd(), fd)?;
        let cpath = sys::cstring(std::ffi::OsStr::new(&path)).ok()?;
        let own = sys::openat2_beneath(
            self.plane.root_fd.as_fd(),
            &cpath,
            libc::O_PATH | libc::O_NOFOLLOW,
        )
        .and_then(|f| sys::fstat_fd(f.as_fd()))
        .ok()?;
        (Identity::of_stat(&own) == identity).then_some(path)
    }
}

/// A queued request working through its images in request order.
struct Progress {
    job: Job,
    targets: usize,
    start: Instant,
    /// Its images not yet run, each with its ticket (or the error that
    /// resolving it gave).
    queued: VecDeque<Queued>,
    /// What its images' commands work with besides the image.
    scope: CommandScope,
    /// Each target's outcome, in request order, reported only once all
    /// are settled (`finish`).
    results: Vec<Ran>,
    done: Box<dyn FnOnce(Option<i32>, String) + Send>,
}

/// One target's outcome: the image's name, what the command gave, how
/// long it took, and the image when it ran (to settle a staged record).
struct Ran {
    name: String,
    outcome: Outcome,
    ms: u128,
    image: Option<Arc<Image>>,
}

type Queued = Result<(Ticket, Arc<Image>), (String, Outcome)>;

impl Progress {
    /// Runs the images whose turn has come, in order; at the first whose
    /// turn has not, parks there (giving its thread back) and goes on when
    /// the turn comes, on a command thread again.
    fn next(mut self) {
        while let Some(entry) = self.queued.pop_front() {
            match entry {
                Err((name, outcome)) => self.results.push(Ran {
                    name,
                    outcome,
                    ms: 0,
                    image: None,
                }),
                Ok((turn, image)) if turn.is_turn() => self.apply(turn, image),
                Ok((turn, image)) => {
                    let parked = self.job.lane.park();
                    turn.when_turn(move |turn| {
                        parked.resume(move || {
                            self.apply(turn, image);
                            self.next();
                        })
                    });
                    return;
                }
            }
        }
        self.finish();
    }

    /// Runs the command on `image`, whose turn `turn` holds. A record it
    /// staged in the state file is written with the others at `finish`.
    fn apply(&mut self, turn: Ticket, image: Arc<Image>) {
        let fuse = self.scope.mount_cache();
        let t0 = Instant::now();
        let outcome = self.job.apply(&image, &self.scope.context(Some(&fuse)));
        drop(turn);
        // Its file of the mount is closed after the turn, as before the
        // next image's open.
        drop(fuse);
        let ms = t0.elapsed().as_millis();
        // Named after the command: it may have found the image under a new
        // name (renamed on the backing).
        self.results.push(Ran {
            name: image.path(),
            outcome,
            ms,
            image: Some(image),
        });
    }

    /// Settles every outcome (the first staged record's commit writes the
    /// state file once for all images of the command; an image whose
    /// record could not be written fails here), then reports them all.
    /// No result is reported before: `inactivate` says ok for no image
    /// whose fence is not durable.
    fn finish(self) {
        let mut first_errno = None;
        let mut text = String::new();
        for ran in self.results {
            let outcome = match &ran.image {
                Some(image) => image.settle(ran.outcome),
                None => ran.outcome,
            };
            first_errno = first_errno.or(outcome.errno);
            text.push_str(&result_line(&ran.name, &outcome, ran.ms));
        }
        let name = self.job.command.name();
        let ms = self.start.elapsed().as_millis();
        match first_errno {
            None => log::info!("{name} ({} targets): ok in {ms} ms", self.targets),
            // The failing images' result lines name each image and errno.
            Some(e) => log::warn!(
                "{name} ({} targets): {} in {ms} ms: {}",
                self.targets,
                sys::errno_name(e),
                text.lines()
                    .filter(|l| l.contains(" result=error "))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }
        (self.done)(first_errno, text)
    }
}

/// One read-back line: `image=disk.img result=ok resident_pages=0 ms=3`,
/// in the protocol's quoting (see `crate::protocol`), so no file name can
/// break the line or forge a field. A name holding U+FFFD may be the lossy
/// form of bytes that are not UTF-8: it is flagged so that two such names
/// are not taken for one exact name.
fn result_line(name: &str, o: &Outcome, ms: u128) -> String {
    let pages = o.resident_pages.to_string();
    let ms = ms.to_string();
    let errno = o.errno.map(sys::errno_name);
    let mut fields: Vec<(&str, &[u8])> = vec![(key::IMAGE, name.as_bytes())];
    if name.contains(char::REPLACEMENT_CHARACTER) {
        fields.push((key::IMAGE_LOSSY, b"yes"));
    }
    match &errno {
        None => fields.push((key::RESULT, protocol::RESULT_OK.as_bytes())),
        Some(e) => {
            fields.push((key::RESULT, protocol::RESULT_ERROR.as_bytes()));
            fields.push((key::ERRNO, e.as_bytes()));
        }
    }
    fields.push((key::RESIDENT_PAGES, pages.as_bytes()));
    fields.push((key::MS, ms.as_bytes()));
    if errno.is_none() && o.unfenced {
        // ok, but writers the daemon cannot fence are named in detail.
        fields.push((key::FENCING, protocol::FENCING_PARTIAL.as_bytes()));
    }
    if errno.is_some() || o.unfenced {
        fields.push((key::DETAIL, o.detail.as_bytes()));
    }
    protocol::format_line(&fields)
}

/// The `status` document. Runs on a worker thread: it measures the FUSE
/// inode's cache through a file of this mount.
pub fn status_json(plane: &Arc<ControlPlane>) -> serde_json::Value {
    // One /proc pass at most for the whole document.
    let scope = CommandScope::of_worker(plane);
    let fuse = scope.mount_cache();
    let ctx = scope.context(Some(&fuse));
    let images: Vec<serde_json::Value> = plane
        .registry
        .all()
        .iter()
        .filter(|img| !plane.registry.forget_if_deleted(img))
        .map(|img| {
            if let Some(dev) = img.device() {
                return img.status_json(Some(dev.size()), None, &ctx);
            }
            match img.open_backing(libc::O_RDONLY) {
                Ok(f) => img.status_json(crate::cache::file_size(&f).ok(), None, &ctx),
                Err(e) => img.status_json(None, Some(e), &ctx),
            }
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        // The serving process, and the keeper that holds the connection
        // and restarts it (null with --no-restart): `migsafe upgrade`
        // signals the keeper.
        "daemon": {
            "pid": std::process::id(),
            "keeper": sys::keeper_pid(),
        },
        "passthrough_supported": plane.passthrough_supported.load(Ordering::Relaxed),
        "data_paths": {
            "passthrough_active": plane.passthrough_active.load(Ordering::Relaxed),
            "io": plane.config.io.name(),
            "devices": plane.config.device_io.name(),
            "writeback": plane.writeback_active.load(Ordering::Relaxed),
        },
        "ctl_name": plane.config.ctl_name,
        "state_file": plane.registry.state_file(),
        "settings": plane.settings.to_json(),
        "images": images,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(errno: Option<i32>, detail: &str) -> Outcome {
        Outcome {
            errno,
            resident_pages: 2,
            detail: detail.into(),
            ..Outcome::default()
        }
    }

    #[test]
    fn result_lines_keep_the_documented_form() {
        assert_eq!(
            result_line("disk.img", &outcome(None, ""), 3),
            "image=disk.img result=ok resident_pages=2 ms=3\n"
        );
        assert_eq!(
            result_line(
                "d/x.img",
                &outcome(Some(libc::EBUSY), "2 pages \"left\""),
                1
            ),
            "image=d/x.img result=error errno=EBUSY resident_pages=2 ms=1 detail=\"2 pages \\\"left\\\"\"\n"
        );
    }

    #[test]
    fn hostile_names_stay_one_line() {
        let name = "zz\nimage=vm1.img result=ok";
        let line = result_line(name, &outcome(Some(libc::ENOENT), "a\nb"), 0);
        assert_eq!(line.matches('\n').count(), 1, "{line:?}");
        let f = protocol::parse_line(line.trim_end()).unwrap();
        assert_eq!(f.get_str(key::IMAGE), Some(name));
        assert_eq!(f.get_str(key::RESULT), Some("error"));
        assert_eq!(f.get_str(key::DETAIL), Some("a\nb"));
        assert_eq!(f.get(key::IMAGE_LOSSY), None);
        let lossy = result_line("raw\u{fffd}.img", &outcome(None, ""), 0);
        let f = protocol::parse_line(lossy.trim_end()).unwrap();
        assert_eq!(f.get_str(key::IMAGE_LOSSY), Some("yes"), "{lossy:?}");
    }
}
