"""The layer rule of docs/design.md, checked on the source: imports only go down, and nothing cycles.

Every ``import`` and ``from ... import`` in ``harmprune/`` counts, also those inside functions (a
lazy import is still a dependency).
"""

import ast
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "harmprune"

# Lower number = lower layer. A module may import its own folder and any lower layer; folders of the
# same layer may not import each other (evals and finetune are siblings).
LAYERS = {
    "harmprune": 0, "harmprune.data": 0,  # the package root and the shipped data (one accessor)
    "harmprune.core": 1,
    "harmprune.attribution": 2, "harmprune.subspace": 2,
    "harmprune.pruning": 3,
    "harmprune.evals": 4, "harmprune.finetune": 4,
    "harmprune.recipes": 5,
    "harmprune.cli": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of the harmprune modules ``path`` imports (relative imports resolved)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("harmprune")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("harmprune"):
                continue
            for a in node.names:  # `from pkg import submodule` depends on the submodule
                sub = f"{target}.{a.name}"
                out.add(sub if _exists(sub) else target)
    return {o for o in out if o != mod}


def _exists(name: str) -> bool:
    p = ROOT.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def folder(name: str) -> str:
    """The layer unit a module belongs to: the longest LAYERS key that prefixes it."""
    best = max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len)
    return best


GRAPH = {module_name(p): imports_of(p) for p in sorted(ROOT.rglob("*.py"))}


def test_graph_is_not_empty():
    assert len(GRAPH) > 50 and "harmprune.recipes.pipeline" in GRAPH
    assert "harmprune.pruning.select" in GRAPH["harmprune.recipes.pipeline"]


@pytest.mark.parametrize("mod", sorted(GRAPH))
def test_imports_only_go_down(mod):
    src = folder(mod)
    bad = []
    for dep in GRAPH[mod]:
        dst = folder(dep)
        if dst == src or dst == "harmprune" and dep == "harmprune":
            continue
        if LAYERS[dst] > LAYERS[src] or (LAYERS[dst] == LAYERS[src] and dst != src):
            bad.append(f"{mod} ({src}, layer {LAYERS[src]}) imports {dep} ({dst}, layer {LAYERS[dst]})")
    assert not bad, "\n".join(bad)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes, or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for start in graph:
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph.get(start, ()))))]
        path = [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
                path.append(nxt)
    return None


def test_no_cycle_between_modules():
    assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH))


def test_no_cycle_between_folders():
    folders: dict[str, set[str]] = {}
    for mod, deps in GRAPH.items():
        src = mod.rpartition(".")[0] if not (ROOT.parent / Path(*mod.split(".")) / "__init__.py").is_file() else mod
        for d in deps:
            dst = d.rpartition(".")[0] if not (ROOT.parent / Path(*d.split(".")) / "__init__.py").is_file() else d
            if dst != src and not src.startswith(dst + ".") and not dst.startswith(src + "."):
                folders.setdefault(src, set()).add(dst)
    assert _cycle(folders) is None, " -> ".join(_cycle(folders))


def test_checker_catches_an_upward_import(tmp_path):
    """The checker itself: a library module importing a recipe is reported."""
    f = ROOT / "pruning" / "select.py"
    fake = {**GRAPH, "harmprune.pruning.select": GRAPH["harmprune.pruning.select"] | {"harmprune.recipes.pipeline"}}
    src, dst = folder("harmprune.pruning.select"), folder("harmprune.recipes.pipeline")
    assert LAYERS[dst] > LAYERS[src] and f.is_file()
    assert _cycle(fake) is not None  # pipeline imports select, so the fake edge closes a cycle


# ---------------------------------------------------------------- recipes are leaves

RECIPES = "harmprune.recipes"
ENTRY = re.compile(r"run_\w+|\w+(Config|Settings)")


def recipe_of(name: str) -> str | None:
    """The recipe a module belongs to: a module directly under recipes/, or a subpackage (one recipe)."""
    parts = name.split(".")
    return ".".join(parts[:3]) if name.startswith(RECIPES + ".") else None


def recipe_imports(source: str, mod: str, is_package: bool = False) -> list[tuple[str, str]]:
    """``(recipe module, imported name)`` for every import of a recipe in ``source`` (the text of module
    ``mod``); importing a module itself names "*"."""
    package = mod if is_package else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, "*") for a in node.names if a.name.startswith(RECIPES + ".")]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub, "*") if _exists(sub) else (target, a.name))
    return [(t, n) for t, n in out if recipe_of(t)]


def foreign_recipe_imports(source: str, mod: str, is_package: bool = False) -> list[str]:
    mine = recipe_of(mod)
    return [f"{mod} imports {name if name != '*' else 'the module'} from {target}"
            for target, name in recipe_imports(source, mod, is_package)
            if recipe_of(target) != mine and not (name != "*" and ENTRY.fullmatch(name))]


def test_recipes_import_other_recipes_only_through_entry_points():
    """A recipe may use another recipe's ``run_*`` functions and ``*Config``/``*Settings`` classes, nothing
    else: a helper two recipes share lives in the library, below them. Inside one subpackage imports are free."""
    bad = [line for p in sorted((ROOT / "recipes").rglob("*.py"))
           for line in foreign_recipe_imports(p.read_text(encoding="utf-8"), module_name(p), p.name == "__init__.py")]
    assert not bad, "\n".join(bad)


def test_a_recipe_of_several_files_is_one_subpackage():
    """``align.py`` beside ``align_data.py`` would be one recipe in two files: such a recipe is a folder."""
    tops = {p.stem for p in (ROOT / "recipes").glob("*.py")} | {p.name for p in (ROOT / "recipes").iterdir() if p.is_dir()}
    split = [f"{a} / {b}" for a in tops for b in tops if b.startswith(a + "_")]
    assert not split, split


def test_recipe_rule_catches_a_helper_import():
    """The checker itself: entry points pass; a helper, a whole module or a lazy import of one are reported;
    a subpackage's own modules are free."""
    src = ("from .pipeline import PipelineConfig, run_pipeline\nfrom .pipeline import draw\nfrom . import sweep\n"
           "def f():\n    from .ablation.run import AblateConfig, study\n")
    bad = foreign_recipe_imports(src, "harmprune.recipes.attacks")
    assert bad == ["harmprune.recipes.attacks imports draw from harmprune.recipes.pipeline",
                   "harmprune.recipes.attacks imports the module from harmprune.recipes.sweep",
                   "harmprune.recipes.attacks imports study from harmprune.recipes.ablation.run"], bad
    assert not foreign_recipe_imports("from . import plots, report\nfrom .checkpoints import select_tensors\n",
                                      "harmprune.recipes.subspace.study")
    assert foreign_recipe_imports("from ..ablation.plots import heatmap\n", "harmprune.recipes.subspace.plots")
    assert not foreign_recipe_imports("from ..core.plots import save\nfrom ..evals import headline\n",
                                      "harmprune.recipes.sweep")


# ---------------------------------------------------------------- one definition per concept
#
# Module type, layer index, mask count, bootstrap interval and the harm-set builder each have one
# definition. Each detector reads a function's code (not its name), so a copy under another name fails too.

NAME = "model.layers.17.mlp.down_proj.weight"


def _strings(fn, consts: dict | None = None) -> list[str]:
    """String literals of ``fn``, and of the module-level constants it names (``_LAYER = re.compile(...)``)."""
    own = [n.value for n in ast.walk(fn) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return own + [v for n in ast.walk(fn) if isinstance(n, ast.Name) for v in (consts or {}).get(n.id, [])]


def _called(fn) -> set[str]:
    return {c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", "")
            for c in ast.walk(fn) if isinstance(c, ast.Call)}


def _parses_layer(fn, consts=None) -> bool:
    """A regex literal that finds the block index in a parameter name, or digits picked from its parts."""
    for s in _strings(fn, consts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = re.search(s, NAME)
        except (re.error, TypeError, RecursionError):
            continue
        if m and m.groups() and m.group(1) == "17":
            return True
    return {"split", "isdigit"} <= _called(fn)


def _parses_module_type(fn, consts=None) -> bool:
    """Splits a name on dots and looks at its ``weight``/``bias`` suffix."""
    return "split" in _called(fn) and bool({"weight", "bias"} & set(_strings(fn, consts)))


def _counts_masks(fn, consts=None) -> bool:
    """Counts the entries of one tensor: ``int(m.sum())``, ``int(d[k].sum())``, ``int(torch.count_nonzero(m))``."""
    for c in ast.walk(fn):
        if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "int" and c.args and isinstance(c.args[0], ast.Call):
            inner = c.args[0]
            f = inner.func
            of = f.value if isinstance(f, ast.Attribute) and f.attr in ("sum", "count_nonzero") and not inner.args \
                else inner.args[0] if getattr(f, "attr", getattr(f, "id", "")) == "count_nonzero" and inner.args else None
            if isinstance(of, (ast.Name, ast.Subscript)):
                return True
    return False


def _bootstrap_interval(fn, consts=None) -> bool:
    return re.fullmatch(r"\w*bootstrap\w*(ci|interval)\w*", fn.name) is not None


def _builds_harm_scores(fn, consts=None) -> bool:
    """Scores outside the attribution package: through the cache (``cached_scores``) or around it."""
    return bool({"cached_scores", "compute_scores"} & _called(fn))


# concept: (detector, its one definition, other places it may match: a folder, or code that counts something else)
CONCEPTS = {
    "layer index": (_parses_layer, "harmprune.core.targets.layer_index", set()),
    "module type": (_parses_module_type, "harmprune.core.targets.module_type", set()),
    "mask count": (_counts_masks, "harmprune.pruning.masks.count_of", {  # token counts and weights, not prune masks
        "harmprune.evals.nll.response_nll", "harmprune.finetune.train.response_nll_sum",
        "harmprune.finetune.masking.nonzero", "harmprune.recipes.subspace.project.unselected_update"}),
    "bootstrap interval": (_bootstrap_interval, "harmprune.evals.results.bootstrap_ci", set()),
    "harm-set builder": (_builds_harm_scores, "harmprune.pruning.harmset.scores_of", {"harmprune.attribution"}),
}


def definitions(source: str, mod: str, detect) -> list[str]:
    """Dotted names of the outermost functions in ``source`` that ``detect`` recognises."""
    tree = ast.parse(source)
    consts = {t.id: [n.value for n in ast.walk(a.value) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
              for a in tree.body if isinstance(a, ast.Assign) for t in a.targets if isinstance(t, ast.Name)}
    out, inner = [], set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and id(node) not in inner and detect(node, consts):
            out.append(f"{mod}.{node.name}")
            inner |= {id(n) for n in ast.walk(node) if n is not node}
    return out


def _allowed(name: str, where: set[str]) -> bool:
    return any(name == w or name.startswith(w + ".") for w in where)


@pytest.mark.parametrize("concept", sorted(CONCEPTS))
def test_one_definition(concept):
    detect, one, others = CONCEPTS[concept]
    found = [d for p in sorted(ROOT.rglob("*.py")) for d in definitions(p.read_text(encoding="utf-8"), module_name(p), detect)]
    assert one in found, f"the {concept} ({one}) moved or is gone: update this test"
    assert [d for d in found if not _allowed(d, {one} | others)] == [], f"a second {concept}"


def test_one_definition_catches_a_copy():
    copies = {
        "layer index": "L = re.compile(r'layers\\.(\\d+)')\ndef block(n):\n    return int(L.search(n).group(1))\n",
        "module type": "def kind(n):\n    p = n.split('.')\n    return p[-2] + ('.bias' if p[-1] == 'bias' else '')\n",
        "mask count": "def pruned(mask):\n    return sum(int(m.sum()) for m in mask.values())\n",
        "bootstrap interval": "def bootstrap_interval(xs, seed):\n    return 0, 1\n",
        "harm-set builder": "def btap(model, tok, rows):\n    return compute_scores(model, tok, rows, 'snip')\n",
    }
    for concept, src in copies.items():
        detect, one, others = CONCEPTS[concept]
        found = definitions(src, "harmprune.recipes.x", detect)
        assert found and not _allowed(found[0], {one} | others), concept
