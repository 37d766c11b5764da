"""PEFT export: the folder `export_peft` writes loads in peft 0.21 on the real base (from the same GGUF) and
computes exactly W + (alpha / r) B @ A, the same delta llama.cpp applies for the GGUF adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from p2p_local.adapter import LoraAdapter, tensor_name, write_adapter
from p2p_local.errors import AdapterError
from p2p_local.peft_export import (
    CONFIG_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    export_peft,
    gguf_to_hf_name,
    peft_state_dict,
)
from trainer.base import load_base, merged_lora

RANK = 4
ALPHA = 3.0  # alpha / r = 0.75: a config that wrote r, or alpha / r, as lora_alpha would change the logits


@pytest.fixture(scope="module")
def torch_base(base_model_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads only spin
    yield load_base(base_model_path)
    torch.set_num_threads(threads)


def make_adapter(base, placement: dict[str, list[int]], seed: int = 0) -> LoraAdapter:
    """Random pairs at `placement` ({"attn_q": [layers], ...}), big enough to move logits by units."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, layers in placement.items():
        for layer in layers:
            n_out, n_in = base.shapes[tensor_name(layer, module)]
            a = (rng.standard_normal((RANK, n_in)) / np.sqrt(n_in)).astype(np.float32)
            b = (rng.standard_normal((n_out, RANK)) / np.sqrt(RANK)).astype(np.float32)
            tensors[tensor_name(layer, module)] = (a, b)
    return LoraAdapter(tensors=tensors, alpha=ALPHA, arch=base.arch)


REGULAR = {"attn_q": list(range(0, 18, 2)), "attn_v": list(range(0, 18, 2))}
IRREGULAR = {"attn_q": [0, 5], "attn_v": [3], "attn_output": [17], "ffn_down": [5]}


def test_config_fields(engine, tmp_path):
    out = export_peft(make_adapter(engine.base, REGULAR), tmp_path / "peft")
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA  # PEFT's alpha / r == llama.cpp's alpha / r
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["layers_to_transform"] == REGULAR["attn_q"]
    assert config["bias"] == "none" and config["use_rslora"] is False
    weights = load_file(str(out / WEIGHTS_FILE))
    assert weights["base_model.model.model.layers.4.self_attn.q_proj.lora_A.weight"].shape == (RANK, 640)
    assert weights["base_model.model.model.layers.4.self_attn.v_proj.lora_B.weight"].shape == (256, RANK)
    assert len(weights) == 2 * 2 * len(REGULAR["attn_q"])


@pytest.mark.filterwarnings("ignore:The PEFT config's `base_model_name_or_path` was renamed")
@pytest.mark.parametrize("placement", [REGULAR, IRREGULAR], ids=["regular", "irregular"])
def test_peft_selects_exactly_our_modules_and_keys(placement, torch_base, engine, tmp_path):
    """peft itself, given our adapter_config.json, puts LoRA on exactly our modules and names their
    weights exactly as our safetensors keys (checked on a weightless meta-device copy of the model)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(engine.base, placement)
    out = export_peft(adapter, tmp_path / "peft")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(torch_base[0].config)
    peft_model = get_peft_model(skeleton, LoraConfig.from_pretrained(str(out)))
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    ours = {k: v.shape for k, v in load_file(str(out / WEIGHTS_FILE)).items()}
    assert ours == expected
    assert set(peft_model.targeted_module_names) == {gguf_to_hf_name(n) for n in adapter.tensors}


def test_peft_model_matches_merged_weights(torch_base, engine, tmp_path):
    """PeftModel.from_pretrained on the real base == manual merge W + (alpha / r) B @ A, != base."""
    from peft import PeftModel

    model, _ = torch_base
    adapter = make_adapter(engine.base, REGULAR)
    out = export_peft(adapter, tmp_path / "peft")
    ids = torch.tensor([engine.tokenize("Ingredients: flour, sugar, eggs, and")])
    with torch.no_grad():
        base = model(ids).logits[0, -3:]
        with merged_lora(model, adapter.tensors, ALPHA / RANK):
            merged = model(ids).logits[0, -3:]
        peft_model = PeftModel.from_pretrained(model, str(out))
        try:
            peft_model.eval()
            # Our arrays are in the PEFT model as written (a wrong key prefix would leave them random/zero).
            for name, (a, b) in adapter.tensors.items():
                module = peft_model.base_model.model.get_submodule(gguf_to_hf_name(name))
                assert torch.equal(module.lora_A["default"].weight, torch.from_numpy(a))
                assert torch.equal(module.lora_B["default"].weight, torch.from_numpy(b))
                assert module.scaling["default"] == pytest.approx(ALPHA / RANK)
            via_peft = peft_model(input_ids=ids).logits[0, -3:]
        finally:
            peft_model.unload()  # give the module fixture its plain base back
    assert (merged - base).abs().max() > 1.0
    torch.testing.assert_close(via_peft, merged, atol=2e-3, rtol=1e-4)


def test_export_from_gguf_file_equals_in_memory(engine, tmp_path):
    adapter = make_adapter(engine.base, IRREGULAR)
    gguf_path = write_adapter(tmp_path / "a.gguf", adapter.tensors, alpha=ALPHA, base=engine.base, dtype="f32")
    out = export_peft(gguf_path, tmp_path / "peft")
    stored = load_file(str(out / WEIGHTS_FILE))
    expected = peft_state_dict(adapter)
    assert stored.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(stored[key], value)
    assert json.loads((out / CONFIG_FILE).read_text())["target_modules"] == (
        "model\\.layers\\.0\\.self_attn\\.q_proj|model\\.layers\\.17\\.self_attn\\.o_proj|"
        "model\\.layers\\.3\\.self_attn\\.v_proj|model\\.layers\\.5\\.mlp\\.down_proj|"
        "model\\.layers\\.5\\.self_attn\\.q_proj"
    )


def test_export_replaces_atomically(engine, tmp_path):
    first = make_adapter(engine.base, REGULAR, seed=1)
    second = make_adapter(engine.base, IRREGULAR, seed=2)
    export_peft(first, tmp_path / "peft")
    out = export_peft(second, tmp_path / "peft", dtype="f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]  # no temp or old folders left
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILE, CONFIG_FILE, WEIGHTS_FILE]
    stored = load_file(str(out / WEIGHTS_FILE))
    assert len(stored) == 2 * len(second.tensors)
    assert all(v.dtype == np.float16 for v in stored.values())


def test_export_errors(engine, tmp_path):
    with pytest.raises(AdapterError, match="not found"):
        export_peft(tmp_path / "missing.gguf", tmp_path / "peft")
    with pytest.raises(AdapterError, match="dtype"):
        export_peft(make_adapter(engine.base, REGULAR), tmp_path / "peft", dtype="q8_0")
    assert not (tmp_path / "peft").exists()
