"""The ``evo`` command line: run, resume, watch, list, export and replay searches.

    evo run experiments/quickstart.yaml [--name N] [--storage S] [--set key=value ...]
    evo resume RUN [--storage S] [--set population.total_steps=N]
    evo status RUN [--storage S] [--json] [--watch SECONDS]
    evo list [--storage S]
    evo export RUN --format internlm2|llama --out DIR [--member ID] [--storage S]
    evo replay RUN [--storage S]
    evo report RUN [--storage S] [--out DIR]
    evo config-keys [--markdown]

RUN is a run's name in the storage (``--storage``, default ``runs``) or its directory
(``runs/quickstart``, or a URI such as ``s3://bucket/evo/quickstart``).

Exit codes: 0 done; 2 bad input (config errors, unknown run, a config that conflicts with the
stored run, a population that does not fit the cluster) -- reported before anything is written;
1 failure or a search stopped by SIGTERM/SIGINT (resume it with ``evo resume``). Errors are one
line on stderr (``evo: error: ...``); the traceback only with ``--debug`` or ``EVO_DEBUG=1``.

``evo run`` of a run that already exists resumes it, so the same command (or the same
``ray job submit ... -- evo run ...``) can simply be issued again after a stop.
Heavy imports (torch, ray) happen inside the commands that need them.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

DEFAULT_STORAGE = "runs"
RUN_HELP = "run name (in --storage), or the run's directory, e.g. runs/quickstart"
RUN_EXAMPLES = """\
--set examples (KEY is a dotted config key, VALUE is parsed as YAML; every key: evo config-keys):
  --set population.size=8 --set train.lr=3e-4     change values
  --set logging.wandb.mode=disabled               turn Weights & Biases off
  --set logging.optuna=false                      turn the Optuna study off
  --set search.train.lr=null                      drop a gene from the search (lr stays train.lr)
  --set search.train.beta2='{type: float, low: 0.9, high: 0.99}'   add a gene
  --set train.num_threads=1                       torch threads per member
  --set population.max_concurrent=2               members training at once (the driver's slots)
  --set population.resources.num_cpus=1           CPUs each member reserves in Ray
"""


class UsageError(Exception):
    """Bad input (exit 2): the message is printed as ``evo: error: <message>``."""


class Failure(Exception):
    """An expected failure (exit 1) whose message says it all: no exception type is printed."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (``evo: error: ...``) instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``evo`` console script; returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        return _fail(str(e), 2)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    debug = bool(getattr(args, "debug", False)) or os.environ.get("EVO_DEBUG", "") not in ("", "0")
    try:
        return args.command(args)
    except UsageError as e:
        return _fail(str(e), 2, debug)
    except Failure as e:
        return _fail(str(e), 1, debug)
    except KeyboardInterrupt:
        return _fail("interrupted", 1)
    except BrokenPipeError:  # `evo status --json | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # anything unexpected: one line, the traceback on request
        hint = "" if debug else " (run with --debug for the traceback)"
        return _fail(f"{type(e).__name__}: {e}{hint}", 1, debug)


def entry() -> None:
    """The ``evo`` console script: ``main()``, then exit without the interpreter's teardown.

    Once the command is done, atexit handlers run (Ray's, logging's, W&B's) and the output is
    flushed as at any exit; what is skipped is the interpreter's own teardown of every module
    and object (with torch loaded, most of a second of a short run's wall time). Where a
    non-daemon thread is still running the exit is the ordinary one, which waits for it."""
    code = main()
    if any(t is not threading.main_thread() and not t.daemon and t.is_alive() for t in threading.enumerate()):
        raise SystemExit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a reader that left (`evo status --json | head`), a closed stream
            pass
    os._exit(code)


# ------------------------------------------------------------------------------------------
# commands


def cmd_run(args: argparse.Namespace) -> int:
    """Load CONFIG, validate everything, then run the search (resuming it if it exists)."""
    from experiments.config import ConfigError, build_setup, load_config

    overrides = list(args.set or [])
    # --name and --storage are taken as they are, not as YAML ('a #b' is not 'a')
    strings = {k: v for k, v in (("name", args.name), ("storage", args.storage)) if v is not None}
    try:
        cfg = load_config(args.config, overrides, strings)
        job_storage = _job_storage(cfg.storage)
        if job_storage is not None:
            cfg = load_config(args.config, overrides, {**strings, "storage": job_storage})
        setup = build_setup(cfg)
    except ConfigError as e:
        raise UsageError(str(e)) from e
    _check_inputs(setup)
    return _search(setup)


def _job_storage(storage: str) -> str | None:
    """Under ``ray job submit --working-dir`` the working directory is a temporary copy made per
    submission, so a relative storage there would vanish with the job (and a resubmission could
    not resume). There it is resolved against $EVO_STORAGE_ROOT (default ~/evo) instead."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ or "://" in storage or os.path.isabs(storage):
        return None
    root = os.environ.get("EVO_STORAGE_ROOT") or os.path.expanduser("~/evo")
    resolved = os.path.join(root, storage)
    print(f"evo: running as a Ray job: relative storage {storage!r} is {resolved}", file=sys.stderr)
    return resolved


def cmd_resume(args: argparse.Namespace) -> int:
    """Rebuild the config of a stored run (plus --set overrides) and continue it."""
    from experiments.config import ConfigError, build_setup, config_from_dict
    from population.driver import resume_setup

    _locate_run(args)
    stored = resume_setup(args.storage, args.run)
    # The run lives where we found it and keeps its name, wherever config.yaml says it was.
    try:
        setup = build_setup(config_from_dict(stored, list(args.set or []), source=f"{args.run}/config.yaml",
                                             strings={"name": args.run, "storage": args.storage}))
    except ConfigError as e:
        raise UsageError(str(e)) from e
    _check_inputs(setup)
    return _search(setup)


def cmd_status(args: argparse.Namespace) -> int:
    """Print (or watch) the state of one run."""
    from population.inspect import run_status

    _locate_run(args)
    if args.json:
        print(json.dumps(run_status(args.storage, args.run), indent=2, default=str))
        return 0
    console = _console()
    if args.watch is None:
        console.print(_status_view(run_status(args.storage, args.run)))
        return 0
    if args.watch <= 0:
        raise UsageError(f"--watch: must be a positive number of seconds, got {args.watch}")
    from rich.live import Live

    status = run_status(args.storage, args.run)
    try:
        if not console.is_terminal:  # piped: a new view per refresh, no cursor movement
            console.print(_status_view(status))
            while status["status"] == "running":
                time.sleep(args.watch)
                status = run_status(args.storage, args.run)
                console.print()
                console.print(_status_view(status))
            return 0
        with Live(_status_view(status), console=console, auto_refresh=False) as live:
            while status["status"] == "running":
                time.sleep(args.watch)
                status = run_status(args.storage, args.run)
                live.update(_status_view(status), refresh=True)
    except KeyboardInterrupt:  # stopping the watcher does not stop the run
        pass
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """One line per run in the storage: status, round, best val_bpb."""
    from rich.table import Table

    from population.inspect import run_status
    from population.store import StoreError, list_runs

    try:
        names = list_runs(args.storage)
    except StoreError as e:
        raise UsageError(_one_line(e)) from e
    console = _console()
    if not names:
        console.print(f"no runs in {args.storage}")
        return 0
    table = Table("run", "status", "round", "best val_bpb", "best member", "updated", box=None)
    for name in names:
        try:
            s = run_status(args.storage, name)
        except Exception as e:  # one unreadable run must not hide the others
            table.add_row(name, f"unreadable: {e}", "", "", "", "")
            continue
        best = s.get("best") or {}
        table.add_row(name, s["status"], str(s["round"]), _fmt(best.get("val_bpb")),
                      _fmt(best.get("member")), _fmt(s.get("updated")))
    console.print(table)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write one member (default: the best) as a Hugging Face model directory."""
    from population.inspect import export_run

    _locate_run(args)
    try:
        out = export_run(args.storage, args.run, args.format, args.out, member=args.member)
    except (KeyError, ValueError) as e:  # an unknown member, an unfinished run
        raise UsageError(_one_line(e)) from e
    print(f"wrote {args.format} model to {out}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Train one model from scratch on the best member's hyperparameter schedule."""
    from rich.console import Console

    from population.replay import replay_run

    _locate_run(args)
    try:
        result = replay_run(args.storage, args.run, console=Console(stderr=True))
    except ValueError as e:  # nothing committed or evaluated yet
        raise UsageError(_one_line(e)) from e
    print(_replay_line(result))
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    """Every config key with its default and meaning, from the schema."""
    from experiments.config import config_keys, config_keys_markdown

    if args.markdown:
        print(config_keys_markdown(), end="")
        return 0
    width = max(len(key) for key, _, _ in config_keys())
    for key, default, meaning in config_keys():
        print(f"{key:<{width}}  {default.strip('`')}: {meaning}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write a run's self-contained HTML report (and its plots as PNG files)."""
    from population.report import write_report

    _locate_run(args)
    print(f"wrote {write_report(args.storage, args.run, out_dir=args.out)}")
    return 0


# ------------------------------------------------------------------------------------------
# helpers


def _search(setup: Any) -> int:
    """Run a validated setup through the driver and turn its outcome into an exit code."""
    from rich.console import Console

    from population.cluster import ClusterError, ConnectStopped
    from population.driver import ConfigConflictError, ResourceFitError, SearchError, config_conflict, run_search
    from population.store import RunLockedError, RunStore, StorageUnusableError, StoreError

    # Refuse a conflicting resume here, before Ray starts (the driver checks again under its lock).
    try:
        store = RunStore(setup.storage, setup.name)
        conflict = config_conflict(setup.config, store.read_config()) if store.exists() else None
    except StoreError as e:
        raise UsageError(_one_line(e)) from e
    if conflict:
        raise UsageError(f"config conflicts with stored run '{setup.name}': {conflict}")
    try:
        summary = run_search(setup, console=Console(stderr=True))
    except ConnectStopped as e:
        raise Failure(_one_line(e)) from e
    except (ConfigConflictError, ResourceFitError, RunLockedError, StorageUnusableError, ClusterError) as e:
        raise UsageError(_one_line(e)) from e
    except (SearchError, StoreError) as e:
        raise Failure(_one_line(e)) from e
    status = summary.get("status")
    if status == "stopped" or status == "interrupted":
        resume = f"evo resume {setup.name}"
        if setup.storage != DEFAULT_STORAGE:
            resume += f" --storage {setup.storage}"
        print(f"stopped at round {summary.get('round')}; resume with: {resume}", file=sys.stderr)
        return 1
    if status != "finished":
        raise Failure(f"search ended with status {status!r} at round {summary.get('round')}")
    best = summary.get("best") or {}
    print(f"best member {best.get('member')}: val_bpb {_fmt(best.get('val_bpb'))}"
          f" {_compact(best.get('genome') or {})}".rstrip())
    print(f"run store: {_store_location(setup.storage, setup.name)}")
    return 0


def _check_inputs(setup: Any) -> None:
    """What the config alone cannot say, checked before anything is written or Ray starts: the
    corpus names readable files, and a local Ray (no RAY_ADDRESS) would hold the population."""
    from trainers.data import DataError, check_corpus

    try:
        fitness = setup.fitness.held_out_corpora() if setup.fitness else {}
        check_corpus(setup.data, {f"fitness.eval.{n}.corpus": form for n, form in fitness.items()})
    except DataError as e:
        raise UsageError(_one_line(e)) from e
    if os.environ.get("RAY_ADDRESS") or setup.population.resources.num_gpus > 0:
        return   # another cluster, or GPUs: only Ray knows them; the driver checks once connected
    from population.slots import ResourceFitError, check_fit

    # A local Ray counts this machine's CPUs (a container's quota can lower it; the driver
    # checks again against what Ray reports).
    try:
        check_fit(setup.population, [{"Alive": True, "Resources": {"CPU": float(os.cpu_count() or 1)}}])
    except ResourceFitError as e:
        raise UsageError(_one_line(e)) from e


def _locate_run(args: argparse.Namespace) -> None:
    """Resolve ``args.run`` to a stored run, in place: a name in ``args.storage``, or a run's
    directory (``runs/quickstart``: storage ``runs``, name ``quickstart``). Refuses (exit 2),
    without creating anything, what is neither."""
    from population.store import RunStore, StoreError, list_runs

    run = args.run.rstrip("/") or args.run
    is_path = "/" in run
    if is_path:  # the run's directory: its parent is the storage
        storage, name = run.rsplit("/", 1)
        storage = storage or "/"
    else:
        storage, name = args.storage or DEFAULT_STORAGE, run
    try:
        if RunStore(storage, name).exists():
            args.storage, args.run = storage, name
            return
        names = list_runs(storage)
    except StoreError as e:
        raise UsageError(_one_line(e)) from e
    known = f"; runs there: {', '.join(names)}" if names else ""
    if is_path:
        raise UsageError(f"no run at {run}: {storage} holds no run named {name!r}{known}")
    raise UsageError(f"no run named {name!r} in {storage}{known}")


def _console() -> Any:
    """stdout console; piped output gets wide lines instead of rich's 80-column default."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 200))


def _status_view(s: dict) -> Any:
    """A rich renderable: the run's headline and one row per member."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    best = s.get("best") or {}
    head = f"run {s['name']}: {s['status']}, round {s['round']}"
    if s.get("total_steps") is not None:
        head += f", budget {s['total_steps']} steps"
    if s.get("restores"):
        head += f", {s['restores']} restore{'s' if s['restores'] != 1 else ''}"
    if s.get("failures"):
        head += f", {s['failures']} failure{'s' if s['failures'] != 1 else ''}"
    lines = [Text(head)]
    if best:
        lines.append(Text(f"best: member {best.get('member')}, val_bpb {_fmt(best.get('val_bpb'))}  "
                          f"{_compact(best.get('genome') or {})}"))
    if s.get("eval_failures"):
        lines.append(Text(f"fitness.function failed in {s['eval_failures']} evaluation(s) (state.json: eval_failures)"))
    # each held-out set's val_bpb.<set> and the score, where the run records them
    extra = sorted({k for m in s.get("members", []) for k in m if k.startswith("val_bpb.") or k == "score"})
    mix = any("mix" in m for m in s.get("members", []))   # several data sources: each one's share
    table = Table("id", "step", "val_bpb", *extra, *(["mix"] if mix else []), "genome", "parent", "alive",
                  "restored", box=None)
    for m in s.get("members", []):
        shares = " ".join(f"{src} {100 * v:.0f}%" for src, v in (m.get("mix") or {}).items())
        table.add_row(str(m["id"]), str(m["step"]), _fmt(m.get("val_bpb")), *(_fmt(m.get(k)) for k in extra),
                      *([shares] if mix else []), _compact(m.get("genome") or {}), _fmt(m.get("parent")),
                      "yes" if m.get("alive") else "no", str(m.get("restores", 0)))
    return Group(*lines, table)


def _compact(genome: dict) -> str:
    """``lr=1.2e-03 weight_decay=0.05 num_hidden_layers=2``: the genome without path prefixes."""
    return " ".join(f"{path.split('.', 1)[-1]}={_fmt(v)}" for path, v in sorted(genome.items()))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _replay_line(result: dict) -> str:
    parts = [f"replay of {result.get('name', 'the run')}"]
    if "member" in result:
        parts[0] += f" (member {result['member']})"
    parts.append(f"val_bpb {_fmt(result.get('val_bpb'))}")
    for key in ("original_val_bpb", "recorded_val_bpb", "run_val_bpb"):
        if key in result:
            parts.append(f"the search recorded {_fmt(result[key])}")
            break
    return ": ".join(parts[:2]) + ("; " + "; ".join(parts[2:]) if parts[2:] else "")


def _store_location(storage: str, name: str) -> str:
    if "://" in storage and not storage.startswith("file://"):
        return f"{storage.rstrip('/')}/{name}"
    local = storage.removeprefix("file://")
    return str(Path(local).expanduser().resolve() / name)


def _one_line(e: BaseException | str) -> str:
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):   # raised inside a Ray actor: its message, not Ray's traceback
        e = cause
    text = e.args[0] if isinstance(e, KeyError) and e.args else e   # str(KeyError) adds quotes
    return " ".join(str(text).split())


def _fail(message: str, code: int, debug: bool = False) -> int:
    if debug:
        traceback.print_exc()
    print(f"evo: error: {_one_line(message)}", file=sys.stderr)
    return code


def _parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print the traceback of an unexpected error (also EVO_DEBUG=1)")
    storage = argparse.ArgumentParser(add_help=False)
    storage.add_argument("--storage", default=DEFAULT_STORAGE,
                         help=f"run store root: a directory or URI (default: {DEFAULT_STORAGE})")

    p = _Parser(prog="evo", description="Population-based evolutionary search for small InternLM2-style LMs.",
                parents=[debug])
    sub = p.add_subparsers(metavar="COMMAND", required=True)

    run = sub.add_parser("run", parents=[debug], help="run a search from a YAML config (resumes it if it exists)",
                         epilog=RUN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("config", help="experiments/<name>.yaml")
    run.add_argument("--name", help="run name (default: the config's name, else the file's stem)")
    run.add_argument("--storage", help="run store root (default: the config's storage)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a config value, e.g. --set population.size=8 (repeatable; "
                          "examples below, every key: evo config-keys)")
    run.set_defaults(command=cmd_run)

    resume = sub.add_parser("resume", parents=[debug, storage], help="continue a stopped run")
    resume.add_argument("run", help=RUN_HELP)
    resume.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a value, e.g. --set population.total_steps=1000 (repeatable)")
    resume.set_defaults(command=cmd_resume)

    status = sub.add_parser("status", parents=[debug, storage], help="show a run's round, best and members")
    status.add_argument("run", help=RUN_HELP)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until the run ends")
    status.set_defaults(command=cmd_status)

    lst = sub.add_parser("list", parents=[debug, storage], help="list the runs in a storage")
    lst.set_defaults(command=cmd_list)

    export = sub.add_parser("export", parents=[debug, storage], help="export a member as a Hugging Face model")
    export.add_argument("run", help=RUN_HELP)
    export.add_argument("--format", required=True, choices=("internlm2", "llama"))
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--member", type=int, help="member id (default: the best)")
    export.set_defaults(command=cmd_export)

    replay = sub.add_parser("replay", parents=[debug, storage],
                            help="retrain the best member from scratch on its hyperparameter schedule")
    replay.add_argument("run", help=RUN_HELP)
    replay.set_defaults(command=cmd_replay)

    report = sub.add_parser("report", parents=[debug, storage],
                            help="write a self-contained HTML report of a run (plots, lineage, best schedule)")
    report.add_argument("run", help=RUN_HELP)
    report.add_argument("--out", help="output directory (default: <storage>/<run>/report)")
    report.set_defaults(command=cmd_report)

    keys = sub.add_parser("config-keys", parents=[debug],
                          help="list every config key with its default and meaning (what --set takes)")
    keys.add_argument("--markdown", action="store_true", help="as the README's Markdown table")
    keys.set_defaults(command=cmd_config_keys)
    return p
