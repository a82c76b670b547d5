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
