"""The code flows one way: variants -> model -> sampling -> weights -> pipeline -> cli / serve / train.

Every module of the package has a layer here, and may import (at the top or inside a function) only modules of
lower layers. A new module must be given its layer; a failure prints every module's imports.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent / "src" / "flux2studio"

LAYERS = {
    # facts and pure functions: no other module of the package
    "flux2studio": 0,  # the version; `load` and the public classes re-exported lazily (not dependencies: PUBLIC)
    "variants": 0, "settings": 0, "precision": 0, "sampling": 0, "kernels": 0, "layouts": 0,
    "model": 0, "nano": 0, "nano.shapes": 0, "train": 0, "serve": 0, "caches": 0, "lazy_tensors": 0,
    # the models' math, key tables, images
    "layouts.transformer": 1, "layouts.vae": 1, "model.transformer": 1, "model.autoencoder": 1, "kernels.attention": 1,
    "model.minilm": 1,
    "images": 1, "nano.checker": 1,
    "text_encoders": 2, "editing": 2, "nano.planner": 2,
    # weights
    "residency": 1, "device_streaming": 1, "quantize": 2, "work_memory": 2,  # (hands back file pages: residency)
    "checkpoints": 3, "quantized_files": 4, "lora": 4, "conversion": 5,
    # the generation call, then what builds and drives it
    "pipeline": 6,
    "hosted": 7, "nano.evaluate": 7, "train.common": 7,
    "loading": 8, "nano.train": 8, "train.lora": 8,
    # the server: its parts, then the routes, then the app
    "serve.limits": 9, "serve.store": 9, "serve.schemas": 9, "serve.responses": 9,
    "serve.guard": 10, "serve.worker": 10, "serve.uploads": 10,
    "serve.validation": 11,
    "serve.routes_models": 12, "serve.routes_jobs": 12, "serve.routes_files": 12, "serve.routes_openai": 12,
    "serve.app": 13, "serve.ray_app": 14,
    "cli": 15,
}  # fmt: skip


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "flux2studio"


def _imports(path: Path) -> set[str]:
    """Modules of the package that `path` imports, wherever the import statement is."""
    name = _name(path)
    package = name.split(".") if path.name == "__init__.py" and name != "flux2studio" else name.split(".")[:-1]
    if name == "flux2studio":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names if not node.module else [None]:
                sub = f"{target}.{alias.name}" if alias and target else (alias.name if alias else target)
                found.add(sub if (ROOT / f"{sub.replace('.', '/')}.py").exists() else target or "flux2studio")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flux2studio"):
            found.add(node.module.removeprefix("flux2studio.") or "flux2studio")
    return {m or "flux2studio" for m in found} - {name}


PUBLIC = {"loading", "pipeline", "hosted", "settings", "images"}  # what the package re-exports, imported on first use


def test_every_module_imports_only_lower_layers():
    modules = {_name(p): p for p in ROOT.rglob("*.py")}
    unplaced = sorted(set(modules) - set(LAYERS))
    assert not unplaced, f"give these modules a layer in LAYERS: {unplaced}"
    listing, wrong = [], []
    for name, path in sorted(modules.items(), key=lambda kv: (LAYERS[kv[0]], kv[0])):
        deps = _imports(path) - (PUBLIC if name == "flux2studio" else set())  # the lazy public API
        listing.append(f"{LAYERS[name]:2d} {name} <- {', '.join(sorted(deps)) or '-'}")
        wrong += [
            f"{name} ({LAYERS[name]}) imports {d} ({LAYERS.get(d)})" for d in deps if LAYERS.get(d, 99) >= LAYERS[name]
        ]
    assert not wrong, "\n".join([*wrong, "", *listing])


def test_no_function_is_over_80_lines_outside_the_argparse_builder():
    allowed = {("cli", "build_parser")}  # one flat list of options; splitting it would only scatter them
    long = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80 and (_name(path), node.name) not in allowed:
                    long.append(f"{_name(path)}.{node.name}: {lines} lines")
    assert not long, long
