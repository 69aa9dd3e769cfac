//! `gpt2 inspect`: what a checkpoint holds.

use anyhow::{bail, Result};
use clap::Args;
use gpt2::{Checkpoint, GPT2Config, TensorInfo};
use serde_json::json;

use super::{print_json, ModelArg};

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Print one JSON object: config, parameters, tensors.
    #[arg(long)]
    json: bool,
    /// List the devices a model can run on (`--device` names) instead of reading a model.
    #[arg(long)]
    devices: bool,
}

pub fn run(a: InspectArgs) -> Result<()> {
    if a.devices {
        return devices(a.json);
    }
    let dir = a.model.dir()?;
    let opened = gpt2::weights::open(&dir)?;
    let (config, ck) = (opened.config, opened.checkpoint);
    let tensors = ck.tensor_infos();
    check_tensors(&config, &ck, &tensors)?;
    // As transformers counts: the tied matrix once; an untied lm_head is a parameter of its own.
    let untied_head =
        ck.contains("lm_head.weight") && !ck.same_data("lm_head.weight", "wte.weight");
    // Fits: the tensors hold this many numbers (check_tensors), and they are in memory-mapped files.
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
    outln!("model        {} ({})", dir.display(), opened.format.name());
    for p in ck.paths() {
        outln!("file         {}", p.display());
    }
    outln!(
        "config       n_layer {}, n_embd {}, n_head {} (head_dim {}), n_inner {}, n_positions {}, vocab_size {}",
        c.n_layer, c.n_embd, c.n_head, c.head_dim(), c.n_inner, c.n_positions, c.vocab_size
    );
    outln!(
        "             activation {}, layer_norm_epsilon {:e}, scale_attn_by_inverse_layer_idx {}, reorder_and_upcast_attn {}",
        c.activation_function.name(), c.layer_norm_epsilon, c.scale_attn_by_inverse_layer_idx, c.reorder_and_upcast_attn
    );
    outln!(
        "parameters   {parameters} ({:.1}M){}",
        parameters as f64 / 1e6,
        if untied_head { ", untied lm_head" } else { "" }
    );
    outln!("tensors      {}", tensors.len());
    let width = tensors.iter().map(|t| t.name.len()).max().unwrap_or(0);
    for t in &tensors {
        outln!("  {:width$}  {:5} {:?}", t.name, t.dtype, t.shape);
    }
    Ok(())
}

/// `--devices`: the CPU, and each wgpu adapter as `gpu:N` numbers it (or why there are none).
fn devices(json: bool) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (adapters, note) = match gpt2::internal::wgpu_adapters() {
        Ok(list) if list.is_empty() => (list, Some("no wgpu adapter found: install a GPU driver, or Mesa's lavapipe (apt-get install mesa-vulkan-drivers)".to_owned())),
        Ok(list) => (list, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    if json {
        return print_json(&json!({
            "cpu": { "device": "cpu", "threads": cores },
            "wgpu": adapters,
            "note": note,
        }));
    }
    outln!("cpu    {cores} threads");
    for a in &adapters {
        outln!("{a}");
    }
    if let Some(n) = note {
        outln!("(wgpu: {n})");
    }
    Ok(())
}

/// The tensors a GPT-2 of this config has (normalised names, shapes), as loading reads them.
fn expected(c: &GPT2Config) -> Vec<(String, Vec<usize>)> {
    let (e, f, v) = (c.n_embd, c.n_inner, c.vocab_size);
    let mut out = vec![
        ("wte.weight".to_owned(), vec![v, e]),
        ("wpe.weight".to_owned(), vec![c.n_positions, e]),
        ("ln_f.weight".to_owned(), vec![e]),
        ("ln_f.bias".to_owned(), vec![e]),
    ];
    for i in 0..c.n_layer {
        for (name, shape) in [
            ("ln_1.weight", vec![e]),
            ("ln_1.bias", vec![e]),
            ("attn.c_attn.weight", vec![e, 3 * e]),
            ("attn.c_attn.bias", vec![3 * e]),
            ("attn.c_proj.weight", vec![e, e]),
            ("attn.c_proj.bias", vec![e]),
            ("ln_2.weight", vec![e]),
            ("ln_2.bias", vec![e]),
            ("mlp.c_fc.weight", vec![e, f]),
            ("mlp.c_fc.bias", vec![f]),
            ("mlp.c_proj.weight", vec![f, e]),
            ("mlp.c_proj.bias", vec![e]),
        ] {
            out.push((format!("h.{i}.{name}"), shape));
        }
    }
    out
}

/// The checks loading makes, without reading the data: every tensor the config implies is present
/// with its shape, and nothing else is there. A config that disagrees with its tensors (n_layer 10^6
/// on a 2-layer file) would otherwise be described, and counted, as if it were true.
fn check_tensors(config: &GPT2Config, ck: &Checkpoint, tensors: &[TensorInfo]) -> Result<()> {
    let files: Vec<String> = ck.paths().map(|p| p.display().to_string()).collect();
    let files = files.join(", ");
    // Compare counts first: the list of expected names is only built when it is as short as the
    // file's (n_layer can be 10^17).
    let layers_in_file = tensors
        .iter()
        .filter_map(|t| {
            t.name
                .strip_prefix("h.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |l| l + 1);
    if layers_in_file != config.n_layer {
        bail!(
            "config.json says n_layer {}, but the checkpoint {files} holds {layers_in_file} layers",
            config.n_layer
        );
    }
    let want = expected(config);
    for (name, shape) in &want {
        match tensors.iter().find(|t| &t.name == name) {
            None => bail!("checkpoint {files}, tensor `{name}`: missing (expected shape {shape:?} from config.json)"),
            Some(t) if &t.shape != shape => bail!(
                "checkpoint {files}, tensor `{name}`: shape {:?}, but config.json implies {shape:?}",
                t.shape
            ),
            Some(_) => {}
        }
    }
    let vocab_shape = [config.vocab_size, config.n_embd];
    for t in tensors {
        let known = want.iter().any(|(n, _)| *n == t.name)
            || (t.name == "lm_head.weight" && t.shape == vocab_shape);
        if !known {
            bail!(
                "checkpoint {files}, tensor `{}`: unexpected (shape {:?}) for a GPT-2 of this config",
                t.name,
                t.shape
            );
        }
    }
    Ok(())
}
