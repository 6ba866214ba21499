//! A command's change of its image's state-file record (docs/DESIGN.md §3,
//! "Durability"): staged, so that a request over many images writes the
//! file once for all of them. The staged record is carried by the image's
//! `Outcome` until `Image::settle` commits it; only then does the outcome
//! stand, so `inactivate` never says ok for an image whose fence is not
//! durable.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::state_file::{Record, StateFile};
use super::{Image, Outcome};

/// Which command's record, for what it does once the record is written
/// (or cannot be).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    /// `inactivate`: the image is inactive.
    Fence,
    /// `activate`: the image is active and healthy, no record.
    Lift,
}

impl Change {
    fn command(self) -> &'static str {
        match self {
            Change::Fence => "inactivate",
            Change::Lift => "activate",
        }
    }
}

/// A record staged by a command and not yet committed.
#[derive(Debug, Clone)]
pub struct StagedRecord {
    journal: Arc<StateFile>,
    generation: u64,
    change: Change,
    /// How long the command took before its record (for its log line and
    /// `last_command`, which wait for the record).
    pub(super) ms: u64,
}

impl Image {
    /// Stages `change` of this image's record (`f` makes the new record of
    /// the old one) for `settle`; None when the mount keeps no state file.
    pub(super) fn stage_change(
        &self,
        change: Change,
        f: impl FnOnce(Option<Record>) -> Option<Record>,
    ) -> Option<StagedRecord> {
        let (journal, generation) = self.stage_record(Some(change.command()), f)?;
        Some(StagedRecord {
            journal: journal.clone(),
            generation,
            change,
            ms: 0,
        })
    }

    /// Ends a command whose record was staged: commits it (nothing to do
    /// when a rewrite for another image of the command, or for another
    /// command, has written it already), then finishes the command as it
    /// would have with the record written at once: `inactivate` is ok only
    /// if its fence is durable. Logs the result and keeps it as the last
    /// command. An outcome with nothing staged comes back as it is.
    pub fn settle(&self, mut outcome: Outcome) -> Outcome {
        let Some(staged) = outcome.staged.take() else {
            return outcome;
        };
        let written = staged.journal.commit(staged.generation);
        let outcome = match (staged.change, written) {
            (Change::Fence, Ok(())) => {
                self.fence_recorded();
                outcome
            }
            (Change::Fence, Err(e)) => self.fence_not_recorded(&e),
            (Change::Lift, Ok(())) => outcome,
            (Change::Lift, Err(e)) => {
                self.lift_not_recorded(&e);
                outcome
            }
        };
        self.conclude(staged.change.command(), outcome, staged.ms)
    }

    /// The fence is on disk (or the mount keeps no state file).
    pub(super) fn fence_recorded(&self) {
        self.restored.store(false, Ordering::Relaxed);
        self.counters.inactivations.fetch_add(1, Ordering::Relaxed);
    }

    /// `inactivate`'s failure when its fence cannot be recorded.
    pub(super) fn fence_not_recorded(&self, e: &std::io::Error) -> Outcome {
        Outcome::io(
            e,
            format!(
                "the image is fenced here but its fence cannot be recorded in the state file {} ({e}); \
                 a restarted daemon would forget it: make the state file writable and run inactivate again",
                self.journal_path()
            ),
        )
    }

    /// A record left behind errs on the safe side: a restarted daemon
    /// brings the image back inactive, and the operator activates it
    /// again. So `activate` does not fail for it.
    pub(super) fn lift_not_recorded(&self, e: &std::io::Error) {
        log::warn!(
            "image {}: active, but the state file {} still records it inactive or failed ({e}); \
             after a restart activate it again",
            self.path(),
            self.journal_path()
        );
    }
}
