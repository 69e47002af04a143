"""Hugging Face PEFT's own methods as rows of ``rankpilot compare``: ``peft:lora``, ``peft:adalora``
and ``peft:eva``.

``rankpilot compare`` writes a job (a JSON file) and the run's token windows (a safetensors file)
and runs ``python -m rankpilot.peers <job.json>`` from the set-up's venv. The windows are the
ones the Rust loop draws for the same seed, so a peer trains on the same batches in the same
order and is evaluated on the same validation windows:

- ``train``: ``[steps × grad_accum, batch, seq_len + 1]``, micro-batch by micro-batch;
- ``val``: ``[windows, seq_len + 1]``, evaluated in batches of ``val_batch`` windows, each
  batch's mean loss weighted by its windows, as ``Finetuner::evaluate`` does;
- ``eva``: the batches EVA's initialisation reads (the Rust side's EVA generator).

Everything else is the job's: base model directory (Hugging Face layout), target projections,
rank, ``lora_alpha``, steps, warm-up and learning-rate schedule (the same formula as
``tune::finetune::LrSchedule``, as a ``LambdaLR``), AdamW's betas, ε and weight decay, global
gradient-norm clipping, seed and thread count. The loss is the mean next-token cross entropy
over every target of a window (``labels = input_ids``: transformers shifts them), so the Rust and
Python base losses on the same windows agree to float rounding.

Methods, each as PEFT documents it:

- ``lora``: ``LoraConfig(r=R)`` on the same projections;
- ``adalora``: ``AdaLoraConfig(init_r=⌈1.5·R⌉, target_r=R, tinit=0.1·T, tfinal=0.2·T, deltaT=1,
  total_step=T, task_type="CAUSAL_LM")``, with ``update_and_allocate(step)`` after every optimizer
  step; its budget is ``target_r × modules`` rank triplets (PEFT's own accounting); the
  orthogonality regularizer (``orth_reg_weight`` 0.5) is PEFT's, added to the loss by
  ``AdaLoraModel.forward`` when labels are passed (which needs the ``task_type``: a plain
  ``PeftModel`` skips it);
- ``eva``: ``LoraConfig(r=R, init_lora_weights="eva", eva_config=EvaConfig(rho=2))`` and
  ``initialize_lora_eva_weights`` over the ``eva`` batches: data-driven initialisation plus EVA's
  rank redistribution (a module may get up to 2R, the total rank stays R × modules).

With ``init`` (a safetensors file, ``rankpilot compare --peer-init rankpilot``) the adapter starts
from the tensors rankpilot's matching row starts from, named as ``get_peft_model_state_dict`` names
them and loaded with ``set_peft_model_state_dict``; every adapter tensor must come from the file.

The result (JSON, written atomically to the job's ``out``) has the fields of rankpilot's
``RunReport``: the validation curve, the final loss, the adapter's trainable parameters (for
AdaLoRA the ones its rank mask keeps, ``Σ r_kept·(d_in + d_out)``, averaged over the steps) and
the wall time, plus the per-step training loss.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time


def lr_factor(schedule: str, k: int, warmup: int, total: int) -> float:
    """``tune::finetune::LrSchedule::factor``: the multiplier at optimizer step ``k`` (0-based)."""
    if k < warmup:
        return k / max(warmup, 1)
    progress = (k - warmup) / max(total - warmup, 1)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    raise ValueError(f"unknown schedule `{schedule}`: allowed: constant, linear, cosine")


def _peft_model(job: dict, model):
    from peft import AdaLoraConfig, EvaConfig, LoraConfig, get_peft_model

    method, r, targets = job["method"], job["rank"], job["targets"]
    common = dict(lora_alpha=job["alpha"], lora_dropout=job["lora_dropout"], target_modules=targets)
    if method == "lora":
        cfg = LoraConfig(r=r, **common)
    elif method == "eva":
        cfg = LoraConfig(r=r, init_lora_weights="eva", eva_config=EvaConfig(rho=job["eva_rho"], use_label_mask=False),
                         **common)
    elif method == "adalora":
        steps = job["steps"]
        # task_type makes get_peft_model return a PeftModelForCausalLM, whose forward goes through
        # AdaLoraModel.forward, which adds the orthogonality penalty to the loss. Without it a plain
        # PeftModel calls the transformers model directly and the penalty is silently skipped
        # (PEFT 0.21; rankpilot's peer ran that way until session 35).
        cfg = AdaLoraConfig(init_r=math.ceil(1.5 * r), target_r=r, tinit=round(0.1 * steps),
                            tfinal=round(0.2 * steps), deltaT=1, total_step=steps, task_type="CAUSAL_LM",
                            **common)
    else:
        raise ValueError(f"unknown PEFT method `{method}`: allowed: lora, adalora, eva")
    return get_peft_model(model, cfg)


def _kept_params(model, method: str) -> int:
    """Trainable adapter parameters the method actually uses: every LoRA factor, or for AdaLoRA
    the components its rank mask keeps (``lora_E`` non-zero)."""
    import torch

    total = 0
    for module in model.modules():
        a = getattr(module, "lora_A", None)
        if not isinstance(a, torch.nn.ModuleDict) and not isinstance(a, torch.nn.ParameterDict):
            continue
        for name in a.keys():
            a_w = a[name].weight if isinstance(a, torch.nn.ModuleDict) else a[name]
            b = module.lora_B[name]
            b_w = b.weight if isinstance(module.lora_B, torch.nn.ModuleDict) else b
            d_in, d_out = a_w.shape[1], b_w.shape[0]
            if method == "adalora":
                kept = int((module.lora_E[name] != 0).sum())
            else:
                kept = a_w.shape[0]
            total += kept * (d_in + d_out)
    return total


def load_initial_adapter(model, path: str) -> int:
    """Sets the adapter's tensors from ``path`` (PEFT's state-dict names) and checks that the file
    held exactly the adapter's tensors, each now in the model unchanged. Returns their count."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    init = load_file(path)
    set_peft_model_state_dict(model, init)
    state = get_peft_model_state_dict(model)
    if set(state) != set(init):
        raise ValueError(f"{path}: tensors {sorted(set(init) ^ set(state))} are not both in the file and the adapter")
    for k, t in init.items():
        if not torch.equal(state[k], t):
            raise ValueError(f"{path}: `{k}` was not loaded into the adapter")
    return len(init)


def run(job: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    import warnings

    import transformers

    # Only errors on stderr: the comparison prints its own line per run.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*low_cpu_mem_usage.*")
    t_start = time.perf_counter()
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    data = load_file(job["windows"])
    train, val = data["train"], data["val"]
    model = LlamaForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    model = _peft_model(job, model)
    method = job["method"]
    if job.get("init"):
        load_initial_adapter(model, job["init"])

    def evaluate() -> float:
        model.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for b in val.split(job["val_batch"]):
                logits = model(input_ids=b[:, :-1]).logits.float()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))
                total += loss.item() * b.shape[0]
                n += b.shape[0]
        return total / n

    if method == "eva":
        from peft import initialize_lora_eva_weights

        eva = data["eva"]
        batches = [{"input_ids": b[:, :-1], "attention_mask": torch.ones_like(b[:, :-1])} for b in eva]
        initialize_lora_eva_weights(model, dataloader=batches, show_progress_bar=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=job["lr"], betas=(job["beta1"], job["beta2"]), eps=job["eps"],
                            weight_decay=job["weight_decay"])
    steps, warmup, accum = job["steps"], job["warmup_steps"], job["grad_accum"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(job["schedule"], k, warmup, steps))
    eval_steps = set(job["eval_steps"])
    curve = [(0, evaluate())]
    train_loss, kept = [], []
    for step in range(steps):
        model.train()
        loss_v = 0.0
        for m in range(accum):
            ids = train[step * accum + m]
            loss = model(input_ids=ids, labels=ids).loss
            (loss / accum if accum > 1 else loss).backward()
            loss_v += loss.item() / accum
        if job["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, job["grad_clip"])
        opt.step()
        if method == "adalora":
            model.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        sched.step()
        train_loss.append(loss_v)
        kept.append(_kept_params(model, method))
        if step + 1 in eval_steps:
            curve.append((step + 1, evaluate()))
    if curve[-1][0] != steps:
        curve.append((steps, evaluate()))
    return {
        "scheduler": job["label"],
        "val_loss_initial": curve[0][1],
        "val_loss_final": curve[-1][1],
        "cost_sent": 0.0,
        "cost_unit": "none",
        "rounds_lost": 0,
        "rounds_skipped": 0,
        "mean_params": sum(kept) / max(len(kept), 1),
        "final_params": kept[-1] if kept else _kept_params(model, method),
        "wall_seconds": time.perf_counter() - t_start,
        "tokens": int(train.shape[0] * train.shape[1] * (train.shape[2] - 1)),
        "val_curve": curve,
        "rounds": [],
        "train_loss": train_loss,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m rankpilot.peers <job.json>", file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        job = json.load(f)
    result = run(job)
    out = job["out"]
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)) or ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f)
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
