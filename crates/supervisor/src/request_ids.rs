//! Idempotent retries of writes (AIP-155): the `request_id` of a write
//! names one logical call. The first call with an id runs; a retry with
//! the same id (and the same request) within [`WINDOW`] gets the first
//! call's answer again, waiting for it while the first call still runs;
//! the same id with another request is refused
//! ([`DomainError::RequestIdReused`]).
//!
//! Bounds: at most [`MAX_IDS`] ids and [`MAX_BYTES`] of remembered
//! answers, the oldest forgotten first. The ids of [`PERSISTED`] methods
//! (DefineDomain, UndefineDomain) are also kept in `STATE_DIR/requests/`,
//! one small file per id written atomically, and loaded at start, so a
//! retry across a supervisor restart is still answered from the record.
//! A crash between a Define and its record leaves the request id and
//! fingerprint in the definition file itself (a comment line), so the
//! retry after the restart is answered from the domain as loaded. An
//! Undefine writes its record ([`Promise`]) before it removes anything,
//! valid only while no domain with its UUID is defined: loaded after a
//! crash, the record answers the retry if the domain is gone, and is
//! dropped (the retry runs again) if the crash came before the removal.
//!
//! The cache key is (method, request id); the fingerprint is a digest of
//! the request message as the supervisor decoded and re-encoded it
//! (prost's encoding is deterministic; map fields are ordered).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tonic::{Code, Status};

use crate::domain::DomainError;
use crate::domain::store::{self, StoreError};

/// How long a request id is remembered.
pub const WINDOW: Duration = Duration::from_secs(10 * 60);
/// Most request ids remembered at once.
pub const MAX_IDS: usize = 4096;
/// Most bytes of remembered answers (responses and error details).
pub const MAX_BYTES: usize = 32 * 1024 * 1024;
/// Longest request id, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// Methods whose request ids survive a supervisor restart.
pub const PERSISTED: [&str; 2] = ["DefineDomain", "UndefineDomain"];
/// Largest record file read back at start.
const MAX_RECORD_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// The dir under the state dir.
const DIR_NAME: &str = "requests";

/// A 128-bit digest of `parts` (each length-prefixed, so the boundaries
/// count): the first half of their SHA-256. It tells requests apart and
/// versions records (etags).
pub fn digest(parts: &[&[u8]]) -> u128 {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part);
    }
    let sum = hash.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&sum[..16]);
    u128::from_be_bytes(first)
}

/// Check a request id: at most [`MAX_REQUEST_ID_BYTES`] of printable
/// ASCII.
pub fn check_request_id(id: &str) -> Result<(), DomainError> {
    if id.len() > MAX_REQUEST_ID_BYTES {
        return Err(DomainError::invalid(
            "request_id",
            format!(
                "request_id is {} bytes, at most {MAX_REQUEST_ID_BYTES}",
                id.len()
            ),
        ));
    }
    if !id.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(DomainError::invalid(
            "request_id",
            "request_id must be printable ASCII",
        ));
    }
    Ok(())
}

/// The answer of a call, as replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The encoded response message.
    Ok(Vec<u8>),
    /// The error status: code, message and encoded details.
    Err {
        /// The gRPC code.
        code: i32,
        /// The message.
        message: String,
        /// `grpc-status-details-bin`.
        details: Vec<u8>,
    },
}

impl Outcome {
    /// The outcome of a call's result.
    pub fn of<M: prost::Message>(result: &Result<M, Status>) -> Outcome {
        match result {
            Ok(message) => Outcome::Ok(message.encode_to_vec()),
            Err(status) => Outcome::Err {
                code: status.code() as i32,
                message: status.message().to_owned(),
                details: status.details().to_vec(),
            },
        }
    }

    /// The call's result again.
    pub fn replay<M: prost::Message + Default>(&self) -> Result<M, Status> {
        match self {
            Outcome::Ok(bytes) => M::decode(bytes.as_slice())
                .map_err(|e| qvirt_common::rpc::internal("supervisor", &e)),
            Outcome::Err {
                code,
                message,
                details,
            } => Err(Status::with_details(
                Code::from_i32(*code),
                message.clone(),
                details.clone().into(),
            )),
        }
    }

    fn size(&self) -> usize {
        match self {
            Outcome::Ok(bytes) => bytes.len(),
            Outcome::Err {
                message, details, ..
            } => message.len() + details.len(),
        }
    }
}

/// What a call with a request id does.
#[derive(Debug)]
pub enum Claim {
    /// Run: the first call with this id. Finish the ticket with its
    /// outcome.
    Run(Ticket),
    /// Answer with the first call's outcome (once there is one).
    Replay(watch::Receiver<Option<Outcome>>),
}

type Key = (&'static str, String);

#[derive(Debug)]
struct Slot {
    seq: u64,
    fingerprint: u128,
    at: SystemTime,
    outcome: watch::Sender<Option<Outcome>>,
    size: usize,
}

#[derive(Debug, Default)]
struct Table {
    slots: HashMap<Key, Slot>,
    /// Keys in claim order, with the slot's `seq` (a stale pair is
    /// skipped).
    order: VecDeque<(u64, Key)>,
    next_seq: u64,
    bytes: usize,
    /// Record files of forgotten persisted ids, removed at the next write.
    doomed: Vec<PathBuf>,
}

impl Table {
    /// Remembers `key` (in place of an older slot of it) as made at `at`,
    /// with its answer if known; returns the slot's `seq`. The bounds are
    /// the caller's to apply ([`RequestIds::evict`]).
    fn insert(
        &mut self,
        key: Key,
        fingerprint: u128,
        at: SystemTime,
        outcome: Option<Outcome>,
    ) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let size = outcome.as_ref().map_or(0, Outcome::size);
        self.bytes += size;
        self.order.push_back((seq, key.clone()));
        let slot = Slot {
            seq,
            fingerprint,
            at,
            outcome: watch::channel(outcome).0,
            size,
        };
        if let Some(old) = self.slots.insert(key, slot) {
            self.bytes -= old.size;
        }
        seq
    }
}

/// The remembered request ids; see the module docs.
#[derive(Debug)]
pub struct RequestIds {
    table: Mutex<Table>,
    /// `STATE_DIR/requests`.
    dir: PathBuf,
}

/// The right to run the first call with an id; dropped unfinished (the
/// call's task died), the id is forgotten and waiting retries fail.
#[derive(Debug)]
pub struct Ticket {
    ids: Arc<RequestIds>,
    key: Key,
    seq: u64,
    fingerprint: u128,
    at: SystemTime,
    finished: bool,
}

/// A record file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    method: String,
    request_id: String,
    fingerprint: String,
    at_ms: u64,
    /// Hex of the response, when the call succeeded.
    #[serde(default)]
    response: Option<String>,
    /// The error, when it failed.
    #[serde(default)]
    error: Option<RecordError>,
    /// The record stands only while no domain with this UUID is defined:
    /// a [`Promise`], written before the call removed the domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unless_defined: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordError {
    code: i32,
    message: String,
    details: String,
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Record {
    fn new(key: &Key, fingerprint: u128, at: SystemTime, outcome: &Outcome) -> Record {
        let (response, error) = match outcome {
            Outcome::Ok(bytes) => (Some(hex::encode(bytes)), None),
            Outcome::Err {
                code,
                message,
                details,
            } => (
                None,
                Some(RecordError {
                    code: *code,
                    message: message.clone(),
                    details: hex::encode(details),
                }),
            ),
        };
        Record {
            method: key.0.to_owned(),
            request_id: key.1.clone(),
            fingerprint: format!("{fingerprint:032x}"),
            at_ms: millis(at),
            response,
            error,
            unless_defined: None,
        }
    }

    /// Writes the record to `path` atomically, and with `durable` fsynced.
    fn save(&self, path: &Path, durable: bool) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(self).map_err(|e| StoreError::Write {
            path: path.to_owned(),
            source: std::io::Error::other(e),
        })?;
        store::write_replace(path, &bytes, durable)
    }

    /// Key, fingerprint, time and outcome, if the record is well-formed
    /// and stands (see `unless_defined`) when `is_defined` tells which
    /// UUIDs are defined.
    fn parts(self, is_defined: &dyn Fn(&str) -> bool) -> Option<(Key, u128, SystemTime, Outcome)> {
        if self.unless_defined.as_deref().is_some_and(is_defined) {
            return None;
        }
        let method = PERSISTED.into_iter().find(|m| *m == self.method)?;
        check_request_id(&self.request_id).ok()?;
        let fingerprint = u128::from_str_radix(&self.fingerprint, 16).ok()?;
        let outcome = match (self.response, self.error) {
            (Some(response), None) => Outcome::Ok(hex::decode(&response).ok()?),
            (None, Some(e)) => Outcome::Err {
                code: e.code,
                message: e.message,
                details: hex::decode(&e.details).ok()?,
            },
            _ => return None,
        };
        let at = UNIX_EPOCH + Duration::from_millis(self.at_ms);
        Some(((method, self.request_id), fingerprint, at, outcome))
    }
}

impl RequestIds {
    fn record_path(dir: &Path, key: &Key) -> PathBuf {
        let name = digest(&[key.0.as_bytes(), key.1.as_bytes()]);
        dir.join(format!("{}-{name:032x}.json", key.0))
    }

    /// The request ids of the state dir `state_dir`: creates
    /// `STATE_DIR/requests`, reads the records there, and removes those
    /// past the window or the bounds, and the promises of calls that did
    /// not happen (`is_defined` says which domain UUIDs are defined).
    /// Blocks (file I/O).
    pub fn load(
        state_dir: &Path,
        is_defined: impl Fn(&str) -> bool,
    ) -> Result<RequestIds, StoreError> {
        let dir = state_dir.join(DIR_NAME);
        store::create_dir(&dir, 0o700)?;
        let entries = std::fs::read_dir(&dir).map_err(|source| StoreError::ReadDir {
            path: dir.clone(),
            source,
        })?;
        let now = SystemTime::now();
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let is_record = path.extension().is_some_and(|x| x == "json");
            let read = is_record
                && entry
                    .metadata()
                    .is_ok_and(|m| m.is_file() && m.len() <= MAX_RECORD_FILE_BYTES);
            let parsed = read
                .then(|| std::fs::read(&path).ok())
                .flatten()
                .and_then(|bytes| serde_json::from_slice::<Record>(&bytes).ok())
                .and_then(|record| record.parts(&is_defined))
                .filter(|(key, _, at, _)| {
                    Self::record_path(&dir, key) == path && !expired(*at, now)
                });
            match parsed {
                Some(parts) => records.push(parts),
                // Expired, foreign, a broken promise or a left-over temp
                // file.
                None => {
                    if let Err(error) = std::fs::remove_file(&path) {
                        tracing::warn!(path = %path.display(), %error, "cannot remove a request id record");
                    }
                }
            }
        }
        records.sort_by_key(|(_, _, at, _)| *at);
        let ids = RequestIds {
            table: Mutex::new(Table::default()),
            dir,
        };
        {
            let mut table = ids.table();
            for (key, fingerprint, at, outcome) in records {
                table.insert(key, fingerprint, at, Some(outcome));
            }
            ids.evict(&mut table, now);
            for path in std::mem::take(&mut table.doomed) {
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(ids)
    }

    /// Remembers `outcome` as the answer of `method` with `request_id`
    /// and `fingerprint` made at `at`, unless that id is remembered
    /// already or `at` is past the window: for a write whose own record
    /// a crash prevented (its answer rebuilt from what it wrote). Not
    /// written to the state dir: the write itself is the record.
    pub fn adopt(
        &self,
        method: &'static str,
        request_id: &str,
        fingerprint: u128,
        at: SystemTime,
        outcome: Outcome,
    ) {
        let now = SystemTime::now();
        if expired(at, now) {
            return;
        }
        let key: Key = (method, request_id.to_owned());
        let mut table = self.table();
        if table.slots.contains_key(&key) {
            return;
        }
        table.insert(key, fingerprint, at, Some(outcome));
        self.evict(&mut table, now);
    }

    /// The record of `method` with `request_id` and `fingerprint`
    /// answered with `outcome`, to write before the call's effect (see
    /// [`Promise`]); none for a method not persisted.
    pub fn promise(
        &self,
        method: &'static str,
        request_id: &str,
        fingerprint: u128,
        outcome: &Outcome,
    ) -> Option<Promise> {
        if !PERSISTED.contains(&method) || request_id.is_empty() {
            return None;
        }
        let key: Key = (method, request_id.to_owned());
        Some(Promise {
            path: Self::record_path(&self.dir, &key),
            record: Record::new(&key, fingerprint, SystemTime::now(), outcome),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forget expired ids, and the oldest ones past the bounds.
    fn evict(&self, table: &mut Table, now: SystemTime) {
        while let Some((seq, key)) = table.order.front().cloned() {
            let over = table.slots.len() > MAX_IDS || table.bytes > MAX_BYTES;
            let slot_expired = table
                .slots
                .get(&key)
                .is_some_and(|s| s.seq == seq && expired(s.at, now));
            let stale = table.slots.get(&key).is_none_or(|s| s.seq != seq);
            if !(over || slot_expired || stale) {
                break;
            }
            table.order.pop_front();
            if stale {
                continue;
            }
            if let Some(slot) = table.slots.remove(&key) {
                table.bytes -= slot.size;
                if PERSISTED.contains(&key.0) {
                    table.doomed.push(Self::record_path(&self.dir, &key));
                }
            }
        }
    }

    /// What a call of `method` with `request_id` and request
    /// `fingerprint` does.
    pub fn claim(
        self: &Arc<Self>,
        method: &'static str,
        request_id: &str,
        fingerprint: u128,
    ) -> Result<Claim, DomainError> {
        let now = SystemTime::now();
        let key: Key = (method, request_id.to_owned());
        let mut table = self.table();
        self.evict(&mut table, now);
        if let Some(slot) = table.slots.get(&key)
            && !expired(slot.at, now)
        {
            if slot.fingerprint != fingerprint {
                return Err(DomainError::RequestIdReused {
                    method,
                    request_id: request_id.to_owned(),
                });
            }
            return Ok(Claim::Replay(slot.outcome.subscribe()));
        }
        let seq = table.insert(key.clone(), fingerprint, now, None);
        self.evict(&mut table, now);
        Ok(Claim::Run(Ticket {
            ids: Arc::clone(self),
            key,
            seq,
            fingerprint,
            at: now,
            finished: false,
        }))
    }
}

/// A call's record written before its effect, for a call whose effect
/// removes a domain (UndefineDomain): it stands only while that domain
/// is not defined, so a crash after the removal and before the call's
/// own record still answers the retry, and a crash before the removal
/// leaves no false answer. The call's own record (its real outcome)
/// replaces it when the call ends.
#[derive(Debug)]
pub struct Promise {
    path: PathBuf,
    record: Record,
}

impl Promise {
    /// Writes the record, standing while the domain `uuid` is not
    /// defined. Blocks (file I/O). Not fsynced: the removal it comes
    /// before is not either (a power loss can bring the domain back, and
    /// then this record does not stand), and the call's own record is.
    pub fn write(mut self, uuid: &str) -> Result<(), StoreError> {
        self.record.unless_defined = Some(uuid.to_owned());
        self.record.save(&self.path, false)
    }
}

fn expired(at: SystemTime, now: SystemTime) -> bool {
    now.duration_since(at).is_ok_and(|age| age >= WINDOW)
}

impl Ticket {
    /// Record the first call's `outcome` (in the state dir too for a
    /// persisted method) and wake the retries waiting for it.
    pub async fn finish(mut self, outcome: Outcome) {
        self.finished = true;
        let ids = Arc::clone(&self.ids);
        let doomed = std::mem::take(&mut ids.table().doomed);
        let record = PERSISTED
            .contains(&self.key.0)
            .then(|| Record::new(&self.key, self.fingerprint, self.at, &outcome));
        let path = RequestIds::record_path(&ids.dir, &self.key);
        let write = tokio::task::spawn_blocking(move || {
            for path in doomed {
                let _ = std::fs::remove_file(path);
            }
            match record {
                Some(record) => record.save(&path, true),
                None => Ok(()),
            }
        })
        .await;
        match write {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(error = %qvirt_common::error_chain(&error), request_id = %self.key.1, "cannot record a request id; a retry after a restart runs again");
            }
            Err(error) => tracing::warn!(%error, "request id record task failed"),
        }
        let mut table = ids.table();
        let size = outcome.size();
        if let Some(slot) = table.slots.get_mut(&self.key)
            && slot.seq == self.seq
        {
            slot.size = size;
            slot.outcome.send_replace(Some(outcome));
            table.bytes += size;
        }
        ids.evict(&mut table, SystemTime::now());
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // The call's task died: a promise it wrote must not answer a
        // retry after a restart (a rare path; one unlink).
        if PERSISTED.contains(&self.key.0) {
            let _ = std::fs::remove_file(RequestIds::record_path(&self.ids.dir, &self.key));
        }
        let mut table = self.ids.table();
        if table
            .slots
            .get(&self.key)
            .is_some_and(|slot| slot.seq == self.seq)
        {
            table.slots.remove(&self.key);
        }
    }
}

/// Wait for the first call's outcome and answer with it.
pub async fn replay<M: prost::Message + Default>(
    mut outcome: watch::Receiver<Option<Outcome>>,
) -> Result<M, Status> {
    match outcome.wait_for(Option::is_some).await {
        Ok(done) => match done.as_ref() {
            Some(outcome) => outcome.replay(),
            None => Err(first_call_lost()),
        },
        Err(_) => Err(first_call_lost()),
    }
}

fn first_call_lost() -> Status {
    qvirt_common::rpc::internal(
        "supervisor",
        &std::io::Error::other("the first call with this request id ended without an answer"),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use qvirt_proto::v1::{Domain, StartDomainResponse};

    fn response(name: &str) -> Result<StartDomainResponse, Status> {
        Ok(StartDomainResponse {
            domain: Some(Domain {
                host: name.into(),
                ..Default::default()
            }),
        })
    }

    async fn run_once(
        ids: &Arc<RequestIds>,
        method: &'static str,
        id: &str,
        fp: u128,
        result: Result<StartDomainResponse, Status>,
    ) -> Result<StartDomainResponse, Status> {
        match ids.claim(method, id, fp).unwrap() {
            Claim::Run(ticket) => {
                ticket.finish(Outcome::of(&result)).await;
                result
            }
            Claim::Replay(rx) => replay(rx).await,
        }
    }

    #[tokio::test]
    async fn test_a_retry_gets_the_first_answer_and_another_request_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ids = Arc::new(RequestIds::load(dir.path(), |_| false).unwrap());
        let first = run_once(&ids, "StartDomain", "a", 1, response("one")).await;
        let again = run_once(&ids, "StartDomain", "a", 1, response("two")).await;
        assert_eq!(first.unwrap(), again.unwrap());
        // Another method has its own ids.
        let other = run_once(&ids, "ResetDomain", "a", 2, response("three")).await;
        assert_eq!(other.unwrap().domain.unwrap().host, "three");
        assert!(matches!(
            ids.claim("StartDomain", "a", 2),
            Err(DomainError::RequestIdReused { .. })
        ));
        // An error is replayed with its details.
        let error = qvirt_common::rpc::error(Code::FailedPrecondition, "X_Y", "no", []);
        let _ = run_once(&ids, "StartDomain", "b", 1, Err(error)).await;
        let again = run_once(&ids, "StartDomain", "b", 1, response("ok")).await;
        let status = again.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            qvirt_common::rpc::reason_of(&status).as_deref(),
            Some("X_Y")
        );
    }

    #[tokio::test]
    async fn test_a_retry_waits_for_the_first_call() {
        let dir = tempfile::tempdir().unwrap();
        let ids = Arc::new(RequestIds::load(dir.path(), |_| false).unwrap());
        let Claim::Run(ticket) = ids.claim("StartDomain", "w", 7).unwrap() else {
            panic!("first call must run");
        };
        let Claim::Replay(rx) = ids.claim("StartDomain", "w", 7).unwrap() else {
            panic!("retry must wait");
        };
        let waiter = tokio::spawn(replay::<StartDomainResponse>(rx));
        ticket.finish(Outcome::of(&response("first"))).await;
        let got = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got.domain.unwrap().host, "first");
    }

    #[tokio::test]
    async fn test_persisted_ids_survive_a_reload_and_others_do_not() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ids = Arc::new(RequestIds::load(dir.path(), |_| false).unwrap());
            run_once(&ids, "DefineDomain", "d", 3, response("def"))
                .await
                .unwrap();
            run_once(&ids, "StartDomain", "s", 3, response("start"))
                .await
                .unwrap();
        }
        let ids = Arc::new(RequestIds::load(dir.path(), |_| false).unwrap());
        let again = run_once(&ids, "DefineDomain", "d", 3, response("other")).await;
        assert_eq!(again.unwrap().domain.unwrap().host, "def");
        let fresh = run_once(&ids, "StartDomain", "s", 3, response("again")).await;
        assert_eq!(fresh.unwrap().domain.unwrap().host, "again");
    }

    #[tokio::test]
    async fn test_an_undefine_promise_stands_only_once_its_domain_is_gone() {
        use qvirt_proto::v1::UndefineDomainResponse;
        let dir = tempfile::tempdir().unwrap();
        let done = Outcome::of(&Ok::<_, Status>(UndefineDomainResponse {}));
        let promise = |ids: &RequestIds| ids.promise("UndefineDomain", "u", 5, &done);
        let records = || {
            std::fs::read_dir(dir.path().join(DIR_NAME))
                .unwrap()
                .count()
        };
        let ids = RequestIds::load(dir.path(), |_| false).unwrap();
        assert!(ids.promise("StartDomain", "s", 5, &done).is_none());
        assert!(ids.promise("UndefineDomain", "", 5, &done).is_none());

        // A crash before the removal: the domain is still defined at the
        // next start, so the promise is dropped and the retry runs.
        promise(&ids).unwrap().write("uuid-1").unwrap();
        assert_eq!(records(), 1);
        let ids = Arc::new(RequestIds::load(dir.path(), |u| u == "uuid-1").unwrap());
        assert_eq!(records(), 0);
        assert!(matches!(
            ids.claim("UndefineDomain", "u", 5).unwrap(),
            Claim::Run(_)
        ));

        // A crash after it: the domain is gone, the retry gets the answer,
        // and another request with the id is refused.
        promise(&ids).unwrap().write("uuid-1").unwrap();
        let ids = Arc::new(RequestIds::load(dir.path(), |u| u == "uuid-2").unwrap());
        let Claim::Replay(outcome) = ids.claim("UndefineDomain", "u", 5).unwrap() else {
            panic!("the promise must answer the retry");
        };
        replay::<UndefineDomainResponse>(outcome).await.unwrap();
        assert!(matches!(
            ids.claim("UndefineDomain", "u", 6),
            Err(DomainError::RequestIdReused { .. })
        ));

        // The call's own record replaces the promise: it stands whatever
        // is defined.
        let ids = Arc::new(RequestIds::load(dir.path(), |_| false).unwrap());
        let failed = Err::<UndefineDomainResponse, _>(Status::internal("disk"));
        let Claim::Run(ticket) = ids.claim("UndefineDomain", "v", 1).unwrap() else {
            panic!("first call must run");
        };
        ids.promise("UndefineDomain", "v", 1, &done)
            .unwrap()
            .write("uuid-3")
            .unwrap();
        ticket.finish(Outcome::of(&failed)).await;
        let ids = Arc::new(RequestIds::load(dir.path(), |u| u == "uuid-3").unwrap());
        let Claim::Replay(outcome) = ids.claim("UndefineDomain", "v", 1).unwrap() else {
            panic!("the call's record must stand");
        };
        let err = replay::<UndefineDomainResponse>(outcome).await.unwrap_err();
        assert_eq!(err.message(), "disk");

        // A call whose task died leaves no promise behind.
        let Claim::Run(ticket) = ids.claim("UndefineDomain", "w", 1).unwrap() else {
            panic!("first call must run");
        };
        let before = records();
        ids.promise("UndefineDomain", "w", 1, &done)
            .unwrap()
            .write("uuid-4")
            .unwrap();
        assert_eq!(records(), before + 1);
        drop(ticket);
        assert_eq!(records(), before);
    }

    #[tokio::test]
    async fn test_the_oldest_ids_are_forgotten_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let ids = Arc::new(RequestIds::load(dir.path(), |_| false).unwrap());
        for i in 0..=MAX_IDS {
            run_once(&ids, "ResetDomain", &i.to_string(), 1, response("r"))
                .await
                .unwrap();
        }
        assert_eq!(ids.table().slots.len(), MAX_IDS);
        // Id 0 was forgotten: another request with it runs.
        assert!(matches!(
            ids.claim("ResetDomain", "0", 2).unwrap(),
            Claim::Run(_)
        ));
    }

    #[test]
    fn test_request_ids_are_bounded_printable_ascii() {
        assert!(check_request_id("0f6c2d1e-9a7b-4c3d-8e2f-1a2b3c4d5e6f").is_ok());
        assert!(check_request_id(&"x".repeat(MAX_REQUEST_ID_BYTES)).is_ok());
        for bad in [
            "x".repeat(MAX_REQUEST_ID_BYTES + 1),
            "a\nb".into(),
            "é".into(),
        ] {
            assert!(
                matches!(
                    check_request_id(&bad),
                    Err(DomainError::InvalidArgument {
                        field: "request_id",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn test_hex_round_trips_and_refuses_garbage() {
        assert_eq!(
            hex::decode(hex::encode(b"\x00\xffab")).unwrap(),
            b"\x00\xffab"
        );
        assert!(hex::decode("abc").is_err());
        assert!(hex::decode("zz").is_err());
        assert_ne!(digest(&[b"ab", b"c"]), digest(&[b"a", b"bc"]));
    }
}
