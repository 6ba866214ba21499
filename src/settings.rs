//! Runtime settings of a mount: start values come from the command line
//! (or `-o KEY=WORD`), control files change them until unmount. Each is an atomic so the data
//! path reads them without a lock.

use std::sync::atomic::{AtomicU8, Ordering};

/// A runtime setting: one control file each (docs/DESIGN.md §3,
/// "Settings").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    CheckCacheDropped,
    DropCache,
    FsyncOnClose,
    InvalidateOnOpen,
    Sync,
    InactiveWrites,
}

impl Key {
    pub const ALL: [Key; 6] = [
        Key::CheckCacheDropped,
        Key::DropCache,
        Key::FsyncOnClose,
        Key::InvalidateOnOpen,
        Key::Sync,
        Key::InactiveWrites,
    ];

    /// The control file / command-line name.
    pub const fn name(self) -> &'static str {
        match self {
            Key::CheckCacheDropped => "check-cache-dropped",
            Key::DropCache => "drop-cache",
            Key::FsyncOnClose => "fsync-on-close",
            Key::InvalidateOnOpen => "invalidate-on-open",
            Key::Sync => "sync",
            Key::InactiveWrites => "inactive-writes",
        }
    }

    /// The setting's allowed words, in the order of their stored index;
    /// the first is the default.
    pub fn words(self) -> &'static [&'static str] {
        match self {
            Key::CheckCacheDropped | Key::DropCache | Key::FsyncOnClose => &["on", "off"],
            Key::InvalidateOnOpen => &["on", "warn", "off"],
            Key::Sync => &["fsync", "fdatasync"],
            // strict: also refuse writable opens of an inactive image, for
            // flows where no VMM opens it read-write before activation.
            Key::InactiveWrites => &["deny", "allow", "strict"],
        }
    }

    pub fn from_name(name: &str) -> Option<Key> {
        Key::ALL.into_iter().find(|k| k.name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What `invalidate-on-open` does on the first open of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnOpen {
    Invalidate,
    Warn,
    Off,
}

#[derive(Debug)]
pub struct Settings {
    values: [AtomicU8; 6],
}

impl Default for Settings {
    /// Every setting at its first word (docs/DESIGN.md §3, "Settings"):
    /// every safety step on.
    fn default() -> Self {
        Settings {
            values: Default::default(),
        }
    }
}

impl Settings {
    /// Sets `key` to `word`; `Err` lists the allowed words.
    pub fn set(&self, key: Key, word: &str) -> Result<(), String> {
        match key.words().iter().position(|w| *w == word) {
            Some(i) => {
                self.values[key.index()].store(i as u8, Ordering::Relaxed);
                Ok(())
            }
            None => Err(format!(
                "invalid value {word:?} for {}: expected one of {}",
                key.name(),
                key.words().join(", ")
            )),
        }
    }

    pub fn get(&self, key: Key) -> &'static str {
        key.words()[self.values[key.index()].load(Ordering::Relaxed) as usize]
    }

    fn is_first(&self, key: Key) -> bool {
        self.values[key.index()].load(Ordering::Relaxed) == 0
    }

    pub fn check_cache_dropped(&self) -> bool {
        self.is_first(Key::CheckCacheDropped)
    }

    pub fn drop_cache(&self) -> bool {
        self.is_first(Key::DropCache)
    }

    pub fn fsync_on_close(&self) -> bool {
        self.is_first(Key::FsyncOnClose)
    }

    /// `sync=fsync`: every sync is a full fsync (NFS also commits size/mtime).
    pub fn full_fsync(&self) -> bool {
        self.is_first(Key::Sync)
    }

    pub fn deny_inactive_writes(&self) -> bool {
        self.get(Key::InactiveWrites) != "allow"
    }

    /// `inactive-writes=strict`: a writable open of an inactive image gets
    /// EROFS (passthrough writes through it could not be fenced).
    pub fn refuse_inactive_opens(&self) -> bool {
        self.get(Key::InactiveWrites) == "strict"
    }

    pub fn on_open(&self) -> OnOpen {
        match self.get(Key::InvalidateOnOpen) {
            "on" => OnOpen::Invalidate,
            "warn" => OnOpen::Warn,
            _ => OnOpen::Off,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let map: serde_json::Map<String, serde_json::Value> = Key::ALL
            .into_iter()
            .map(|k| (k.name().to_string(), self.get(k).into()))
            .collect();
        serde_json::Value::Object(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_safe_words() {
        let s = Settings::default();
        assert_eq!(s.get(Key::CheckCacheDropped), "on");
        assert_eq!(s.get(Key::InvalidateOnOpen), "on");
        assert_eq!(s.get(Key::Sync), "fsync");
        assert_eq!(s.get(Key::InactiveWrites), "deny");
    }

    #[test]
    fn set_rejects_unknown_words_and_keeps_value() {
        let s = Settings::default();
        assert!(s.set(Key::InvalidateOnOpen, "maybe").is_err());
        assert_eq!(s.get(Key::InvalidateOnOpen), "on");
        s.set(Key::InvalidateOnOpen, "warn").unwrap();
        assert_eq!(s.on_open(), OnOpen::Warn);
    }
}
