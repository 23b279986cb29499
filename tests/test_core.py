"""Shared layer: model resolution and loading, module selection, settings, atomic output dirs."""

import argparse
import dataclasses

import pytest
import torch

from harmprune.core import manifest, models, settings, targets
from harmprune.core.errors import HarmpruneError, MissingDependency, require


def test_load_local_checkpoint_and_hash(tiny_ckpt):
    model, tok = models.load_model(tiny_ckpt)
    assert not model.training and tok.pad_token_id is not None
    h = models.model_hash(model)
    assert h == models.model_hash(models.load_model(tiny_ckpt)[0])
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    assert models.model_hash(model) != h


def test_resolve_specs(tmp_path):
    assert models.resolve("org/name") == ("org/name", None)  # a Hub id passes through untouched
    with pytest.raises(HarmpruneError, match="unknown model"):
        models.resolve("no-such-model")
    with pytest.raises(HarmpruneError, match="does not exist"):
        models.resolve(str(tmp_path / "m.gguf"))
    with pytest.raises(HarmpruneError, match="config.json"):
        models.resolve(str(tmp_path))
    assert models.model_name("org/Model-1") == "org--Model-1"
    assert models.model_name(str(tmp_path / "ckpt") + "/") == "ckpt"
    assert models.model_name("x/y.gguf") == "y"


def test_bad_dtype_and_missing_dependency():
    with pytest.raises(HarmpruneError, match="unknown dtype"):
        models.parse_dtype("int3")
    with pytest.raises(MissingDependency, match=r"pip install 'harmprune\[foo\]'"):
        require("surely_not_a_module_xyz", "foo")


def test_default_targets_skip_head_and_embeddings(llama):
    chosen = targets.select_linears(llama)
    assert len(chosen) == 2 * 7  # q,k,v,o,gate,up,down per layer
    assert all(".layers." in n for n in chosen)
    assert "lm_head" not in chosen


def test_target_patterns_glob_regex_ignore(llama):
    got = targets.select_linears(llama, ["*.mlp.*"], ["re:.*\\.1\\..*"])
    assert list(got) == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    got = targets.select_linears(llama, ["re:.*q_proj"])
    assert list(got) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(HarmpruneError, match="matches no linear layer"):
        targets.select_linears(llama, ["*.nonexistent"])
    with pytest.raises(HarmpruneError, match="no linear layer left"):
        targets.select_linears(llama, ["*.mlp.*"], ["*"])


def test_tied_head_only_when_named(llama, capsys):
    assert targets.tied_parameters(llama)["lm_head.weight"] == ["model.embed_tokens.weight"]
    assert "lm_head" not in targets.select_linears(llama)
    got = targets.select_linears(llama, ["lm_head"])
    assert list(got) == ["lm_head"]
    assert "tied to model.embed_tokens.weight" in capsys.readouterr().err


@dataclasses.dataclass
class _Cfg:
    model: str = settings.opt(help="model spec")
    q: float = settings.opt(1e-4, help="fraction")
    names: list[str] = settings.opt(["a"], help="patterns")
    flag: bool = settings.opt(False, help="a switch")
    mode: str = settings.opt("x", help="mode", choices=["x", "y"])

    def __post_init__(self):
        settings.check(0 <= self.q <= 1, f"--q must be in [0, 1], got {self.q}")


def test_settings_roundtrip_and_validation():
    p = argparse.ArgumentParser()
    settings.add_arguments(p, _Cfg)
    cfg = settings.from_namespace(_Cfg, p.parse_args(["--model", "m", "--names", "b", "c", "--flag", "--mode", "y"]))
    assert cfg == _Cfg("m", 1e-4, ["b", "c"], True, "y")
    assert settings.to_dict(cfg)["names"] == ["b", "c"]
    with pytest.raises(HarmpruneError, match="--q must be"):
        settings.from_namespace(_Cfg, p.parse_args(["--model", "m", "--q", "2"]))
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "m", "--mode", "z"])


@dataclasses.dataclass
class _OptionalList:
    layers: list[int] | None = settings.opt(None, help="layers (none = all)")


def test_settings_optional_list_defaults_to_none():
    p = argparse.ArgumentParser()
    settings.add_arguments(p, _OptionalList)
    assert settings.from_namespace(_OptionalList, p.parse_args([])).layers is None
    assert settings.from_namespace(_OptionalList, p.parse_args(["--layers", "1", "3"])).layers == [1, 3]


def test_atomic_dir(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with manifest.atomic_dir(out) as d:
            (d / "half").write_text("x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with manifest.atomic_dir(out) as d:
        (d / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(HarmpruneError, match="--overwrite"):
        with manifest.atomic_dir(out):
            pass
    with manifest.atomic_dir(out, overwrite=True) as d:
        (d / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_check_min_names_the_flag_and_lets_none_pass():
    from types import SimpleNamespace

    from harmprune.core.settings import check_min

    check_min(SimpleNamespace(max_steps=None, lora_r=1), 1, "max_steps", "lora_r")
    with pytest.raises(HarmpruneError, match=r"^--lora-r must be >= 1, got 0$"):
        check_min(SimpleNamespace(max_steps=None, lora_r=0), 1, "max_steps", "lora_r")
    with pytest.raises(HarmpruneError, match="--limit must be >= 0, got -1"):
        from harmprune.evals.harm import HarmConfig

        HarmConfig(out="o", limit=-1)
