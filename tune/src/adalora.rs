//! AdaLoRA as published (Zhang et al., ICLR 2023) and as Hugging Face PEFT implements it: sites
//! in SVD form `B (Λ ⊙ A)` ([`crate::lora::Lora::new_svd`]), an orthogonality penalty on `A` and
//! `B`, and a [`RankAllocator`] that masks entries of `Λ` after every optimizer step, keeping the
//! rank triplets of highest importance within a budget that falls from `init_r` to `target_r`
//! triplets per module on a cubic schedule.
//!
//! Everything follows PEFT 0.21's `RankAllocator` and `AdaLoraModel`, step for step, so that
//! rankpilot's `adalora-svd` rows can be set beside `peft:adalora`:
//!
//! - the budget counts triplets (`init_bgt` = Σ `init_r`, `target_bgt` = `target_r` × modules);
//! - importance is measured after the optimizer step, on the clipped gradient, for `A`, `B` and
//!   `Λ` (`I = |θ·∇θ|` with the EMAs of [`crate::lora::IMPORTANCE_BETA`]);
//! - a triplet's score is `s(Λ_i) + mean_j s(A_ij) + mean_j s(B_ji)`; every masking step zeroes
//!   the `Λ_i` whose score is at most the `(init_bgt − budget)`-th smallest of all scores;
//! - masked entries keep training (their gradient is not zero) and come back when their score
//!   rises; at step `T − tfinal` the pattern is frozen and re-applied after every later step.
//!
//! The one deliberate difference: where PEFT's `torch.kthvalue` would fail (a budget equal to
//! `init_bgt` on a masking step), nothing is masked.

use anyhow::{Result, bail};
use tch::{Kind, Tensor};

use crate::lora::{Importance, Lora};

/// AdaLoRA's settings, PEFT's `AdaLoraConfig` names.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct AdaloraConfig {
    /// Components every site starts with (`init_r`).
    pub init_r: usize,
    /// The average kept components per site at the end (`target_r`).
    pub target_r: usize,
    /// Steps of the initial warm-up without masking (`tinit`).
    pub tinit: usize,
    /// Steps at the end with the pattern frozen (`tfinal`).
    pub tfinal: usize,
    /// Steps between two maskings in the cubic phase (`deltaT`).
    pub delta_t: usize,
    /// The run's optimizer steps (`total_step`).
    pub total_step: usize,
    /// Weight of the orthogonality penalty (`orth_reg_weight`).
    pub orth_reg_weight: f64,
}

impl AdaloraConfig {
    /// PEFT's documented schedule for a run of `steps` steps ending at `target_r`, as
    /// `peft:adalora` runs it: `init_r` = ⌈1.5 · `target_r`⌉, `tinit` = 0.1·T, `tfinal` = 0.2·T,
    /// `deltaT` = 1, `orth_reg_weight` = 0.5 (PEFT's default).
    pub fn peft_schedule(target_r: usize, steps: usize) -> AdaloraConfig {
        AdaloraConfig {
            init_r: (1.5 * target_r as f64).ceil() as usize,
            target_r,
            tinit: (0.1 * steps as f64).round() as usize,
            tfinal: (0.2 * steps as f64).round() as usize,
            delta_t: 1,
            total_step: steps,
            orth_reg_weight: 0.5,
        }
    }

    /// Errors unless the schedule is well formed (PEFT's own checks: `target_r ≤ init_r`,
    /// `tinit + tfinal < total_step`, `deltaT ≥ 1`).
    pub fn check(&self) -> Result<()> {
        let c = self;
        if c.target_r == 0 || c.target_r > c.init_r {
            bail!(rankpilot_config::BadInput(format!(
                "adalora-svd: target rank {} with initial rank {}: allowed: 1 <= target_r <= init_r",
                c.target_r, c.init_r
            )));
        }
        if c.tinit + c.tfinal >= c.total_step || c.delta_t == 0 || c.orth_reg_weight.is_nan() || c.orth_reg_weight < 0.0
        {
            bail!(rankpilot_config::BadInput(format!(
                "adalora-svd: tinit {} + tfinal {} over {} steps, deltaT {}, orth_reg_weight {}: allowed: tinit + tfinal < steps, deltaT >= 1, weight >= 0",
                c.tinit, c.tfinal, c.total_step, c.delta_t, c.orth_reg_weight
            )));
        }
        Ok(())
    }

    /// The triplet budget at optimizer step `step` (0-based) for `init_bgt` and `target_bgt`
    /// triplets, and whether that step masks (PEFT's `budget_schedule`).
    pub fn budget_at(&self, step: usize, init_bgt: usize, target_bgt: usize) -> (usize, bool) {
        let (ti, tf, t) = (self.tinit, self.tfinal, self.total_step);
        if step <= ti {
            (init_bgt, false)
        } else if step + tf > t {
            (target_bgt, true)
        } else {
            let mul = 1.0 - (step - ti) as f64 / (t - tf - ti) as f64;
            let budget = ((init_bgt - target_bgt) as f64 * mul.powi(3) + target_bgt as f64) as usize;
            (budget, step.is_multiple_of(self.delta_t))
        }
    }
}

/// Importance averages of one site's `A`, `B` and `Λ`.
struct TripletImportance {
    a: Importance,
    b: Importance,
    lambda: Importance,
}

/// PEFT's `RankAllocator` with `AdaLoraModel.update_and_allocate`: importance averages per site,
/// the budget schedule, and the frozen pattern of the final phase.
pub struct RankAllocator {
    /// The schedule.
    pub cfg: AdaloraConfig,
    init_bgt: usize,
    target_bgt: usize,
    importance: Vec<Option<TripletImportance>>,
    /// Per site, which components the last masking kept (`[r, 1]` booleans).
    pattern: Option<Vec<Tensor>>,
}

impl RankAllocator {
    /// An allocator for `sites` (all in SVD form), checking `cfg`.
    pub fn new(cfg: AdaloraConfig, sites: &[&Lora]) -> Result<RankAllocator> {
        cfg.check()?;
        if let Some(s) = sites.iter().find(|s| s.lambda.is_none()) {
            bail!("adalora-svd: site {} is not in SVD form", s.name);
        }
        Ok(RankAllocator {
            cfg,
            init_bgt: sites.iter().map(|s| s.rank()).sum(),
            target_bgt: cfg.target_r * sites.len(),
            importance: sites.iter().map(|_| None).collect(),
            pattern: None,
        })
    }

    /// The budget in triplets at the start and at the end.
    pub fn budgets(&self) -> (usize, usize) {
        (self.init_bgt, self.target_bgt)
    }

    /// After the optimizer step `step` (0-based), before the gradients are cleared: updates the
    /// importance with `grad_scale` × each gradient (the clipped gradient the step used) and masks
    /// `Λ` as the schedule says. Returns the budget that step masked to, if it masked.
    pub fn update_and_allocate(&mut self, sites: &mut [&mut Lora], step: usize, grad_scale: f64) -> Option<usize> {
        let freeze_at = self.cfg.total_step - self.cfg.tfinal;
        tch::no_grad(|| {
            if step < freeze_at {
                self.observe(sites, grad_scale);
                let (budget, mask) = self.cfg.budget_at(step, self.init_bgt, self.target_bgt);
                mask.then(|| {
                    self.mask_to_budget(sites, budget);
                    budget
                })
            } else if step == freeze_at {
                let (budget, _) = self.cfg.budget_at(step, self.init_bgt, self.target_bgt);
                self.mask_to_budget(sites, budget);
                // PEFT resets the averages here: the pattern is final.
                self.importance.iter_mut().for_each(|i| *i = None);
                Some(budget)
            } else {
                if let Some(pattern) = &self.pattern {
                    for (s, keep) in sites.iter_mut().zip(pattern) {
                        mask_lambda(s, keep);
                    }
                }
                None
            }
        })
    }

    fn observe(&mut self, sites: &[&mut Lora], grad_scale: f64) {
        for (s, imp) in sites.iter().zip(&mut self.importance) {
            let Some(lambda) = &s.lambda else { continue };
            let (ga, gb, gl) = (s.a.grad(), s.b.grad(), lambda.grad());
            if !ga.defined() || !gb.defined() || !gl.defined() {
                continue;
            }
            let imp = imp.get_or_insert_with(|| TripletImportance {
                a: Importance::zeros_like(&s.a),
                b: Importance::zeros_like(&s.b),
                lambda: Importance::zeros_like(lambda),
            });
            imp.a.observe(&s.a.detach(), &(ga * grad_scale));
            imp.b.observe(&s.b.detach(), &(gb * grad_scale));
            imp.lambda.observe(&lambda.detach(), &(gl * grad_scale));
        }
    }

    /// Each site's triplet scores `[r, 1]` (zeros before any observation).
    fn triplet_scores(&self, sites: &[&mut Lora]) -> Vec<Tensor> {
        sites
            .iter()
            .zip(&self.importance)
            .map(|(s, imp)| match imp {
                Some(i) => {
                    let a = i.a.score().mean_dim(1, true, Kind::Float);
                    let b = i.b.score().mean_dim(0, false, Kind::Float).view([-1, 1]);
                    let ab = Tensor::cat(&[a, b], 1).sum_dim_intlist(1, false, Kind::Float);
                    (i.lambda.score().view([-1]) + ab).view([-1, 1])
                }
                None => Tensor::zeros([s.rank() as i64, 1], (Kind::Float, s.a.device())),
            })
            .collect()
    }

    fn mask_to_budget(&mut self, sites: &mut [&mut Lora], budget: usize) {
        let scores = self.triplet_scores(sites);
        let k = self.init_bgt.saturating_sub(budget);
        let keep: Vec<Tensor> = if k == 0 {
            scores.iter().map(|s| s.ones_like().to_kind(Kind::Bool)).collect()
        } else {
            let all = Tensor::cat(&scores.iter().map(|s| s.view([-1])).collect::<Vec<_>>(), 0);
            let threshold = all.kthvalue(k as i64, 0, false).0.double_value(&[]);
            scores.iter().map(|s| s.gt(threshold)).collect()
        };
        for (s, keep) in sites.iter_mut().zip(&keep) {
            mask_lambda(s, keep);
        }
        self.pattern = Some(keep);
    }
}

/// Zeroes the entries of the site's `Λ` where `keep` is false.
fn mask_lambda(site: &mut Lora, keep: &Tensor) {
    if let Some(l) = &mut site.lambda {
        let _ = l.masked_fill_(&keep.logical_not(), 0.0);
    }
}

/// AdaLoRA's orthogonality penalty, PEFT's `orth_reg_weight × mean over factors of
/// ‖A Aᵀ − I‖_F` (and `‖Bᵀ B − I‖_F`), over the sites in SVD form; `None` without one.
pub fn orthogonality_penalty(sites: &[&Lora], weight: f64) -> Option<Tensor> {
    let mut terms = Vec::new();
    for s in sites.iter().filter(|s| s.lambda.is_some() && s.rank() > 0) {
        let r = s.rank() as i64;
        let eye = Tensor::eye(r, (Kind::Float, s.a.device()));
        terms.push((s.a.matmul(&s.a.tr()) - &eye).norm());
        terms.push((s.b.tr().matmul(&s.b) - &eye).norm());
    }
    let n = terms.len();
    (n > 0).then(|| Tensor::stack(&terms, 0).sum(Kind::Float) * (weight / n as f64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::LoraInit;
    use tch::Device;

    #[test]
    fn the_budget_follows_peft_s_cubic_schedule() {
        let c = AdaloraConfig::peft_schedule(8, 200);
        assert_eq!((c.init_r, c.tinit, c.tfinal), (12, 20, 40));
        let (init, target) = (12 * 28, 8 * 28);
        assert_eq!(c.budget_at(0, init, target), (init, false));
        assert_eq!(c.budget_at(20, init, target), (init, false));
        // PEFT: int((init − target) · (1 − (step − tinit)/(T − tfinal − tinit))³ + target).
        let peft = |step: usize| {
            let mul = 1.0 - (step as f64 - 20.0) / 140.0;
            (((init - target) as f64) * mul.powi(3) + target as f64) as usize
        };
        for step in [21, 50, 100, 159, 160] {
            assert_eq!(c.budget_at(step, init, target), (peft(step), true), "step {step}");
        }
        assert_eq!(c.budget_at(161, init, target), (target, true));
        assert!(AdaloraConfig { target_r: 13, ..c }.check().is_err());
        assert!(AdaloraConfig { tinit: 100, tfinal: 100, ..c }.check().is_err());
    }

    fn svd_site(name: &str, seed: u64) -> Lora {
        Lora::new_svd(name, (16, 12), 4, LoraInit { alpha: 8.0, rslora: false, seed }, Device::Cpu).unwrap()
    }

    #[test]
    fn a_site_in_svd_form_starts_at_zero_and_keeps_its_components() {
        let mut s = svd_site("q", 1);
        let x = Tensor::randn([3, 16], (Kind::Float, Device::Cpu));
        let y = s.forward(&x).unwrap();
        assert_eq!(y.abs().max().double_value(&[]), 0.0, "Λ = 0: no update yet");
        let std = s.a.std(true).double_value(&[]);
        assert!((std - 0.02).abs() < 0.005, "A ~ N(0, 0.02²): std {std}");
        assert_eq!((s.rank(), s.active_rank()), (4, 0));
        assert!(s.resize(3, crate::lora::Shrink::Svd).is_err(), "the allocator masks; a resize would drop its pattern");
        assert_eq!(s.resize(4, crate::lora::Shrink::Svd).unwrap(), crate::lora::ResizeKind::Unchanged);
    }

    /// The allocator keeps the triplets of highest score, globally, and a masked entry can come
    /// back when its score rises: the behaviour PEFT's `mask_to_budget` has.
    #[test]
    fn masking_keeps_the_globally_most_important_triplets() {
        let mut sites = [svd_site("q", 1), svd_site("v", 2)];
        let cfg = AdaloraConfig {
            init_r: 4,
            target_r: 2,
            tinit: 0,
            tfinal: 1,
            delta_t: 1,
            total_step: 10,
            orth_reg_weight: 0.5,
        };
        let mut alloc = RankAllocator::new(cfg, &sites.iter().collect::<Vec<_>>()).unwrap();
        // Gradients that make component i of site l matter in proportion to (l + 1)·(i + 1). The
        // input is fixed, not drawn: torch's global generator is shared by the tests running beside
        // this one, and an unlucky draw could reorder the two sites' scores.
        let x = (Tensor::arange(32 * 16, (Kind::Float, Device::Cpu)) * 0.37).sin().view([32, 16]);
        tch::no_grad(|| {
            for s in &mut sites {
                let _ = s.lambda.as_mut().unwrap().fill_(1.0);
            }
        });
        for step in 1..4 {
            for (l, s) in sites.iter_mut().enumerate() {
                let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([4, 1]) * (l + 1) as f64;
                let h = x.linear(&(&s.a * s.lambda.as_ref().unwrap() * w), None::<Tensor>).linear(&s.b, None::<Tensor>);
                h.square().sum(Kind::Float).backward();
            }
            let mut refs: Vec<&mut Lora> = sites.iter_mut().collect();
            let budget = alloc.update_and_allocate(&mut refs, step, 1.0).unwrap();
            let kept: usize = sites.iter().map(|s| s.active_rank()).sum();
            assert!(kept <= budget, "step {step}: {kept} kept, budget {budget}");
            for s in &mut sites {
                s.zero_grad();
            }
        }
        // Budget at step 3: int(4 · (1 − 3/9)³ + 4) = 5 of 8 triplets; the largest weights win.
        assert_eq!(sites[1].active_rank() + sites[0].active_rank(), 5);
        assert!(sites[1].active_rank() >= sites[0].active_rank());
        let l1: Vec<f32> = Vec::try_from(sites[1].lambda.as_ref().unwrap().view([-1])).unwrap();
        assert_ne!(l1[3], 0.0, "the most important triplet is kept");
    }

    /// Export: a site in SVD form with masked components is the plain LoRA of its kept ones,
    /// with the same output.
    #[test]
    fn the_kept_components_as_plain_lora_give_the_same_output() {
        let mut s = svd_site("q", 5);
        tch::no_grad(|| {
            let l = s.lambda.as_mut().unwrap();
            l.copy_(&Tensor::from_slice(&[0.5f32, 0.0, -1.5, 2.0]).view([4, 1]));
        });
        let (a, b, alpha) = s.plain_factors();
        assert_eq!((a.size(), b.size()), (vec![3, 16], vec![12, 3]));
        let plain = Lora::from_factors("q", a, b, alpha, false);
        let x = Tensor::randn([5, 16], (Kind::Float, Device::Cpu));
        let diff = (s.forward(&x).unwrap() - plain.forward(&x).unwrap()).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{diff}");
        assert_eq!(s.active_rank(), 3);
    }

    #[test]
    fn the_orthogonality_penalty_is_zero_for_orthonormal_factors() {
        let mut s = svd_site("q", 3);
        let q = Tensor::linalg_qr(&Tensor::randn([16, 4], (Kind::Float, Device::Cpu)), "reduced").0;
        s.a = q.tr().contiguous();
        s.b = Tensor::linalg_qr(&Tensor::randn([12, 4], (Kind::Float, Device::Cpu)), "reduced").0;
        let p = orthogonality_penalty(&[&s], 0.5).unwrap().double_value(&[]);
        assert!(p.abs() < 1e-5, "{p}");
        let fresh = svd_site("k", 4);
        // A fresh site's factors are nearly zero: ‖−I‖_F = √r = 2 for each, weight 0.5.
        let p = orthogonality_penalty(&[&fresh], 0.5).unwrap().double_value(&[]);
        assert!((p - 1.0).abs() < 0.05, "{p}");
        assert!(orthogonality_penalty(&[], 0.5).is_none());
    }
}
