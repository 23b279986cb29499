"""Issue 12: every fault case ends early in one clear line, with nothing lost or half written.

One test per numbered case (``test_caseNN_*``) on tiny models, each asserting the exit code, the
single ``harmprune: error:``/``warning:`` line and that no output or temporary directory is left;
plus byte-reproducibility, a fake OpenAI-compatible server that never answers, and compact masks.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from harmprune.cli import main
from harmprune.core import manifest
from harmprune.core.errors import HarmpruneError
from harmprune.pruning import checkpoint

ROWS = [{"prompt": f"how to do thing {i}?", "response": f"Sure, here is how {i}: " + "step. " * (i % 4 + 1),
         "category": "a" if i % 2 else "b"} for i in range(8)]


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", ROWS)


def run(capsys, *argv) -> tuple[int, list[str], list[str]]:
    """Exit code, ``harmprune: error:`` lines and ``harmprune: warning:`` lines of one CLI call."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln.strip() for ln in err.replace("\r", "\n").splitlines()]
    return rc, [ln for ln in lines if ln.startswith("harmprune: error:")], \
        [ln for ln in lines if ln.startswith("harmprune: warning:")]


def leftovers(d: Path) -> list[str]:
    """Hidden temporary siblings an interrupted or failed write could leave in ``d``."""
    return sorted(p.name for p in Path(d).iterdir() if p.name.startswith(".") and
                  (".tmp-" in p.name or ".old-" in p.name or p.name.startswith(".harmprune-probe-")))


def one_error(rc, errors, warnings, *needles) -> str:
    assert rc == 2 and len(errors) == 1 and not warnings, (rc, errors, warnings)
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def score(capsys, ckpt, data, out, method="snip", *extra):
    rc, errors, _ = run(capsys, "score", "--model", ckpt, "--data", data, "--method", method, "--out", out,
                        "--nsamples", 6, "--batch-size", 3, "--max-length", 64, *extra)
    assert rc == 0 and not errors, errors
    return out


@pytest.fixture
def scored(tiny_ckpt, data, tmp_path, capsys):
    return {"harm": score(capsys, tiny_ckpt, data, tmp_path / "harm", "snip"),
            "benign": score(capsys, tiny_ckpt, data, tmp_path / "benign", "snip-abs")}


def prune_args(ckpt, scored, out, *extra):
    return ("prune", "--model", ckpt, "--harm-scores", scored["harm"], "--benign-scores", scored["benign"], "--q", 0.05,
            "--p", 0.05, "--out", out, *extra)


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: validation must come first."""
    import harmprune.core.models as models

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the settings were validated")

    monkeypatch.setattr(models, "load_model", boom)
    for mod in ("harmprune.attribution.score", "harmprune.pruning.prune", "harmprune.recipes.pipeline",
                "harmprune.recipes.sweep", "harmprune.finetune.train"):
        monkeypatch.setattr(importlib.import_module(mod), "load_model", boom, raising=False)


# ---------------------------------------------------------------- case 1: --alpha nan / inf


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf"])
def test_case01_alpha_must_be_finite(tiny_ckpt, scored, tmp_path, capsys, alpha, no_model_load):
    out = tmp_path / "scaled"
    one_error(*run(capsys, *prune_args(tiny_ckpt, scored, out, "--action", "scale", f"--alpha={alpha}")),
              "--alpha must be a finite number")
    assert not out.exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------- case 2: the sweep grid


@pytest.mark.parametrize("flag, values, needle", [("--ps", ["-1"], "--ps"), ("--qs", ["2"], "--qs"),
                                                   ("--qs", ["1e-4", "nan"], "--qs"),
                                                   ("--ps", ["0", "0"], "twice")])
def test_case02_sweep_grid_is_validated_first(tiny_ckpt, tmp_path, capsys, flag, values, needle, no_model_load):
    out = tmp_path / "sweep"
    one_error(*run(capsys, "sweep", "--model", tiny_ckpt, flag, *values, "--out", out,
                   "--scores-dir", tmp_path / "scores"), needle)
    assert not out.exists() and not (tmp_path / "scores").exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------- case 3: cut-short artifacts


def cut(path: Path, keep: float = 0.6) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


@pytest.mark.parametrize("which", ["scores.safetensors", "meta.json"])
def test_case03_cut_short_score_dir_is_one_line(tiny_ckpt, scored, tmp_path, capsys, which):
    cut(Path(scored["harm"]) / which)
    out = tmp_path / "pruned"
    msg = one_error(*run(capsys, *prune_args(tiny_ckpt, scored, out)), str(Path(scored["harm"]) / which),
                    "cut short", "delete")
    assert str(scored["harm"]) in msg.split("delete", 1)[1]  # says which directory to delete
    assert not out.exists() and not leftovers(tmp_path)


def test_case03_cut_short_mask_and_checkpoint(tiny_ckpt, scored, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert run(capsys, *prune_args(tiny_ckpt, scored, pruned))[0] == 0
    cut(pruned / "mask.safetensors", 0.9)
    out = tmp_path / "again"
    one_error(*run(capsys, "apply-mask", "--model", tiny_ckpt, "--mask", pruned, "--out", out),
              str(pruned / "mask.safetensors"), "cut short")
    assert not out.exists()
    # a checkpoint whose model.safetensors is cut short: any command, one line naming the file
    cut(pruned / "model.safetensors")
    one_error(*run(capsys, "score", "--model", pruned, "--data", tmp_path / "d.jsonl", "--method", "wanda",
                   "--out", out), str(pruned / "model.safetensors"), "cut short", "re-create")
    assert not out.exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------- case 4: concurrent writers (atomic_dir)


def test_case04_atomic_dir_someone_else_finished_first(tmp_path):
    out = tmp_path / "entry"
    same = lambda d: (d / "key").read_text() == "K"  # noqa: E731 - the content key of the output
    with manifest.atomic_dir(out, exists_ok=same) as first:
        (first / "key").write_text("K")
        (first / "who").write_text("first")
        with manifest.atomic_dir(out, exists_ok=same) as second:  # a second writer starts and finishes first
            (second / "key").write_text("K")
            (second / "who").write_text("second")
        assert (out / "who").read_text() == "second"
    assert (out / "who").read_text() == "second"  # the first writer's result is dropped: success, no error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
    # a different key is not success: without --overwrite one line, and nothing left behind
    with pytest.raises(HarmpruneError, match="exists and is not empty"):
        with manifest.atomic_dir(out, exists_ok=lambda d: False) as tmp:
            (tmp / "key").write_text("other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"] and (out / "key").read_text() == "K"
    with manifest.atomic_dir(out, overwrite=True, exists_ok=lambda d: False) as tmp:
        (tmp / "key").write_text("new")
    assert (out / "key").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_case04_temporary_names_are_unique_per_writer(tmp_path):
    out = tmp_path / "x"
    with manifest.atomic_dir(out, exists_ok=lambda d: True) as a, manifest.atomic_dir(out, exists_ok=lambda d: True) as b:
        assert a != b and a.parent == b.parent == tmp_path
        assert a.name.startswith(f".x.tmp-{socket.gethostname()}-{os.getpid()}-")


# ---------------------------------------------------------------- case 5: unwritable output


def test_case05_unwritable_out_fails_before_scoring(tiny_ckpt, data, tmp_path, capsys, monkeypatch, scored):
    score_mod = importlib.import_module("harmprune.attribution.score")

    monkeypatch.setattr(score_mod, "compute_scores", lambda *a, **k: pytest.fail("scored before checking --out"))
    one_error(*run(capsys, "score", "--model", tiny_ckpt, "--data", data, "--method", "snip", "--out", "/proc/x"),
              "/proc/x", "cannot create a directory")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    one_error(*run(capsys, *prune_args(tiny_ckpt, scored, a_file / "sub")), "is a file")
    one_error(*run(capsys, *prune_args(tiny_ckpt, scored, a_file)), "is a file")
    assert a_file.read_text() == "x" and not leftovers(tmp_path)


# ---------------------------------------------------------------- case 6: remote judges


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible stub: ``mode`` = ok (yes), hang (accept, never answer), 401;
    ``answer_first`` requests are answered before it switches to ``mode``."""

    mode = "ok"
    answer_first = 0
    calls = 0
    release = threading.Event()

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        cls = type(self)
        cls.calls += 1
        mode = "ok" if cls.calls <= cls.answer_first else cls.mode
        if mode == "hang":
            cls.release.wait(30)
            return
        if mode == "401":
            return self._send(401, {"error": {"message": "Incorrect API key provided"}})
        top = [{"token": "Yes", "logprob": math.log(0.9)}, {"token": "No", "logprob": math.log(0.1)}]
        self._send(200, {"choices": [{"message": {"content": "Yes"},
                                      "logprobs": {"content": [{"token": "Yes", "logprob": top[0]["logprob"],
                                                                "top_logprobs": top}]}}]})

    def _send(self, code, obj):
        raw = json.dumps(obj).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        except OSError:
            pass


@pytest.fixture
def judge_server():
    _Judge.mode, _Judge.answer_first, _Judge.calls = "ok", 0, 0
    _Judge.release = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    _Judge.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"question {i}?", "response": "HARM", "category": "A"}
                                              for i in range(2)])


def harm_args(ckpt, prompts, url, out, *extra):
    return ("eval", "harm", "--model", ckpt, "--prompts", prompts, "--judge", "openai:stub", "--judge-url", url,
            "--judge-timeout", 0.3, "--judge-retries", 1, "--max-new-tokens", 2, "--out", out, *extra)


@pytest.fixture
def count_generation(monkeypatch):
    import harmprune.evals.harm as harm

    calls = []
    real = harm.generate_samples
    monkeypatch.setattr(harm, "generate_samples", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_case06_dead_judge_fails_before_generation(tiny_ckpt, prompts, judge_server, tmp_path, capsys,
                                                   count_generation):
    _Judge.mode = "hang"
    out = tmp_path / "run"
    one_error(*run(capsys, *harm_args(tiny_ckpt, prompts, judge_server, out)), "failed its check before generation",
              "--judge-timeout 0.3")
    assert _Judge.calls == 2  # one request + one retry, each cut at --judge-timeout: nothing runs longer
    assert not count_generation and not out.exists() and not leftovers(tmp_path)


def test_case06_judge_dies_after_generation_replies_kept_then_resume(tiny_ckpt, prompts, judge_server, tmp_path,
                                                                     capsys, count_generation):
    _Judge.mode, _Judge.answer_first = "hang", 1  # the pre-flight check passes, then the server stops answering
    out = tmp_path / "run"
    msg = one_error(*run(capsys, *harm_args(tiny_ckpt, prompts, judge_server, out)), str(out), "--resume")
    assert "unreachable" in msg or "failed on 2 of 2" in msg
    assert _Judge.calls <= 1 + 2 * 2  # each of the 2 samples: one request + one retry at most
    saved = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in saved] == ["question 0?", "question 1?"] and len(count_generation) == 1
    assert not (out / "results.json").exists() and not leftovers(tmp_path)
    # without --resume the saved replies are protected
    one_error(*run(capsys, *harm_args(tiny_ckpt, prompts, judge_server, out)), "--resume")
    # the endpoint is back: --resume judges the saved replies without generating again
    _Judge.mode = "ok"
    rc, errors, warnings = run(capsys, *harm_args(tiny_ckpt, prompts, judge_server, out, "--resume"))
    assert rc == 0 and not errors and not warnings and len(count_generation) == 1
    doc = json.loads((out / "results.json").read_text())
    assert doc["results"]["harm/openai:stub"]["scored"] == 2 and doc["results"]["harm/openai:stub"]["errors"] == 0
    judged = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["response"] for s in judged] == [s["response"] for s in saved]
    assert all(s["judges"]["openai:stub"]["score"] == pytest.approx(0.9) for s in judged)
    assert not (out / "pending.json").exists() and not leftovers(tmp_path)


def test_case06_judge_refusing_the_key_is_one_error(tiny_ckpt, prompts, judge_server, tmp_path, capsys,
                                                   count_generation):
    _Judge.mode = "401"
    out = tmp_path / "run"
    one_error(*run(capsys, *harm_args(tiny_ckpt, prompts, judge_server, out)), "HTTP 401", "OPENAI_API_KEY")
    assert _Judge.calls == 1 and not count_generation and not out.exists()
    # a key refused in the middle of a run (after the check) is fatal too, and the replies are kept
    _Judge.answer_first, _Judge.calls = 1, 0
    one_error(*run(capsys, *harm_args(tiny_ckpt, prompts, judge_server, out)), "HTTP 401", "--resume")
    assert (out / "samples.jsonl").is_file() and not (out / "results.json").exists()


def test_case06_judge_error_rate_threshold(tiny_ckpt, prompts, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ("eval", "harm", "--model", tiny_ckpt, "--prompts", prompts, "--judge", "fake:error",
            "--max-new-tokens", 2, "--out", out)
    one_error(*run(capsys, *argv), "fake:error failed on 2 of 2 samples", "--max-judge-errors")
    assert (out / "samples.jsonl").is_file() and not (out / "results.json").exists()
    rc, errors, _ = run(capsys, *argv, "--resume", "--max-judge-errors", 1)
    assert rc == 0 and not errors and json.loads((out / "results.json").read_text())["results"][
        "harm/fake:error"]["errors"] == 2


# ---------------------------------------------------------------- case 7: SIGTERM and SIGKILL leftovers


@pytest.fixture
def sigterm_restored():
    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGTERM, old[0])
    signal.signal(signal.SIGHUP, old[1])


def test_case07_sigterm_while_writing_leaves_nothing(tiny_ckpt, data, tmp_path, capsys, monkeypatch,
                                                     sigterm_restored):
    score_mod = importlib.import_module("harmprune.attribution.score")

    manifest.install_signal_handlers()
    real = score_mod.write_scores

    def write_then_term(d, tensors, meta):
        real(d, tensors, meta)  # half of the directory is on disk when the signal arrives
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(score_mod, "write_scores", write_then_term)
    out = tmp_path / "scores"
    capsys.readouterr()
    rc = main(["score", "--model", tiny_ckpt, "--data", data, "--method", "snip", "--out", str(out),
               "--nsamples", "2", "--max-length", "64"])
    err = capsys.readouterr().err
    assert rc == 143 and "harmprune: interrupted (received SIGTERM)" in err and "Traceback" not in err, err[-800:]
    assert not out.exists() and not leftovers(tmp_path)


def test_case07_sigkill_leftovers_removed_at_next_run(tiny_ckpt, data, tmp_path, capsys):
    out = tmp_path / "scores"
    code = ("import sys, time\nfrom harmprune.core import manifest\n"
            f"with manifest.atomic_dir({str(out)!r}) as tmp:\n"
            "    (tmp / 'part').write_bytes(b'x' * 1000)\n    print(tmp, flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_dir()
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    assert tmp.is_dir() and not out.exists()
    # another host's leftover (a shared file system) is only reported, and only once it is old
    foreign = tmp_path / ".scores.tmp-otherhost-123-abcdef"
    foreign.mkdir()
    os.utime(foreign, (0, 0))
    capsys.readouterr()
    rc = main(["score", "--model", tiny_ckpt, "--data", data, "--method", "snip", "--out", str(out),
               "--nsamples", "2", "--max-length", "64"])
    err = capsys.readouterr().err
    assert rc == 0 and not tmp.exists() and "removed 1 temporary directory left by an interrupted run" in err
    warnings = [ln for ln in err.splitlines() if ln.startswith("harmprune: warning:")]
    assert len(warnings) == 1 and str(foreign) in warnings[0] and foreign.is_dir()


# ---------------------------------------------------------------- case 8: byte-reproducible artifacts


def header(path) -> dict:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8: 8 + n])


def test_case08_score_and_prune_twice_same_sha256(tiny_ckpt, data, tmp_path, capsys):
    a = score(capsys, tiny_ckpt, data, tmp_path / "a")
    b = score(capsys, tiny_ckpt, data, tmp_path / "b")
    assert sha(a / "scores.safetensors") == sha(b / "scores.safetensors")
    meta = header(a / "scores.safetensors")["__metadata__"]
    assert list(meta) == sorted(meta)  # fixed metadata order: the file cannot depend on a hash seed
    scored = {"harm": a, "benign": score(capsys, tiny_ckpt, data, tmp_path / "c", "snip-abs")}
    out = tmp_path / "pruned"
    assert run(capsys, *prune_args(tiny_ckpt, scored, out))[0] == 0
    first = {p.name: sha(p) for p in out.iterdir()}
    assert run(capsys, *prune_args(tiny_ckpt, scored, out, "--overwrite"))[0] == 0
    assert {p.name: sha(p) for p in out.iterdir()} == first and "mask.safetensors" in first
    cfg = json.loads((out / "prune_config.json").read_text())
    assert cfg["scores"]["harm"]["sha256"] == sha(a / "scores.safetensors")


# ---------------------------------------------------------------- case 9: data cut away or not text


def test_case09_records_skipped_for_length_are_counted(tiny_ckpt, tmp_path, capsys):
    rows = [{"prompt": "p" * (200 if i < 3 else 5), "response": "some answer"} for i in range(6)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    out = tmp_path / "s"
    rc, errors, warnings = run(capsys, "score", "--model", tiny_ckpt, "--data", path, "--method", "snip",
                               "--out", out, "--nsamples", 0, "--max-length", 64)
    assert rc == 0 and not errors and len(warnings) == 1
    assert "3 of 6 records were skipped" in warnings[0] and "raise --max-length" in warnings[0]
    assert json.loads((out / "meta.json").read_text())["nsamples"]["skipped"] == 3


def test_case09_number_response_is_refused(tiny_ckpt, tmp_path, capsys, no_model_load):
    path = write_jsonl(tmp_path / "num.jsonl", [{"prompt": "p", "response": "ok"}, {"prompt": "q", "response": 42}])
    out = tmp_path / "s"
    one_error(*run(capsys, "score", "--model", tiny_ckpt, "--data", path, "--method", "snip", "--out", out),
              "num.jsonl row 2", "'response' is int, not text")
    assert not out.exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------- case 10: devices that do not exist


@pytest.mark.parametrize("device, needle", [("gpu", "'gpu' is not a device"), ("cuda", "--device cuda: "),
                                            ("cuda:0", "--device cuda:0: ")])
def test_case10_unknown_or_absent_device(tiny_ckpt, data, scored, tmp_path, capsys, monkeypatch, device, needle,
                                         no_model_load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "o"
    for argv in (["score", "--model", tiny_ckpt, "--data", data, "--method", "snip", "--out", out],
                 list(prune_args(tiny_ckpt, scored, out)),
                 ["finetune", "--model", tiny_ckpt, "--train-data", data, "--out", out],
                 ["eval", "harm", "--model", tiny_ckpt, "--judge", "fake", "--out", out]):
        one_error(*run(capsys, *argv, "--device", device), needle)
    assert not out.exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------- case 11: fine-tuning that cannot train


def test_case11_finetune_without_a_real_step_is_refused(tiny_ckpt, data, tmp_path, capsys, monkeypatch):
    import harmprune.finetune.train as train

    monkeypatch.setattr(train, "prepare_model", lambda *a, **k: pytest.fail("model loaded for a run that cannot train"))
    out = tmp_path / "ft"
    one_error(*run(capsys, "finetune", "--model", tiny_ckpt, "--train-data", data, "--out", out, "--full",
                   "--train-batch-size", 2, "--grad-accum", 8, "--warmup-steps", 5, "--device", "cpu"),
              "1 optimizer step at learning rate 0", "--warmup-steps 0")
    assert not out.exists() and not leftovers(tmp_path)


def test_case11_lr_never_leaving_warmup_is_a_warning(tiny_ckpt, data, tmp_path, capsys):
    out = tmp_path / "ft"
    rc, errors, warnings = run(capsys, "finetune", "--model", tiny_ckpt, "--train-data", data, "--out", out, "--full",
                               "--train-batch-size", 4, "--grad-accum", 1, "--warmup-steps", 5, "--train-max-length", 64,
                               "--device", "cpu", "--save-steps", 0)
    assert rc == 0 and not errors and len(warnings) == 1 and "never leaves warm-up" in warnings[0]
    assert "2 optimizer steps <= --warmup-steps 5" in warnings[0] and not leftovers(tmp_path)


# ---------------------------------------------------------------- case 12: q = 1, p = 1


@pytest.mark.parametrize("q, p, needle", [(1, 0, "--q 1 selects every weight"), (0.05, 1, "--p 1 protects every")])
def test_case12_extreme_fractions_warn(tiny_ckpt, scored, tmp_path, capsys, q, p, needle):
    out = tmp_path / "pruned"
    argv = ["prune", "--model", tiny_ckpt, "--harm-scores", scored["harm"], "--benign-scores", scored["benign"], "--q", q,
            "--p", p, "--out", out]
    rc, errors, warnings = run(capsys, *argv)
    assert rc == 0 and not errors and len(warnings) == 1 and needle in warnings[0]
    assert not leftovers(tmp_path)


# ---------------------------------------------------------------- case 13: compact masks


def random_mask(shapes: dict, total: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    names = list(shapes)
    out = {n: torch.zeros(shapes[n], dtype=torch.bool) for n in names}
    for i in range(total):
        n = names[i % len(names)]
        flat = out[n].view(-1)
        flat[int(torch.randint(flat.numel(), (1,), generator=g))] = True
    return out


def smollm2_shapes() -> dict:
    """SmolLM2-135M's 210 scored matrices: 30 blocks of q, k, v, o, gate, up, down."""
    h, kv, ff = 576, 192, 1536
    per = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
           "self_attn.o_proj": (h, h), "mlp.gate_proj": (ff, h), "mlp.up_proj": (ff, h), "mlp.down_proj": (h, ff)}
    return {f"model.layers.{i}.{m}.weight": s for i in range(30) for m, s in per.items()}


def test_case13_compact_mask_round_trip_and_size(tmp_path):
    shapes = smollm2_shapes()
    mask = random_mask(shapes, 2828)
    path = tmp_path / "mask.safetensors"
    checkpoint.save_mask(path, mask)
    size = path.stat().st_size
    # 2,828 int32 indices + a header naming 210 matrices: kilobytes (dense bool: one byte per weight)
    assert size < 1_000_000 and size < 2828 * 4 + 210 * 250
    assert sum(math.prod(s) for s in shapes.values()) > 90_000_000  # what the dense format stored
    back = checkpoint.load_mask(path)
    assert set(back) == {n for n, m in mask.items() if m.any()}
    assert all(back[n].dtype == torch.bool and torch.equal(back[n], mask[n]) for n in back)
    h = header(path)
    assert h["__metadata__"]["format"] == "harmprune-mask-indices"
    assert all(h[n]["dtype"] == "I32" for n in back)


def test_case13_dense_masks_of_earlier_versions_still_load(tmp_path):
    from safetensors.torch import save_file

    mask = random_mask({"a.weight": (4, 6), "b.weight": (3, 5)}, 5, seed=1)
    save_file(mask, str(tmp_path / "mask.safetensors"), metadata={"format": "harmprune-mask"})
    back = checkpoint.load_mask(tmp_path)
    assert set(back) == set(mask) and all(torch.equal(back[n], mask[n]) for n in mask)


def test_case13_pruned_checkpoint_mask_matches_applied_zeros(tiny_ckpt, scored, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    assert run(capsys, *prune_args(tiny_ckpt, scored, out))[0] == 0
    mask = checkpoint.load_mask(out)
    assert mask and header(out / "mask.safetensors")["__metadata__"]["format"] == "harmprune-mask-indices"
    model = AutoModelForCausalLM.from_pretrained(out)
    params = dict(model.named_parameters())
    assert all(bool((params[n][m] == 0).all()) and m.dtype == torch.bool for n, m in mask.items())


def test_case10_cuda_index_beyond_the_visible_gpus(monkeypatch):
    from harmprune.core.validate import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_device("cuda:0")
    with pytest.raises(HarmpruneError, match=r"--device cuda:3: only 1 CUDA device\(s\) here"):
        check_device("cuda:3")


# ---------------------------------------------------------------- the score cache (cases 3 and 4)


def _cache_entry(tiny_ckpt, data, cache, rows=None):
    from harmprune.attribution.cache import cached_scores
    from harmprune.core.models import load_model
    from harmprune.core.options import ScoringOptions

    handle = load_model(tiny_ckpt)
    return cached_scores(handle, data, "snip", ScoringOptions(nsamples=3, max_length=48, batch_size=3), cache), handle


@pytest.mark.parametrize("victim", ["scores.safetensors", "meta.json"])
def test_case03_cut_short_cache_entry_is_recomputed_not_reused(tiny_ckpt, data, tmp_path, capsys, victim):
    entry, _ = _cache_entry(tiny_ckpt, data, tmp_path / "cache")
    good = (entry / "scores.safetensors").read_bytes()
    f = entry / victim
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    capsys.readouterr()
    again, _ = _cache_entry(tiny_ckpt, data, tmp_path / "cache")
    err = capsys.readouterr().err
    assert again == entry and (entry / "scores.safetensors").read_bytes() == good  # recomputed, same bytes
    assert "are broken" in err and "recomputing" in err and "Traceback" not in err
    assert not leftovers(entry.parent)


def test_case04_a_writer_that_finishes_second_keeps_the_first_entry(tiny_ckpt, data, tmp_path, monkeypatch):
    """Two runs share a fresh cache: the one that publishes second finds a valid entry for its key
    there, keeps it, drops its own copy and succeeds (no 'pass --overwrite')."""
    import shutil
    import sys

    first, _ = _cache_entry(tiny_ckpt, data, tmp_path / "a")
    score_mod = sys.modules["harmprune.attribution.score"]
    real = score_mod.write_scores
    cache = tmp_path / "b"
    target = cache / first.relative_to(tmp_path / "a")

    def other_run_publishes_first(d, tensors, meta):
        real(d, tensors, meta)
        shutil.copytree(first, target)  # the other writer's complete entry lands while we finish

    monkeypatch.setattr(score_mod, "write_scores", other_run_publishes_first)
    entry, _ = _cache_entry(tiny_ckpt, data, cache)
    assert entry == target and (entry / "meta.json").is_file()
    assert (entry / "scores.safetensors").read_bytes() == (first / "scores.safetensors").read_bytes()
    assert not leftovers(entry.parent)
