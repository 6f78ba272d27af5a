//! The embedded store (`state: {kind: embedded}`, the default): one redb file that only this
//! process opens, so one replica keeps ownership and placements across restarts with nothing
//! else to run.
//!
//! Writes go to one writer thread that applies everything queued in one transaction and one
//! commit (group commit): a burst of creates costs one fsync, not one each, and never more
//! than one thread. Reads are short and run where they are asked.
//!
//! Every write commits durably (fsync) before it answers: a create that was answered survives
//! a crash of the process or the host.

use super::{Created, Moved, Record, Store, StoreError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::{mpsc, Arc};
use tokio::sync::oneshot;

/// Writes applied in one transaction at most.
const GROUP: usize = 512;

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");

/// A redb file of session records.
pub(crate) struct Embedded {
    db: Arc<Database>,
    writer: Option<mpsc::Sender<Op>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Embedded {
    /// Closes the queue and waits for the writer, so the file is closed (and can be opened
    /// again) when the store is gone.
    fn drop(&mut self) {
        drop(self.writer.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One write, with where its answer goes.
enum Op {
    Create(String, Record, oneshot::Sender<Result<Created, StoreError>>),
    Move(
        String,
        u64,
        String,
        oneshot::Sender<Result<Moved, StoreError>>,
    ),
    Remove(
        String,
        Option<u64>,
        oneshot::Sender<Result<bool, StoreError>>,
    ),
    Undo(String, Record, oneshot::Sender<Result<bool, StoreError>>),
    RemoveExact(String, Record, oneshot::Sender<Result<bool, StoreError>>),
    Sync(
        Vec<(String, Record)>,
        oneshot::Sender<Result<Vec<(String, Record)>, StoreError>>,
    ),
}

fn encode(r: &Record) -> Vec<u8> {
    serde_json::to_vec(&Stored::from(r)).unwrap_or_default()
}

fn decode(id: &str, bytes: &[u8]) -> Result<Record, StoreError> {
    serde_json::from_slice::<Stored>(bytes)
        .map(Record::from)
        .map_err(|_| StoreError::Corrupt {
            id: id.to_string(),
            why: "not a session record",
        })
}

/// The on-disk form (short keys; no parameters, ever).
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    o: String,
    b: String,
    e: u64,
    c: u64,
    u: u64,
}

impl From<&Record> for Stored {
    fn from(r: &Record) -> Stored {
        Stored {
            o: r.owner.clone(),
            b: r.backend.clone(),
            e: r.epoch,
            c: r.created_ms,
            u: r.last_used_ms,
        }
    }
}

impl From<Stored> for Record {
    fn from(s: Stored) -> Record {
        Record {
            owner: s.o,
            backend: s.b,
            epoch: s.e,
            created_ms: s.c,
            last_used_ms: s.u,
        }
    }
}

impl Embedded {
    /// Opens (or creates) the file; refused when another process has it open.
    pub(crate) fn open(path: &Path) -> Result<Embedded, redb::Error> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(redb::Error::Io)?;
        }
        let db = Arc::new(Database::create(path)?);
        // The table exists from the start, so reads never meet a missing table.
        let tx = db.begin_write()?;
        tx.open_table(SESSIONS)?;
        tx.commit()?;
        let (writer, queue) = mpsc::channel();
        let w = db.clone();
        let thread = std::thread::Builder::new()
            .name("registry-writer".into())
            .spawn(move || write_loop(&w, &queue))
            .map_err(redb::Error::Io)?;
        Ok(Embedded {
            db,
            writer: Some(writer),
            thread: Some(thread),
        })
    }

    /// Every record, read synchronously (start-up, before serving).
    pub(crate) fn list_now(&self) -> Result<Vec<(String, Record)>, redb::Error> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SESSIONS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            // A record this version cannot read is skipped, not fatal: its session is then
            // unknown, which refuses it (fail closed).
            if let Ok(r) = decode(k.value(), v.value()) {
                out.push((k.value().to_string(), r));
            }
        }
        Ok(out)
    }

    async fn ask<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        let writer = self.writer.as_ref().ok_or(StoreError::WriterGone)?;
        writer.send(op(tx)).map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }
}

/// The writer thread: takes what is queued (up to [`GROUP`]), applies it in one transaction,
/// commits once (durably if any write needs it), then answers. Ends when the store is dropped.
fn write_loop(db: &Database, queue: &mpsc::Receiver<Op>) {
    while let Ok(first) = queue.recv() {
        let mut ops = vec![first];
        while ops.len() < GROUP {
            match queue.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut answers = Vec::with_capacity(ops.len());

        let committed = (|| -> Result<(), StoreError> {
            let mut tx = db.begin_write().map_err(redb::Error::from)?;
            // Always durable: non-durable commits were measured to make the next durable one
            // slow (p99 of creates 2 ms -> 270 ms with a sync loop interleaved), and the
            // group commit already shares one fsync between everything queued.
            tx.set_durability(Durability::Immediate)
                .map_err(redb::Error::from)?;
            {
                let mut t = tx.open_table(SESSIONS).map_err(redb::Error::from)?;
                for op in ops.drain(..) {
                    answers.push(apply(&mut t, op));
                }
            }
            tx.commit().map_err(redb::Error::from)?;
            Ok(())
        })();
        for a in answers {
            a.send(committed.as_ref().err());
        }
        // Ops never reached (the transaction failed to open) are answered by dropping them.
    }
}

/// A write's outcome, held until the commit says whether it stands.
enum Answer {
    Create(
        Result<Created, StoreError>,
        oneshot::Sender<Result<Created, StoreError>>,
    ),
    Move(
        Result<Moved, StoreError>,
        oneshot::Sender<Result<Moved, StoreError>>,
    ),
    Remove(
        Result<bool, StoreError>,
        oneshot::Sender<Result<bool, StoreError>>,
    ),
    Sync(
        Result<Vec<(String, Record)>, StoreError>,
        oneshot::Sender<Result<Vec<(String, Record)>, StoreError>>,
    ),
}

fn settle<T>(r: Result<T, StoreError>, failed: Option<&StoreError>) -> Result<T, StoreError> {
    match failed {
        Some(e) => Err(StoreError::CommitFailed(e.to_string())),
        None => r,
    }
}

impl Answer {
    fn send(self, failed: Option<&StoreError>) {
        // A caller that gave up (timed out) dropped its receiver; nothing to tell it.
        match self {
            Answer::Create(r, tx) => drop(tx.send(settle(r, failed))),
            Answer::Move(r, tx) => drop(tx.send(settle(r, failed))),
            Answer::Remove(r, tx) => drop(tx.send(settle(r, failed))),
            Answer::Sync(r, tx) => drop(tx.send(settle(r, failed))),
        }
    }
}

fn apply(t: &mut redb::Table<&str, &[u8]>, op: Op) -> Answer {
    match op {
        Op::Create(id, rec, tx) => Answer::Create(create_in(t, &id, &rec), tx),
        Op::Move(id, epoch, backend, tx) => Answer::Move(move_in(t, &id, epoch, backend), tx),
        Op::Remove(id, epoch, tx) => Answer::Remove(remove_in(t, &id, epoch), tx),
        Op::Undo(id, rec, tx) => Answer::Remove(undo_in(t, &id, &rec), tx),
        Op::RemoveExact(id, rec, tx) => Answer::Remove(remove_exact_in(t, &id, &rec), tx),
        Op::Sync(held, tx) => Answer::Sync(sync_in(t, &held), tx),
    }
}

fn read(db: &Database, id: &str) -> Result<Option<Record>, StoreError> {
    let tx = db.begin_read().map_err(redb::Error::from)?;
    let t = tx.open_table(SESSIONS).map_err(redb::Error::from)?;
    let got = t.get(id).map_err(redb::Error::from)?;
    got.map(|v| decode(id, v.value())).transpose()
}

fn get_in(t: &redb::Table<&str, &[u8]>, id: &str) -> Result<Option<Record>, StoreError> {
    let got = t.get(id).map_err(redb::Error::from)?;
    got.map(|v| decode(id, v.value())).transpose()
}

fn put(t: &mut redb::Table<&str, &[u8]>, id: &str, r: &Record) -> Result<(), StoreError> {
    t.insert(id, encode(r).as_slice())
        .map_err(redb::Error::from)?;
    Ok(())
}

fn create_in(
    t: &mut redb::Table<&str, &[u8]>,
    id: &str,
    rec: &Record,
) -> Result<Created, StoreError> {
    match get_in(t, id)? {
        Some(r) => Ok(Created::Exists(r)),
        None => {
            put(t, id, rec)?;
            Ok(Created::Inserted)
        }
    }
}

fn move_in(
    t: &mut redb::Table<&str, &[u8]>,
    id: &str,
    epoch: u64,
    backend: String,
) -> Result<Moved, StoreError> {
    match get_in(t, id)? {
        Some(mut r) if r.epoch == epoch => {
            r.backend = backend;
            r.epoch += 1;
            put(t, id, &r)?;
            Ok(Moved::Done(r))
        }
        other => Ok(Moved::Stale(other)),
    }
}

fn remove_in(
    t: &mut redb::Table<&str, &[u8]>,
    id: &str,
    epoch: Option<u64>,
) -> Result<bool, StoreError> {
    match get_in(t, id)? {
        Some(r) if epoch.is_none_or(|e| e == r.epoch) => {
            t.remove(id).map_err(redb::Error::from)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

fn undo_in(t: &mut redb::Table<&str, &[u8]>, id: &str, rec: &Record) -> Result<bool, StoreError> {
    match get_in(t, id)? {
        Some(r) if same_create(&r, rec) => {
            t.remove(id).map_err(redb::Error::from)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

fn remove_exact_in(
    t: &mut redb::Table<&str, &[u8]>,
    id: &str,
    rec: &Record,
) -> Result<bool, StoreError> {
    match get_in(t, id)? {
        Some(r) if r == *rec => {
            t.remove(id).map_err(redb::Error::from)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Up to `count` records after the key `from` (exclusive), in key order.
fn scan(db: &Database, from: Option<&str>, count: usize) -> Result<super::Page, StoreError> {
    use std::ops::Bound;
    let tx = db.begin_read().map_err(redb::Error::from)?;
    let t = tx.open_table(SESSIONS).map_err(redb::Error::from)?;
    let range: (Bound<&str>, Bound<&str>) = match from {
        Some(k) => (Bound::Excluded(k), Bound::Unbounded),
        None => (Bound::Unbounded, Bound::Unbounded),
    };
    let mut page = super::Page::default();
    let mut last = None;
    for (n, row) in t
        .range::<&str>(range)
        .map_err(redb::Error::from)?
        .enumerate()
    {
        if n == count.max(1) {
            page.next = last;
            return Ok(page);
        }
        let (k, v) = row.map_err(redb::Error::from)?;
        let id = k.value().to_string();
        // As at start-up: a record this version cannot read is left alone.
        if let Ok(r) = decode(&id, v.value()) {
            page.records.push((id.clone(), r));
        }
        last = Some(id);
    }
    Ok(page)
}

/// Whether `r` is the record `rec` created (last-used times move; nothing else may).
fn same_create(r: &Record, rec: &Record) -> bool {
    (&r.owner, &r.backend, r.epoch, r.created_ms)
        == (&rec.owner, &rec.backend, rec.epoch, rec.created_ms)
}

fn sync_in(
    t: &mut redb::Table<&str, &[u8]>,
    held: &[(String, Record)],
) -> Result<Vec<(String, Record)>, StoreError> {
    let mut differs = Vec::new();
    for (id, mine) in held {
        match get_in(t, id)? {
            None => put(t, id, mine)?,
            Some(mut r) => {
                if mine.last_used_ms > r.last_used_ms {
                    r.last_used_ms = mine.last_used_ms;
                    put(t, id, &r)?;
                }
                if (&r.owner, &r.backend, r.epoch) != (&mine.owner, &mine.backend, mine.epoch) {
                    differs.push((id.clone(), r));
                }
            }
        }
    }
    Ok(differs)
}

impl Store for Embedded {
    async fn remove_exact(&self, id: &str, rec: &Record) -> Result<bool, StoreError> {
        let (id, rec) = (id.to_string(), rec.clone());
        self.ask(|tx| Op::RemoveExact(id, rec, tx)).await
    }

    async fn scan(&self, from: Option<&str>, count: usize) -> Result<super::Page, StoreError> {
        scan(&self.db, from, count)
    }

    /// The file is this process's alone (a second opener is refused), so this process is
    /// the only reaper there can be: it always holds the lease.
    async fn lease(
        &self,
        me: &str,
        _ttl: std::time::Duration,
    ) -> Result<Option<String>, StoreError> {
        Ok(Some(me.to_string()))
    }

    async fn release(&self, _me: &str) -> Result<(), StoreError> {
        Ok(())
    }

    /// One process has the file: there are no other replicas to count.
    async fn share_live(
        &self,
        _me: &str,
        _mine: &super::LiveCounts,
        _ttl: std::time::Duration,
    ) -> Result<super::LiveCounts, StoreError> {
        Ok(super::LiveCounts::default())
    }

    async fn get(&self, id: &str) -> Result<Option<Record>, StoreError> {
        read(&self.db, id)
    }

    async fn create(&self, id: &str, rec: &Record) -> Result<Created, StoreError> {
        let (id, rec) = (id.to_string(), rec.clone());
        self.ask(|tx| Op::Create(id, rec, tx)).await
    }

    async fn move_to(&self, id: &str, epoch: u64, backend: &str) -> Result<Moved, StoreError> {
        let (id, backend) = (id.to_string(), backend.to_string());
        self.ask(|tx| Op::Move(id, epoch, backend, tx)).await
    }

    async fn remove(&self, id: &str, epoch: Option<u64>) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.ask(|tx| Op::Remove(id, epoch, tx)).await
    }

    async fn undo_create(&self, id: &str, rec: &Record) -> Result<bool, StoreError> {
        let (id, rec) = (id.to_string(), rec.clone());
        self.ask(|tx| Op::Undo(id, rec, tx)).await
    }

    async fn sync(&self, held: &[(String, Record)]) -> Result<Vec<(String, Record)>, StoreError> {
        let held = held.to_vec();
        self.ask(|tx| Op::Sync(held, tx)).await
    }
}
