//! Writes one content hash per stage under OUTPUTS/NAME/stamps/, touching only those that
//! changed, so `make` reruns exactly the stages whose settings changed.
mod common;

use clap::Parser;
use selfedit::experiment::cli::{write_stamps, StageArgs, StageContext};

#[derive(Parser)]
#[command(about = "Stamp the config: one hash file per stage")]
struct Cli {
    #[command(flatten)]
    stage: StageArgs,
}

fn main() -> anyhow::Result<()> {
    common::init();
    let cli = Cli::parse();
    let ctx = StageContext::open(&cli.stage)?;
    let changed = write_stamps(&ctx.exp, &ctx.layout)?;
    if !changed.is_empty() {
        println!("stamp: settings changed for {}", changed.iter().map(|s| s.name()).collect::<Vec<_>>().join(", "));
    }
    Ok(())
}
