//! Writes one content hash per stage under OUTPUTS/NAME/stamps/, touching only those that
//! changed, so `make` reruns exactly the stages whose settings changed.
mod common;

common::stage_main!(unlocked "Stamp the config: one hash file per stage", [], |ctx, _cli| {
    let changed = selfedit::experiment::cli::write_stamps(&ctx.exp, &ctx.layout)?;
    if !changed.is_empty() {
        println!("stamp: settings changed for {}", changed.iter().map(|s| s.name()).collect::<Vec<_>>().join(", "));
    }
    Ok(())
});
