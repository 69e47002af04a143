"""The Python side of `rankpilot bench finetune`: LoRA fine-tuning tokens/s of the same Llama
configuration in transformers + peft (all seven projections, same rank/alpha, AdamW, grad-norm
clip 1.0, random byte batches), timed like rankpilot's loop.

Usage: bench_finetune.py <json config>
"""
import json
import sys
import time

import torch


def main(cfg):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    mc = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                     num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                     num_key_value_heads=cfg["kv_heads"], head_dim=cfg.get("head_dim"),
                     max_position_embeddings=2048,
                     tie_word_embeddings=False, attn_implementation="sdpa")
    device = torch.device(cfg.get("device", "cpu"))
    model = LlamaForCausalLM(mc)
    if cfg.get("bf16"):
        model = model.to(torch.bfloat16)
    model = model.to(device)
    lc = LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], lora_dropout=0.0,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lc)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    bsz, seq = cfg["batch"], cfg["seq"]
    g = torch.Generator().manual_seed(0)

    def step():
        batch = torch.randint(0, cfg["vocab"], (bsz, seq + 1), generator=g).to(device)
        out = model(input_ids=batch[:, :-1], labels=None)
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, cfg["vocab"]).float(), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(cfg["warmup"]):
        step()
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        step()
    dt = time.perf_counter() - t0
    print(json.dumps({"tokens_per_s": cfg["steps"] * bsz * seq / dt, "step_s": dt / cfg["steps"],
                      "trainable": sum(p.numel() for p in params), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
