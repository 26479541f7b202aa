"""``alpa-lite``: plan a JAX program from the command line, show saved plans, compare, check.

    alpa-lite plan examples.mlp:target --mesh 2x4 [--cluster dgx-h100 --hosts 2] [--method auto]
                   [--memory-budget 40GB] [--remat auto|never|always] [--json plan.json] [--html plan.html]
    alpa-lite show plan.json
    alpa-lite compare examples.mlp:target --mesh 8
    alpa-lite check examples.mlp:target --mesh 2x4 [--plan plan.json]
    alpa-lite calibrate [--mesh 2x4] [--out cluster.json] [--quick]   (then plan --cluster cluster.json)

TARGET is ``MODULE:FUNCTION`` (MODULE importable from the current directory, or a ``.py`` path);
the function takes no arguments and returns ``(fn, example_args)``, or ``(fn, example_args,
plan_kwargs)`` with further ``al.plan`` keyword arguments (``batch_argnums``, ...).

Devices: before jax starts, the command asks XLA for max(8, mesh size) CPU devices (at most
``MAX_FORCED_DEVICES``), unless ``XLA_FLAGS`` already sets a count. A mesh with more devices
than are here, or a GPU cluster preset planned on a machine without GPUs, is planned on a
``jax.sharding.AbstractMesh``: nothing runs. ``check`` and ``calibrate`` run here and need the
devices.

Bad input (unknown module or target, bad mesh, unknown preset, bad memory size, unreadable plan
file, any ``PlanningError``) prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click

from alpa_lite.ir.cluster import ClusterSpec, parse_mesh
from alpa_lite.ir.errors import PlanningError

# = alpa_lite.intra.planner.METHODS
METHODS = ("auto", "data_parallel", "zero3", "megatron", "dp_tp", "expert_parallel")
REMAT_CHOICES = {"auto": None, "never": False, "always": True}  # --remat → al.plan's remat
MAX_FORCED_DEVICES = 256  # more fake CPU devices than this costs start-up time for no use
_COUNT_FLAG = "xla_force_host_platform_device_count"
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "ki": 2**10, "mi": 2**20, "gi": 2**30,
          "ti": 2**40}


class CliError(click.ClickException):
    """Bad input: one line on stderr, exit status 2."""

    exit_code = 2


# ---- parsing options (before jax starts) ----------------------------------------------------
def parse_memory(text: str) -> float:
    """``"40GB"`` → 40e9, ``"16GiB"`` → 16·2³⁰, ``"512MB"``, ``"1e9"`` (bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise CliError(f"bad memory size {text!r}: write a positive number and a unit, e.g. 40GB, 16GiB, 512MB")
    return float(m.group(1)) * _UNITS[m.group(2)]


def load_cluster(name: str | None, hosts: int | None) -> ClusterSpec | None:
    """A preset name (``dgx-h100``, ``dgx-a100``, ``cpu``) or a ClusterSpec JSON file."""
    if name is None:
        if hosts is not None:
            raise CliError("--hosts needs --cluster (a preset such as dgx-h100)")
        return None
    if name.endswith(".json") or os.path.sep in name:
        if hosts is not None:
            raise CliError("--hosts applies to a cluster preset; a cluster file gives its own mesh")
        try:
            return ClusterSpec.from_json(Path(name).read_text())
        except OSError as e:
            raise CliError(f"cannot read cluster file {name!r}: {e.strerror or e}") from None
    return ClusterSpec.preset(name, num_hosts=hosts or 1)


@dataclass(frozen=True)
class MeshChoice:
    shape: tuple[int, ...]
    names: tuple[str, ...]
    cluster: ClusterSpec | None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def for_gpus(self) -> bool:
        return self.cluster is not None and self.cluster.name.startswith("dgx")


def choose_mesh(mesh: str | None, axes: str | None, cluster: ClusterSpec | None) -> MeshChoice:
    if mesh is None:
        if cluster is None:
            raise CliError("give --mesh (e.g. 8 or 2x4) or --cluster (e.g. dgx-h100)")
        shape = tuple(cluster.mesh_shape)
    else:
        shape = parse_mesh(mesh)
    if axes:
        names = tuple(a.strip() for a in axes.split(","))
        if len(names) != len(shape) or not all(names) or len(set(names)) != len(names):
            raise CliError(f"--axes {axes!r} must name each of the {len(shape)} mesh axes once, e.g. "
                           + ",".join("xyzw"[: len(shape)] if len(shape) <= 4 else ["a"] * len(shape)))
    elif cluster is not None and shape == tuple(cluster.mesh_shape):
        names = tuple(cluster.axis_names)
    else:
        names = tuple("xyzw"[i] if len(shape) <= 4 else f"a{i}" for i in range(len(shape)))
    return MeshChoice(shape, names, cluster)


def force_host_devices(n: int) -> None:
    """Ask XLA for max(8, n) CPU devices; must run before jax's backend starts."""
    flags = os.environ.get("XLA_FLAGS", "")
    if _COUNT_FLAG in flags or n > MAX_FORCED_DEVICES:
        return
    os.environ["XLA_FLAGS"] = f"{flags} --{_COUNT_FLAG}={max(8, n)}".strip()


def make_mesh(choice: MeshChoice, *, need_devices: bool) -> Any:
    """A concrete mesh when this machine has the devices (and they are what the cluster describes),
    else an ``AbstractMesh``; ``need_devices`` makes the lack of devices an error."""
    import jax

    devices = jax.devices()
    enough = len(devices) >= choice.size
    if need_devices and not enough:
        raise CliError(f"check compiles the plan here: mesh {'x'.join(map(str, choice.shape))} needs "
                       f"{choice.size} devices, this machine has {len(devices)} {devices[0].platform} devices "
                       "(use 'alpa-lite plan' to plan it on an abstract mesh)")
    platform_ok = not choice.for_gpus or devices[0].platform == "gpu"
    if enough and (need_devices or platform_ok):
        return jax.make_mesh(choice.shape, choice.names, devices=devices[: choice.size])
    return jax.sharding.AbstractMesh(choice.shape, choice.names)


# ---- the target ------------------------------------------------------------------------------
def load_target(spec: str) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """``MODULE:FUNCTION`` → ``(fn, example_args, plan_kwargs)``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"bad target {spec!r}: write MODULE:FUNCTION, e.g. examples.mlp:target")
    module = _import(module_name)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            own = sorted(k for k, v in vars(module).items()
                         if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == module.__name__)
            hint = f"; it defines {', '.join(own[:8])}" if own else ""
            raise CliError(f"module {module_name!r} has no {attr!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CliError(f"{spec} is not a function: TARGET must be a function returning (fn, example_args)")
    try:
        result = obj()
    except Exception as e:
        raise CliError(f"calling {spec}() failed: {type(e).__name__}: {e}") from e
    if not (isinstance(result, (tuple, list)) and len(result) in (2, 3) and callable(result[0])
            and isinstance(result[1], (tuple, list)) and (len(result) == 2 or isinstance(result[2], dict))):
        raise CliError(f"{spec}() must return (fn, example_args) or (fn, example_args, plan_kwargs), "
                       f"got {type(result).__name__}")
    return result[0], tuple(result[1]), dict(result[2]) if len(result) == 3 else {}


def _import(module_name: str) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # the console script does not put the current directory on the path
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise CliError(f"cannot import {module_name!r}: no such file")
            name = Path(module_name).stem
            spec = importlib.util.spec_from_file_location(name, module_name)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.modules[name] = module
            spec.loader.exec_module(module)  # type: ignore[union-attr]
            return module
        return importlib.import_module(module_name)
    except CliError:
        raise
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise CliError(f"cannot import module {module_name!r}: no module named {e.name!r} "
                           f"(looked in {cwd} and the installed packages)") from None
        raise CliError(f"importing {module_name!r} failed: {type(e).__name__}: {e}") from e
    except Exception as e:
        raise CliError(f"importing {module_name!r} failed: {type(e).__name__}: {e}") from e


def arg_names(fn: Callable[..., Any]) -> list[str] | None:
    """Names of ``fn``'s positional parameters, to label inputs ``params['layer0']['w']``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names or None


# ---- output --------------------------------------------------------------------------------
def stdout_console() -> Any:
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 120  # rich assumes 80 columns when piped: too narrow for the tables
    return console


@contextlib.contextmanager
def one_line_errors(ctx: click.Context) -> Iterator[None]:
    """Expected failures → ``CliError`` (one line, status 2), unless ``--traceback``."""
    if ctx.find_root().params.get("traceback"):
        yield
        return
    try:
        yield
    except CliError:
        raise
    except PlanningError as e:
        raise CliError(str(e)) from e
    except Exception as e:  # the user's program failed to trace, or the planner failed on it
        raise CliError(f"{type(e).__name__}: {e} (run 'alpa-lite --traceback ...' for the traceback)") from e


# ---- commands ----------------------------------------------------------------------------------
def _target_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.argument("target"),
        click.option("--mesh", help="Mesh shape: sizes joined by 'x', e.g. 8 or 2x4 (default: the cluster's)."),
        click.option("--axes", help="Mesh axis names, comma-separated (default x,y,...; a preset's host,device)."),
        click.option("--cluster", help="Hardware: preset dgx-h100, dgx-a100, cpu, or a ClusterSpec JSON file."),
        click.option("--hosts", type=click.IntRange(min=1), help="Hosts of a cluster preset (default 1)."),
        click.option("--memory-budget", help="Bytes per device, e.g. 40GB, 16GiB (default: device memory)."),
        click.option("--time-limit", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
                     help="Seconds for the ILP solver per plan."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@dataclass
class Setup:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    mesh: Any
    cluster: ClusterSpec | None
    memory_budget: float | None
    time_limit: float

    def plan(self, method: str, progress: Any = None, **options: Any) -> Any:
        import alpa_lite as al

        kwargs = {"memory_budget": self.memory_budget, "time_limit_s": self.time_limit, **self.kwargs, **options}
        return al.plan(self.fn, *self.args, mesh=self.mesh, cluster=self.cluster, method=method,
                       progress=progress, **kwargs)


def _setup(target: str, mesh: str | None, axes: str | None, cluster: str | None, hosts: int | None,
           memory_budget: str | None, time_limit: float, *, need_devices: bool = False) -> Setup:
    """Parse and check every option first (one-line errors, fast), then start jax."""
    budget = parse_memory(memory_budget) if memory_budget is not None else None
    spec = load_cluster(cluster, hosts)
    choice = choose_mesh(mesh, axes, spec)
    if need_devices or not choice.for_gpus:
        force_host_devices(choice.size)
    fn, args, kwargs = load_target(target)
    return Setup(fn, args, kwargs, make_mesh(choice, need_devices=need_devices), spec, budget, time_limit)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="alpa-lite", prog_name="alpa-lite")
@click.option("--traceback", is_flag=True, help="Show Python tracebacks instead of one-line errors.")
def cli(traceback: bool) -> None:
    """alpa-lite: auto-parallelism planning for JAX (after Alpa)."""


@cli.command("plan")
@_target_options
@click.option("--method", type=click.Choice(METHODS), default="auto", show_default=True,
              help="auto (the ILP's choice) or a baseline strategy.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the plan to this JSON file.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Write the plan's HTML view here.")
@click.option("--all", "show_all", is_flag=True, help="List every predicted collective.")
@click.option("--remat", type=click.Choice(tuple(REMAT_CHOICES)),
              help="Activation recomputation per pipeline stage: auto (the planner's choice, the default), "
                   "never, or always (every layer; per pipeline stage, or per layer of one stage).")
@click.pass_context
def plan_cmd(ctx: click.Context, target: str, mesh: str | None, axes: str | None, cluster: str | None,
             hosts: int | None, memory_budget: str | None, time_limit: float, method: str,
             json_path: str | None, html_path: str | None, show_all: bool, remat: str) -> None:
    """Plan TARGET (MODULE:FUNCTION returning (fn, example_args)) and print the plan."""
    from alpa_lite.report.progress import PlanProgress
    from alpa_lite.report.terminal import plan_renderable

    with one_line_errors(ctx):
        setup = _setup(target, mesh, axes, cluster, hosts, memory_budget, time_limit)
        with PlanProgress() as progress:
            options = {} if remat is None else {"remat": REMAT_CHOICES[remat]}  # else the target's or None
            result = setup.plan(method, progress, **options)
        _write(json_path, result.to_json())
        _write(html_path, _html_page(result))
    stdout_console().print(plan_renderable(result, arg_names=arg_names(setup.fn),
                                           max_rows=len(result.collectives) if show_all else 20))
    for path, what in ((json_path, "plan"), (html_path, "HTML view")):
        if path:
            click.echo(f"{what} written to {path}")


@cli.command("show")
@click.argument("file")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Write the plan's HTML view here.")
@click.option("--all", "show_all", is_flag=True, help="List every predicted collective.")
@click.pass_context
def show_cmd(ctx: click.Context, file: str, html_path: str | None, show_all: bool) -> None:
    """Print a plan saved with 'alpa-lite plan --json FILE' (or plan.to_json())."""
    from alpa_lite.report.terminal import plan_renderable

    with one_line_errors(ctx):
        result = read_plan(file)
        _write(html_path, _html_page(result))
    stdout_console().print(plan_renderable(result, max_rows=len(result.collectives) if show_all else 20))


@cli.command("compare")
@_target_options
@click.pass_context
def compare_cmd(ctx: click.Context, target: str, mesh: str | None, axes: str | None, cluster: str | None,
                hosts: int | None, memory_budget: str | None, time_limit: float) -> None:
    """Plan TARGET with auto and every baseline; print them side by side."""
    from alpa_lite.report.progress import PlanProgress
    from alpa_lite.report.terminal import Comparison

    with one_line_errors(ctx):
        setup = _setup(target, mesh, axes, cluster, hosts, memory_budget, time_limit)
        methods = [m for m in METHODS if m != "dp_tp" or len(setup.mesh.axis_names) == 2]
        plans: dict[str, Any] = {}
        with PlanProgress() as progress:
            for m in methods:
                progress.prefix = f"{m}: "
                try:
                    plans[m] = setup.plan(m, progress)
                except PlanningError as e:  # e.g. a baseline that does not fit in memory
                    plans[m] = str(e)
    console = stdout_console()
    console.print(Comparison(plans))
    if "dp_tp" not in methods:
        console.print("dp_tp (data × tensor parallel) needs a 2-D mesh: not planned.")


@cli.command("check")
@_target_options
@click.option("--method", type=click.Choice(METHODS), default="auto", show_default=True)
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False),
              help="Check this saved plan (its mesh) instead of planning again.")
@click.option("--strict", is_flag=True, help="Exit with status 1 when anything is flagged.")
@click.pass_context
def check_cmd(ctx: click.Context, target: str, mesh: str | None, axes: str | None, cluster: str | None,
              hosts: int | None, memory_budget: str | None, time_limit: float, method: str,
              plan_path: str | None, strict: bool) -> None:
    """Compile the plan of TARGET here; print predicted vs compiled collectives, memory, FLOPs."""
    from alpa_lite.report.progress import PlanProgress
    from alpa_lite.report.terminal import check_renderable

    with one_line_errors(ctx):
        if plan_path:
            saved = read_plan(plan_path)
            mesh, axes = "x".join(map(str, saved.mesh_shape)), ",".join(saved.axis_names)
        setup = _setup(target, mesh, axes, cluster, hosts, memory_budget, time_limit, need_devices=True)
        if plan_path:
            result = saved.with_runtime(mesh=setup.mesh)
        else:
            with PlanProgress() as progress:
                result = setup.plan(method, progress)
        report = result.check(setup.fn, *setup.args)
    stdout_console().print(check_renderable(report, result))
    if strict and report.flagged:
        ctx.exit(1)


@cli.command("calibrate")
@click.option("--mesh", help="Mesh to measure on: sizes joined by 'x' (default: 2 × half the devices, e.g. 2x4).")
@click.option("--axes", help="Mesh axis names, comma-separated (default x,y,...).")
@click.option("--out", "out_path", default="cluster.json", show_default=True, type=click.Path(dir_okay=False),
              help="Write the ClusterSpec JSON here.")
@click.option("--quick", is_flag=True, help="Two sizes and fewer repeats: a few seconds, rougher figures.")
@click.option("--sizes", help="Per-device collective buffers, comma-separated (default 4KiB,32KiB,256KiB,1MiB,4MiB).")
@click.pass_context
def calibrate_cmd(ctx: click.Context, mesh: str | None, axes: str | None, out_path: str, quick: bool,
                  sizes: str | None) -> None:
    """Measure α and β per mesh axis and FLOP/s and memory bandwidth per device on the devices
    here; write a ClusterSpec JSON for 'alpa-lite plan TARGET --cluster FILE'."""
    from alpa_lite.measure.calibrate import calibrate, calibration_renderable
    from alpa_lite.report.progress import PlanProgress

    with one_line_errors(ctx):
        opts = _calibration_options(quick, sizes)
        if not Path(out_path).resolve().parent.is_dir():
            raise CliError(f"cannot write {out_path!r}: no such directory")
        shape = parse_mesh(mesh) if mesh is not None else None
        force_host_devices(math.prod(shape) if shape else 8)
        jax_mesh = _calibration_mesh(shape, axes)
        with PlanProgress() as progress:
            result = calibrate(jax_mesh, opts, progress)
        _write(out_path, result.cluster.to_json() + "\n")
    stdout_console().print(calibration_renderable(result))
    click.echo(f"cluster written to {out_path}; use it with: alpa-lite plan MODULE:TARGET --cluster {out_path}")


def _calibration_options(quick: bool, sizes: str | None) -> Any:
    from alpa_lite.measure.calibrate import CalibrationOptions

    opts = CalibrationOptions.quick() if quick else CalibrationOptions()
    if sizes is None:
        return opts
    values = tuple(sorted({int(parse_memory(v)) for v in sizes.split(",")}))
    if len(values) < 2 or values[0] < 4:
        raise CliError(f"--sizes {sizes!r}: give two or more different sizes of 4 bytes or more, e.g. 4KiB,1MiB")
    return replace(opts, sizes=values)


def _calibration_mesh(shape: tuple[int, ...] | None, axes: str | None) -> Any:
    """The mesh to measure on: ``shape`` (default 2 × half the devices, or all devices in one axis
    when their number is odd) of this machine's first devices."""
    import jax

    devices = jax.devices()
    n = len(devices)
    if shape is None:
        shape = (2, n // 2) if n >= 4 and n % 2 == 0 else (n,)
    choice = choose_mesh("x".join(map(str, shape)), axes, None)
    if choice.size > n:
        raise CliError(f"calibrate measures this machine: mesh {'x'.join(map(str, shape))} needs {choice.size} "
                       f"devices, this machine has {n} {devices[0].platform} devices")
    return jax.make_mesh(choice.shape, choice.names, devices=devices[: choice.size])


def read_plan(path: str) -> Any:
    from alpa_lite.result.plan import Plan

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise CliError(f"cannot read plan file {path!r}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise CliError(f"plan file {path!r} is not text: not an alpa-lite plan") from None
    try:
        return Plan.from_json(text)
    except PlanningError as e:
        raise CliError(f"{path}: {e}") from None


def _write(path: str | None, text: str) -> None:
    if not path:
        return
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise CliError(f"cannot write {path!r}: {e.strerror or e}") from None


def _html_page(plan: Any) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>alpa-lite plan</title></head>"
            f"<body>{plan._repr_html_()}</body></html>")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: errors are one line on stderr, exit status 2."""
    try:
        code = cli.main(args=argv, prog_name="alpa-lite", standalone_mode=False)
    except click.ClickException as e:  # bad usage, bad option values, CliError
        click.echo(f"alpa-lite: error: {e.format_message()}".replace("\n", " "), err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("alpa-lite: aborted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
