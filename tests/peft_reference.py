"""Build the PEFT model that corresponds to a funclora LoRA and copy adapter values into it."""

import copy

import torch


def peft_twin(model, config_kwargs, adapter, *, copy_model=True):
    """``(peft_model, name_map)``: PEFT on a deep copy of ``model`` holding ``adapter``'s values.

    ``adapter`` is funclora's pytree; its values are copied into PEFT's parameters
    (``base_model.model.<path>.lora_A.default.weight`` …).
    """
    import peft

    base = copy.deepcopy(model) if copy_model else model
    peft_model = peft.get_peft_model(base, peft.LoraConfig(**config_kwargs))
    load_into_peft(peft_model, adapter)
    return peft_model


def peft_key(path, leaf):
    """The in-memory PEFT parameter name of a funclora leaf (adapter name 'default')."""
    prefix = f"base_model.model.{path}"
    if leaf in ("lora_A", "lora_B"):
        return f"{prefix}.{leaf}.default.weight"
    if leaf in ("lora_embedding_A", "lora_embedding_B"):
        return f"{prefix}.{leaf}.default"
    if leaf.startswith("out_proj.lora_"):
        return f"{prefix}.base_layer.out_proj.{leaf.split('.')[1]}.default.weight"
    return f"{prefix}.modules_to_save.default.{leaf}"


@torch.no_grad()
def load_into_peft(peft_model, adapter):
    params = dict(peft_model.named_parameters())
    for path, leaves in adapter.items():
        for leaf, value in leaves.items():
            key = peft_key(path, leaf)
            if key not in params:
                raise KeyError(f"{key} not in PEFT model; PEFT has e.g. {[k for k in params if path in k][:6]}")
            params[key].copy_(value)


def peft_grads(peft_model, adapter):
    """PEFT's gradients, arranged like funclora's adapter pytree."""
    params = dict(peft_model.named_parameters())
    return {p: {leaf: params[peft_key(p, leaf)].grad for leaf in leaves} for p, leaves in adapter.items()}
