"""Tiny random-init transformers models, one per family, for the transformers test files.

Each spec builds a model from a config (no download), in eval mode, with fixed seed: hidden
size 32, 2 layers, vocabulary 128. ``build(family)`` skips the test (saying why) when the
installed transformers lacks the family.
"""

from dataclasses import dataclass

import pytest
import torch

VOCAB = 128


@dataclass(frozen=True)
class Family:
    name: str                 # config.model_type
    auto: str                 # transformers Auto class that builds the test model
    config: dict
    kind: str = "causal"      # "causal", "seq2seq" or "encoder"
    tied: bool = False        # input embedding and output head share one Parameter


_DEC = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64)

FAMILIES = {f.name: f for f in [
    Family("llama", "AutoModelForCausalLM", dict(_DEC, num_key_value_heads=2)),
    Family("mistral", "AutoModelForCausalLM", dict(_DEC, num_key_value_heads=2, sliding_window=None)),
    Family("qwen2", "AutoModelForCausalLM", dict(_DEC, num_key_value_heads=2)),
    Family("gemma", "AutoModelForCausalLM", dict(_DEC, num_key_value_heads=2, head_dim=8), tied=True),
    Family("phi3", "AutoModelForCausalLM", dict(_DEC, num_key_value_heads=2, pad_token_id=0,
                                                bos_token_id=1, eos_token_id=2)),
    Family("gpt2", "AutoModelForCausalLM", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                               n_positions=64, bos_token_id=0, eos_token_id=0), tied=True),
    Family("gpt_neox", "AutoModelForCausalLM", dict(_DEC, tie_word_embeddings=False)),
    Family("opt", "AutoModelForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64,
                                              num_hidden_layers=2, num_attention_heads=4,
                                              word_embed_proj_dim=32, max_position_embeddings=64,
                                              pad_token_id=1, bos_token_id=2, eos_token_id=2), tied=True),
    Family("bloom", "AutoModelForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
           tied=True),
    Family("falcon", "AutoModelForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4), tied=True),
    Family("bert", "AutoModelForMaskedLM", dict(_DEC, type_vocab_size=2), kind="encoder", tied=True),
    Family("roberta", "AutoModelForMaskedLM", dict(_DEC, max_position_embeddings=66, type_vocab_size=1,
                                                  pad_token_id=1), kind="encoder", tied=True),
    Family("t5", "AutoModelForSeq2SeqLM", dict(vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=8, num_heads=4,
                                              num_layers=2, decoder_start_token_id=0, pad_token_id=0,
                                              eos_token_id=1), kind="seq2seq", tied=True),
    Family("bart", "AutoModelForSeq2SeqLM", dict(vocab_size=VOCAB, d_model=32, encoder_layers=2,
                                                decoder_layers=2, encoder_attention_heads=4,
                                                decoder_attention_heads=4, encoder_ffn_dim=64,
                                                decoder_ffn_dim=64, max_position_embeddings=64,
                                                pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                                decoder_start_token_id=2), kind="seq2seq", tied=True),
]}

NAMES = list(FAMILIES)


def make_config(name: str, **overrides):
    """The family's tiny config; skips the calling test if transformers lacks the family."""
    import transformers

    family = FAMILIES[name]
    try:
        return transformers.AutoConfig.for_model(name, **{**family.config, **overrides})
    except (ValueError, KeyError) as e:
        pytest.skip(f"transformers {transformers.__version__} has no model_type {name!r}: {e}")


def build(name: str, seed: int = 0, **overrides):
    """A random-init tiny model of family ``name`` in eval mode (same seed → same weights)."""
    import transformers

    config = make_config(name, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[name].auto).from_config(config, attn_implementation="eager")
    return model.eval()


def inputs(name: str, batch: int = 2, seq: int = 8, seed: int = 1) -> dict:
    """Keyword inputs for one forward: input_ids, attention_mask (one padded row), labels,
    and decoder_input_ids for encoder–decoder models."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded row: the mask must reach the attention
    out = {"input_ids": ids, "attention_mask": mask}
    if FAMILIES[name].kind == "seq2seq":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, seq - 2), generator=g)
        out["labels"] = torch.randint(3, VOCAB, (batch, seq - 2), generator=g)
    else:
        out["labels"] = torch.randint(3, VOCAB, (batch, seq), generator=g)
    return out


# PEFT's own noise while wrapping a transformers model, silenced here and only here:
# - transformers 5 deprecates `is_gradient_checkpointing`, which PEFT 0.21 still reads;
# - PEFT flips fan_in_fan_out for GPT-2's Conv1D and says so;
# - PEFT warns when a tied embedding / lm_head is adapted (its merge would leak into the twin).
_PEFT_NOISE = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (UserWarning, r"fan_in_fan_out is set to False but the target module is `Conv1D`"),
    (UserWarning, r"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter"),
]


def peft_model(model, **config):
    """PEFT's LoRA on a deep copy of ``model`` (PEFT mutates the model it wraps)."""
    import copy
    import warnings

    import peft

    with warnings.catch_warnings():
        for category, message in _PEFT_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))


def random_adapter(lora, seed=0, scale=0.02):
    """Every leaf ``scale * randn`` (a fresh adapter is a no-op and would prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    return {p: {k: scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in leaves.items()}
            for p, leaves in lora.init(generator=g).items()}


def peft_default_targets(name):
    """PEFT's default target list for ``name``, or None when PEFT's table lacks it."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table

    return table.get(name)
