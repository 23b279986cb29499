"""Safety subspaces (issue 13): each result against a plain numpy reference written here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from harmprune.core.errors import HarmpruneError
from harmprune.subspace.location import largest_magnitude, mass
from harmprune.subspace.overlap import energy_rank, left_basis, mso, mso_curve, random_mso
from harmprune.subspace.projection import factorize, project, rank_for
from tiny import save_tiny, tiny_llama, tiny_qwen2

SHAPES = [(6, 10), (10, 10), (12, 5), (7,)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU thread contention makes them 20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- numpy references


def np_k(rho, m, n):
    return max(1, int(np.floor(rho * min(m, n) + 0.5)))


def np_parallel(v, u, rho):
    """L Lᵀ U with L = top-k left singular vectors of V (1-D: scalar projection on V)."""
    v, u = np.asarray(v, np.float64), np.asarray(u, np.float64)
    if v.ndim == 1:
        return (u @ v) / (v @ v) * v
    left = np.linalg.svd(v, full_matrices=False)[0][:, : np_k(rho, *v.shape)]
    return left @ left.T @ u


def np_energy_rank(x, eta):
    s2 = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False) ** 2
    frac = np.cumsum(s2) / s2.sum()
    return int(np.argmax(frac >= eta - 1e-9)) + 1


# ---------------------------------------------------------------- projection math


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("basis", ["topk", "randk", "gaussian"])
def test_parallel_and_orth_add_up_to_u(shape, basis):
    v, u = _rand(shape, 1), _rand(shape, 2)
    f = factorize(v, seed=3, name="w")
    for rho in (0.1, 0.5, 1.0):
        par, rp = project(u, f, rho, basis, "parallel")
        orth, ro = project(u, f, rho, basis, "orth")
        np.testing.assert_allclose((par + orth).numpy(), u.numpy(), atol=1e-6)
        assert rp["kept"] + ro["kept"] == pytest.approx(float((u.double() ** 2).sum()), rel=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rho", [0.01, 0.3, 0.5, 0.99, 1.0])
def test_topk_parallel_equals_numpy_svd(shape, rho):
    v, u = _rand(shape, 4), _rand(shape, 5)
    par, rec = project(u, factorize(v), rho, "topk", "parallel")
    ref = np_parallel(v.numpy(), u.numpy(), rho)
    np.testing.assert_allclose(par.numpy(), ref, atol=1e-5)
    assert rec["k"] == (1 if len(shape) == 1 else np_k(rho, *shape))
    assert rec["fraction"] == pytest.approx((ref ** 2).sum() / (u.double().numpy() ** 2).sum(), rel=1e-5)


@pytest.mark.parametrize("shape", [(6, 10), (10, 10)])
def test_rho_one_parallel_returns_u(shape):
    v, u = _rand(shape, 6), _rand(shape, 7)
    par, rec = project(u, factorize(v), 1.0, "topk", "parallel")
    np.testing.assert_allclose(par.numpy(), u.numpy(), atol=1e-5)
    assert rec["fraction"] == pytest.approx(1.0, abs=1e-6)


def test_tall_matrix_rho_one_left_keeps_column_space_short_keeps_all():
    v, u = _rand((12, 5), 8), _rand((12, 5), 9)
    left, _ = project(u, factorize(v, side="left"), 1.0)
    ref = np_parallel(v.numpy(), u.numpy(), 1.0)  # projection on V's 5-dim column space of R^12
    np.testing.assert_allclose(left.numpy(), ref, atol=1e-5)
    assert not np.allclose(left.numpy(), u.numpy(), atol=1e-3)
    short, _ = project(u, factorize(v, side="short"), 1.0)
    np.testing.assert_allclose(short.numpy(), u.numpy(), atol=1e-5)
    # short side at rho < 1: U R Rᵀ with R the top-k right singular vectors of V
    vt = np.linalg.svd(v.numpy().astype(np.float64), full_matrices=False)[2][:2].T
    np.testing.assert_allclose(project(u, factorize(v, side="short"), 0.4)[0].numpy(), u.numpy() @ vt @ vt.T, atol=1e-5)


@pytest.mark.parametrize("basis", ["topk", "randk"])
def test_energy_kept_non_decreasing_in_rho(basis):
    v, u = _rand((16, 24), 10), _rand((16, 24), 11)
    f = factorize(v, seed=0, name="x")
    fr = [project(u, f, r, basis)[1]["fraction"] for r in np.linspace(0.05, 1.0, 20)]
    assert all(b >= a - 1e-7 for a, b in zip(fr, fr[1:]))
    assert fr[-1] == pytest.approx(1.0, abs=1e-6)


def test_random_k_same_seed_same_basis_and_picks_singular_vectors():
    v = _rand((9, 14), 12)
    a = factorize(v, seed=5, name="layers.0.q").basis(0.5, "randk")
    b = factorize(v, seed=5, name="layers.0.q").basis(0.5, "randk")
    c = factorize(v, seed=6, name="layers.0.q").basis(0.5, "randk")
    assert torch.equal(a, b) and not torch.equal(a, c)
    left = np.linalg.svd(v.numpy().astype(np.float64), full_matrices=False)[0]
    # each column is ± one of V's left singular vectors
    assert np.allclose(np.abs(left.T @ a.numpy().astype(np.float64)).max(0), 1.0, atol=1e-5)


def test_gaussian_control_is_svd_of_seeded_gaussian():
    from harmprune.subspace.projection import stream_seed

    v, u = _rand((8, 11), 13), _rand((8, 11), 14)
    f = factorize(v, seed=2, name="w")
    g = torch.randn((8, 11), generator=torch.Generator().manual_seed(stream_seed(2, "w", "gaussian")))
    left = np.linalg.svd(g.numpy().astype(np.float64), full_matrices=False)[0][:, :4]
    np.testing.assert_allclose(project(u, f, 0.5, "gaussian")[0].numpy(), left @ left.T @ u.numpy(), atol=1e-5)


def test_zero_alignment_update_has_empty_subspace():
    u = _rand((4, 6), 15)
    f = factorize(torch.zeros(4, 6))
    assert float(project(u, f, 0.5)[0].abs().max()) == 0
    assert torch.equal(project(u, f, 0.5, mode="orth")[0], u)


def test_rank_for():
    assert [rank_for(r, 10, 40) for r in (0.01, 0.04, 0.05, 0.25, 0.99, 1.0)] == [1, 1, 1, 3, 10, 10]


# ---------------------------------------------------------------- MSO


def test_mso_self_one_orthogonal_zero():
    q = torch.linalg.qr(_rand((20, 20), 16))[0]
    assert mso(q[:, :5], q[:, :5]) == pytest.approx(1.0, abs=1e-6)
    assert mso(q[:, :5], q[:, 5:12]) == pytest.approx(0.0, abs=1e-10)
    assert mso(q[:, :3], q[:, :8]) == pytest.approx(1.0, abs=1e-6)  # the smaller inside the larger


def test_random_baseline_matches_monte_carlo():
    d, ka, kb = 48, 6, 15
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(300):
        qa = torch.linalg.qr(torch.randn(d, ka, generator=gen, dtype=torch.float64))[0]
        qb = torch.linalg.qr(torch.randn(d, kb, generator=gen, dtype=torch.float64))[0]
        draws.append(float((qa.T @ qb).pow(2).sum()) / min(ka, kb))
    assert random_mso(ka, kb, d) == pytest.approx(np.mean(draws), rel=0.10)


def test_mso_curve_matches_numpy():
    a, b = _rand((12, 30), 17), _rand((12, 8), 18)
    etas = [0.01, 0.5, 0.9, 0.99, 1.0]
    curve = mso_curve(a, b, etas)
    for eta, pt in zip(etas, curve):
        ka, kb = np_energy_rank(a.numpy(), eta), np_energy_rank(b.numpy(), eta)
        qa = np.linalg.svd(a.numpy().astype(np.float64), full_matrices=False)[0][:, :ka]
        qb = np.linalg.svd(b.numpy().astype(np.float64), full_matrices=False)[0][:, :kb]
        assert (pt["k_a"], pt["k_b"]) == (ka, kb)
        assert pt["mso"] == pytest.approx(((qa.T @ qb) ** 2).sum() / min(ka, kb), abs=1e-5)
        assert pt["random"] == pytest.approx(max(ka, kb) / 12)
    assert left_basis(a, 0.5).shape == (12, np_energy_rank(a.numpy(), 0.5))
    assert energy_rank(torch.zeros(3), 0.5) == 0


def test_location_mass_and_largest_magnitude():
    x = torch.tensor([[3.0, -1.0], [0.5, -4.0]])
    m = largest_magnitude(x, 2)
    assert m.tolist() == [[True, False], [False, True]]
    assert mass(x, m) == pytest.approx((25.0, 26.25))


# ---------------------------------------------------------------- streaming over checkpoints


def _perturbed(model, seed, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def trio(tmp_path, tok, make=tiny_llama):
    """Saved (base, aligned, finetuned) tiny checkpoints and their state dicts."""
    paths, states = {}, {}
    for i, name in enumerate(("base", "aligned", "finetuned")):
        m = make(tok, seed=0)
        for j in range(i):
            _perturbed(m, 100 + j)
        paths[name] = save_tiny(tmp_path / name, m, tok)
        states[name] = {k: v.detach().clone() for k, v in m.state_dict().items()}
    return paths, states


def test_select_tensors_default_and_targets(tmp_path, tok):
    from harmprune.recipes.subspace.checkpoints import TensorReader, select_tensors

    paths, _ = trio(tmp_path, tok, tiny_qwen2)
    with TensorReader(paths["aligned"], "aligned") as r:
        default = select_tensors(r.shapes)
        assert default and all(len(r.shapes[n]) == 2 and ".layers." in n for n in default)
        assert not any(n.endswith(".bias") for n in default)
        extra = select_tensors(r.shapes, ["re:.*\\.\\d+\\..*", "*layernorm", "*.bias", "model.embed_tokens"])
        assert "model.embed_tokens.weight" in extra and "model.layers.0.self_attn.q_proj.bias" in extra
        assert "model.layers.1.input_layernorm.weight" in extra
        assert "model.layers.0.self_attn.q_proj.weight" not in select_tensors(r.shapes, ["*.mlp.*"])
        with pytest.raises(HarmpruneError, match="matches no tensor"):
            select_tensors(r.shapes, ["*nothing*"])


def _project_cfg(paths, out, **kw):
    from harmprune.recipes.subspace.project import ProjectConfig

    return ProjectConfig(base=paths["base"], aligned=paths["aligned"], finetuned=paths["finetuned"], out=str(out),
                         energy_rho=[0.25, 1.0], **kw)


@pytest.mark.parametrize("mode", ["parallel", "orth"])
def test_streamed_projection_equals_numpy_and_loads(tmp_path, tok, mode):
    from transformers import AutoModelForCausalLM

    from harmprune.recipes.subspace.project import run_project

    paths, st = trio(tmp_path, tok)
    out = run_project(_project_cfg(paths, tmp_path / "proj", rho=[0.5], mode=mode))
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    res = json.loads((out / "results.json").read_text())
    recs = res["rho"]["0.5"]["per_tensor"]
    kept_sum = upd_sum = 0.0
    for name, wa in st["aligned"].items():
        if name == "lm_head.weight":
            continue  # tied to the embedding
        if name in recs:
            v = (wa - st["base"][name]).numpy()
            u = (st["finetuned"][name] - wa).numpy()
            par = np_parallel(v, u, 0.5)
            kept = par if mode == "parallel" else u - par
            np.testing.assert_allclose(got[name].numpy(), wa.numpy() + kept, atol=1e-5)
            assert recs[name]["fraction"] == pytest.approx((kept ** 2).sum() / (u.astype(np.float64) ** 2).sum(), rel=1e-4)
            kept_sum += (kept ** 2).sum()
            upd_sum += (u.astype(np.float64) ** 2).sum()
        else:
            assert torch.equal(got[name], wa), name
    assert set(recs) == {n for n in st["aligned"] if ".layers." in n and n.endswith("proj.weight")}
    assert res["rho"]["0.5"]["total"]["fraction"] == pytest.approx(kept_sum / upd_sum, rel=1e-4)
    assert res["unselected"]["update"] > 0  # embeddings and norms changed too, and are dropped
    assert (out / "energy_kept.png").is_file() and (out / "tokenizer_config.json").is_file()
    curve = res["energy_curve"]["topk"]["parallel"]
    assert curve[0]["fraction"] <= curve[1]["fraction"]


def test_several_rhos_one_factorisation_and_norms_biases(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    from harmprune.recipes.subspace.project import run_project

    paths, st = trio(tmp_path, tok, tiny_qwen2)
    out = run_project(_project_cfg(paths, tmp_path / "proj", rho=[0.25, 1.0], side="short",
                                   targets=["re:.*\\.\\d+\\..*", "*.bias", "*norm"], factor_dir=str(tmp_path / "f")))
    full = AutoModelForCausalLM.from_pretrained(out / "rho-1").state_dict()
    low = AutoModelForCausalLM.from_pretrained(out / "rho-0.25").state_dict()
    b = "model.layers.0.self_attn.k_proj.bias"
    v, u = (st["aligned"][b] - st["base"][b]).numpy(), (st["finetuned"][b] - st["aligned"][b]).numpy()
    np.testing.assert_allclose(low[b].numpy(), st["aligned"][b].numpy() + (u @ v) / (v @ v) * v, atol=1e-6)
    w = "model.layers.1.mlp.up_proj.weight"  # tall (64 × 32): short side keeps all of U at rho = 1
    np.testing.assert_allclose(full[w].numpy(), st["finetuned"][w].numpy(), atol=1e-5)
    assert (tmp_path / "f" / f"{w}.safetensors").is_file()


def test_mismatched_pair_refused_in_one_line(tmp_path, tok):
    from harmprune.recipes.subspace.project import run_project

    paths, _ = trio(tmp_path, tok)
    wide = save_tiny(tmp_path / "wide", tiny_llama(tok, hidden=48), tok)
    with pytest.raises(HarmpruneError) as e:
        run_project(_project_cfg({**paths, "finetuned": wide}, tmp_path / "o", rho=[0.5]))
    msg = str(e.value)
    assert "\n" not in msg and "differ at parameter model.embed_tokens.weight" in msg and "[105, 32]" in msg
    deep = save_tiny(tmp_path / "deep", tiny_llama(tok, layers=3), tok)
    with pytest.raises(HarmpruneError, match="model.layers.2.* absent from"):
        run_project(_project_cfg({**paths, "base": deep}, tmp_path / "o", rho=[0.5]))
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- overlap commands


def test_weight_overlap_command(tmp_path, tok):
    from harmprune.recipes.subspace.overlap import OverlapConfig, run_overlap

    paths, st = trio(tmp_path, tok)
    useful_model = _perturbed(_perturbed(tiny_llama(tok), 100), 200)  # the aligned model + another update
    useful = save_tiny(tmp_path / "useful", useful_model, tok)
    out = run_overlap(OverlapConfig(base=paths["base"], aligned=paths["aligned"], harmful=paths["finetuned"],
                                    useful=useful, out=str(tmp_path / "ov"), eta=[0.5, 0.9]))
    res = json.loads((out / "results.json").read_text())
    name = "model.layers.0.mlp.down_proj.weight"
    a = st["aligned"][name]
    h = (st["finetuned"][name] - a).numpy()
    u = (useful_model.state_dict()[name] - a).numpy()
    k_h, k_u = np_energy_rank(h, 0.9), np_energy_rank(u, 0.9)
    qh = np.linalg.svd(h.astype(np.float64))[0][:, :k_h]
    qu = np.linalg.svd(u.astype(np.float64))[0][:, :k_u]
    pt = res["per_tensor"][name]["harmful vs useful"][1]
    assert pt["mso"] == pytest.approx(((qh.T @ qu) ** 2).sum() / min(k_h, k_u), abs=1e-4)
    assert set(res["by_type"]["harmful vs alignment"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"}
    assert (out / "mso_weights.png").is_file()


def test_left_padded_last_token_states_equal_single_prompts(tok):
    from harmprune.core.hidden import last_token_states

    model = tiny_llama(tok, layers=3)
    prompts = ["hi", "a much longer prompt here", "mid size one"]
    batched = last_token_states(model, tok, prompts, [1, 2, 3], "chat", batch_size=3)
    for i, p in enumerate(prompts):
        single = last_token_states(model, tok, [p], [1, 2, 3], "chat", batch_size=1)
        for l in (1, 2, 3):
            np.testing.assert_allclose(batched[l][i].numpy(), single[l][0].numpy(), atol=1e-5)
    # and against a plain forward of the prompt alone (no padding code involved)
    from harmprune.core.formatting import prompt_ids

    ids = torch.tensor([prompt_ids(tok, prompts[1], "chat")])
    hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    np.testing.assert_allclose(batched[2][1].numpy(), hs[2][0, -1].detach().numpy(), atol=1e-5)


def test_depth_layers():
    from harmprune.recipes.subspace.activations import depth_layers

    assert depth_layers(30, 0.65, 0.9) == list(range(20, 28))
    assert depth_layers(2, 0.65, 0.9) == [2]


def test_activations_command(tmp_path, tok):
    from harmprune.recipes.subspace.activations import ActivationsConfig, run_activations

    path = save_tiny(tmp_path / "m", tiny_llama(tok, layers=4), tok)
    out = run_activations(ActivationsConfig(out=str(tmp_path / "act"), model=path, nsamples=6, eta=[0.5, 0.9],
                                            sets=["harmful", "xstest", "harmbench"]))
    res = json.loads((out / "results.json").read_text())
    assert res["layers"] == [3] and res["hidden_size"] == 32
    assert set(res["mean"]) == {"harmful vs xstest", "harmful vs harmbench", "xstest vs harmbench"}
    assert all(0 <= p["mso"] <= 1 + 1e-6 for c in res["mean"].values() for p in c)
    assert res["data"]["harmful"]["selected"] == 6 and (out / "mso_activations.png").is_file()


# ---------------------------------------------------------------- the study, end to end


def test_subspace_study_end_to_end(tmp_path, tok):
    from harmprune.recipes.subspace.study import StudyConfig, run_subspace_study

    paths, _ = trio(tmp_path, tok)
    cfg = StudyConfig(base=paths["base"], aligned=paths["aligned"], out=str(tmp_path / "study"),
                      finetune_dir=str(tmp_path / "ft"), ft_limit=4, ft_steps=2, ft_batch_size=2, ft_lora_r=2,
                      rho=[0.5], eta=[0.5, 0.9], limit=2, nll_nsamples=3, xstest_limit=2, max_new_tokens=3,
                      q=0.05, p=0.1, project=["useful", "harmful", "contaminated"], nsamples=3, act_nsamples=4, batch_size=4, max_length=256,
                      judge="classifier,keyword", scores_dir=str(tmp_path / "scores"))
    out = run_subspace_study(cfg)
    res = json.loads((out / "results.json").read_text())
    assert set(res["levels"]) == {"aligned", "base", "useful", "harmful", "contaminated"}
    assert res["evaluations"] == 5 + 3 * 3 * 2 + 3
    for kind in ("useful", "harmful", "contaminated"):
        pts = {(m, b): v[0] for m, bs in res["projections"][kind].items() for b, v in bs.items()}
        for b in ("topk", "randk", "gaussian"):  # parallel + orth energies add up to 1
            assert pts[("parallel", b)]["energy"] + pts[("orth", b)]["energy"] == pytest.approx(1.0, abs=1e-5)
        assert all(set(p) >= {"harm_classifier", "harm_keyword", "benign_nll", "harmful_nll", "xstest_compliance"}
                   for p in pts.values())
    loc = res["location"]
    assert 0 < loc["V"]["btap"] <= loc["V"]["largest_v"] and 0 < loc["V"]["random"] <= loc["V"]["largest_v"]
    assert res["reverse"]["btap"]["total_pruned"] == res["reverse"]["random"]["total_pruned"] \
        == res["reverse"]["largest_v"]["total_pruned"] == res["btap"]["total_pruned"] > 0
    assert set(res["weight_overlap"]["overall"]) == {"harmful vs useful", "harmful vs alignment", "useful vs alignment"}
    report = (out / "report.md").read_text()
    assert "Where B-TAP's harm-specific set sits" in report and "nan" not in report.lower().replace("nan-", "")
    assert all((out / f).is_file() for f in res["figures"])
    # a second run re-uses the cached fine-tunes
    again = run_subspace_study(StudyConfig(**{**cfg.__dict__, "overwrite": True, "project": ["harmful"], "figures": False,
                                              "modes": ["parallel"], "bases": ["topk"]}))
    assert json.loads((again / "results.json").read_text())["evaluations"] == 5 + 1 + 3
    assert len(list((tmp_path / "scores").glob("*/*-snip*-n3-*"))) == 2  # the B-TAP set's scores, cached once
    assert json.loads((again / "results.json").read_text())["btap"] == res["btap"]
