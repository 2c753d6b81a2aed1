//! Writes one content hash per stage under OUTPUTS/NAME/stamps/, touching only those that
//! changed, so `make` reruns exactly the stages whose settings changed.
use clap::Parser;
use selfedit::stage::{self, StageArgs};

#[derive(Parser)]
#[command(about = "Stamp the config: one hash file per stage")]
struct Cli {
    #[command(flatten)]
    stage: StageArgs,
}

fn main() -> anyhow::Result<()> {
    stage::init_logging();
    let cli = Cli::parse();
    let exp = cli.stage.experiment()?;
    let dir = cli.stage.exp_dir(&exp).join("stamps");
    let changed = stage::write_stamps(&exp, &dir)?;
    if !changed.is_empty() {
        println!("stamp: settings changed for {}", changed.join(", "));
    }
    Ok(())
}
