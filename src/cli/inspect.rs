//! `gpt2 inspect`: what a checkpoint holds.

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::{print_json, ModelArg};

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Print one JSON object: config, parameters, tensors.
    #[arg(long)]
    json: bool,
}

pub fn run(a: InspectArgs) -> Result<()> {
    let dir = a.model.dir()?;
    let opened = gpt2::weights::open(&dir)?;
    let (config, ck) = (opened.config, opened.checkpoint);
    let tensors = ck.tensor_infos();
    // As transformers counts: the tied matrix once; an untied lm_head is a parameter of its own.
    let untied_head =
        ck.contains("lm_head.weight") && !ck.same_data("lm_head.weight", "wte.weight");
    let parameters = config.parameter_count()
        + if untied_head {
            config.vocab_size * config.n_embd
        } else {
            0
        };
    if a.json {
        return print_json(&json!({
            "model": dir.display().to_string(),
            "format": opened.format.name(),
            "config": config,
            "parameters": parameters,
            "tensors": tensors,
        }));
    }
    let c = &config;
    println!("model        {} ({})", dir.display(), opened.format.name());
    for p in ck.paths() {
        println!("file         {}", p.display());
    }
    println!(
        "config       n_layer {}, n_embd {}, n_head {} (head_dim {}), n_inner {}, n_positions {}, vocab_size {}",
        c.n_layer, c.n_embd, c.n_head, c.head_dim(), c.n_inner, c.n_positions, c.vocab_size
    );
    println!(
        "             activation {}, layer_norm_epsilon {:e}, scale_attn_by_inverse_layer_idx {}, reorder_and_upcast_attn {}",
        c.activation_function.name(), c.layer_norm_epsilon, c.scale_attn_by_inverse_layer_idx, c.reorder_and_upcast_attn
    );
    println!(
        "parameters   {parameters} ({:.1}M){}",
        parameters as f64 / 1e6,
        if untied_head { ", untied lm_head" } else { "" }
    );
    println!("tensors      {}", tensors.len());
    let width = tensors.iter().map(|t| t.name.len()).max().unwrap_or(0);
    for t in &tensors {
        println!("  {:width$}  {:5} {:?}", t.name, t.dtype, t.shape);
    }
    Ok(())
}
