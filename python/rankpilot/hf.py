"""Dynamic LoRA ranks inside transformers' ``Trainer``: :class:`RankScheduleCallback`.

Every ``round_steps`` optimizer steps the callback reads the signals of each PEFT LoRA module
(AdaLoRA importance, gradient norm, the adapter's singular values), asks rankpilot's scheduler
for a rank plan (``policy:<dir>``, ``adalora``, ``squeeze``, ``fixed``, the same Rust code as
``rankpilot finetune --scheduler``), and applies it to ``lora_A`` / ``lora_B``:

- **shrink**: QR-core SVD of ``B·A`` (only an ``r×r`` core is decomposed), keeping the top
  components, split evenly between the factors; the module's optimizer moments are reset, as the
  Rust loop does;
- **grow**: new rows of ``A`` (Kaiming-sized, orthogonal to the kept rows) with zero columns of
  ``B``, so the output is unchanged; their second moments start at the module's mean.

**Fixed shapes.** ``lora_A`` / ``lora_B`` are allocated once at the scheduler's largest rank
(when the ``Trainer`` is built, before the optimizer and DDP see the parameters); a module of rank
``k`` uses the first ``k`` components and keeps the rest exactly zero. A component whose ``A`` row
and ``B`` column are both zero gets zero gradients, and with zeroed moments AdamW leaves it at zero
(weight decay of zero is zero), so no masking hook is needed. Shapes never change during training,
so DDP's gradient buckets, the optimizer's parameter groups and any ``torch.compile`` graph stay
valid without re-wrapping; the price is computing at the largest rank (measured in the README).
At the end of training (:meth:`RankScheduleCallback.on_train_end`) the factors are cut to their
ranks and ``peft_config`` gets ``rank_pattern`` / ``alpha_pattern`` (keeping each module's scale
``alpha / r`` as trained) and ``exclude_modules`` (modules at rank 0), so ``save_pretrained`` writes
an adapter that ``PeftModel.from_pretrained`` loads with the final per-module ranks.

**Checkpoints and resuming.** A ``Trainer`` checkpoint keeps the factors at their allocated size
(what ``trainer.train(resume_from_checkpoint=...)`` loads back, with the optimizer state), plus
``rankpilot_callback.pt`` (each module's rank, the scheduler's and resource's state, the round in
progress) and, in ``adapter/``, the adapter as PEFT loads it (each module at its rank). A resumed
run continues the schedule where it stopped.

**Resource.** With ``resource=`` a preset (a wireless channel, a compute budget), each round is
sent over the simulated resource: a plan over the round's budget is lost and the round's training
is rolled back (adapters and their optimizer state), and a policy may skip a round (the round's
steps still run, then are rolled back: the ``Trainer`` cannot skip steps).

**Several processes.** Under ``torchrun`` / DDP the plan is decided on the global rank 0 and
broadcast; the resized factors are broadcast from rank 0 as well, so every process holds the same
adapter.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback

from . import _native

IMPORTANCE_BETA = (0.85, 0.85)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class _Site:
    """One LoRA module and what the callback tracks for it."""

    name: str
    module: torch.nn.Module
    layer: int
    projection: str
    d_in: int
    d_out: int
    rank: int
    scale: float
    i_bar: tuple[torch.Tensor, torch.Tensor] | None = None
    u_bar: tuple[torch.Tensor, torch.Tensor] | None = None
    grad_norm: float = 0.0
    extra: dict = field(default_factory=dict)

    def a(self, adapter: str) -> torch.nn.Parameter:
        return self.module.lora_A[adapter].weight

    def b(self, adapter: str) -> torch.nn.Parameter:
        return self.module.lora_B[adapter].weight


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def lora_sites(model: torch.nn.Module, adapter: str = "default") -> list[_Site]:
    """The PEFT LoRA modules of ``model`` (linear layers only), in module order. Refuses what
    the callback cannot resize, naming it."""
    from peft.tuners.lora import LoraLayer

    sites = []
    for name, m in model.named_modules():
        if not isinstance(m, LoraLayer) or adapter not in getattr(m, "lora_A", {}):
            continue
        if adapter in getattr(m, "lora_embedding_A", {}):
            raise ValueError(f"{name}: LoRA on an embedding: allowed: LoRA on linear layers")
        if getattr(m, "use_dora", {}).get(adapter, False):
            raise ValueError(f"{name}: use_dora = true: allowed: plain LoRA (use_dora = false)")
        if getattr(m, "fan_in_fan_out", False):
            raise ValueError(f"{name}: fan_in_fan_out = true (a Conv1D layer): allowed: nn.Linear layers")
        base = m.get_base_layer()
        if not isinstance(base, torch.nn.Linear):
            raise ValueError(f"{name}: base layer {type(base).__name__}: allowed: torch.nn.Linear")
        if m.lora_B[adapter].bias is not None:
            raise ValueError(f"{name}: lora_bias = true: allowed: lora_bias = false")
        short = name
        for prefix in ("base_model.model.", "module."):
            while short.startswith(prefix):
                short = short[len(prefix) :]
        layer = _LAYER.search(short)
        sites.append(
            _Site(
                name=short,
                module=m,
                layer=int(layer.group(1)) if layer else 0,
                projection=short.rsplit(".", 1)[-1],
                d_in=base.in_features,
                d_out=base.out_features,
                rank=m.lora_A[adapter].weight.shape[0],
                scale=float(m.scaling[adapter]),
            )
        )
    if not sites:
        raise ValueError(f"the model has no PEFT LoRA modules with adapter `{adapter}`: allowed: a PeftModel with LoRA")
    return sites


def squeeze_qr_core(b: torch.Tensor, a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-``k`` factors of ``b @ a`` (``b`` ``[d_out, r]``, ``a`` ``[r, d_in]``) by
    QR-core SVD: ``b = Q_b R_b``, ``aᵀ = Q_a R_a``, SVD of the ``r×r`` core ``R_b R_aᵀ``.
    Returns ``(b_k, a_k, singular values)`` with the singular values split evenly (``√σ`` to each)."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    root = s[:k].sqrt()
    b_k = (qb @ u[:, :k]) * root
    a_k = root[:, None] * (vh[:k] @ qa.T)
    return b_k.to(b.dtype), a_k.to(a.dtype), s


def singular_values(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The singular values of ``b @ a`` (QR-core route), descending."""
    if b.shape[1] == 0:
        return torch.zeros(0, dtype=torch.float64)
    _, rb = torch.linalg.qr(b.double())
    _, ra = torch.linalg.qr(a.double().T)
    return torch.linalg.svdvals(rb @ ra.T)


def _fresh_rows(existing: torch.Tensor, extra: int, d_in: int, gen: torch.Generator) -> torch.Tensor:
    """``extra`` Kaiming-uniform rows (PEFT's init of ``lora_A``) projected orthogonal to the rows
    of ``existing`` and rescaled to their drawn norms."""
    bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=√5) on a [r, d_in] weight
    fresh = (torch.rand(extra, d_in, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    if existing.shape[0] == 0 or existing.shape[0] + extra > d_in:
        return fresh
    norms = fresh.norm(dim=1, keepdim=True)
    q, _ = torch.linalg.qr(existing.double().T)
    proj = fresh - (fresh @ q) @ q.T
    return proj / proj.norm(dim=1, keepdim=True).clamp_min(1e-12) * norms


class RankScheduleCallback(TrainerCallback):
    """Makes a PEFT LoRA model's ranks dynamic during ``Trainer.train()`` (see the module
    documentation).

    Args:
        scheduler: ``policy:<checkpoint dir>``, ``adalora``, ``squeeze``, ``fixed`` or
            ``fixed:R`` (or a classic one with ``+skip``), as ``rankpilot finetune --scheduler``.
        budget: the average adapter-parameter budget, ``rank:R`` (the parameters of rank R
            everywhere) or a number of parameters.
        round_steps: optimizer steps per round (a plan is decided at every round's start).
        resource: a resource preset (``wireless-rayleigh``, ``latency``, a ``.toml`` path) to send
            every round over, or ``None`` for a plain parameter budget.
        seed: seeds the resource and the new components' directions.
        adapter: the PEFT adapter name.
        logging: write the rounds to TensorBoard under ``rankpilot/`` tags, in the Trainer's own
            TensorBoard run directory (``$TENSORBOARD_LOGGING_DIR``, else the run the Trainer's
            TensorBoard callback just opened under ``output_dir/runs``), or ``logging_dir``.
        logging_dir: the TensorBoard directory to write to instead.

    Pass it to the ``Trainer`` constructor (``callbacks=[...]``), not with ``add_callback`` after
    the fact: the factors are allocated at their largest size when the ``Trainer`` is built.
    """

    def __init__(
        self,
        scheduler: str = "adalora",
        budget: str = "rank:8",
        round_steps: int = 10,
        resource: str | None = None,
        seed: int = 0,
        adapter: str = "default",
        logging: bool = True,
        logging_dir: str | None = None,
    ):
        if round_steps < 1:
            raise ValueError(f"round_steps = {round_steps}: allowed: at least 1")
        self.scheduler = scheduler
        self.budget = budget
        self.round_steps = round_steps
        self.resource = resource
        self.seed = seed
        self.adapter = adapter
        self.logging = logging
        self.logging_dir = logging_dir
        self.sites: list[_Site] = []
        self.capacity = 0
        self.controller: _native.Controller | None = None
        self.history: list[dict] = []
        self._model = None
        self._optimizer = None
        self._losses: list[float] = []
        self._initial_loss = math.nan
        self._round_loss = math.nan
        self._round = -1
        self._plan: tuple[list[int], bool] | None = None
        self._saved = None
        self._writer = None
        self._hook = None
        self._finalized = False

    # ---- set-up -----------------------------------------------------------------------------
    def _shapes(self) -> list[dict]:
        return [
            dict(name=s.name, layer=s.layer, projection=s.projection, d_in=s.d_in, d_out=s.d_out) for s in self.sites
        ]

    def prepare(self, model: torch.nn.Module) -> None:
        """Finds the LoRA modules and allocates their factors at the scheduler's largest rank
        (zero components beyond each module's current rank, so the output is unchanged). Called
        from ``on_init_end``; call it yourself before wrapping the model if you drive the loop."""
        if self.sites:
            return
        self._model = model
        self.sites = lora_sites(model, self.adapter)
        largest = _native.largest_rank(self.scheduler, self.budget, self._shapes())
        self.capacity = max(largest, max(s.rank for s in self.sites))
        with torch.no_grad():
            for s in self.sites:
                cap = min(self.capacity, s.d_in, s.d_out)
                s.extra["capacity"] = cap
                a, b = s.a(self.adapter), s.b(self.adapter)
                if a.shape[0] < cap:
                    pad_a = torch.zeros(cap - a.shape[0], s.d_in, dtype=a.dtype, device=a.device)
                    pad_b = torch.zeros(s.d_out, cap - b.shape[1], dtype=b.dtype, device=b.device)
                    a.data = torch.cat([a.data, pad_a], 0)
                    b.data = torch.cat([b.data, pad_b], 1)
                    s.module.lora_A[self.adapter].out_features = cap
                    s.module.lora_B[self.adapter].in_features = cap

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.prepare(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if not self.sites:
            if _world()[1] > 1:
                raise ValueError(
                    "RankScheduleCallback was added after the Trainer was built: under DDP the factors must be "
                    "allocated first; allowed: Trainer(..., callbacks=[RankScheduleCallback(...)])"
                )
            self.prepare(model)
        self._model = model
        self._optimizer = optimizer
        total = state.max_steps
        rounds = max(1, math.ceil(total / self.round_steps))
        self.controller = _native.Controller(
            self.scheduler,
            self._shapes(),
            self.budget,
            total,
            rounds,
            self.resource,
            self.seed,
            self._token_entropy(model, train_dataloader),
        )
        rank_set = self.controller.rank_set
        if rank_set is not None and max(rank_set) > self.capacity:
            raise ValueError(f"policy ranks {rank_set} exceed the allocated capacity {self.capacity}")
        if state.global_step > 0:
            # A resumed run: the Trainer restored the factors and the optimizer; the schedule
            # continues from the checkpoint's state.
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", self.STATE_FILE)
            if not os.path.exists(path):
                raise ValueError(
                    f"resuming at step {state.global_step} without {path}: allowed: a checkpoint written "
                    "by a run with RankScheduleCallback"
                )
            self.load_state_dict(torch.load(path, weights_only=False))
        self._hook = model.register_forward_hook(self._record_loss)
        if self.logging and state.is_world_process_zero:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=self._tensorboard_dir(args))
            except ImportError:
                self._writer = None

    def _tensorboard_dir(self, args) -> str:
        """Where the Trainer's TensorBoard callback writes (transformers 5 keeps the directory
        in that callback, not in ``TrainingArguments``)."""
        if self.logging_dir:
            return self.logging_dir
        env = os.environ.get("TENSORBOARD_LOGGING_DIR")
        if env:
            return os.path.expanduser(env)
        runs = os.path.join(args.output_dir, "runs")
        reports = args.report_to if isinstance(args.report_to, list) else [args.report_to]
        if os.path.isdir(runs) and ("tensorboard" in reports or "all" in reports):
            subdirs = [os.path.join(runs, d) for d in os.listdir(runs) if os.path.isdir(os.path.join(runs, d))]
            if subdirs:
                return max(subdirs, key=os.path.getmtime)
        return os.path.join(runs, "rankpilot")

    def _token_entropy(self, model, loader) -> float:
        """The training data's normalised unigram entropy (an observation feature), from up to
        200k tokens of the training set."""
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        ds = getattr(loader, "dataset", None) if loader is not None else None
        if not vocab or ds is None:
            return 0.5
        counts = torch.zeros(vocab, dtype=torch.float64)
        seen = 0
        try:
            for i in range(len(ds)):
                ids = torch.as_tensor(ds[i]["input_ids"]).reshape(-1).clamp(0, vocab - 1)
                counts += torch.bincount(ids, minlength=vocab).double()
                seen += ids.numel()
                if seen >= 200_000:
                    break
        except (TypeError, KeyError, IndexError):
            return 0.5
        p = counts[counts > 0] / max(seen, 1)
        return float(-(p * p.log()).sum() / math.log(max(vocab, 2)))

    def _record_loss(self, module, inputs, output):
        loss = getattr(output, "loss", None)
        if module.training and loss is not None:
            self._losses.append(float(loss.detach()))
            if math.isnan(self._initial_loss):
                self._initial_loss = self._losses[0]

    # ---- signals ----------------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        b1, b2 = IMPORTANCE_BETA
        with torch.no_grad():
            for s in self.sites:
                a, b = s.a(self.adapter), s.b(self.adapter)
                if a.grad is None or b.grad is None or s.rank == 0:
                    s.grad_norm = 0.0
                    continue
                k = s.rank
                ga, gb = a.grad[:k], b.grad[:, :k]
                s.grad_norm = float((ga.square().sum() + gb.square().sum()).sqrt())
                cur = ((a[:k] * ga).abs().float(), (b[:, :k] * gb).abs().float())
                if s.i_bar is None or s.i_bar[0].shape != cur[0].shape:
                    s.i_bar = tuple(torch.zeros_like(c) for c in cur)
                    s.u_bar = tuple(torch.zeros_like(c) for c in cur)
                s.i_bar = tuple(b1 * ib + (1 - b1) * c for ib, c in zip(s.i_bar, cur))
                s.u_bar = tuple(b2 * ub + (1 - b2) * (c - ib).abs() for ub, c, ib in zip(s.u_bar, cur, s.i_bar))

    def readings(self) -> list[dict]:
        """Each site's signals for the controller."""
        out = []
        with torch.no_grad():
            for s in self.sites:
                k = s.rank
                a, b = s.a(self.adapter)[:k], s.b(self.adapter)[:, :k]
                if s.i_bar is not None and k > 0 and s.i_bar[0].shape[0] == k:
                    sa = s.i_bar[0] * s.u_bar[0]
                    sb = s.i_bar[1] * s.u_bar[1]
                    importance = float((sa.sum() + sb.sum()) / (sa.numel() + sb.numel()))
                    component = (sa.mean(dim=1) + sb.mean(dim=0)).double().tolist()
                else:
                    importance, component = 0.0, [0.0] * k
                sv = singular_values(b.float().cpu() * s.scale, a.float().cpu()) if k > 0 else torch.zeros(0)
                out.append(
                    dict(
                        rank=k,
                        importance=importance,
                        component_importance=component,
                        grad_norm=s.grad_norm,
                        singular_values=sv.tolist(),
                    )
                )
        return out

    # ---- resizing ---------------------------------------------------------------------------
    def _adam_state(self, p: torch.nn.Parameter) -> dict | None:
        if self._optimizer is None:
            return None
        opt = getattr(self._optimizer, "optimizer", self._optimizer)  # accelerate's wrapper
        return opt.state.get(p)

    def resize(self, site: _Site, new_rank: int, gen: torch.Generator) -> str:
        """Resizes ``site`` to ``new_rank`` in place, function-preserving; returns
        ``"grow"``, ``"shrink"`` or ``"unchanged"``."""
        cap = site.extra["capacity"]
        if not 0 <= new_rank <= cap:
            raise ValueError(f"{site.name}: rank {new_rank}: allowed: 0 to {cap}")
        old = site.rank
        if new_rank == old:
            return "unchanged"
        a, b = site.a(self.adapter), site.b(self.adapter)
        sa, sb = self._adam_state(a), self._adam_state(b)
        with torch.no_grad():
            if new_rank > old:
                rows = _fresh_rows(a[:old].detach().cpu(), new_rank - old, site.d_in, gen)
                a[old:new_rank] = rows.to(a.dtype).to(a.device)
                b[:, old:new_rank] = 0
                # Second moments of the new entries start at the module's mean (the Rust loop's
                # rule): zero would make their first AdamW steps ~3x the usual size.
                for st, sl in ((sa, (slice(old, new_rank), slice(None))), (sb, (slice(None), slice(old, new_rank)))):
                    if st and "exp_avg_sq" in st:
                        v = st["exp_avg_sq"]
                        live = v[:old] if sl[1] == slice(None) else v[:, :old]
                        v[sl] = live.mean() if live.numel() else 0.0
                        st["exp_avg"][sl] = 0.0
                kind = "grow"
            else:
                if new_rank > 0:
                    b_k, a_k, _ = squeeze_qr_core(b[:, :old].detach(), a[:old].detach(), new_rank)
                    a[:new_rank] = a_k
                    b[:, :new_rank] = b_k
                a[new_rank:] = 0
                b[:, new_rank:] = 0
                # The kept components are rotated: their moments no longer apply.
                for st in (sa, sb):
                    if st:
                        for key in ("exp_avg", "exp_avg_sq"):
                            if key in st:
                                st[key].zero_()
                        if "step" in st:
                            st["step"] = torch.zeros_like(st["step"]) if torch.is_tensor(st["step"]) else 0
                site.i_bar = site.u_bar = None
                kind = "shrink"
        site.rank = new_rank
        return kind

    def _snapshot(self):
        snap = []
        for s in self.sites:
            a, b = s.a(self.adapter), s.b(self.adapter)
            opt = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in (self._adam_state(p) or {}).items()} for p in (a, b)]
            snap.append((s.rank, a.detach().clone(), b.detach().clone(), opt, s.i_bar, s.u_bar))
        return snap

    def _restore(self, snap) -> None:
        with torch.no_grad():
            for s, (rank, a0, b0, opt, ib, ub) in zip(self.sites, snap):
                a, b = s.a(self.adapter), s.b(self.adapter)
                a.copy_(a0)
                b.copy_(b0)
                for p, saved in zip((a, b), opt):
                    st = self._adam_state(p)
                    if st is not None:
                        st.clear()
                        st.update(saved)
                s.rank, s.i_bar, s.u_bar = rank, ib, ub

    def _broadcast_factors(self) -> None:
        rank, world = _world()
        if world == 1:
            return
        with torch.no_grad():
            for s in self.sites:
                torch.distributed.broadcast(s.a(self.adapter).data, src=0)
                torch.distributed.broadcast(s.b(self.adapter).data, src=0)

    # ---- rounds -----------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.round_steps != 0 or self.controller is None or self._plan is not None:
            return
        self._round = step // self.round_steps
        self._round_loss = sum(self._losses) / len(self._losses) if self._losses else math.nan
        self._losses = []
        rank, world = _world()
        t0 = time.perf_counter()
        decision = [None]
        if rank == 0:
            ranks, skip, info = self.controller.plan(
                self._round, step, self.readings(), self._round_loss, self._initial_loss
            )
            decision = [(list(ranks), bool(skip), dict(info))]
        if world > 1:
            torch.distributed.broadcast_object_list(decision, src=0)
        ranks, skip, info = decision[0]
        info["plan_ms"] = (time.perf_counter() - t0) * 1e3
        self._plan = (ranks, skip)
        self._info = info
        self._saved = self._snapshot() if (skip or self.controller.simulated) else None
        kinds = []
        if not skip:
            gen = torch.Generator().manual_seed(int(_native.derive_seed(self.seed, self._round)) % 2**63)
            kinds = [self.resize(s, r, gen) for s, r in zip(self.sites, ranks)]
            self._broadcast_factors()
        self._kinds = kinds

    def on_step_end(self, args, state, control, **kwargs):
        if self._plan is None:
            return
        step = state.global_step
        if step % self.round_steps != 0 and step < state.max_steps:
            return
        ranks, skip = self._plan
        rank, world = _world()
        delivered = [True]
        if rank == 0:
            if skip:
                self.controller.settle_skipped()
            else:
                delivered = [bool(self.controller.settle([s.rank for s in self.sites]))]
        if world > 1:
            torch.distributed.broadcast_object_list(delivered, src=0)
        lost = not skip and not delivered[0]
        if skip or lost:
            self._restore(self._saved)
            self._broadcast_factors()
        record = dict(
            round=self._round,
            step=step,
            ranks=[s.rank for s in self.sites],
            planned=ranks,
            skipped=skip,
            lost=lost,
            grew=sum(k == "grow" for k in self._kinds),
            shrank=sum(k == "shrink" for k in self._kinds),
            params=sum(s.rank * (s.d_in + s.d_out) for s in self.sites),
            **{k: v for k, v in self._info.items()},
        )
        self.history.append(record)
        if self._writer is not None:
            w = self._writer
            w.add_scalar("rankpilot/ranks_total", sum(record["ranks"]), step)
            w.add_scalar("rankpilot/adapter_params", record["params"], step)
            w.add_scalar("rankpilot/resource_budget", record["budget"], step)
            w.add_scalar("rankpilot/resource_cost", 0.0 if skip else record["plan_cost"], step)
            w.add_scalar("rankpilot/lost", float(lost), step)
            w.add_scalar("rankpilot/skipped", float(skip), step)
            w.add_scalar("rankpilot/plan_ms", record["plan_ms"], step)
            w.add_histogram("rankpilot/ranks", torch.tensor(record["ranks"], dtype=torch.float32), step)
            w.flush()
        self._plan = None
        self._saved = None

    # ---- saving -----------------------------------------------------------------------------
    def adapter_config_patterns(self) -> tuple[dict, dict, list]:
        """``rank_pattern``, ``alpha_pattern`` and ``exclude_modules`` for the current ranks,
        keeping each module's trained scale (``alpha / r``, or ``alpha / √r`` with rsLoRA)."""
        cfg = self._peft_config()
        rslora = bool(getattr(cfg, "use_rslora", False))
        ranks, alphas, excluded = {}, {}, []
        for s in self.sites:
            if s.rank == 0:
                excluded.append(s.name)
                continue
            ranks[s.name] = s.rank
            alphas[s.name] = s.scale * (math.sqrt(s.rank) if rslora else s.rank)
        return ranks, alphas, excluded

    def _peft_config(self):
        return self._model.peft_config[self.adapter]

    def finalize(self, model: torch.nn.Module | None = None) -> None:
        """Cuts every module's factors to its rank, removes rank-0 modules' adapters and writes
        the ranks into ``peft_config``; ``save_pretrained`` then writes a standard PEFT adapter.
        Called by ``on_train_end``; the model cannot be trained by this callback afterwards."""
        if self._finalized or not self.sites:
            return
        model = model or self._model
        ranks, alphas, excluded = self.adapter_config_patterns()
        with torch.no_grad():
            for s in self.sites:
                m = s.module
                if s.rank == 0:
                    m.delete_adapter(self.adapter)
                    continue
                a, b = s.a(self.adapter), s.b(self.adapter)
                a.data = a.data[: s.rank].clone()
                b.data = b.data[:, : s.rank].clone()
                m.lora_A[self.adapter].out_features = s.rank
                m.lora_B[self.adapter].in_features = s.rank
                m.r[self.adapter] = s.rank
                m.lora_alpha[self.adapter] = alphas[s.name]
                m.scaling[self.adapter] = s.scale
        cfg = self._peft_config()
        cfg.rank_pattern = ranks
        cfg.alpha_pattern = alphas
        if excluded:
            cfg.exclude_modules = sorted(set(list(cfg.exclude_modules or []) + excluded))
        self._finalized = True

    def save_adapter(self, directory: str | os.PathLike) -> None:
        """Writes the adapter as it is now (each module at its rank) to ``directory`` without
        changing the model: ``save_pretrained`` on temporarily cut factors."""
        model = self._model
        if self._finalized:
            model.save_pretrained(directory)
            return
        cfg = self._peft_config()
        ranks, alphas, excluded = self.adapter_config_patterns()
        keep = (dict(cfg.rank_pattern or {}), dict(cfg.alpha_pattern or {}), cfg.exclude_modules)
        full = [(s.a(self.adapter).data, s.b(self.adapter).data) for s in self.sites]
        try:
            for s in self.sites:
                k = max(s.rank, 1)
                s.a(self.adapter).data = full[self.sites.index(s)][0][:k]
                s.b(self.adapter).data = full[self.sites.index(s)][1][:, :k]
            cfg.rank_pattern, cfg.alpha_pattern = ranks, alphas
            if excluded:
                cfg.exclude_modules = sorted(set(list(cfg.exclude_modules or []) + excluded))
            model.save_pretrained(directory)
        finally:
            for s, (a, b) in zip(self.sites, full):
                s.a(self.adapter).data, s.b(self.adapter).data = a, b
            cfg.rank_pattern, cfg.alpha_pattern, cfg.exclude_modules = keep
        if excluded:
            _drop_modules(directory, excluded)

    STATE_FILE = "rankpilot_callback.pt"

    def state_dict(self) -> dict:
        """What a resumed run needs: ranks, importance averages, the controller's state and the
        round in progress (with its rollback snapshot)."""
        return {
            "ranks": [s.rank for s in self.sites],
            "i_bar": [s.i_bar for s in self.sites],
            "u_bar": [s.u_bar for s in self.sites],
            "grad_norm": [s.grad_norm for s in self.sites],
            "controller": self.controller.save_state() if self.controller is not None else None,
            "history": self.history,
            "losses": self._losses,
            "initial_loss": self._initial_loss,
            "round": self._round,
            "plan": self._plan,
            "info": getattr(self, "_info", None),
            "kinds": getattr(self, "_kinds", []),
            "saved": self._saved,
        }

    def load_state_dict(self, st: dict) -> None:
        """Restores :meth:`state_dict` (the factors and optimizer state come from the checkpoint)."""
        if len(st["ranks"]) != len(self.sites):
            raise ValueError(f"{self.STATE_FILE}: {len(st['ranks'])} modules: allowed: this model's {len(self.sites)}")
        for s, r, ib, ub, g in zip(self.sites, st["ranks"], st["i_bar"], st["u_bar"], st["grad_norm"]):
            s.rank, s.i_bar, s.u_bar, s.grad_norm = r, ib, ub, g
        if st["controller"] is not None:
            self.controller.load_state(st["controller"])
        self.history = st["history"]
        self._losses = st["losses"]
        self._initial_loss = st["initial_loss"]
        self._round = st["round"]
        self._plan = st["plan"]
        self._info = st["info"]
        self._kinds = st["kinds"]
        self._saved = st["saved"]

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.sites:
            return
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(ckpt):
            torch.save(self.state_dict(), os.path.join(ckpt, self.STATE_FILE))
            self.save_adapter(os.path.join(ckpt, "adapter"))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.finalize(model)


def _drop_modules(directory, names: list[str]) -> None:
    """Removes the tensors of ``names`` (rank-0 modules, excluded in the config) from a saved
    adapter."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.exists(path):
        return
    tensors = load_file(path)
    kept = {k: v for k, v in tensors.items() if not any(f"{n}.lora_" in k for n in names)}
    save_file(kept, path, metadata={"format": "pt"})
