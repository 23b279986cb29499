"""The check step every command runs before a model loads or work starts (``cli.check_command``).

Driven by the settings' fields, so every command that has a flag gets its check:
- data files (``--data``, ``--harm``, ``--eval-*``, ``--prompts``, ``--train-data``, ...): read whole,
  zero usable rows is an error;
- models (``--model``, ``--base``/``--aligned``, fine-tunes): exist (several: each resolved first, an
  alias built), their weight files are whole, and a model and its fine-tune share an architecture
  and differ (not one checkpoint, not identical weights: a zero update has no subspace);
- ``--pruned``: a make prune output with a readable ``prune_config.json``;
- judges: each spec is known, ``--judge-url`` is an http(s) URL, ``--judge-device`` exists, and a
  remote judge answers one probe request (commands that would otherwise find out after generating);
- lm-eval tasks: known names (lm-eval not installed: a warning now, not a note after the run);
- devices and dtypes (``--dtype``, ``--judge-dtype``); cache/factor/fine-tune directories writable.
Nothing is loaded (a built-in alias may be built: that is where the model comes from; tensors of a
pair are compared one at a time) and nothing is written.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

from ..core import validate
from ..core.data import DataSpec, load_records
from ..core.errors import HarmpruneError
from ..core.models import ALIASES, cache_dir, check_weight_files, parse_dtype, resolve

# fields holding record data (prompt/response rows), read whole by the check
DATA_FIELDS = ("data", "harm", "benign", "eval_harm", "eval_benign", "train_data", "prompts", "eval_data",
               "harmful_data", "useful_data")
# fields naming a checkpoint
MODEL_FIELDS = ("model", "base", "aligned", "finetuned", "harmful", "useful", "compare_model", "harmful_model",
                "useful_model", "contaminated_model")
# directories a command writes besides --out
DIR_OUTPUTS = ("scores_dir", "factor_dir", "finetune_dir", "offload_folder")
# commands whose judges are probed in their own run, right before generation (eval harm, generate)
PROBED_LATER = ("eval harm", "generate")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_data(cfg) -> None:
    for name in DATA_FIELDS:
        value = getattr(cfg, name, None)
        if not isinstance(value, str) or value.startswith("hf:"):
            continue  # Hub data sets are read where they are used (a download)
        if name == "train_data":
            from ..finetune.train import resolve_data

            value = resolve_data(value)
        fields = {k: getattr(cfg, k, None) for k in ("prompt_field", "response_field", "category_field", "category")}
        if name not in ("data", "prompts"):
            fields = {"category": None, "prompt_field": None, "response_field": None, "category_field": None}
        try:
            records = load_records(DataSpec(data=value, **fields), require_response=False)
        except HarmpruneError as e:
            raise HarmpruneError(f"{flag(name)} {value}: {e}") from None
        if not records:
            raise HarmpruneError(f"{flag(name)} {value}: no usable rows")


# (model, its fine-tune): the update between them must exist (zero gives no subspace, MSO n/a)
UPDATES = (("base", "aligned"),) + tuple(("aligned", f) for f in ("finetuned", "harmful", "useful", "harmful_model",
                                                                   "useful_model", "contaminated_model"))


def model_dir(spec: str, build: bool = False) -> Path | None:
    """The local checkpoint directory of ``spec`` (None for a Hub id, a .gguf file or, unless ``build``,
    an alias not built yet: it is built where it is first loaded)."""
    if not build and spec in ALIASES and not (cache_dir() / ALIASES[spec].folder(spec) / "config.json").is_file():
        return None
    path, gguf = resolve(spec)
    p = Path(path)
    return p if not gguf and p.is_dir() else None


def model_config(d: Path | None) -> dict:
    if d is None or not (d / "config.json").is_file():
        return {}
    try:
        return json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HarmpruneError(f"{d / 'config.json'} is not readable JSON ({e}); re-create the checkpoint") from None


def check_models(cfg) -> None:
    """Each model exists and is whole; with several, every one is resolved first (an alias built), so
    the second is not found wanting after the first one's work; each (model, fine-tune) pair is checked."""
    specs = {n: s for n in MODEL_FIELDS if isinstance(s := getattr(cfg, n, None), str) and s}
    dirs = {}
    for name, spec in specs.items():
        try:
            d = model_dir(spec, build=len(specs) > 1)
        except HarmpruneError as e:
            raise HarmpruneError(f"{flag(name)}: {e}") from None
        if d is not None:
            check_weight_files(str(d))
            model_config(d)
        dirs[name] = d
    for a, b in UPDATES:
        if a in dirs and b in dirs:
            check_pair(cfg, a, b, dirs[a], dirs[b])


ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")


def check_pair(cfg, a: str, b: str, da: Path | None, db: Path | None) -> None:
    """Flags ``a`` and ``b`` (``b`` a fine-tune of ``a``): one architecture and size, different weights."""
    sa, sb = getattr(cfg, a), getattr(cfg, b)
    hint = "pass the model before alignment as --base" if a == "base" else f"pass a fine-tune of {flag(a)} as {flag(b)}"
    if sa == sb or (da is not None and db is not None and da.resolve() == db.resolve()):
        raise HarmpruneError(f"{flag(a)} and {flag(b)} are the same checkpoint ({sb}): the update between them is "
                             f"zero; {hint}")
    ca, cb = model_config(da), model_config(db)
    for key in ARCH_KEYS:
        if key in ca and key in cb and ca[key] != cb[key]:
            raise HarmpruneError(f"{flag(a)} {sa} and {flag(b)} {sb} differ in {key} ({ca[key]} vs {cb[key]}): they "
                                 f"must be one architecture ({flag(b)} is a fine-tune of {flag(a)})")
    if da is not None and db is not None and same_weights(da, db):
        raise HarmpruneError(f"{flag(a)} {sa} and {flag(b)} {sb} hold identical weights: the update between them is "
                             f"zero (no subspace, MSO undefined); {hint}")


def same_weights(a: Path, b: Path) -> bool:
    """Whether two safetensors checkpoints hold equal tensors: read one pair at a time, block matrices
    first (what a fine-tune changes), so two different checkpoints stop at the first difference."""
    import torch

    from ..core.targets import layer_index
    from ..core.tensors import TensorReader

    if not (any(a.glob("*.safetensors")) and any(b.glob("*.safetensors"))):
        return False
    with TensorReader(str(a), "a") as ra, TensorReader(str(b), "b") as rb:
        if ra.shapes != rb.shapes:
            return False
        order = sorted(ra.shapes, key=lambda n: len(ra.shapes[n]) != 2 or layer_index(n) is None)
        return all(torch.equal(ra.get(n), rb.get(n)) for n in order)


def check_pruned(cfg) -> None:
    from ..pruning.checkpoint import CONFIG_FILE, MASK_FILE

    pruned = getattr(cfg, "pruned", None)
    if not pruned:
        return
    d = Path(pruned)
    if not (d / MASK_FILE).is_file():
        raise HarmpruneError(f"--pruned {pruned}: no {MASK_FILE} there (not a make prune output directory)")
    f = d / CONFIG_FILE
    if not f.is_file():
        raise HarmpruneError(f"--pruned {pruned}: no {CONFIG_FILE} there, so the model its mask was made for is "
                             f"unknown; pass a complete make prune output directory")
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HarmpruneError(f"{f} is corrupt or cut short ({e}); re-create {pruned} with harmprune prune") from None
    if not isinstance(doc, dict) or not (doc.get("model") or {}).get("model_hash"):
        raise HarmpruneError(f"{f} records no model hash; re-create {pruned} with harmprune prune")


def judge_spec_list(cfg) -> list[str]:
    specs = []
    for name in ("judge", "refusal_judge"):
        value = getattr(cfg, name, None)
        if isinstance(value, str):
            specs += [s.strip() for s in value.split(",") if s.strip()]
    return specs


def check_judges(cfg, probe: bool) -> None:
    from ..evals.judges import get_judge

    url = getattr(cfg, "judge_url", None)
    if url is not None:
        u = urllib.parse.urlparse(url)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise HarmpruneError(f"--judge-url {url!r} is not an http(s) URL (e.g. http://localhost:8000/v1)")
    device = getattr(cfg, "judge_device", None)
    if device is not None:
        validate.check_device(device, "--judge-device")
    jd = getattr(cfg, "judge_dtype", None)
    if jd is not None and jd != "auto":
        try:
            parse_dtype(jd)
        except HarmpruneError as e:
            raise HarmpruneError(f"--judge-dtype: {e}") from None
    specs = judge_spec_list(cfg)
    for spec in specs:
        prefix, _, arg = spec.partition(":")
        if prefix == "hf":  # a local model judge: its checkpoint must exist; it loads where it is used
            if not arg:
                raise HarmpruneError("judge 'hf' needs a model: hf:<model>")
            try:
                model_dir(arg)
            except HarmpruneError as e:
                raise HarmpruneError(f"--judge {spec}: {e}") from None
            continue
        if prefix == "strongreject":  # a ~2.5B evaluator: checked where it can be without loading it
            if arg and arg.startswith((".", "/", "~")) and not Path(arg).expanduser().is_dir():
                raise HarmpruneError(f"--judge {spec}: no such directory (give an adapter or model directory, "
                                     "or a Hub repo id)")
            continue
        options = {"url": url}
        for key, name in (("timeout", "judge_timeout"), ("max_retries", "judge_retries")):
            if getattr(cfg, name, None) is not None:
                options[key] = getattr(cfg, name)
        judge = get_judge(spec, **options)  # unknown names, bad keyword lists, a missing classifier
        if probe and prefix == "openai":
            judge.check()  # one request: unreachable, refusing the key or the model


def check_lm_eval(cfg) -> None:
    """``--lm-eval-tasks``: known to lm-eval (its task index needs no model); lm-eval missing is said now."""
    tasks = getattr(cfg, "lm_eval_tasks", None)
    if not tasks or "lm_eval" not in getattr(cfg, "parts", ("lm_eval",)):
        return
    from ..evals.utility import LM_EVAL_MISSING, checked_task_manager

    if checked_task_manager(tasks) is None:
        validate.warn(f"--lm-eval-tasks {' '.join(tasks)} will be skipped: {LM_EVAL_MISSING}")


def check_dtypes(cfg) -> None:
    value = getattr(cfg, "dtype", None)
    if isinstance(value, str):
        try:
            parse_dtype(value)
        except HarmpruneError as e:
            raise HarmpruneError(f"--dtype: {e}") from None


def check_dirs(cfg) -> None:
    for name in DIR_OUTPUTS:
        value = getattr(cfg, name, None)
        if value:
            validate.check_writable_dir(value, flag(name))


def check_settings(command: str, *cfgs) -> None:
    """The field-driven checks of every command (see the module docstring)."""
    for cfg in cfgs:
        check_dtypes(cfg)
        check_dirs(cfg)
        check_pruned(cfg)
        check_judges(cfg, probe=command not in PROBED_LATER)
        check_data(cfg)
        check_lm_eval(cfg)
        check_models(cfg)
