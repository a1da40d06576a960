"""Imports only go downward (STYLE.md §3): a lower layer never imports a higher one."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "starcoder2"
LAYER = {"config": 0, "device": 0, "kernels": 1, "model": 1, "kv_cache": 1, "tokenizer": 1, "prompts": 2, "checkpoint": 2,
         "infer": 2, "data": 2, "chat": 2, "adapters": 2, "train": 3, "api": 3, "repo": 3, "gguf_export": 3,
         "server": 4, "bench": 4, "eval": 4, "finetune": 4, "cli": 4, "__init__": 5}


def _module_layer(path: Path) -> tuple[str, int]:
    rel = path.relative_to(PKG).with_suffix("")
    top = rel.parts[0]
    return ".".join(rel.parts), LAYER[top]


def test_imports_only_go_downward():
    bad = []
    for path in PKG.rglob("*.py"):
        name, layer = _module_layer(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = (name.split(".")[: -node.level] if node.level else []) + (node.module or "").split(".")
                target = next((p for p in parts if p in LAYER), None)
                if target and target != name.split(".")[0] and LAYER[target] > layer:
                    bad.append(f"{name} imports {target}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if mod and mod.split(".")[0] == "transformers" and name != "bench":  # bench: a measured peer
                    bad.append(f"{name} imports transformers")
    assert not bad, bad


def test_model_does_not_know_about_loading_or_sampling():
    src = (PKG / "model.py").read_text()
    for word in ("safetensors", "checkpoint", "sampling", "tokenizer"):
        assert f"import {word}" not in src and f".{word} import" not in src
