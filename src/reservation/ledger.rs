//! The book of reservations kept in this process (the memory store's): who
//! charged what, until when, and how each settled.
//!
//! An open reservation is consumed by its first settle under the book's
//! lock, so it is settled exactly once however many settles race; what
//! remains is a tombstone with the settled cost, so a retried settle gets
//! the same answer for [`TOMBSTONE_MS`]. Bounded: at most `max_open` open
//! reservations (past that, reserving is refused) and as many tombstones
//! (past that, the oldest go early); expired ones and old tombstones are
//! dropped on access, at most once per [`SWEEP_INTERVAL_MS`].

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use super::adjust::Charged;
use super::{Grant, ReservationError, SettleStatus, Settled};

/// How long a settled reservation is remembered, for retried settles.
pub const TOMBSTONE_MS: u64 = 10 * 60 * 1_000;

/// How often (at most) the book drops expired entries.
pub const SWEEP_INTERVAL_MS: u64 = 1_000;

/// Default cap on open reservations.
pub const DEFAULT_MAX_OPEN: usize = 100_000;

/// Default longest reservation TTL: longer requests are shortened to it.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3_600);

/// One counter a reservation charged: its storage key and how.
#[derive(Debug, Clone)]
pub struct Charge {
    /// Storage key of the counter.
    pub key: Vec<u8>,
    /// What was charged there.
    pub charged: Charged,
}

/// The reservations of one store.
#[derive(Debug)]
pub struct Ledger {
    book: Mutex<Book>,
    max_open: usize,
    max_ttl_ms: u64,
}

#[derive(Debug, Default)]
struct Book {
    entries: HashMap<String, Entry>,
    open: usize,
    /// Settled ids, oldest first, to bound the tombstones.
    settled: VecDeque<String>,
    next_sweep_ms: u64,
    /// Reservations that expired unsettled, not yet reported.
    expired: u64,
}

#[derive(Debug)]
struct Entry {
    domain: String,
    estimate: u64,
    state: State,
}

#[derive(Debug)]
enum State {
    Open {
        charges: Vec<Charge>,
        expires_at_ms: u64,
    },
    Settled {
        actual: u64,
        forget_at_ms: u64,
    },
}

/// What taking a reservation for settling found.
#[derive(Debug)]
pub enum Taken {
    /// It was open: apply the difference to these charges.
    Open {
        /// The estimate charged.
        estimate: u64,
        /// Where.
        charges: Vec<Charge>,
    },
    /// It was settled before, at the same cost.
    Again(Settled),
}

// === impl Ledger ===

impl Ledger {
    /// A book holding at most `max_open` open reservations of at most
    /// `max_ttl`.
    pub fn new(max_open: usize, max_ttl: Duration) -> Self {
        Self {
            book: Mutex::default(),
            max_open,
            max_ttl_ms: u64::try_from(max_ttl.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
        }
    }

    /// Opens a reservation of `estimate` on `charges` for `ttl_ms` (at most
    /// the maximum) from `now_ms`.
    ///
    /// # Errors
    ///
    /// [`ReservationError::Full`] when `max_open` reservations are open.
    pub fn open(
        &self,
        domain: &str,
        estimate: u64,
        charges: Vec<Charge>,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<Grant, ReservationError> {
        let ttl_ms = ttl_ms.clamp(1, self.max_ttl_ms);
        let mut book = self.lock();
        book.sweep(now_ms);
        if book.open >= self.max_open {
            return Err(ReservationError::Full(self.max_open));
        }
        let id = loop {
            let id = new_id();
            if !book.entries.contains_key(&id) {
                break id;
            }
        };
        let expires_at_ms = now_ms.saturating_add(ttl_ms);
        book.entries.insert(
            id.clone(),
            Entry {
                domain: domain.to_owned(),
                estimate,
                state: State::Open {
                    charges,
                    expires_at_ms,
                },
            },
        );
        book.open += 1;
        Ok(Grant { id, ttl_ms })
    }

    /// Takes reservation `id` of `domain` for settling at `actual`: an open
    /// one becomes a tombstone at `actual` (so nobody else can settle it)
    /// and its charges are handed back to be adjusted.
    ///
    /// # Errors
    ///
    /// [`ReservationError::NotFound`] when the reservation is unknown, of another
    /// domain, or expired; [`ReservationError::Conflict`] when it was settled at
    /// another cost.
    pub fn take(
        &self,
        domain: &str,
        id: &str,
        actual: u64,
        now_ms: u64,
    ) -> Result<Taken, ReservationError> {
        let mut book = self.lock();
        book.sweep(now_ms);
        let not_found = || ReservationError::NotFound(id.to_owned());
        let entry = book
            .entries
            .get_mut(id)
            .filter(|e| e.domain == domain)
            .ok_or_else(not_found)?;
        let estimate = entry.estimate;
        match &entry.state {
            State::Settled {
                actual: settled, ..
            } if *settled == actual => {
                return Ok(Taken::Again(Settled {
                    status: SettleStatus::AlreadySettled,
                    estimate,
                    actual,
                }));
            }
            State::Settled {
                actual: settled, ..
            } => {
                return Err(ReservationError::Conflict {
                    id: id.to_owned(),
                    settled: *settled,
                });
            }
            State::Open { expires_at_ms, .. } if *expires_at_ms <= now_ms => {
                book.entries.remove(id);
                book.open -= 1;
                book.expired += 1;
                return Err(not_found());
            }
            State::Open { .. } => {}
        }
        let tombstone = State::Settled {
            actual,
            forget_at_ms: now_ms.saturating_add(TOMBSTONE_MS),
        };
        let State::Open { charges, .. } = std::mem::replace(&mut entry.state, tombstone) else {
            unreachable!("an open reservation was matched above");
        };
        book.open -= 1;
        book.settled.push_back(id.to_owned());
        // Ids are never reused, so the oldest settled id names a tombstone
        // (or nothing, once swept).
        while book.settled.len() > self.max_open {
            if let Some(oldest) = book.settled.pop_front() {
                book.entries.remove(&oldest);
            }
        }
        Ok(Taken::Open { estimate, charges })
    }

    /// How many reservations expired unsettled since the last call (for
    /// the `expired` metric).
    pub fn take_expired(&self) -> u64 {
        std::mem::take(&mut self.lock().expired)
    }

    /// Whether no more reservations can be opened at `now_ms`.
    pub fn is_full(&self, now_ms: u64) -> bool {
        let mut book = self.lock();
        book.sweep(now_ms);
        book.open >= self.max_open
    }

    /// The most reservations kept open.
    pub fn max_open(&self) -> usize {
        self.max_open
    }

    /// Open reservations (expired ones not yet swept included).
    pub fn open_count(&self) -> usize {
        self.lock().open
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A fresh reservation id: 128 random bits. Not a secret (anyone who can
/// call `Settle` can call `ShouldAllow`), only unique.
pub(crate) fn new_id() -> String {
    format!("rsv-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

impl Default for Ledger {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_OPEN, DEFAULT_MAX_TTL)
    }
}

// === impl Book ===

impl Book {
    /// Drops expired reservations and old tombstones when due, counting the
    /// reservations that expired unsettled.
    fn sweep(&mut self, now_ms: u64) {
        if now_ms < self.next_sweep_ms {
            return;
        }
        self.next_sweep_ms = now_ms + SWEEP_INTERVAL_MS;
        let mut expired = 0;
        self.entries.retain(|_, e| match e.state {
            State::Open { expires_at_ms, .. } => {
                let keep = expires_at_ms > now_ms;
                expired += u64::from(!keep);
                keep
            }
            State::Settled { forget_at_ms, .. } => forget_at_ms > now_ms,
        });
        self.open -= usize::try_from(expired).unwrap_or(0);
        self.expired += expired;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_700_000_000_000;

    #[test]
    fn a_reservation_settles_once_and_a_retry_gets_the_same_answer() {
        let ledger = Ledger::default();
        let grant = ledger.open("d", 10, Vec::new(), 5_000, T).unwrap();
        assert!(matches!(
            ledger.take("d", &grant.id, 4, T),
            Ok(Taken::Open { estimate: 10, .. })
        ));
        let again = ledger.take("d", &grant.id, 4, T + 1).unwrap();
        assert!(matches!(
            again,
            Taken::Again(Settled {
                status: SettleStatus::AlreadySettled,
                estimate: 10,
                actual: 4
            })
        ));
        assert!(matches!(
            ledger.take("d", &grant.id, 5, T + 1),
            Err(ReservationError::Conflict { settled: 4, .. })
        ));
        assert_eq!(ledger.open_count(), 0);
    }

    #[test]
    fn an_expired_or_foreign_reservation_is_not_found() {
        let ledger = Ledger::default();
        let grant = ledger.open("d", 10, Vec::new(), 5_000, T).unwrap();
        assert!(matches!(
            ledger.take("other", &grant.id, 1, T),
            Err(ReservationError::NotFound(_))
        ));
        assert!(matches!(
            ledger.take("d", "rsv-nope", 1, T),
            Err(ReservationError::NotFound(_))
        ));
        assert!(matches!(
            ledger.take("d", &grant.id, 1, T + 5_000),
            Err(ReservationError::NotFound(_))
        ));
        assert_eq!(ledger.open_count(), 0);
    }

    #[test]
    fn tombstones_are_bounded_too() {
        let ledger = Ledger::new(2, Duration::from_secs(60));
        let ids: Vec<String> = (0..3)
            .map(|_| {
                let grant = ledger.open("d", 1, Vec::new(), 1_000, T).unwrap();
                ledger.take("d", &grant.id, 1, T).unwrap();
                grant.id
            })
            .collect();
        assert_eq!(ledger.lock().entries.len(), 2);
        assert!(matches!(
            ledger.take("d", &ids[0], 1, T),
            Err(ReservationError::NotFound(_))
        ));
        assert!(matches!(
            ledger.take("d", &ids[2], 1, T),
            Ok(Taken::Again(_))
        ));
    }

    #[test]
    fn the_ttl_is_clamped_and_the_book_is_bounded() {
        let ledger = Ledger::new(2, Duration::from_secs(1));
        let grant = ledger.open("d", 1, Vec::new(), 60_000, T).unwrap();
        assert_eq!(grant.ttl_ms, 1_000);
        ledger.open("d", 1, Vec::new(), 60_000, T).unwrap();
        assert!(matches!(
            ledger.open("d", 1, Vec::new(), 1, T),
            Err(ReservationError::Full(2))
        ));
        // Once they expire, the sweep makes room and counts them.
        ledger.open("d", 1, Vec::new(), 1, T + 1_000).unwrap();
        assert_eq!(ledger.take_expired(), 2);
        assert_eq!(ledger.take_expired(), 0);
    }
}
