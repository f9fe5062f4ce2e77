"""Adapter files in PEFT's format: ``adapter_model.safetensors`` + ``adapter_config.json``.

A folder written by :func:`save_adapter` loads in PEFT (``PeftModel.from_pretrained(model, path)``)
and a folder written by PEFT loads here. The adapter pytree *is* PEFT's state dict in nested
form; a file key is ``"base_model.model." + <PEFT's wrapped path> + <leaf suffix>``:

==============================  ===============================================================
adapter entry                   file key (after ``base_model.model.``)
==============================  ===============================================================
``seq.0`` / ``lora_A``           ``seq.0.lora_A.weight`` (Linear, Conv, Conv1D)
``emb`` / ``lora_embedding_A``   ``emb.lora_embedding_A`` (no ``.weight``)
``mha`` / ``out_proj.lora_A``    ``mha.base_layer.out_proj.lora_A.weight``
``seq.4`` / ``weight``           ``seq.4.weight`` (modules_to_save)
``fc`` / ``bias``                ``fc.base_layer.bias`` if ``fc`` carries LoRA, else ``fc.bias``
``raw.w1`` / ``lora_A``          ``raw.lora_A.weight``; PEFT nests one wrapper per targeted
                                 parameter of a module in the module's parameter registration
                                 order (first = innermost), so with ``raw.w2`` registered
                                 before ``raw.w1``: ``raw.base_layer.lora_A.weight`` is ``w2``'s
==============================  ===============================================================

What needs the model (``model=`` or ``lora=``), when saving and loading: the nesting order of
several ``target_parameters`` on one module; custom rules (their leaves and ``file_key``);
shape checks. When saving also: the explicit target list written for ``"all-linear"`` /
``None``, per-module ``rank_pattern`` / ``alpha_pattern`` entries (anchored, ``"^seq\\.0$"``, so
PEFT's sorted JSON cannot change which pattern wins), ``fan_in_fan_out`` for transformers
``Conv1D`` targets, ``auto_mapping``. Without a model the layout comes from the leaf names and
the config (a path is a ``target_parameters`` entry if the config's list matches it), pattern
dicts are written in their insertion order, and a loaded pytree lists its paths in natural
order of the file keys rather than the model's ``named_modules`` order.

Custom rules are recorded by name (``"module:QualName"`` of the module type and the rule class)
in the safetensors metadata (``"funclora"`` entry; ``adapter_config.json`` stays PEFT's, since PEFT
warns on unknown keys). Loading re-registers a recorded rule when its module is already imported
(a file never makes funclora import code) and otherwise names the rule to register.

Several adapters: ``save_adapter(path, {name: adapter}, {name: config})`` and
:func:`load_adapters` use PEFT's layout (``"default"`` at the root, others in subfolders).

Writes are atomic (see :mod:`funclora._files`). Only safetensors and JSON are ever read,
never pickle (PEFT's ``adapter_model.bin`` is refused with a conversion hint).

PEFT-side limits (PEFT 0.21.2): ``fan_in_fan_out`` is one flag per config, so PEFT cannot load
an adapter that targets a transformers ``Conv1D`` together with an ``nn.MultiheadAttention``
(its out_proj delta gets transposed) or ``target_parameters`` (ParamWrapper refuses the flag);
PEFT applies an MHA's out_proj delta twice (PR #3774); its ``modules_to_save`` matching by plain
``endswith`` (#1917) can expect modules funclora does not save. funclora reads such files fine.
"""

from __future__ import annotations

from .load import load_adapter, load_adapter_and_base_weights, load_adapters, read_base_weights, read_config
from .save import save_adapter

__all__ = ["save_adapter", "load_adapter", "load_adapters", "read_config", "read_base_weights",
           "load_adapter_and_base_weights"]
