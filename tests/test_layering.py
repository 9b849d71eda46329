"""Layering (docs/ARCHITECTURE.md): orchestrator -> trainer -> (model, data_pipeline); model: plain torch."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "model": {"trainer", "orchestrator", "data_pipeline", "deepspeed", "ray", "mlflow", "boto3", "s3fs",
              "fsspec", "webdataset", "torch.distributed"},
    "data_pipeline": {"model", "trainer", "orchestrator"},
    "trainer": {"orchestrator"},
    "cluster": {"torch", "model", "trainer", "orchestrator", "data_pipeline", "deepspeed"},
}
# Leaf modules a layer may import although their package is forbidden: they import only the standard library
# (checked below). cluster/local_cluster.py shares the Ray start-up retry of `unimo train`; the data pipeline
# builds the batch parts the objectives declare in the model's registry.
ALLOWED = {"cluster": {"orchestrator.ray_startup"},
           "data_pipeline": {"model.objective_registry", "model.validation"}}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_follow_the_layering(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imported_modules(path):
            if name in ALLOWED.get(package, ()):
                continue
            for forbidden in FORBIDDEN[package]:
                if name == forbidden or name.startswith(forbidden + "."):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_allowed_leaf_modules_import_only_the_standard_library():
    import sys

    for module in set().union(*ALLOWED.values()):
        path = ROOT / (module.replace(".", "/") + ".py")
        outside = {n for n in imported_modules(path) if n.split(".")[0] not in sys.stdlib_module_names}
        assert not outside, f"{module} imports {outside}; it must stay a standard-library-only leaf"
