"""transformers' Trainer and TRL's SFTTrainer with the façade, each run next to PEFT's with the same
initial adapter: columns, label names, losses, eval_loss, logged numbers, files, resume, checkpointing;
PEFT's task heads, inference_mode and keyword arguments; generate(adapter_names=); embedding base
weights in PEFT folders. The user's model is unchanged after every run."""

import copy
import inspect
import os
import warnings

import pytest
import torch

import funclora as fl
import tiny_transformers as tt
from conftest import assert_unchanged, snapshot
from peft_reference import load_into_peft, peft_key

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

from funclora.trainer import Trainer as FlTrainer  # noqa: E402

CONFIG = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
TOL = dict(rtol=0, atol=1e-4)


def _quiet(fn, *args, **kwargs):
    """PEFT's side of a comparison, with PEFT's / transformers' deprecation notes silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _lm_data(n=24, seq=10, extra=True):
    ids = torch.randint(3, tt.VOCAB, (n, seq), generator=torch.Generator().manual_seed(0)).tolist()
    data = {"input_ids": ids, "labels": ids, "attention_mask": [[1] * seq] * n}
    if extra:
        data["text"] = ["unused"] * n  # a column the model does not take: Trainer must drop it, only it
    return datasets.Dataset.from_dict(data)


def _args(out, **kw):
    settings = dict(per_device_train_batch_size=4, max_steps=6, logging_steps=1, report_to="none",
                    save_strategy="no", disable_tqdm=True, learning_rate=1e-2, weight_decay=0.1, use_cpu=True,
                    seed=0, bf16=False)
    settings.update(kw)
    return transformers.TrainingArguments(str(out), **settings)


def _pair(model, config=CONFIG, seed=1):
    """PEFT's model and the façade, holding the same random (non-trivial) adapter."""
    config = dict(config)
    lora = fl.LoRA(model, fl.LoraConfig(**config))
    adapter = tt.random_adapter(lora, seed=seed)
    theirs = _quiet(tt.peft_model, model, **config)
    load_into_peft(theirs, adapter)
    return theirs, fl.get_peft_model(model, fl.LoraConfig(**config)), adapter


def _load(facade, adapter):
    with torch.no_grad():
        for path, leaves in adapter.items():
            for leaf, value in leaves.items():
                facade.adapter[path][leaf].copy_(value)
    return facade


def _train(trainer_cls, model, args, train, evaluate=None, quiet=False, **kw):
    trainer = trainer_cls(model=model, args=args, train_dataset=train, eval_dataset=evaluate, **kw)
    run = (lambda f, *a, **k: _quiet(f, *a, **k)) if quiet else (lambda f, *a, **k: f(*a, **k))
    run(trainer.train)
    metrics = run(trainer.evaluate) if evaluate is not None else {}
    return trainer, metrics


def _logs(trainer):
    skip = ("runtime", "per_second")
    return [{k: v for k, v in entry.items() if not any(s in k for s in skip)} for entry in trainer.state.log_history]


def _assert_same_adapter(facade, theirs, adapter):
    params = dict(theirs.named_parameters())
    for path, leaves in adapter.items():
        for leaf in leaves:
            torch.testing.assert_close(facade.adapter[path][leaf].detach(), params[peft_key(path, leaf)].detach(),
                                       **TOL)


def _assert_same_logs(ours, theirs):
    a, b = _logs(ours), _logs(theirs)
    assert [sorted(e) for e in a] == [sorted(e) for e in b]
    for x, y in zip(a, b):
        for k in x:
            if isinstance(x[k], float):
                assert abs(x[k] - y[k]) <= 1e-4 * max(1.0, abs(y[k])), (k, x[k], y[k])
            else:
                assert x[k] == y[k], k


def test_trainer_runs_as_with_peft_and_writes_peft_folders(tmp_path):
    """Columns kept, label names, every logged number, eval_loss, the final adapter, weight-decay
    groups and total_flos equal PEFT's run; checkpoints and save_model are PEFT folders."""
    model = tt.build("llama")
    before = snapshot(model)
    theirs, ours, adapter = _pair(model)
    _load(ours, adapter)
    data = _lm_data()
    args = dict(save_strategy="steps", save_steps=3)
    t_peft, m_peft = _train(transformers.Trainer, theirs, _args(tmp_path / "peft", **args), data, data, quiet=True)
    t_ours, m_ours = _train(FlTrainer, ours, _args(tmp_path / "ours", **args), data, data)
    assert t_ours.label_names == t_peft.label_names == ["labels"]
    assert t_ours.model_accepts_loss_kwargs == t_peft.model_accepts_loss_kwargs
    assert t_ours._loss_shifts_labels and t_peft._loss_shifts_labels  # the count behind PEFT's logged loss
    assert len(t_ours.optimizer.param_groups[0]["params"]) == len(t_peft.optimizer.param_groups[0]["params"]) == 8
    _assert_same_logs(t_ours, t_peft)
    assert abs(m_ours["eval_loss"] - m_peft["eval_loss"]) <= 1e-4
    assert t_ours.state.total_flos == t_peft.state.total_flos
    _assert_same_adapter(ours, theirs, adapter)

    t_ours.save_model(str(tmp_path / "final"))
    x = torch.randint(3, tt.VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    want = ours.eval()(input_ids=x).logits
    for folder in (tmp_path / "final", tmp_path / "ours" / "checkpoint-6"):
        assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(folder))
        assert "model.safetensors" not in os.listdir(folder)
        loaded = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(model), str(folder))
        torch.testing.assert_close(loaded(input_ids=x).logits, want, **TOL)
    assert_unchanged(before, model)


def test_plain_transformers_trainer_trains_and_resumes_its_own_checkpoints(tmp_path):
    """Without funclora.trainer: no empty batch, PEFT's numbers; checkpoints are Trainer's generic
    model.safetensors (the façade's state dict), which it resumes from."""
    model = tt.build("llama")
    before = snapshot(model)
    theirs, ours, adapter = _pair(model)
    _load(ours, adapter)
    data = _lm_data()
    t_peft, _ = _train(transformers.Trainer, theirs, _args(tmp_path / "peft"), data, data, quiet=True)
    t_ours, m_ours = _train(transformers.Trainer, ours, _args(tmp_path / "ours", save_strategy="steps", save_steps=3),
                            data, data)
    assert t_ours.label_names == ["labels"] and "eval_loss" in m_ours
    _assert_same_logs(t_ours, t_peft)
    assert "model.safetensors" in os.listdir(tmp_path / "ours" / "checkpoint-3")
    resumed = _load(fl.get_peft_model(model, fl.LoraConfig(**CONFIG)), adapter)
    trainer = transformers.Trainer(model=resumed, args=_args(tmp_path / "ours", save_strategy="steps", save_steps=3),
                                   train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "ours" / "checkpoint-3"))
    _assert_same_adapter(resumed, theirs, adapter)
    assert_unchanged(before, model)


def test_resume_from_a_peft_folder_checkpoint_reaches_the_uninterrupted_adapter(tmp_path):
    model = tt.build("llama")
    _, ours, adapter = _pair(model)
    _load(ours, adapter)
    data = _lm_data()
    args = _args(tmp_path / "run", save_strategy="steps", save_steps=3, lr_scheduler_type="cosine", warmup_steps=2)
    _train(FlTrainer, ours, args, data)
    resumed = _load(fl.get_peft_model(model, fl.LoraConfig(**CONFIG)), adapter)
    with torch.no_grad():
        resumed.adapter["model.layers.0.self_attn.q_proj"]["lora_B"].zero_()  # the checkpoint must overwrite it
    trainer = FlTrainer(model=resumed, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    for path, leaves in ours.adapter.items():
        for leaf, value in leaves.items():
            torch.testing.assert_close(resumed.adapter[path][leaf], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_equals_peft_and_leaves_the_model_alone(tmp_path, reentrant):
    calls = []

    def context_fn():  # counts the layers transformers' checkpointing wraps (non-reentrant only)
        calls.append(1)
        return torch.utils.checkpoint.noop_context_fn()

    kwargs = {"use_reentrant": True} if reentrant else {"use_reentrant": False, "context_fn": context_fn}
    model = tt.build("llama")
    before = snapshot(model)
    theirs, ours, adapter = _pair(model)
    _load(ours, adapter)
    data = _lm_data(n=12, extra=False)
    settings = dict(activation_checkpointing=True, activation_checkpointing_kwargs=kwargs, max_steps=3)
    t_peft, _ = _train(transformers.Trainer, theirs, _args(tmp_path / "peft", **settings), data, quiet=True)
    peft_calls, calls[:] = len(calls), []
    t_ours, _ = _train(transformers.Trainer, ours, _args(tmp_path / "ours", **settings), data)
    assert ours.is_activation_checkpointing
    if not reentrant:
        assert len(calls) == peft_calls == 3 * 2  # 3 steps × 2 decoder layers
    _assert_same_logs(t_ours, t_peft)
    _assert_same_adapter(ours, theirs, adapter)
    assert_unchanged(before, model)  # no gradient_checkpointing flag or hook was set on the model


def test_gradient_checkpointing_argument_as_in_the_issue(tmp_path):
    model = tt.build("llama")
    ours = fl.get_peft_model(model, fl.LoraConfig(**CONFIG))
    with pytest.warns(FutureWarning, match="`gradient_checkpointing` is deprecated"):  # transformers' own note
        args = _args(tmp_path, gradient_checkpointing=True, max_steps=2)
    _train(transformers.Trainer, ours, args, _lm_data(n=8))
    assert ours.is_gradient_checkpointing
    with pytest.raises(ValueError, match="does not support activation checkpointing"):
        fl.get_peft_model(torch.nn.Sequential(torch.nn.Linear(2, 2)),
                          fl.LoraConfig(target_modules=["0"])).gradient_checkpointing_enable()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ("<pad> <s> </s> user assistant hi hello how are you fine thanks what is two plus three five ok "
             "bye").split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                     eos_token="</s>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                               "{% if add_generation_prompt %}assistant {% endif %}")
    return tokenizer


CHATS = [[{"role": "user", "content": "hi how are you"}, {"role": "assistant", "content": "fine thanks"}],
         [{"role": "user", "content": "what is two plus three"}, {"role": "assistant", "content": "five"}],
         [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi ok"}],
         [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "bye bye"}]]


def test_trl_sft_trainer_on_a_chat_dataset_equals_peft_and_saves_peft_folders(tmp_path):
    trl = pytest.importorskip("trl")
    from funclora.trainer import SFTTrainer

    model = tt.build("llama", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    before = snapshot(model)
    theirs, ours, adapter = _pair(model)
    _load(ours, adapter)
    data = datasets.Dataset.from_dict({"messages": CHATS * 3})

    def config(name):
        return trl.SFTConfig(str(tmp_path / name), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                             report_to="none", save_strategy="steps", save_steps=3, disable_tqdm=True,
                             learning_rate=1e-2, use_cpu=True, max_length=32, bf16=False, seed=0,
                             activation_checkpointing=True)  # TRL's default (under transformers' new name)

    t_peft, m_peft = _train(trl.SFTTrainer, theirs, config("peft"), data, data, quiet=True, processing_class=_tokenizer())
    t_ours, m_ours = _train(SFTTrainer, ours, config("ours"), data, data, processing_class=_tokenizer())
    _assert_same_logs(t_ours, t_peft)
    assert abs(m_ours["eval_loss"] - m_peft["eval_loss"]) <= 1e-4
    _assert_same_adapter(ours, theirs, adapter)
    folder = tmp_path / "ours" / "checkpoint-3"
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(os.listdir(folder))
    loaded = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(model), str(folder))
    x = torch.tensor([[1, 3, 5, 6]])
    torch.testing.assert_close(loaded(input_ids=x).logits, ours.eval()(input_ids=x).logits, **TOL)
    assert_unchanged(before, model)
    assert "model_tags" not in vars(model) and "sft" in ours.model_tags  # TRL's tags land on the façade


def test_private_trainer_methods_funclora_overrides_still_exist():
    """funclora.trainer overrides these three (Trainer has no public hook for a model's file format):
    a transformers release that renames them must fail here, not silently write model.safetensors."""
    sig = {name: list(inspect.signature(getattr(transformers.Trainer, name)).parameters)
           for name in ("_save", "_load_from_checkpoint", "_load_best_model")}
    assert sig == {"_save": ["self", "output_dir", "state_dict"],
                   "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
                   "_load_best_model": ["self"]}


# --- task heads, inference_mode, PEFT's arguments -------------------------------------------------

def _task_model(auto, **overrides):
    config = tt.make_config("llama", num_labels=3, pad_token_id=0, **overrides)
    torch.manual_seed(0)
    return getattr(transformers, auto).from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("task,auto,head", [("SEQ_CLS", "AutoModelForSequenceClassification", "score"),
                                            ("TOKEN_CLS", "AutoModelForTokenClassification", "score"),
                                            ("QUESTION_ANS", "AutoModelForQuestionAnswering", "qa_outputs")])
def test_task_type_trains_and_saves_the_head_as_peft(tmp_path, task, auto, head):
    model = _task_model(auto)
    before = snapshot(model)
    config = dict(CONFIG, task_type=task)
    user_config = fl.LoraConfig(**config)
    ours = fl.get_peft_model(model, user_config)
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.LoraConfig(**config))
    assert user_config.modules_to_save is None  # PEFT extends the user's list in place; funclora copies
    assert head in ours.lora.plan.saved
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    adapter = tt.random_adapter(ours.lora, seed=2)
    load_into_peft(theirs, adapter)
    _load(ours, adapter)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, tt.VOCAB, (12, 8), generator=g)
    data = {"input_ids": ids.tolist(), "attention_mask": [[1] * 8] * 12}
    if task == "SEQ_CLS":
        data["labels"] = torch.randint(0, 3, (12,), generator=g).tolist()
    elif task == "TOKEN_CLS":
        data["labels"] = torch.randint(0, 3, (12, 8), generator=g).tolist()
    else:
        data["start_positions"] = torch.randint(0, 8, (12,), generator=g).tolist()
        data["end_positions"] = torch.randint(0, 8, (12,), generator=g).tolist()
    data = datasets.Dataset.from_dict(data)
    t_peft, m_peft = _train(transformers.Trainer, theirs, _args(tmp_path / "peft", max_steps=3), data, data,
                            quiet=True)
    t_ours, m_ours = _train(FlTrainer, ours, _args(tmp_path / "ours", max_steps=3), data, data)
    assert t_ours.label_names == t_peft.label_names
    _assert_same_logs(t_ours, t_peft)
    assert abs(m_ours["eval_loss"] - m_peft["eval_loss"]) <= 1e-4
    _assert_same_adapter(ours, theirs, adapter)
    t_ours.save_model(str(tmp_path / "final"))
    loaded = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(model), str(tmp_path / "final"))
    x = {"input_ids": ids[:2]}
    key = "start_logits" if task == "QUESTION_ANS" else "logits"
    torch.testing.assert_close(loaded(**x)[key], ours.eval()(**x)[key], **TOL)
    back = fl.PeftModel.from_pretrained(model, str(tmp_path / "final"))  # its config lists the head: no warning
    torch.testing.assert_close(back(**x)[key], ours(**x)[key], rtol=0, atol=0)
    assert_unchanged(before, model)


def test_inference_mode_freezes_the_adapter_as_peft():
    model = tt.build("llama")
    config = dict(CONFIG, inference_mode=True)
    ours = fl.get_peft_model(model, fl.LoraConfig(**config))
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.LoraConfig(**config))
    assert not any(p.requires_grad for p in ours.parameters())
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_peft_keyword_arguments(tmp_path):
    model = tt.build("llama").to(torch.bfloat16)
    config = fl.LoraConfig(**CONFIG)
    ours = fl.get_peft_model(model, config, autocast_adapter_dtype=True, low_cpu_mem_usage=False)
    kept = fl.get_peft_model(model, config, autocast_adapter_dtype=False)
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.LoraConfig(**CONFIG),
                    autocast_adapter_dtype=False)
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    assert {p.dtype for p in kept.parameters()} == {p.dtype for p in theirs.parameters() if p.requires_grad} == \
        {torch.bfloat16}
    assert fl.get_peft_model(model, config, revision="v1").peft_config["default"].revision == "v1"
    assert config.revision is None
    with pytest.raises(ValueError, match="LoRA only"):
        fl.get_peft_model(model, config, mixed=True)

    ours.save_pretrained(tmp_path / "none", is_main_process=False)
    assert not os.path.exists(tmp_path / "none")
    ours.save_pretrained(tmp_path / "a", safe_serialization=True, selected_adapters=["default"], is_main_process=True,
                         save_embedding_layers=False)
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(ValueError, match="safetensors"):
        ours.save_pretrained(tmp_path / "b", safe_serialization=False)
    with pytest.raises(ValueError, match="selected_adapters"):
        ours.save_pretrained(tmp_path / "b", selected_adapters=["other"])

    trainable = fl.PeftModel.from_pretrained(model, tmp_path / "a", is_trainable=True, autocast_adapter_dtype=True,
                                             low_cpu_mem_usage=False, ephemeral_gpu_offload=False, token=None,
                                             torch_device="cpu")
    assert trainable.training == model.training and all(p.requires_grad for p in trainable.parameters())
    frozen = fl.PeftModel.from_pretrained(model, tmp_path / "a", autocast_adapter_dtype=False)
    assert not frozen.training and {p.dtype for p in frozen.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(TypeError, match="unexpected keyword"):
        fl.PeftModel.from_pretrained(model, tmp_path / "a", no_such_option=1)


def test_num_parameters_and_model_attributes_as_peft_reports_them():
    model = tt.build("llama")
    config = dict(target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"], r=4)
    ours = fl.get_peft_model(model, fl.LoraConfig(**config))
    theirs = _quiet(tt.peft_model, model, **config)
    for kw in ({}, {"exclude_embeddings": True}, {"only_trainable": True}):
        assert ours.num_parameters(**kw) == theirs.num_parameters(**kw), kw
    assert ours.config is model.config and ours.loss_type == model.loss_type
    assert type(ours).__name__ == "PeftModel[LlamaForCausalLM]" and repr(ours).startswith("PeftModel(")
    assert list(inspect.signature(ours.forward).parameters) == list(inspect.signature(model.forward).parameters)
    with pytest.raises(AttributeError, match="neither has its base model"):
        ours.no_such_attribute


# --- generate with adapter_names ------------------------------------------------------------------

def test_generate_with_adapter_names_mixed_batch_equals_peft():
    model = tt.build("llama")
    config = dict(target_modules=["q_proj", "v_proj", "gate_proj"], modules_to_save=["lm_head"], r=4)
    theirs, ours, adapter = _pair(model, config, seed=3)
    adapter = {p: {k: 10 * v if k == "lora_B" else v for k, v in ls.items()} for p, ls in adapter.items()}
    load_into_peft(theirs, adapter)
    _load(ours, adapter)
    ours.eval(), theirs.eval()
    ids = torch.randint(3, tt.VOCAB, (3, 5), generator=torch.Generator().manual_seed(4))
    names = ["default", "__base__", "default"]
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on generation defaults
        want = theirs.generate(input_ids=ids, adapter_names=names, **settings)
        got = ours.generate(input_ids=ids, adapter_names=names, **settings)
        alone = ours.generate(input_ids=ids, **settings)
        base = model.generate(input_ids=ids, **settings)
        beams = dict(settings, num_beams=2)
        want_beams = theirs.generate(input_ids=ids, adapter_names=names, **beams)
        got_beams = ours.generate(input_ids=ids, adapter_names=names, **beams)
    assert torch.equal(got, want) and torch.equal(got_beams, want_beams)
    assert torch.equal(got[1], base[1]) and torch.equal(got[0], alone[0]) and not torch.equal(alone[1], base[1])
    out = ours(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(out, theirs(input_ids=ids, adapter_names=names).logits, rtol=0, atol=1e-5)
    assert_unchanged(before, model)
    with pytest.raises(ValueError, match="non-existing adapter"):
        ours.generate(input_ids=ids, adapter_names=["default", "other", "default"], **settings)
    ours.train()
    with pytest.raises(ValueError, match="training mode"):
        ours(input_ids=ids, adapter_names=names)


# --- PEFT folders with embedding base weights -----------------------------------------------------

def test_peft_folder_with_embedding_base_layer_and_resized_vocabulary_loads_with_peft_outputs(tmp_path):
    trained = tt.build("llama")
    torch.manual_seed(10)
    trained.resize_token_embeddings(tt.VOCAB + 8)  # new rows: random
    config = dict(target_modules=["q_proj", "embed_tokens"], r=4)
    theirs = _quiet(tt.peft_model, trained, **config)
    load_into_peft(theirs, tt.random_adapter(fl.LoRA(trained, fl.LoraConfig(**config)), seed=4))
    _quiet(theirs.save_pretrained, str(tmp_path / "peft"))  # PEFT also saves embed_tokens.base_layer.weight
    fresh = tt.build("llama")
    torch.manual_seed(11)
    fresh.resize_token_embeddings(tt.VOCAB + 8)  # the same shapes, other new rows
    before = snapshot(fresh)
    x = torch.tensor([[3, tt.VOCAB + 2, 7, tt.VOCAB + 5]])
    want = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(fresh), str(tmp_path / "peft"))(input_ids=x).logits
    ours = fl.PeftModel.from_pretrained(fresh, tmp_path / "peft")
    torch.testing.assert_close(ours(input_ids=x).logits, want, **TOL)
    with pytest.warns(UserWarning, match="differ from the model's own"):
        fl.load_adapter(tmp_path / "peft", model=fresh)
    fl.load_adapter(tmp_path / "peft", model=trained)  # equal base weights: nothing to say
    adapter, _, base = fl.io.load_adapter_and_base_weights(tmp_path / "peft", model=fresh)  # one read, no warning
    assert base.keys() == fl.io.read_base_weights(tmp_path / "peft", model=fresh).keys() == {"model.embed_tokens.weight"}
    assert all(torch.equal(base[n], t) for n, t in fl.io.read_base_weights(tmp_path / "peft", model=fresh).items())
    assert all(torch.equal(adapter[p][k], t) for p, d in fl.load_adapter(tmp_path / "peft", model=trained)[0].items()
               for k, t in d.items())
    ours.save_pretrained(tmp_path / "ours")  # writes them back, as PEFT does
    again = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(fresh), str(tmp_path / "ours"))
    torch.testing.assert_close(again(input_ids=x).logits, want, **TOL)
    torch.testing.assert_close(ours.merge_and_unload()(input_ids=x).logits, want, **TOL)
    assert_unchanged(before, fresh)
