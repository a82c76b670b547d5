"""The code's shape: no import cycles, no stage importing another stage, kinds on the core only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = {"tasks.config", "tasks.results", "tasks.sources", "tasks.caching", "tasks.tracking"}
CORE |= {"tasks.efficiency", "tasks.metrics"}
CORE |= {"tasks.lm_scoring"}  # how a causal LM's answers and general text are scored
CORE |= {"tasks.kinds"}  # the kinds' interface: the protocol and get_kind
CORE |= {"tasks.sizing"}  # pure sizing rules (max length, truncation, warm-up, time budget)
CORE |= {"tasks.checkpoints"}  # which checkpoint is complete, who holds the folder
CORE |= {"tasks.resolve"}  # what the data says about the run: the settings sized to it
CORE |= {"tasks.environment"}  # environment variables set for a while and put back
CORE |= {"tasks.threads"}  # torch's threads fitted to the cores other processes leave free
# The recipe's parts: its Trainer and samplers, callbacks, the memory fit and step probe, and the
# proof that every weight was updated.
# The recipe's parts; tasks.distributed: the launcher, whose ranks run tasks.train.main.
RECIPE = {"tasks.trainer", "tasks.callbacks", "tasks.fit", "tasks.weights", "tasks.distributed"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports at run time (``if TYPE_CHECKING:`` blocks excluded)."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in known else node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit([n for n in getattr(node, field, []) if isinstance(n, ast.stmt)])

    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    paths = [*ROOT.glob("tasks/**/*.py"), *ROOT.glob("flows/*.py")]
    known = {module_name(p) for p in paths}
    return {module_name(p): imports(p, known) - {module_name(p)} for p in paths}


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*stack, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [])


def test_tasks_never_import_flows_and_stages_never_import_stages():
    for module, targets in graph().items():
        if not module.startswith("tasks"):
            continue
        assert not any(t.startswith("flows") for t in targets), module
        kind_module = module.startswith("tasks.kinds.")
        allowed = CORE - ({"tasks.kinds"} if kind_module else set())
        if module == "tasks.kinds":
            kinds = ("classification", "causal_lm", "sft", "dpo")
            allowed = allowed | {f"tasks.kinds.{k}" for k in kinds}
        if module == "tasks.kinds.sft":  # SFT trains and scores a causal LM: it reuses that kind
            allowed = allowed | {"tasks.kinds.causal_lm"}
        if module == "tasks.kinds.dpo":  # DPO encodes and judges as SFT does
            allowed = allowed | {"tasks.kinds.causal_lm", "tasks.kinds.sft"}
        if module == "tasks.train":  # the recipe and its parts
            allowed = allowed | RECIPE
        stray = {t for t in targets if t.startswith("tasks")} - allowed
        assert not stray, f"{module} imports {sorted(stray)}"


def test_the_pipeline_starts_without_the_training_stack():
    """The flow, the stages and every kind import without torch, transformers' models, datasets,
    sklearn, matplotlib or GE: the first stage (the data contract) starts before the seconds those
    take to import, which load in the stages that use them."""
    import subprocess
    import sys

    heavy = ("torch", "transformers.modeling_utils", "datasets", "sklearn", "matplotlib")
    heavy += ("great_expectations",)
    code = (
        "import sys, flows.finetune, flows.stages\n"
        "from tasks.kinds import get_kind\n"
        "for task in ('text-classification', 'causal-lm', 'sft'): get_kind(task)\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_a_cached_data_contract_needs_no_tokenizer(tmp_path):
    """Before its first stage a run checks its settings and keys its cached stages by the
    tokenizer's files: for a local model neither loads the tokenizer, nor imports torch."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from tasks.caching import tokenizer_identity\n"
        "from tasks.config import RunConfig\n"
        "from tasks.preflight import check_model, max_positions\n"
        "from tasks.sources import TokenizerSource\n"
        f"cfg = RunConfig(home={str(tmp_path)!r})\n"
        "facts, problems = check_model(cfg)\n"
        "source = TokenizerSource(cfg.model.name_or_path)\n"
        "identity = tokenizer_identity(source)\n"
        "print(max_positions(facts), problems, source._tokenizer is None, 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.split() == ["512", "[]", "True", "False"]


# What each module in flows/ is: a flow, the command line, or Prefect glue (its tasks, deployments,
# hooks, the local server). A benchmark harness, prediction or business logic belongs elsewhere
# (tasks/, bench/): a new module here fails until it is one of these.
FLOWS_ROLES = {
    "flows": "glue",  # the package: Prefect's logging settings
    "flows.finetune": "flow",
    "flows.sweep": "flow",
    "flows.stages": "glue",  # the stages as Prefect tasks
    "flows.policies": "glue",  # their retry and cache-key policies, their timing
    "flows.deploy": "glue",  # the scheduled deployments
    "flows.notify": "glue",  # the flow's failure and completion hooks
    "flows.local_server": "glue",  # the home's Prefect server
    "flows.cli": "cli",
    "flows.cli_base": "cli",
    "flows.cli_models": "cli",
    "flows.cli_ops": "cli",
    "flows.cli_pairs": "cli",
}


def test_flows_holds_flows_the_cli_and_prefect_glue_only():
    for path in ROOT.glob("flows/*.py"):
        module, text = module_name(path), path.read_text()
        role = FLOWS_ROLES.get(module)
        assert role is not None, f"{module} is not a flow, the CLI or Prefect glue: move it"
        if role == "flow":
            assert "@flow(" in text, f"{module} defines no flow"
        elif role == "cli":
            assert "import typer" in text, f"{module} defines no command"
        else:
            assert "prefect" in text.lower(), f"{module} does not touch Prefect"


# Every section of the config, and every field name any section has.
def _config_fields() -> set[str]:
    from tasks import config

    sections = [c for c in vars(config).values() if isinstance(c, type)]
    sections = [
        c for c in sections if issubclass(c, config.BaseModel) and c is not config.BaseModel
    ]
    return {name for c in sections for name in c.model_fields}


SETTINGS = (
    r"(^|\.)(\w*cfg|config)(\.(data|model|train|eval|lm_eval|registry|promote|sweep|notify))*$"
)


def test_settings_are_never_assigned_after_resolution():
    """Settings are resolved once (the config, then what the data and the model say) and read
    after that: every config section is frozen, and no statement in flows/ or tasks/ assigns to a
    config field, directly or with setattr."""
    import re

    import pytest
    from pydantic import ValidationError

    from tasks.config import RunConfig

    cfg = RunConfig()
    for section in (cfg, cfg.data, cfg.model, cfg.train, cfg.eval, cfg.eval.lm_eval, cfg.promote):
        name = next(iter(type(section).model_fields))
        with pytest.raises(ValidationError, match="frozen"):
            setattr(section, name, getattr(section, name))

    fields, settings = _config_fields(), re.compile(SETTINGS)
    found = []
    for path in [*ROOT.glob("tasks/**/*.py"), *ROOT.glob("flows/*.py")]:
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("setattr"):
                args = node.args[-3:]
                if len(args) == 3 and isinstance(args[1], ast.Constant):
                    owner, field = ast.unparse(args[0]), str(args[1].value)
                    if field in fields and settings.search(owner):
                        found.append(f"{path.name}:{node.lineno}: setattr({owner}, {field!r})")
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr in fields:
                    owner = ast.unparse(target.value)
                    if settings.search(owner):
                        found.append(f"{path.name}:{node.lineno}: {owner}.{target.attr} = ...")
    assert not found, found


def test_the_map_names_every_module():
    """docs/architecture.md stays true: every module of flows/, tasks/ and tasks/kinds/ is on it."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    for path in [
        *ROOT.glob("flows/*.py"),
        *ROOT.glob("tasks/*.py"),
        *ROOT.glob("tasks/kinds/*.py"),
    ]:
        if path.name == "__init__.py" and path.parent.name != "kinds":
            continue
        assert f" {path.name} " in text, f"{path.relative_to(ROOT)} is not on docs/architecture.md"


# Where a setting may be derived (a config copied with a change), and why there: each is where
# the value is first known. Everywhere else, stages and the recipe read the settings they get.
RESOLVED_AT = {
    (
        "flows/finetune.py",
        "pin_parent",
    ): "the registered parent, pinned to its version at the start",
    ("flows/stages.py", "prepare_data"): "the model materialised, the data contract's settings, "
    "max length and truncation sized to the data: Prepared.cfg",
    ("flows/sweep.py", "trial_stage"): "a trial's candidate recipe",
    ("flows/sweep.py", "sweep"): "the best trial's recipe, trained again by finetune",
    ("flows/deploy.py", "deployments"): "the served config's home as an absolute path",
    ("tasks/resolve.py", "contract_settings"): "the contract's truncation bound",
    ("tasks/resolve.py", "size_to_data"): "max length and truncation from the token lengths",
    ("tasks/sources.py", "materialize_model"): "the model as a local folder",
    ("tasks/fit.py", "fit_memory"): "train.memory: the batch and options the loaded model fits",
    ("tasks/fit.py", "_choices"): "train.memory: the bytes each chosen option saves",
    ("tasks/kinds/dpo.py", "derive"): "a pair's prompt read by sft's chat reader (a view)",
}


def test_settings_are_derived_only_where_they_are_first_known():
    import re

    settings = re.compile(SETTINGS)
    found = set()
    for path in [*ROOT.glob("tasks/**/*.py"), *ROOT.glob("flows/*.py")]:
        if path.name == "config.py":
            continue
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef):
                continue
            for node in ast.walk(function):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "model_copy"
                    and settings.search(ast.unparse(node.func.value))
                ):
                    found.add((str(path.relative_to(ROOT)), function.name))
    nested = {site for site in found if site not in RESOLVED_AT}
    assert not nested, f"settings derived outside the places they are first known: {nested}"
