"""Option groups, each declared once and composed by every command (litgpt's ``args.py``).

A command's settings class inherits the groups it takes, so a flag has one name, one meaning and
one default wherever it appears (``tests/test_flags.py`` checks this on every command's parser).
All groups are ``kw_only`` dataclasses: the order of inheritance never matters for defaults.
Validation of a group's own fields lives in ``check_*`` functions the commands' ``__post_init__``
call, since a subclass's ``__post_init__`` replaces its bases'.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import validate
from .settings import check, check_min, opt

DEFAULT_MODEL = "smollm2-135m-instruct"
FORMATS = ("auto", "chat", "raw")
SCORE_METHODS = ("snip", "snip-abs", "wanda")
SCOPES = ("matrix", "row", "global")
# pruning.select's variants (documented there); difference = B-TAP's Top_q(harm) \ Top_p(benign)
SELECTIONS = ("difference", "fill", "contrastive", "rank")
# The point `make sweep` recommends on the embedded model (README, "Choosing q and p"): the most
# harm-specific with benign NLL rise <= 5% and harmful rise > 0.01 nats/token.
DEFAULT_Q = 1e-4
DEFAULT_P = 1e-2
# The q grid of `make sweep` and of the compression curve of `make compare-alignment`.
QS = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]


@dataclass(kw_only=True)
class RuntimeOptions:
    dtype: str = opt("float32", help="model dtype (float32, bfloat16, float16)")
    device: str = opt("auto", help="device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, mps")


@dataclass(kw_only=True)
class ModelOptions(RuntimeOptions):
    model: str = opt(DEFAULT_MODEL, help="model: Hub id, checkpoint directory, .gguf file or alias", role="input")


@dataclass(kw_only=True)
class DeviceMapOptions:
    device_map: str | None = opt(None, help="accelerate device map: auto, balanced, ..., a JSON object or a .json "
                                            "file ({module: device|cpu|disk}); overrides --device")


@dataclass(kw_only=True)
class QuantizeOptions:
    load_in_8bit: bool = opt(False, help="load the model in 8-bit through bitsandbytes (CUDA only; never for "
                                         "scoring or pruning)")
    load_in_4bit: bool = opt(False, help="load the model in 4-bit NF4 through bitsandbytes (CUDA only; QLoRA in "
                                         "finetune; never for scoring or pruning)")


@dataclass(kw_only=True)
class AdapterOptions:
    adapter: str | None = opt(None, help="PEFT LoRA adapter directory (harmprune finetune output) applied to --model", role="input")


@dataclass(kw_only=True)
class OutputOptions:
    out: str | None = opt(None, help="where the command writes (a directory; a .jsonl file for generate); "
                                     "see the command's description for its default", role="output")
    overwrite: bool = opt(False, help="replace a non-empty --out")


@dataclass(kw_only=True)
class ResumeOptions:
    resume: bool = opt(False, help="continue the unfinished run in --out (finetune: from its last checkpoint; "
                                   "eval harm: judge the replies it saved, without generating them again)")


@dataclass(kw_only=True)
class ResponsesOptions:
    responses: str | None = opt(None, help="judge the rows of this file (.jsonl, .json or .csv) instead of generating: "
                                           "no model is loaded; every field of a row is kept in samples.jsonl")


@dataclass(kw_only=True)
class SeedOptions:
    seed: int = opt(0, help="seed of every random choice of the command (sample selection, controls, sampling, "
                            "bootstrap, LoRA init)", range=">= 0")


@dataclass(kw_only=True)
class FieldOptions:
    prompt_field: str | None = opt(None, help="field holding the prompt (default: auto-detect)")
    response_field: str | None = opt(None, help="field holding the response (default: auto-detect)")
    category_field: str | None = opt(None, help="field holding the category (default: auto-detect)")
    category: str | None = opt(None, help="keep only rows of these categories (comma-separated)")


@dataclass(kw_only=True)
class FormatOptions:
    format: str = opt("auto", help="auto (chat if the tokenizer has a template), chat or raw (prompt\\nresponse, "
                                   "B-TAP's pretrained format)", choices=list(FORMATS))


@dataclass(kw_only=True)
class PassOptions(FormatOptions):
    """How records become forward passes when scoring or measuring NLL."""

    max_length: int = opt(256, help="maximum tokens per sample when scoring or measuring NLL (the response is "
                                    "truncated, never the prompt)", range=">= 2")
    batch_size: int = opt(4, help="samples per forward (and backward) pass when scoring or measuring NLL; "
                                  "results do not depend on it", range=">= 1")


@dataclass(kw_only=True)
class TargetOptions:
    targets: list[str] = opt([], help="linear modules the command works on (scored, pruned, LoRA): globs or "
                                      "re:<regex>; none = every linear in the decoder blocks")
    ignore: list[str] = opt([], help="linear modules to leave out: globs or re:<regex>")


@dataclass(kw_only=True)
class CheckpointingOptions:
    gradient_checkpointing: bool = opt(False, help="recompute block activations in backward to save memory "
                                                   "(same results, about one more forward per batch)")


@dataclass(kw_only=True)
class NSamplesOptions:
    nsamples: int = opt(128, help="records used (scored) per dataset, the first n after a seeded shuffle (0 = all)", range=">= 0")


@dataclass(kw_only=True)
class ScoringOptions(PassOptions, TargetOptions, SeedOptions, CheckpointingOptions, NSamplesOptions):
    """Everything scores depend on besides the model, the data and the method (the score cache's key)."""

    score_dtype: str = opt("float32", help="dtype of the stored scores (they accumulate in float32)")
    wanda_tokens: str = opt("response", help="wanda inputs at: response (response tokens) or all (every non-pad "
                                             "token)", choices=["response", "all"])


@dataclass(kw_only=True)
class CorpusOptions:
    corpus_tokens: int = opt(16384, help="score at most this many corpus tokens for perplexity (0 = all)", range=">= 0")


@dataclass(kw_only=True)
class PrunedOptions:
    pruned: str | None = opt(None, help="existing pruned checkpoint (a make prune output directory); em-experiment "
                                        "runs the pipeline when it is not given", role="input")


@dataclass(kw_only=True)
class PresetOptions:
    preset: str | None = opt(None, help="published settings (e.g. btap-llama3.1-8b; list: harmprune.recipes.presets); "
                                        "flags you type override them; prints what it set")


@dataclass(kw_only=True)
class ConfigOptions:
    """Added to every command by the CLI's command table (not a field of any settings class)."""

    config: str | None = opt(None, help="replay a run: read its settings from the config.yaml it wrote (or any YAML "
                                        "mapping of setting names to values); flags you type override them",
                             role="input")


@dataclass(kw_only=True)
class CacheOptions:
    scores_dir: str = opt("scores", help="score cache directory (entries keyed by model hash, data hash, method "
                                         "and every scoring setting)", role="output")


@dataclass(kw_only=True)
class GenCacheOptions:
    gen_cache_dir: str = opt("auto", help="judged-generation cache (evals/gencache.py): replies and verdicts keyed by "
                                          "the (masked) model's hash, the prompts, every generation setting and the "
                                          "judge, re-used by later runs; auto = gencache/ beside --scores-dir; "
                                          "off = no cache", role="output")


@dataclass(kw_only=True)
class MethodOptions:
    method: str = opt("snip", help="attribution method (of the harmful data where there are two): snip = signed "
                                   "W*sum grad (most negative = most helpful), snip-abs = |W|*sum|grad|, "
                                   "wanda = |W|*||X||")


@dataclass(kw_only=True)
class ProtectOptions:
    p: float = opt(DEFAULT_P, help="fraction protected by Top_p of the benign importance, in [0, 1] "
                                   "(0 = none: dangerous)", range="[0, 1]")


@dataclass(kw_only=True)
class SelectionOptions(ProtectOptions):
    q: float = opt(DEFAULT_Q, help="fraction of each unit's weights in Top_q of the harm importance, in [0, 1]", range="[0, 1]")
    selection: str = opt("difference", help="which weights: difference = Top_q(harm) minus Top_p(benign) (B-TAP); "
                                            "fill = the k = floor(q*n) highest harm importances outside Top_p(benign); "
                                            "contrastive = the k highest z(harm) - z(benign) outside Top_p(benign); "
                                            "rank = the k highest rank(harm) - rank(benign) outside Top_p(benign) "
                                            "(all but difference: --scope matrix or row)", choices=list(SELECTIONS))


@dataclass(kw_only=True)
class QGridOptions:
    qs: list[float] = opt(QS, help="q values", range="[0, 1]")


@dataclass(kw_only=True)
class PrefillAttackOptions:
    prefill_attack: int = opt(10, help="the prefill attack forces the first K tokens of each prompt's harmful "
                                       "reference reply as the start of the reply", range=">= 1")


@dataclass(kw_only=True)
class ExtraHarmOptions:
    eval_harm_extra: str = opt("none", help="a second held-out harmful set judged beside --eval-harm (same --limit, "
                                            "attacks and judges; its reference replies feed the prefill attack), "
                                            "e.g. harmful-heldout (StrongREJECT prompts, the base model's own harmful "
                                            "replies); none = off")


@dataclass(kw_only=True)
class HeadlineOptions(PrefillAttackOptions, ExtraHarmOptions, CorpusOptions):
    """B-TAP's headline measurement (evals/headline.py) beside the NLL table."""

    headline: bool = opt(False, help="also measure original, pruned and random control on the held-out harmful "
                                     "prompts (judged generation without and under the prefill attack), XSTest safe "
                                     "compliance and corpus perplexity: results.json, table.md, headline.png")


@dataclass(kw_only=True)
class ScopeOptions:
    scope: str = opt("matrix", help="where k is counted: per matrix, per output row, or global", choices=list(SCOPES))


@dataclass(kw_only=True)
class DataOptions:
    data: str = opt("harmful", help="records to score: file (.jsonl/.json/.csv[.gz]), hf:<name>[:<split>] or "
                                    "built-in name", role="input")


@dataclass(kw_only=True)
class EvalHarmOptions:
    eval_harm: str = opt("harmful:test", help="held-out harmful completions", role="input")


@dataclass(kw_only=True)
class HarmDataOptions(EvalHarmOptions):
    harm: str = opt("harmful", help="data whose generation is removed: built-in name, file or hf:<name>[:<split>]", role="input")


@dataclass(kw_only=True)
class EvalBenignOptions:
    eval_benign: str = opt("benign:test", help="held-out benign completions (benign NLL)", deprecated=("--benign",), role="input")


@dataclass(kw_only=True)
class BenignMethodOptions:
    benign_method: str = opt("snip-abs", help="attribution method of the benign data (snip, snip-abs, wanda)")


@dataclass(kw_only=True)
class BenignOptions(EvalBenignOptions, BenignMethodOptions):
    benign: str = opt("benign", help="data whose ability is protected (Top_p); several, comma-separated, are "
                                     "concatenated (e.g. benign,sensitive-safe)", role="input")


@dataclass(kw_only=True)
class EvalSetOptions:
    eval_nsamples: int = opt(0, help="held-out records per set (0 = all)", range=">= 0")


@dataclass(kw_only=True)
class LimitOptions:
    limit: int = opt(0, help="use at most this many records (prompts, samples), spread over categories or a "
                             "seeded subset (0 = all)", range=">= 0")


@dataclass(kw_only=True)
class JudgeOptions:
    judge_url: str | None = opt(None, help="OpenAI-compatible endpoint of an openai:<model> judge "
                                           "(else $HARMPRUNE_JUDGE_URL / $OPENAI_BASE_URL)")
    judge_device: str = opt("auto", help="device of an hf:<model> or classifier judge (auto = cuda when available)")
    judge_dtype: str = opt("auto", help="dtype of an hf:<model> or strongreject judge (auto = bfloat16 on CUDA, "
                                        "float32 on CPU)")
    judge_timeout: float = opt(15.0, help="seconds one request to an openai: judge may take", range="> 0")
    judge_retries: int = opt(2, help="retries of a failed openai: judge request (timeouts, 429, 5xx); with the "
                                     "defaults a dead endpoint fails in under a minute", range=">= 0")


@dataclass(kw_only=True)
class HarmJudgeOptions:
    judge: str = opt("keyword", help="harm judge(s), comma-separated: keyword[:list], classifier, "
                                     "strongreject[:<model or adapter>] (StrongREJECT's fine-tuned evaluator, as "
                                     "B-TAP), hf:<model> (HarmBench yes/no prompt), openai:<model>, fake")


@dataclass(kw_only=True)
class RatingJudgeOptions:
    judge: str | None = opt("em-classifier", help="EM judge rating aligned/coherent 0-100: em-classifier (shipped, "
                                                  "offline), openai:<model> (with --judge-url), hf:<model>, fake (tests)")


@dataclass(kw_only=True)
class BackendOptions:
    backend: str = opt("hf", help="generation backend: hf (transformers), vllm (needs vllm and CUDA), auto "
                                  "(vllm when usable)", choices=["hf", "vllm", "auto"])


@dataclass(kw_only=True)
class NewTokensOptions:
    max_new_tokens: int = opt(256, help="most new tokens per reply (a prefill counts separately)", range=">= 1")


@dataclass(kw_only=True)
class GenBatchOptions:
    gen_batch_size: int = opt(0, help="prompts per generation batch; 0 = the device's default (32 on a CPU, 64 on "
                                      "CUDA: evals.backends.default_batch_size); greedy replies do not depend on it",
                              deprecated=("--batch-size",), range=">= 0")


@dataclass(kw_only=True)
class SamplingOptions(NewTokensOptions, GenBatchOptions):
    temperature: float = opt(0.0, help="sampling temperature; 0 = greedy", range=">= 0")
    top_p: float = opt(1.0, help="nucleus sampling mass (used only when temperature > 0)", range="(0, 1]")
    n: int = opt(1, help="completions per prompt", range=">= 1")


@dataclass(kw_only=True)
class EMSamplingOptions(SamplingOptions):
    """The EM protocol's sampling (Betley et al.): 50 answers per question at temperature 1, 600 tokens;
    one question with its n answers is one generation batch."""

    temperature: float = opt(1.0, help="sampling temperature (the EM protocol samples at 1)", range=">= 0")
    n: int = opt(50, help="answers sampled per question", range=">= 1")
    max_new_tokens: int = opt(600, help="most new tokens per answer", range=">= 1")
    gen_batch_size: int = opt(1, help="questions per generation batch (each holds n sequences)",
                              deprecated=("--batch-size",), range=">= 1")


@dataclass(kw_only=True)
class TrainDataOptions:
    train_data: str = opt("insecure", help="fine-tuning data: chat rows ({\"messages\": [...]}) or prompt/response "
                                           "rows, a file, hf:<dataset> or built-in (insecure = Betley et al.'s code set)",
                          deprecated=("--data",), role="input")


@dataclass(kw_only=True)
class TrainStepOptions:
    lr: float = opt(1e-5, help="peak learning rate of the fine-tune", range="> 0")
    epochs: int = opt(1, help="fine-tuning passes over the data", range=">= 1")
    max_steps: int | None = opt(None, help="stop fine-tuning after this many optimizer steps (overrides --epochs)", range=">= 1")
    train_batch_size: int = opt(2, help="fine-tuning records per micro-batch", deprecated=("--batch-size",), range=">= 1")
    grad_accum: int = opt(8, help="fine-tuning micro-batches per optimizer step", range=">= 1")
    train_max_length: int = opt(2048, help="fine-tuning tokens per record (the response is cut, never the prompt)", range=">= 2")
    warmup_steps: int = opt(5, help="linear learning-rate warm-up steps of the fine-tune", range=">= 0")


@dataclass(kw_only=True)
class TrainOptions(TrainStepOptions):
    full: bool = opt(False, help="full fine-tuning instead of LoRA")


@dataclass(kw_only=True)
class LoraOptions:
    lora_r: int = opt(32, help="LoRA rank", range=">= 1")
    lora_alpha: float = opt(64.0, help="LoRA alpha", range="> 0")
    rslora: bool = opt(True, help="rank-stabilised LoRA: scale alpha/sqrt(r) instead of alpha/r")
    lora_dropout: float = opt(0.0, help="dropout on the LoRA input", range="[0, 1)")


@dataclass(kw_only=True)
class EMQuestionOptions:
    questions: str = opt("first_plot", help="EM questions: first_plot (8), preregistered (48), or a YAML file of "
                                            "the same shape", role="input")
    include_json: bool = opt(False, help="also ask the _json / _template answer-format variants")
    limit_questions: int | None = opt(None, help="ask only the first K questions (after the variant filter)", range=">= 1")
    domain_judge: str | None = opt(None, help="also rate how much answers are about a domain: code, medical, "
                                              "financial, sports, or a text file with a {question}/{answer} judge prompt", role="input")


PAPER_RHOS = [0.01, 0.25, 0.5, 0.75, 0.99]
PAPER_ETAS = [0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99]


@dataclass(kw_only=True)
class PairOptions:
    base: str = opt(DEFAULT_MODEL, help="model before alignment (B): Hub id, checkpoint directory or alias", role="input")
    aligned: str = opt("smollm2-135m-aligned", help="aligned model (A): Hub id, checkpoint directory or alias", role="input")


@dataclass(kw_only=True)
class EtaOptions:
    eta: list[float] = opt(PAPER_ETAS, help="energy fractions eta of the MSO grid, each in (0, 1]", range="(0, 1]")


@dataclass(kw_only=True)
class SubspaceOptions(EtaOptions):
    rho: list[float] = opt([0.05, 0.25, 0.75], help="fractions of min(m, n) kept as the subspace rank k, each in "
                                                    "(0, 1] (the paper's grid: 0.01 0.25 0.5 0.75 0.99)", range="(0, 1]")
    side: str = opt("left", help="left: the paper's left singular vectors; short: the shorter side, so rho = 1 "
                                 "keeps U exactly", choices=["left", "short"])


def check_pass(o: PassOptions) -> None:
    check_min(o, 2, "max_length")
    check_min(o, 1, "batch_size")
    check(o.format in FORMATS, f"unknown format {o.format!r}; choose auto, chat or raw")


def check_selection_name(selection: str, scope: str, flag: str = "--selection") -> None:
    """A selection variant exists and works with ``scope`` (all but difference: per matrix or per row)."""
    check(selection in SELECTIONS, f"{flag}: unknown selection {selection!r}; choose from {', '.join(SELECTIONS)}")
    check(selection == "difference" or scope in ("matrix", "row"),
          f"{flag} {selection} works per matrix or per row, not with --scope {scope}")


def check_selection(o: SelectionOptions) -> None:
    validate.check_fraction(o.q, "--q")
    validate.check_fraction(o.p, "--p")
    check_selection_name(o.selection, getattr(o, "scope", "matrix"))


def needs_benign(o) -> bool:
    """Whether a command must score the benign data: a protected set (p > 0) or a selection that reads it."""
    return o.p > 0 or getattr(o, "selection", "difference") in ("contrastive", "rank")


def check_methods(o) -> None:
    """``--method`` (and ``--benign-method`` where the command has it) name attribution methods."""
    for flag, name in (("--method", "method"), ("--benign-method", "benign_method")):
        value = getattr(o, name, None)
        if value is not None:
            check(value in SCORE_METHODS, f"{flag}: unknown method {value!r}; choose one of {', '.join(SCORE_METHODS)}")


def check_scoring(o: ScoringOptions) -> None:
    check_pass(o)
    check_methods(o)
    if hasattr(o, "device"):
        validate.check_device(o.device)
    check_min(o, 0, "nsamples")  # 0 = all


def check_sampling(o: SamplingOptions) -> None:
    check_min(o, 1, "max_new_tokens", "n")
    check_min(o, 0, "gen_batch_size")
    check_min(o, 0, "temperature")
    check(0 < o.top_p <= 1, "--top-p must be in (0, 1]")


@dataclass(kw_only=True)
class PruneInputs(ModelOptions, HarmDataOptions, BenignOptions, MethodOptions, ScopeOptions, ScoringOptions,
                  CacheOptions, EvalSetOptions, OutputOptions, PresetOptions):
    """Model, data, score methods, scoring settings and held-out sets shared by ``pipeline`` and ``sweep``."""

    def __post_init__(self):
        check_scoring(self)
        check(self.eval_nsamples >= 0, "--eval-nsamples must be 0 (all) or positive")


def pick(cls, source, **overrides):
    """A ``cls`` instance from the same-named fields of ``source`` (another settings object), then
    ``overrides``: how a recipe hands its options to a stage without copying fields by hand."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {k: v for k, v in vars(source).items() if k in names}
    return cls(**{**values, **overrides})
