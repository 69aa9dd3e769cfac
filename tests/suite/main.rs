//! The integration suite as one test binary: each module was its own binary, and linking each
//! (thin LTO, release) cost 20-30 s of CI's build; together they link once. The wgpu and CUDA
//! suites stay apart (their features), and so does decode_allocations (its counting allocator is
//! the whole process's).

#[path = "../common/mod.rs"]
mod common;

mod activations;
mod checkpoint_errors;
mod cli;
mod cli_props;
mod convert_safety;
mod diagnostics;
mod dtype_accuracy;
mod embeddings;
mod engine;
mod eval_parity;
mod formats;
mod fuzz_regressions;
mod generation_parity;
mod hub;
mod model_parity;
mod prefix_cache;
mod real_weights;
mod real_weights_eval;
mod server;
mod server_expose;
mod server_fields;
mod server_prefix_cache;
mod server_robustness;
mod server_structured;
mod sites;
mod structured;
mod tokenizer;
