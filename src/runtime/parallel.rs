//! Work split over the cores: contiguous ranges of a job, even ([`split_units`]) or sized by
//! how fast each core ran the last ones ([`split_balanced`], the products), the first on the
//! calling thread, the others on the worker threads a binary's `main` started
//! ([`start_workers`]), or on scoped threads where none were started (library users; most
//! tests) or they are busy. One place for the splits of the hand-written products
//! ([`crate::runtime::sgemm`], [`crate::runtime::amx`]), the per-sequence work of a grouped
//! pass, the elementwise ops and adds ([`crate::runtime::ops`]), a group's optimizer steps
//! ([`crate::runtime::training`]), and a decoding step's draws ([`crate::runtime::generate`]).
//!
//! Why workers: a grouped training run split its work ~500 times a second, and a scoped
//! thread costs ~20-40 µs to start before its share can begin, on the critical path of every
//! split. A worker already running picks its part up within a few microseconds.

use std::any::Any;
use std::cell::UnsafeCell;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// An output buffer shared by the threads of one split: the column panels of a hand-written
/// product ([`crate::runtime::sgemm`], [`crate::runtime::amx`]) or the row segments of a
/// packed batch (`ops::segmented_low_rank`), or the rows of a product's input rounded to bf16
/// ([`crate::runtime::amx`]), each thread writing only its own part.
pub(crate) struct SharedOut<T = f32>(pub(crate) *mut T);
// SAFETY: every user hands each thread a disjoint range (columns or rows) to write, and no
// thread reads what another wrote. `T: Send`: the values a thread writes are used by the owner
// afterwards, as they would be had it been handed a disjoint `&mut [T]`.
unsafe impl<T: Send> Sync for SharedOut<T> {}

/// The workers of this process, once [`start_workers`] ran.
static WORKERS: OnceLock<Workers> = OnceLock::new();

/// How long the workers of [`start_workers`] check for their next part before they park:
/// the binary's `main` knows what else needs the cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerSpin {
    /// The products run on the workers (the f32 kernel on AVX-512, AMX): they spin 500 µs,
    /// and a split hands its parts over within ~1 µs.
    Hot,
    /// OpenBLAS's own threads compute the products on the same cores: the workers park after
    /// 50 µs, so that a split may pay a futex wake.
    BesideBlas,
}

/// Starts `count` worker threads that every split of this process runs its parts on from
/// then on (a split of `t` parts uses the caller and `t - 1` workers), waiting `spin` for each
/// next part. For a binary's `main`, once, before any work: a library never starts threads
/// that outlive its call. `count` is usually [`crate::runtime::blas::threads`] minus one, the
/// caller being the other core.
///
/// Errors: workers were already started, or the system refused a thread.
pub fn start_workers(count: usize, spin: WorkerSpin) -> anyhow::Result<()> {
    let workers = Workers::new(count, spin)?;
    WORKERS.set(workers).map_err(|_| anyhow::anyhow!("start_workers: the workers of this process were already started"))
}

/// Whether this process's workers were started [`WorkerSpin::Hot`]: a split's parts start
/// within ~1 µs, so that smaller work pays for a split (`ops`' streaming elementwise ops).
pub(crate) fn workers_stay_hot() -> bool {
    WORKERS.get().is_some_and(|w| w.shared.spin == WorkerSpin::Hot)
}

/// `f(item)` for every item, results in order: the first item on the calling thread, the
/// others at once on the workers of [`start_workers`]; on scoped threads where none were
/// started, where there are more items than workers plus one, or where the workers are busy
/// (a split within a part of another split, or another thread's split). A panic in any part
/// is resumed on the caller once every part has finished.
///
/// Callers make each part's numbers independent of which thread computes it, so results
/// never depend on where the parts ran.
pub(crate) fn run_parts<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    match WORKERS.get() {
        Some(workers) => workers.run(items, f),
        None => run_scoped(items, f),
    }
}

/// `0..units` in at most `threads` contiguous, non-empty ranges of `units.div_ceil(threads)`
/// (the last shorter), in order; one empty range for no units.
pub(crate) fn even_ranges(units: usize, threads: usize) -> Vec<Range<usize>> {
    let per = units.div_ceil(threads.max(1)).max(1);
    let ranges: Vec<Range<usize>> = (0..units).step_by(per).map(|a| a..(a + per).min(units)).collect();
    if ranges.is_empty() {
        vec![Range { start: 0, end: 0 }]
    } else {
        ranges
    }
}

/// `work(from, to)` over `0..units` in at most `threads` contiguous ranges ([`even_ranges`],
/// [`run_parts`]): rows of elementwise ops, rows rounded for AMX ([`crate::runtime::amx`]).
pub(crate) fn split_units(units: usize, threads: usize, work: impl Fn(usize, usize) + Sync) {
    run_parts(even_ranges(units, threads), |r| work(r.start, r.end));
}

/// [`split_weighted`] by this process's speeds: the hand-written products' column panels
/// ([`crate::runtime::sgemm`], [`crate::runtime::amx`]).
pub(crate) fn split_balanced(units: usize, threads: usize, work: impl Fn(usize, usize) + Sync) {
    // The unit tests count the strided copies a thread's panels make (`sgemm`'s tests), which
    // depends on its range, and they start the process's workers: there the speeds stay equal
    // (the parts within one unit of each other).
    split_weighted(&SPEEDS, !cfg!(test), units, threads, work)
}

/// The parts of a split that [`Speeds`] keeps a speed for: part `i` runs on worker `i - 1`
/// (part 0 on the caller) whenever the workers take the split.
const SPEED_PARTS: usize = 8;

/// How far one reading moves a part's speed ([`Speeds::record`]): ~50 products (a tenth of a
/// grouped pass) make up most of the estimate, so it follows a core that slows for seconds,
/// while one product's reading moves a boundary by at most ~1% of the units.
const SPEED_STEP: f32 = 0.02;

/// Parts that ran shorter than this give no reading (a timer's and a wake-up's microseconds
/// would be most of it).
const SPEED_MIN_PART: Duration = Duration::from_micros(40);

/// How fast each part of a split ran its units, relative to part 0, as the natural log of
/// the ratio of units per second, learnt from the splits' timings ([`split_weighted`]). A
/// speed is a hint for sizing the next split's ranges: it never changes a value computed.
struct Speeds([AtomicU32; SPEED_PARTS]);

/// The products' speeds ([`split_balanced`]).
static SPEEDS: Speeds = Speeds::new();

impl Speeds {
    /// Every part as fast as part 0.
    const fn new() -> Self {
        Self([const { AtomicU32::new(0) }; SPEED_PARTS])
    }

    /// Part `i`'s log relative speed (an f32 kept in an `AtomicU32`).
    fn get(&self, i: usize) -> f32 {
        f32::from_bits(self.0[i].load(Ordering::Relaxed))
    }

    /// `0..units` in `threads` (at most [`SPEED_PARTS`]) contiguous ranges in order, each
    /// sized by its part's speed; some may be empty. With equal speeds, within one unit of each
    /// other.
    fn ranges(&self, units: usize, threads: usize) -> Vec<Range<usize>> {
        let weights: Vec<f32> = (0..threads).map(|i| self.get(i).exp()).collect();
        let total: f32 = weights.iter().sum();
        let (mut start, mut sum) = (0, 0.0);
        let mut ranges = Vec::with_capacity(threads);
        for (i, w) in weights.iter().enumerate() {
            sum += w;
            let end = if i + 1 == threads { units } else { ((units as f32 * sum / total).round() as usize).clamp(start, units) };
            ranges.push(start..end);
            start = end;
        }
        ranges
    }

    /// Moves each part's speed towards what one split measured: `(units, time)` per part.
    /// Parts shorter than [`SPEED_MIN_PART`] give no reading, and a reading is bounded to
    /// e^±1 (so is the estimate, an average of readings), so that a part interrupted mid-way
    /// moves it little.
    fn record(&self, timed: &[(usize, Duration)]) {
        let Some(&(len0, t0)) = timed.first() else { return };
        if len0 == 0 || t0 < SPEED_MIN_PART {
            return;
        }
        let rate0 = len0 as f32 / t0.as_secs_f32();
        for (i, &(len, t)) in timed.iter().enumerate().skip(1).take(SPEED_PARTS - 1) {
            if len == 0 || t < SPEED_MIN_PART {
                continue;
            }
            let reading = ((len as f32 / t.as_secs_f32()) / rate0).ln().clamp(-1.0, 1.0);
            let now = self.get(i);
            // one split updates a part at a time (the workers serve one split at once); a lost
            // update between two threads' splits costs one reading
            self.0[i].store((now + SPEED_STEP * (reading - now)).to_bits(), Ordering::Relaxed);
        }
    }
}

/// `work(from, to)` over `0..units` in at most `threads` contiguous ranges in order, like
/// [`split_units`], but each part's range sized by how fast that part's thread ran the
/// earlier splits (`speeds`): on a VM whose cores run at different speeds (this one's second
/// core read ~1.5x slower than the first in slow spells, and an even split left the first
/// waiting ~23% of its time), the slower core gets fewer units. Each range stays whole, as
/// the products' prefetching and copies expect. Which thread computes a unit changes with the
/// speeds, so callers compute each unit's values the same wherever it runs.
///
/// `threads` ranges (at most `units`; an empty one is not run), or [`split_units`]' even
/// split above [`SPEED_PARTS`] threads. The timings move `speeds` where `learn` is set and
/// the split ran on the workers of [`start_workers`]: a part on a scoped thread (no workers,
/// or busy ones: a split within another's part) says nothing of a core's speed.
fn split_weighted(speeds: &Speeds, learn: bool, units: usize, threads: usize, work: impl Fn(usize, usize) + Sync) {
    let threads = threads.clamp(1, units.max(1));
    if threads == 1 || threads > SPEED_PARTS {
        return split_units(units, threads, work);
    }
    let timed = run_parts(speeds.ranges(units, threads), |r| {
        let t = Instant::now();
        if !r.is_empty() {
            work(r.start, r.end);
        }
        (r.len(), t.elapsed(), ON_WORKER.get())
    });
    if learn && timed[1..].iter().all(|t| t.2) {
        speeds.record(&timed.iter().map(|&(len, t, _)| (len, t)).collect::<Vec<_>>());
    }
}

/// [`run_parts`] on scoped threads, one per item after the first.
fn run_scoped<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    if items.len() <= 1 {
        return items.into_iter().map(f).collect();
    }
    let mut items = items.into_iter();
    let first = items.next().expect("two items or more");
    thread::scope(|scope| {
        let f = &f;
        let others: Vec<_> = items.map(|item| scope.spawn(move || f(item))).collect();
        let mut out = Vec::with_capacity(others.len() + 1);
        out.push(f(first));
        out.extend(others.into_iter().map(|t| t.join().unwrap_or_else(|panic| resume_unwind(panic))));
        out
    })
}

/// How long a [`WorkerSpin::Hot`] worker checks for its next part before it parks. A parked
/// worker costs a futex wake to resume, on the critical path of the split that wakes it. A
/// step of one adapter on 128-token sequences has serial stretches of 0.05-1 ms between its
/// splits (the optimizer, candle's adds, small norms): with 50 µs the worker parked in most
/// of them and started its parts 8-12 µs late on average (timed per split, thirty-sixth
/// session); with 500 µs, ~1 µs, and that training ran ~4% faster (in-process alternation,
/// medians: 483.6 tokens/s at 50 µs over five runs, 501.3 at 500 µs over two, 503.6 at 1 ms
/// over five), grouped training unchanged (50 µs against 1 ms). Short enough that an idle
/// process gives its core back within a millisecond.
const WORKER_SPIN: Duration = Duration::from_micros(500);

/// How long a [`WorkerSpin::BesideBlas`] worker checks before it parks: OpenBLAS's threads
/// need the cores the workers spin on, right after the elementwise splits between products.
const WORKER_SPIN_BESIDE_BLAS: Duration = Duration::from_micros(50);

/// How long a caller checks that the workers finished before it calls `yield_now` between
/// checks instead (it never sleeps: the workers' parts are short, and the caller's core is
/// the one it would give up).
const CALLER_SPIN: Duration = Duration::from_micros(200);

/// Checks `ready` (with a `pause` between checks) for up to `budget`; whether it came true.
fn spin(budget: Duration, ready: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    loop {
        for _ in 0..64 {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() >= budget {
            return ready();
        }
    }
}

/// A part posted to one worker: the job (its lifetime erased, see [`Workers::run`]) and
/// which part of it.
type Posted = (*const (dyn Fn(usize) + Sync + 'static), usize);

/// One worker's mailbox. The caller writes `posted` then bumps `sequence`; the worker runs
/// it, then sets `finished` to that sequence.
struct Slot {
    sequence: AtomicUsize,
    finished: AtomicUsize,
    posted: UnsafeCell<Option<Posted>>,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `posted` is written only by the caller that holds `Workers::busy`, while its
// worker is idle (`finished == sequence`), and read by the worker only after it saw the
// bumped `sequence` (release / acquire); the job it points to outlives the wait for
// `finished` in `Workers::run`.
unsafe impl Sync for Slot {}
// SAFETY: as above; the raw pointer is only dereferenced under that protocol.
unsafe impl Send for Slot {}

struct Shared {
    slots: Vec<Slot>,
    stop: AtomicBool,
    spin: WorkerSpin,
}

/// Worker threads parked between splits (after a short spin), each with its own mailbox.
struct Workers {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// A split is using the workers.
    busy: AtomicBool,
}

impl Workers {
    fn new(count: usize, spin: WorkerSpin) -> anyhow::Result<Self> {
        let slots = (0..count)
            .map(|_| Slot {
                sequence: AtomicUsize::new(0),
                finished: AtomicUsize::new(0),
                posted: UnsafeCell::new(None),
                panic: Mutex::new(None),
            })
            .collect();
        let shared = Arc::new(Shared { slots, stop: AtomicBool::new(false), spin });
        // built before the spawns, so that the ones started are stopped if a later one fails
        let mut workers = Self { shared, threads: Vec::with_capacity(count), busy: AtomicBool::new(false) };
        for i in 0..count {
            let shared = Arc::clone(&workers.shared);
            let thread = thread::Builder::new()
                .name(format!("selfedit-worker-{i}"))
                .spawn(move || work(&shared, i))
                .map_err(|e| anyhow::anyhow!("start_workers: could not start worker thread {i} of {count}: {e}"))?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// [`run_parts`] on these workers.
    fn run<T: Send, R: Send>(&self, items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
        let parts = items.len();
        if parts <= 1 {
            return items.into_iter().map(f).collect();
        }
        if parts - 1 > self.threads.len() || self.busy.swap(true, Ordering::Acquire) {
            return run_scoped(items, f);
        }
        // Each part takes its item and leaves its result in its own cell.
        let cells: Vec<Mutex<(Option<T>, Option<R>)>> = items.into_iter().map(|item| Mutex::new((Some(item), None))).collect();
        let part = |i: usize| {
            let item = cells[i].lock().unwrap_or_else(|p| p.into_inner()).0.take().expect("each part runs once");
            let result = f(item);
            cells[i].lock().unwrap_or_else(|p| p.into_inner()).1 = Some(result);
        };
        let job: &(dyn Fn(usize) + Sync) = &part;
        // SAFETY: only the lifetime is erased; this function waits below for every worker it
        // posted to, panics included, before `part` goes out of scope.
        let job: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(job) };
        let slots = &self.shared.slots[..parts - 1];
        let mut targets = Vec::with_capacity(slots.len());
        for (i, (slot, thread)) in slots.iter().zip(&self.threads).enumerate() {
            // SAFETY: this caller holds `busy` and the worker finished its last part
            // (`finished == sequence`, waited for by the previous holder), so nothing reads
            // `posted` now.
            unsafe { *slot.posted.get() = Some((job, i + 1)) };
            targets.push(slot.sequence.fetch_add(1, Ordering::Release) + 1);
            thread.thread().unpark();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| part(0)));
        for (slot, &target) in slots.iter().zip(&targets) {
            let done = || slot.finished.load(Ordering::Acquire) == target;
            if !spin(CALLER_SPIN, done) {
                while !done() {
                    thread::yield_now();
                }
            }
        }
        // every worker's panic is taken, so none is left for a later split to find
        let panics: Vec<Box<dyn Any + Send>> =
            slots.iter().filter_map(|slot| slot.panic.lock().unwrap_or_else(|p| p.into_inner()).take()).collect();
        self.busy.store(false, Ordering::Release);
        if let Err(panic) = mine {
            resume_unwind(panic);
        }
        if let Some(panic) = panics.into_iter().next() {
            resume_unwind(panic);
        }
        cells.into_iter().map(|c| c.into_inner().unwrap_or_else(|p| p.into_inner()).1.expect("every part ran")).collect()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

thread_local! {
    /// This thread is one of the workers of [`start_workers`] (or of a [`Workers`] a test made).
    static ON_WORKER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Worker `index`'s loop: wait for a part (spinning, then parked), run it, report it.
fn work(shared: &Shared, index: usize) {
    ON_WORKER.set(true);
    let slot = &shared.slots[index];
    let spin_for = match shared.spin {
        WorkerSpin::Hot => WORKER_SPIN,
        WorkerSpin::BesideBlas => WORKER_SPIN_BESIDE_BLAS,
    };
    let mut seen = 0;
    loop {
        let ready = || slot.sequence.load(Ordering::Acquire) != seen || shared.stop.load(Ordering::Acquire);
        if !spin(spin_for, ready) {
            while !ready() {
                thread::park();
            }
        }
        let sequence = slot.sequence.load(Ordering::Acquire);
        if sequence == seen {
            return; // stopped
        }
        // SAFETY: the caller wrote `posted` before bumping `sequence` (acquired above) and
        // does not touch it again until `finished` reaches `sequence`; the job outlives that.
        let (job, part) = unsafe { (*slot.posted.get()).expect("a part is posted with its sequence") };
        // SAFETY: as above, the job is alive until `finished` is set.
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(part) })) {
            *slot.panic.lock().unwrap_or_else(|p| p.into_inner()) = Some(panic);
        }
        seen = sequence;
        slot.finished.store(sequence, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_ranges_cover_in_order() {
        assert_eq!(even_ranges(10, 3), [0..4, 4..8, 8..10]);
        assert_eq!(even_ranges(5, 4), [0..2, 2..4, 4..5]);
        assert_eq!(even_ranges(3, 8), [0..1, 1..2, 2..3]);
        assert_eq!(even_ranges(7, 1), vec![Range { start: 0, end: 7 }]);
        assert_eq!(even_ranges(0, 2), vec![Range { start: 0, end: 0 }]);
    }

    /// Parts run on the caller and the workers, results in order, many times over (each
    /// split reusing the mailboxes); more parts than workers, and a split within a part
    /// (on scoped threads), still run every part once.
    #[test]
    fn workers_run_every_part_once_in_order() {
        let workers = Workers::new(2, WorkerSpin::Hot).unwrap();
        let caller = thread::current().id();
        // by name, and as `split_weighted` tells the workers' parts from scoped threads'
        let on_worker = || {
            let named = thread::current().name().is_some_and(|n| n.starts_with("selfedit-worker-"));
            assert_eq!(ON_WORKER.get(), named, "a worker's flag against its name");
            named
        };
        for round in 0..2000 {
            let items: Vec<usize> = (0..3).map(|i| round * 3 + i).collect();
            let out = workers.run(items, |x| (x * x, thread::current().id(), on_worker()));
            assert_eq!(out.iter().map(|o| o.0).collect::<Vec<_>>(), (0..3).map(|i| (round * 3 + i) * (round * 3 + i)).collect::<Vec<_>>());
            assert_eq!(out[0].1, caller);
            assert!(out[1..].iter().all(|o| o.2), "round {round}: a part after the first ran off the workers");
            assert_ne!(out[1].1, out[2].1, "round {round}: two parts on one worker");
        }
        let many = workers.run((0..7).collect(), |x: usize| x + 1);
        assert_eq!(many, (1..8).collect::<Vec<_>>());
        let nested = workers.run(vec![10usize, 20], |x| workers.run(vec![x, x + 1], |y| y * 2));
        assert_eq!(nested, [vec![20, 22], vec![40, 42]]);
    }

    /// Weighted ranges start even, follow a part that runs its units at half the speed of
    /// part 0 (it ends with a third of them), ignore parts too short to time, and come back
    /// once the speeds are equal again; on threads they cover every unit once.
    #[test]
    fn weighted_ranges_follow_the_parts_speeds() {
        let speeds = Speeds::new();
        assert_eq!(speeds.ranges(18, 2), [0..9, 9..18]);
        assert_eq!(speeds.ranges(10, 3), [0..3, 3..7, 7..10]);
        let us = Duration::from_micros;
        for _ in 0..400 {
            let r = speeds.ranges(1536, 2);
            // part 1 takes 2 µs a unit, part 0 1 µs
            speeds.record(&[(r[0].len(), us(r[0].len() as u64)), (r[1].len(), us(2 * r[1].len() as u64))]);
        }
        let r = speeds.ranges(1536, 2);
        assert!((1000..=1048).contains(&r[0].end), "part 0 of two, the other half as fast: {r:?}");
        assert_eq!(speeds.ranges(18, 2), [0..12, 12..18]);
        // too short to time: no reading
        let before = speeds.get(1);
        speeds.record(&[(9, us(10)), (9, us(1000))]);
        assert_eq!(speeds.get(1), before);
        for _ in 0..400 {
            let r = speeds.ranges(1536, 2);
            speeds.record(&[(r[0].len(), us(r[0].len() as u64)), (r[1].len(), us(r[1].len() as u64))]);
        }
        assert_eq!(speeds.ranges(18, 2), [0..9, 9..18]);
        for (units, threads) in [(0, 2), (1, 2), (5, 8), (18, 2), (1536, 3), (7, 1), (9, 12)] {
            let seen: Vec<AtomicUsize> = (0..units).map(|_| AtomicUsize::new(0)).collect();
            split_weighted(&speeds, true, units, threads, |from, to| {
                seen[from..to].iter().for_each(|s| _ = s.fetch_add(1, Ordering::Relaxed));
            });
            assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1), "{units} units over {threads}: a unit ran twice or never");
        }
    }

    /// Dropping the workers stops and joins their threads (each holds the shared mailboxes).
    #[test]
    fn dropped_workers_stop() {
        let workers = Workers::new(2, WorkerSpin::Hot).unwrap();
        assert_eq!(workers.run(vec![1, 2, 3], |x: i32| -x), [-1, -2, -3]);
        let shared = Arc::downgrade(&workers.shared);
        drop(workers);
        assert!(shared.upgrade().is_none(), "a worker thread still holds the mailboxes");
    }

    /// The process's workers: started once (a second start is refused), then every split
    /// runs its later parts on them.
    #[test]
    fn started_workers_take_the_splits() {
        // another test of this process may have started them first; either way they run
        let _ = start_workers(1, WorkerSpin::Hot);
        assert!(start_workers(1, WorkerSpin::Hot).is_err(), "a second start is refused");
        // a test running beside this one may hold the workers for a moment (then scoped threads)
        let on_worker =
            || run_parts(vec![0, 1], |_: i32| thread::current().name().map(str::to_owned))[1].as_deref() == Some("selfedit-worker-0");
        assert!((0..1000).any(|_| on_worker()), "no split ran on the started worker");
    }

    /// A panic in a worker's part reaches the caller after the split, and the workers serve
    /// the next split.
    #[test]
    fn a_part_that_panics_is_resumed_on_the_caller() {
        let workers = Workers::new(1, WorkerSpin::BesideBlas).unwrap();
        let got = catch_unwind(AssertUnwindSafe(|| workers.run(vec![0, 1], |x: i32| if x == 1 { panic!("part {x}") } else { x })));
        let message = got.unwrap_err();
        assert_eq!(message.downcast_ref::<String>().map(String::as_str), Some("part 1"));
        assert_eq!(workers.run(vec![3, 4], |x: i32| x * 10), [30, 40]);
        // every part panics: the caller's panic is resumed, and the workers' are not left for
        // the next split
        let workers = Workers::new(2, WorkerSpin::Hot).unwrap();
        let all = catch_unwind(AssertUnwindSafe(|| workers.run(vec![0, 1, 2], |x: i32| -> i32 { panic!("part {x}") })));
        assert_eq!(all.unwrap_err().downcast_ref::<String>().map(String::as_str), Some("part 0"));
        assert_eq!(workers.run(vec![5, 6, 7], |x: i32| x + 1), [6, 7, 8]);
    }
}
