"""The ``spotflat`` command line: a thin layer over the library.

Each sub-command lives in its own module here and is imported only when it
is run, so ``spotflat --help`` stays fast. Errors caused by the input are
reported as one line on standard error with exit code 1; bad usage exits
with 2 (click's convention). Set ``SPOTFLAT_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import math
import os
import sys
import warnings
from pathlib import Path

import click

from ..errors import InputError, SpotflatError
from ..fileio import _os_error

__all__ = ["main", "console_main"]

# command name -> (module, function); modules are imported lazily
_COMMANDS = {
    "calibrate": ("calibrate", "calibrate"),
    "correlate": ("correlate", "correlate"),
    "coords": ("coords", "coords"),
    "response": ("response", "response"),
    "plot": ("plot", "plot"),
    "simulate": ("simulate", "simulate"),
    "demo": ("demo", "demo"),
}


def _available() -> list[str]:
    here = os.path.dirname(__file__)
    return [name for name, (mod, _) in _COMMANDS.items()
            if os.path.exists(os.path.join(here, f"{mod}.py"))]


# the arguments naming each command's inputs: an error that names no file is
# reported against them (see _with_context)
_INPUT_ARGS = {
    "calibrate": ("spotdata_dir",),
    "correlate": ("calib", "flat", "flat_dir"),
    "coords": ("points_file",),
    "response": ("spotdata", "calibration", "flat"),
    "simulate": ("outdir",),
    "demo": ("outdir",),
}


def _with_context(name: str, callback):
    """Wrap a command so that errors naming no file name the command's inputs."""

    @functools.wraps(callback)
    def run(*args, **kwargs):
        try:
            with _astropy_log_errors_only(), warnings.catch_warnings():
                # numpy's floating-point chatter (overflow in a square, all-NaN slices)
                # is not a message for the user: results are checked, not warned about
                warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"(numpy|spotflat)(\.|$)")
                return callback(*args, **kwargs)
        except InputError as exc:
            if exc.path is not None:
                raise
            given = _given(name, kwargs)
            if not given:
                raise
            raise InputError(exc.problem, path=given, expected=exc.expected) from None
        except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError, OverflowError,
                MemoryError) as exc:
            # bad input that no reader check caught: still name what was being read
            given = _given(name, kwargs)
            if not given or os.environ.get("SPOTFLAT_DEBUG"):
                raise
            text = " ".join(str(exc).split())[:200]
            raise InputError(f"cannot process these inputs ({type(exc).__name__}: {text})", path=given,
                             expected="undamaged inputs; if they are, please report this "
                                      "(SPOTFLAT_DEBUG=1 shows where it failed)") from None

    def _given(name: str, kwargs: dict) -> str:
        return ", ".join(str(kwargs[k]) for k in _INPUT_ARGS.get(name, ()) if kwargs.get(k) is not None)

    run._spotflat_context = True
    return run


@contextlib.contextmanager
def _astropy_log_errors_only():
    """astropy's log at ERROR during a command: header-repair chatter ("non-ASCII
    characters ...") is not for users. Set now if astropy is imported, else the
    moment it is (importing it costs ~0.06 s that a command's reading does not need)."""
    if "astropy" in sys.modules:
        log = sys.modules["astropy"].log
        level = log.level
        log.setLevel("ERROR")
        try:
            yield
        finally:
            log.setLevel(level)
        return
    hook = _AfterImport("astropy")
    sys.meta_path.insert(0, hook)
    try:
        yield
    finally:
        if hook in sys.meta_path:
            sys.meta_path.remove(hook)
        if hook.level is not None:
            sys.modules["astropy"].log.setLevel(hook.level)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds module ``name`` with the other finders; once it has run, sets its log to ERROR
    (keeping the level it had in :attr:`level`) and steps out of the import system."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.level = None

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            log = getattr(module, "log", None)
            if log is not None:
                self.level = log.level
                log.setLevel("ERROR")

        loader.exec_module = exec_module
        return spec


def _refuse_empty(ptype: click.Path) -> None:
    """An empty string is no path (``Path("")`` would silently mean the current folder)."""
    convert = ptype.convert

    def checked(value, param, ctx):
        if isinstance(value, str) and not value.strip():
            ptype.fail("empty path; expected a file or folder name", param, ctx)
        return convert(value, param, ctx)

    ptype.convert = checked


def _has_float(ptype) -> bool:
    if isinstance(ptype, click.types.FloatParamType):
        return True
    return isinstance(ptype, click.Tuple) and any(isinstance(t, click.types.FloatParamType) for t in ptype.types)


def _finite(callback):
    """No option takes NaN or infinity: refuse them, naming the option, before any work."""

    def check(ctx, param, value):
        values = value if isinstance(value, (tuple, list)) else (value,)
        flat = [v for item in values for v in (item if isinstance(item, (tuple, list)) else (item,))]
        bad = [v for v in flat if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise click.BadParameter(f"{bad[0]!r} is not a finite number (no nan or inf)", ctx=ctx, param=param)
        return callback(ctx, param, value) if callback is not None else value

    return check


class _SpotflatGroup(click.Group):
    """Group that loads sub-commands lazily and turns data errors into exit 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return _available()

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _available():
            return None
        mod, func = _COMMANDS[name]
        cmd = getattr(importlib.import_module(f".{mod}", __name__), func)
        if cmd.callback is not None and not getattr(cmd.callback, "_spotflat_context", False):
            cmd.callback = _with_context(name, cmd.callback)
            for param in cmd.params:
                if isinstance(param.type, click.Path):
                    _refuse_empty(param.type)
                if _has_float(param.type):
                    param.callback = _finite(param.callback)
        return cmd

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            # one line, like every other error: the usage block is what --help is for
            if exc.ctx is not None:
                exc.message = f"{exc.format_message()} (see '{exc.ctx.command_path} --help')"
                exc.ctx = None
                if isinstance(exc, click.BadParameter):  # message already formatted with the option name
                    exc.param = exc.param_hint = None
                    exc.format_message = lambda message=exc.message: message
            raise
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except SpotflatError as exc:
            _fail(exc)
        except OSError as exc:
            if getattr(exc, "filename", None):
                _fail(_os_error(exc, Path(exc.filename)), exc)
            _fail(f"{exc.strerror or exc}", exc)
        except MemoryError as exc:
            _fail("out of memory (a damaged header asking for a huge array?)", exc)
        except Exception as exc:  # last resort: still one line, no traceback
            text = " ".join(str(exc).split())
            _fail(f"unexpected error ({type(exc).__name__}): {text}", exc)


def _fail(message, exc: BaseException | None = None) -> None:
    if os.environ.get("SPOTFLAT_DEBUG"):
        raise exc if exc is not None else message
    raise click.ClickException(" ".join(str(message).split()))


@click.group(cls=_SpotflatGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spotflat")
def main() -> None:
    """Compare spot-projector throughput with CCOB flat fields (LSST Camera).

    \b
    Typical use:
      spotflat calibrate spotdata/ -o calib.fits
      spotflat correlate calib.fits --flat ccob_flat.fits -o results/
      spotflat demo            # the whole chain on simulated data
    """


def console_main() -> None:
    """The ``spotflat`` console script (and ``python -m spotflat.cli``): :func:`main`, then a
    quick exit.

    Tearing the interpreter down after a command (astropy's thousands of
    objects, the freed [spot, exposure] stacks) costs 0.1-0.2 s here, a
    twentieth of a calibration of 1400 files. Once the command has returned
    -- its outputs written and closed, no other thread or child process left
    -- the exit handlers run, the standard streams are flushed and the
    process ends without that teardown. Anything else (a thread still
    running, an exit status that is not a number) exits the usual way.
    """
    try:
        main(prog_name="spotflat")
    except SystemExit as exc:
        _quick_exit(exc.code)
        raise
    _quick_exit(0)


def _quick_exit(code) -> None:
    """``os._exit(code)`` after the exit handlers and a flush, when nothing is left running."""
    import atexit
    import threading

    if code is None:
        code = 0
    if not isinstance(code, int) or threading.active_count() > 1:
        return
    mp = sys.modules.get("multiprocessing")
    if mp is not None and mp.active_children():
        return
    run_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_handlers is None:  # not CPython: the usual exit
        return
    run_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (``| head``) or stream: nothing more to say
            pass
    os._exit(code)
