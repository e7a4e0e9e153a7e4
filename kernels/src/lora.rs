//! The LoRA linear composed from the backend's own ops: the reference every
//! fused implementation is checked against, and what the CPU backend runs.

use crate::backend::{Backend, Gemm, LoraDropout, LoraShape, Result};

/// See [`Backend::lora_linear_forward`].
#[allow(clippy::too_many_arguments)]
pub fn forward<B: Backend>(
    be: &B,
    mut y: B::ViewMut<'_>,
    mut xa: B::ViewMut<'_>,
    mut scratch_x: B::ViewMut<'_>,
    x: B::View<'_>,
    w: B::View<'_>,
    a: B::View<'_>,
    b: B::View<'_>,
    dropout: Option<LoraDropout<'_>>,
    s: LoraShape,
    accumulate: bool,
) -> Result<()> {
    let (n, ni, no, r) = (s.n, s.n_in, s.n_out, s.r);
    be.gemm(
        be.slice_mut(&mut y, 0..n * no),
        x,
        w,
        Gemm {
            accumulate,
            ..Gemm::linear(n, no, ni)
        },
    )?;
    match dropout {
        Some(d) => {
            apply_dropout(be, &mut scratch_x, x, d, ni)?;
            let src = to_view(be, &mut scratch_x, n * ni);
            be.gemm(
                be.slice_mut(&mut xa, 0..n * r),
                src,
                a,
                Gemm::linear(n, r, ni),
            )?;
        }
        None => be.gemm(
            be.slice_mut(&mut xa, 0..n * r),
            x,
            a,
            Gemm::linear(n, r, ni),
        )?,
    }
    let xa_view = to_view(be, &mut xa, n * r);
    be.gemm(
        y,
        xa_view,
        b,
        Gemm {
            alpha: s.scaling,
            accumulate: true,
            ..Gemm::linear(n, no, r)
        },
    )
}

/// See [`Backend::lora_linear_backward`].
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    be: &B,
    mut dx: B::ViewMut<'_>,
    da: Option<B::ViewMut<'_>>,
    db: Option<B::ViewMut<'_>>,
    mut scratch_x: B::ViewMut<'_>,
    mut scratch_dxa: B::ViewMut<'_>,
    dy: B::View<'_>,
    x: B::View<'_>,
    xa: B::View<'_>,
    w: B::View<'_>,
    a: B::View<'_>,
    b: B::View<'_>,
    dropout: Option<LoraDropout<'_>>,
    s: LoraShape,
) -> Result<()> {
    let (n, ni, no, r) = (s.n, s.n_in, s.n_out, s.r);
    // dx += dy · W
    be.gemm(
        be.slice_mut(&mut dx, 0..n * ni),
        dy,
        w,
        Gemm {
            m: n,
            n: ni,
            k: no,
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            accumulate: true,
        },
    )?;
    // dB[out,r] += s · dyᵀ · xa
    if let Some(db) = db {
        be.gemm(
            db,
            dy,
            xa,
            Gemm {
                m: no,
                n: r,
                k: n,
                trans_a: true,
                trans_b: false,
                alpha: s.scaling,
                accumulate: true,
            },
        )?;
    }
    // dxa[N,r] = s · dy · B
    be.gemm(
        be.slice_mut(&mut scratch_dxa, 0..n * r),
        dy,
        b,
        Gemm {
            m: n,
            n: r,
            k: no,
            trans_a: false,
            trans_b: false,
            alpha: s.scaling,
            accumulate: false,
        },
    )?;
    let dxa = to_view(be, &mut scratch_dxa, n * r);
    // dA[r,in] += dxaᵀ · dropout(x)
    if let Some(da) = da {
        let g = Gemm {
            m: r,
            n: ni,
            k: n,
            trans_a: true,
            trans_b: false,
            alpha: 1.0,
            accumulate: true,
        };
        match dropout {
            Some(d) => {
                apply_dropout(be, &mut scratch_x, x, d, ni)?;
                be.gemm(da, dxa, to_view(be, &mut scratch_x, n * ni), g)?;
            }
            None => be.gemm(da, dxa, x, g)?,
        }
    }
    // dx += dropout'(dxa · A)
    let g = Gemm {
        m: n,
        n: ni,
        k: r,
        trans_a: false,
        trans_b: false,
        alpha: 1.0,
        accumulate: false,
    };
    match dropout {
        Some(d) => {
            be.gemm(be.slice_mut(&mut scratch_x, 0..n * ni), dxa, a, g)?;
            let row = d.rows_per_sample * ni;
            for (i, &seed) in d.seeds.iter().enumerate() {
                let rows = i * row..(i + 1) * row;
                let src = to_view_range(be, &mut scratch_x, rows.clone());
                be.dropout_backward(be.slice_mut(&mut dx, rows), src, d.p, seed)?;
            }
            Ok(())
        }
        None => be.gemm(
            dx,
            dxa,
            a,
            Gemm {
                accumulate: true,
                ..g
            },
        ),
    }
}

/// scratch[N,IN] = dropout(x), sample by sample with each sample's seed.
fn apply_dropout<B: Backend>(
    be: &B,
    scratch: &mut B::ViewMut<'_>,
    x: B::View<'_>,
    d: LoraDropout<'_>,
    n_in: usize,
) -> Result<()> {
    let row = d.rows_per_sample * n_in;
    for (i, &seed) in d.seeds.iter().enumerate() {
        let rows = i * row..(i + 1) * row;
        be.dropout_forward(
            be.slice_mut(scratch, rows.clone()),
            be.slice(x, rows),
            d.p,
            seed,
        )?;
    }
    Ok(())
}

fn to_view<'a, B: Backend>(be: &B, v: &'a mut B::ViewMut<'_>, len: usize) -> B::View<'a> {
    to_view_range(be, v, 0..len)
}

fn to_view_range<'a, B: Backend>(
    be: &B,
    v: &'a mut B::ViewMut<'_>,
    range: std::ops::Range<usize>,
) -> B::View<'a> {
    be.freeze(be.slice_mut(v, range))
}
