"""A tiny transformers Llama + PEFT LoRA run with the callback, shared by the single-process
tests and the torchrun script (`python -m torch.distributed.run ... hf_tiny.py OUT ...`)."""

import argparse
import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from rankpilot.hf import RankScheduleCallback

VOCAB, SEQ = 96, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model(seed: int = 0) -> LlamaForCausalLM:
    """Every site has min(d_in, d_out) >= 64, the largest rank of the shipped policies."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def peft_model(seed: int = 0, r: int = 4):
    torch.manual_seed(seed + 1)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0)
    return get_peft_model(base_model(seed), cfg)


class Sequences(torch.utils.data.Dataset):
    """Noisy arithmetic progressions mod VOCAB: learnable structure, so the loss falls."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        step = torch.randint(1, 5, (n, 1), generator=g)
        ids = (start + step * torch.arange(SEQ)) % VOCAB
        noise = torch.rand(n, SEQ, generator=g) < 0.1
        self.ids = torch.where(noise, torch.randint(0, VOCAB, (n, SEQ), generator=g), ids)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _StopAt(TrainerCallback):
    """Stops training after step ``n`` (an interrupted run, for the resume test)."""

    def __init__(self, n):
        self.n = n

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.n:
            control.should_training_stop = True


def train(out: str, scheduler: str, budget: str, steps: int, round_steps: int, batch: int, resource=None, seed=0,
          per_device_batch=None, processes=1, save_steps=None, stop_after=None, resume=None):
    model = peft_model(seed)
    cb = RankScheduleCallback(scheduler=scheduler, budget=budget, round_steps=round_steps, resource=resource, seed=seed)
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=per_device_batch or batch,
        learning_rate=5e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=5, report_to=["tensorboard"],
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        use_cpu=True, seed=seed, data_seed=seed, dataloader_drop_last=True, disable_tqdm=True,
        ddp_backend="gloo" if processes > 1 else None,
    )
    callbacks = [cb] + ([_StopAt(stop_after)] if stop_after else [])
    trainer = Trainer(model=model, args=args, train_dataset=Sequences(batch * steps, seed), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    model.eval()
    val = Sequences(64, seed + 100)
    with torch.no_grad():
        loss = float(model(input_ids=val.ids, labels=val.ids).loss)
    return model, cb, loss


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--scheduler", default="adalora")
    p.add_argument("--budget", default="rank:4")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--round-steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="global batch")
    p.add_argument("--resource", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    model, cb, loss = train(a.out, a.scheduler, a.budget, a.steps, a.round_steps, a.batch, a.resource,
                            per_device_batch=a.batch // world, processes=world)
    lora = {n: p.detach().double().sum().item() for n, p in model.named_parameters() if "lora_" in n}
    with open(os.path.join(a.out, f"result-{rank}.json"), "w") as f:
        json.dump({"world": world, "ranks": [h["ranks"] for h in cb.history], "val_loss": loss, "lora_sums": lora}, f)
    sys.exit(0)
