"""The structure of the package: one validated options object per method, the method registry, and
the import graph (layers that only point down, no cycle, no private name across modules)."""
import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import loradafast
from loradafast import options
from loradafast.methods import registry
from tiny import padded_batches, random_sequences, tiny_llama


@pytest.fixture(scope="module")
def stats():
    return loradafast.collect(tiny_llama(), padded_batches(random_sequences(4), 2), progress=False)


# ---- options ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, field, value, match", [
    (loradafast.LoraDAConfig, "beta", -1.0, "beta"),
    (loradafast.LoraDAConfig, "gamma", 0.0, "gamma"),
    (loradafast.LoraDAConfig, "damping", float("inf"), "finite"),
    (loradafast.LoraDAConfig, "num_train_samples", 1.5, "num_train_samples"),
    (loradafast.LoraDAConfig, "y_factor", "kron", "y_factor"),
    (loradafast.LoraDAConfig, "eigensolver", "qr", "eigensolver"),
    (loradafast.LoraDAConfig, "residual_tol", -1e-3, "residual_tol"),
    (loradafast.LoraDAConfig, "dtype", torch.float16, "dtype"),
    (loradafast.LoraGAConfig, "variant", "official", "loraga_variant"),
    (loradafast.LoraOneConfig, "gamma", -2.0, "gamma"),
    (loradafast.PissaConfig, "niter", -1, "pissa_niter"),
    (loradafast.FisherSubspaceConfig, "y_factor", "kron", "y_factor"),
])
def test_configs_validate_when_built(cls, field, value, match):
    cls()  # the defaults are valid
    with pytest.raises(ValueError, match=match):
        cls(**{field: value})


def test_every_method_has_a_record_and_an_options_class():
    assert set(loradafast.METHODS) == set(registry.REGISTRY)
    for name, record in registry.REGISTRY.items():
        assert record.name == name and issubclass(record.config, options.MethodConfig)
        assert record.data_aware == (name not in loradafast.WEIGHT_ONLY_METHODS)
        assert record.statistics <= {"G", "Y", "Z"}
    assert registry.REGISTRY["lora-ga"].statistics == {"G"} == registry.REGISTRY["lora-one"].statistics
    assert {n: m.default_gamma for n, m in registry.REGISTRY.items() if m.default_gamma is not None} == {
        "lora-da": 1024.0, "lora-ga": 16.0, "lora-one": 128.0}
    assert {n for n, m in registry.REGISTRY.items() if m.moves_base} == {"pissa", "milora", "lora-ga",
                                                                         "fisher-subspace"}


def test_config_object_equals_keywords(stats):
    by_keywords = loradafast.solve(stats, 2, beta=0.1, gamma=64.0, damping_mode="relative")
    by_config = loradafast.solve(stats, 2, config=loradafast.LoraDAConfig(beta=0.1, gamma=64.0,
                                                                          damping_mode="relative"))
    assert by_config.config == by_keywords.config
    assert by_config.options == by_keywords.options and by_config.options["beta"] == 0.1
    for name, layer in by_keywords.layers.items():
        torch.testing.assert_close(layer.lora_A, by_config.layers[name].lora_A, rtol=0, atol=0)
        torch.testing.assert_close(layer.lora_B, by_config.layers[name].lora_B, rtol=0, atol=0)


def test_options_that_do_not_apply_raise(stats):
    with pytest.raises(ValueError, match="pissa_niter.*'lora-da'.*LoraDAConfig"):
        loradafast.solve(stats, 2, pissa_niter=4)
    with pytest.raises(ValueError, match="beta.*'lora-ga'"):
        loradafast.solve(stats, 2, method="lora-ga", beta=0.1)
    with pytest.raises(ValueError, match="seed.*'pissa'"):
        loradafast.initialize(tiny_llama(), None, 2, method="pissa", seed=0)
    with pytest.raises(TypeError, match="takes a LoraGAConfig"):
        loradafast.solve(stats, 2, method="lora-ga", config=loradafast.LoraDAConfig())
    with pytest.raises(ValueError, match="not both"):
        loradafast.solve(stats, 2, config=loradafast.LoraDAConfig(), beta=0.1)
    with pytest.raises(ValueError, match="y_factor='full'.*'diag'"):
        loradafast.solve(stats, 2, config=loradafast.LoraDAConfig(y_factor="full"))
    with pytest.raises(TypeError, match="unexpected keyword"):
        loradafast.solve(stats, 2, rnak=2)


def test_options_are_checked_once_where_they_are_built(stats, monkeypatch):
    built = []
    real = loradafast.LoraDAConfig.__post_init__
    monkeypatch.setattr(loradafast.LoraDAConfig, "__post_init__", lambda self: built.append(1) or real(self))
    loradafast.initialize(tiny_llama(), padded_batches(random_sequences(4), 2), 2, beta=0.1, progress=False)
    assert len(built) == 1


def test_recorded_options_name_the_keywords(stats):
    result = loradafast.solve(stats, 2, method="lora-ga", loraga_variant="peft")
    assert result.options["loraga_variant"] == "peft" and result.options["gamma"] == 16.0
    assert isinstance(result.config, loradafast.LoraGAConfig)
    assert dataclasses.replace(result.config, gamma=8.0).gamma == 8.0


# ---- layout ----------------------------------------------------------------------------------------

# The house rule: no function over 60 lines, from its ``def`` to its last line (decorators left out,
# the docstring in; a nested function counted on its own).
HOUSE_FUNCTION_LINES = 60
# Functions over the rule that cannot be split yet ("module.qualified.name"), each with why.  The
# test fails when one of them is gone or fits the rule again, so the list cannot go stale.
LONG_ALLOWED = {}


def _function_lengths() -> dict[str, int]:
    """"module.qualified.name" → lines of every function of the package (methods as ``Class.name``,
    nested functions as ``outer.name``; of two definitions of one name, the longer)."""
    lengths = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lengths[name] = max(lengths.get(name, 0), child.end_lineno - child.lineno + 1)
                visit(child, name)
            else:  # functions defined inside if/try/with blocks
                visit(child, prefix)

    for module, path in _package_modules().items():
        visit(ast.parse(path.read_text(), str(path)), module)
    return lengths


def test_no_function_over_60_lines():
    lengths = _function_lengths()
    long = {name: n for name, n in lengths.items() if n > HOUSE_FUNCTION_LINES and name not in LONG_ALLOWED}
    modules = sorted(_package_modules(), key=len, reverse=True)  # the longest module prefix names the module
    where = {name: next(m for m in modules if name.startswith(m + ".")) for name in long}
    assert not long, f"functions over {HOUSE_FUNCTION_LINES} lines (split them):\n" + "\n".join(
        f"{where[name]}:{name[len(where[name]) + 1:]} ({n} lines)" for name, n in sorted(long.items()))
    stale = sorted(f"{name} ({'gone' if name not in lengths else f'{lengths[name]} lines'})"
                   for name in LONG_ALLOWED if lengths.get(name, 0) <= HOUSE_FUNCTION_LINES)
    assert not stale, f"LONG_ALLOWED lists functions that are gone or fit the rule now: {stale}"


# ---- the pass: full Y adds an input group's Z with its first layer's Y in one launch ---------------

def test_full_y_adds_z_and_y_in_one_call(monkeypatch):
    from loradafast import kernels
    from loradafast.statistics import hooks

    model, batches = tiny_llama(), padded_batches(random_sequences(4), 2)
    pairs = []
    real_pair = kernels.kfac_accumulate_pair
    monkeypatch.setattr(kernels, "kfac_accumulate_pair", lambda *a, **k: pairs.append(1) or real_pair(*a, **k))
    paired = loradafast.collect(model, batches, y_factor="full", progress=False)
    assert len(pairs) == 2 * len(paired.z_sums)  # every input group, every batch

    def add_z_in_forward(self, name, rows):  # what the pass did before: Z in the forward hook
        acc = self.z_sum.setdefault(name, torch.zeros(rows.shape[1], rows.shape[1]))
        kernels.kfac_accumulate(acc, rows, self.mask)

    monkeypatch.setattr(hooks.Accumulator, "_add_z", add_z_in_forward)
    forward = loradafast.collect(model, batches, y_factor="full", progress=False)
    assert paired.z_sums.keys() == forward.z_sums.keys()
    for key, z in paired.z_sums.items():
        torch.testing.assert_close(z, forward.z_sums[key], rtol=0, atol=0)
    for name, layer in paired.layers.items():
        torch.testing.assert_close(layer.y_sum, forward.layers[name].y_sum, rtol=0, atol=0)
        assert layer.input_group == forward.layers[name].input_group


# ---- layers: imports only point down ---------------------------------------------------------------
#
# The import graph is read from the source with ``ast``: every ``import`` and ``from ... import``
# inside loradafast/, function-local ones included (an import deferred to call time is still a
# dependency).  An edge goes to the module a name is read from: ``from ..statistics import
# provenance`` reads the submodule, ``from .statistics import collect`` the package's __init__.

# The package's layers, lowest first; a module imports from its own layer and the ones below it.
# ``pkg.*`` is the package and every module under it; a module's own entry beats its package's.
# docs/design.md §7 lists the same layers (test_design_lists_the_layers_of_the_test).
LAYERS = (
    ("kernels and linalg", ("loradafast.kernels.*", "loradafast.linalg.*")),
    # Plain data and helpers that every stage shares; none of them knows a stage.
    ("foundations", ("loradafast._version", "loradafast.options", "loradafast.progress", "loradafast.targets",
                     "loradafast.integrations.peft_targets", "loradafast.distributed", "loradafast.layer_init",
                     "loradafast.layout", "loradafast.device_memory", "loradafast.user_warnings",
                     "loradafast.plots")),
    # The pass, and the memory plan it runs under.
    ("statistics", ("loradafast.statistics.*", "loradafast.planner")),
    ("methods", ("loradafast.methods.*",)),
    # One initialisation and its stages (the pipeline object, the passes, the solve), the result and
    # what writes it (adapter files and model writes, the report).  solver.py lives under methods/
    # but composes their factors into an InitResult.
    ("pipeline", ("loradafast.pipeline", "loradafast.methods.solver", "loradafast.passes", "loradafast.result",
                  "loradafast.report", "loradafast.report_plots", "loradafast.integrations.peft_files",
                  "loradafast.integrations.peft_model")),
    ("entry points and integrations", ("loradafast.api", "loradafast.integrations.peft_entry",
                                       "loradafast.integrations", "loradafast.integrations.trainer")),
    ("package face", ("loradafast",)),
    ("command line", ("loradafast.cli.*", "loradafast.__main__", "loradafast.demo", "loradafast.data")),
)

# Edges that point up and cannot be fixed yet, each with why.  Keep it short.
UPWARD_ALLOWED = set()
# (importer, module, private name) used across modules that cannot be made public yet, each with why.
PRIVATE_ALLOWED = set()


def _package_modules() -> dict[str, Path]:
    root = Path(loradafast.__file__).parent
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


class _Import(NamedTuple):
    module: str  # the package module read from
    name: str | None  # the name read from it; None where the import names the module itself
    binds: tuple[str, str] | None  # (local name, package module) where the import binds a module


def _imports(module: str, path: Path, modules) -> list[_Import]:
    """Every import of the package's own modules in ``module``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "loradafast":  # ``import a.b`` binds a, ``import a.b as c`` a.b
                    target = _owner(alias.name, modules)
                    found.append(_Import(target, None, (alias.asname, target) if alias.asname else
                                         ("loradafast", "loradafast")))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            if base.split(".")[0] != "loradafast":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    found.append(_Import(sub, None, (alias.asname or alias.name, sub)))
                else:
                    found.append(_Import(_owner(base, modules), alias.name, None))
    return found


def _owner(name: str, modules) -> str:
    while name not in modules and "." in name:
        name = name.rpartition(".")[0]
    return name


def _import_graph() -> dict[str, set[str]]:
    modules = _package_modules()
    return {m: {i.module for i in _imports(m, path, modules) if i.module != m} for m, path in modules.items()}


def _in_entry(module: str, entry: str) -> bool:
    return module == entry or entry.endswith(".*") and (module == entry[:-2] or module.startswith(entry[:-1]))


def _layer_of(module: str) -> int | None:
    """The index in LAYERS of ``module``'s own entry, else of its innermost package's ``pkg.*``."""
    matches = [(not entry.endswith(".*"), len(entry), i) for i, (_, entries) in enumerate(LAYERS)
               for entry in entries if _in_entry(module, entry)]
    return max(matches)[2] if matches else None


def _cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], set[str]]]:
    """Every strongly connected component of more than one module (Tarjan), with one cycle through it."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while v not in component:
                component.add(stack.pop())
            on_stack.difference_update(component)
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(_cycle_through(graph, c), c) for c in components]


def _cycle_through(graph, component: set[str]) -> list[str]:
    """A shortest closed path inside ``component`` from its first module (breadth first)."""
    start = min(component)
    paths, frontier = {start: [start]}, [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    following.append(w)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def test_no_import_cycle():
    graph = _import_graph()
    cycles = _cycles(graph)
    lines = []
    for cycle, members in cycles:  # one cycle, then every edge among the modules caught in cycles with it
        lines += [" → ".join(cycle)] + [f"    {m} → {t}" for m in sorted(members) for t in sorted(graph[m] & members)]
    assert not cycles, "import cycles:\n" + "\n".join(lines)


def test_every_module_has_a_layer():
    modules = _package_modules()
    unmapped = sorted(m for m in modules if _layer_of(m) is None)
    assert not unmapped, f"modules in no layer: {unmapped}; add each to LAYERS in tests/test_house.py"
    stale = sorted(e for _, entries in LAYERS for e in entries if not any(_in_entry(m, e) for m in modules))
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_imports_only_point_down():
    graph = _import_graph()
    names = [name for name, _ in LAYERS]
    upward = sorted(f"{m} ({names[_layer_of(m)]}) → {t} ({names[_layer_of(t)]})"
                    for m, targets in graph.items() for t in targets
                    if None not in (_layer_of(m), _layer_of(t)) and _layer_of(t) > _layer_of(m)
                    and (m, t) not in UPWARD_ALLOWED)
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)
    stale = sorted(e for e in UPWARD_ALLOWED if e[1] not in graph.get(e[0], ()) or _layer_of(e[1]) <= _layer_of(e[0]))
    assert not stale, f"UPWARD_ALLOWED lists edges that no longer point up: {stale}"


def _private_uses() -> set[tuple[str, str, str]]:
    """(module, other module, private name) for ``from .other import _name`` and ``other._name``."""
    modules = _package_modules()
    uses = set()
    for module, path in modules.items():
        found = _imports(module, path, modules)
        uses |= {(module, i.module, i.name) for i in found if i.name is not None and _private(i.name)
                 and i.module != module}
        bound = dict(i.binds for i in found if i.binds is not None)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                owner = _module_of(node.value, bound, modules)
                if owner is not None and owner != module and f"{owner}.{node.attr}" not in modules:
                    uses.add((module, owner, node.attr))
    return uses


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_of(node, bound, modules) -> str | None:
    """The package module an expression such as ``kernels`` or ``loradafast.methods.registry`` names."""
    if isinstance(node, ast.Name):
        return bound.get(node.id)
    if isinstance(node, ast.Attribute):
        parent = _module_of(node.value, bound, modules)
        if parent is not None and f"{parent}.{node.attr}" in modules:
            return f"{parent}.{node.attr}"
    return None


def test_no_private_name_used_across_modules():
    uses = _private_uses()
    crossing = sorted(uses - PRIVATE_ALLOWED)
    assert not crossing, "private names used across modules:\n" + "\n".join(f"{m} → {o}.{n}" for m, o, n in crossing)
    stale = sorted(PRIVATE_ALLOWED - uses)
    assert not stale, f"PRIVATE_ALLOWED lists uses that are gone: {stale}"


def _design_layers(design: str) -> list[tuple[str, set[str]]]:
    """The numbered list of layers in docs/design.md §7: (bold name, the modules in backquotes after
    the colon, parentheses left out)."""
    section = design.split("\n## 7. Layout\n", 1)[1].split("\n## ", 1)[0]
    layers = []
    for entry in re.findall(r"^\d+\. (.*(?:\n   .*)*)", section, flags=re.M):
        name = re.match(r"\*\*(.+?)\*\*", entry).group(1)
        entry = _without_parentheses(entry)[0]
        members = re.findall(r"`([\w.*]+)`", entry.split(":", 1)[1])
        layers.append((name, {m if m == "loradafast" else f"loradafast.{m}" for m in members}))
    return layers


def _without_parentheses(text: str) -> tuple[str, list[str]]:
    """``text`` with its parenthesised parts (nested ones too) left out, and those parts."""
    inside = []
    while re.search(r"\([^()]*\)", text):
        inside += re.findall(r"\(([^()]*)\)", text)
        text = re.sub(r"\([^()]*\)", " ", text)
    return text, inside


def test_design_lists_the_layers_of_the_test():
    design = (Path(loradafast.__file__).parent.parent / "docs" / "design.md").read_text()
    assert _design_layers(design) == [(name, set(entries)) for name, entries in LAYERS]


def _layout_paths(readme: str) -> list[tuple[str, str | None]]:
    """(path, or-path) for every path the README's Layout block names: each line's first column
    is a directory, and the names after it are inside it; a name in parentheses (a description)
    may instead be a path from the top of the repository, its or-path."""
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    entries = []
    for line in section.split("```", 2)[1].splitlines()[1:]:
        if line[:1].strip():
            entries.append(line)
        elif entries:
            entries[-1] += " " + line.strip()
    paths = []
    for entry in entries:
        directory, _, rest = entry.partition(" ")
        paths.append((directory, None))
        listed, described = _without_parentheses(rest)
        for text, from_top in [(listed, False)] + [(d, True) for d in described]:
            for word in re.split(r"[\s,;+]+", text):
                if re.fullmatch(r"[\w-]+(/[\w-]+)*(/|\.[a-z]+)", word):
                    paths.append((directory.rstrip("/") + "/" + word, word if from_top else None))
    return paths


def test_readme_layout_names_only_paths_that_exist():
    root = Path(loradafast.__file__).parent.parent
    paths = _layout_paths((root / "README.md").read_text())
    assert len(paths) > 20  # the parser found the block
    missing = sorted({p for p, alt in paths if not (root / p).exists() and not (alt and (root / alt).exists())})
    assert not missing, f"README.md's Layout names paths that do not exist: {missing}"


def _owning_modules() -> set[str]:
    """The modules that own a registered method, read from the registry: the module of its options
    class, or, where that module sits in a package of its own under methods/ (LoRA-DA), every
    module of that package.  A new method's module is among them by its registry line alone."""
    modules = _package_modules()
    owned = set()
    for record in registry.REGISTRY.values():
        home = record.config.__module__
        if home.rpartition(".")[0] != "loradafast.methods":
            home = home.rpartition(".")[0]
        owned |= {m for m in modules if m == home or m.startswith(home + ".")}
    return owned


# The modules that own a method (its options, diagnostics, formulas, solve) or collect them (the
# registry, the methods package's face); the methods' shared machinery (method, solver, stability,
# checks, problem, factors) is not among them.
METHOD_OWNERS = _owning_modules()
METHOD_MODULES = METHOD_OWNERS | {"loradafast.methods", "loradafast.methods.registry"}
# Others that may name a method in a string, each with why.
METHOD_NAME_ALLOWED = {
    "loradafast.cli.parser": "a usage example in the command's description (loradafast solve --method ...)",
    "loradafast.integrations.peft_model": "PEFT's own init_lora_weights values (pissa, lora_ga, ...), not ours",
}


def _docstrings(tree) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def test_no_method_name_outside_the_methods():
    """A method is a plug-in: outside its own modules and the registry no module names one, in a
    string equal to the name or inside a message or help text; they read the registry's records
    (``DEFAULT_METHOD``, ``workspace``, ``solve_cost``, ``spectra``, ``noise_advice``, ...).
    Docstrings may name them."""
    names = sorted(registry.REGISTRY, key=len, reverse=True)
    inside = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")(?![\w-])")
    found = []
    for module, path in _package_modules().items():
        if module in METHOD_MODULES or module in METHOD_NAME_ALLOWED:
            continue
        tree = ast.parse(path.read_text())
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and inside.search(node.value)):
                found.append(f"{module}:{node.lineno} {node.value[:60]!r}")
    assert not found, f"method names outside the methods' own modules: {found}"
    assert all(m in _package_modules() for m in METHOD_MODULES | set(METHOD_NAME_ALLOWED)), "a module that is gone"


# Outside the methods, a method's own module is reached through its registry record alone; only
# these re-export its public classes (its options and diagnostics), each with why.
METHOD_IMPORT_ALLOWED = {
    "loradafast": "the package face exports every options class (LoraDAConfig, ...) and LoraDADiagnostics",
    "loradafast.result": "the diagnostics classes keep their old address beside InitResult",
}


def _reached(module: str, path: Path, modules) -> set[str]:
    """The package modules ``module`` reads from, a name re-exported by a package counted as read
    from the module that defines it (``from .methods import lora_ga`` reaches gradient_svd)."""
    reached = set()
    for imp in _imports(module, path, modules):
        target = imp.module
        if imp.name is not None:
            value = getattr(importlib.import_module(imp.module), imp.name, None)
            owner = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
            target = owner if owner in modules else target
        reached.add(target)
    return reached - {module}


def test_only_the_registry_reaches_a_method_s_module():
    """What a new method touches is its own module and the registry line: the planner, the pass,
    the solver, the report and the entry points import no method's module, not even through a
    package's re-export."""
    modules = _package_modules()
    assert METHOD_OWNERS >= {"loradafast.methods.lora_da.solve", "loradafast.methods.weight_svd"}
    reached = {m: _reached(m, path, modules) & METHOD_OWNERS for m, path in modules.items() if m not in METHOD_MODULES}
    reaching = {m: sorted(owners) for m, owners in reached.items() if owners}
    assert set(reaching) <= set(METHOD_IMPORT_ALLOWED), {m: t for m, t in reaching.items()
                                                         if m not in METHOD_IMPORT_ALLOWED}
    assert set(METHOD_IMPORT_ALLOWED) <= set(reaching), "METHOD_IMPORT_ALLOWED lists modules that import none"


# The modules that import PEFT: its modules under integrations/ (peft_targets, the LoRA layers of a
# PeftModel and PEFT's target matching, is a foundation under targets; then its three layers), and,
# each with why, the few others.
PEFT_IMPORTERS = {"loradafast.integrations.peft_targets", "loradafast.integrations.peft_files",
                  "loradafast.integrations.peft_model", "loradafast.integrations.peft_entry"}
PEFT_IMPORT_ALLOWED = {
    # Applications on top of the package, as a user's script would be: the CLI builds PEFT's
    # LoraConfig from its flags, the demo reloads the adapter with PeftModel.from_pretrained.
    "loradafast.cli.init_command": "builds the LoraConfig of its flags",
    "loradafast.demo": "reloads the saved adapter as a user would",
}


def test_only_the_peft_layers_import_peft():
    importers = set()
    for module, path in _package_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            if any(n == "peft" or n.startswith("peft.") for n in names):
                importers.add(module)
    assert importers - PEFT_IMPORTERS <= set(PEFT_IMPORT_ALLOWED), sorted(importers - PEFT_IMPORTERS)
    assert set(PEFT_IMPORT_ALLOWED) <= importers, "PEFT_IMPORT_ALLOWED lists modules that no longer import peft"


# ---- benchmark results -----------------------------------------------------------------------------

def _benchmark_exists(benchmarks: Path, name: str) -> bool:
    """A script ``bench_<name>.py`` or ``<name>.py`` of benchmarks/, or a folder of ``bench_*.py`` (micro/)."""
    return (bool(name) and ((benchmarks / f"bench_{name}.py").is_file() or (benchmarks / f"{name}.py").is_file()
                            or any((benchmarks / name).glob("bench_*.py"))))


def test_one_results_file_per_benchmark_and_device():
    # benchmarks/results/ holds one JSON per benchmark and device, <benchmark>_<device>.json (another
    # configuration is another entry of that file: benchmarks/_common.py write_entry). A device slug
    # has no "_" (_common.device_slug), so a second file of one benchmark and device, a configuration
    # in its name, names no benchmark. A plot is named after its results file (<stem>.png, <stem>_<key>.png).
    benchmarks = Path(loradafast.__file__).parent.parent / "benchmarks"
    files = [p for p in (benchmarks / "results").iterdir() if p.is_file()]
    stems = {p.stem for p in files if p.suffix == ".json"}
    bad = [f"{stem}.json" for stem in sorted(stems)
           if not (_benchmark_exists(benchmarks, stem.rpartition("_")[0])
                   and re.fullmatch(r"[a-z0-9-]+", stem.rpartition("_")[2]))]
    bad += sorted(p.name for p in files if p.suffix == ".png"
                  and not any(p.stem == s or p.stem.startswith(s + "_") for s in stems))
    assert not bad, f"benchmarks/results/: not one file per benchmark and device (benchmarks/README.md): {bad}"
