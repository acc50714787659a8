//! Points in the residual stream where the runtime hands activations to an [`Observer`], and the
//! observers safegeo ships: capture, directional ablation and activation addition.
use candle_core::{Result, Tensor, D};

/// Where in a block an activation is observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Site {
    /// The residual stream entering block `l` (`x_l`, "resid_pre").
    ResidPre,
    /// What attention writes into the residual stream.
    AttnOut,
    /// What the MLP writes into the residual stream.
    MlpOut,
    /// The residual stream entering the final norm (layer index = `L`).
    FinalNormInput,
}

/// Which tokens a chunk of the forward pass holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Prompt tokens (prefill, including a forced response prefix).
    Prompt,
    /// Tokens produced by decoding.
    Generated,
}

/// Context for one observation.
#[derive(Debug, Clone, Copy)]
pub struct SiteInfo {
    /// Block index (`L` for [`Site::FinalNormInput`]).
    pub layer: usize,
    /// The site.
    pub site: Site,
    /// Sequence index of the chunk's first token (tokens already in the KV cache).
    pub offset: usize,
    /// Prompt or generated tokens.
    pub phase: Phase,
}

/// Called by the runtime at every site with `x: (batch, tokens, d)`; returns the (possibly edited)
/// activation that the model continues with.
pub trait Observer: Send {
    /// Observe and optionally edit.
    fn visit(&mut self, at: &SiteInfo, x: Tensor) -> Result<Tensor>;
}

/// Observes nothing.
pub struct NoHooks;

impl Observer for NoHooks {
    fn visit(&mut self, _at: &SiteInfo, x: Tensor) -> Result<Tensor> {
        Ok(x)
    }
}

impl<T: Observer + ?Sized> Observer for &mut T {
    fn visit(&mut self, at: &SiteInfo, x: Tensor) -> Result<Tensor> {
        (**self).visit(at, x)
    }
}

/// Which tokens an intervention touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
pub enum Scope {
    /// Prompt and generated tokens.
    #[default]
    All,
    /// Prompt tokens only.
    Prompt,
    /// Generated tokens only.
    Generated,
    /// Prompt tokens except the last `n` of the prompt pass (e.g. an appended question that must
    /// stay unsteered, for the reply-inversion check). Rows end aligned under left padding.
    PromptExceptLast(usize),
}

impl Scope {
    fn admits(self, phase: Phase) -> bool {
        matches!(
            (self, phase),
            (Scope::All, _)
                | (Scope::Prompt | Scope::PromptExceptLast(_), Phase::Prompt)
                | (Scope::Generated, Phase::Generated)
        )
    }

    /// Apply `edit` to the tokens of `x: (b, t, d)` this scope covers.
    fn edit(self, x: Tensor, edit: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        match self {
            Scope::PromptExceptLast(n) => {
                let t = x.dim(1)?;
                let k = t.saturating_sub(n);
                if k == 0 {
                    return Ok(x);
                }
                let head = edit(&x.narrow(1, 0, k)?)?;
                Tensor::cat(&[&head, &x.narrow(1, k, t - k)?], 1)
            }
            _ => edit(&x),
        }
    }
}

/// An edit of the residual stream.
#[derive(Debug, Clone)]
pub enum Intervention {
    /// Directional ablation `x <- x - (x . r) r` with unit `r`, at every block input, attention
    /// output and MLP output of the given layers (`None` = all layers).
    Ablate {
        /// Unit direction `(d,)`.
        direction: Tensor,
        /// Layers, or all.
        layers: Option<Vec<usize>>,
        /// Token scope.
        scope: Scope,
    },
    /// Activation addition `x <- x + c v` at the block input of `layer`.
    Add {
        /// Direction (not normalised) `(d,)`.
        vector: Tensor,
        /// Coefficient `c`.
        coef: f64,
        /// Block index.
        layer: usize,
        /// Token scope.
        scope: Scope,
    },
    /// Several candidate directions in one forward: the batch's rows form `g` equal contiguous
    /// groups, and group `i` is ablated along row `i` of `directions: (g, d)` (unit rows), as
    /// [`Intervention::Ablate`] does at every layer.
    AblateGroups {
        /// Unit directions `(g, d)`.
        directions: Tensor,
        /// Token scope.
        scope: Scope,
    },
    /// Row `i` of `vectors: (g, d)` added to row group `i` (as in
    /// [`Intervention::AblateGroups`]) at the block input of `layers[i]`.
    AddGroups {
        /// Vectors (not normalised) `(g, d)`.
        vectors: Tensor,
        /// The block index of each group.
        layers: Vec<usize>,
        /// Token scope.
        scope: Scope,
    },
}

/// Row `i` of `per_group: (g, d)` for every row of group `i` of a batch of `b` rows: `(b, 1, d)`.
fn rows_of_groups(per_group: &Tensor, b: usize) -> Result<Tensor> {
    let (g, d) = per_group.dims2()?;
    if g == 0 || !b.is_multiple_of(g) {
        candle_core::bail!("a batch of {b} rows does not split into {g} equal groups");
    }
    per_group
        .unsqueeze(1)?
        .broadcast_as((g, b / g, d))?
        .reshape((b, 1, d))
}

/// `x <- x - (x . r) r` along the last axis (`r` broadcasts against `x`).
fn project_out(x: &Tensor, r: &Tensor) -> Result<Tensor> {
    let proj = x.broadcast_mul(r)?.sum_keepdim(D::Minus1)?;
    x.broadcast_sub(&proj.broadcast_mul(r)?)
}

impl Intervention {
    /// Ablation of `direction` (normalised here) at all layers and tokens.
    pub fn ablate(direction: &Tensor) -> Result<Self> {
        Ok(Intervention::Ablate {
            direction: unit(direction)?,
            layers: None,
            scope: Scope::All,
        })
    }

    fn apply(&self, at: &SiteInfo, x: Tensor) -> Result<Tensor> {
        match self {
            Intervention::Ablate {
                direction,
                layers,
                scope,
            } => {
                let site_ok = matches!(at.site, Site::ResidPre | Site::AttnOut | Site::MlpOut);
                let layer_ok = layers.as_ref().is_none_or(|ls| ls.contains(&at.layer));
                if !(site_ok && layer_ok && scope.admits(at.phase)) {
                    return Ok(x);
                }
                let r = direction.to_dtype(x.dtype())?;
                scope.edit(x, |x| project_out(x, &r))
            }
            Intervention::AblateGroups { directions, scope } => {
                let site_ok = matches!(at.site, Site::ResidPre | Site::AttnOut | Site::MlpOut);
                if !(site_ok && scope.admits(at.phase)) {
                    return Ok(x);
                }
                let r = rows_of_groups(directions, x.dim(0)?)?.to_dtype(x.dtype())?;
                scope.edit(x, |x| project_out(x, &r))
            }
            Intervention::AddGroups {
                vectors,
                layers,
                scope,
            } => {
                if at.site != Site::ResidPre
                    || !layers.contains(&at.layer)
                    || !scope.admits(at.phase)
                {
                    return Ok(x);
                }
                // Groups at other layers get exactly zero.
                let here: Vec<f32> = layers.iter().map(|&l| f32::from(l == at.layer)).collect();
                let here = Tensor::from_vec(here, (layers.len(), 1), vectors.device())?;
                let v = rows_of_groups(&vectors.broadcast_mul(&here)?, x.dim(0)?)?;
                let v = v.to_dtype(x.dtype())?;
                scope.edit(x, |x| x.broadcast_add(&v))
            }
            Intervention::Add {
                vector,
                coef,
                layer,
                scope,
            } => {
                if at.site != Site::ResidPre || at.layer != *layer || !scope.admits(at.phase) {
                    return Ok(x);
                }
                let v = (vector.to_dtype(x.dtype())? * *coef)?;
                scope.edit(x, |x| x.broadcast_add(&v))
            }
        }
    }
}

/// `v / |v|`.
pub fn unit(v: &Tensor) -> Result<Tensor> {
    let n = v.sqr()?.sum_all()?.sqrt()?;
    v.broadcast_div(&n)
}

/// Which token positions a capture keeps (indices into the chunk, per row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Positions {
    /// Every token.
    All,
    /// The last `k` tokens.
    LastK(usize),
    /// Explicit token indices, the same for every row (e.g. the post-instruction span after left
    /// padding aligns prompt ends).
    Indices(Vec<usize>),
}

/// Captured activations: `acts[(site, layer)] = (batch, kept positions, d)`.
#[derive(Debug, Default)]
pub struct Captured {
    /// The tensors, keyed by site and layer.
    pub acts: std::collections::BTreeMap<(u8, usize), Tensor>,
}

impl Captured {
    fn key(site: Site) -> u8 {
        site as u8
    }

    /// The capture at `(site, layer)`.
    pub fn get(&self, site: Site, layer: usize) -> Option<&Tensor> {
        self.acts.get(&(Self::key(site), layer))
    }
}

/// The standard observer: applies interventions in order, then captures.
#[derive(Debug, Default)]
pub struct Hooks {
    /// Edits, applied in order at every site.
    pub interventions: Vec<Intervention>,
    /// Sites to capture (after edits).
    pub capture_sites: Vec<Site>,
    /// Positions to keep.
    pub capture_positions: Option<Positions>,
    /// Layers to capture (`None` = all).
    pub capture_layers: Option<Vec<usize>>,
    /// Captures of the prompt pass.
    pub captured: Captured,
}

impl Hooks {
    /// Capture the given sites at the given positions.
    pub fn capture(sites: &[Site], positions: Positions) -> Self {
        Self {
            capture_sites: sites.to_vec(),
            capture_positions: Some(positions),
            ..Default::default()
        }
    }

    /// Only interventions.
    pub fn with_interventions(interventions: Vec<Intervention>) -> Self {
        Self {
            interventions,
            ..Default::default()
        }
    }
}

impl Observer for Hooks {
    fn visit(&mut self, at: &SiteInfo, mut x: Tensor) -> Result<Tensor> {
        for iv in &self.interventions {
            x = iv.apply(at, x)?;
        }
        let wanted = at.phase == Phase::Prompt
            && self.capture_sites.contains(&at.site)
            && self
                .capture_layers
                .as_ref()
                .is_none_or(|l| l.contains(&at.layer));
        if let (true, Some(pos)) = (wanted, &self.capture_positions) {
            let t = x.dim(1)?;
            let kept = match pos {
                Positions::All => x.clone(),
                Positions::LastK(k) => x.narrow(1, t - (*k).min(t), (*k).min(t))?,
                Positions::Indices(idx) => {
                    let ids = Tensor::new(
                        idx.iter().map(|&i| i as u32).collect::<Vec<_>>().as_slice(),
                        x.device(),
                    )?;
                    x.index_select(&ids, 1)?
                }
            };
            self.captured
                .acts
                .insert((Captured::key(at.site), at.layer), kept.detach());
        }
        Ok(x)
    }
}
