"""What the Trainer callback costs (`make bench`): optimizer steps per second of a transformers
Trainer + PEFT LoRA run on a small Llama (CPU), plain and under `RankScheduleCallback`.

Rows:
- plain PEFT LoRA at r = 8 (no callback);
- the callback with `fixed:8` (factors allocated at 8: the signal bookkeeping and round work alone);
- plain PEFT LoRA at r = 64 (what computing at the largest rank costs by itself);
- the callback with `policy:checkpoints/default` at budget rank:8 (factors at the policy's largest
  rank, 64, active ranks as planned): the fixed-shape design as used.

Usage: callback_overhead.py [steps] [threads]; prints a Markdown table.
"""
import os
import sys
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from rankpilot.hf import RankScheduleCallback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB, SEQ, BATCH = 512, 128, 8


class Data(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run(r, scheduler, steps):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    callbacks = [RankScheduleCallback(scheduler=scheduler, budget="rank:8", round_steps=10, logging=False)] if scheduler else []
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=1e-3,
                                 report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=10**6)
        trainer = Trainer(model=model, args=args, train_dataset=Data(BATCH * steps), callbacks=callbacks)
        t0 = time.perf_counter()
        trainer.train()
        return steps / (time.perf_counter() - t0)


def main(steps=40, threads=1):
    torch.set_num_threads(threads)
    policy = "policy:" + os.path.join(ROOT, "checkpoints", "default")
    rows = [
        ("PEFT LoRA r=8, no callback", 8, None),
        ("callback fixed:8 (factors at 8)", 8, "fixed:8"),
        ("PEFT LoRA r=64, no callback", 64, None),
        ("callback policy:default, budget rank:8 (factors at 64)", 8, policy),
    ]
    print(f"Trainer optimizer steps/s, 4 layers x 256, seq {SEQ}, batch {BATCH}, {steps} steps, {threads} thread(s)\n")
    print("| run | steps/s | vs plain r=8 |")
    print("|---|---:|---:|")
    base = None
    for name, r, sched in rows:
        sps = run(r, sched, steps)
        base = base or sps
        print(f"| {name} | {sps:.2f} | {sps / base:.2f}x |")


if __name__ == "__main__":
    main(*(int(x) for x in sys.argv[1:3]))
