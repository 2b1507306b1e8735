"""What a user hands in is data, never code: no pickles, no model code unless asked for, no secrets
written anywhere, no output outside the output folder."""

import json
import os
import pickle
import shutil

import pytest

from qtune.config import ModelConfig, QuantConfig, load_config
from qtune.errors import AdapterError, ModelError
from qtune.lora import load_adapter
from qtune.models import load_base
from recipes import sft

FP32 = ModelConfig(dtype="fp32")
NO_QUANT = QuantConfig(method="none")


class _Trap:
    """A pickle that, when loaded, writes a marker file: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_only_base_is_refused_without_unpickling(tiny_model_dir, tmp_path):
    base = tmp_path / "pickled-base"
    shutil.copytree(tiny_model_dir, base)
    (base / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (base / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(ModelError, match="cannot load the base model"):
        load_base(base, FP32, NO_QUANT)
    assert not marker.exists()


def test_model_code_in_a_base_folder_is_not_run_unless_asked_for(tiny_model_dir, tmp_path):
    base = tmp_path / "custom-code-base"
    shutil.copytree(tiny_model_dir, base)
    marker = tmp_path / "code-ran"
    (base / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (base / "config.json").write_text(json.dumps(config))
    assert ModelConfig().trust_remote_code is False
    with pytest.raises(ModelError, match="trust_remote_code"):
        load_base(base, FP32, NO_QUANT)
    assert not marker.exists()


def test_an_adapter_with_pickled_weights_is_refused_without_unpickling(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    marker = tmp_path / "unpickled"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "qtune.json").write_text("{}")
    with pytest.raises(AdapterError, match="adapter_model.safetensors is missing"):
        load_adapter(adapter)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute", "a/b", ".."])
def test_output_names_cannot_point_outside_the_output_folder(tmp_path, tiny_model_dir, name):
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"output.dir={tmp_path / 'out'}", f"output.name={name}"])
    with pytest.raises(AdapterError, match="output.name must be a plain folder name"):
        sft.main(cfg)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out").exists()


def test_no_secret_reaches_any_output_file_or_log(tmp_path, tiny_model_dir, capfd, monkeypatch):
    secret = "hf_qtuneSECRETtoken0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", secret)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "is it good?", "completion": "yes"}) + "\n")
    out = sft.main(
        load_config(
            None,
            [
                f"model.name={tiny_model_dir}",
                "model.dtype=fp32",
                "quant.method=none",
                f"data.train={data}",
                "train.max_steps=2",
                "train.save_every=1",
                f"output.dir={tmp_path / 'adapters'}",
                "output.name=run",
                "output.keep_checkpoints=true",
            ],
        )
    )
    written = [p for p in (tmp_path / "adapters").rglob("*") if p.is_file()]
    assert any(p.parent == out for p in written) and any("checkpoint-" in str(p) for p in written)
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
    logs = capfd.readouterr()
    assert secret not in logs.out and secret not in logs.err
    assert os.environ["HF_TOKEN"] == secret  # (the token was there all along)


def test_an_adapters_own_qtune_json_cannot_switch_on_model_code(tiny_model_dir, tmp_path):
    """A downloaded adapter controls its qtune.json (even the recorded fingerprint): it must not grant trust."""
    from qtune.lora import load_adapter
    from qtune.models import fingerprint_base

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "is it good?", "completion": "yes"}) + "\n")
    args = [f"model.name={base}", "model.dtype=fp32", "quant.method=none", f"data.train={data}", "train.max_steps=1"]
    out = sft.main(load_config(None, [*args, f"output.dir={tmp_path / 'adapters'}", "output.name=run"]))
    # The attacker's edit: model code in the base folder, trust switched on, the fingerprint made to match.
    marker = tmp_path / "code-ran"
    (base / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (base / "config.json").write_text(json.dumps(config))
    meta = json.loads((out / "qtune.json").read_text())
    meta["config"]["model"]["trust_remote_code"] = True
    meta["base"]["fingerprint"] = fingerprint_base(base)
    (out / "qtune.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="ships its own model code"):
        load_adapter(out)
    assert not marker.exists()
