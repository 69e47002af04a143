//! The observation a policy sees: the features by name, and the only code that writes them.
//!
//! A feature is reached by name, never by position: [`GlobalFeature`] and [`SiteFeature`] index
//! an `[f32]` row directly (`global[GlobalFeature::Progress]`, `row[SiteFeature::Sensitivity]`).
//! The enums' order is the layout of the rows and of [`GLOBAL_NAMES`] / [`SITE_NAMES`], which
//! stored policies record so that a change of layout is caught when they are loaded.
//!
//! Rows are written only through [`GlobalValues::write`] and [`SiteValues::write`] (and the
//! static part of a site row through [`StaticSiteValues::features`]). The simulator
//! ([`crate::EnvState`]) and a real fine-tuning run both fill their observations with them, so
//! the two cannot disagree about what a feature holds. The normalisations the two share (the
//! budget ratio, the resource level, the bandwidth share, the log rank) are functions here too.

use std::ops::{Index, IndexMut, Range};

use serde::{Deserialize, Serialize};

use crate::presets::ResourceKind;
use crate::resource::{ResourceModel, ResourceState};
use crate::sites::Role;

/// Defines a feature enum, its `ALL` list, its row length and its names from one list, so the
/// variants, the layout and the names cannot drift apart; and lets the enum index an `[f32]`
/// row or a `Vec<f32>` (the orphan rule allows this because the index type is ours).
macro_rules! features {
    (
        $(#[$meta:meta])*
        enum $name:ident, length $count:ident, names $names:ident {
            $( #[doc = $doc:literal] $variant:ident = $text:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(usize)]
        pub enum $name {
            $( #[doc = $doc] $variant, )*
        }

        #[doc = concat!("Number of [`", stringify!($name), "`]s: the length of one row.")]
        pub const $count: usize = [$($text),*].len();

        #[doc = concat!("Machine-readable names of the [`", stringify!($name), "`]s, in row order.")]
        pub const $names: [&str; $count] = [$($text),*];

        impl $name {
            /// Every feature, in row order.
            pub const ALL: [$name; $count] = [$($name::$variant),*];

            /// The machine-readable (snake_case) name.
            pub fn name(self) -> &'static str {
                $names[self as usize]
            }
        }

        impl Index<$name> for [f32] {
            type Output = f32;
            #[inline]
            fn index(&self, feature: $name) -> &f32 {
                &self[feature as usize]
            }
        }

        impl IndexMut<$name> for [f32] {
            #[inline]
            fn index_mut(&mut self, feature: $name) -> &mut f32 {
                &mut self[feature as usize]
            }
        }

        // `Vec`'s own `Index` impl takes only slice indices, so `obs.global[feature]` needs these.
        impl Index<$name> for Vec<f32> {
            type Output = f32;
            #[inline]
            fn index(&self, feature: $name) -> &f32 {
                &self.as_slice()[feature]
            }
        }

        impl IndexMut<$name> for Vec<f32> {
            #[inline]
            fn index_mut(&mut self, feature: $name) -> &mut f32 {
                &mut self.as_mut_slice()[feature]
            }
        }
    };
}

features! {
    /// A global feature (one per environment and round). See [`Observation`] for what each holds
    /// and where a real run measures it.
    enum GlobalFeature, length GLOBAL_FEATURES, names GLOBAL_NAMES {
        /// 1 if the resource is a wireless channel.
        ResourceChannel = "resource_channel",
        /// 1 if the resource is a compute/latency budget.
        ResourceCompute = "resource_compute",
        /// 1 if the resource is a fixed rank/parameter budget.
        ResourceBudget = "resource_budget",
        /// Estimated budget / cost of the all-max-rank plan, clipped (see [`budget_ratio`]).
        BudgetRatioEst = "budget_ratio_est",
        /// [`GlobalFeature::BudgetRatioEst`] one round ago.
        BudgetRatioEstLag1 = "budget_ratio_est_lag1",
        /// [`GlobalFeature::BudgetRatioEst`] two rounds ago.
        BudgetRatioEstLag2 = "budget_ratio_est_lag2",
        /// [`GlobalFeature::BudgetRatioEst`] three rounds ago.
        BudgetRatioEstLag3 = "budget_ratio_est_lag3",
        /// [`GlobalFeature::BudgetRatioEst`] four rounds ago.
        BudgetRatioEstLag4 = "budget_ratio_est_lag4",
        /// How good the resource is this round (see [`resource_level`]).
        ResourceLevel = "resource_level",
        /// Bandwidth / largest bandwidth of the preset (see [`bandwidth_share`]).
        Bandwidth = "bandwidth",
        /// Normalised token entropy of the round's batch.
        TokenEntropy = "token_entropy",
        /// Share of unknown tokens in the batch.
        OovRate = "oov_rate",
        /// Round / rounds.
        Progress = "progress",
        /// Training loss / loss at the episode start.
        LossRatio = "loss_ratio",
        /// 1 if the previous round violated the budget.
        LastViolation = "last_violation",
        /// The previous round's cost ratio, clipped.
        LastCostRatio = "last_cost_ratio",
        /// Mean current rank / max rank.
        MeanRank = "mean_rank",
        /// log2(number of sites) / 8.
        NSitesLog = "n_sites_log",
    }
}

features! {
    /// A per-site feature (one row per site). See [`Observation`] for what each holds and where
    /// a real run measures it.
    enum SiteFeature, length SITE_FEATURES, names SITE_NAMES {
        /// Current rank / max rank of the set.
        Rank = "rank",
        /// log2(1 + rank) / log2(1 + max rank) (see [`rank_log`]).
        RankLog = "rank_log",
        /// d_in / largest dimension among the sites.
        DIn = "d_in",
        /// d_out / largest dimension among the sites.
        DOut = "d_out",
        /// Cost of one rank unit here / mean over the sites.
        CostShare = "cost_share",
        /// Layer / (layers − 1).
        Depth = "depth",
        /// 1 for q/k projections.
        RoleQk = "role_qk",
        /// 1 for v/o projections.
        RoleVo = "role_vo",
        /// 1 for gate/up projections.
        RoleMlpIn = "role_mlp_in",
        /// 1 for down projections.
        RoleMlpOut = "role_mlp_out",
        /// Noisy sensitivity share × n_sites (mean 1).
        Sensitivity = "sensitivity",
        /// Noisy gradient norm share × n_sites.
        GradNorm = "grad_norm",
        /// Noisy energy share of the adapter's smallest singular value.
        TailShare = "tail_share",
    }
}

/// Lags of the budget estimate kept in the observation ([`GlobalFeature::BUDGET_RATIO_LAGS`]).
pub const HISTORY: usize = 4;

/// Number of static site features ([`SiteFeature::STATIC`]).
pub const STATIC_SITE_FEATURES: usize = SiteFeature::STATIC.end - SiteFeature::STATIC.start;

/// Upper clip of [`GlobalFeature::BudgetRatioEst`]: a budget four times the all-max-rank plan
/// already allows every plan, so larger ratios carry no information.
pub const BUDGET_RATIO_CAP: f64 = 4.0;

// The lag features are exactly the HISTORY entries of [`BudgetRatioLags`].
const _: () = assert!(GlobalFeature::BUDGET_RATIO_LAGS.end - GlobalFeature::BUDGET_RATIO_LAGS.start == HISTORY);

impl GlobalFeature {
    /// The budget-estimate lags `budget_ratio_est_lag1..=lag4` (most recent first), as a range
    /// of a global row.
    pub const BUDGET_RATIO_LAGS: Range<usize> =
        GlobalFeature::BudgetRatioEstLag1 as usize..GlobalFeature::BudgetRatioEstLag4 as usize + 1;
}

impl SiteFeature {
    /// The static site features `d_in..=role_mlp_out` (shape, cost share, depth, role), as a
    /// range of a site row: the same every round, tabulated once per spec.
    pub const STATIC: Range<usize> = SiteFeature::DIn as usize..SiteFeature::RoleMlpOut as usize + 1;

    /// The role one-hot `role_qk..=role_mlp_out`, as a range of a site row (all zero for a
    /// projection of another kind).
    pub const ROLE_GROUPS: Range<usize> = SiteFeature::RoleQk as usize..SiteFeature::RoleMlpOut as usize + 1;

    /// The role one-hot feature that is 1 for a site of `role`; `None` for [`Role::Other`]. The
    /// groups pair projections that play the same part (attention scores, attention values, MLP
    /// input, MLP output), which is as much as the spectra's role structure needs.
    pub fn role_group(role: Role) -> Option<SiteFeature> {
        match role {
            Role::Q | Role::K => Some(SiteFeature::RoleQk),
            Role::V | Role::O => Some(SiteFeature::RoleVo),
            Role::Gate | Role::Up => Some(SiteFeature::RoleMlpIn),
            Role::Down => Some(SiteFeature::RoleMlpOut),
            Role::Other => None,
        }
    }
}

/// One environment's observation, as plain vectors (no ndarray types cross the crate border).
///
/// Every feature is something a real fine-tuning run can measure, so a real run fills the same
/// schema, through the same writers ([`GlobalValues`], [`SiteValues`]).
///
/// `global` (length [`GLOBAL_FEATURES`]), indexed by [`GlobalFeature`]:
///
/// | feature | name | meaning (real-run source) |
/// |---------|------|---------------------------|
/// | [`ResourceChannel`](GlobalFeature::ResourceChannel) | `resource_channel` | 1 if the resource is a wireless channel |
/// | [`ResourceCompute`](GlobalFeature::ResourceCompute) | `resource_compute` | 1 if it is a compute/latency budget |
/// | [`ResourceBudget`](GlobalFeature::ResourceBudget) | `resource_budget` | 1 if it is a fixed rank/parameter budget |
/// | [`BudgetRatioEst`](GlobalFeature::BudgetRatioEst) | `budget_ratio_est` | estimated budget / cost of the all-max-rank plan, clipped to [0, 4] (channel estimate → capacity × deadline; measured throughput × latency budget; the budget schedule) |
/// | [`BUDGET_RATIO_LAGS`](GlobalFeature::BUDGET_RATIO_LAGS) | `budget_ratio_est_lag1..4` | the same for the previous 4 rounds (the current value repeated at episode start) |
/// | [`ResourceLevel`](GlobalFeature::ResourceLevel) | `resource_level` | channel: (SNR estimate dB − 10)/10; compute: ln(estimated / mean throughput); budget: 0 |
/// | [`Bandwidth`](GlobalFeature::Bandwidth) | `bandwidth` | bandwidth / largest bandwidth of the preset (channel), else 0 |
/// | [`TokenEntropy`](GlobalFeature::TokenEntropy) | `token_entropy` | normalised token entropy of the round's batch, in [0, 1] |
/// | [`OovRate`](GlobalFeature::OovRate) | `oov_rate` | share of unknown tokens in the batch |
/// | [`Progress`](GlobalFeature::Progress) | `progress` | round / rounds |
/// | [`LossRatio`](GlobalFeature::LossRatio) | `loss_ratio` | current training loss / loss at the episode start |
/// | [`LastViolation`](GlobalFeature::LastViolation) | `last_violation` | 1 if the previous round violated the budget |
/// | [`LastCostRatio`](GlobalFeature::LastCostRatio) | `last_cost_ratio` | previous round's c = required / available, clipped to [0, violation_cost_cap] |
/// | [`MeanRank`](GlobalFeature::MeanRank) | `mean_rank` | mean current rank / max rank |
/// | [`NSitesLog`](GlobalFeature::NSitesLog) | `n_sites_log` | log2(number of sites) / 8 |
///
/// `sites` (row-major, `n_sites` rows of [`SITE_FEATURES`]), each row indexed by [`SiteFeature`]:
///
/// | feature | name | meaning (real-run source) |
/// |---------|------|---------------------------|
/// | [`Rank`](SiteFeature::Rank) | `rank` | current rank / max rank of the set |
/// | [`RankLog`](SiteFeature::RankLog) | `rank_log` | log2(1 + rank) / log2(1 + max rank) |
/// | [`DIn`](SiteFeature::DIn) | `d_in` | d_in / largest dimension among the sites |
/// | [`DOut`](SiteFeature::DOut) | `d_out` | d_out / largest dimension among the sites |
/// | [`CostShare`](SiteFeature::CostShare) | `cost_share` | cost of one rank unit here / mean over sites |
/// | [`Depth`](SiteFeature::Depth) | `depth` | layer / (layers − 1) (0 with one layer) |
/// | [`RoleQk`](SiteFeature::RoleQk) | `role_qk` | 1 for q/k projections |
/// | [`RoleVo`](SiteFeature::RoleVo) | `role_vo` | 1 for v/o projections |
/// | [`RoleMlpIn`](SiteFeature::RoleMlpIn) | `role_mlp_in` | 1 for gate/up projections |
/// | [`RoleMlpOut`](SiteFeature::RoleMlpOut) | `role_mlp_out` | 1 for down projections |
/// | [`Sensitivity`](SiteFeature::Sensitivity) | `sensitivity` | noisy sensitivity share × n_sites (mean 1): AdaLoRA importance EMA of \|θ·∇θ\| summed over the site, normalised |
/// | [`GradNorm`](SiteFeature::GradNorm) | `grad_norm` | noisy w_l·√(residual_l) × n_sites: gradient norm at the site, normalised by the sum of the sensitivities |
/// | [`TailShare`](SiteFeature::TailShare) | `tail_share` | noisy σ_r² / Σ_{k≤r} σ_k² at the current rank r (0 at rank 0): energy share of the adapter's smallest singular value — large means more rank would still help |
///
/// `d_in..=role_mlp_out` ([`SiteFeature::STATIC`]) do not change during a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// Global features, length [`GLOBAL_FEATURES`].
    pub global: Vec<f32>,
    /// Per-site features, `n_sites × SITE_FEATURES`, row-major.
    pub sites: Vec<f32>,
    /// Number of sites (rows of `sites`).
    pub n_sites: usize,
}

impl Observation {
    /// An all-zero observation for `n_sites` sites (for a real run to fill in).
    pub fn zeros(n_sites: usize) -> Self {
        Self { global: vec![0.0; GLOBAL_FEATURES], sites: vec![0.0; n_sites * SITE_FEATURES], n_sites }
    }

    /// The feature row of site `l`.
    pub fn site(&self, l: usize) -> &[f32] {
        &self.sites[l * SITE_FEATURES..(l + 1) * SITE_FEATURES]
    }

    /// The feature row of site `l`, for [`SiteValues::write`].
    pub fn site_mut(&mut self, l: usize) -> &mut [f32] {
        &mut self.sites[l * SITE_FEATURES..(l + 1) * SITE_FEATURES]
    }
}

/// The budget ratios of the previous [`HISTORY`] rounds, most recent first: what the
/// `budget_ratio_est_lag1..4` features show. Whoever writes observations keeps one (the
/// simulator per environment, a real run beside its resource). Serialized as a plain array.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BudgetRatioLags([f32; HISTORY]);

impl BudgetRatioLags {
    /// Every lag at `ratio`: at episode start the current value stands in for the history
    /// there is not yet.
    pub fn filled(ratio: f32) -> Self {
        Self([ratio; HISTORY])
    }

    /// Records the ratio of the round that just ended as lag 1; the oldest lag drops out.
    pub fn push(&mut self, ratio: f32) {
        self.0.rotate_right(1);
        self.0[0] = ratio;
    }

    /// The lags, most recent first.
    pub fn values(&self) -> &[f32; HISTORY] {
        &self.0
    }
}

/// The `budget_ratio_est` feature of an estimated budget: the estimate over the cost of the
/// plan with every site at the largest rank, clipped to [0, 4].
pub fn budget_ratio(estimated_budget: f64, max_plan_cost: f64) -> f32 {
    (estimated_budget / max_plan_cost).clamp(0.0, BUDGET_RATIO_CAP) as f32
}

/// The `resource_level` feature of the resource's state this round: for a channel the SNR
/// estimate relative to 10 dB in units of 10 dB; for compute the log of the estimated over the
/// nominal throughput; 0 for a fixed budget (nothing varies).
pub fn resource_level(model: &ResourceModel, state: &ResourceState) -> f32 {
    match model {
        ResourceModel::Channel(_) => ((state.snr_est_db - 10.0) / 10.0) as f32,
        ResourceModel::Compute(c) => (state.est_budget / (c.cfg.throughput_flops * c.cfg.latency_budget_s)).ln() as f32,
        ResourceModel::Budget(_) => 0.0,
    }
}

/// The `bandwidth` feature: the episode's bandwidth over the preset's largest (`max_bandwidth`)
/// for a channel; 0 for other resources.
pub fn bandwidth_share(model: &ResourceModel, state: &ResourceState, max_bandwidth: f64) -> f32 {
    match model {
        ResourceModel::Channel(_) => (state.bandwidth_hz / max_bandwidth) as f32,
        ResourceModel::Compute(_) | ResourceModel::Budget(_) => 0.0,
    }
}

/// The `rank_log` feature of rank `rank` in a set whose largest rank is `max_rank`:
/// log2(1 + rank) / log2(1 + max rank), which spreads the small ranks where most of the energy is.
pub fn rank_log(rank: u32, max_rank: u32) -> f32 {
    ((1.0 + rank as f64).log2() / (1.0 + max_rank as f64).log2()) as f32
}

/// The global features of one round, by name; [`GlobalValues::write`] is the only writer of a
/// global row. Each field holds the feature's value as in the [`Observation`] table; the writer
/// encodes the kind as a one-hot, the flag as 0/1 and the number of sites as its log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GlobalValues {
    /// The resource kind (the `resource_*` one-hot).
    pub resource: ResourceKind,
    /// `budget_ratio_est`, from [`budget_ratio`].
    pub budget_ratio_est: f32,
    /// `budget_ratio_est_lag1..4`.
    pub budget_ratio_lags: BudgetRatioLags,
    /// `resource_level`, from [`resource_level`].
    pub resource_level: f32,
    /// `bandwidth`, from [`bandwidth_share`].
    pub bandwidth: f32,
    /// `token_entropy`, in [0, 1].
    pub token_entropy: f32,
    /// `oov_rate`, in [0, 1].
    pub oov_rate: f32,
    /// `progress`: round / rounds.
    pub progress: f32,
    /// `loss_ratio`: loss / loss at the start.
    pub loss_ratio: f32,
    /// `last_violation`: whether the previous round violated the budget.
    pub last_violation: bool,
    /// `last_cost_ratio`, already clipped to [0, violation_cost_cap].
    pub last_cost_ratio: f32,
    /// `mean_rank`: mean current rank / max rank.
    pub mean_rank: f32,
    /// Number of sites (written as `n_sites_log`).
    pub n_sites: usize,
}

impl GlobalValues {
    /// Writes every global feature into `global` (length [`GLOBAL_FEATURES`]).
    #[inline]
    pub fn write(&self, global: &mut [f32]) {
        assert_eq!(global.len(), GLOBAL_FEATURES, "a global row has GLOBAL_FEATURES entries");
        global[GlobalFeature::ResourceChannel] = (self.resource == ResourceKind::Channel) as u8 as f32;
        global[GlobalFeature::ResourceCompute] = (self.resource == ResourceKind::Compute) as u8 as f32;
        global[GlobalFeature::ResourceBudget] = (self.resource == ResourceKind::Budget) as u8 as f32;
        global[GlobalFeature::BudgetRatioEst] = self.budget_ratio_est;
        global[GlobalFeature::BUDGET_RATIO_LAGS].copy_from_slice(self.budget_ratio_lags.values());
        global[GlobalFeature::ResourceLevel] = self.resource_level;
        global[GlobalFeature::Bandwidth] = self.bandwidth;
        global[GlobalFeature::TokenEntropy] = self.token_entropy;
        global[GlobalFeature::OovRate] = self.oov_rate;
        global[GlobalFeature::Progress] = self.progress;
        global[GlobalFeature::LossRatio] = self.loss_ratio;
        global[GlobalFeature::LastViolation] = self.last_violation as u8 as f32;
        global[GlobalFeature::LastCostRatio] = self.last_cost_ratio;
        global[GlobalFeature::MeanRank] = self.mean_rank;
        // Divided by 8 so that up to 256 sites stay within [0, 1].
        global[GlobalFeature::NSitesLog] = (self.n_sites as f32).log2() / 8.0;
    }
}

/// The static features of one site (shape, cost share, depth, role), by name. They do not
/// change during a run, so [`crate::EnvSpec`] tabulates [`StaticSiteValues::features`] once
/// per site and [`SiteValues`] copies the entry in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StaticSiteValues {
    /// `d_in`: d_in / largest dimension among the sites.
    pub d_in: f32,
    /// `d_out`: d_out / largest dimension among the sites.
    pub d_out: f32,
    /// `cost_share`: cost of one rank unit here / mean over the sites.
    pub cost_share: f32,
    /// `depth`: layer / (layers − 1).
    pub depth: f32,
    /// The projection kind (the `role_*` one-hot, see [`SiteFeature::role_group`]).
    pub role: Role,
}

impl StaticSiteValues {
    /// The static slice of a site row ([`SiteFeature::STATIC`]), in row order.
    pub fn features(&self) -> [f32; STATIC_SITE_FEATURES] {
        let mut row = [0.0f32; SITE_FEATURES];
        row[SiteFeature::DIn] = self.d_in;
        row[SiteFeature::DOut] = self.d_out;
        row[SiteFeature::CostShare] = self.cost_share;
        row[SiteFeature::Depth] = self.depth;
        if let Some(group) = SiteFeature::role_group(self.role) {
            row[group] = 1.0;
        }
        row[SiteFeature::STATIC].try_into().expect("STATIC spans STATIC_SITE_FEATURES entries")
    }
}

/// The features of one site in one round, by name; [`SiteValues::write`] is the only writer of
/// a site row. Each field holds the feature's value as in the [`Observation`] table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SiteValues<'a> {
    /// `rank`: current rank / max rank of the set.
    pub rank: f32,
    /// `rank_log`, from [`rank_log`].
    pub rank_log: f32,
    /// `d_in..=role_mlp_out`, from [`StaticSiteValues::features`] (the spec's table,
    /// [`crate::EnvSpec::static_site_features`]).
    pub static_features: &'a [f32; STATIC_SITE_FEATURES],
    /// `sensitivity`: sensitivity share × n_sites.
    pub sensitivity: f32,
    /// `grad_norm`: gradient-norm share × n_sites.
    pub grad_norm: f32,
    /// `tail_share`: σ_r² / Σ_{k≤r} σ_k² at the current rank (0 at rank 0).
    pub tail_share: f32,
}

impl SiteValues<'_> {
    /// Writes every feature of the site into `row` (length [`SITE_FEATURES`]).
    #[inline]
    pub fn write(&self, row: &mut [f32]) {
        assert_eq!(row.len(), SITE_FEATURES, "a site row has SITE_FEATURES entries");
        row[SiteFeature::Rank] = self.rank;
        row[SiteFeature::RankLog] = self.rank_log;
        row[SiteFeature::STATIC].copy_from_slice(self.static_features);
        row[SiteFeature::Sensitivity] = self.sensitivity;
        row[SiteFeature::GradNorm] = self.grad_norm;
        row[SiteFeature::TailShare] = self.tail_share;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_row_layout() {
        for (i, f) in GlobalFeature::ALL.into_iter().enumerate() {
            assert_eq!(f as usize, i);
            assert_eq!(f.name(), GLOBAL_NAMES[i]);
        }
        for (i, f) in SiteFeature::ALL.into_iter().enumerate() {
            assert_eq!(f as usize, i);
            assert_eq!(f.name(), SITE_NAMES[i]);
        }
        assert_eq!((GLOBAL_FEATURES, SITE_FEATURES, STATIC_SITE_FEATURES), (18, 13, 8));
        assert_eq!(GlobalFeature::NSitesLog.name(), "n_sites_log");
        let lags: Vec<&str> = GLOBAL_NAMES[GlobalFeature::BUDGET_RATIO_LAGS].to_vec();
        assert_eq!(
            lags,
            ["budget_ratio_est_lag1", "budget_ratio_est_lag2", "budget_ratio_est_lag3", "budget_ratio_est_lag4"]
        );
        assert_eq!(SITE_NAMES[SiteFeature::STATIC].first(), Some(&"d_in"));
        assert_eq!(SITE_NAMES[SiteFeature::ROLE_GROUPS], ["role_qk", "role_vo", "role_mlp_in", "role_mlp_out"]);
    }

    #[test]
    fn writers_fill_every_feature_by_name() {
        let mut lags = BudgetRatioLags::filled(0.5);
        lags.push(0.25);
        assert_eq!(lags.values(), &[0.25, 0.5, 0.5, 0.5]);
        let mut obs = Observation::zeros(2);
        GlobalValues {
            resource: ResourceKind::Compute,
            budget_ratio_est: 0.75,
            budget_ratio_lags: lags,
            resource_level: -0.1,
            bandwidth: 0.0,
            token_entropy: 0.6,
            oov_rate: 0.01,
            progress: 0.5,
            loss_ratio: 0.9,
            last_violation: true,
            last_cost_ratio: 1.2,
            mean_rank: 0.125,
            n_sites: 2,
        }
        .write(&mut obs.global);
        let g = &obs.global;
        assert_eq!(
            (g[GlobalFeature::ResourceChannel], g[GlobalFeature::ResourceCompute], g[GlobalFeature::ResourceBudget]),
            (0.0, 1.0, 0.0)
        );
        assert_eq!(&g[GlobalFeature::BUDGET_RATIO_LAGS], lags.values());
        assert_eq!((g[GlobalFeature::Progress], g[GlobalFeature::LastViolation]), (0.5, 1.0));
        assert_eq!(g[GlobalFeature::NSitesLog], 1.0 / 8.0);
        let table = StaticSiteValues { d_in: 1.0, d_out: 0.5, cost_share: 1.5, depth: 0.0, role: Role::Up }.features();
        SiteValues {
            rank: 0.5,
            rank_log: rank_log(4, 8),
            static_features: &table,
            sensitivity: 1.1,
            grad_norm: 0.3,
            tail_share: 0.05,
        }
        .write(obs.site_mut(1));
        let row = obs.site(1);
        assert_eq!((row[SiteFeature::Rank], row[SiteFeature::DOut], row[SiteFeature::CostShare]), (0.5, 0.5, 1.5));
        assert_eq!(&row[SiteFeature::ROLE_GROUPS], &[0.0, 0.0, 1.0, 0.0]);
        assert!((row[SiteFeature::RankLog] - 5f32.log2() / 9f32.log2()).abs() < 1e-6);
        assert_eq!((row[SiteFeature::Sensitivity], row[SiteFeature::TailShare]), (1.1, 0.05));
        assert!(obs.site(0).iter().all(|&x| x == 0.0), "the other row is untouched");
    }

    #[test]
    fn budget_ratio_is_clipped() {
        assert_eq!(budget_ratio(1.0, 2.0), 0.5);
        assert_eq!(budget_ratio(100.0, 2.0), 4.0);
        assert_eq!(budget_ratio(-1.0, 2.0), 0.0);
    }
}
