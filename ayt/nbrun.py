"""Running the notebooks headless: the papermill runner and its command line.

    python -m ayt notebook notebooks/02_consistency_training.ipynb -p loss ect -p iters 500
    python -m ayt notebook NOTEBOOK [-p NAME VALUE ...] [--name NAME] [--out-dir runs/notebooks] [--cwd DIR]

The runner (docs/architecture.md section 7) executes a copy of the notebook with the
kernel named `python3`, writes it to <out-dir>/<stem>-<name or timestamp>.ipynb (never over the
source), accepts only the names of the notebook's `parameters` cell (anything else is an error that
lists them) and converts each value to the type declared there (`steps: int = 200  # comment`).
Exit status: 0 when every cell ran; 1 when a cell failed (the cell's traceback, then one last line
`notebook NOTEBOOK failed in cell N (In [k]): Error: message`, cells counted from 1 in the source
notebook, markdown included); 2 for bad arguments.

The notebooks' glue lives in `ayt.notebook`, the interactive explorer in `ayt.explorer`.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

PathLike = Union[str, Path]
KERNEL = "python3"
PARAM_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


class NotebookError(ValueError):
    """A notebook or a parameter given to it is invalid."""


# ----------------------------------------------------------------------------------------------
# The parameters cell

@dataclass(frozen=True)
class Parameter:
    name: str
    type: str          # int | float | str | bool
    default: Any
    comment: str


def parameters_cell(nb: dict) -> tuple[int, dict]:
    """(index, cell) of the first code cell tagged `parameters`; NotebookError when there is none."""
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            return i, cell
    raise NotebookError("the notebook has no code cell tagged 'parameters'")


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def parse_parameters(source: str) -> dict[str, Parameter]:
    """The declarations of a parameters cell: every non-blank line must read
    `name: type = literal  # comment` with type int, float, str or bool, a literal of that type, and
    no other '=' on the line (papermill's own parser skips such lines)."""
    out: dict[str, Parameter] = {}
    lines = source.splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            tree = ast.parse(line)
        except SyntaxError as e:
            raise NotebookError(f"parameters cell line {lineno}: not valid Python: {line!r} ({e.msg})") from None
        stmt = tree.body[0] if len(tree.body) == 1 else None
        literal = stmt.value if isinstance(stmt, ast.AnnAssign) else None
        if isinstance(literal, ast.UnaryOp) and isinstance(literal.op, (ast.USub, ast.UAdd)):
            literal = literal.operand           # -1, +0.5
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(stmt.annotation, ast.Name) and stmt.annotation.id in PARAM_TYPES
                and isinstance(literal, ast.Constant)):
            raise NotebookError(f"parameters cell line {lineno}: expected `name: int|float|str|bool = literal  "
                                f"# comment`, got {line!r}")
        tp, value = stmt.annotation.id, ast.literal_eval(stmt.value)
        ok = (type(value) is PARAM_TYPES[tp]) or (tp == "float" and type(value) is int)
        if not ok:
            raise NotebookError(f"parameters cell line {lineno}: {stmt.target.id} is declared {tp} but its value "
                                f"is {value!r}")
        if line.count("=") != 1:
            raise NotebookError(f"parameters cell line {lineno}: {line!r} has more than one '=' (papermill's parameter "
                                "parser reads only lines with exactly one; reword the comment or the default)")
        rest = line[stmt.end_col_offset:].strip()
        if not rest.startswith("#") or not rest[1:].strip():
            raise NotebookError(f"parameters cell line {lineno}: {stmt.target.id} needs a comment (`# what it is`)")
        name = stmt.target.id
        if name in out:
            raise NotebookError(f"parameters cell line {lineno}: {name} is declared twice")
        out[name] = Parameter(name, tp, float(value) if tp == "float" else value, rest[1:].strip())
    return out


def read_parameters(notebook: PathLike) -> dict[str, Parameter]:
    """The declared parameters of a notebook file (see `parse_parameters`)."""
    nb = json.loads(Path(notebook).read_text())
    return parse_parameters(_source(parameters_cell(nb)[1]))


def convert_value(param: Parameter, raw: Any) -> Any:
    """A command-line string (or a Python value) converted to the parameter's declared type."""
    tp = param.type
    if not isinstance(raw, str):
        if tp == "float" and isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if type(raw) is PARAM_TYPES[tp]:
            return raw
        raise NotebookError(f"parameter {param.name}: expected {tp}, got {raw!r}")
    try:
        if tp == "str":
            return raw
        if tp == "bool":
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp == "int":
            try:
                return int(raw)
            except ValueError:
                f = float(raw)          # 1e3 -> 1000
                if not f.is_integer():
                    raise
                return int(f)
        value = float(raw)
        if not math.isfinite(value) and raw.strip().lower() not in ("inf", "-inf", "nan"):
            raise ValueError
        return value
    except ValueError:
        raise NotebookError(f"parameter {param.name}: {raw!r} is not a valid {tp}") from None


def resolve_parameters(declared: dict[str, Parameter], given: dict[str, Any]) -> dict[str, Any]:
    """Check names against the declarations (unknown -> NotebookError listing the known ones) and convert."""
    unknown = [k for k in given if k not in declared]
    if unknown:
        known = ", ".join(f"{p.name} ({p.type})" for p in declared.values())
        raise NotebookError(f"unknown parameter(s) {', '.join(unknown)}; this notebook's parameters are: {known}")
    return {k: convert_value(declared[k], v) for k, v in given.items()}


# ----------------------------------------------------------------------------------------------
# Kernel and execution

def check_kernel(name: str = KERNEL) -> list[str]:
    """The argv of kernel `name`; NotebookError when it is not installed. A spec that names another
    interpreter than this one (e.g. a user-level python3 kernel shadowing the environment's) is
    reported on stderr, since that interpreter may not import ayt."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        raise NotebookError(f"no Jupyter kernel named {name!r}; install it with "
                            f"`{sys.executable} -m ipykernel install --sys-prefix --name {name}`") from None
    exe = spec.argv[0] if spec.argv else ""
    generic = {"python", f"python{sys.version_info[0]}", "python%d.%d" % sys.version_info[:2]}
    if exe not in generic and Path(exe).is_absolute() and Path(exe).resolve() != Path(sys.executable).resolve():
        print(f"warning: kernel {name!r} runs {exe}, not this interpreter ({sys.executable}); "
              f"reinstall it with `{sys.executable} -m ipykernel install --sys-prefix --name {name}`", file=sys.stderr)
    return list(spec.argv)


def output_path(notebook: PathLike, out_dir: PathLike = "runs/notebooks", name: Optional[str] = None) -> Path:
    """<out_dir>/<stem>-<name or UTC timestamp>.ipynb."""
    tag = name or datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(out_dir) / f"{Path(notebook).stem}-{tag}.ipynb"


def run_notebook(notebook: PathLike, parameters: Optional[dict[str, Any]] = None,
                 out_dir: PathLike = "runs/notebooks", name: Optional[str] = None, cwd: Optional[PathLike] = None,
                 log_output: bool = True, kernel_name: str = KERNEL) -> Path:
    """Execute a copy of `notebook` with papermill and return the executed copy's path.

    parameters: {name: value}; strings are converted to the declared types, unknown names raise
    NotebookError. cwd: the kernel's working directory (default: the current one). A failing cell
    raises papermill's PapermillExecutionError (the executed copy, with the error, is still written;
    its path is the exception's `executed_copy`, the failing cell's 1-based position in the source
    notebook its `source_cell`; `failure_summary` turns it into one line).
    """
    try:
        import papermill
    except ImportError:
        raise NotebookError("running notebooks needs papermill and ipykernel: pip install -e '.[notebooks]'") from None
    notebook = Path(notebook)
    if not notebook.is_file():
        raise FileNotFoundError(f"no such notebook: {notebook}")
    values = resolve_parameters(read_parameters(notebook), dict(parameters or {}))
    check_kernel(kernel_name)
    out = output_path(notebook, out_dir, name)
    if out.resolve() == notebook.resolve():
        raise NotebookError(f"refusing to write the executed notebook over its source {notebook}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if log_output:
        _stream_papermill_log()
    try:
        papermill.execute_notebook(str(notebook), str(out), parameters=values, kernel_name=kernel_name,
                                   cwd=str(cwd or os.getcwd()), log_output=log_output, progress_bar=False)
    except papermill.PapermillExecutionError as e:
        e.executed_copy = out       # where the copy with the failing cell's output was written
        e.source_cell = source_cell_number(notebook, e.cell_index, injected=bool(values))
        raise
    return out


def _stream_papermill_log() -> None:
    """Cell outputs reach papermill's logger at INFO level: print them (plain lines, headless-readable)."""
    import logging
    logger = logging.getLogger("papermill")
    if not any(getattr(h, "_ayt", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._ayt = True
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def source_cell_number(notebook: PathLike, executed_index: int, injected: bool = True) -> int:
    """The 1-based position in the source notebook of cell `executed_index` (0-based) of papermill's
    executed copy, which holds one extra cell (the injected parameters, when parameters were given)
    right after the parameters cell."""
    params_index, _ = parameters_cell(json.loads(Path(notebook).read_text()))
    return executed_index + (-1 if injected and executed_index > params_index else 0) + 1


def failure_summary(notebook: PathLike, error: Any) -> str:
    """One line naming the notebook, the failing cell and the error of a PapermillExecutionError-like
    `error` (attributes cell_index, exec_count, ename, evalue; `source_cell` as `run_notebook` sets it)."""
    number = getattr(error, "source_cell", None)
    cell = f"cell {number}" if number else f"cell index {error.cell_index} of the executed copy"
    message = _ANSI.sub("", str(error.evalue or "")).strip().splitlines()
    return f"notebook {notebook} failed in {cell} (In [{error.exec_count}]): {error.ename}" + \
        (f": {message[0]}" if message else "")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import HelpFormatter
    ap = argparse.ArgumentParser(prog="python -m ayt notebook", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("notebook", help="the source notebook (.ipynb)")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="set a parameter of the notebook's parameters cell (repeatable)")
    ap.add_argument("--name", help="suffix of the executed copy (default: a UTC timestamp)")
    ap.add_argument("--out-dir", default="runs/notebooks", help="where the executed copy goes")
    ap.add_argument("--cwd", help="working directory of the kernel (default: the current directory)")
    ap.add_argument("--list", action="store_true", help="print the notebook's parameters and exit")
    ap.add_argument("--quiet", action="store_true", help="do not stream the cells' output")
    args = ap.parse_args(argv)
    try:
        if args.list:
            for p in read_parameters(args.notebook).values():
                print(f"{p.name}: {p.type} = {p.default!r}  # {p.comment}")
            return 0
        given: dict[str, str] = {}
        for k, v in args.parameter:
            given[k] = v
        out = run_notebook(args.notebook, given, args.out_dir, args.name, args.cwd, log_output=not args.quiet)
    except (NotebookError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # papermill's PapermillExecutionError: a cell raised
        from papermill.exceptions import PapermillExecutionError
        if not isinstance(e, PapermillExecutionError):
            raise
        sys.stdout.flush()
        tb = "\n".join(_ANSI.sub("", line) for line in (e.traceback or []))
        print(tb, file=sys.stderr)
        if getattr(e, "executed_copy", None):
            print(f"the executed copy, with the error, is {e.executed_copy}", file=sys.stderr)
        print(failure_summary(args.notebook, e), file=sys.stderr, flush=True)
        return 1
    print(f"[ayt] executed {args.notebook} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
