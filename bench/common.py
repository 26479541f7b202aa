"""Shared pieces of the benchmark scripts: 8 CPU devices (``use_cpu_devices``), model configs, table printing."""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax


def use_cpu_devices(count: int = 8) -> None:
    """Ask XLA for ``count`` CPU devices (unless XLA_FLAGS says otherwise): a script's first step,
    before jax starts its backend."""
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={count}")


MESHES = {"8": (8,), "2x4": (2, 4), "4x2": (4, 2)}


def model_configs(smallest: bool = False, only: Sequence[str] | None = None
                  ) -> dict[str, Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]]:
    """Name → zero-argument function giving (train_step, example args), small enough for 8 CPU
    devices. Models whose example module is missing are left out (said on stderr)."""
    from examples.mlp import make_example as mlp

    configs: dict[str, Callable[[], Any]] = {
        "mlp-dp": lambda: mlp(batch=1024, hidden=64, dim=64, layers=2),
        "mlp-tp": lambda: mlp(batch=16, hidden=1024, dim=64, layers=2),
    }
    if smallest:
        return {"mlp-tp": configs["mlp-tp"]}
    optional = {"gpt": "examples.gpt", "bert": "examples.bert", "moe": "examples.moe",
                "wide_resnet": "examples.wide_resnet"}
    for name, module in optional.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            print(f"[bench] skipping {name}: {e}", file=__import__("sys").stderr)
            continue
        configs[name] = mod.target
    return {k: v for k, v in configs.items() if not only or k in only}


METHODS = ("auto", "data_parallel", "zero3", "megatron", "dp_tp")


def cases(smallest: bool = False, only: Sequence[str] | None = None) -> Iterator[tuple[str, Any, Any, str, Any]]:
    """(model name, step fn, example args, mesh name, mesh) for every model × mesh benchmarked."""
    meshes = {"8": (8,)} if smallest else MESHES
    for name, make in model_configs(smallest, only).items():
        fn, args = make()
        for mesh_name, shape in meshes.items():
            yield name, fn, args, mesh_name, jax.make_mesh(shape, ("x", "y")[: len(shape)])


def methods_for(mesh: Any) -> tuple[str, ...]:
    """auto and every baseline that applies (dp_tp needs a 2-D mesh)."""
    return METHODS if len(mesh.axis_names) >= 2 else METHODS[:-1]


def fresh(args: Any) -> Any:
    """Copies, so a plan's donation never deletes the example arguments."""
    import numpy as np

    return jax.tree.map(lambda a: jax.numpy.array(np.asarray(a)), args)


def machine() -> str:
    return (f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__}, "
            f"{datetime.date.today().isoformat()}")


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Markdown table (also what bench/README.md holds)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    text = "\n".join(lines)
    print(text + "\n")
    return text


def write_json(path: str | None, data: Any) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1, default=str)
