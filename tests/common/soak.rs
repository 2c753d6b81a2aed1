//! The random-kill soak: `make iterations` SIGKILLed (make's whole process group) at random
//! moments, resumed with `make` after each kill, then compared with an uninterrupted run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use rand::{Rng, SeedableRng};

/// What a soak found.
pub struct SoakReport {
    /// Kills made (a run that finished before its moment came is not killed).
    pub kills: usize,
    pub wanted: usize,
    /// Tables that differ from the uninterrupted run's (data; provenance, times and paths aside).
    pub differing: Vec<String>,
    /// Finished work (a table, an adapter, a generator) written again after a kill.
    pub redone: Vec<String>,
}

impl SoakReport {
    pub fn line(&self) -> String {
        format!(
            "kills survived: {}/{}, tables identical: {}, work redone: {}",
            self.kills,
            self.wanted,
            if self.differing.is_empty() { "yes".to_string() } else { format!("no ({})", self.differing.join(", ")) },
            if self.redone.is_empty() { "none".to_string() } else { self.redone.join(", ") }
        )
    }
}

/// Every finished piece of work under `exp` and when it was written: tables, adapter records,
/// generator configs (temporary files, hidden, are not finished work).
fn finished_work(exp: &Path) -> BTreeMap<PathBuf, SystemTime> {
    let mut out = BTreeMap::new();
    let mut stack = vec![exp.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if name.ends_with(".parquet") || name == "train_record.json" || (name == "config.json" && dir.ends_with("generator")) {
                if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                    out.insert(p.strip_prefix(exp).unwrap().to_path_buf(), t);
                }
            }
        }
    }
    out
}

/// Runs `make()` with `kills` SIGKILLs at moments drawn from `seed` (uniform over
/// `duration`, the uninterrupted run's), resuming after each, then to the end; compares
/// every table of `exp` with `reference` (an uninterrupted run's experiment folder).
pub fn soak(make: &dyn Fn() -> Command, exp: &Path, reference: &Path, kills: usize, seed: u64, duration: Duration) -> SoakReport {
    use std::os::unix::process::CommandExt;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut done = 0;
    let mut seen: BTreeMap<PathBuf, SystemTime> = BTreeMap::new();
    let mut redone = Vec::new();
    // moments spread over the whole run: sorted uniform draws over its duration; each run is
    // killed after the gap to the next one (work redone after a resume comes on top)
    let mut moments: Vec<f64> = (0..kills).map(|_| rng.random_range(0.0..duration.as_secs_f64())).collect();
    moments.sort_by(f64::total_cmp);
    let gaps: Vec<f64> = moments.iter().scan(0.0, |prev, &m| Some(m - std::mem::replace(prev, m))).collect();
    for gap in gaps {
        let at = Duration::from_secs_f64(gap.max(0.3));
        let mut child = make().stdout(Stdio::null()).stderr(Stdio::null()).process_group(0).spawn().unwrap();
        let start = Instant::now();
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "make failed between kills");
                break true;
            }
            if start.elapsed() >= at {
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if finished {
            break;
        }
        let pgid = child.id();
        assert!(Command::new("kill").args(["-s", "KILL", "--", &format!("-{pgid}")]).status().unwrap().success());
        let _ = child.wait();
        done += 1;
        // what was finished at this kill must not be written again
        for (p, t) in finished_work(exp) {
            seen.entry(p).or_insert(t);
        }
    }
    let out = make().output().unwrap();
    assert!(out.status.success(), "make after the last kill failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let now = finished_work(exp);
    for (p, t) in &seen {
        if now.get(p) != Some(t) {
            redone.push(p.display().to_string());
        }
    }
    let want = finished_work(reference);
    let skip = ["seconds", "adapter_path"];
    let mut differing = Vec::new();
    // the tables `make iterations` writes (the reference may hold more, e.g. the report's)
    let made_by_iterations =
        |p: &Path| p.starts_with("articles.parquet") || p.iter().next().is_some_and(|c| c.to_string_lossy().starts_with("iter"));
    for p in want.keys().filter(|p| p.extension().is_some_and(|e| e == "parquet") && made_by_iterations(p)) {
        let ours = exp.join(p);
        if !ours.exists() || super::table_digest(&ours, &skip) != super::table_digest(&reference.join(p), &skip) {
            differing.push(p.display().to_string());
        }
    }
    SoakReport { kills: done, wanted: kills, differing, redone }
}
