//! Adam with its state in plain tensors, so checkpoints can save and restore it exactly.
//!
//! tch's `nn::Optimizer` keeps Adam's moments inside libtorch where they cannot be saved, and a
//! resumed run must continue with the same moments to reproduce an uninterrupted one. This is the
//! textbook Adam (Kingma & Ba 2015) with bias correction and PyTorch's ε placement, plus the
//! global gradient-norm clipping PPO uses.

use crate::PolicyError;
use tch::{Kind, Tensor, nn};

/// Adam over the trainable variables of a VarStore.
#[derive(Debug)]
pub struct Adam {
    params: Vec<(String, Tensor)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken (for bias correction).
    pub step: i64,
    /// Learning rate.
    pub lr: f64,
    /// β₁ (default 0.9).
    pub beta1: f64,
    /// β₂ (default 0.999).
    pub beta2: f64,
    /// ε added to √v̂ (1e-5 in PPO, as CleanRL/SB3).
    pub eps: f64,
}

impl Adam {
    /// Adam over every trainable variable of `vs` whose name starts with `prefix`.
    pub fn new(vs: &nn::VarStore, prefix: &str, lr: f64, eps: f64) -> Self {
        let trainable = vs.trainable_variables();
        let mut params: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(name, t)| name.starts_with(prefix) && trainable.iter().any(|v| v.data_ptr() == t.data_ptr()))
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let m = params.iter().map(|(_, p)| p.zeros_like()).collect();
        let v = params.iter().map(|(_, p)| p.zeros_like()).collect();
        Adam { params, m, v, step: 0, lr, beta1: 0.9, beta2: 0.999, eps }
    }

    /// Sets every gradient to zero.
    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// True when every gradient is finite.
    pub fn grads_finite(&self) -> bool {
        self.params.iter().all(|(_, p)| {
            let g = p.grad();
            !g.defined() || g.isfinite().all().int64_value(&[]) == 1
        })
    }

    /// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let norm = tch::no_grad(|| {
            let sq: Vec<Tensor> = self
                .params
                .iter()
                .map(|(_, p)| p.grad())
                .filter(|g| g.defined())
                .map(|g| g.square().sum(Kind::Float))
                .collect();
            if sq.is_empty() { 0.0 } else { Tensor::stack(&sq, 0).sum(Kind::Float).sqrt().double_value(&[]) }
        });
        if norm > max_norm {
            let scale = max_norm / (norm + 1e-6);
            tch::no_grad(|| {
                for (_, p) in &self.params {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.g_mul_scalar_(scale);
                    }
                }
            });
        }
        norm
    }

    /// One Adam step from the current gradients.
    pub fn step(&mut self) {
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.beta2.powi(self.step as i32);
        tch::no_grad(|| {
            for (i, (_, p)) in self.params.iter_mut().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let _ = self.m[i].g_mul_scalar_(self.beta1).g_add_(&(&g * (1.0 - self.beta1)));
                let _ = self.v[i].g_mul_scalar_(self.beta2).g_add_(&(g.square() * (1.0 - self.beta2)));
                let denom = (&self.v[i] / bc2).sqrt() + self.eps;
                let update = (&self.m[i] / bc1) / denom * self.lr;
                let _ = p.g_sub_(&update);
            }
        });
    }

    /// The moments as named tensors (`adam.m.<param>`, `adam.v.<param>`) for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("adam.m.{name}"), self.m[i].shallow_clone()));
            out.push((format!("adam.v.{name}"), self.v[i].shallow_clone()));
        }
        out
    }

    /// Restores the moments saved by [`Adam::state_tensors`].
    pub fn load_state_tensors(&mut self, tensors: &[(String, Tensor)], step: i64) -> Result<(), PolicyError> {
        let find = |key: String| tensors.iter().find(|(n, _)| *n == key).map(|(_, t)| t);
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (slot, key) in [(&mut self.m[i], format!("adam.m.{name}")), (&mut self.v[i], format!("adam.v.{name}"))]
            {
                let t = find(key.clone())
                    .ok_or_else(|| PolicyError::Checkpoint(format!("optimizer state `{key}` missing")))?;
                if t.size() != p.size() {
                    return Err(PolicyError::Checkpoint(format!(
                        "optimizer state `{key}` has shape {:?}, parameter has {:?}",
                        t.size(),
                        p.size()
                    )));
                }
                tch::no_grad(|| slot.copy_(&t.to_device(p.device())));
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn matches_torch_adam_on_a_quadratic() {
        // Minimize ‖x − 3‖² with ours and with libtorch's Adam: same trajectory.
        let run = |ours: bool| -> Vec<f32> {
            let vs = nn::VarStore::new(Device::Cpu);
            let x = vs.root().var("x", &[3], nn::Init::Const(0.0));
            if ours {
                let mut opt = Adam::new(&vs, "", 0.1, 1e-8);
                for _ in 0..20 {
                    opt.zero_grad();
                    (&x - 3.0).square().sum(Kind::Float).backward();
                    opt.step();
                }
            } else {
                let mut opt = nn::OptimizerConfig::build(nn::Adam::default(), &vs, 0.1).unwrap();
                for _ in 0..20 {
                    opt.backward_step(&(&x - 3.0).square().sum(Kind::Float));
                }
            }
            Vec::try_from(&x).unwrap()
        };
        let (a, b) = (run(true), run(false));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn clip_and_state_round_trip() {
        let vs = nn::VarStore::new(Device::Cpu);
        let x = vs.root().var("x", &[2], nn::Init::Const(0.0));
        let mut opt = Adam::new(&vs, "", 0.1, 1e-8);
        opt.zero_grad();
        (&x * Tensor::from_slice(&[30.0f32, 40.0])).sum(Kind::Float).backward();
        let before = opt.clip_grad_norm(5.0);
        assert!((before - 50.0).abs() < 1e-4);
        let g: Vec<f32> = Vec::try_from(x.grad()).unwrap();
        assert!((g[0] - 3.0).abs() < 1e-3 && (g[1] - 4.0).abs() < 1e-3, "{g:?}");
        opt.step();
        let saved = opt.state_tensors();
        let mut other = Adam::new(&vs, "", 0.1, 1e-8);
        other.load_state_tensors(&saved, opt.step).unwrap();
        assert_eq!(Vec::<f32>::try_from(&other.m[0]).unwrap(), Vec::<f32>::try_from(&opt.m[0]).unwrap());
        assert!(other.load_state_tensors(&saved[..1], 1).unwrap_err().to_string().contains("missing"));
    }
}
