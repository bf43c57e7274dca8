"""Small benchmark harness: run a step in a fresh subprocess, measure wall time and peak RSS.

Stdlib only (``pandas`` is accepted but not required by :func:`format_table`), so this
module is importable from both the project venv and the separate scvi-tools venv
(``/work/bench-venv``) used for the reference implementation.

Protocol
--------
The measured child is any Python program (a script, a snippet, or a ``module:function``).
It reports its own internal timings by printing ONE line to stdout of the form::

    RESULT {"task": "train", "seconds": 12.3, ...}

(:func:`emit_result` does that).  Other output (warnings, logs, progress) may surround it;
:func:`parse_results` picks the ``RESULT`` lines out.

How peak RSS is measured (and why not naively)
----------------------------------------------
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` / ``os.wait4`` give the peak resident set size of a
child in KiB on Linux.  But on Linux the kernel carries the *pre-exec* memory high-water mark
over ``execve`` (``signal->maxrss``), and Python's ``subprocess`` spawns with ``vfork`` /
``posix_spawn``: a child started directly from a big parent process therefore reports the
*parent's* peak RSS if that is larger (verified: a parent holding 2 GB makes a trivial
``python -c pass`` child "use" 2 GB).  ``RUSAGE_CHILDREN`` is moreover a max over *all*
children ever waited for, so it cannot isolate one run.

To be robust, :func:`run_command` starts a tiny stdlib-only *launcher* Python process
(``python -c _LAUNCHER``, ~10 MB).  The launcher spawns the measured command, waits for it with
``os.wait4(pid)`` and writes that child's own ``rusage`` (peak RSS, user/sys CPU) plus wall
time as JSON to a temp file.  The measured command thus inherits at most the launcher's ~10 MB
high-water mark, independent of how big the benchmark driver is.  ``ru_maxrss`` covers the
measured process and any of its descendants it waited for (e.g. DataLoader workers, which are
reaped), taking the max over them, not the sum.  The child may additionally report its own
``VmHWM`` (see :func:`self_peak_rss_kib`) as a cross-check; that counts only its main process.

Units: ``peak_rss_kib`` is KiB as reported by the kernel; ``peak_rss_gb`` is decimal GB
(1e9 bytes) = KiB * 1024 / 1e9.
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterable, Mapping, Sequence

RESULT_PREFIX = "RESULT "

__all__ = [
    "RESULT_PREFIX",
    "emit_result",
    "self_peak_rss_kib",
    "parse_results",
    "run_command",
    "run_script",
    "run_snippet",
    "run_function",
    "kib_to_gb",
    "format_table",
    "print_table",
]

# Launcher executed as `python -c _LAUNCHER OUT_JSON TIMEOUT -- CMD...`.  Kept stdlib-only and
# import-light so its own (inherited) memory high-water mark stays ~10 MB.
_LAUNCHER = r"""
import json, os, signal, subprocess, sys, time
out, timeout = sys.argv[1], float(sys.argv[2])
cmd = sys.argv[4:]
t0 = time.perf_counter()
p = subprocess.Popen(cmd, start_new_session=True)
def _forward(signum, frame):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    finally:
        os._exit(128 + signum)
signal.signal(signal.SIGINT, _forward)
signal.signal(signal.SIGTERM, _forward)
timed_out = False
deadline = None if timeout <= 0 else t0 + timeout
while True:
    pid, status, ru = os.wait4(p.pid, os.WNOHANG)
    if pid:
        break
    if deadline is not None and time.perf_counter() > deadline:
        timed_out = True
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pid, status, ru = os.wait4(p.pid, 0)
        break
    time.sleep(0.02)
wall = time.perf_counter() - t0
p.returncode = os.waitstatus_to_exitcode(status)
with open(out, "w") as f:
    json.dump({"returncode": p.returncode, "wall_seconds": wall, "timed_out": timed_out,
               "peak_rss_kib": ru.ru_maxrss, "user_cpu_seconds": ru.ru_utime,
               "sys_cpu_seconds": ru.ru_stime}, f)
sys.exit(0)
"""


# --------------------------------------------------------------------------------------------
# child side
# --------------------------------------------------------------------------------------------
def self_peak_rss_kib() -> int | None:
    """Peak RSS (``VmHWM``, KiB) of the calling process since its exec; None if unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def emit_result(result: Mapping[str, Any], *, add_self_rss: bool = True, stream=None) -> None:
    """Print ``RESULT {json}`` on one line (flushed).  Adds ``child_vmhwm_kib`` if requested."""
    d = dict(result)
    if add_self_rss and "child_vmhwm_kib" not in d:
        d["child_vmhwm_kib"] = self_peak_rss_kib()
    stream = stream or sys.stdout
    stream.write(RESULT_PREFIX + json.dumps(d, default=_json_default) + "\n")
    stream.flush()


def _json_default(o):
    # numpy scalars / arrays without importing numpy
    for attr in ("item", "tolist"):
        if hasattr(o, attr):
            try:
                return getattr(o, attr)()
            except Exception:  # pragma: no cover
                pass
    return str(o)


def parse_results(text: str) -> list[dict]:
    """All ``RESULT {json}`` payloads found in ``text`` (in order); unparsable lines skipped."""
    out = []
    for line in text.splitlines():
        idx = line.find(RESULT_PREFIX)
        if idx < 0:
            continue
        payload = line[idx + len(RESULT_PREFIX):].strip()
        try:
            out.append(json.loads(payload))
        except json.JSONDecodeError:
            continue
    return out


def before_each_step(make_adam, before):
    """A ``make_adam`` (``mrvi_pyro.train.make_adam``'s signature) whose optimisers call
    ``before(params, optimizer)`` at the start of every ``step()``: for ablations and recording."""

    def wrapped(params, **kwargs):
        params = list(params)
        optimizer = make_adam(params, **kwargs)
        plain_step = optimizer.step

        def step(*args, **kw):
            before(params, optimizer)
            return plain_step(*args, **kw)

        optimizer.step = step
        return optimizer

    return wrapped


# --------------------------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------------------------
def kib_to_gb(kib: float | None) -> float | None:
    """KiB -> decimal GB (1e9 bytes)."""
    return None if kib is None else kib * 1024 / 1e9


def add_output_arguments(parser, *, what: str) -> None:
    """``--out`` (``what``) and ``--overwrite``; :func:`refuse_existing` checks them."""
    parser.add_argument("--out", required=True, help=f"{what} (not over an existing file unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def refuse_existing(parser, paths: Iterable[Any], overwrite: bool, option: str = "--out") -> None:
    """Stop with a usage error, before any work, when one of ``paths`` exists and not ``overwrite``."""
    existing = [str(p) for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        verb = "exists" if len(existing) == 1 else "exist"
        parser.error(f"{', '.join(existing)} {verb}; pass --overwrite to replace it, or choose another {option}")


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to a temporary sibling, then rename it over ``path`` (never half a file)."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def add_cohort_arguments(parser, *, n_cells: int, n_genes: int = 1_000, n_samples: int = 24,
                         n_batches: int = 3) -> None:
    """The simulated cohort's size options every benchmark takes: ``--n-cells``, ``--n-genes``,
    ``--n-samples`` and ``--n-batches``, with these defaults."""
    parser.add_argument("--n-cells", type=int, default=n_cells)
    parser.add_argument("--n-genes", type=int, default=n_genes)
    parser.add_argument("--n-samples", type=int, default=n_samples)
    parser.add_argument("--n-batches", type=int, default=n_batches)


def run_command(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    launcher_python: str | None = None,
    log_path: str | None = None,
    echo: bool = False,
    check: bool = False,
) -> dict:
    """Run ``cmd`` in a fresh process; return wall time, peak RSS and the parsed RESULT.

    Parameters
    ----------
    cmd
        Full argv of the measured program (e.g. ``[python, "script.py", "--x", "1"]``).
    env, extra_env
        Environment for the child (default: a copy of ``os.environ``), plus overrides.
    timeout
        Seconds; the child's whole process group is SIGKILLed past it (``timed_out=True``).
    launcher_python
        Interpreter for the tiny measuring launcher (default ``sys.executable``; any Python
        >= 3.9 works, it only uses the stdlib).
    log_path
        If given, the child's stdout+stderr are also written there.
    echo
        Print the child's stderr/stdout after it finishes (handy interactively).
    check
        Raise ``RuntimeError`` if the child fails, times out or prints no RESULT line.

    Returns
    -------
    dict with ``cmd``, ``returncode``, ``timed_out``, ``wall_seconds`` (launcher-measured, incl.
    interpreter start-up and imports), ``peak_rss_kib``, ``peak_rss_gb``, ``user_cpu_seconds``,
    ``sys_cpu_seconds``, ``result`` (last RESULT payload or None), ``results`` (all),
    ``stdout``, ``stderr``.
    """
    cmd = [str(c) for c in cmd]
    child_env = dict(os.environ if env is None else env)
    if extra_env:
        child_env.update({k: str(v) for k, v in extra_env.items()})
    launcher_python = launcher_python or sys.executable
    fd, meas_path = tempfile.mkstemp(prefix="harness_", suffix=".json")
    os.close(fd)
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [launcher_python, "-c", _LAUNCHER, meas_path, str(timeout or 0), "--", *cmd],
            env=child_env,
            cwd=cwd,
            capture_output=True,
            text=True,
            errors="replace",
        )
        outer_wall = time.perf_counter() - t0
        try:
            with open(meas_path) as f:
                meas = json.load(f)
        except (OSError, json.JSONDecodeError):
            meas = {"returncode": proc.returncode, "wall_seconds": outer_wall,
                    "timed_out": False, "peak_rss_kib": None,
                    "user_cpu_seconds": None, "sys_cpu_seconds": None,
                    "launcher_error": True}
    finally:
        try:
            os.unlink(meas_path)
        except OSError:
            pass

    results = parse_results(proc.stdout)
    rec = {
        "cmd": cmd,
        **meas,
        "peak_rss_gb": kib_to_gb(meas.get("peak_rss_kib")),
        "result": results[-1] if results else None,
        "results": results,
        "stdout": proc.stdout,
        "stderr": proc.stderr,
    }
    if log_path:
        with open(log_path, "w") as f:
            f.write("$ " + shlex.join(cmd) + "\n")
            f.write(proc.stdout)
            f.write(proc.stderr)
    if echo:
        sys.stderr.write(proc.stderr)
        sys.stdout.write(proc.stdout)
    if check and (rec["returncode"] != 0 or rec["timed_out"] or rec["result"] is None):
        tail = (proc.stderr or "")[-3000:]
        raise RuntimeError(
            f"benchmark child failed (rc={rec['returncode']}, timed_out={rec['timed_out']}, "
            f"result={'yes' if rec['result'] else 'no'}): {shlex.join(cmd)}\n--- stderr tail ---\n"
            f"{tail}"
        )
    return rec


def run_script(python: str, script: str, args: Iterable[Any] = (), **kw) -> dict:
    """``run_command([python, script, *args])``."""
    return run_command([python, script, *map(str, args)], **kw)


def run_snippet(python: str, code: str, **kw) -> dict:
    """Run a code string with ``python -c``.  The snippet should call :func:`emit_result`
    (``from _harness import emit_result`` works if ``benchmarks/`` is on ``PYTHONPATH``;
    pass ``extra_env={"PYTHONPATH": ...}``) or print a ``RESULT {json}`` line itself."""
    return run_command([python, "-c", code], **kw)


def run_function(
    python: str,
    target: str,
    kwargs: Mapping[str, Any] | None = None,
    *,
    sys_path: Sequence[str] = (),
    **kw,
) -> dict:
    """Call ``module:function(**kwargs)`` in a fresh ``python`` process.

    The function must return a JSON-serialisable dict; it is emitted as the RESULT line
    (with ``child_vmhwm_kib`` added).  ``kwargs`` must be JSON-serialisable.  ``sys_path``
    entries are prepended to ``sys.path`` in the child (this directory is always added so the
    child can import ``_harness``).
    """
    module, _, func = target.partition(":")
    if not module or not func:
        raise ValueError("target must look like 'package.module:function'")
    paths = [os.path.dirname(os.path.abspath(__file__)), *map(os.path.abspath, sys_path)]
    code = (
        "import json, sys, importlib\n"
        f"sys.path[:0] = {paths!r}\n"
        "from _harness import emit_result\n"
        f"fn = getattr(importlib.import_module({module!r}), {func!r})\n"
        f"res = fn(**json.loads({json.dumps(dict(kwargs or {}))!r}))\n"
        "emit_result(res if isinstance(res, dict) else {'value': res})\n"
    )
    return run_command([python, "-c", code], **kw)


# --------------------------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------------------------
def _is_missing(x) -> bool:
    try:
        return x is None or x != x  # None or NaN
    except Exception:  # pragma: no cover - exotic types
        return False


def _rows_as_dicts(rows) -> list[dict]:
    if hasattr(rows, "to_dict"):  # pandas DataFrame
        rows = rows.to_dict("records")
    # normalise NaN (e.g. from a DataFrame with partially filled columns) to None
    return [{k: (None if _is_missing(v) else v) for k, v in dict(r).items()} for r in rows]


def _fmt(x, spec):
    if x is None:
        return "-"
    try:
        if x != x:  # NaN
            return "-"
        return format(x, spec)
    except (TypeError, ValueError):
        return str(x)


def scratch_dir(prefix: str) -> str:
    """A new temporary folder for a benchmark's simulated data, removed when the script exits.

    Only the folder this call created (and what the script wrote into it) is removed; the
    benchmarks used to leave a 0.1-0.6 GB .h5ad in the system's temporary folder on every run.
    """
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def format_table(rows, baseline: str | None = None, title: str | None = None) -> str:
    """Render rows as a fixed-width text table and return it as a string.

    Each row is a mapping with ``step``, ``implementation``, ``seconds`` and either
    ``peak_rss_gb`` or ``peak_rss_kib`` (a :func:`run_command` record merged with
    ``step``/``implementation`` keys works).  Optional: ``ratio``, ``note``.

    ``ratio`` (if not given) = seconds / seconds of the *baseline* row of the same step: the
    row whose implementation equals ``baseline``, or by default the first row of that step.
    So with the reference as baseline, ratio < 1 means faster than the reference.
    Rows may be a list of dicts or a pandas DataFrame.
    """
    rows = _rows_as_dicts(rows)
    base: dict[str, float] = {}
    for r in rows:
        step = str(r.get("step", ""))
        if baseline is None:
            base.setdefault(step, r.get("seconds"))
        elif r.get("implementation") == baseline:
            base[step] = r.get("seconds")

    header = ["step", "implementation", "seconds", "peak RSS GB", "ratio"]
    has_note = any(r.get("note") for r in rows)
    if has_note:
        header.append("note")
    body = []
    for r in rows:
        step = str(r.get("step", ""))
        gb = r.get("peak_rss_gb")
        if gb is None and r.get("peak_rss_kib") is not None:
            gb = kib_to_gb(r["peak_rss_kib"])
        ratio = r.get("ratio")
        if ratio is None:
            b, s = base.get(step), r.get("seconds")
            ratio = (s / b) if (b and s is not None) else None
        line = [step, str(r.get("implementation", "")), _fmt(r.get("seconds"), ".2f"),
                _fmt(gb, ".3f"), _fmt(ratio, ".2f") + ("x" if ratio is not None else "")]
        if has_note:
            line.append(str(r.get("note") or ""))
        body.append(line)

    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(header)]
    right = {2, 3, 4}

    def fmt_line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    out = []
    if title:
        out.append(title)
    out += [fmt_line(header), sep]
    prev_step = None
    for b in body:
        if prev_step is not None and b[0] != prev_step:
            out.append("")
        out.append(fmt_line(b))
        prev_step = b[0]
    out.append(f"(ratio = seconds / seconds of {'`' + baseline + '`' if baseline else 'the first row'}"
               " of the same step; peak RSS GB = max resident set size of the process, 1e9 bytes)")
    return "\n".join(out)


def print_table(rows, baseline: str | None = None, title: str | None = None, file=None) -> None:
    """``print(format_table(...))``."""
    print(format_table(rows, baseline=baseline, title=title), file=file or sys.stdout)
