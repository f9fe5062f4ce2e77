"""transformers' ``Trainer`` (and TRL's ``SFTTrainer``) saving PEFT adapter folders for a funclora façade.

``fl.get_peft_model(model, config)`` trains in a plain ``transformers.Trainer`` as a PEFT model
does (same columns, labels, loss, ``eval_loss``, checkpointing, logged numbers). Only the files
differ: ``Trainer`` chooses what to write by a closed type check, ``isinstance(model,
(PreTrainedModel, peft.PeftModel))`` in ``Trainer._save``, and resumes adapter folders only for
``peft.PeftModel`` (``_is_peft_model`` in ``Trainer._load_from_checkpoint``). Any other model gets
its ``state_dict()`` written to ``model.safetensors``, which a plain ``Trainer`` also resumes from
(the façade's state dict, loaded back with ``load_state_dict``), but which PEFT cannot read.

The classes here are ``Trainer`` subclasses (the extension point transformers documents, and what
e.g. sentence-transformers does for its own model format) that override exactly those three
methods for a funclora :class:`~funclora.PeftModel`, and nothing for any other model:

- ``_save``: ``save_model`` and every step checkpoint write PEFT's folder
  (``adapter_model.safetensors`` + ``adapter_config.json``, via ``PeftModel.save_pretrained``),
  plus the tokenizer and ``training_args.bin`` as ``Trainer`` does;
- ``_load_from_checkpoint``: ``train(resume_from_checkpoint=...)`` reads the adapter back into the
  façade's parameters in place (the optimizer state loaded next refers to them);
- ``_load_best_model``: ``load_best_model_at_end=True`` likewise.

Example::

    from funclora.trainer import Trainer          # or SFTTrainer (needs trl)
    trainer = Trainer(model=fl.get_peft_model(model, config), args=args, train_dataset=ds)
    trainer.train()
    trainer.save_model("out")                      # peft.PeftModel.from_pretrained(model, "out") reads it

Your own ``Trainer`` subclass gets the same with ``class MyTrainer(AdapterFolders, MyTrainerBase)``.
"""

from __future__ import annotations

import logging
import os

import torch

from .peft_compat import PeftModel

__all__ = ["AdapterFolders", "Trainer", "SFTTrainer"]

logger = logging.getLogger(__name__)


class AdapterFolders:
    """Mixin for a ``transformers.Trainer`` subclass: PEFT adapter folders for funclora façades.

    Put it first among the bases: ``class MyTrainer(AdapterFolders, transformers.Trainer)``.
    """

    def _facade(self, model=None) -> PeftModel | None:
        model = self.model if model is None else model
        model = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        return model if isinstance(model, PeftModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        facade = self._facade()
        if facade is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        logger.info("Saving the funclora adapter to %s", output_dir)
        facade.save_pretrained(output_dir, state_dict=state_dict, is_main_process=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        from transformers.trainer import TRAINING_ARGS_NAME

        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))  # as Trainer._save does

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        facade = self._facade(model)
        if facade is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("Loading the funclora adapter from %s", resume_from_checkpoint)
        facade.load_adapter(resume_from_checkpoint, facade.adapter_name, is_trainable=True)

    def _load_best_model(self) -> None:
        facade = self._facade()
        if facade is None:
            return super()._load_best_model()
        logger.info("Loading the best adapter from %s (score: %s)", self.state.best_model_checkpoint,
                    self.state.best_metric)
        facade.load_adapter(self.state.best_model_checkpoint, facade.adapter_name)


_CACHE: dict[str, type] = {}


def __getattr__(name: str):
    """``Trainer`` / ``SFTTrainer``, made on first use (transformers / trl are imported only then)."""
    if name not in ("Trainer", "SFTTrainer"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _CACHE:
        if name == "Trainer":
            from transformers import Trainer as base
        else:
            try:
                from trl import SFTTrainer as base
            except ImportError as e:  # pragma: no cover - trl is a test dependency
                raise ImportError("funclora.trainer.SFTTrainer needs TRL: pip install trl") from e
        _CACHE[name] = type(name, (AdapterFolders, base), {
            "__module__": __name__,
            "__doc__": f"``{base.__module__}.{base.__name__}`` that writes and resumes PEFT adapter folders for "
                       "a funclora PeftModel (see funclora.trainer)."})
    return _CACHE[name]
