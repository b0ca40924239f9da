"""The package's dependencies point one way, from the edge to the core, with no cycle.

Every import counts, also one inside a function or under `TYPE_CHECKING`. A new module must
be given its layer here; ARCHITECTURE.md draws the same picture.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "gateway"

# Lowest first. A module may import its own layer or one below; the first matching rule wins.
LAYERS: list[tuple[str, list[str]]] = [
    (
        "pure",
        [
            "gateway",
            "gateway.config",
            "gateway.errors",
            "gateway.outcome",
            "gateway.records",
            "gateway.sse",
            "gateway.clientip",
            "gateway.limits",
            "gateway.metrics",
            "gateway.logs",
            "gateway.providers",
            "gateway.providers.*",
            "gateway.providers.*.decode",
            "gateway.webhooks",
            "gateway.webhooks.signing",
            "gateway.auth",
        ],
    ),
    (
        "storage, broker, provider clients",
        [
            "gateway.storage",
            "gateway.storage.*",
            "gateway.broker",
            "gateway.providers.*.client",
            "gateway.providers.truecaller.endpoint_guard",
            "gateway.providers.truecaller.profile_client",
        ],
    ),
    (
        "services",
        [
            "gateway.sessions",
            "gateway.retention",
            "gateway.memory",
            "gateway.tasks",
            "gateway.starter",
            "gateway.admission",
            "gateway.providers.base",
            "gateway.providers.*.service",
            "gateway.webhooks.delivery",
            "gateway.disk",
        ],
    ),
    ("routes", ["gateway.web", "gateway.web.*", "gateway.providers.*.routes"]),
    # The fakes and the sandbox that mounts them: outside the core, loaded only with --sandbox.
    ("sandbox", ["gateway.sandbox", "gateway.sandbox.*", "gateway.providers.*.fake"]),
    ("app factory", ["gateway.app"]),
    ("command line", ["gateway.cli", "gateway.launch", "gateway.__main__", "gateway.doctor", "gateway.workers"]),
]
# Only the sandbox may load a fake provider (tests and the benchmark use them too), and only
# the app factory and the command line load the sandbox.
FAKES = "gateway.providers.*.fake"
FAKE_USERS = ("gateway.sandbox",)
SANDBOX_USERS = ("gateway.app", "gateway.cli")


def _matches(module: str, pattern: str) -> bool:
    parts, want = module.split("."), pattern.split(".")
    return len(parts) == len(want) and all(w in ("*", p) for p, w in zip(parts, want, strict=True))


def layer_of(module: str) -> int:
    # Specific rules before wildcards of the same length: `providers.*.decode` is pure,
    # `providers.*.client` is not; `providers.*` alone (a provider package) is pure.
    for level, (_, patterns) in enumerate(LAYERS):
        if module in patterns:
            return level
    for level, (_, patterns) in enumerate(LAYERS):
        if any(_matches(module, p) for p in patterns):
            return level
    raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_layers.py")


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The gateway modules `module` imports, each with the packages whose __init__ that runs."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if candidate in known and candidate != module:
                    targets.add(candidate)
    return targets


@functools.cache
def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {m: imports(m, p, known) for m, p in found.items()}


def test_every_module_has_a_layer() -> None:
    for module in modules():
        layer_of(module)


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_module_imports_a_layer_above_it(module: str) -> None:
    deps = graph()[module]
    upward = sorted(d for d in deps if layer_of(d) > layer_of(module))
    assert not upward, f"{module} ({LAYERS[layer_of(module)][0]}) imports " + ", ".join(
        f"{d} ({LAYERS[layer_of(d)][0]})" for d in upward
    )


def test_there_is_no_import_cycle() -> None:
    deps = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(deps[module]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(deps):
        if module not in state:
            visit(module, [module])


def test_only_the_sandbox_imports_the_fake_providers() -> None:
    for module, deps in graph().items():
        if _matches(module, FAKES) or any(module == u or module.startswith(u + ".") for u in FAKE_USERS):
            continue
        fakes = sorted(d for d in deps if _matches(d, FAKES))
        assert not fakes, f"{module} imports {fakes}"


def test_only_the_app_factory_and_the_cli_import_the_sandbox() -> None:
    for module, deps in graph().items():
        if module.startswith("gateway.sandbox") or module in SANDBOX_USERS:
            continue
        assert not any(d.startswith("gateway.sandbox") for d in deps), module


def test_the_checker_sees_what_it_must() -> None:
    """The rules catch the knots this layout removed (guards against a checker that passes anything)."""
    assert layer_of("gateway.providers.truecaller.decode") < layer_of("gateway.providers.truecaller.client")
    assert layer_of("gateway.web.api") > layer_of("gateway.sessions") > layer_of("gateway.storage.sqlite")
    # The backends are interchangeable: PostgreSQL's sits where SQLite's does (`gateway.storage.*`).
    assert layer_of("gateway.storage.postgres") == layer_of("gateway.storage.sqlite")
    deps = graph()
    assert "gateway.web.context" in deps["gateway.web.api"]  # a plain import
    assert "gateway.sandbox" in deps["gateway.app"]  # an import inside a function
    assert "gateway.app" in deps["gateway.cli"]
