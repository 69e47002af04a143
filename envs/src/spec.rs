//! [`EnvSpec`]: everything about an environment that does not change during training (sites,
//! rank set, resource model, coefficients) and the tables derived from them once.

use std::sync::Arc;

use crate::EnvError;
use crate::noise::ObservationNoise;
use crate::observation::{STATIC_SITE_FEATURES, StaticSiteValues, rank_log};
use crate::presets::{BudgetUnit, EnvPreset, ResourceKind};
use crate::resource::{ComputeModel, ResourceModel};
use crate::sites::{RankSet, Site, llama_sites};

/// Everything about an environment that does not change during training: sites, rank set,
/// resource model, coefficients, and tables derived from them. Shared by all environments of a
/// [`crate::VecEnv`].
#[derive(Debug, Clone)]
pub struct EnvSpec {
    /// The preset it was built from.
    pub preset: EnvPreset,
    /// The sites.
    pub sites: Vec<Site>,
    /// The allowed ranks.
    pub rank_set: RankSet,
    /// The resource model.
    pub resource: ResourceModel,
    /// Cost of one rank unit per site, in the resource's unit.
    pub unit_cost: Vec<f64>,
    /// Σ_l unit_cost_l.
    pub sum_unit_cost: f64,
    /// Cost of the plan with every site at the largest rank.
    pub max_plan_cost: f64,
    /// FLOPs per rank unit per site (compute model's formula; per token if the preset has no
    /// compute section), for the DR-RL FLOPs term.
    pub flops_per_rank: Vec<f64>,
    /// Per-site static observation features ([`crate::SiteFeature::STATIC`]).
    pub(crate) static_features: Vec<[f32; STATIC_SITE_FEATURES]>,
    /// Per-site mean β (role + depth trend), for generated spectra.
    pub(crate) beta_mean: Vec<f64>,
    /// Per-site mean log sensitivity.
    pub(crate) log_w_mean: Vec<f64>,
    /// Largest bandwidth of the preset (normalises the `bandwidth` feature).
    pub(crate) max_bandwidth: f64,
    /// The tabulated observation noise.
    pub(crate) noise: ObservationNoise,
    /// The `rank_log` feature per rank index.
    pub(crate) rank_log: Vec<f32>,
}

impl EnvSpec {
    /// Builds the spec from a validated preset; errors if a rank exceeds some site's
    /// min(d_in, d_out).
    pub fn new(preset: &EnvPreset) -> Result<Arc<Self>, EnvError> {
        let sites = match (&preset.calibration_data, &preset.sites.calibration) {
            (Some(c), _) => c.sites(),
            (None, Some(path)) => {
                return Err(EnvError::Config {
                    key: "sites.calibration".into(),
                    found: path.clone(),
                    allowed: "a preset loaded through presets::load so the file is read".into(),
                });
            }
            (None, None) => llama_sites(
                preset.sites.layers.unwrap_or(1),
                preset.sites.hidden.unwrap_or(1),
                preset.sites.intermediate.unwrap_or(1),
                &preset.sites.projections,
            ),
        };
        let min_dim = sites.iter().map(Site::max_rank).min().unwrap_or(0);
        let rank_set = RankSet::new(&preset.ranks, min_dim)?;
        let resource = ResourceModel::new(&preset.resource);
        let unit_cost: Vec<f64> = sites.iter().map(|s| resource.unit_cost(s)).collect();
        let sum_unit_cost: f64 = unit_cost.iter().sum();
        let max_plan_cost = sum_unit_cost * rank_set.max() as f64;
        let flops_per_rank = sites
            .iter()
            .map(|s| match &resource {
                ResourceModel::Compute(c) => c.flops_per_rank(s),
                _ => match &preset.resource.compute {
                    Some(c) => ComputeModel { cfg: c.clone() }.flops_per_rank(s),
                    None => 2.0 * s.params_per_rank() as f64,
                },
            })
            .collect();
        let n = sites.len();
        let max_layer = sites.iter().map(|s| s.layer).max().unwrap_or(0);
        let max_dim = sites.iter().map(|s| s.d_in.max(s.d_out)).max().unwrap_or(1) as f32;
        let mean_unit = sum_unit_cost / n.max(1) as f64;
        let depth: Vec<f64> =
            sites.iter().map(|s| if max_layer == 0 { 0.0 } else { s.layer as f64 / max_layer as f64 }).collect();
        let static_features = sites
            .iter()
            .zip(&unit_cost)
            .zip(&depth)
            .map(|((s, u), d)| {
                StaticSiteValues {
                    d_in: s.d_in as f32 / max_dim,
                    d_out: s.d_out as f32 / max_dim,
                    cost_share: (u / mean_unit) as f32,
                    depth: *d as f32,
                    role: s.role,
                }
                .features()
            })
            .collect();
        let sp = &preset.spectrum;
        let beta_mean =
            sites.iter().zip(&depth).map(|(s, d)| sp.beta.get(s.role) + sp.beta_depth_slope * (d - 0.5)).collect();
        let se = &preset.sensitivity;
        let log_w_mean =
            sites.iter().zip(&depth).map(|(s, d)| se.by_role.get(s.role).ln() + se.depth_slope * (d - 0.5)).collect();
        let rank_log = rank_set.ranks().iter().map(|&r| rank_log(r, rank_set.max())).collect();
        let max_bandwidth =
            preset.resource.channel.as_ref().map(|c| c.bandwidth_hz.iter().copied().fold(0.0, f64::max)).unwrap_or(1.0);
        Ok(Arc::new(Self {
            preset: preset.clone(),
            sites,
            rank_set,
            resource,
            unit_cost,
            sum_unit_cost,
            max_plan_cost,
            flops_per_rank,
            static_features,
            beta_mean,
            log_w_mean,
            max_bandwidth,
            noise: ObservationNoise::new(&preset.observation),
            rank_log,
        }))
    }

    /// Number of sites.
    pub fn n_sites(&self) -> usize {
        self.sites.len()
    }

    /// Cost of a rank plan in the resource's unit (bits, FLOPs, ranks or parameters). Errors on a
    /// wrong length or a rank outside the set.
    pub fn plan_cost(&self, ranks: &[u32]) -> Result<f64, EnvError> {
        self.check_plan(ranks, 0)?;
        Ok(ranks.iter().zip(&self.unit_cost).map(|(&r, u)| r as f64 * u).sum())
    }

    /// Checks one plan; `env` is only used in the error.
    pub fn check_plan(&self, ranks: &[u32], env: usize) -> Result<(), EnvError> {
        if ranks.len() != self.n_sites() {
            return Err(EnvError::ActionLength { expected: self.n_sites(), found: ranks.len() });
        }
        for (l, &r) in ranks.iter().enumerate() {
            if self.rank_set.index_of(r).is_none() {
                return Err(self.rank_error(env, l, r));
            }
        }
        Ok(())
    }

    /// The error for rank `rank` at `site` of environment `env`.
    pub(crate) fn rank_error(&self, env: usize, site: usize, rank: u32) -> EnvError {
        EnvError::RankNotInSet {
            env,
            site,
            site_name: self.sites[site].name.clone(),
            rank,
            allowed: self.rank_set.ranks().to_vec(),
        }
    }

    /// The static observation features of site `l` ([`crate::SiteFeature::STATIC`]: shapes,
    /// cost share, depth, role), for [`crate::observation::SiteValues::static_features`] in the
    /// simulator and in a real run filling the same schema.
    #[inline]
    pub fn static_site_features(&self, l: usize) -> &[f32; STATIC_SITE_FEATURES] {
        &self.static_features[l]
    }

    /// The largest bandwidth of the preset (normalises the `bandwidth` feature).
    pub fn max_bandwidth(&self) -> f64 {
        self.max_bandwidth
    }

    /// Unit of the resource's budget, for tables.
    pub fn resource_unit(&self) -> &'static str {
        match self.preset.resource.kind {
            ResourceKind::Channel => "bits",
            ResourceKind::Compute => "FLOPs",
            ResourceKind::Budget => match self.preset.resource.budget.as_ref().map(|b| b.unit) {
                Some(BudgetUnit::Params) => "params",
                _ => "ranks",
            },
        }
    }
}
