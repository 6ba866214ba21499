//! The state file: the handover facts a restarted daemon must not forget
//! (docs/DESIGN.md §3, "Durability"): which images are inactive and which
//! carry a sticky sync error. Without it every image of a remounted daemon
//! starts `active`, and a source whose daemon died after `inactivate` would
//! let a VMM (reopened, or a stray process) write storage the destination
//! owns. Only images that are inactive or failed have a record; an active,
//! healthy image is what a fresh daemon assumes anyway.
//!
//! The whole file is rewritten atomically: a temporary file in the same
//! directory, fsync, rename over the old one, fsync of the directory. A
//! crash leaves either the old or the new file, never a torn one. A change
//! is staged first (`stage`) and made durable by `commit`; one rewrite
//! carries every change staged before it, so a command over many images
//! (`inactivate *`) commits once for all of them, and commands running at
//! the same time share a rewrite instead of queueing one each. A file that
//! cannot be read or parsed refuses the mount: starting with every image
//! active would drop fences silently.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::cache::{Identity, Incarnation};
use crate::sys;

/// The format written; a file of another version is refused.
const VERSION: u64 = 1;

/// What the state file keeps of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Path beneath the backing root, or the `--device` name.
    pub path: String,
    pub device: bool,
    pub identity: Identity,
    /// Which file of that (dev, ino) it is: a new file that got a deleted
    /// image's inode number is never taken for it.
    pub incarnation: Incarnation,
    pub inactive: bool,
    pub sticky_error: Option<i32>,
    /// The command (or `sync` for a failed sync) that last changed the
    /// record, and when (seconds since the epoch).
    pub set_by: String,
    pub at: u64,
}

impl Record {
    pub fn new(path: String, device: bool, identity: Identity, incarnation: Incarnation) -> Record {
        Record {
            path,
            device,
            identity,
            incarnation,
            inactive: false,
            sticky_error: None,
            set_by: String::new(),
            at: 0,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "path": self.path,
            "kind": if self.device { "device" } else { "file" },
            "dev": self.identity.dev,
            "ino": self.identity.ino,
            "incarnation": self.incarnation.to_json(),
            "phase": if self.inactive { "inactive" } else { "active" },
            "sticky_error": self.sticky_error.map(sys::errno_name),
            "sticky_errno": self.sticky_error,
            "set_by": self.set_by,
            "at": self.at,
        })
    }

    fn from_json(v: &Value) -> Option<Record> {
        let device = match v.get("kind")?.as_str()? {
            "file" => false,
            "device" => true,
            _ => return None,
        };
        let inactive = match v.get("phase")?.as_str()? {
            "inactive" => true,
            "active" => false,
            _ => return None,
        };
        let sticky_error = match v.get("sticky_errno")? {
            Value::Null => None,
            n => Some(i32::try_from(n.as_i64()?).ok()?),
        };
        Some(Record {
            path: v.get("path")?.as_str()?.to_string(),
            device,
            identity: Identity {
                dev: v.get("dev")?.as_u64()?,
                ino: v.get("ino")?.as_u64()?,
            },
            incarnation: Incarnation::from_json(v.get("incarnation")?)?,
            inactive,
            sticky_error,
            set_by: v.get("set_by")?.as_str()?.to_string(),
            at: v.get("at")?.as_u64()?,
        })
    }
}

/// Seconds since the epoch, for `Record::at`.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Each record with its JSON text, kept so that a rewrite of the whole file
/// serializes only the record that changed: with every record serialized
/// anew, `inactivate *` of 1000 images took 11 s, with this 1.3 to 2.3 s
/// (0.6 to 0.8 s without a state file; debug build, a shared machine).
type Entries = BTreeMap<(u64, u64), (Record, String)>;

fn entry(r: Record) -> (Record, String) {
    let text = r.to_json().to_string();
    (r, text)
}

/// One mount's state file: the records the registry holds now, and how
/// many of their changes the file on disk holds.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    /// Every record as the registry says now, with the number of changes
    /// staged so far; changes not yet committed among them.
    staged: Mutex<Staged>,
    /// Held while the file is rewritten (rewrites never interleave, and a
    /// later snapshot is never renamed over by an earlier one): the number
    /// of staged changes the file on disk holds.
    written: Mutex<u64>,
}

#[derive(Debug, Default)]
struct Staged {
    entries: Entries,
    /// Changes staged since start: the generation a commit must reach.
    generation: u64,
    /// The generation of each record's last change (removals too): the
    /// record is on disk once a commit reached it.
    changed_at: HashMap<(u64, u64), u64>,
}

impl StateFile {
    /// Opens the state file at `path` (absent: no records yet; its
    /// directory is created, mode 0700) and returns the records it holds.
    /// The error names the file and the next step: a file that is not a
    /// regular file, not owned by the daemon's user, readable or writable
    /// by others, or not a state file is never taken as "no records".
    pub fn load(path: &Path) -> Result<(StateFile, Vec<Record>), String> {
        let refuse = |why: String| {
            Err(format!(
                "state file {}: {why}; inspect it, then remove it (every image then starts active) \
                 or fix it, or mount with --state-file none",
                path.display()
            ))
        };
        let dir = parent_of(path);
        if let Err(e) = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
        {
            return Err(format!(
                "state file {}: cannot create its directory {}: {e}; create it or choose another --state-file",
                path.display(),
                dir.display()
            ));
        }
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok((StateFile::with(path, BTreeMap::new()), Vec::new()));
            }
            Err(e) => return refuse(format!("cannot read: {e}")),
        };
        if !meta.file_type().is_file() {
            return refuse("not a regular file".into());
        }
        let euid = nix::unistd::geteuid().as_raw();
        if meta.uid() != euid {
            return refuse(format!(
                "owned by uid {}, not by the daemon's user (uid {euid})",
                meta.uid()
            ));
        }
        if meta.mode() & 0o7177 != 0 {
            return refuse(format!(
                "mode {:04o} is wider than 0600 (another user may have changed it)",
                meta.mode() & 0o7777
            ));
        }
        let mut text = String::new();
        if let Err(e) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .and_then(|mut f| f.read_to_string(&mut text))
        {
            return refuse(format!("cannot read: {e}"));
        }
        let records = match parse(&text) {
            Ok(r) => r,
            Err(why) => return refuse(why),
        };
        Ok((StateFile::with(path, BTreeMap::new()), records))
    }

    fn with(path: &Path, records: Entries) -> StateFile {
        StateFile {
            path: path.to_path_buf(),
            staged: Mutex::new(Staged {
                entries: records,
                ..Staged::default()
            }),
            written: Mutex::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces every record (what a restart kept of the loaded file);
    /// the file is rewritten only when that differs from what it held.
    pub fn replace(&self, loaded: &[Record], kept: Vec<Record>) -> io::Result<()> {
        let generation = {
            let mut staged = self.staged.lock().unwrap_or_else(|p| p.into_inner());
            let new: Entries = kept
                .into_iter()
                .map(|r| ((r.identity.dev, r.identity.ino), entry(r)))
                .collect();
            if new.len() != loaded.len() {
                staged.generation += 1;
            }
            staged.entries = new;
            staged.generation
        };
        self.commit(generation)
    }

    /// Changes the record of `identity` (None: none) to what `f` makes of
    /// it, durably: Ok once the file on disk says so. Nothing is written
    /// when the record stays as it was and is on disk. (The images stage
    /// and commit separately; the unit tests use the two in one.)
    #[cfg(test)]
    pub fn update(
        &self,
        identity: Identity,
        f: impl FnOnce(Option<Record>) -> Option<Record>,
    ) -> io::Result<()> {
        let generation = self.stage(identity, f);
        self.commit(generation)
    }

    /// Changes the record of `identity` (None: none) to what `f` makes of
    /// it, in memory only; returns the generation that `commit` must reach
    /// for the file on disk to say so. A record left as it was returns the
    /// generation of its last change: it may be one that a failed commit
    /// left pending, which only a commit makes durable.
    pub fn stage(
        &self,
        identity: Identity,
        f: impl FnOnce(Option<Record>) -> Option<Record>,
    ) -> u64 {
        let key = (identity.dev, identity.ino);
        let mut staged = self.staged.lock().unwrap_or_else(|p| p.into_inner());
        let old = staged.entries.get(&key).map(|(r, _)| r.clone());
        let new = f(old.clone());
        if new == old {
            return staged.changed_at.get(&key).copied().unwrap_or(0);
        }
        match new {
            Some(r) => staged.entries.insert(key, entry(r)),
            None => staged.entries.remove(&key),
        };
        staged.generation += 1;
        let generation = staged.generation;
        staged.changed_at.insert(key, generation);
        generation
    }

    /// Makes every change staged up to `generation` durable: Ok at once if
    /// a rewrite already did, else one rewrite of the whole file with
    /// every change staged so far (also those of other commands, which
    /// then find theirs written). A failed rewrite leaves the changes
    /// staged: the next commit writes them (they are what the registry
    /// says), and each caller whose changes it did not write gets the
    /// error.
    pub fn commit(&self, generation: u64) -> io::Result<()> {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        if *written >= generation {
            return Ok(());
        }
        let (text, snapshot) = {
            let staged = self.staged.lock().unwrap_or_else(|p| p.into_inner());
            (render(&staged.entries), staged.generation)
        };
        self.write(text)?;
        *written = snapshot;
        Ok(())
    }

    /// Writes `text` as the whole file: temporary file, fsync, rename,
    /// fsync of the directory (the rename is durable only then).
    fn write(&self, text: Vec<u8>) -> io::Result<()> {
        let dir = parent_of(&self.path);
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            // Exactly 0600, whatever the daemon's umask was.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        File::open(dir)?.sync_all()
    }
}

/// The file's text for `records`: one image per line, for an operator
/// reading it.
fn render(records: &Entries) -> Vec<u8> {
    let written_by = json!(format!(
        "migsafe {} (pid {})",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    ));
    let mut text =
        format!("{{\n  \"version\": {VERSION},\n  \"written_by\": {written_by},\n  \"images\": [");
    for (i, (_, json)) in records.values().enumerate() {
        text.push_str(if i == 0 { "\n    " } else { ",\n    " });
        text.push_str(json);
    }
    text.push_str(if records.is_empty() {
        "]\n}\n"
    } else {
        "\n  ]\n}\n"
    });
    text.into_bytes()
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn parse(text: &str) -> Result<Vec<Record>, String> {
    let doc: Value =
        serde_json::from_str(text).map_err(|e| format!("not a migsafe state file: {e}"))?;
    match doc.get("version").and_then(Value::as_u64) {
        Some(VERSION) => {}
        Some(v) => return Err(format!("version {v}, this migsafe reads version {VERSION}")),
        None => return Err("not a migsafe state file: no version".into()),
    }
    let images = doc
        .get("images")
        .and_then(Value::as_array)
        .ok_or("not a migsafe state file: no images list")?;
    images
        .iter()
        .enumerate()
        .map(|(i, v)| Record::from_json(v).ok_or(format!("record {i} is malformed: {v}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ino: u64) -> Record {
        let mut r = Record::new(
            format!("d/vm{ino}.img"),
            false,
            Identity { dev: 9, ino },
            Incarnation::default(),
        );
        r.inactive = true;
        r.sticky_error = Some(libc::EIO);
        r.set_by = "inactivate".into();
        r.at = 1234;
        r
    }

    #[test]
    fn records_survive_a_reload_and_the_file_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        let (sf, loaded) = StateFile::load(&path).unwrap();
        assert!(loaded.is_empty());
        sf.update(Identity { dev: 9, ino: 1 }, |_| Some(record(1)))
            .unwrap();
        sf.update(Identity { dev: 9, ino: 2 }, |_| Some(record(2)))
            .unwrap();
        sf.update(Identity { dev: 9, ino: 2 }, |_| None).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let (_, loaded) = StateFile::load(&path).unwrap();
        assert_eq!(loaded, vec![record(1)]);
        assert!(
            std::fs::read_to_string(&path).unwrap().contains("\"EIO\""),
            "the errno name is written"
        );
    }

    #[test]
    fn a_failed_write_leaves_the_change_for_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("gone");
        let path = sub.join("state.json");
        let sf = StateFile::with(&path, Entries::new());
        assert!(
            sf.update(Identity { dev: 9, ino: 1 }, |_| Some(record(1)))
                .is_err()
        );
        // The record stays staged (the registry says so) and nothing says
        // it was written: the same commit, once it can, writes it.
        let generation = sf.stage(Identity { dev: 9, ino: 1 }, |r| r);
        std::fs::create_dir(&sub).unwrap();
        sf.commit(generation).unwrap();
        let (_, loaded) = StateFile::load(&path).unwrap();
        assert_eq!(loaded, vec![record(1)]);
    }

    /// Changes staged by several callers are written by the first commit
    /// that covers them; a later commit of an earlier generation writes
    /// nothing (the file keeps its inode: every rewrite renames a new one
    /// over it).
    #[test]
    fn one_commit_writes_every_staged_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (sf, _) = StateFile::load(&path).unwrap();
        let g1 = sf.stage(Identity { dev: 9, ino: 1 }, |_| Some(record(1)));
        let g2 = sf.stage(Identity { dev: 9, ino: 2 }, |_| Some(record(2)));
        assert!(!path.exists(), "staging writes nothing");
        sf.commit(g2).unwrap();
        let ino = std::fs::metadata(&path).unwrap().ino();
        sf.commit(g1).unwrap();
        sf.commit(g2).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino, "no rewrite");
        let (_, loaded) = StateFile::load(&path).unwrap();
        assert_eq!(loaded, vec![record(1), record(2)]);
        // An unchanged record with nothing pending: no rewrite either.
        let g = sf.stage(Identity { dev: 9, ino: 1 }, |r| r);
        sf.commit(g).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino);
        // Control: a change does rewrite it.
        let g = sf.stage(Identity { dev: 9, ino: 1 }, |_| None);
        sf.commit(g).unwrap();
        assert_ne!(std::fs::metadata(&path).unwrap().ino(), ino);
    }

    #[test]
    fn a_corrupt_or_open_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "{\"version\": 1, \"images\": [{\"path\": 3}]}").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = StateFile::load(&path).unwrap_err();
        assert!(e.contains(&path.display().to_string()), "{e}");
        std::fs::write(&path, "{\"version\": 1, \"images\": []}").unwrap();
        assert!(StateFile::load(&path).is_ok());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = StateFile::load(&path).unwrap_err();
        assert!(e.contains("wider than 0600"), "{e}");
    }
}
