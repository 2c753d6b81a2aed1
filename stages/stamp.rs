//! Writes one content hash per stage under OUTPUTS/NAME/stamps/, touching only those that
//! changed, so `make` reruns exactly the stages whose settings changed.
mod common;

#[derive(clap::Args)]
struct StampDir {
    /// Write the hashes in this folder instead of the experiment's stamps/ (make's dry runs
    /// stamp a copy there, so `make -n` changes nothing)
    #[arg(long, value_name = "DIR")]
    into: Option<std::path::PathBuf>,
}

common::stage_main!(unlocked "Stamp the config: one hash file per stage", [dir: StampDir], |ctx, cli| {
    let changed = selfedit::experiment::cli::write_stamps(&ctx.exp, &ctx.layout, cli.dir.into.as_deref())?;
    if !changed.is_empty() {
        println!("stamp: settings changed for {}", changed.iter().map(|s| s.name()).collect::<Vec<_>>().join(", "));
    }
    Ok(())
});
