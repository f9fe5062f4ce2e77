"""funclora.io on bad files and failing disks: clear errors, atomic writes, never pickle."""

import json
import os
import pickle
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from io_models import MLP, build, random_adapter

import funclora as fl

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
DOCUMENTED = (fl.AdapterFileError, fl.AdapterMismatchError, fl.TargetNotFoundError, fl.UnsupportedModuleError)


@pytest.fixture(autouse=True)
def no_pickle(monkeypatch):
    """Reading adapter files must never unpickle."""
    def refuse(*args, **kwargs):
        raise AssertionError("funclora.io unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def _model_and_lora():
    model = build(MLP)
    return model, fl.LoRA(model, fl.LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"], r=2))


def _saved(folder, seed=0):
    model, lora = _model_and_lora()
    fl.save_adapter(folder, random_adapter(lora, seed), lora=lora)
    return model


def _snapshot(folder):
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.isdir(path):
                out[rel] = None
            else:
                with open(path, "rb") as f:
                    out[rel] = f.read()
    return out


# --- missing and unreadable files ----------------------------------------------------------------
def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"load_adapter: the folder '.*nope' does not exist"):
        fl.load_adapter(tmp_path / "nope")
    _saved(tmp_path)
    with pytest.raises(FileNotFoundError, match="is a file; pass the folder"):
        fl.load_adapter(tmp_path / WEIGHTS)
    os.remove(tmp_path / WEIGHTS)
    with pytest.raises(FileNotFoundError, match=f"'.*{WEIGHTS}' is missing"):
        fl.load_adapter(tmp_path)
    _saved(tmp_path)
    os.remove(tmp_path / CONFIG)
    with pytest.raises(FileNotFoundError, match=f"'.*{CONFIG}' is missing"):
        fl.load_adapter(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"'.*{CONFIG}' is missing"):
        fl.LoraConfig.from_pretrained(tmp_path)


def test_pickle_file_is_refused_with_a_conversion_hint(tmp_path):
    _saved(tmp_path)
    os.replace(tmp_path / WEIGHTS, tmp_path / "adapter_model.bin")
    with pytest.raises(fl.AdapterFileError, match=r"adapter_model.bin, a pickle file.*never unpickles.*save_file"):
        fl.load_adapter(tmp_path)


@pytest.mark.parametrize("content, what", [
    (b"", "the file is empty"),
    (b"\x01\x02\x03", "it has only 3 bytes"),
    (b"\xff" * 64, "its header claims 18446744073709551615 bytes but the file has 64"),
    (b"\x04\x00\x00\x00\x00\x00\x00\x00nope", "its header is not JSON"),
    (b"\x02\x00\x00\x00\x00\x00\x00\x00[]", "its header is not a JSON object"),
])
def test_garbage_weights(tmp_path, content, what):
    _saved(tmp_path)
    (tmp_path / WEIGHTS).write_bytes(content)
    with pytest.raises(fl.AdapterFileError,
                       match=f"load_adapter: '.*{WEIGHTS}' is not a valid safetensors file: {what}"):
        fl.load_adapter(tmp_path)


def test_every_truncation_is_reported(tmp_path):
    model = _saved(tmp_path)
    data = (tmp_path / WEIGHTS).read_bytes()
    for n in list(range(0, 200)) + list(range(200, len(data), 37)) + [len(data) - 1]:
        (tmp_path / WEIGHTS).write_bytes(data[:n])
        with pytest.raises(fl.AdapterFileError, match="not a valid safetensors file"):
            fl.load_adapter(tmp_path, model=model)
    (tmp_path / WEIGHTS).write_bytes(data + b"\0")
    with pytest.raises(fl.AdapterFileError, match="trailing bytes"):
        fl.load_adapter(tmp_path)


@pytest.mark.parametrize("content, error, what", [
    ("{not json", fl.AdapterFileError, "is not valid JSON"),
    ("[1, 2]", fl.AdapterFileError, "must hold a JSON object, found list"),
    ('{"peft_type": "PREFIX_TUNING"}', fl.AdapterFileError, "is a 'PREFIX_TUNING' adapter"),
    ('{"peft_type": "LORA", "use_qalora": true}', fl.AdapterFileError, "use_qalora=True"),
    ('{"peft_type": "LORA", "r": -1}', fl.AdapterFileError, "positive int"),
])
def test_bad_config(tmp_path, content, error, what):
    _saved(tmp_path)
    (tmp_path / CONFIG).write_text(content)
    with pytest.raises(error, match=f"'.*{CONFIG}'.*{what}"):
        fl.load_adapter(tmp_path)


def test_config_that_does_not_fit_the_model(tmp_path):
    model = _saved(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps({"peft_type": "LORA", "target_modules": ["nope"]}))
    with pytest.raises(fl.TargetNotFoundError, match=r"load_adapter: the config of .* does not fit the model"):
        fl.load_adapter(tmp_path, model=model)


# --- corruption: only documented errors, ever ------------------------------------------------------
@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    model = _saved(folder)
    return model, (folder / WEIGHTS).read_bytes(), (folder / CONFIG).read_bytes()


def _load_or_documented_error(folder, model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. unknown config keys, unmatched patterns
        for kwargs in ({"model": model}, {}):
            try:
                adapter, config = fl.load_adapter(folder, **kwargs)
            except DOCUMENTED:
                continue
            if kwargs:
                fl.LoRA(model, config).check(adapter)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_weights_raise_only_documented_errors(tmp_path, good_files, data):
    model, weights, config = good_files
    raw = bytearray(weights)
    header_len = 8 + int.from_bytes(raw[:8], "little")
    for _ in range(data.draw(st.integers(1, 4))):   # mostly the header: data bytes only change values
        i = data.draw(st.integers(0, header_len - 1) | st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    (tmp_path / WEIGHTS).write_bytes(bytes(raw))
    (tmp_path / CONFIG).write_bytes(config)
    _load_or_documented_error(tmp_path, model)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_config_raises_only_documented_errors(tmp_path, good_files, data):
    model, weights, config = good_files
    raw = bytearray(config)
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.sampled_from(b'0123456789"{}[],:.-truefalsn \xff'))
    (tmp_path / WEIGHTS).write_bytes(weights)
    (tmp_path / CONFIG).write_bytes(bytes(raw))
    _load_or_documented_error(tmp_path, model)


# --- atomic writes -------------------------------------------------------------------------------
def _failing(monkeypatch, module, name, at):
    """Make ``module.name`` raise on its ``at``-th call (1-based); other calls work."""
    real, calls = getattr(module, name), []

    def fake(*args, **kwargs):
        calls.append(args)
        if len(calls) == at:
            raise OSError(f"simulated failure of {name} call {at}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, fake)
    return calls


@pytest.mark.parametrize("name, at", [("replace", 1), ("replace", 2), ("replace", 3), ("replace", 4),
                                      ("fsync", 1), ("fsync", 2), ("fsync", 3), ("fsync", 4),
                                      ("link", 1), ("link", 3), ("open", 2), ("mkdir", 1)])
def test_failed_save_keeps_the_old_files(tmp_path, monkeypatch, name, at):
    model, lora = _model_and_lora()
    old = random_adapter(lora, 1)
    fl.save_adapter(tmp_path, {"default": old, "x": old}, {"default": lora.config, "x": lora.config}, model=model)
    (tmp_path / "x" / WEIGHTS).unlink()         # a half-there named adapter, to be completed
    before = _snapshot(tmp_path)
    new = random_adapter(lora, 2)
    calls = _failing(monkeypatch, os, name, at)
    try:
        fl.save_adapter(tmp_path, {"default": new, "x": new, "y": new},
                        {"default": lora.config, "x": lora.config, "y": lora.config}, model=model)
    except OSError as e:
        assert "simulated failure" in str(e)
        assert _snapshot(tmp_path) == before   # byte-identical, nothing added (no tmp, no folder y)
    else:
        assert name == "link" or len(calls) < at   # a failed hard link falls back to copying
        monkeypatch.undo()
        for n in ("default", "x", "y"):
            assert torch.equal(fl.load_adapter(tmp_path, adapter_name=n, model=model)[0]["seq.0"]["lora_A"],
                               new["seq.0"]["lora_A"])
        assert sorted(_snapshot(tmp_path)) == sorted([CONFIG, WEIGHTS, "x", "y"] + [
            os.path.join(d, f) for d in "xy" for f in (CONFIG, WEIGHTS)])


def test_failed_write_in_a_new_folder_leaves_nothing(tmp_path, monkeypatch):
    import funclora._files as fio

    _, lora = _model_and_lora()

    def boom(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fio, "write_safetensors", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        fl.save_adapter(tmp_path / "a" / "b", random_adapter(lora), lora=lora)
    assert os.listdir(tmp_path) == []


def test_success_leaves_only_the_two_files(tmp_path):
    _saved(tmp_path)
    _saved(tmp_path, seed=1)   # overwrite
    assert sorted(os.listdir(tmp_path)) == [CONFIG, WEIGHTS]
    assert oct(os.stat(tmp_path / WEIGHTS).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_restore_does_not_leave_a_backup_of_identical_bytes(tmp_path, monkeypatch):
    """The first swap fails and so does restoring its backup, but the destination still is the
    backup's hard link (the same bytes): the backup is removed, not left behind as a hidden .tmp."""
    model, lora = _model_and_lora()
    fl.save_adapter(tmp_path, random_adapter(lora, 1), lora=lora)
    before = _snapshot(tmp_path)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) <= 2:
            raise OSError("simulated failure")   # the first swap, then restoring its backup
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated failure"):
        fl.save_adapter(tmp_path, random_adapter(lora, 2), lora=lora)
    monkeypatch.undo()
    assert len(calls) == 2
    assert sorted(os.listdir(tmp_path)) == [CONFIG, WEIGHTS] and _snapshot(tmp_path) == before


def test_save_destination_errors_say_what_is_wrong(tmp_path):
    model, lora = _model_and_lora()
    adapter = random_adapter(lora)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"save_adapter: '.*file' exists and is not a folder"):
        fl.save_adapter(tmp_path / "file" / "sub", adapter, lora=lora)
    with pytest.raises(ValueError, match=r"adapter name 'a\\x00b' must be a plain folder name \(no '/', no NUL byte"):
        fl.save_adapter(tmp_path, adapter, lora=lora, adapter_name="a\0b")
    with pytest.raises(TypeError, match=r"`config` must be a funclora.LoraConfig .*to_dict\(\)\?"):
        fl.save_adapter(tmp_path, adapter, lora.config.to_dict())
    with pytest.raises(TypeError, match=r"adapter\['seq.0'\]\['lora_A'\] has dtype torch.complex64"):
        fl.save_adapter(tmp_path, {**adapter, "seq.0": {**adapter["seq.0"],
                                                        "lora_A": adapter["seq.0"]["lora_A"].to(torch.complex64)}},
                        lora.config)
    with pytest.raises(ValueError, match=r"adapter\['seq.2'\]\['lora_B'\] holds NaN or infinite values"):
        fl.save_adapter(tmp_path, {**adapter, "seq.2": {**adapter["seq.2"],
                                                        "lora_B": adapter["seq.2"]["lora_B"] / 0}}, lora=lora)
    with pytest.raises(fl.AdapterMismatchError, match=r"adapter\['seq.0'\]\['lora_A'\] has shape \(3, 2, 20\).*"
                                                      r"rank for 'seq.0' is 2.*looks stacked"):
        fl.save_adapter(tmp_path, fl.stack([adapter] * 3), lora.config)
    assert sorted(os.listdir(tmp_path)) == ["file"]
