// Shared by every kernel. `step_info` is the one buffer the host writes per forward step:
// [rows, picked, max_rows, scored | tokens | slots | positions | picked rows | targets],
// `max_rows` each: the first `scored` picked rows have a target each (`score.wgsl`).
@group(0) @binding(0) var<storage, read> step_info: array<u32>;

fn n_rows() -> u32 { return step_info[0]; }
fn n_picked() -> u32 { return step_info[1]; }
fn token_of(r: u32) -> u32 { return step_info[4u + r]; }
fn slot_of(r: u32) -> u32 { return step_info[4u + step_info[2] + r]; }
fn position_of(r: u32) -> u32 { return step_info[4u + 2u * step_info[2] + r]; }
fn picked_row(r: u32) -> u32 { return step_info[4u + 3u * step_info[2] + r]; }
fn n_scored() -> u32 { return step_info[3]; }
fn target_of(r: u32) -> u32 { return step_info[4u + 4u * step_info[2] + r]; }

// Static operands of one dispatch (the kernel says what each field means), 48 bytes.
struct Dims { a: u32, b: u32, c: u32, d: u32, e: u32, f: u32, g: u32, h: u32, x: f32, y: f32, _p0: u32, _p1: u32 }
@group(0) @binding(1) var<uniform> dims: Dims;

const WG: u32 = 64u;
var<workgroup> red: array<f32, 64>;

// Tree reductions over a workgroup of WG threads; every thread gets the result.
fn reduce_sum(v: f32, t: u32) -> f32 {
    red[t] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if t < s { red[t] = red[t] + red[t + s]; }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn reduce_max(v: f32, t: u32) -> f32 {
    red[t] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if t < s { red[t] = max(red[t], red[t + s]); }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}
