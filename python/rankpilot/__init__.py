"""rankpilot from Python: the rank-allocation simulator as Gymnasium environments, trained
rank policies, and a transformers ``Trainer`` callback that makes a PEFT LoRA model's ranks
dynamic during training.

- :func:`make_env` / :func:`make_vec_env` (:mod:`rankpilot.envs`): Gymnasium environments over
  the Rust simulator (``info`` carries the oracle's return, so the gap closed can be computed);
- :class:`Policy`: a checkpoint written by ``rankpilot train`` acting on an observation, with the
  same decisions as the CLI;
- :class:`rankpilot.hf.RankScheduleCallback`: the ``Trainer`` callback (import
  :mod:`rankpilot.hf`; it needs torch, transformers and peft).

The numerical work runs in Rust (``rankpilot._native``).
"""

from . import _native
from ._native import derive_seed, global_feature_names, preset_names, site_feature_names
from .envs import RankEnv, RankVectorEnv, make_env, make_vec_env
from .policy import Policy

__version__ = _native.__version__

__all__ = [
    "Policy",
    "RankEnv",
    "RankVectorEnv",
    "derive_seed",
    "global_feature_names",
    "make_env",
    "make_vec_env",
    "preset_names",
    "site_feature_names",
]
