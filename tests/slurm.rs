//! `make pipeline SCHEDULER=slurm SHARDS=2` against a real single-node Slurm started for the
//! test (scripts/slurm/cluster.sh: Debian's slurmctld, slurmd and munge in a temporary
//! folder): the tables equal a local run's; an array task cancelled while it runs (held there
//! by a gate in front of `train-adapters`) fails the run with its log named, and `make` again
//! resubmits only that shard. The daemons are stopped by their PIDs when the test ends, also
//! when it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A running test cluster; dropping it stops the daemons.
struct Cluster {
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let port = 7200 + 2 * (std::process::id() % 200);
        let out =
            Command::new(root().join("scripts/slurm/cluster.sh")).arg("start").arg(dir.path()).arg(port.to_string()).output().unwrap();
        assert!(out.status.success(), "the cluster did not start: {}", String::from_utf8_lossy(&out.stderr));
        Cluster { dir }
    }
    fn conf(&self) -> PathBuf {
        self.dir.path().join("slurm.conf")
    }
    fn squeue(&self, args: &[&str]) -> String {
        let out = Command::new("squeue").env("SLURM_CONF", self.conf()).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(root().join("scripts/slurm/cluster.sh")).arg("stop").arg(self.dir.path()).status();
    }
}

fn make(outputs: &Path, bin: &Path, extra: &[&str], conf: Option<&Path>) -> Command {
    let mut c = Command::new("make");
    c.current_dir(root())
        .args(["--no-print-directory", "pipeline", "CONFIG=configs/tiny.toml", "BUILD="])
        .arg(format!("OUTPUTS={}", outputs.display()))
        .arg(format!("BIN={}", bin.display()))
        .args(extra);
    if let Some(conf) = conf {
        c.env("SLURM_CONF", conf);
    }
    c
}

/// The folder of the built binaries.
fn built() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_stamp")).parent().unwrap().to_path_buf()
}

/// A BIN folder for the Slurm runs: links to the built binaries, except that `train-adapters`
/// is a script which, in array task 1, touches `started` and waits until `release` exists. The
/// test cancels that task while it waits, so the cancel cannot come after the shard's table
/// was written (the tiny stage takes well under a second: cancelling "a running task" raced it).
fn gated_bin(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for e in std::fs::read_dir(built()).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if e.file_type().unwrap().is_file() && name != "train-adapters" {
            std::os::unix::fs::symlink(e.path(), bin.join(&name)).unwrap();
        }
    }
    let (started, release) = (dir.join("started"), dir.join("release"));
    let script = format!(
        "#!/bin/sh\nif [ \"${{SLURM_ARRAY_TASK_ID:-}}\" = 1 ] && [ ! -e '{release}' ]; then\n  touch '{started}'\n  while [ ! -e '{release}' ]; do sleep 0.1; done\nfi\nexec '{real}' \"$@\"\n",
        release = release.display(),
        started = started.display(),
        real = built().join("train-adapters").display()
    );
    let gate = bin.join("train-adapters");
    std::fs::write(&gate, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&gate, std::fs::Permissions::from_mode(0o755)).unwrap();
    (bin, started, release)
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

use common::ITER0_TABLES as TABLES;

#[test]
fn slurm_runs_equal_local_runs_and_resubmit_only_missing_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let (local, slurm) = (tmp.path().join("local"), tmp.path().join("slurm"));
    // 1. the reference: a local run
    let out = make(&local, &built(), &[], None).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // 2. the same on Slurm with two shards; training task 1 is cancelled while it runs
    let (bin, started, release) = gated_bin(tmp.path());
    let cluster = Cluster::start();
    let mut child = make(&slurm, &bin, &["SCHEDULER=slurm", "SHARDS=2"], Some(&cluster.conf()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let cancelled = loop {
        // array tasks show as <array>_<task>
        let running = cluster.squeue(&["-h", "-n", "selfedit-tiny-iter0-train-adapters", "-t", "R", "-o", "%i"]);
        let task1 = running.lines().map(str::trim).find(|l| l.ends_with("_1"));
        if let (Some(id), true) = (task1, started.exists()) {
            let st = Command::new("scancel").env("SLURM_CONF", cluster.conf()).arg(id).status().unwrap();
            assert!(st.success());
            break id.to_string();
        }
        assert!(child.try_wait().unwrap().is_none(), "make ended before training shard 1 ran");
        assert!(start.elapsed() < Duration::from_secs(600), "training shard 1 never ran");
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().unwrap();
    let log = text(&out);
    assert!(!out.status.success(), "make succeeded although task {cancelled} was cancelled:\n{log}");
    assert!(log.contains("task 1 of job") && log.contains("CANCELLED") && log.contains("logs/tiny-iter0-train-adapters-"), "{log}");
    let it = slurm.join("tiny/iter0");
    let shard0 = it.join("adapters.shard-0-of-2.parquet");
    assert!(shard0.exists() && !it.join("adapters.shard-1-of-2.parquet").exists(), "{log}");
    let shard0_time = std::fs::metadata(&shard0).unwrap().modified().unwrap();

    // 3. make again: only shard 1 is submitted; the run finishes
    std::fs::write(&release, "").unwrap();
    let out = make(&slurm, &bin, &["SCHEDULER=slurm", "SHARDS=2"], Some(&cluster.conf())).output().unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("train-adapters shards 1 of 2 as array job"), "only shard 1 is resubmitted:\n{log}");
    assert!(!log.contains("generate-templates as job") && !log.contains("synthesize as job"), "earlier stages reran:\n{log}");
    assert_eq!(std::fs::metadata(&shard0).unwrap().modified().unwrap(), shard0_time, "shard 0 was redone");

    // 4. the tables equal the local run's (rows of sharded stages in any order)
    for t in TABLES {
        let skip = ["seconds", "adapter_path"];
        assert_eq!(
            common::table_digest_unordered(&slurm.join("tiny").join(t), &skip),
            common::table_digest_unordered(&local.join("tiny").join(t), &skip),
            "{t} differs between the Slurm and the local run"
        );
    }
    // every job of the experiment has left the queue
    assert!(!cluster.squeue(&["-h", "-o", "%j"]).contains("selfedit-tiny"));
}
