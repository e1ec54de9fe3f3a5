//! Writes the agent's CustomResourceDefinitions to `crds/` (one file per CRD),
//! or prints them as a multi-document stream with `--stdout`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Generate the configbutler.ai CustomResourceDefinitions")]
struct Args {
    /// Directory to write `<group>_<plural>.yaml` files into.
    #[arg(long, env = "CRDGEN_OUT_DIR", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds"))]
    out_dir: PathBuf,
    /// Print all CRDs to stdout (separated by `---`) instead of writing files.
    #[arg(long)]
    stdout: bool,
}

fn main() -> anyhow::Result<()> {
    let Args { out_dir, stdout } = Args::parse();
    let crds = reverser_agent::crd::generated_crds().context("rendering CRDs")?;
    if stdout {
        let docs: Vec<&str> = crds.iter().map(|c| c.yaml.as_str()).collect();
        print!("{}", docs.join("---\n"));
        return Ok(());
    }
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    for crd in &crds {
        let path = out_dir.join(&crd.file_name);
        std::fs::write(&path, &crd.yaml).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
