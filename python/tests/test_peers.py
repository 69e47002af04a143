"""The PEFT peers of ``rankpilot compare``: ``peft:adalora`` trains with AdaLoRA's orthogonality
penalty in its loss, as PEFT documents it (a plain ``PeftModel`` would skip it)."""

import torch
import torch.nn.functional as F

import hf_tiny
from rankpilot.peers import _peft_model


def test_peft_adalora_adds_its_orthogonality_penalty_to_the_loss():
    job = {"method": "adalora", "rank": 4, "targets": hf_tiny.TARGETS, "alpha": 16.0, "lora_dropout": 0.0,
           "steps": 100}
    model = _peft_model(job, hf_tiny.base_model())
    ids = torch.randint(0, hf_tiny.VOCAB, (2, hf_tiny.SEQ))
    loss = model(input_ids=ids, labels=ids).loss.item()
    logits = model(input_ids=ids).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    # AdaLoRA's penalty: 0.5 × the mean over factors of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F (≈ √6 each
    # for fresh N(0, 0.02²) factors of init_r = 6).
    norms = []
    for name, p in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            norms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0])).item())
    penalty = 0.5 * sum(norms) / len(norms)
    assert penalty > 1.0
    assert abs(loss - ce - penalty) < 1e-4, (loss, ce, penalty)


def test_peft_lora_loss_is_the_cross_entropy():
    job = {"method": "lora", "rank": 4, "targets": hf_tiny.TARGETS, "alpha": 16.0, "lora_dropout": 0.0}
    model = _peft_model(job, hf_tiny.base_model())
    ids = torch.randint(0, hf_tiny.VOCAB, (2, hf_tiny.SEQ))
    loss = model(input_ids=ids, labels=ids).loss.item()
    logits = model(input_ids=ids).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    assert abs(loss - ce) < 1e-5, (loss, ce)


def test_initial_adapter_loads_every_tensor_and_refuses_a_partial_file(tmp_path):
    import pytest
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from rankpilot.peers import load_initial_adapter

    job = {"method": "adalora", "rank": 4, "targets": hf_tiny.TARGETS, "alpha": 16.0, "lora_dropout": 0.0,
           "steps": 100}
    model = _peft_model(job, hf_tiny.base_model())
    state = get_peft_model_state_dict(model)
    # rankpilot's names: PEFT's state-dict keys (no adapter name); SVDLinear's factors have no `.weight`.
    assert any(k.endswith("q_proj.lora_E") for k in state), sorted(state)[:3]
    init = {k: torch.randn_like(v) for k, v in state.items()}
    save_file(init, tmp_path / "init.safetensors")
    assert load_initial_adapter(model, str(tmp_path / "init.safetensors")) == len(state)
    after = get_peft_model_state_dict(model)
    assert all(torch.equal(after[k], init[k]) for k in init)
    # A file that lacks one of the adapter's tensors is refused, naming it.
    missing = sorted(init)[0]
    save_file({k: v for k, v in init.items() if k != missing}, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match=missing.replace(".", r"\.")):
        load_initial_adapter(model, str(tmp_path / "partial.safetensors"))
