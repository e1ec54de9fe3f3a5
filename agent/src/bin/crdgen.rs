//! Writes the agent's CustomResourceDefinitions to `crds/` (one file per CRD),
//! or prints them as a multi-document stream with `--stdout`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Generate the configbutler.ai CustomResourceDefinitions")]
struct Args {
    /// Directory to write `<group>_<plural>.yaml` files into; default: `crds/` of the checkout `cargo run`
    /// runs in (taken from `CARGO_MANIFEST_DIR` at run time: a shared build cache may hold a binary built in
    /// another checkout).
    #[arg(long, env = "CRDGEN_OUT_DIR")]
    out_dir: Option<PathBuf>,
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
    let out_dir = match out_dir {
        Some(dir) => dir,
        None => std::env::var_os("CARGO_MANIFEST_DIR")
            .map(|agent| PathBuf::from(agent).join("../crds"))
            .context("--out-dir is needed outside `cargo run -p reverser-agent --bin crdgen`")?,
    };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    for crd in &crds {
        let path = out_dir.join(&crd.file_name);
        std::fs::write(&path, &crd.yaml).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
