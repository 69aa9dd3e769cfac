//! Research outputs for Python: activation sites (TransformerLens's names), patching, hidden states,
//! attention patterns and embeddings, as numpy arrays. Lists of texts run several per forward pass
//! (each text's values are the same bits as alone: the engine is batch-invariant).

use gpt2::embed::Pooling;
use gpt2::{Activations, BlockSite, Hooked, Patch, Site};
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use super::{input, Inner, Stop};

/// Positions (tokens) run per forward pass when a list of texts is read: enough to keep the
/// matrix products efficient, small enough that a pass's captured sites stay modest.
const BATCH_POSITIONS: usize = 2048;

/// `docs` checked against the context, in batches of at most [`BATCH_POSITIONS`] tokens (at
/// least one text each), each run by `run` on one reused state; [`Stop`] ends it between batches.
fn in_batches<T>(
    inner: &Inner,
    docs: &[Vec<u32>],
    stop: &Stop,
    mut run: impl FnMut(&mut Option<gpt2::State>, &[Vec<u32>]) -> gpt2::Result<Vec<T>>,
) -> gpt2::Result<Vec<T>> {
    let n_pos = inner.model.config().n_positions;
    for (i, d) in docs.iter().enumerate() {
        if d.is_empty() || d.len() > n_pos {
            return Err(input(format!(
                "text {i} has {} tokens; expected 1 to the context of {n_pos}",
                d.len()
            )));
        }
    }
    let mut out = Vec::with_capacity(docs.len());
    let (mut i, mut state) = (0, None);
    while i < docs.len() {
        stop.check()?;
        let (mut j, mut positions) = (i + 1, docs[i].len());
        while j < docs.len() && positions + docs[j].len() <= BATCH_POSITIONS {
            positions += docs[j].len();
            j += 1;
        }
        out.extend(run(&mut state, &docs[i..j])?);
        i = j;
    }
    Ok(out)
}

/// Run `docs` in batches capturing `sites`, with every position's logits when `logits`.
pub(crate) fn run_batches(
    inner: &Inner,
    docs: &[Vec<u32>],
    sites: &[Site],
    logits: bool,
    stop: &Stop,
) -> gpt2::Result<Vec<Activations>> {
    in_batches(inner, docs, stop, |state, batch| {
        let batch: Vec<Hooked> = batch
            .iter()
            .map(|ids| Hooked { ids, patches: &[] })
            .collect();
        inner
            .model
            .run_with_hooks_reusing(state, &batch, sites, logits)
    })
}

/// `names` as sites: `None` is every site; a str or a list of strs are names or glob patterns.
pub(crate) fn sites_of(inner: &Inner, names: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<Site>> {
    let config = inner.model.config();
    let Some(names) = names.filter(|n| !n.is_none()) else {
        return Ok(Site::all(config.n_layer));
    };
    let list: Vec<String> = if let Ok(s) = names.cast::<PyString>() {
        vec![s.to_cow()?.into_owned()]
    } else {
        names.extract().map_err(|_| {
            PyTypeError::new_err("names: expected a str or a list of str (site names or patterns)")
        })?
    };
    Site::select(&list, config).map_err(super::to_py)
}

fn array<'py>(py: Python<'py>, shape: &[usize], values: Vec<f32>) -> PyResult<Bound<'py, PyAny>> {
    let a = ArrayD::from_shape_vec(IxDyn(shape), values)
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))?;
    Ok(a.into_pyarray(py).into_any())
}

/// `(logits (T, vocab) or None, {name: array})` of one run.
pub(crate) fn cache_tuple<'py>(
    py: Python<'py>,
    inner: &Inner,
    a: Activations,
    tokens: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let v = inner.model.config().vocab_size;
    let logits = match a.logits {
        Some(l) => array(py, &[tokens, v], l)?,
        None => py.None().into_bound(py),
    };
    let cache = PyDict::new(py);
    for (site, shape, values) in a.sites {
        cache.set_item(site.to_string(), array(py, &shape, values)?)?;
    }
    Ok(PyTuple::new(py, [logits, cache.into_any()])?.into_any())
}

/// The patches of a `{name: array}` dict, checked against the sites' shapes for `tokens` tokens.
pub(crate) fn patches_of(
    inner: &Inner,
    patches: &Bound<'_, PyDict>,
    tokens: usize,
) -> PyResult<Vec<(Site, Vec<f32>)>> {
    let config = inner.model.config();
    let mut out = Vec::with_capacity(patches.len());
    for (k, v) in patches.iter() {
        let name: String = k
            .extract()
            .map_err(|_| PyTypeError::new_err("patches: keys must be site names (str)"))?;
        let site = Site::parse(&name, config).map_err(super::to_py)?;
        let want = site.shape(config, tokens);
        let (shape, values) = if let Ok(a) = v.cast::<PyArrayDyn<f32>>() {
            let a = a.readonly();
            (a.shape().to_vec(), a.as_array().iter().copied().collect())
        } else if let Ok(a) = v.cast::<PyArrayDyn<f64>>() {
            let a = a.readonly();
            (
                a.shape().to_vec(),
                a.as_array().iter().map(|&x| x as f32).collect(),
            )
        } else {
            return Err(PyTypeError::new_err(format!(
                "patches[{name:?}]: expected a float32 or float64 numpy array of shape {want:?}"
            )));
        };
        if shape != want {
            return Err(PyValueError::new_err(format!(
                "patches[{name:?}]: shape {shape:?}; the site's shape for {tokens} tokens is {want:?}"
            )));
        }
        out.push((site, values));
    }
    Ok(out)
}

/// Run one sequence with `patches`, returning its logits `(T, vocab)`.
pub(crate) fn run_patched(
    inner: &Inner,
    ids: &[u32],
    patches: &[(Site, Vec<f32>)],
) -> gpt2::Result<Vec<f32>> {
    let n_pos = inner.model.config().n_positions;
    if ids.is_empty() || ids.len() > n_pos {
        return Err(input(format!(
            "{} tokens; expected 1 to the context of {n_pos}",
            ids.len()
        )));
    }
    let p: Vec<Patch> = patches
        .iter()
        .map(|(site, value)| Patch { site: *site, value })
        .collect();
    let out = inner
        .model
        .run_with_hooks(&[Hooked { ids, patches: &p }], &[], true)?;
    Ok(out
        .into_iter()
        .next()
        .and_then(|a| a.logits)
        .unwrap_or_default())
}

/// transformers' `output_hidden_states`: the embeddings, each block's output but the last, and the
/// last block's output after `ln_f`.
pub(crate) fn hidden_state_sites(n_layer: usize) -> Vec<Site> {
    let mut v = vec![Site::Block(0, BlockSite::ResidPre)];
    v.extend((0..n_layer.saturating_sub(1)).map(|l| Site::Block(l, BlockSite::ResidPost)));
    v.push(Site::LnFinal);
    v
}

/// Each block's attention pattern.
pub(crate) fn pattern_sites(n_layer: usize) -> Vec<Site> {
    (0..n_layer)
        .map(|l| Site::Block(l, BlockSite::Pattern))
        .collect()
}

/// For one text or a list: the sites `sites(n_layer)` names, captured without logits into one
/// array per text, `(sites, ...)` (`hidden_states`, `attentions`; the sites share a shape).
pub(crate) fn stacked_for<'py>(
    py: Python<'py>,
    inner: &Inner,
    texts: &Bound<'py, PyAny>,
    sites: fn(usize) -> Vec<Site>,
) -> PyResult<Bound<'py, PyAny>> {
    let (docs, several) = inner.inputs(texts, "text")?;
    let config = inner.model.config();
    let sites = sites(config.n_layer);
    let out = inner.run_long(py, |stop| {
        in_batches(inner, &docs, stop, |state, batch| {
            let ids: Vec<&[u32]> = batch.iter().map(|d| d.as_slice()).collect();
            inner.model.capture_stacked(state, &ids, &sites)
        })
    })?;
    let items = out
        .into_iter()
        .zip(&docs)
        .map(|(values, d)| {
            let mut shape = vec![sites.len()];
            shape.extend(
                sites
                    .first()
                    .map_or(Vec::new(), |s| s.shape(config, d.len())),
            );
            array(py, &shape, values)
        })
        .collect::<PyResult<_>>()?;
    one_or_list(py, several, items)
}

/// One text's results as they are, or a list of them for a list of texts.
pub(crate) fn one_or_list<'py>(
    py: Python<'py>,
    several: bool,
    mut items: Vec<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    if several {
        Ok(PyList::new(py, items)?.into_any())
    } else {
        Ok(items.remove(0))
    }
}

/// [`gpt2::embed::embed`] of `docs` in slices of 64 texts, so that [`Stop`] ends it between slices;
/// `(N, n_embd)` flattened.
pub(crate) fn embed_sliced(
    inner: &Inner,
    docs: &[Vec<u32>],
    pooling: Pooling,
    normalize: bool,
    stop: &Stop,
) -> gpt2::Result<Vec<f32>> {
    let n_pos = inner.model.config().n_positions;
    if let Some(i) = docs.iter().position(|d| d.is_empty() || d.len() > n_pos) {
        return Err(input(format!(
            "text {i} has {} tokens; expected 1 to the context of {n_pos}",
            docs[i].len()
        )));
    }
    let mut out = Vec::new();
    for slice in docs.chunks(64) {
        stop.check()?;
        for e in gpt2::embed::embed(&inner.model, slice, pooling, normalize)? {
            out.extend(e);
        }
    }
    Ok(out)
}

pub(crate) fn array2<'py>(
    py: Python<'py>,
    rows: usize,
    cols: usize,
    values: Vec<f32>,
) -> PyResult<Bound<'py, PyAny>> {
    array(py, &[rows, cols], values)
}

pub(crate) fn array_of<'py>(
    py: Python<'py>,
    shape: &[usize],
    values: Vec<f32>,
) -> PyResult<Bound<'py, PyAny>> {
    array(py, shape, values)
}
