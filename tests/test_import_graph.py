"""The package's modules import one another without a cycle (every import counts, a function's too)."""
import ast
import importlib
import os

import nnunet_diffusion

PACKAGE = os.path.dirname(nnunet_diffusion.__file__)


def import_graph(folder: str = PACKAGE, package: str = "nnunet_diffusion") -> dict:
    """{module: set of the package's modules it imports}, read from the source with ast."""
    modules = {f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py"}
    graph = {}
    for m in modules:
        imported = set()
        for node in ast.walk(ast.parse(open(os.path.join(folder, f"{m}.py")).read())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == package:  # from nnunet_diffusion import x
                    imported |= {a.name for a in node.names if a.name in modules}
                elif node.module.startswith(package + "."):
                    imported.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                imported |= {a.name.split(".")[1] for a in node.names if a.name.startswith(package + ".")}
        graph[m] = (imported & modules) - {m}
    return graph


def find_cycle(graph: dict):
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_find_cycle_sees_a_cycle_through_three_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert {"network", "checkpoint", "trainer", "sampling"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_network_does_not_import_checkpoints():
    graph = import_graph()
    assert "checkpoint" not in graph["network"] and "release" not in graph["network"]


def test_every_module_imports():
    for m in sorted(import_graph()):
        importlib.import_module(f"nnunet_diffusion.{m}")
