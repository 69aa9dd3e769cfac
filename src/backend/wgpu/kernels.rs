//! The WGSL kernels: one module per kernel, each the shared prelude (`common.wgsl`), the weights'
//! storage where the kernel reads weight matrices, and its own body; compiled once per model.

use crate::dtype::DType;

const COMMON: &str = include_str!("shaders/common.wgsl");
const EMBED: &str = include_str!("shaders/embed.wgsl");
const LAYER_NORM: &str = include_str!("shaders/layer_norm.wgsl");
const EPILOGUE: &str = include_str!("shaders/epilogue.wgsl");
const MATMUL: &str = include_str!("shaders/matmul.wgsl");
const MATVEC: &str = include_str!("shaders/matvec.wgsl");
const KV_WRITE: &str = include_str!("shaders/kv_write.wgsl");
const ATTENTION: &str = include_str!("shaders/attention.wgsl");
const SCORE: &str = include_str!("shaders/score.wgsl");

/// How a kernel reads weight elements (`wload`): f32 as stored, f16 and bf16 unpacked from pairs in
/// 32-bit words (no `shader-f16` feature needed).
fn weights(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => include_str!("shaders/weights_f16.wgsl"),
        DType::Bf16 => include_str!("shaders/weights_bf16.wgsl"),
        _ => include_str!("shaders/weights_f32.wgsl"),
    }
}

/// The kernels a forward pass dispatches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    Embed,
    LayerNorm,
    /// The tiled product; a step of at most [`MATVEC_ROWS`] rows dispatches `matvec.wgsl` in its
    /// place, with the same bindings.
    Matmul,
    KvWrite,
    Attention,
    /// Each scored row's log-prob, rank and entropy from its logits (`score.wgsl`).
    Score,
}

/// The compiled pipelines for one weight storage type.
pub(crate) struct Kernels {
    embed: wgpu::ComputePipeline,
    layer_norm: wgpu::ComputePipeline,
    matmul: wgpu::ComputePipeline,
    matvec: wgpu::ComputePipeline,
    /// The bindings `matmul` and `matvec` share, so that one bind group serves either.
    product_layout: wgpu::BindGroupLayout,
    kv_write: wgpu::ComputePipeline,
    attention: wgpu::ComputePipeline,
    score: wgpu::ComputePipeline,
}

impl Kernels {
    pub(crate) fn new(device: &wgpu::Device, dtype: DType) -> Kernels {
        let w = weights(dtype);
        let storage = |binding: u32, read_only: bool| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let product_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("product"),
            entries: &[
                storage(0, true),
                wgpu::BindGroupLayoutEntry {
                    binding: 1,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                },
                storage(2, true),
                storage(3, true),
                storage(4, true),
                storage(5, false),
            ],
        });
        let product = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("product"),
            bind_group_layouts: &[Some(&product_layout)],
            immediate_size: 0,
        });
        let make = |name: &str, parts: &[&str], layout: Option<&wgpu::PipelineLayout>| {
            let source = parts.concat();
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(name),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(name),
                layout,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        Kernels {
            embed: make("embed", &[COMMON, w, EMBED], None),
            layer_norm: make("layer_norm", &[COMMON, LAYER_NORM], None),
            matmul: make("matmul", &[COMMON, w, EPILOGUE, MATMUL], Some(&product)),
            matvec: make("matvec", &[COMMON, w, EPILOGUE, MATVEC], Some(&product)),
            product_layout,
            kv_write: make("kv_write", &[COMMON, KV_WRITE], None),
            attention: make("attention", &[COMMON, ATTENTION], None),
            score: make("score", &[COMMON, SCORE], None),
        }
    }

    /// The layout of `k`'s bind group.
    pub(crate) fn layout(&self, k: Kernel) -> wgpu::BindGroupLayout {
        match k {
            Kernel::Matmul => self.product_layout.clone(),
            _ => self.get(k).get_bind_group_layout(0),
        }
    }

    /// The pipeline and workgroups of one dispatch of `k` over `grid` for a step of `rows` rows,
    /// `picked` picked rows and `scored` scored ones.
    pub(crate) fn dispatch(
        &self,
        k: Kernel,
        grid: Grid,
        [rows, picked, scored]: [u32; 3],
    ) -> (&wgpu::ComputePipeline, (u32, u32, u32)) {
        match grid {
            Grid::Tiles { n, picked: p } if (if p { picked } else { rows }) <= MATVEC_ROWS => {
                (&self.matvec, (n.div_ceil(MATVEC_COLUMNS), 1, 1))
            }
            Grid::Scored => (self.get(k), (scored, 1, 1)),
            _ => (self.get(k), grid.size(rows, picked)),
        }
    }

    fn get(&self, k: Kernel) -> &wgpu::ComputePipeline {
        match k {
            Kernel::Embed => &self.embed,
            Kernel::LayerNorm => &self.layer_norm,
            Kernel::Matmul => &self.matmul,
            Kernel::KvWrite => &self.kv_write,
            Kernel::Attention => &self.attention,
            Kernel::Score => &self.score,
        }
    }
}

/// A kernel's static operands (`Dims` in common.wgsl): eight integers and two floats.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Dims {
    pub ints: [u32; 8],
    pub floats: [f32; 2],
}

impl Dims {
    pub(crate) fn ints(ints: &[u32]) -> Dims {
        let mut d = Dims::default();
        d.ints[..ints.len()].copy_from_slice(ints);
        d
    }

    /// The dims of `matmul`/`matvec`: `(rows, k) · (n, k)ᵀ` into columns `off..off + n` of an output
    /// `ld` wide.
    pub(crate) fn product(
        k: u32,
        n: u32,
        epi: Epilogue,
        act: u32,
        picked: bool,
        ld: u32,
        off: u32,
    ) -> Dims {
        Dims::ints(&[k, n, epi as u32, act, picked as u32, ld, off])
    }

    pub(crate) fn float(mut self, x: f32) -> Dims {
        self.floats[0] = x;
        self
    }

    pub(crate) fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32);
        for i in self.ints {
            b.extend_from_slice(&i.to_le_bytes());
        }
        for f in self.floats {
            b.extend_from_slice(&f.to_le_bytes());
        }
        // The struct's padding to 16 bytes.
        b.resize(48, 0);
        b
    }
}

/// How many workgroups a dispatch takes for a step of `rows` new rows and `picked` rows of logits.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Grid {
    /// One per row.
    Rows,
    /// One per picked row.
    Picked,
    /// One per scored row (the picked rows when the step has targets, else none).
    Scored,
    /// One per (row, head).
    RowHeads(u32),
    /// 16×16 output tiles of `n` columns over the rows (or the picked rows).
    Tiles { n: u32, picked: bool },
}

/// Output tile edge of `matmul.wgsl`.
pub(crate) const TILE: u32 = 16;
/// Rows `matvec.wgsl` takes (`MAX_ROWS` there), and output columns per workgroup.
pub(crate) const MATVEC_ROWS: u32 = 4;
pub(crate) const MATVEC_COLUMNS: u32 = 4;

impl Grid {
    pub(crate) fn size(self, rows: u32, picked: u32) -> (u32, u32, u32) {
        match self {
            Grid::Rows => (rows, 1, 1),
            Grid::Picked | Grid::Scored => (picked, 1, 1),
            Grid::RowHeads(h) => (rows, h, 1),
            Grid::Tiles { n, picked: p } => {
                let r = if p { picked } else { rows };
                (n.div_ceil(TILE), r.div_ceil(TILE), 1)
            }
        }
    }
}

/// Activation codes of `matmul.wgsl`'s `activation`.
pub(crate) fn activation_code(a: crate::config::Activation) -> u32 {
    use crate::config::Activation::*;
    match a {
        GeluNew => 1,
        Gelu => 2,
        Relu => 3,
        Silu => 4,
        QuickGelu => 5,
    }
}

/// Epilogues of `matmul.wgsl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Epilogue {
    None = 0,
    Bias = 1,
    BiasAct = 2,
    BiasResidual = 3,
}
