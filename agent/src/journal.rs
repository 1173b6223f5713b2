//! The command journal: each command the server hands the agent, on disk, from the moment the agent
//! accepts it until the server acknowledges its result.
//!
//! It gives the two promises of SPEC 3.7 on the agent's side. Execution once: a command id the journal
//! knows is never run again, whether the server sends it twice or the agent restarted in between.
//! Delivery of the result exactly once, as far as the server can tell: the result stays here (the
//! outbox) until the server's `command_result_ack`, and the server ignores a result it already has.
//!
//! One JSON file per command, replaced whole through a synced temporary file, so a crash leaves either
//! the old state or the new one. A command found `running` at start-up was cut off by a crash or a kill:
//! it is not run again (the dongle may have run it), and its result becomes an error that says so.
//! Acknowledged entries are kept a while ([`KEEP_ACKED`]) so that a late duplicate of the command is
//! still recognised, and the journal never holds more than [`MAX_ENTRIES`].

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use control_proto::{CommandOutcome, CommandResult, DeviceId};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::home::{HomeError, write_private};

/// How long an acknowledged command is remembered.
pub const KEEP_ACKED: Duration = Duration::from_secs(7 * 24 * 3600);
/// The most commands the journal holds; past it the oldest acknowledged ones go first.
pub const MAX_ENTRIES: usize = 10_000;
/// A journal file larger than this is damaged (a result holds at most the dongle's small output).
const MAX_FILE: u64 = 1 << 20;

/// What the journal can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    #[error(transparent)]
    Io(#[from] HomeError),
    #[error(
        "the command journal holds {MAX_ENTRIES} commands whose results the server has not acknowledged: \
         connect the agent to its server so they can be delivered"
    )]
    Full,
    /// The blocking task that wrote the journal did not finish (the runtime is shutting down).
    #[error(
        "the command journal's write did not finish ({0}); the agent is probably shutting down"
    )]
    Interrupted(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "state", rename_all = "snake_case")]
enum State {
    Running,
    Finished { result: CommandResult },
    Acked,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    command_id: Uuid,
    device_id: DeviceId,
    /// Seconds since the Unix epoch of the last change.
    updated: u64,
    #[serde(flatten)]
    state: State,
}

/// What to do with a command the server sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// Never seen: it is journalled as running now; run it.
    Run,
    /// Already running: do nothing more.
    AlreadyRunning,
    /// Already finished: send this result again (the server may have missed it).
    AlreadyFinished(CommandResult),
    /// Finished and acknowledged: the server has the result already.
    AlreadyAcknowledged,
}

/// The journal in one folder.
pub struct Journal {
    dir: PathBuf,
    entries: Mutex<HashMap<Uuid, Entry>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Journal {
    /// Opens the journal in `dir` (made if missing). Commands left running by an earlier run end as
    /// errors; files that do not parse are set aside with a `.damaged` suffix and a warning, never
    /// a crash.
    pub fn open(dir: &Path) -> Result<Self, JournalError> {
        fs::create_dir_all(dir).map_err(|source| HomeError::Io {
            action: "create",
            path: dir.to_path_buf(),
            source,
        })?;
        let journal = Self {
            dir: dir.to_path_buf(),
            entries: Mutex::new(HashMap::new()),
        };
        let listing = fs::read_dir(dir).map_err(|source| HomeError::Io {
            action: "read",
            path: dir.to_path_buf(),
            source,
        })?;
        let mut interrupted = Vec::new();
        for item in listing.flatten() {
            let path = item.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match read_entry(&path) {
                Some(entry) => {
                    if entry.state == State::Running {
                        interrupted.push(entry.clone());
                    }
                    journal
                        .entries
                        .lock()
                        .unwrap()
                        .insert(entry.command_id, entry);
                }
                None => {
                    tracing::warn!(file = %path.display(), "a damaged command journal entry was set aside");
                    let _ = fs::rename(&path, path.with_extension("damaged"));
                }
            }
        }
        for entry in interrupted {
            journal.finish(CommandResult {
                command_id: entry.command_id,
                device_id: entry.device_id,
                outcome: CommandOutcome::Error,
                exit_code: -1,
                output: String::new(),
                truncated: false,
                message: Some(
                    "the agent stopped while this command ran; it was not run again, and the dongle \
                     may or may not have finished it"
                        .into(),
                ),
            })?;
        }
        Ok(journal)
    }

    /// Decides what to do with `command_id`, journalling it as running when it is new.
    pub fn admit(&self, command_id: Uuid, device_id: DeviceId) -> Result<Admission, JournalError> {
        let mut entries = self.entries.lock().unwrap();
        if let Some(entry) = entries.get(&command_id) {
            return Ok(match &entry.state {
                State::Running => Admission::AlreadyRunning,
                State::Finished { result } => Admission::AlreadyFinished(result.clone()),
                State::Acked => Admission::AlreadyAcknowledged,
            });
        }
        if entries.len() >= MAX_ENTRIES {
            self.prune(&mut entries, true);
            if entries.len() >= MAX_ENTRIES {
                return Err(JournalError::Full);
            }
        }
        let entry = Entry {
            command_id,
            device_id,
            updated: now(),
            state: State::Running,
        };
        self.write(&entry)?;
        entries.insert(command_id, entry);
        Ok(Admission::Run)
    }

    /// Records the end of a running command; a command that already ended keeps its first result.
    pub fn finish(&self, result: CommandResult) -> Result<(), JournalError> {
        let mut entries = self.entries.lock().unwrap();
        let Some(entry) = entries.get_mut(&result.command_id) else {
            return Ok(());
        };
        if entry.state != State::Running {
            return Ok(());
        }
        let updated = Entry {
            updated: now(),
            state: State::Finished { result },
            ..entry.clone()
        };
        self.write(&updated)?;
        *entry = updated;
        Ok(())
    }

    /// The results the server has not acknowledged yet, oldest first.
    pub fn unacknowledged(&self) -> Vec<CommandResult> {
        let entries = self.entries.lock().unwrap();
        let mut pending: Vec<(u64, CommandResult)> = entries
            .values()
            .filter_map(|e| match &e.state {
                State::Finished { result } => Some((e.updated, result.clone())),
                _ => None,
            })
            .collect();
        pending.sort_by_key(|(t, r)| (*t, r.command_id));
        pending.into_iter().map(|(_, r)| r).collect()
    }

    /// The server stored the result: keep only the fact that the command ran.
    pub fn acknowledge(&self, command_id: Uuid) -> Result<(), JournalError> {
        let mut entries = self.entries.lock().unwrap();
        let Some(entry) = entries.get_mut(&command_id) else {
            return Ok(());
        };
        if !matches!(entry.state, State::Finished { .. }) {
            return Ok(());
        }
        let updated = Entry {
            updated: now(),
            state: State::Acked,
            ..entry.clone()
        };
        self.write(&updated)?;
        *entry = updated;
        self.prune(&mut entries, false);
        Ok(())
    }

    /// How many commands are running and how many results wait for the server, read from `dir`
    /// without changing anything (a running daemon owns the journal).
    pub fn peek(dir: &Path) -> (usize, usize) {
        let mut counts = (0, 0);
        for item in fs::read_dir(dir).into_iter().flatten().flatten() {
            match read_entry(&item.path()).map(|e| e.state) {
                Some(State::Running) => counts.0 += 1,
                Some(State::Finished { .. }) => counts.1 += 1,
                _ => {}
            }
        }
        counts
    }

    /// How many commands are running and how many results wait for the server.
    pub fn counts(&self) -> (usize, usize) {
        let entries = self.entries.lock().unwrap();
        let running = entries
            .values()
            .filter(|e| e.state == State::Running)
            .count();
        let waiting = entries
            .values()
            .filter(|e| matches!(e.state, State::Finished { .. }))
            .count();
        (running, waiting)
    }

    /// Forgets acknowledged commands older than [`KEEP_ACKED`], and, when `make_room`, the oldest
    /// acknowledged ones until there is room for one more.
    fn prune(&self, entries: &mut HashMap<Uuid, Entry>, make_room: bool) {
        let horizon = now().saturating_sub(KEEP_ACKED.as_secs());
        let mut acked: Vec<(u64, Uuid)> = entries
            .values()
            .filter(|e| e.state == State::Acked)
            .map(|e| (e.updated, e.command_id))
            .collect();
        acked.sort();
        let mut excess = if make_room {
            (entries.len() + 1).saturating_sub(MAX_ENTRIES)
        } else {
            0
        };
        for (updated, id) in acked {
            if updated < horizon || excess > 0 {
                entries.remove(&id);
                let _ = fs::remove_file(self.path(id));
                excess = excess.saturating_sub(1);
            }
        }
    }

    fn path(&self, command_id: Uuid) -> PathBuf {
        self.dir.join(format!("{command_id}.json"))
    }

    fn write(&self, entry: &Entry) -> Result<(), JournalError> {
        let text = serde_json::to_vec(entry).expect("journal entries serialize");
        write_private(&self.path(entry.command_id), &text)?;
        Ok(())
    }
}

fn read_entry(path: &Path) -> Option<Entry> {
    let file = fs::File::open(path).ok()?;
    let mut text = Vec::new();
    file.take(MAX_FILE).read_to_end(&mut text).ok()?;
    let entry: Entry = serde_json::from_slice(&text).ok()?;
    // A file renamed by hand must not stand for another command.
    (path.file_stem()? == entry.command_id.to_string().as_str()).then_some(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> DeviceId {
        "0123456789abcdef".parse().unwrap()
    }

    fn done(id: Uuid) -> CommandResult {
        CommandResult {
            command_id: id,
            device_id: dev(),
            outcome: CommandOutcome::Done,
            exit_code: 0,
            output: "ok\n".into(),
            truncated: false,
            message: None,
        }
    }

    #[test]
    fn a_command_runs_once_and_its_result_waits_for_the_ack() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let id = Uuid::new_v4();
        assert_eq!(j.admit(id, dev()).unwrap(), Admission::Run);
        assert_eq!(j.admit(id, dev()).unwrap(), Admission::AlreadyRunning);
        j.finish(done(id)).unwrap();
        // A second result for the same command does not replace the first.
        j.finish(CommandResult {
            exit_code: 9,
            ..done(id)
        })
        .unwrap();
        assert_eq!(j.unacknowledged(), vec![done(id)]);
        assert_eq!(
            j.admit(id, dev()).unwrap(),
            Admission::AlreadyFinished(done(id))
        );
        // The journal survives a restart as it was.
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.unacknowledged(), vec![done(id)]);
        j.acknowledge(id).unwrap();
        assert!(j.unacknowledged().is_empty());
        assert_eq!(j.admit(id, dev()).unwrap(), Admission::AlreadyAcknowledged);
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.admit(id, dev()).unwrap(), Admission::AlreadyAcknowledged);
    }

    #[test]
    fn a_command_cut_off_by_a_restart_ends_as_an_error_and_is_not_run_again() {
        let dir = tempfile::tempdir().unwrap();
        let id = Uuid::new_v4();
        {
            let j = Journal::open(dir.path()).unwrap();
            assert_eq!(j.admit(id, dev()).unwrap(), Admission::Run);
        }
        let j = Journal::open(dir.path()).unwrap();
        let pending = j.unacknowledged();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].outcome, CommandOutcome::Error);
        assert!(
            pending[0]
                .message
                .as_deref()
                .unwrap()
                .contains("not run again")
        );
        assert!(matches!(
            j.admit(id, dev()).unwrap(),
            Admission::AlreadyFinished(_)
        ));
    }

    #[test]
    fn damaged_files_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let id = Uuid::new_v4();
        fs::write(dir.path().join(format!("{id}.json")), b"{\"command_id\": ").unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.counts(), (0, 0));
        assert!(dir.path().join(format!("{id}.damaged")).exists());
        assert_eq!(j.admit(id, dev()).unwrap(), Admission::Run);
    }
}
